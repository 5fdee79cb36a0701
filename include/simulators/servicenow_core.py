"""The in-memory ServiceNow instance behind the simulator: tables with indexes, auth and OAuth tokens, rate
limits, faults, counters, and the Table / Batch / Import Set / CMDB Instance APIs as plain functions that
return a :class:`Reply` (the FastAPI layer in ``servicenow_sim`` and the Batch API both call them)."""

from __future__ import annotations

import base64
import binascii
import copy
import json
import math
import re
import secrets
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from include.simulators import servicenow_query as q
from include.simulators.servicenow_schema import (
    CANCELLED,
    CANCELLED_DETAIL,
    CHOICES,
    DICTIONARY_LENGTHS,
    DISCOVERY_SOURCES,
    JOURNAL_FIELDS,
    JOURNAL_LABELS,
    NUMBER_PREFIX,
    OWN_COLUMNS,
    PARENTS,
    PRIORITY,
    RATE_LIMIT_RULE,
    REFERENCES,
    REL_TYPES,
    STANDARD_TABLES,
    SYS_COLUMNS,
)

SIM_USER = "admin"
SIM_PASSWORD = "sim-Password-1"
SIM_CLIENT_ID = "sim-client-id"
SIM_CLIENT_SECRET = "sim-client-secret-0123456789"

JSON_TYPE = "application/json;charset=UTF-8"
SYS_ID = re.compile(r"^[0-9a-f]{32}$")
INDEXED = frozenset({"name", "serial_number", "mac_address", "correlation_id", "u_alert_key", "number", "cmdb_ci",
                     "id", "ip_address", "target_sys_id", "element_id", "task", "ci_item", "parent", "child",
                     "user_name", "configuration_item", "ot_device"})
_DEFAULT_IMPORT_SETS = {
    "u_defender_iot_alert_import": {"target": "u_defender_iot_alert", "coalesce": "u_alert_key"},
    "sn_si_incident_import": {"target": "sn_si_incident", "coalesce": "correlation_id"},
}


@dataclass
class SimConfig:
    token_lifetime: int = 1800
    refresh_token_lifetime: int = 8_640_000
    latency_ms: float = 0
    ire_item_ms: float = 0
    rate_limit_per_hour: int | None = None
    client_credentials_enabled: bool = True
    users: dict[str, str] = field(default_factory=lambda: {SIM_USER: SIM_PASSWORD})
    clients: dict[str, str] = field(default_factory=lambda: {SIM_CLIENT_ID: SIM_CLIENT_SECRET})
    # extra tables: a list of names, or {name: parent table or None}
    extra_tables: Any = ()
    # standard tables to leave out, e.g. ("sn_si_incident",) for an instance without the SIR plugin
    absent_tables: tuple[str, ...] = ()
    max_url_length: int = 8192          # longer request lines get 414 URI Too Long
    max_body_bytes: int = 10 * 1024 * 1024  # glide.rest.max_content_length
    enforce_data_policy: bool = True    # resolving/closing an incident needs close_code and close_notes
    batch_max_items: int | None = None  # items beyond this go to unserviced_requests
    import_sets: dict[str, dict] = field(default_factory=lambda: copy.deepcopy(_DEFAULT_IMPORT_SETS))
    # IRE rules an instance may lack: classes (and their subclasses) whose identification rule has related
    # entries for cmdb_key_value / cmdb_ot_entity (None = every hardware class), and the lookup tables
    # the hardware rule accepts.
    related_rule_classes: tuple[str, ...] | None = None
    lookup_rule_tables: tuple[str, ...] = ("cmdb_serial_number", "cmdb_ci_network_adapter", "cmdb_ci_ip_address")
    # sys_dictionary max_length overrides {"<table>.<column>": length}, e.g. a custom column left at 40
    column_lengths: dict[str, int] = field(default_factory=dict)


@dataclass
class Faults:
    latency_ms: float = 0
    ire_item_ms: float = 0
    rate_limit_per_hour: int | None = None
    fail_next: list[dict] = field(default_factory=list)
    hibernate: bool = False
    truncate_next: int = 0
    reject_credentials: bool = False
    deny_writes: list[str] = field(default_factory=list)  # tables ("*" = all) whose writes fail with 403 ACL
    deny_reads: list[str] = field(default_factory=list)   # tables whose list queries fail with 403 (read ACL)
    import_error_next: int = 0


@dataclass
class Reply:
    status: int
    body: Any = None                 # dict/list -> JSON; str -> text as is; None -> empty
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON_TYPE
    delay: float = 0.0               # seconds of simulated server time (IRE items)

    def content(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, (bytes, bytearray)):
            return bytes(self.body)
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body, separators=(",", ":")).encode()


def error(status: int, message: str, detail: str | None = None, headers: dict | None = None) -> Reply:
    return Reply(status, {"error": {"message": message, "detail": detail}, "status": "failure"}, headers or {})


def no_resource() -> Reply:
    return error(400, "Requested URI does not represent any resource")


def now_str() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def new_sys_id() -> str:
    return uuid.uuid4().hex


def to_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict) and "value" in value:
        return to_str(value["value"])
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _bool(params: dict, name: str) -> bool:
    return str(params.get(name, "false")).lower() == "true"


class Simulator:
    """One ServiceNow instance in memory. Thread-safe (tests call it while the server thread runs)."""

    def __init__(self, config: SimConfig | None = None):
        self.config = config or SimConfig()
        self.lock = threading.RLock()
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        with self.lock:
            cfg = self.config
            self.parents = {c: p for c, p in PARENTS.items() if c not in cfg.absent_tables}
            extra = cfg.extra_tables if isinstance(cfg.extra_tables, dict) else dict.fromkeys(cfg.extra_tables)
            self.parents.update({t: p for t, p in extra.items() if p})
            names = (set(STANDARD_TABLES) - set(cfg.absent_tables)) | set(extra)
            self.data: dict[str, dict[str, dict]] = {t: {} for t in sorted(names)}
            self.where: dict[str, str] = {}           # sys_id -> class table
            self.seq: dict[str, int] = {}             # sys_id -> insertion order
            self.idx: dict[str, dict[str, dict[str, set]]] = {t: defaultdict(dict) for t in self.data}
            self.extra_columns: dict[str, list[str]] = defaultdict(list)
            self._cache: dict = {}
            self.version = 0
            self._seq = 0
            self.numbers: dict[str, int] = defaultdict(lambda: 10000)
            self.access: dict[str, tuple[str, str, float]] = {}
            self.refresh: dict[str, tuple[str, str, float]] = {}
            self.current: dict[tuple[str, str], tuple[str, str | None]] = {}
            self.windows: dict[str, deque] = defaultdict(deque)
            self.faults = Faults(latency_ms=cfg.latency_ms, ire_item_ms=cfg.ire_item_ms,
                                 rate_limit_per_hour=cfg.rate_limit_per_hour)
            self.token_lifetime = cfg.token_lifetime
            self._counters: dict[str, Any] = defaultdict(int)
            self._counters["by_route"] = defaultdict(int)
            self._counters["by_status"] = defaultdict(int)
            self._import_sets = 0
            self._seed()

    def _seed(self) -> None:
        for name in self.config.users:
            self.insert("sys_user", {"user_name": name, "name": name.title(), "active": "true"})
        for seq, value in enumerate(DISCOVERY_SOURCES):
            self.insert("sys_choice", {"name": "cmdb_ci", "element": "discovery_source", "value": value,
                                       "label": value, "language": "en", "inactive": "false",
                                       "sequence": str(seq)})
        for name in REL_TYPES:
            parent, child = name.split("::")
            self.insert("cmdb_rel_type", {"name": name, "parent_descriptor": parent, "child_descriptor": child})
        lengths = {**{f"{t}.{c}": n for (t, c), n in DICTIONARY_LENGTHS.items()}, **self.config.column_lengths}
        for name, length in lengths.items():
            table, column = name.split(".", 1)
            if table in self.data:
                self.insert("sys_dictionary", {"name": table, "element": column, "internal_type": "string",
                                               "max_length": str(length), "active": "true",
                                               "column_label": column.removeprefix("u_").replace("_", " ").title()})

    def max_lengths(self, table: str) -> dict[str, int]:
        """``{column: max_length}`` of ``table`` and its ancestors, from sys_dictionary (the nearest wins)."""
        key = ("maxlen", table)
        if key not in self._cache:
            out: dict[str, int] = {}
            for t in reversed(self.ancestors(table)):
                for row in self.lookup("sys_dictionary", "name", t) if "sys_dictionary" in self.data else ():
                    if row.get("name") == t and str(row.get("max_length", "")).isdigit():
                        out[row["element"]] = int(row["max_length"])
            self._cache[key] = out
        return self._cache[key]

    def _truncate(self, table: str, values: dict) -> dict:
        """String values cut to their column's max_length, silently, as ServiceNow stores them."""
        if table == "sys_dictionary":
            for key in [k for k in self._cache if k[0] == "maxlen"]:
                del self._cache[key]
            return values
        limits = self.max_lengths(table)
        return {k: (v[:limits[k]] if k in limits and isinstance(v, str) else v) for k, v in values.items()}

    def set_faults(self, **kw) -> dict:
        """Apply fault controls (see the module docs of servicenow_sim); returns the active faults."""
        with self.lock:
            for key, value in kw.items():
                if key == "fail_next":
                    items = value if isinstance(value, list) else [value]
                    for item in items:
                        if not isinstance(item, dict) or "status" not in item:
                            raise ValueError("fail_next needs {'status': int, 'count': int, 'path_prefix': str}")
                        item.setdefault("count", 1)
                        item.setdefault("path_prefix", "/")
                    self.faults.fail_next.extend(items)
                elif key == "token_lifetime":
                    self.token_lifetime = int(value)
                elif key == "revoke_tokens":
                    if value:
                        self.access.clear()
                elif key == "revoke_refresh_tokens":
                    if value:
                        self.refresh.clear()
                elif key == "deny_writes":
                    self.faults.deny_writes = ["*"] if value is True else list(value or [])
                elif hasattr(self.faults, key):
                    setattr(self.faults, key, value)
                else:
                    raise ValueError(f"unknown fault {key!r}")
            return self.fault_state()

    def fault_state(self) -> dict:
        out = dict(self.faults.__dict__)
        out["token_lifetime"] = self.token_lifetime
        return out

    def count(self, key: str, n: int = 1) -> None:
        self._counters[key] += n

    def counters(self) -> dict:
        with self.lock:
            out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._counters.items()}
            for key in ("requests", "token_requests", "rate_limited", "ire_items", "batch_items"):
                out.setdefault(key, 0)
            return out

    def state(self) -> dict:
        with self.lock:
            return {"tables": {t: len(rows) for t, rows in self.data.items()}, "counters": self.counters(),
                    "faults": self.fault_state()}

    # ------------------------------------------------------------- hierarchy
    def has_table(self, table: str) -> bool:
        return table in self.data

    def add_table(self, table: str) -> None:
        """A standard table appears later, as when an admin activates its plugin (e.g. Security Incident
        Response's ``sn_si_incident`` on an instance started with ``absent_tables``)."""
        with self.lock:
            if table in self.data:
                return
            if table in PARENTS:
                self.parents[table] = PARENTS[table]
            self.data[table] = {}
            self.idx[table] = defaultdict(dict)
            self._cache.clear()

    def ancestors(self, table: str) -> list[str]:
        chain = self._cache.get(("anc", table))
        if chain is None:
            chain = [table]
            while chain[-1] in self.parents:
                chain.append(self.parents[chain[-1]])
            self._cache[("anc", table)] = chain
        return chain

    def descendants(self, table: str) -> list[str]:
        key = ("desc", table)
        if key not in self._cache:
            self._cache[key] = [t for t in self.data if table in self.ancestors(t)]
        return self._cache[key]

    def subclasses(self, table: str) -> set[str]:
        key = ("subs", table)
        if key not in self._cache:
            self._cache[key] = set(self.descendants(table)) if table in self.data else {table}
        return self._cache[key]

    def columns(self, table: str) -> list[str]:
        key = ("cols", table)
        cols = self._cache.get(key)
        if cols is None:
            cols, seen = [], set()
            for t in reversed(self.ancestors(table)):
                own = OWN_COLUMNS.get(t, SYS_COLUMNS if t not in self.parents else ())
                for c in (*own, *self.extra_columns[t]):
                    if c not in seen:
                        seen.add(c)
                        cols.append(c)
            if "sys_id" not in seen:
                cols.insert(0, "sys_id")
            self._cache[key] = cols = (cols, set(cols))
        return cols[0]

    def column_set(self, table: str) -> set[str]:
        self.columns(table)
        return self._cache[("cols", table)][1]

    def ref_target(self, table: str, name: str) -> str | None:
        key = ("ref", table, name)
        if key not in self._cache:
            self._cache[key] = self._ref_target(table, name)
        return self._cache[key]

    def _ref_target(self, table: str, name: str) -> str | None:
        if name == "parent":
            return "cmdb_ci" if table == "cmdb_rel_ci" else ("task" if "task" in self.ancestors(table) else None)
        target = REFERENCES.get(name)
        if target and any(name in OWN_COLUMNS.get(t, ()) for t in self.ancestors(table)):
            return target
        return None

    def _has_class_name(self, table: str) -> bool:
        return "sys_class_name" in self.column_set(table)

    # ----------------------------------------------------------- raw access
    def table(self, table: str) -> list[dict]:
        """Copies of every record of ``table`` and its subclasses (raw stored values)."""
        with self.lock:
            return [dict(r) for r in self._scan(table)]

    def get(self, sys_id: str, table: str | None = None) -> dict | None:
        t = self.where.get(sys_id)
        if t is None or (table and t not in self.descendants(table)):
            return None
        return self.data[t][sys_id]

    def _scan(self, table: str) -> list[dict]:
        tables = self.descendants(table)
        if len(tables) == 1:
            return list(self.data[table].values())
        rows = [r for t in tables for r in self.data[t].values()]
        rows.sort(key=lambda r: self.seq[r["sys_id"]])
        return rows

    def _index(self, table: str, rec: dict, add: bool, fields=None) -> None:
        """Index ``rec`` (case-insensitively) in its class table and in every ancestor table."""
        sid = rec["sys_id"]
        present = [(f, rec[f].lower()) for f in (fields if fields is not None else INDEXED & rec.keys()) if rec.get(f)]
        for t in self.ancestors(table):
            ix = self.idx[t]
            for f, value in present:
                if add:
                    ix[f].setdefault(value, set()).add(sid)
                else:
                    ix[f].get(value, set()).discard(sid)

    def lookup(self, table: str, fieldname: str, value: str) -> list[dict]:
        """Records of ``table`` (and subclasses) whose indexed ``fieldname`` equals ``value`` (case-insensitive)."""
        ids = self.idx[table].get(fieldname, {}).get(value.lower(), ())
        return [self.data[self.where[i]][i] for i in sorted(ids, key=self.seq.__getitem__)]

    def _note_columns(self, table: str, values: dict) -> None:
        known = self.column_set(table)
        new = [k for k in values if k not in known and k not in JOURNAL_FIELDS]
        if new:
            self.extra_columns[table].extend(new)
            for key in [k for k in self._cache if k[0] in ("cols", "plan", "ref")]:
                del self._cache[key]

    def _user_id(self, user: str) -> str:
        found = self.lookup("sys_user", "user_name", user) if user else []
        return found[0]["sys_id"] if found else ""

    def insert(self, table: str, values: dict, *, user: str = "system", sys_id: str | None = None) -> dict:
        """Insert a record (no ACL or data-policy checks: for seeding and the IRE). Returns a copy."""
        with self.lock:
            if table not in self.data:
                raise KeyError(f"Invalid table {table}")
            values = self._truncate(table, {k: to_str(v) for k, v in values.items()})
            journal = {k: values.pop(k) for k in list(values) if k in JOURNAL_FIELDS}
            sid = values.pop("sys_id", "") or sys_id
            if not sid or not SYS_ID.match(sid) or sid in self.where:
                sid = new_sys_id()
            stamp = now_str()
            rec = {k: v for k, v in values.items() if not k.startswith("sys_")}
            rec.update(sys_id=sid, sys_created_on=stamp, sys_updated_on=stamp, sys_created_by=user,
                       sys_updated_by=user, sys_mod_count="0")
            if self._has_class_name(table):
                rec["sys_class_name"] = table
            self._business_rules(table, rec, None, user)
            self._note_columns(table, rec)
            self.data[table][sid] = rec
            self.where[sid] = table
            self._seq += 1
            self.seq[sid] = self._seq
            self._index(table, rec, True)
            self.version += 1
            for name, text in journal.items():
                self._journal(table, sid, name, text, user)
            return dict(rec)

    def update(self, sys_id: str, values: dict, *, user: str = "system") -> dict:
        with self.lock:
            table = self.where[sys_id]
            rec = self.data[table][sys_id]
            values = self._truncate(table, {k: to_str(v) for k, v in values.items() if not k.startswith("sys_")})
            journal = {k: values.pop(k) for k in list(values) if k in JOURNAL_FIELDS}
            old = dict(rec)
            changed = [k for k, v in values.items() if rec.get(k, "") != v]
            self._index(table, rec, False, [f for f in changed if f in INDEXED])
            rec.update(values)
            self._business_rules(table, rec, old, user)
            self._index(table, rec, True, [f for f in changed if f in INDEXED])
            self._note_columns(table, values)
            rec.update(sys_updated_on=now_str(), sys_updated_by=user, sys_mod_count=str(int(rec["sys_mod_count"]) + 1))
            self.version += 1
            for name, text in journal.items():
                self._journal(table, sys_id, name, text, user)
            return dict(rec)

    def delete(self, sys_id: str) -> None:
        with self.lock:
            table = self.where.pop(sys_id)
            rec = self.data[table].pop(sys_id)
            self._index(table, rec, False)
            if table == "sys_dictionary":
                self._truncate(table, {})
            self.seq.pop(sys_id, None)
            self.version += 1

    def reclassify(self, sys_id: str, new_table: str) -> None:
        with self.lock:
            old_table = self.where[sys_id]
            rec = self.data[old_table].pop(sys_id)
            self._index(old_table, rec, False)
            rec["sys_class_name"] = new_table
            self.data[new_table][sys_id] = rec
            self.where[sys_id] = new_table
            self._index(new_table, rec, True)
            self._note_columns(new_table, rec)
            self.version += 1

    def _journal(self, table: str, sys_id: str, name: str, text: str, user: str) -> None:
        if text:
            self.insert("sys_journal_field", {"name": table, "element": name, "element_id": sys_id,
                                              "value": text}, user=user)

    def _business_rules(self, table: str, rec: dict, old: dict | None, user: str) -> None:
        chain = self.ancestors(table)
        if "task" not in chain:
            return
        stamp = now_str()
        if old is None:
            prefix = NUMBER_PREFIX.get(table, "TASK")
            if not rec.get("number"):
                self.numbers[prefix] += 1
                rec["number"] = f"{prefix}{self.numbers[prefix]:07d}"
            defaults = {"state": "10" if table == "sn_si_incident" else "1", "impact": "3", "urgency": "3",
                        "severity": "3", "active": "true", "opened_at": stamp, "opened_by": self._user_id(user),
                        "escalation": "0", "reassignment_count": "0", "sys_domain": "global", "made_sla": "true",
                        "upon_approval": "proceed"}
            if table == "sn_si_incident":
                defaults.update(business_criticality="3", substate="")
            for k, v in defaults.items():
                rec.setdefault(k, v)
        try:
            rec["priority"] = PRIORITY[(int(rec.get("impact", "3")), int(rec.get("urgency", "3")))]
        except (KeyError, ValueError):
            pass
        state = rec.get("state", "")
        if table == "incident":
            rec["incident_state"] = state
        closed = {"incident": ("7", "8"), "sn_si_incident": ("3", "7")}.get(table, ("3", "4", "7"))
        resolved = "6" if table == "incident" else None
        if old is None or old.get("state") != state:
            if state in closed:
                rec["active"] = "false"
                rec["closed_at"] = rec.get("closed_at") or stamp if old is None else stamp
                rec["closed_by"] = self._user_id(user)
            elif state == resolved:
                rec["resolved_at"] = stamp
                rec["resolved_by"] = self._user_id(user)
            elif old is not None and old.get("state") in closed:
                rec["active"] = "true"

    # ---------------------------------------------------------------- query
    def _getter(self):
        data, where = self.data, self.where

        def get(rec: dict, name: str) -> str:
            if "." not in name:
                return rec.get(name, "")
            head, rest = name.split(".", 1)
            ref = rec.get(head, "")
            table = where.get(ref)
            return get(data[table][ref], rest) if table else ""
        return get

    def _valid_field(self, table: str, name: str) -> bool:
        head = name.split(".", 1)[0]
        if head not in self.column_set(table):
            return False
        return "." not in name or self.ref_target(table, head) is not None

    def select(self, table: str, query: str = "") -> list[dict]:
        """Records of ``table`` (with subclasses) matching an encoded query, in query order. Cached per data
        version, so paging over unchanged data does not re-run the query."""
        with self.lock:
            key = ("q", table, query)
            hit = self._cache.get(key)
            if hit and hit[0] == self.version:
                return hit[1]
            parsed = q.parse(query)
            valid = lambda f: self._valid_field(table, f)  # noqa: E731
            get = self._getter()
            pred = q.compile_query(parsed, get, valid, self.subclasses)
            cand = q.index_candidates(parsed, INDEXED, valid)
            if cand:
                ids: set[str] = set()
                ix = self.idx[table].get(cand[0], {})
                for value in cand[1]:
                    ids |= ix.get(value.lower(), set())
                rows = [self.data[self.where[i]][i] for i in sorted(ids, key=self.seq.__getitem__)]
            else:
                rows = self._scan(table)
            if pred is not None:
                rows = [r for r in rows if pred(r)]
            for name, desc in reversed([(f, d) for f, d in parsed.order if valid(f)]):
                rows.sort(key=lambda r, n=name: q.sort_key(get(r, n)), reverse=desc)
            if sum(1 for k in self._cache if k[0] == "q") > 64:
                for k in [k for k in self._cache if k[0] == "q"]:
                    del self._cache[k]
            self._cache[key] = (self.version, rows)
            return rows

    # -------------------------------------------------------------- render
    def _display(self, table: str, name: str, raw: str, ref: str | None) -> str:
        if ref:
            target = self.get(raw)
            if target is None:
                return raw
            return (target.get("name") or target.get("number") or target.get("user_name") or raw)
        for t in self.ancestors(table):
            labels = CHOICES.get(t, {}).get(name)
            if labels:
                return labels.get(raw, raw)
        labels = CHOICES["*"].get(name)
        return labels.get(raw, raw) if labels else raw

    def _journal_text(self, sys_id: str, name: str) -> str:
        entries = [r for r in self.lookup("sys_journal_field", "element_id", sys_id) if r["element"] == name]
        return "".join(f"{r['sys_created_on']} - {r['sys_created_by']} ({JOURNAL_LABELS[name]})\n{r['value']}\n\n"
                       for r in reversed(entries))

    def _plan(self, table: str, fields: list[str] | None) -> list[tuple]:
        key = ("plan", table, tuple(fields) if fields else None)
        plan = self._cache.get(key)
        if plan is None:
            names = [f for f in fields if self._valid_field(table, f)] if fields else self.columns(table)
            plan = [(n, "." in n, None if "." in n else self.ref_target(table, n), n in JOURNAL_FIELDS)
                    for n in names]
            self._cache[key] = plan
        return plan

    def render(self, table: str, rec: dict, fields: list[str] | None, dv: str, exclude_links: bool,
               base: str) -> dict:
        """A record as the Table API shows it (strings; references as {link, value}; display values)."""
        out = {}
        get = None
        for name, dotted, ref, journal in self._plan(table, fields):
            owner, leaf = table, name
            if dotted:  # dot-walked: format by the table of the last hop
                get = get or self._getter()
                head, leaf = name.rsplit(".", 1)
                target = self.get(get(rec, head))
                owner = self.where[target["sys_id"]] if target else table
                raw = target.get(leaf, "") if target else ""
                ref = self.ref_target(owner, leaf)
            else:
                raw = rec.get(name, "")
            if journal:
                out[name] = self._journal_text(rec["sys_id"], leaf) if dv == "true" else (
                    {"display_value": self._journal_text(rec["sys_id"], leaf), "value": ""} if dv == "all" else "")
                continue
            link = f"{base}/api/now/table/{ref}/{raw}" if ref and raw and not exclude_links else None
            if dv == "false":
                out[name] = {"link": link, "value": raw} if link else raw
                continue
            disp = self._display(owner, leaf, raw, ref)
            if dv == "true":
                out[name] = {"display_value": disp, "link": link} if link else disp
            else:
                out[name] = {"display_value": disp, "value": raw, **({"link": link} if link else {})}
        return out

    # ---------------------------------------------------------------- auth
    def authenticate(self, authorization: str | None) -> str | None:
        """The user behind an Authorization header (Basic or Bearer), or None."""
        if not authorization or self.faults.reject_credentials:
            return None
        scheme, _, cred = authorization.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(cred.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return user if user and self.config.users.get(user) == password else None
        if scheme.lower() == "bearer":
            entry = self.access.get(cred.strip())
            if entry and entry[2] > time.time():
                return entry[0]
        return None

    def _issue(self, key: tuple[str, str], with_refresh: bool, scope: str) -> dict:
        now = time.time()
        at, rt = self.current.get(key, (None, None))
        if not at or at not in self.access or self.access[at][2] <= now:
            at = secrets.token_urlsafe(64)
        self.access[at] = (key[1], key[0], now + self.token_lifetime)
        out = {"scope": scope, "token_type": "Bearer", "expires_in": max(self.token_lifetime - 1, 0)}
        if with_refresh:
            if not rt or rt not in self.refresh or self.refresh[rt][2] <= now:
                rt = secrets.token_urlsafe(64)
            self.refresh[rt] = (key[1], key[0], now + self.config.refresh_token_lifetime)
            out["refresh_token"] = rt
        self.current[key] = (at, rt)
        out["access_token"] = at
        return out

    def oauth_token(self, content_type: str, form: dict) -> Reply:
        """POST /oauth_token.do. Every failure is 401 server_error/access_denied, as ServiceNow answers."""
        with self.lock:
            self.count("token_requests")
            denied = Reply(401, {"error_description": "access_denied", "error": "server_error"})
            if not content_type.lower().startswith("application/x-www-form-urlencoded"):
                return denied  # JSON bodies and query-string parameters are not read
            cid, secret, grant = form.get("client_id", ""), form.get("client_secret", ""), form.get("grant_type")
            if self.faults.reject_credentials or not cid or self.config.clients.get(cid) != secret:
                return denied
            if grant == "password":
                user = form.get("username", "")
                if not user or self.config.users.get(user) != form.get("password"):
                    return denied
                return Reply(200, self._issue((cid, user), True, form.get("scope") or "useraccount"))
            if grant == "refresh_token":
                entry = self.refresh.get(form.get("refresh_token", ""))
                if not entry or entry[1] != cid or entry[2] <= time.time():
                    return denied
                rt = form["refresh_token"]
                at, _ = self.current.get((cid, entry[0]), (None, None))
                now = time.time()
                if not at or at not in self.access or self.access[at][2] <= now:
                    at = secrets.token_urlsafe(64)
                self.access[at] = (entry[0], cid, now + self.token_lifetime)
                self.current[(cid, entry[0])] = (at, rt)  # the refresh token is echoed, not rotated or extended
                return Reply(200, {"scope": "useraccount", "token_type": "Bearer",
                                   "expires_in": max(self.token_lifetime - 1, 0), "refresh_token": rt,
                                   "access_token": at})
            if grant == "client_credentials" and self.config.client_credentials_enabled:
                app_user = next(iter(self.config.users), SIM_USER)
                return Reply(200, self._issue((cid, app_user), False, form.get("scope") or ""))
            return denied

    # ----------------------------------------------------------- rate limit
    def rate_check(self, user: str, api: str) -> tuple[Reply | None, dict]:
        limit = self.faults.rate_limit_per_hour
        if not limit:
            return None, {}
        with self.lock:
            now = time.monotonic()
            window = self.windows[user]
            while window and window[0] <= now - 3600:
                window.popleft()
            wait = window[0] + 3600 - now if window else 3600.0  # the oldest counted request leaves the window
            headers = {"X-RateLimit-Limit": str(limit), "X-RateLimit-Reset": str(int(time.time() + wait)),
                       "X-RateLimit-Rule": RATE_LIMIT_RULE}
            if len(window) >= limit:
                self.count("rate_limited")
                return error(429, "Rate limit exceeded", f"Rate limit of {limit} requests per hour for {api} exceeded",
                             {**headers, "Retry-After": str(max(1, math.ceil(wait)))}), headers
            window.append(now)
            return None, headers

    def take_fault(self, path: str) -> dict | None:
        with self.lock:
            for item in self.faults.fail_next:
                if path.startswith(item["path_prefix"]) and item["count"] > 0:
                    if item.get("after", 0) > 0:   # let this many matching requests through first
                        item["after"] -= 1
                        continue
                    item["count"] -= 1
                    if item["count"] <= 0:
                        self.faults.fail_next.remove(item)
                    self.count("faults_injected")
                    return item
        return None

    # ------------------------------------------------------------ dispatch
    def dispatch(self, method: str, path: str, params: list[tuple[str, str]], body: bytes, headers: dict,
                 user: str, base: str) -> Reply:
        """Route one authenticated /api/now request (also used for Batch API items)."""
        from include.simulators import servicenow_ire as ire

        method = headers.get("x-http-method-override", method).upper()
        m = re.match(r"^/api/now(?:/(v1|v2))?/table/([^/]+)(?:/([^/]+))?/?$", path)
        if m:
            return self.table_api(method, m.group(1), m.group(2), m.group(3), params, body, headers, user, base)
        m = re.match(r"^/api/now(?:/v1)?/identifyreconcile(?:/(enhanced|query|queryEnhanced))?/?$", path)
        if m:
            if method != "POST":
                return error(405, "Method not Supported", f"HTTP method {method} is not supported by this resource")
            return ire.handle(self, m.group(1) or "", dict(params), body, headers, user)
        m = re.match(r"^/api/now(?:/v1)?/import/([^/]+)(?:/([^/]+))?/?$", path)
        if m:
            return self.import_api(method, m.group(1), m.group(2), body, headers, user, base)
        m = re.match(r"^/api/now(?:/v1)?/cmdb/instance/([^/]+)(?:/([^/]+))?/?$", path)
        if m:
            return ire.cmdb_instance(self, method, m.group(1), m.group(2), dict(params), body, headers, user, base)
        return no_resource()

    @staticmethod
    def parse_json(body: bytes, headers: dict) -> tuple[Any, Reply | None]:
        ctype = headers.get("content-type", "")
        if not ctype.lower().startswith("application/json"):
            return None, error(415, "Unsupported Media Type",
                               f"Content-Type '{ctype or 'none'}' is not supported; send application/json")
        try:
            return json.loads(body or b"null"), None
        except (ValueError, UnicodeDecodeError):
            return None, error(400, "Exception while reading request", "The payload is not valid JSON.")

    def write_denied(self, table: str, op: str) -> Reply | None:
        deny = self.faults.deny_writes
        if "*" in deny or table in deny:
            return error(403, "Operation Failed", f"ACL Exception {op} Failed due to security constraints")
        return None

    def _data_policy(self, table: str, rec: dict) -> Reply | None:
        if (self.config.enforce_data_policy and table == "incident" and rec.get("state") in ("6", "7")):
            missing = [label for f, label in (("close_code", "Resolution code"), ("close_notes", "Resolution notes"))
                       if not rec.get(f)]
            if missing:
                return error(403, "Operation Failed",
                             "Data Policy Exception: \n\tThe following fields are mandatory: " + ", ".join(missing))
        return None

    # ------------------------------------------------------------ Table API
    def table_api(self, method: str, version: str | None, table: str, sys_id: str | None,
                  params: list[tuple[str, str]], body: bytes, headers: dict, user: str, base: str) -> Reply:
        if table not in self.data:
            return error(400, f"Invalid table {table}")
        p = dict(params)
        dv = str(p.get("sysparm_display_value", "false")).lower()
        dv = dv if dv in ("true", "false", "all") else "false"
        excl = _bool(p, "sysparm_exclude_reference_link")
        fields = [f.strip() for f in p.get("sysparm_fields", "").split(",") if f.strip()] or None
        not_found = error(404, "No Record found", "Record doesn't exist or ACL restricts the record retrieval")
        with self.lock:
            if method in ("GET", "HEAD") and not sys_id:
                if table in self.faults.deny_reads:
                    return error(403, "Insufficient rights to query records",
                                 "Field(s) present in the query do not have permission to be read")
                return self._list(version, table, params, fields, dv, excl, base)
            if method == "POST" and not sys_id:
                values, err = self.parse_json(body, headers)
                if err:
                    return err
                values = values[0] if isinstance(values, list) and values else values
                if not isinstance(values, dict):
                    return error(400, "Exception while reading request", "The payload must be a JSON object.")
                denied = self.write_denied(table, "Insert")
                if denied:
                    return denied
                policy = self._data_policy(table, {k: to_str(v) for k, v in values.items()})
                if policy:
                    return policy
                rec = self.insert(table, values, user=user)
                return self._record_reply(201, table, rec, fields, dv, excl, base, headers,
                                          {"Location": f"{base}/api/now/table/{table}/{rec['sys_id']}"})
            if not sys_id:
                return error(405, "Method not Supported", f"HTTP method {method} is not supported for a table")
            rec = self.get(sys_id, table)
            if rec is None:
                return not_found
            if method in ("GET", "HEAD"):
                return self._record_reply(200, table, rec, fields, dv, excl, base, headers)
            if method in ("PUT", "PATCH"):
                values, err = self.parse_json(body, headers)
                if err:
                    return err
                values = values[0] if isinstance(values, list) and values else values
                if not isinstance(values, dict):
                    return error(400, "Exception while reading request", "The payload must be a JSON object.")
                denied = self.write_denied(self.where[sys_id], "Update")
                if denied:
                    return denied
                merged = {**rec, **{k: to_str(v) for k, v in values.items()}}
                policy = self._data_policy(self.where[sys_id], merged)
                if policy:
                    return policy
                rec = self.update(sys_id, values, user=user)
                return self._record_reply(200, table, rec, fields, dv, excl, base, headers)
            if method == "DELETE":
                denied = self.write_denied(self.where[sys_id], "Delete")
                if denied:
                    return denied
                self.delete(sys_id)
                return Reply(204, None, content_type="")
            return error(405, "Method not Supported", f"HTTP method {method} is not supported")

    def _record_reply(self, status, table, rec, fields, dv, excl, base, headers, extra=None) -> Reply:
        if headers.get("x-no-response-body", "").lower() == "true":
            return Reply(status, None, extra or {})
        return Reply(status, {"result": self.render(table, rec, fields, dv, excl, base)}, extra or {})

    def _list(self, version, table, params, fields, dv, excl, base) -> Reply:
        p = dict(params)
        query = p.get("sysparm_query")
        if not query:  # name=value pairs are the alternative to sysparm_query
            query = "^".join(f"{k}={v}" for k, v in params if not k.startswith("sysparm_"))
        try:
            limit = int(p.get("sysparm_limit", 10000))
            offset = max(int(p.get("sysparm_offset", 0)), 0)
        except ValueError:
            return error(400, "Invalid query parameter", "sysparm_limit and sysparm_offset must be integers")
        limit = limit if limit > 0 else 10000
        try:
            rows = self.select(table, query)
        except q.QueryError as exc:
            return error(400, "Invalid query", str(exc))
        total = len(rows)
        page = rows[offset:offset + limit]
        if version == "v1" and not page:
            return error(404, "No Record found", "Records matching query not found")
        headers = {"X-Total-Count": str(total)}
        if total > limit and not _bool(p, "sysparm_suppress_pagination_header"):
            headers["Link"] = self._links(base, table, version, params, limit, offset, total,
                                          "sysparm_offset" in p)
        result = [self.render(table, r, fields, dv, excl, base) for r in page]
        if self.faults.truncate_next > 0:
            self.faults.truncate_next -= 1
            self.count("truncated")
            return Reply(200, _truncated(result), headers)
        return Reply(200, {"result": result}, headers)

    @staticmethod
    def _links(base, table, version, params, limit, offset, total, offset_given) -> str:
        others = [(k, v) for k, v in params if k not in ("sysparm_limit", "sysparm_offset")]
        path = f"{base}/api/now/{version + '/' if version else ''}table/{table}"

        def url(off: int) -> str:
            return f"{path}?{urlencode(others + [('sysparm_limit', limit), ('sysparm_offset', off)])}"
        links = [(url(0), "first")]
        if offset > 0 or not offset_given:
            links.append((url(max(offset - limit, 0) if offset > 0 else -1), "prev"))
        if offset + limit < total:
            links.append((url(offset + limit), "next"))
        links.append((url((total - 1) // limit * limit), "last"))
        return ",".join(f'<{u}>;rel="{rel}"' for u, rel in links)

    # ------------------------------------------------------------ Batch API
    def batch(self, body: bytes, headers: dict, user: str, base: str) -> Reply:
        payload, err = self.parse_json(body, headers)
        if err:
            return err
        if not isinstance(payload, dict) or not isinstance(payload.get("rest_requests"), list):
            return error(400, "Exception while reading request", "The batch needs a 'rest_requests' array.")
        out = {"batch_request_id": to_str(payload.get("batch_request_id")), "serviced_requests": [],
               "unserviced_requests": []}
        delay = 0.0
        limit = self.config.batch_max_items
        for pos, item in enumerate(payload["rest_requests"]):
            item = item if isinstance(item, dict) else {}
            if limit is not None and pos >= limit:
                out["unserviced_requests"].append(to_str(item.get("id")))
                continue
            started = time.perf_counter()
            reply = self._batch_item(item, user, base)
            delay += reply.delay
            self.count("batch_items")
            self._counters["by_route"][f"batch {item.get('method', '?')} {_route_label(str(item.get('url', '')))}"] += 1
            hdrs = [] if item.get("exclude_response_headers") else [
                {"name": k, "value": v} for k, v in {"Content-Type": reply.content_type, **reply.headers}.items() if v]
            served = {"id": to_str(item.get("id")), "body": base64.b64encode(reply.content()).decode(),
                      "status_code": reply.status, "status_text": HTTPStatus(reply.status).phrase,
                      "headers": hdrs, "execution_time": int((time.perf_counter() - started) * 1000 + reply.delay * 1000)}
            if reply.status >= 400 and isinstance(reply.body, dict) and "error" in reply.body:
                served["error_message"] = reply.body["error"].get("message")
            out["serviced_requests"].append(served)
        return Reply(200, out, delay=delay)

    def _batch_item(self, item: dict, user: str, base: str) -> Reply:
        if not all(item.get(k) for k in ("id", "method", "url")):
            return error(400, "Exception while reading request", "Each rest_request needs id, method and url.")
        parts = urlsplit(str(item["url"]))
        if "/batch" in parts.path:
            return no_resource()
        hdrs = {str(h.get("name", "")).lower(): str(h.get("value", "")) for h in item.get("headers") or []
                if isinstance(h, dict)}
        hdrs.setdefault("content-type", "application/json")
        raw = b""
        if item.get("body"):
            try:
                raw = base64.b64decode(item["body"], validate=True)
            except (binascii.Error, ValueError):
                return error(400, "Exception while reading request", "The item body is not valid base64.")
        return self.dispatch(str(item["method"]).upper(), parts.path, parse_qsl(parts.query, keep_blank_values=True),
                             raw, hdrs, user, base)

    # ------------------------------------------------------- Import Set API
    def import_api(self, method, staging, extra, body, headers, user, base) -> Reply:
        spec = self.config.import_sets.get(staging)
        if spec is None:
            return error(400, f"Invalid table {staging}")
        if method != "POST" or (extra and extra != "insertMultiple"):
            return error(405, "Method not Supported", f"HTTP method {method} is not supported by this resource")
        payload, err = self.parse_json(body, headers)
        if err:
            return err
        rows = payload.get("records") if extra and isinstance(payload, dict) else [payload]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return error(400, "Exception while reading request", "Send a JSON object (or {'records': [...]}).")
        with self.lock:
            self._import_sets += 1
            iset = f"ISET{10000 + self._import_sets:07d}"
            results = [self._import_row(spec, staging, row, iset, user, base) for row in rows]
        if extra:
            return Reply(201, {"import_set_id": new_sys_id(), "multi_import_set_id": new_sys_id()})
        return Reply(201, {"import_set": iset, "staging_table": staging, "result": results})

    def _import_row(self, spec, staging, row, iset, user, base) -> dict:
        target, key = spec["target"], spec.get("coalesce")
        values = {k: to_str(v) for k, v in row.items()}  # the import set API stringifies everything
        res = {"transform_map": f"{staging} to {target}", "table": target}
        if self.faults.import_error_next > 0:
            self.faults.import_error_next -= 1
            return {**res, "status": "error", "error_message": "Target record not found",
                    "sys_id": self.insert("sys_import_set_row", {"sys_import_set": iset})["sys_id"]}
        existing = self.lookup(target, key, values[key]) if key and values.get(key) else []
        merged = {**(existing[0] if existing else {}), **values}
        problem = self.write_denied(target, "Update" if existing else "Insert") or self._data_policy(target, merged)
        if problem:
            return {**res, "status": "error", "error_message": problem.body["error"]["detail"],
                    "sys_id": self.insert("sys_import_set_row", {"sys_import_set": iset})["sys_id"]}
        rec = self.update(existing[0]["sys_id"], values, user=user) if existing else self.insert(target, values, user=user)
        display = "number" if rec.get("number") else "sys_id"
        return {**res, "display_name": display, "display_value": rec[display],
                "record_link": f"{base}/api/now/table/{target}/{rec['sys_id']}",
                "status": "updated" if existing else "inserted", "sys_id": rec["sys_id"]}


def _truncated(result: list[dict]) -> str:
    """A Table API body cut off by the transaction quota: part of the result, then the error, invalid JSON."""
    head = ",".join(json.dumps(r, separators=(",", ":")) for r in result[: len(result) // 2])
    tail = json.dumps({"message": CANCELLED, "detail": CANCELLED_DETAIL}, separators=(",", ":"))
    return '{"result":[' + head + ',],"error":' + tail + ',"status":"failure"}'


def _route_label(path: str) -> str:
    path = urlsplit(path).path
    path = re.sub(r"/[0-9a-f]{32}(?=/|$)", "/{sys_id}", path)
    return path
