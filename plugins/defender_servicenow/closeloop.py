"""Closed loop (opt-in, ``DEFENDER_HANDLE_ALERTS_ON_CLOSE``): when an incident this integration created is
resolved or closed in ServiceNow, handle its alert on the source: on a Defender for IoT management console
(``handle`` / ``handleAndLearn``), or in Azure (status ``Closed`` through the ARM PATCH). The engine asks the
source (``supports_alert_state``, ``get_alerts(state="unhandled")``, ``set_alert_state``), never its kind.

Per source that supports alert state and incident destination of the rules, one query finds the incidents closed
since the last scan (``correlation_id`` prefix ``defender-iot:<conn id>:``, closed states, ``sys_updated_on``
watermark; the first scan looks back ``DEFENDER_ALERT_RECONCILE_HOURS``), one request lists the source's
unhandled alerts raised from the earliest closed incident's alert time (id -> UUID), and one ``PUT
/external/v1/alerts/<UUID>`` (or one Azure PATCH) per alert handles it (``handle`` or ``handleAndLearn`` on a
console, ``Closed`` in Azure). Alerts no longer unhandled are counted as already done, so reruns do nothing
twice. Sensors have no API to handle alerts; such sources are reported and skipped. A refused action (Azure
403: the app lacks Security Admin) is reported once per run and stops that source's loop (``forbidden``: not
retried).

The alert UUID comes from the hook's ``Alert.uuid``: the console's own value when its answer carries one,
else ``<id>-<time ms>``, the pattern of the documented examples (an inference: defender-api.md §4.2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk.exceptions import AirflowNotFoundException

from defender_servicenow import settings
from defender_servicenow.exceptions import (
    ConfigError,
    DefenderAuthError,
    DefenderError,
    DefenderForbiddenError,
    IntegrationError,
    ServiceNowAuthError,
)
from defender_servicenow.forwarding import (
    CORRELATION_DISPLAY,
    StateStore,
    _same_alert,
    correlation_id,
    sn_time,
)
from defender_servicenow.models import Alert, ms_to_datetime
from defender_servicenow.rules import Destination, RuleSet

log = logging.getLogger(__name__)

# Closed task states per table (servicenow-api.md §6): incident Resolved/Closed, security incident Closed.
CLOSED_STATES = {"incident": ("6", "7"), "sn_si_incident": ("3",)}
ACTIONS = ("handle", "handleAndLearn")
CLEANUP_CLOSE_NOTES_PREFIX = "Closed by the defender_servicenow_cleanup DAG"   # cleanup.CLOSE_NOTES


def scan_key(source: str, connection_id: str, table: str) -> str:
    """Task-owned: the ``sys_updated_on`` up to which closed incidents were processed."""
    return f"closed_scan:{source}:{connection_id}:{table}"


@dataclass
class CloseLoopReport:
    source: str
    closed: int = 0            # closed incidents found since the last scan
    handled: int = 0           # alerts handled on the console now
    already: int = 0           # alerts no longer unhandled (handled in Defender or by an earlier run)
    failures: list[str] = field(default_factory=list)
    skipped: str | None = None
    ignored: int = 0           # closed incidents not ours, or closed by the clean-up DAG
    credentials_rejected: bool = False   # a 401/403: not retried (it could lock the user out)
    forbidden: bool = False   # the source refused the action (a missing role): not retried
    misconfigured: bool = False   # a setting must change first (e.g. no integration user): not retried

    def line(self) -> str:
        if self.skipped:
            return f"{self.source}: skipped ({self.skipped})"
        return (f"{self.source}: {self.closed} closed incidents, {self.handled} alerts handled, "
                f"{self.already} already handled, {self.ignored} ignored (not created by this integration, or closed "
                f"by the clean-up), {len(self.failures)} failed")


def handle_closed_alerts(rules: RuleSet, state: StateStore, sources: Sequence[str], *, action: str,
                         defender_hook: Callable[[str], Any],
                         servicenow_hook: Callable[[str], Any], window_hours: float | None = None,
                         clock: Callable[[], datetime] | None = None) -> list[CloseLoopReport]:
    """Handle on the sources the alerts whose incidents were closed in ServiceNow; one report per source.

    :param defender_hook: factory ``conn_id -> Source``.
    :param window_hours: how far back the first scan (no watermark yet) looks for closed incidents, and how
        far before its incident's creation a record written under the previous key (no alert time in its
        key) may name its alert; default ``DEFENDER_ALERT_RECONCILE_HOURS``.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
    window = timedelta(hours=settings.alert_reconcile_hours() if window_hours is None else window_hours)
    now = (clock or (lambda: datetime.now(timezone.utc)))()
    destinations = sorted({(d.connection_id, d.table) for rule in rules.enabled for d in rules.destinations_of(rule)
                           if d.report_type == "incidents" and d.table in CLOSED_STATES})
    reports = []
    for source in sources:
        report = CloseLoopReport(source)
        reports.append(report)
        try:
            dhook = defender_hook(source)
            if not dhook.supports_alert_state:
                report.skipped = (f"a {dhook.kind} source has no API to handle alerts; a management console "
                                  "and Azure have")
                continue
            unhandled: dict[int, Alert] | None = None
            for conn, table in destinations:
                key = scan_key(source, conn, table)
                hook = servicenow_hook(conn)
                user = _integration_user(hook, conn)
                every = _closed_since(hook, table, source, state.get(key) or sn_time(now - window))
                rows = [row for row in every if _ours_closed_by_a_person(user, row)]
                report.ignored += len(every) - len(rows)
                if not rows:
                    if every:
                        state.set(key, max(row.get("sys_updated_on") or "" for row in every))
                    continue
                report.closed += len(rows)
                if unhandled is None:   # one listing per run, only when something was closed, time-bounded
                    since = _earliest_alert_time(rows, window)
                    unhandled = {a.id: a for a in dhook.get_alerts(state="unhandled", from_time=since)
                                 if isinstance(a, Alert)}
                failed_before = len(report.failures)
                for row in rows:
                    _handle_one(dhook, row, unhandled, action, report, Destination(conn, "incidents", table))
                if len(report.failures) == failed_before:   # else the next run retries from the same point
                    state.set(key, max(row.get("sys_updated_on") or "" for row in rows))
        except DefenderForbiddenError as exc:   # once per run, not per alert: a role is missing
            report.failures.append(str(exc))
            report.forbidden = True
        except (IntegrationError, DefenderError, AirflowNotFoundException) as exc:
            report.failures.append(str(exc))
            report.credentials_rejected |= isinstance(exc, (DefenderAuthError, ServiceNowAuthError))
            report.misconfigured |= isinstance(exc, ConfigError)
        log.info("Closed loop %s", report.line())
        for failure in report.failures[:20]:
            log.error("Closed loop %s: %s", source, failure)
    return reports


def _closed_since(hook, table: str, source: str, watermark: str) -> list[dict]:
    states = ",".join(CLOSED_STATES[table])
    query = (f"correlation_idSTARTSWITHdefender-iot:{source}:^correlation_display={CORRELATION_DISPLAY}"
             f"^stateIN{states}^sys_updated_on>={watermark}")
    return hook.query(table, query + "^ORDERBYsys_updated_on",
                      fields=["number", "correlation_id", "state", "sys_updated_on", "sys_created_by",
                              "sys_created_on", "close_notes"])


def _integration_user(hook, conn: str) -> str:
    """The ServiceNow user the integration writes as: the closed loop acts only on incidents that user
    created. Without one (client credentials with an empty Login) any user could make the loop act, so refuse."""
    user = getattr(getattr(hook, "settings", None), "username", None)
    if not user:
        raise ConfigError(
            f"ServiceNow connection {conn!r} names no user, so the closed loop cannot tell the incidents this "
            "integration created (sys_created_by) from anyone else's. Set the connection's Login to the user it "
            "writes as (with auth_type oauth_client_credentials: the OAuth application user of the client), "
            "then run again")
    return user


def _ours_closed_by_a_person(user: str, row: dict) -> bool:
    """Created by this integration (``sys_created_by`` = the connection's user) and not closed by the clean-up
    DAG (which closes with its own close notes)."""
    if str(row.get("close_notes") or "").startswith(CLEANUP_CLOSE_NOTES_PREFIX):
        return False
    return row.get("sys_created_by") == user


def _earliest_alert_time(rows: Sequence[dict], window: timedelta):
    """The earliest alert time named by the incidents' keys (``...:<id>@<time ms>``), less a minute; for a
    key without a time (written before the re-image-proof keys), its incident's creation less ``window``."""
    times = []
    for row in rows:
        tail = str(row.get("correlation_id") or "").rsplit("@", 1)
        if len(tail) == 2 and tail[1].isdigit():
            times.append(ms_to_datetime(int(tail[1])))
            continue
        try:
            created = datetime.strptime(str(row.get("sys_created_on")), "%Y-%m-%d %H:%M:%S")
        except ValueError:
            created = datetime.now(timezone.utc).replace(tzinfo=None)
        times.append(created.replace(tzinfo=timezone.utc) - window)
    return min(times) - timedelta(minutes=1) if times else None


def _handle_one(dhook, row: dict, unhandled: dict[int, Alert], action: str, report: CloseLoopReport,
                dest: Destination) -> None:
    raw = str(row.get("correlation_id") or "").rsplit(":", 1)[-1].split("@", 1)[0]
    try:
        alert = unhandled.get(int(raw))
    except ValueError:
        report.failures.append(f"{row.get('number')}: correlation_id {row.get('correlation_id')!r} names no alert")
        return
    if alert is None or not _names(row, alert, dest):
        report.already += 1
        return
    try:
        dhook.set_alert_state(alert, action)
    except (DefenderAuthError, DefenderForbiddenError):
        raise
    except DefenderError as exc:
        report.failures.append(f"{row.get('number')} (alert {alert.id}): {exc}")
        return
    report.handled += 1
    unhandled.pop(alert.id, None)


def _names(row: dict, alert: Alert, dest: Destination) -> bool:
    """The incident is this alert's: same key, or the previous key (``<conn>:<id>``) and created after the
    alert (as the forwarding recognises it), so a re-imaged console's new alert of that number is not."""
    if "@" in str(row.get("correlation_id") or ""):
        return correlation_id(alert) == row.get("correlation_id")
    return _same_alert(dest, alert, row)
