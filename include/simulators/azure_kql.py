"""The small KQL subset the Azure simulator's Resource Graph understands: :func:`parse_query` turns a query
over ``iotsecurityresources`` into stages, :func:`matches` evaluates a ``where`` stage on a record; anything
else is a :class:`BadQuery` (the app answers it with ARG's error envelope)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

TABLE = "iotsecurityresources"


class BadQuery(ValueError):
    pass


_STAGES = [
    ("where_type", re.compile(r"^where\s+type\s*(=~|==)\s*'([^']*)'$", re.I)),
    ("where_in", re.compile(r"^where\s+([\w.]+)\s+(!?in~?)\s*\(\s*('[^']*'(?:\s*,\s*'[^']*')*)\s*\)$", re.I)),
    ("where_cmp", re.compile(r"^where\s+([\w.]+)\s*(>=|<=|>|<)\s*datetime\(\s*([^)]+?)\s*\)$", re.I)),
    ("where_eq", re.compile(r"^where\s+([\w.]+)\s*(=~|==|!=|!~)\s*'([^']*)'$", re.I)),
    ("project", re.compile(r"^project\s+([\w]+(?:\s*,\s*[\w]+)*)$", re.I)),
    ("order", re.compile(r"^(?:order|sort)\s+by\s+(\w+)(?:\s+(asc|desc))?$", re.I)),
    ("take", re.compile(r"^(take|limit|sample)\s+(\d+)$", re.I)),
]


def parse_query(query: str) -> list[tuple[str, tuple]]:
    """The KQL subset: ``iotsecurityresources`` then ``|``-separated stages of ``where type =~ '…'``,
    ``where <path> in~ ('a', …)`` / ``!in~``, ``where <path> >= datetime(…)`` (``> < <=``), ``where <path>
    =~|==|!=|!~ '…'``, ``project a, b``, ``order by <col> [asc|desc]``, ``take|limit|sample N``."""
    parts = [p.strip() for p in query.strip().split("|")]
    if not parts or parts[0].lower() != TABLE:
        raise BadQuery(f"table {parts[0][:40]!r} is not supported here (only {TABLE})")
    stages = []
    for part in parts[1:]:
        for name, pattern in _STAGES:
            match = pattern.match(part)
            if match:
                stages.append((name, match.groups()))
                break
        else:
            raise BadQuery(f"cannot parse {part[:80]!r}")
    return stages


def path_value(record: dict, path: str) -> Any:
    value: Any = record
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def kql_datetime(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.strip().strip("'\"").replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def matches(record: dict, name: str, args: tuple) -> bool:
    if name == "where_type":
        op, wanted = args
        return record["type"] == wanted if op == "==" else record["type"].lower() == wanted.lower()
    if name == "where_in":
        path, op, items = args
        values = [v.strip()[1:-1] for v in items.split(",")]
        value = path_value(record, path)
        if op.endswith("~"):
            found = str(value).lower() in {v.lower() for v in values} if value is not None else False
        else:
            found = value in values
        return not found if op.startswith("!") else found
    if name == "where_cmp":
        path, op, when = args
        value = path_value(record, path)
        if not isinstance(value, str):
            return False
        left, right = kql_datetime(value), kql_datetime(when)
        return {">=": left >= right, "<=": left <= right, ">": left > right, "<": left < right}[op]
    path, op, wanted = args
    value = path_value(record, path)
    text = "" if value is None else str(value)
    return {"==": text == wanted, "=~": text.lower() == wanted.lower(), "!=": text != wanted,
            "!~": text.lower() != wanted.lower()}[op]
