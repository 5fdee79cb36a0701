"""Finding what this integration wrote to ServiceNow (reads only): :func:`find_records` reads the records
:func:`~defender_servicenow.cleanup.plan.build_plan` decides on; tables the instance lacks are noted."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from defender_servicenow import settings
from defender_servicenow.cleanup.params import (
    ALERT_ORDER,
    APPLICATION_TABLE,
    CLOSE_CODE_PREFERENCE,
    CORRELATION_DISPLAY,
    CORRELATION_PREFIX,
    DEFAULT_CLOSE_CODE,
    DEPENDENT_FIELDS,
    DEPENDENTS,
    DEVICE_ORDER,
    IN_CHUNK,
    INCIDENT_TABLES,
    VIT_PREFIX,
    VIT_TABLE,
    CleanupParams,
)
from defender_servicenow.exceptions import ConfigError, ServiceNowForbiddenError, ServiceNowInvalidTableError
from defender_servicenow.hooks.servicenow_wire import sys_id_of as _ref

log = logging.getLogger(__name__)


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


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _read(hook, table: str, query: str, fields: list[str]) -> list[dict]:
    return list(hook.iter_records(table, query=query, fields=fields))


def _read_in(hook, table: str, ref_field: str, ids: Iterable[str], fields: list[str], extra: str = "") -> list[dict]:
    rows: list[dict] = []
    for chunk in chunks(sorted(set(ids)), IN_CHUNK):
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
