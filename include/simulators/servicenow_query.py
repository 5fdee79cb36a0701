"""ServiceNow encoded queries (``sysparm_query``) for the simulator: parse once, compile to predicates.

Grammar handled: ``^`` (AND), ``^OR`` (binds to the preceding condition), ``^NQ`` (new query: OR between
whole groups), ``ORDERBY<f>`` / ``ORDERBYDESC<f>``, ``^EQ``, ``^^`` (a literal ``^``), and the operators
=, !=, <, <=, >, >=, LIKE, NOT LIKE, STARTSWITH, ENDSWITH, IN, NOT IN, ISEMPTY, ISNOTEMPTY, ANYTHING,
EMPTYSTRING, BETWEEN a@b, SAMEAS, NSAMEAS, INSTANCEOF, and the ``javascript:gs.*`` date helpers
``daysAgo``/``daysAgoStart``/``hoursAgo``/``minutesAgo``/``beginningOfToday``/``nowDateTime``/
``dateGenerate``. As on ServiceNow, names, operators and values are case-sensitive, and a condition on a
field the table does not have is silently ignored (the caller decides which fields exist).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

_OPS = ("ISNOTEMPTY", "ISEMPTY", "ANYTHING", "EMPTYSTRING", "NOT IN", "NOT LIKE", "NOTLIKE", "STARTSWITH",
        "ENDSWITH", "LIKE", "INSTANCEOF", "IN", "BETWEEN", "NSAMEAS", "SAMEAS", "!=", "<=", ">=", "=", "<", ">")
_COND = re.compile(r"^([a-z0-9_][a-z0-9_.]*?)(" + "|".join(re.escape(op) for op in _OPS) + r")(.*)$", re.S)
_JS = re.compile(r"^javascript:\s*gs\.(\w+)\(([^)]*)\)\s*;?\s*$")
_FMT = "%Y-%m-%d %H:%M:%S"


class QueryError(ValueError):
    """The query uses something the simulator cannot evaluate (reported as HTTP 400)."""


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: str


@dataclass
class ParsedQuery:
    # OR of groups; each group is an AND of clauses; each clause is an OR of conditions.
    groups: list[list[list[Condition]]] = field(default_factory=list)
    order: list[tuple[str, bool]] = field(default_factory=list)  # (field, descending)

    def fields(self) -> set[str]:
        return {c.field for g in self.groups for clause in g for c in clause} | {f for f, _ in self.order}


def _js_value(value: str) -> str:
    match = _JS.match(value)
    if not match:
        raise QueryError(f"unsupported javascript expression in query: {value!r}")
    func, args = match.group(1), [a.strip().strip("'\"") for a in match.group(2).split(",") if a.strip()]
    now = datetime.now(timezone.utc).replace(microsecond=0)
    num = int(args[0]) if args and args[0].lstrip("-").isdigit() else 0
    if func == "daysAgo":
        return (now - timedelta(days=num)).strftime(_FMT)
    if func == "daysAgoStart":
        return (now - timedelta(days=num)).strftime("%Y-%m-%d 00:00:00")
    if func == "daysAgoEnd":
        return (now - timedelta(days=num)).strftime("%Y-%m-%d 23:59:59")
    if func == "hoursAgo":
        return (now - timedelta(hours=num)).strftime(_FMT)
    if func == "minutesAgo":
        return (now - timedelta(minutes=num)).strftime(_FMT)
    if func == "beginningOfToday":
        return now.strftime("%Y-%m-%d 00:00:00")
    if func in ("nowDateTime", "nowNoTZ"):
        return now.strftime(_FMT)
    if func == "dateGenerate" and len(args) == 2:
        return f"{args[0]} {args[1]}"
    raise QueryError(f"unsupported javascript function gs.{func} in query")


def _split_terms(text: str) -> list[str]:
    return [t.replace("\x00", "^") for t in text.replace("^^", "\x00").split("^")]


def parse(query: str) -> ParsedQuery:
    parsed = ParsedQuery()
    for group_text in re.split(r"\^NQ", query or ""):
        group: list[list[Condition]] = []
        for term in _split_terms(group_text):
            if not term or term == "EQ":
                continue
            if term.startswith("ORDERBYDESC"):
                parsed.order.append((term[11:], True))
                continue
            if term.startswith("ORDERBY"):
                parsed.order.append((term[7:], False))
                continue
            is_or = term.startswith("OR") and group
            cond = _parse_condition(term[2:] if is_or else term)
            if cond is None:
                continue  # unparseable terms are ignored, like invalid fields
            if is_or:
                group[-1].append(cond)
            else:
                group.append([cond])
        if group:
            parsed.groups.append(group)
    return parsed


def _parse_condition(term: str) -> Condition | None:
    match = _COND.match(term)
    if not match:
        return None
    name, op, value = match.groups()
    if op == "NOTLIKE":
        op = "NOT LIKE"
    if value.startswith("javascript:"):
        value = _js_value(value)
    return Condition(name, op, value)


def _num(value: str):
    try:
        return float(value)
    except ValueError:
        return None


def _cmp(a: str, b: str) -> int:
    na, nb = _num(a), _num(b)
    if na is not None and nb is not None:
        return (na > nb) - (na < nb)
    return (a > b) - (a < b)


Getter = Callable[[dict, str], str]


def compile_condition(cond: Condition, get: Getter, subclasses: Callable[[str], set[str]]) -> Callable[[dict], bool]:
    f, op, v = cond.field, cond.op, cond.value
    if op == "=":
        return lambda r: get(r, f) == v
    if op == "!=":
        return lambda r: get(r, f) != v
    if op in ("IN", "NOT IN"):
        values = frozenset(v.split(","))
        return (lambda r: get(r, f) in values) if op == "IN" else (lambda r: get(r, f) not in values)
    if op == "ISEMPTY" or op == "EMPTYSTRING":
        return lambda r: get(r, f) == ""
    if op == "ISNOTEMPTY":
        return lambda r: get(r, f) != ""
    if op == "ANYTHING":
        return lambda r: True
    if op == "LIKE":
        return lambda r: v in get(r, f)
    if op == "NOT LIKE":
        return lambda r: v not in get(r, f)
    if op == "STARTSWITH":
        return lambda r: get(r, f).startswith(v)
    if op == "ENDSWITH":
        return lambda r: get(r, f).endswith(v)
    if op == "SAMEAS":
        return lambda r: get(r, f) == get(r, v)
    if op == "NSAMEAS":
        return lambda r: get(r, f) != get(r, v)
    if op == "INSTANCEOF":
        classes = subclasses(v)
        return lambda r: get(r, f) in classes
    if op == "BETWEEN":
        low, _, high = v.partition("@")
        low, high = (_js_value(x) if x.startswith("javascript:") else x for x in (low, high))
        return lambda r: get(r, f) != "" and _cmp(get(r, f), low) >= 0 and _cmp(get(r, f), high) <= 0
    if op in ("<", "<=", ">", ">="):
        test = {"<": lambda c: c < 0, "<=": lambda c: c <= 0, ">": lambda c: c > 0, ">=": lambda c: c >= 0}[op]
        return lambda r: get(r, f) != "" and test(_cmp(get(r, f), v))
    raise QueryError(f"unsupported operator {op}")  # pragma: no cover - _OPS and this list agree


def compile_query(parsed: ParsedQuery, get: Getter, valid: Callable[[str], bool],
                  subclasses: Callable[[str], set[str]]) -> Callable[[dict], bool] | None:
    """A predicate for the whole query (None = everything matches). Conditions on fields that ``valid``
    rejects are dropped, as ServiceNow ignores invalid query parts."""
    compiled_groups = []
    for group in parsed.groups:
        clauses = []
        for clause in group:
            preds = [compile_condition(c, get, subclasses) for c in clause if valid(c.field)]
            if not preds:
                continue
            clauses.append(preds[0] if len(preds) == 1 else (lambda r, ps=tuple(preds): any(p(r) for p in ps)))
        if not clauses:
            return None  # one group matches everything, so the OR of groups does too
        compiled_groups.append(clauses[0] if len(clauses) == 1 else
                               (lambda r, cs=tuple(clauses): all(c(r) for c in cs)))
    if not compiled_groups:
        return None
    if len(compiled_groups) == 1:
        return compiled_groups[0]
    return lambda r, gs=tuple(compiled_groups): any(g(r) for g in gs)


def index_candidates(parsed: ParsedQuery, indexed: set[str], valid: Callable[[str], bool]):
    """For a single-group query, an AND-ed ``=``/``IN`` condition on an indexed field: (field, values)."""
    if len(parsed.groups) != 1:
        return None
    for clause in parsed.groups[0]:
        if len(clause) == 1 and clause[0].field in indexed and valid(clause[0].field):
            cond = clause[0]
            if cond.op == "=":
                return cond.field, [cond.value]
            if cond.op == "IN":
                return cond.field, cond.value.split(",")
    return None


_PLAIN_NUMBER = re.compile(r"^-?\d{1,15}(\.\d+)?$")


def sort_key(value: str):
    # Only plain decimal numbers sort numerically: a sys_id such as "4885e426..." is text, not 4885e426.
    return (0, float(value), "") if value and _PLAIN_NUMBER.match(value) else (1, 0.0, value or "")
