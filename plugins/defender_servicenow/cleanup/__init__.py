"""Clean-up engine: find what this integration wrote to ServiceNow, then retire or delete it.

Three steps, each usable without Airflow:

* :func:`validate_params` / :func:`check_confirmation` (:mod:`.params`) — plain-message checks, before any
  request that writes;
* :func:`find_records` (:mod:`.find`, reads only) + :func:`build_plan` (:mod:`.plan`, pure) — what would
  change, table by table;
* :func:`apply_plan` (this module, with the reporting and :func:`run_cleanup`) — the writes, through the
  Batch API, in an order that keeps every remaining record findable by the next run (children before
  parents, the ``sys_object_source`` marker row last), so a run that failed half-way is simply run again:
  what is already retired, closed or deleted is skipped.

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
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from defender_servicenow.cleanup.find import (  # noqa: F401  (re-exported for callers)
    Found,
    application_tables,
    find_records,
    pick_close_code,
)
from defender_servicenow.cleanup.find import chunks as _chunks
from defender_servicenow.cleanup.params import (  # noqa: F401  (re-exported for callers)
    ALERT_ORDER,
    APPLICATION_TABLE,
    BATCH_SIZE,
    CLOSE_CODE_PREFERENCE,
    CLOSE_NOTES,
    CORRELATION_DISPLAY,
    CORRELATION_PREFIX,
    DEFAULT_CLOSE_CODE,
    DEPENDENT_FIELDS,
    DEPENDENTS,
    DEVICE_ORDER,
    IN_CHUNK,
    INCIDENT_CLOSE,
    INCIDENT_DONE_STATES,
    INCIDENT_TABLES,
    MODES,
    RETIRED,
    SAMPLE_SIZE,
    SCOPES,
    SIR_CLOSE,
    SIR_DONE_STATES,
    VIT_CLOSE,
    VIT_PREFIX,
    VIT_TABLE,
    CleanupIncompleteError,
    CleanupParams,
    CleanupRefusedError,
    check_confirmation,
    validate_params,
)
from defender_servicenow.cleanup.plan import Action, Plan, TablePlan, build_plan, parse_sn_time  # noqa: F401
from defender_servicenow.exceptions import ServiceNowError

log = logging.getLogger(__name__)


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
                application_tables: Iterable[str] = (APPLICATION_TABLE,), now: datetime | None = None,  # noqa: F811
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
