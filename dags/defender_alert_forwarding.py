"""defender_alert_forwarding: forward new Defender for IoT alerts to ServiceNow, following forwarding rules.

Started by new alerts: ``DefenderAlertTrigger`` (run by the triggerer through an AssetWatcher) polls every
source each ``DEFENDER_ALERT_POLL_SECONDS`` and wakes this DAG. It also runs every
``DEFENDER_ALERT_SAFETY_RUN_MINUTES`` (default 30; 0 = off) as a safety net: a lost event or a stopped
triggerer then delays alerts instead of losing them. Each source's task then reconciles the alerts of
``DEFENDER_ALERT_RECONCILE_HOURS`` with its delivery ledger, applies the rules of ``DEFENDER_FORWARDING_RULES_FILE`` (validated when this file is
parsed) and creates one incident / application-table record per alert and destination, exactly once.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, DeltaTriggerTimetable, Param, dag, task
from defender_servicenow import settings
from defender_servicenow.rules import load_rules
from defender_servicenow.triggers.alerts import DefenderAlertTrigger

SOURCES = settings.defender_sources()
SERVICENOW_CONN_ID = settings.servicenow_conn_id()
RULES = load_rules(settings.rules_file(), default_connection_id=SERVICENOW_CONN_ID)

ALERTS = Asset(
    name="defender_iot_alerts",
    watchers=[AssetWatcher(
        name="defender_alert_poller",
        trigger=DefenderAlertTrigger(sources=SOURCES, poll_interval=settings.alert_poll_seconds(),
                                     rule_names=[r.name for r in RULES.enabled],
                                     lookback_minutes=settings.alert_lookback_minutes()),
    )],
)


AUTH = Asset(name="defender_servicenow_auth")   # lock-out guard state (hooks/lockout.py)
SN_COOLDOWN = settings.servicenow_auth_cooldown_minutes()
DEFENDER_COOLDOWN = settings.defender_auth_cooldown_minutes()
RECONCILE_HOURS = settings.alert_reconcile_hours()   # validated at parse time
SAFETY_RUN_MINUTES = settings.alert_safety_run_minutes()
HANDLE_ON_CLOSE = settings.handle_alerts_on_close()   # None = off
SCHEDULE = (AssetOrTimeSchedule(assets=[ALERTS], timetable=DeltaTriggerTimetable(timedelta(minutes=SAFETY_RUN_MINUTES)))
            if SAFETY_RUN_MINUTES else [ALERTS])


def _parse_params(params: dict) -> dict:
    """since/until (ISO-8601) and sources, checked; plain errors for people."""
    from defender_servicenow.exceptions import ConfigError

    def when(name: str):
        raw = params.get(name)
        if raw in (None, ""):
            return None
        try:
            value = pendulum.parse(str(raw))
        except ValueError:
            raise ConfigError(f"param {name}={raw!r} is not an ISO-8601 date-time, e.g. 2025-03-01T12:00:00Z") from None
        if not isinstance(value, pendulum.DateTime):
            raise ConfigError(f"param {name}={raw!r} must be a date-time, not a date or a duration")
        return value.in_timezone("UTC") if value.tzinfo else value.replace(tzinfo=pendulum.UTC)

    since, until = when("since"), when("until")
    if until and not since:
        raise ConfigError("param until needs since: give the start of the window to replay")
    if since and until and since >= until:
        raise ConfigError(f"param since ({since.isoformat()}) must be before until ({until.isoformat()})")
    sources = list(params.get("sources") or []) or SOURCES
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ConfigError(f"param sources: {', '.join(unknown)} not in DEFENDER_SOURCES ({', '.join(SOURCES)})")
    return {"since": since, "until": until, "sources": sources, "dry_run": bool(params.get("dry_run"))}


@dag(
    dag_id="defender_alert_forwarding",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["defender-iot", "servicenow", "alerts"],
    doc_md=__doc__,
    params={
        "since": Param(None, type=["null", "string"], title="Replay from (ISO-8601)",
                       description="Replay the alerts raised from this time; rules then apply regardless of when "
                                   "they were created. Empty: forward what is new since the last run."),
        "until": Param(None, type=["null", "string"], title="Replay until (ISO-8601)",
                       description="End of the replay window (default: now). Needs since."),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="Report what would be forwarded; write nothing."),
        "sources": Param([], type=["null", "array"], items={"type": "string"}, title="Sources",
                         description="Defender connection ids to read; empty = all of DEFENDER_SOURCES."),
    },
)
def defender_alert_forwarding():
    @task(inlets=[ALERTS, AUTH], retries=1, retry_delay=timedelta(seconds=30), execution_timeout=timedelta(hours=1))
    def forward_alerts(source: str, params=None, asset_state_store=None, ti=None) -> dict:
        """One source (a mapped task per source, so one failing source never delays the others): read its
        alerts of the reconcile window, apply the rules, create the missing ServiceNow records."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
        from defender_servicenow import forwarding
        from defender_servicenow.exceptions import ConfigError
        from defender_servicenow.hooks.lockout import AuthGuard
        from defender_servicenow.hooks.servicenow import ServiceNowHook
        from defender_servicenow.sources import source_for

        auth = asset_state_store[AUTH]
        try:
            options = _parse_params(params or {})
        except ConfigError as exc:  # a bad trigger param: retrying cannot help
            raise AirflowFailException(str(exc)) from None
        if source not in options["sources"]:
            raise AirflowSkipException(f"{source} is not among the sources of this run (param sources)")
        context = {"dag_id": getattr(ti, "dag_id", None), "run_id": getattr(ti, "run_id", None),
                   "task_id": getattr(ti, "task_id", None), "map_index": getattr(ti, "map_index", None),
                   "try_number": getattr(ti, "try_number", None)}
        forwarder = forwarding.AlertForwarder(
            RULES, asset_state_store[ALERTS], dry_run=options["dry_run"], failure_context=context,
            reconcile_hours=RECONCILE_HOURS,
            defender_hook=lambda conn_id: source_for(conn_id, auth_guard=AuthGuard(
                auth, "defender", conn_id, cooldown_minutes=DEFENDER_COOLDOWN)),
            servicenow_hook=lambda conn_id: ServiceNowHook(
                conn_id, max_retry_time=forwarding.SERVICENOW_MAX_RETRY_SECONDS, auth_guard=AuthGuard(
                    auth, "servicenow", conn_id, cooldown_minutes=SN_COOLDOWN)),
        )
        (report,) = forwarder.run([source], since=options["since"], until=options["until"])
        try:
            forwarding.raise_if_incomplete([report])
        except forwarding.ForwardingCredentialsError as exc:  # no retry: it could lock the user out
            raise AirflowFailException(str(exc)) from None
        return report.as_dict()

    forward_alerts.expand(source=SOURCES)

    if HANDLE_ON_CLOSE:
        # Beside the forwarding, not after it: both are leaves, so a failed forward_alerts still fails the run
        # (a run's state comes from its leaves), and the closed loop never waits for another source's retries.
        @task(inlets=[ALERTS, AUTH], retries=3, retry_delay=timedelta(minutes=1), retry_exponential_backoff=True)
        def handle_closed_alerts(params=None, asset_state_store=None) -> list[str]:
            """Closed loop: alerts of incidents closed in ServiceNow are handled on the management console
            or closed in Azure."""
            from airflow.sdk.exceptions import AirflowException, AirflowFailException
            from defender_servicenow.closeloop import handle_closed_alerts as run_close_loop
            from defender_servicenow.hooks.lockout import AuthGuard
            from defender_servicenow.hooks.servicenow import ServiceNowHook
            from defender_servicenow.sources import source_for

            if (params or {}).get("dry_run"):
                return ["dry run: nothing handled"]
            sources = list((params or {}).get("sources") or []) or SOURCES
            auth = asset_state_store[AUTH]   # the lock-out guard covers the closed loop's logins too
            reports = run_close_loop(RULES, asset_state_store[ALERTS], [s for s in sources if s in SOURCES],
                                     action=HANDLE_ON_CLOSE, defender_hook=lambda c: source_for(c, auth_guard=AuthGuard(
                                         auth, "defender", c, cooldown_minutes=DEFENDER_COOLDOWN)),
                                     servicenow_hook=lambda c: ServiceNowHook(c, auth_guard=AuthGuard(
                                         auth, "servicenow", c, cooldown_minutes=SN_COOLDOWN)))
            if any(r.credentials_rejected for r in reports):   # a 401 is not retried: it could lock the user out
                raise AirflowFailException("Credentials were rejected while handling alerts of closed incidents "
                                           "(not retried): " + "; ".join(f for r in reports for f in r.failures[:5]))
            if any(r.misconfigured for r in reports):   # a setting must change first: retrying cannot help
                raise AirflowFailException("The closed loop cannot run until a setting changes (not retried): "
                                           + "; ".join(f for r in reports if r.misconfigured for f in r.failures[:1]))
            if any(r.forbidden for r in reports):   # a missing role: retrying cannot help
                raise AirflowFailException("The source refused to change alerts of closed incidents (not "
                                           "retried): " + "; ".join(f for r in reports if r.forbidden
                                                                    for f in r.failures[:1]))
            if any(r.failures for r in reports):
                raise AirflowException("Some alerts of closed incidents could not be handled: "
                                       + "; ".join(f for r in reports for f in r.failures[:5]))
            return [r.line() for r in reports]

        handle_closed_alerts()


defender_alert_forwarding()
