"""Planning the clean-up (pure): :func:`build_plan` decides, per table, what to retire, close, delete,
keep or skip, from what :func:`~defender_servicenow.cleanup.find.find_records` read."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

from defender_servicenow.cleanup.find import Found
from defender_servicenow.cleanup.params import (
    ALERT_ORDER,
    DEPENDENT_FIELDS,
    DEPENDENTS,
    DEVICE_ORDER,
    INCIDENT_CLOSE,
    INCIDENT_DONE_STATES,
    INCIDENT_TABLES,
    RETIRED,
    SIR_CLOSE,
    SIR_DONE_STATES,
    VIT_CLOSE,
    VIT_TABLE,
    CleanupParams,
)
from defender_servicenow.hooks.servicenow_wire import sys_id_of as _ref


@dataclass(frozen=True)
class Action:
    table: str  # report group: cmdb_ci for every CI class
    url_table: str  # the table in the request URL (the CI's own class)
    sys_id: str
    label: str  # what people recognise: CI name, incident number, alert key
    method: Literal["PATCH", "DELETE"]
    body: dict | None = None


@dataclass
class TablePlan:
    table: str
    verb: str  # retire / close / delete / keep
    actions: list[Action] = field(default_factory=list)
    already: int = 0  # already retired / closed: skipped
    kept: int = 0  # left in place on purpose (shared CIs, application rows in retire mode, ...)
    kept_reason: str = ""


@dataclass
class Plan:
    params: CleanupParams
    tables: list[TablePlan]
    missing_tables: list[str] = field(default_factory=list)

    @property
    def total_changes(self) -> int:
        return sum(len(t.actions) for t in self.tables)


def parse_sn_time(value: str | None) -> datetime | None:
    """ServiceNow ``YYYY-MM-DD HH:MM:SS`` (UTC) -> aware datetime; None when empty or unreadable."""
    try:
        return datetime.strptime(value or "", "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _old_enough(record: dict, cutoff: datetime | None) -> bool:
    if cutoff is None:
        return True
    updated = parse_sn_time(record.get("sys_updated_on"))
    return updated is not None and updated < cutoff


def build_plan(found: Found, params: CleanupParams, now: datetime | None = None) -> Plan:
    """Decide, per table, what to change and what to skip. Pure: no I/O."""
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(days=params.older_than_days) if params.older_than_days else None
    delete = params.mode == "delete"
    order = (*ALERT_ORDER, *found.app_rows, *DEVICE_ORDER)
    plans = {t: TablePlan(t, "delete" if delete else "keep") for t in order}

    def act(table: str, record: dict, label: str, url_table: str | None = None, body: dict | None = None) -> None:
        plans[table].actions.append(Action(table, url_table or table, record["sys_id"], label or record["sys_id"],
                                           "PATCH" if body else "DELETE", body))

    if params.devices:
        plans["cmdb_ci"].verb = "delete" if delete else "retire"
        in_scope: set[str] = set()
        for row in found.source_rows:
            target = _ref(row.get("target_sys_id"))
            ci = found.cis.get(target)
            if ci is None:  # CI already gone (earlier partial run, or deleted by hand): only our marker is left
                if delete and _old_enough(row, cutoff):
                    act("sys_object_source", row, row.get("id", ""))
                continue
            if not _old_enough(ci, cutoff):
                continue
            if target in found.shared:
                plans["cmdb_ci"].kept += 1
                plans["cmdb_ci"].kept_reason = "also reported by another discovery source"
                if delete:
                    act("sys_object_source", row, row.get("id", ""))
                continue
            if target in in_scope:  # two of our rows on one CI: act on the CI once
                if delete:
                    act("sys_object_source", row, row.get("id", ""))
                continue
            in_scope.add(target)
            url_table = ci.get("sys_class_name") or row.get("target_table") or "cmdb_ci"
            label = ci.get("name") or row.get("id", "")
            if delete:
                act("cmdb_ci", ci, label, url_table)
                act("sys_object_source", row, row.get("id", ""))
            elif all(str(ci.get(k, "")) == v for k, v in RETIRED.items()):
                plans["cmdb_ci"].already += 1
            else:
                act("cmdb_ci", ci, label, url_table, dict(RETIRED))
    if params.devices and found.tasks.get(VIT_TABLE):
        plans[VIT_TABLE].verb = "delete" if delete else "close"
        for row in found.tasks[VIT_TABLE]:
            if not _old_enough(row, cutoff):
                continue
            if delete:
                act(VIT_TABLE, row, row.get("number", ""))
            elif str(row.get("state", "")) == VIT_CLOSE["state"]:
                plans[VIT_TABLE].already += 1
            else:
                act(VIT_TABLE, row, row.get("number", ""), body=dict(VIT_CLOSE))
    if params.alerts:
        for table, done_states, close in (("incident", INCIDENT_DONE_STATES, INCIDENT_CLOSE),
                                          ("sn_si_incident", SIR_DONE_STATES, SIR_CLOSE)):
            plans[table].verb = "delete" if delete else "close"
            for row in found.tasks.get(table, []):
                if not _old_enough(row, cutoff):
                    continue
                if delete:
                    act(table, row, row.get("number", ""))
                elif str(row.get("state", "")) in done_states:
                    plans[table].already += 1
                else:
                    body = dict(close, close_code=found.close_code) if "close_code" in close else dict(close)
                    act(table, row, row.get("number", ""), body=body)
        for table, rows in found.app_rows.items():
            for row in rows:
                if not _old_enough(row, cutoff):
                    continue
                if delete:
                    act(table, row, row.get("u_alert_key", ""))
                else:
                    plans[table].kept += 1
                    plans[table].kept_reason = "retire mode keeps the alert history rows"
    if delete:
        tasks = {a.sys_id for t in INCIDENT_TABLES for a in plans[t].actions}
        parents = {"ci": {a.sys_id for a in plans["cmdb_ci"].actions}, "task": tasks}
        for table, refs in DEPENDENTS:
            rows = [r for r in found.dependents.get(table, [])
                    if any(_ref(r.get(f)) in parents.get(parent, ()) for f, parent in refs)]
            parents[table] = {r["sys_id"] for r in rows}
            for row in rows:
                act(table, row, str(row.get(DEPENDENT_FIELDS[table]) or ""))
    shown = {*(("cmdb_ci", "sys_object_source") if params.devices else ()),
             *((*INCIDENT_TABLES, *found.app_rows) if params.alerts else ())} - set(found.missing_tables)
    if not delete:
        shown.discard("sys_object_source")
    tables = [p for p in plans.values() if p.actions or p.already or p.kept or p.table in shown]
    return Plan(params, tables, list(found.missing_tables))
