"""Defender for IoT device attributes -> ServiceNow CMDB (through the IRE), every
DEFENDER_SYNC_FREQUENCY_MINUTES. Thin: settings, schedule, params and wiring; the engine is
``defender_servicenow.sync``."""

from __future__ import annotations

import logging
from datetime import timedelta

import pendulum
from airflow.sdk import Asset, AssetAlias, Param, dag, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowNotFoundException
from defender_servicenow import settings
from defender_servicenow.exceptions import (
    ConfigError,
    DefenderAuthError,
    DefenderCertificateError,
    DefenderWrongApplianceError,
    IntegrationError,
    ServiceNowAuthError,
    ServiceNowForbiddenError,
    ServiceNowInvalidTableError,
)

log = logging.getLogger("defender_servicenow.device_sync")


def _kind(defender) -> str | None:
    return getattr(defender, "kind", None)


# Settings are validated here: a bad value is this DAG's import error, naming the variable and the rule.
SOURCES = settings.defender_sources()
FREQUENCY_MINUTES = settings.sync_frequency_minutes()
SERVICENOW_CONN_ID = settings.servicenow_conn_id()
RETIRE_AFTER_MISSING_RUNS = settings.retire_after_missing_runs()
MATCH_BY_NAME = settings.sync_match_by_name()   # opt-in: devices without serial/MAC may join same-named CIs
SN_COOLDOWN = settings.servicenow_auth_cooldown_minutes()
DEFENDER_COOLDOWN = settings.defender_auth_cooldown_minutes()
AIRFLOW_API_CONN_ID = settings.airflow_api_conn_id()   # optional: write the summary as the run's note
SYNC_RELATIONS = settings.sync_relations()                     # opt-out for very large networks
RELATION_RETENTION_DAYS = settings.relation_retention_days()   # a connection unseen this long loses its relation
CVE_MIN_SCORE = settings.cve_min_score()                       # CVEs below this CVSS score are not recorded
IRE_BATCH_SIZE = 100      # items per IRE request
IRE_RENAME_BATCH_SIZE = 1000   # rename items (name + source key, a few hundred bytes) per IRE request
IRE_PARALLEL = 4          # IRE requests in flight per source

# Change-detection state (asset state store; keys "<source>/..." are written only by that source's task).
SYNC_STATE = Asset(name="defender_device_sync_state")
# Lock-out guard state (hooks/lockout.py), shared with the forwarding DAG: after rejected credentials no
# login is tried with them until the connection changes or the cool-down passes.
AUTH = Asset(name="defender_servicenow_auth")
# One asset per source, "defender_device_sync/<source>", whose events carry the Last Sync counts.
LAST_SYNC = AssetAlias(name="defender_device_sync_last_sync")
# Failures that a retry cannot fix: fail at once with the plain reason. (Rejected credentials are not
# retried: repeated failed logins can lock the integration user out. A hibernating instance is retried
# with back-off, like an outage: it comes back once someone wakes it.)
NOT_RETRYABLE = (ServiceNowAuthError, ServiceNowForbiddenError,
                 ServiceNowInvalidTableError, DefenderAuthError, DefenderWrongApplianceError,
                 DefenderCertificateError, ConfigError)

DOC = f"""
### Defender for IoT device sync

Reads the device inventory of every source in `DEFENDER_SOURCES` ({", ".join(f"`{s}`" for s in SOURCES)}),
one mapped task per source, and creates or updates the matching CIs in the ServiceNow CMDB through the
Identification and Reconciliation Engine (connection `{SERVICENOW_CONN_ID}`). Runs every
{FREQUENCY_MINUTES} minutes (`DEFENDER_SYNC_FREQUENCY_MINUTES`, minimum 5).

* **Enable Sync**: this DAG's pause switch. Paused = sync off; unpause to turn it on.
* **Last Sync**: each source's asset `defender_device_sync/<source>` gets an event per successful sync,
  with the counts (seen, inserted, updated, unchanged, retired, skipped, failed) in its extra; the last
  line of each task log is the same summary; with `AIRFLOW_API_CONN_ID` set, the run's note says it too.
* Only devices whose attributes changed since their last confirmed sync are sent. Trigger with
  `full_resync` to send everything, `dry_run` to preview (the IRE reports what it would do; nothing is
  written), `sources` to sync only some sources.
* Devices deleted on the source are retired in ServiceNow (install status Retired), never deleted:
  management console deletions at once, sensor devices after {RETIRE_AFTER_MISSING_RUNS} consecutive
  successful syncs without them (`DEFENDER_RETIRE_AFTER_MISSING_RUNS`). A failed extraction retires nothing.
* After the devices, per source and each in its own task (a failure there never stops the devices):
  `sync_sensors` (sensors -> `cmdb_ci_nids` CIs, each device CI *Detected by* its sensor) and
  `sync_relations` (device connections -> *Connects to* relations between two device CIs of the same source;
  {"on" if SYNC_RELATIONS else "off: DEFENDER_SYNC_RELATIONS=false"}; removed after {RELATION_RETENTION_DAYS}
  days unseen, `DEFENDER_RELATION_RETENTION_DAYS`) and `sync_cves` (each device's CVEs scoring at least
  {CVE_MIN_SCORE:g}, `DEFENDER_CVE_MIN_SCORE`: Vulnerability Response items when the instance has them, else
  key values on the CI; a CVE that disappears is closed, not deleted).
"""


def selected_sources(params) -> list[str]:
    """The sources a run syncs (the ``sources`` param, else all); ValueError names unknown ones."""
    wanted = [str(s).strip() for s in (params or {}).get("sources") or [] if str(s).strip()]
    unknown = [s for s in wanted if s not in SOURCES]
    if unknown:
        raise ValueError(f"Unknown source(s) {', '.join(map(repr, unknown))} in the 'sources' param: it takes "
                         f"connection ids listed in DEFENDER_SOURCES ({', '.join(SOURCES)}); leave it empty to "
                         "sync all of them")
    return [s for s in SOURCES if s in wanted] if wanted else list(SOURCES)


def _failure(context, message: str) -> dict:
    """A failure object (docs/design.md, health data) for the running task instance."""
    ti = context["ti"]
    return {"at": pendulum.now("UTC").isoformat(), "message": message, "dag_id": ti.dag_id, "run_id": ti.run_id,
            "task_id": ti.task_id, "map_index": ti.map_index, "try_number": ti.try_number}


@dag(
    dag_id="defender_device_sync",
    schedule=timedelta(minutes=FREQUENCY_MINUTES),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=DOC,
    tags=["defender-iot", "servicenow", "cmdb"],
    default_args={"retries": 3, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": 2.0,
                  "max_retry_delay": timedelta(minutes=30)},
    params={
        "full_resync": Param(False, type="boolean", title="Full resync",
                             description="Send every device, ignoring change detection, and mark every device "
                                         "Defender still reports as installed and operational (e.g. after a "
                                         "clean-up in retire mode)."),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="Report what would be sent and retired; write nothing."),
        "sources": Param([], type=["null", "array"], items={"type": "string"}, title="Sources",
                         description="Defender connection ids to sync; empty = all of DEFENDER_SOURCES "
                                     f"({', '.join(SOURCES)})."),
    },
)
def defender_device_sync():
    @task(retries=0)
    def select_sources(params=None) -> list[str]:
        try:
            selected = selected_sources(params)
        except ValueError as exc:
            log.error("%s", exc)
            raise AirflowFailException(str(exc)) from None
        log.info("Syncing %d source(s): %s", len(selected), ", ".join(selected))
        return selected

    @task(inlets=[SYNC_STATE, AUTH], outlets=[LAST_SYNC], map_index_template="{{ defender_source }}")
    def sync_source(source: str, params=None, asset_state_store=None, outlet_events=None) -> dict:
        from airflow.sdk import get_current_context
        from defender_servicenow.hooks.lockout import AuthGuard
        from defender_servicenow.hooks.servicenow import ServiceNowHook
        from defender_servicenow.mapping import load_class_mapping
        from defender_servicenow.sources import source_for
        from defender_servicenow.sync import DeviceSync, item_failures, record_failure
        from defender_servicenow.sync_state import max_value_bytes

        context = get_current_context()
        context["defender_source"] = source   # the mapped task's label in the UI
        store = asset_state_store[SYNC_STATE]

        def failed(message: str, kind: str | None = None):
            if not params["dry_run"]:
                record_failure(store, source, _failure(context, message), kind=kind)
            return message

        defender = None
        try:
            auth = asset_state_store[AUTH]
            defender = source_for(source, auth_guard=AuthGuard(
                auth, "defender", source, cooldown_minutes=DEFENDER_COOLDOWN))
            servicenow = ServiceNowHook(SERVICENOW_CONN_ID, auth_guard=AuthGuard(
                auth, "servicenow", SERVICENOW_CONN_ID, cooldown_minutes=SN_COOLDOWN))
            summary = DeviceSync(
                source=source, defender=defender, servicenow=servicenow,
                state_store=store, mapping=load_class_mapping(),
                source_name=settings.source_name(), data_source=settings.data_source(),
                batch_size=IRE_BATCH_SIZE, rename_batch_size=IRE_RENAME_BATCH_SIZE, parallel=IRE_PARALLEL, full_resync=bool(params["full_resync"]),
                dry_run=bool(params["dry_run"]), retire_after_missing_runs=RETIRE_AFTER_MISSING_RUNS,
                run_id=context["ti"].run_id, match_by_name=MATCH_BY_NAME, max_value_bytes=max_value_bytes(),
            ).run()
        except NOT_RETRYABLE as exc:
            log.error("Sync of %s failed and will not be retried: %s", source, exc)
            raise AirflowFailException(failed(f"Sync of {source} failed: {exc}", _kind(defender))) from None
        except AirflowNotFoundException as exc:
            message = (f"Sync of {source} failed: {exc}. Create the connection (Admin > Connections, an "
                       "AIRFLOW_CONN_<ID> variable or the secrets backend) or remove it from DEFENDER_SOURCES")
            log.error(message)
            raise AirflowFailException(failed(message)) from None
        except IntegrationError as exc:
            log.error("Sync of %s failed (the task is retried with backoff): %s", source, exc)
            raise AirflowException(failed(f"Sync of {source} failed: {exc}", _kind(defender))) from None
        except Exception as exc:
            failed(f"Sync of {source} failed: {type(exc).__name__}", _kind(defender))
            raise
        refused = item_failures(summary)
        if refused:   # the sync went through, but a run in which anything failed ends failed
            log.error(refused)
            raise AirflowFailException(failed(refused, _kind(defender)))
        counts = {name: getattr(summary, name) for name in summary.COUNTS}
        result = {"source": source, **counts, "duration_s": round(summary.duration, 1), "dry_run": summary.dry_run,
                  "errors": summary.errors}
        if not summary.dry_run:
            outlet_events[LAST_SYNC].add(Asset(name=f"defender_device_sync/{source}"),
                                         extra={**result, "finished_at": pendulum.now("UTC").isoformat()})
        return result

    def run_depth(kind: str, source: str, params, asset_state_store) -> dict:
        """One CMDB depth engine (``cmdb_depth``) for one source, with the device task's failure handling."""
        from airflow.sdk import get_current_context
        from defender_servicenow.cmdb_depth.runner import build_engine
        from defender_servicenow.cmdb_depth.state import record_depth_failure
        from defender_servicenow.hooks.lockout import AuthGuard
        from defender_servicenow.hooks.servicenow import ServiceNowHook
        from defender_servicenow.sources import source_for
        from defender_servicenow.sync_state import max_value_bytes

        context = get_current_context()
        context["defender_source"] = source
        store = asset_state_store[SYNC_STATE]
        label = {"cves": "CVEs"}.get(kind, kind.capitalize())

        def failed(message: str) -> str:
            log.error(message)
            if not params["dry_run"]:
                record_depth_failure(store, source, kind, _failure(context, message))
            return message

        try:
            auth = asset_state_store[AUTH]
            src = source_for(source, auth_guard=AuthGuard(auth, "defender", source,
                                                          cooldown_minutes=DEFENDER_COOLDOWN))
            servicenow = ServiceNowHook(SERVICENOW_CONN_ID, auth_guard=AuthGuard(
                auth, "servicenow", SERVICENOW_CONN_ID, cooldown_minutes=SN_COOLDOWN))
            summary = build_engine(
                kind, source=src, servicenow=servicenow, state_store=store, source_name=settings.source_name(),
                data_source=settings.data_source(), full_resync=bool(params["full_resync"]),
                dry_run=bool(params["dry_run"]), max_items=IRE_BATCH_SIZE, max_value_bytes=max_value_bytes(),
                retire_after_missing_runs=RETIRE_AFTER_MISSING_RUNS, sync_relations=SYNC_RELATIONS,
                retention_days=RELATION_RETENTION_DAYS, cve_min_score=CVE_MIN_SCORE).run()
        except NOT_RETRYABLE as exc:
            raise AirflowFailException(failed(f"{label} of {source} failed: {exc}")) from None
        except AirflowNotFoundException as exc:
            raise AirflowFailException(failed(f"{label} of {source} failed: {exc}")) from None
        except IntegrationError as exc:
            raise AirflowException(failed(f"{label} of {source} failed: {exc}")) from None
        except Exception as exc:
            failed(f"{label} of {source} failed: {type(exc).__name__}")
            raise
        return summary.as_dict()

    # After the devices (whose CIs they join), each in its own task: a failure here never stops devices.
    @task(retries=1, trigger_rule="all_done", inlets=[SYNC_STATE, AUTH], map_index_template="{{ defender_source }}")
    def sync_sensors(source: str, params=None, asset_state_store=None) -> dict:
        return run_depth("sensors", source, params, asset_state_store)

    @task(retries=1, trigger_rule="all_done", inlets=[SYNC_STATE, AUTH], map_index_template="{{ defender_source }}")
    def sync_relations(source: str, params=None, asset_state_store=None) -> dict:
        return run_depth("relations", source, params, asset_state_store)

    @task(retries=1, trigger_rule="all_done", inlets=[SYNC_STATE, AUTH], map_index_template="{{ defender_source }}")
    def sync_cves(source: str, params=None, asset_state_store=None) -> dict:
        return run_depth("cves", source, params, asset_state_store)

    @task(retries=0, trigger_rule="all_done", inlets=[SYNC_STATE])   # report what synced even when some failed
    def report(results, depth=None, params=None, dag_run=None, asset_state_store=None) -> str:
        from defender_servicenow.cmdb_depth.runner import depth_problems
        from defender_servicenow.sync import run_failures

        # One slice reads every mapped result in one request; iterating a lazy XCom sequence probes one past
        # its end and logs "XCom not found" at ERROR in a run that may be fine.
        results = [r for r in (results[:] if results else []) if r]
        depth = {kind: list(seq[:]) if seq else [] for kind, seq in (depth or {}).items()}
        totals = {name: sum(r[name] for r in results) for name in
                  ("seen", "inserted", "updated", "unchanged", "retired", "skipped", "failed")}
        for r in results:
            log.info("%s: %s", r["source"], ", ".join(f"{k} {r[k]}" for k in totals))
        try:
            selected, problems = selected_sources(params), []
        except ValueError as exc:
            selected, problems = [], [f"the 'sources' param was rejected ({exc})"]
        synced = {r["source"] for r in results}
        run_id = dag_run.run_id if dag_run is not None else None
        failures = run_failures(asset_state_store[SYNC_STATE] if asset_state_store is not None else None,
                                [s for s in selected if s not in synced], run_id)
        for source, reason in failures.items():
            log.error("%s: sync failed: %s", source, reason)
            problems.append(f"{source} ({reason})")
        line = (f"{len(results)} source(s) synced{' (dry run: nothing written)' if params['dry_run'] else ''}: "
                + ", ".join(f"{k} {v}" for k, v in totals.items()))
        depth_failed = depth_problems(asset_state_store[SYNC_STATE] if asset_state_store is not None else None,
                                      selected, depth or {}, run_id)
        if problems:
            line += f"; FAILED: {len(failures)} source(s): " + "; ".join(problems)
        if depth_failed:
            line += f"; FAILED: {len(depth_failed)} CMDB depth task(s): " + "; ".join(depth_failed)
            problems += depth_failed
        if AIRFLOW_API_CONN_ID and dag_run is not None:
            from defender_servicenow.run_note import set_run_note

            set_run_note(AIRFLOW_API_CONN_ID, dag_run.dag_id, dag_run.run_id, f"Last Sync: {line}")
        if problems:   # the run ends failed; the exception's message is the summary
            log.error(line)
            raise AirflowFailException(line)
        log.info(line)
        return line

    sources = select_sources()
    devices = sync_source.expand(source=sources)
    sensors = sync_sensors.expand(source=sources)
    relations = sync_relations.expand(source=sources)
    cves = sync_cves.expand(source=sources)
    devices >> [sensors, relations, cves]
    report(devices, depth={"sensors": sensors, "relations": relations, "cves": cves})


defender_device_sync()
