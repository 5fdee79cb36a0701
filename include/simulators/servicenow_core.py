"""The in-memory ServiceNow instance behind the simulator: tables with indexes, the class hierarchy,
records with business rules, encoded queries and counters. Its APIs (:mod:`.servicenow_api`), access
control (:mod:`.servicenow_access`) and shared values (:mod:`.servicenow_base`) live beside it; the
FastAPI layer in ``servicenow_sim`` and the Batch API both call the API methods, which return a
:class:`Reply`."""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from typing import Any

from include.simulators import servicenow_query as q
from include.simulators.servicenow_access import AccessMixin
from include.simulators.servicenow_api import ApiMixin, _route_label  # noqa: F401  (re-exported)
from include.simulators.servicenow_base import (  # noqa: F401  (re-exported contract names)
    INDEXED,
    JSON_TYPE,
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    SIM_PASSWORD,
    SIM_USER,
    SYS_ID,
    Faults,
    Reply,
    SimConfig,
    error,
    new_sys_id,
    no_resource,
    now_str,
    to_str,
)
from include.simulators.servicenow_schema import (
    DICTIONARY_LENGTHS,
    DISCOVERY_SOURCES,
    JOURNAL_FIELDS,
    NUMBER_PREFIX,
    OWN_COLUMNS,
    PARENTS,
    PRIORITY,
    REFERENCES,
    REL_TYPES,
    STANDARD_TABLES,
    SYS_COLUMNS,
)


class Simulator(AccessMixin, ApiMixin):
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
