"""Clean-up engine: find what this integration wrote to ServiceNow, then retire or delete it.

Three steps, each usable without Airflow:

* :func:`validate_params` / :func:`check_confirmation` — plain-message checks, before any request that writes;
* :func:`find_records` (reads only) + :func:`build_plan` (pure) — what would change, table by table;
* :func:`apply_plan` — the writes, through the Batch API, in an order that keeps every remaining record
  findable by the next run (children before parents, the ``sys_object_source`` marker row last), so a run
  that failed half-way is simply run again: what is already retired, closed or deleted is skipped.

What is "ours" (docs/design.md, "Conventions shared by the DAGs and the clean-up"):

* CIs: ``sys_object_source`` rows with ``name = settings.source_name()`` and ``id = "<conn id>:<device id>"``;
  a CI that another discovery source also reports is left alone (only our marker row goes, in delete mode);
  network adapters / IP addresses / serial numbers hanging off our CIs go with them in delete mode;
* incidents (``incident``, ``sn_si_incident``): ``correlation_id`` STARTSWITH ``defender-iot:`` and
  ``correlation_display = "Microsoft Defender for IoT"``;
* application-table rows: ``u_alert_key = "<conn id>:<alert id>"``. Retire mode leaves them (they are the
  alert history, not open work); delete mode deletes them.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from defender_servicenow import settings
from defender_servicenow.exceptions import (
    ConfigError,
    ServiceNowError,
    ServiceNowForbiddenError,
    ServiceNowInvalidTableError,
)
from defender_servicenow.hooks.servicenow_wire import sys_id_of as _ref

log = logging.getLogger(__name__)

SCOPES = ("devices", "alerts", "both")
MODES = ("retire", "delete")
CORRELATION_PREFIX = "defender-iot:"
CORRELATION_DISPLAY = "Microsoft Defender for IoT"
APPLICATION_TABLE = "u_defender_iot_alert"
INCIDENT_TABLES = ("incident", "sn_si_incident")

RETIRED = {"install_status": "7", "operational_status": "6"}
INCIDENT_DONE_STATES = {"6", "7", "8"}  # Resolved, Closed, Canceled: nothing left to close
SIR_DONE_STATES = {"3", "7"}  # Closed, Cancelled
CLOSE_NOTES = ("Closed by the defender_servicenow_cleanup DAG: the Microsoft Defender for IoT integration "
               "was removed, so this record will receive no further updates from it.")
# close_code is a choice list that differs per release and instance (servicenow-api.md §6.1): the first of
# these the instance offers (sys_choice), else the legacy value most integrations send.
CLOSE_CODE_PREFERENCE = ("No resolution provided", "Closed/Resolved by Caller", "Resolved by caller",
                         "Solved (Permanently)")
DEFAULT_CLOSE_CODE = "Closed/Resolved by Caller"
INCIDENT_CLOSE = {"state": "7", "close_code": DEFAULT_CLOSE_CODE, "close_notes": CLOSE_NOTES}
SIR_CLOSE = {"state": "3", "close_notes": CLOSE_NOTES}

# Records this integration's writes hang off: table -> ((reference field, parent), ...), where parent is
# "ci" (our CIs), "task" (our incidents) or an earlier table of this list. Searched in this order.
DEPENDENTS = (
    ("cmdb_ci_network_adapter", (("cmdb_ci", "ci"),)),  # IRE lookup items
    ("cmdb_ci_ip_address", (("nic", "cmdb_ci_network_adapter"), ("cmdb_ci", "ci"))),  # IRE related items
    ("cmdb_serial_number", (("cmdb_ci", "ci"),)),
    ("cmdb_ot_entity", (("ot_device", "ci"),)),
    ("cmdb_key_value", (("configuration_item", "ci"),)),
    ("task_ci", (("task", "task"),)),  # affected CIs of our incidents
    ("cmdb_rel_ci", (("parent", "ci"), ("child", "ci"))),  # relations of our CIs (cmdb_depth): sensor, connections
)
# Delete order: children first, then parents, our sys_object_source marker rows last, so whatever a failed
# run leaves behind is still found by the next one.
ALERT_ORDER = ("task_ci", "incident", "sn_si_incident")  # then the application table(s)
VIT_TABLE = "sn_vul_vulnerable_item"   # Vulnerability Response items of our CVEs (cmdb_depth.cves), when present
VIT_PREFIX = "defender-iot-cve:"
VIT_CLOSE = {"state": "3", "close_notes": CLOSE_NOTES}
DEVICE_ORDER = (VIT_TABLE, "cmdb_rel_ci", "cmdb_ci_ip_address", "cmdb_ci_network_adapter", "cmdb_serial_number",
                "cmdb_ot_entity", "cmdb_key_value", "cmdb_ci", "sys_object_source")
DEPENDENT_FIELDS = {"cmdb_ci_network_adapter": "name", "cmdb_ci_ip_address": "ip_address",
                    "cmdb_serial_number": "serial_number", "cmdb_ot_entity": "ot_correlation_id",
                    "cmdb_key_value": "key", "task_ci": "ci_item", "cmdb_rel_ci": "type"}

IN_CHUNK = 50  # sys_ids per ...IN query (keeps URLs well under 2048 characters)
BATCH_SIZE = 100  # requests per Batch API call (30 s quota per batch)
SAMPLE_SIZE = 20  # record names listed per table in the log
_CONN_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


class CleanupRefusedError(ConfigError):
    """A run that would write was refused (missing or wrong confirmation)."""


class CleanupIncompleteError(ServiceNowError):
    """Some writes failed; the run stopped before the steps that depend on them. Run it again."""


# --------------------------------------------------------------------------- params


@dataclass(frozen=True)
class CleanupParams:
    scope: Literal["devices", "alerts", "both"] = "both"
    mode: Literal["retire", "delete"] = "retire"
    sources: tuple[str, ...] = ()
    older_than_days: int | None = None
    dry_run: bool = True
    confirm: str = ""

    @property
    def devices(self) -> bool:
        return self.scope in ("devices", "both")

    @property
    def alerts(self) -> bool:
        return self.scope in ("alerts", "both")


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"param {name}={value!r}: give true or false")


def validate_params(raw: Mapping[str, Any]) -> CleanupParams:
    """Check the trigger params; each problem is a :class:`ConfigError` naming the param and the rule."""
    known = {"scope", "mode", "sources", "older_than_days", "dry_run", "confirm"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown param(s) {', '.join(unknown)}; the clean-up takes {', '.join(sorted(known))}")
    scope = raw.get("scope") or "both"
    if scope not in SCOPES:
        raise ConfigError(f"param scope={scope!r}: choose one of {', '.join(SCOPES)}")
    mode = raw.get("mode") or "retire"
    if mode not in MODES:
        raise ConfigError(f"param mode={mode!r}: choose retire (CIs retired, incidents closed) or delete")
    sources = raw.get("sources") or []
    if isinstance(sources, str):
        sources = [part.strip() for part in sources.split(",") if part.strip()]
    if not isinstance(sources, (list, tuple)) or not all(isinstance(s, str) and _CONN_ID.match(s) for s in sources):
        raise ConfigError(f"param sources={sources!r}: give a list of Defender connection ids (letters, digits, "
                          "_ . - only), or an empty list for everything this integration wrote")
    days = raw.get("older_than_days")
    if days in ("", None):
        days = None
    else:
        try:
            days = int(days) if not isinstance(days, bool) and float(days) == int(float(days)) else None
        except (TypeError, ValueError):
            days = None
        if days is None or days < 1:
            raise ConfigError(f"param older_than_days={raw.get('older_than_days')!r}: give a whole number of "
                              "days of at least 1, or leave it empty for all records")
    dry_run = _as_bool("dry_run", raw.get("dry_run", True))
    confirm = raw.get("confirm") or ""
    if not isinstance(confirm, str):
        raise ConfigError("param confirm: give the ServiceNow instance host name as text")
    return CleanupParams(scope, mode, tuple(dict.fromkeys(sources)), days, dry_run, confirm.strip())


def check_confirmation(params: CleanupParams, instance_host: str) -> None:
    """Refuse a run that writes unless ``confirm`` is the instance host name (case-insensitive)."""
    if params.dry_run:
        return
    if params.confirm.lower() == instance_host.lower():
        return
    got = f"you typed {params.confirm!r}" if params.confirm else "it is empty"
    raise CleanupRefusedError(
        f"Refusing to {params.mode} anything: this is not a dry run, so the param confirm must be the "
        f"ServiceNow instance host name {instance_host!r}, and {got}. Nothing was changed. Type the host name "
        "exactly to go ahead, or set dry_run to true to only list what would change."
    )


# --------------------------------------------------------------------------- finding (reads only)


@dataclass
class Found:
    """Raw records read from ServiceNow, per table (what :func:`build_plan` decides on)."""

    source_rows: list[dict] = field(default_factory=list)  # our sys_object_source rows
    cis: dict[str, dict] = field(default_factory=dict)  # target sys_id -> CI (missing: CI already gone)
    shared: set[str] = field(default_factory=set)  # CI sys_ids that another source also reports
    dependents: dict[str, list[dict]] = field(default_factory=dict)  # table -> rows hanging off our CIs
    tasks: dict[str, list[dict]] = field(default_factory=dict)  # incident / sn_si_incident -> rows
    app_rows: dict[str, list[dict]] = field(default_factory=dict)  # application table -> rows
    missing_tables: list[str] = field(default_factory=list)  # tables the instance does not have
    close_code: str = DEFAULT_CLOSE_CODE  # for incidents closed in retire mode


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _read(hook, table: str, query: str, fields: list[str]) -> list[dict]:
    return list(hook.iter_records(table, query=query, fields=fields))


def _read_in(hook, table: str, ref_field: str, ids: Iterable[str], fields: list[str], extra: str = "") -> list[dict]:
    rows: list[dict] = []
    for chunk in _chunks(sorted(set(ids)), IN_CHUNK):
        rows += _read(hook, table, f"{ref_field}IN{','.join(chunk)}{extra}", fields)
    return rows


def _prefixes(params: CleanupParams) -> list[str]:
    """Key prefixes to look for: one per requested source, or the empty prefix (everything)."""
    return [f"{source}:" for source in params.sources] or [""]


def _ci_prefixes(params: CleanupParams) -> list[str]:
    """CI key prefixes: per requested source its devices' and its sensors' (``sensor:<source>:``,
    cmdb_depth.sensors), or the empty prefix (everything)."""
    return [p for source in params.sources for p in (f"{source}:", f"sensor:{source}:")] or [""]


def find_records(hook, params: CleanupParams, source_name: str | None = None,
                 application_tables: Iterable[str] = (APPLICATION_TABLE,)) -> Found:
    """Read everything the plan needs. Only reads; tables the instance lacks are noted, not fatal."""
    source_name = source_name or settings.source_name()
    application_tables = list(dict.fromkeys(application_tables))
    found = Found()
    if params.devices:
        for prefix in _ci_prefixes(params):
            query = f"name={source_name}" + (f"^idSTARTSWITH{prefix}" if prefix else "")
            found.source_rows += _read(hook, "sys_object_source", query,
                                       ["sys_id", "name", "id", "target_sys_id", "target_table", "sys_updated_on"])
        # Belt and braces: never act on a row that is not ours, whatever the server's query parser did.
        found.source_rows = [r for r in found.source_rows if r.get("name") == source_name
                             and any(str(r.get("id", "")).startswith(p) for p in _ci_prefixes(params))]
        targets = {_ref(r.get("target_sys_id")) for r in found.source_rows} - {""}
        ci_fields = ["sys_id", "name", "sys_class_name", "install_status", "operational_status", "sys_updated_on"]
        found.cis = {ci["sys_id"]: ci for ci in _read_in(hook, "cmdb_ci", "sys_id", targets, ci_fields)
                     if ci.get("sys_id") in targets}
        # Shared: any other marker on the CI -- another discovery source, or another of our own sources that
        # this run does not clean (two sensors seeing one device; ``sources`` naming only one of them).
        selected = {(r.get("name"), r.get("id")) for r in found.source_rows}
        markers = _read_in(hook, "sys_object_source", "target_sys_id", found.cis, ["target_sys_id", "name", "id"])
        found.shared = {_ref(r.get("target_sys_id")) for r in markers
                        if (r.get("name"), r.get("id")) not in selected and _ref(r.get("target_sys_id")) in found.cis}
        try:   # optional: only instances with Vulnerability Response have the table
            rows = []
            for prefix in _prefixes(params):
                rows += _read(hook, VIT_TABLE, f"correlation_idSTARTSWITH{VIT_PREFIX}{prefix}"
                                               f"^correlation_display={CORRELATION_DISPLAY}",
                              ["sys_id", "number", "state", "correlation_id", "correlation_display", "sys_updated_on"])
            found.tasks[VIT_TABLE] = [r for r in rows if r.get("correlation_display") == CORRELATION_DISPLAY
                                      and str(r.get("correlation_id", "")).startswith(VIT_PREFIX)]
        except ServiceNowInvalidTableError:
            log.debug("No table %s on this instance: no CVE items of ours", VIT_TABLE)
    if params.alerts:
        if params.mode == "retire":
            found.close_code = pick_close_code(hook)
        for table in INCIDENT_TABLES:
            rows: list[dict] = []
            try:
                for prefix in _prefixes(params):
                    rows += _read(hook, table,
                                  f"correlation_idSTARTSWITH{CORRELATION_PREFIX}{prefix}"
                                  f"^correlation_display={CORRELATION_DISPLAY}",
                                  ["sys_id", "number", "state", "correlation_id", "correlation_display",
                                   "sys_updated_on", "short_description"])
            except ServiceNowInvalidTableError:
                found.missing_tables.append(table)
            found.tasks[table] = [r for r in rows if r.get("correlation_display") == CORRELATION_DISPLAY
                                  and any(str(r.get("correlation_id", "")).startswith(CORRELATION_PREFIX + p)
                                          for p in _prefixes(params))]
        for table in application_tables:
            rows = []
            try:
                for prefix in _prefixes(params):
                    query = f"u_alert_keySTARTSWITH{prefix}" if prefix else "u_alert_keyISNOTEMPTY"
                    rows += _read(hook, table, query, ["sys_id", "u_alert_key", "sys_updated_on"])
            except ServiceNowInvalidTableError:
                found.missing_tables.append(table)
            found.app_rows[table] = [r for r in rows if r.get("u_alert_key")
                                     and any(str(r["u_alert_key"]).startswith(p) for p in _prefixes(params))]
    if params.mode == "delete":  # retire mode leaves the parts of a CI and the links of an incident alone
        parents = {"ci": set(found.cis) - found.shared,
                   "task": {r["sys_id"] for rows in found.tasks.values() for r in rows}}
        for table, refs in DEPENDENTS:
            matched: dict[str, dict] = {}
            try:
                for ref_field, parent in refs:
                    fields = ["sys_id", "sys_updated_on", DEPENDENT_FIELDS[table], *(f for f, _ in refs)]
                    for row in _read_in(hook, table, ref_field, parents.get(parent, ()), fields):
                        if _ref(row.get(ref_field)) in parents.get(parent, ()):  # the field may not exist
                            matched[row["sys_id"]] = row
            except ServiceNowInvalidTableError:  # e.g. cmdb_ot_entity without the OT class models app
                log.debug("No table %s on this instance: nothing of ours can be in it", table)
            found.dependents[table] = list(matched.values())
            parents[table] = set(matched)
    return found


def pick_close_code(hook) -> str:
    """The incident close code to use: the first of :data:`CLOSE_CODE_PREFERENCE` the instance offers."""
    try:
        rows = _read(hook, "sys_choice", "name=incident^element=close_code^inactive!=true", ["value", "inactive"])
    except (ServiceNowInvalidTableError, ServiceNowForbiddenError):
        rows = []
    offered = {r.get("value") for r in rows if r.get("inactive") != "true"}
    return next((c for c in CLOSE_CODE_PREFERENCE if c in offered), DEFAULT_CLOSE_CODE)


def application_tables(conn_id: str, rules_path: str | None = None) -> list[str]:
    """The default application table plus any other one the forwarding rules send to on ``conn_id``
    (disabled rules included: they may have written before). A broken rules file only logs a warning."""
    tables = [APPLICATION_TABLE]
    try:
        from defender_servicenow.rules import load_rules

        rules = load_rules(rules_path or settings.rules_file(), default_connection_id=conn_id)
    except (ConfigError, ImportError) as exc:
        log.warning("Could not read the forwarding rules (%s); cleaning the application table %s only",
                    exc, APPLICATION_TABLE)
        return tables
    for rule in rules.rules:
        for dest in rules.destinations_of(rule):
            if (dest.connection_id == conn_id and dest.table and dest.table not in (*ALERT_ORDER, *DEVICE_ORDER)
                    and dest.report_type != "incidents"):
                tables.append(dest.table)
    return list(dict.fromkeys(tables))


# --------------------------------------------------------------------------- planning (pure)


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


# --------------------------------------------------------------------------- applying


@dataclass
class Report:
    plan: Plan
    done: Counter = field(default_factory=Counter)  # table -> changed now
    gone: Counter = field(default_factory=Counter)  # table -> already deleted when we got there (404)
    failed: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # first few item errors, for the log
    stopped_at: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped_at is None


def _batch_requests(actions: list[Action]):
    from defender_servicenow.hooks.servicenow_wire import BatchRequest

    return [BatchRequest(id=str(i), method=a.method, url=f"/api/now/table/{a.url_table}/{a.sys_id}", body=a.body)
            for i, a in enumerate(actions)]


def apply_plan(hook, plan: Plan, *, batch_size: int | None = None) -> Report:
    """Send the plan's writes through the Batch API, table by table in plan order.

    A 404 counts as "already gone" (a rerun, or someone deleted it meanwhile). If any write of a table
    fails, the run stops before the next table, so nothing is left unfindable for the rerun.
    """
    report = Report(plan)
    if plan.params.dry_run:
        return report
    batch_size = batch_size or getattr(hook, "batch_size", None) or BATCH_SIZE  # one HTTP call per chunk
    for table_plan in plan.tables:
        for chunk in _chunks(table_plan.actions, batch_size):
            try:
                responses = {r.id: r for r in hook.batch(_batch_requests(chunk))}
            except ServiceNowError as err:
                report.stopped_at = table_plan.table
                report.failed[table_plan.table] += len(chunk)
                report.errors.append(f"{table_plan.table}: batch of {len(chunk)} failed: {err}")
                return report
            for i, action in enumerate(chunk):
                response = responses.get(str(i))
                if response is not None and response.ok:
                    report.done[action.table] += 1
                elif response is not None and response.status_code == 404:
                    report.gone[action.table] += 1
                else:
                    report.failed[action.table] += 1
                    if len(report.errors) < 10:
                        reason = "no answer" if response is None else (
                            f"HTTP {response.status_code} {response.error_message or ''}".strip())
                        report.errors.append(f"{action.table} {action.label} ({action.sys_id}): {reason}")
        if report.failed[table_plan.table]:
            report.stopped_at = table_plan.table
            return report
    return report


# --------------------------------------------------------------------------- reporting


def describe_plan(plan: Plan, sample_size: int = SAMPLE_SIZE) -> list[str]:
    """Log lines listing, per table, the first records that would change."""
    lines = []
    for t in plan.tables:
        if t.kept:
            lines.append(f"{t.table}: keep {t.kept} ({t.kept_reason})")
        if not t.actions:
            continue
        names = ", ".join(a.label for a in t.actions[:sample_size])
        more = f" ... and {len(t.actions) - sample_size} more" if len(t.actions) > sample_size else ""
        lines.append(f"{t.table}: {t.verb} {len(t.actions)}: {names}{more}")
    return lines


def report_rows(report: Report) -> list[dict]:
    """One row per table: what was planned and what happened (also the task's XCom summary)."""
    rows = []
    for t in report.plan.tables:
        rows.append({
            "table": t.table, "action": t.verb, "planned": len(t.actions),
            "done": report.done[t.table], "already_done": t.already + report.gone[t.table],
            "kept": t.kept, "failed": report.failed[t.table],
        })
    return rows


def format_table(rows: list[dict]) -> str:
    headers = ["table", "action", "planned", "done", "already_done", "kept", "failed"]
    widths = {h: max(len(h), *(len(str(r[h])) for r in rows)) if rows else len(h) for h in headers}
    line = "  ".join(h.ljust(widths[h]) for h in headers)
    body = ["  ".join(str(r[h]).ljust(widths[h]) for h in headers) for r in rows]
    return "\n".join([line, "  ".join("-" * widths[h] for h in headers), *body])


def summary_line(report: Report) -> str:
    p = report.plan.params
    head = (f"Clean-up {'DRY RUN ' if p.dry_run else ''}mode={p.mode} scope={p.scope} "
            f"sources={','.join(p.sources) or 'all'} older_than_days={p.older_than_days or '-'}:")
    rows = report_rows(report)
    key = "planned" if p.dry_run else "done"
    past = {"retire": "retired", "close": "closed", "delete": "deleted"}
    changes = ", ".join((f"would {r['action']}" if p.dry_run else past.get(r["action"], r["action"]))
                        + f" {r[key]} {r['table']}" for r in rows if r[key]) or "nothing to change"
    already = sum(r["already_done"] for r in rows)
    kept = sum(r["kept"] for r in rows)
    failed = sum(r["failed"] for r in rows)
    tail = f"; already done {already}; kept {kept}; failed {failed}"
    if report.plan.missing_tables:
        tail += f"; not on this instance: {', '.join(report.plan.missing_tables)}"
    return f"{head} {changes}{tail}"


# --------------------------------------------------------------------------- all together


def run_cleanup(hook, raw_params: Mapping[str, Any], *, source_name: str | None = None,
                application_tables: Iterable[str] = (APPLICATION_TABLE,), now: datetime | None = None,
                logger: logging.Logger | None = None) -> dict:
    """Validate, confirm, find, plan, apply, report. Returns a secret-free summary (the task's XCom).

    Raises :class:`ConfigError` for bad params, :class:`CleanupRefusedError` before any write when the
    confirmation is missing or wrong, and :class:`CleanupIncompleteError` when some writes failed.
    """
    logger = logger or log
    params = validate_params(raw_params)
    check_confirmation(params, hook.instance_host)
    found = find_records(hook, params, source_name, application_tables)
    plan = build_plan(found, params, now)
    header = "Would change (dry run, nothing written):" if params.dry_run else "Changing:"
    logger.info("%s %d record(s)", header, plan.total_changes)
    for line in describe_plan(plan):
        logger.info("  %s", line)
    report = apply_plan(hook, plan)
    rows = report_rows(report)
    logger.info("Per table:\n%s", format_table(rows))
    summary = summary_line(report)
    logger.info("%s", summary)
    result = {"dry_run": params.dry_run, "mode": params.mode, "scope": params.scope, "tables": rows,
              "summary": summary}
    if not report.ok:
        for error in report.errors:
            logger.error("  %s", error)
        raise CleanupIncompleteError(
            f"Clean-up stopped at table {report.stopped_at}: {sum(report.failed.values())} write(s) failed "
            f"(first: {report.errors[0] if report.errors else 'unknown'}). What was done stays done; fix the "
            "cause and run the clean-up again with the same params: finished records are skipped."
        )
    return result
