"""The production engine, live: CeleryExecutor with real Postgres and Redis, two Celery workers, two triggerers.

One stack for the module (scripts/services.py starts Postgres and Redis from the Debian packages;
scripts/stack.py starts the api-server, scheduler, dag-processor, two triggerers, two Celery workers named
``worker-a`` and ``worker-b``, the ServiceNow simulator and three Defender simulators: two sensors and a
management console). Everything is checked through Airflow's REST API and the simulators.

Which worker ran a task: every process shares this machine's hostname, so each worker reports its own name
as the task instances' ``hostname`` through Airflow's ``[core] hostname_callable`` (in containers each
worker has its own hostname anyway); the workers' own logs confirm it (``celery@worker-a ready``).

A dead worker: the worker running a sync task whose source's devices ServiceNow has already committed
(mid-sync: the task waits on the IRE answers) is SIGKILLed with every process it started (what a lost
machine or container does; killing only the Celery parent would leave its pool child running the task). The scheduler notices
the task's missing heartbeats after ``[scheduler] task_instance_heartbeat_timeout`` (shortened here to
HEARTBEAT_TIMEOUT; 300 s by default) and retries it on the worker that is left. A task the dead worker had
already taken from Redis but not yet started stays queued until ``[scheduler] task_queued_timeout``
(QUEUED_TIMEOUT here; 600 s by default), when the scheduler queues it again. The sync DAG's own retry
delay (1-2 minutes) is shortened by a cluster policy in the test's AIRFLOW_HOME, to keep the wall time down.

Timings are reported (terminal summary, ``<tmp>/distributed.json``), never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from collections import Counter

import pytest
import requests

from scripts import services
from scripts.stack import (
    DEFENDER_CONN_ID,
    SourceSpec,
    Stack,
    StackError,
    StackOptions,
    alert_key,
    wait_until,
)

WORKERS = ("worker-a", "worker-b")
TRIGGERERS = ("triggerer", "triggerer-2")  # the stack's process (and log) names
HEARTBEAT_TIMEOUT = 20  # [scheduler] task_instance_heartbeat_timeout: a running task whose worker died
QUEUED_TIMEOUT = 60     # [scheduler] task_queued_timeout: a task the dead worker had received, not started
DEVICES = 60
SOURCES = (SourceSpec(DEFENDER_CONN_ID, "management_console", DEVICES, 2, seed=1, name="cm-1"),
           SourceSpec("defender_sensor_1", "sensor", DEVICES, seed=2, name="sensor-1"),
           SourceSpec("defender_sensor_2", "sensor", DEVICES, seed=3, name="sensor-2"))
IRE_ITEM_MS = 300  # ServiceNow's time per IRE item: a source's sync takes about DEVICES * 0.3 s = 18 s
# The DAG retries a sync task after 1-2 minutes; the test waits seconds (a cluster policy, test-only).
RETRY_POLICY = '''from datetime import timedelta


def task_policy(task):
    if task.dag_id == "defender_device_sync" and task.task_id == "sync_source":
        task.retry_delay = timedelta(seconds=2)
        task.max_retry_delay = timedelta(seconds=4)
'''


def _missing() -> list[str]:
    gaps = services.missing()
    if importlib.util.find_spec("airflow.providers.celery") is None:
        gaps.append("apache-airflow-providers-celery (make install)")
    return gaps


# A machine without the servers skips the module with one line (a module-level skip mark is folded into
# "SKIPPED [n] tests/test_distributed.py: <reason>"; a skip in the fixture would print one line per test).
_GAPS = _missing()
pytestmark = [pytest.mark.distributed,
              *([pytest.mark.skip(reason="distributed engine test needs " + ", ".join(_GAPS))] if _GAPS else [])]


class _Report:
    def __init__(self):
        self.figures: dict[str, object] = {}

    def pytest_terminal_summary(self, terminalreporter):
        if self.figures:
            terminalreporter.section("distributed engine")
            for key, value in self.figures.items():
                terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(scope="module")
def report(request, tmp_path_factory):
    plugin = _Report()
    request.config.pluginmanager.register(plugin, "distributed-report")
    yield plugin
    (tmp_path_factory.getbasetemp() / "distributed.json").write_text(json.dumps(plugin.figures, indent=2))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, report):
    started = time.monotonic()
    # The ServiceNow simulator answers IRE batches slowly from the start, so the first sync (created when
    # the DAG is unpaused) is still running when a worker is killed.
    with services.Postgres() as pg, services.Redis() as redis:
        engine = services.celery_engine_env(pg.address, redis.address)
        options = StackOptions(
            home=tmp_path_factory.mktemp("distributed") / "airflow_home", fast=True, alert_poll_seconds=2,
            executor=engine["AIRFLOW__CORE__EXECUTOR"],
            sql_alchemy_conn=engine["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
            celery_broker_url=engine["AIRFLOW__CELERY__BROKER_URL"],
            celery_result_backend=engine["AIRFLOW__CELERY__RESULT_BACKEND"],
            celery_workers=WORKERS, worker_concurrency=2, triggerers=2, sources=SOURCES,
            local_settings=RETRY_POLICY, servicenow_args=("--ire-item-ms", str(IRE_ITEM_MS)),
            extra_env={"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
                       "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
                       "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(QUEUED_TIMEOUT),
                       "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "5",
                       "AIRFLOW__CORE__PARALLELISM": "8"})
        with Stack(options) as live:
            live.engine_env = engine
            live.wait_for_dags()
            report.figures["startup_s (Postgres, Redis, migrate, 10 processes, DAGs parsed)"] = round(
                time.monotonic() - started, 1)
            yield live


def _sync_tis(stack: Stack, run_id: str) -> list[dict]:
    return [t for t in stack.task_instances("defender_device_sync", run_id) if t["task_id"] == "sync_source"]


def _tries(stack: Stack, run_id: str, map_index: int) -> list[dict]:
    path = f"/api/v2/dags/defender_device_sync/dagRuns/{run_id}/taskInstances/sync_source/{map_index}/tries"
    return stack.api_json("GET", path)["task_instances"]


def test_the_engine_is_distributed(stack):
    """Executor, two live triggerers and two Celery workers that answer under their own names."""
    # Every component runs with celery_engine_env's settings (the ones docker-compose.yaml must match) and
    # derives the API server's async URL itself, as compose leaves it to.
    assert {key: stack.env[key] for key in stack.engine_env} == stack.engine_env
    assert stack.env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert stack.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert not any(key.startswith("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC") for key in stack.env)
    assert len(_live_triggerers(stack)) == 2
    for worker in WORKERS:
        wait_until(lambda w=worker: f"celery@{w} ready" in (stack.logs_dir / f"{w}.log").read_text(errors="replace"),
                   120, f"{worker} to be ready")


def _rows_per_source(stack: Stack) -> Counter:
    """ServiceNow's source rows (``<conn id>:<device id>``: a device the IRE committed) per source."""
    return Counter(str(r.get("id", "")).split(":", 1)[0] for r in stack.sn_records("sys_object_source")
                   if ":" in str(r.get("id", "")))


def _selected_sources(stack: Stack, run_id: str) -> list[str] | None:
    """The run's sources in map-index order (select_sources' XCom; a running task's rendered map index is
    only known once the task has set its source in the context, i.e. at its end)."""
    resp = stack.api("GET", f"/api/v2/dags/defender_device_sync/dagRuns/{run_id}/taskInstances/select_sources/"
                     "xcomEntries/return_value", params={"deserialize": True})
    if resp.status_code == 404:
        return None
    value = resp.json()["value"]
    return json.loads(value) if isinstance(value, str) else value


def test_sync_spreads_over_both_workers_and_survives_a_killed_worker(stack, report):
    """The first sync (the one that creates every CI) loses a worker mid-sync and still ends right.

    The victim is whichever worker runs a sync task whose source ServiceNow has already committed devices
    of (the task then waits ~35 s on the slow IRE answers): a kill in the task's start-up would prove less.
    Which workers the tasks ran on is read from the finished attempts, so a loaded machine that starts
    the three tasks one after another cannot make the test wait for a moment that never comes.
    """
    started = time.monotonic()
    try:  # the DAG's first scheduled run starts as soon as it is parsed (unpaused at creation)
        runs = wait_until(lambda: stack.runs("defender_device_sync"), 60, "the first scheduled sync run")
        run_id = runs[-1]["dag_run_id"]
    except StackError:
        run_id = stack.trigger("defender_device_sync")
    for worker in WORKERS:  # a survivor that is not consuming yet could not take the retry
        wait_until(lambda w=worker: f"celery@{w} ready" in (stack.logs_dir / f"{w}.log").read_text(errors="replace"),
                   120, f"{worker} to be ready")

    sources = wait_until(lambda: _selected_sources(stack, run_id), 180, "select_sources to finish")
    assert sorted(sources) == sorted(s.conn_id for s in SOURCES), sources

    def mid_sync():
        committed = _rows_per_source(stack)
        for ti in _sync_tis(stack, run_id):
            if ti["state"] == "running" and ti["hostname"] in WORKERS and committed[sources[ti["map_index"]]]:
                return ti, committed
        return None

    victim_ti, committed = wait_until(mid_sync, 300, "a sync task running with devices of its source in "
                                      "ServiceNow already", interval=0.5)
    victim = victim_ti["hostname"]
    survivor = next(w for w in WORKERS if w != victim)
    victim_source = sources[victim_ti["map_index"]]
    running_at_kill = {sources[t["map_index"]]: t["hostname"] for t in _sync_tis(stack, run_id)
                       if t["state"] == "running"}
    killed_at = time.monotonic()
    stack.kill(victim)
    assert stack.process(survivor).poll() is None, f"{survivor} died too; see {stack.logs_dir}"

    def retried():
        ti = next(t for t in _sync_tis(stack, run_id) if t["map_index"] == victim_ti["map_index"])
        return ti if ti["try_number"] > victim_ti["try_number"] else None

    wait_until(retried, HEARTBEAT_TIMEOUT + 180, "the killed worker's task to be retried", interval=0.5)
    detected_s = time.monotonic() - killed_at
    state = stack.wait_for_run("defender_device_sync", run_id, timeout=420)
    total_s = time.monotonic() - started
    tis = _sync_tis(stack, run_id)
    assert state == "success", [(t["map_index"], t["state"], t["hostname"], t["try_number"]) for t in tis]

    # The killed attempt failed on the victim (heartbeat timeout) without finishing its sync; the retry ran
    # on the survivor. Every attempt of every sync task ran on one of the two workers, and both took some.
    tries = _tries(stack, run_id, victim_ti["map_index"])
    first = next(t for t in tries if t["try_number"] == victim_ti["try_number"])
    last = max(tries, key=lambda t: t["try_number"])
    assert first["hostname"] == victim and first["state"] == "failed", first
    assert last["hostname"] == survivor and last["state"] == "success", last
    killed_log = next(p for p in stack.task_log_files("defender_device_sync", run_id)
                      if f"task_id=sync_source/map_index={victim_ti['map_index']}/" in p.as_posix()
                      and p.name == f"attempt={victim_ti['try_number']}.log").read_text(errors="replace")
    assert f"Syncing {victim_source} " in killed_log, "the killed attempt had not started its sync"
    assert "Recorded the state of" not in killed_log and "Last sync of" not in killed_log, (
        "the killed attempt finished its sync before the kill: not killed mid-sync")
    attempts = [t for ti in tis for t in _tries(stack, run_id, ti["map_index"])]
    hosts = Counter(t["hostname"] for t in attempts)
    assert set(hosts) == set(WORKERS), hosts

    # Every device exactly once in the CMDB: one source row per device and source (every valid device of
    # every source; the simulators make a few invalid on purpose, which are counted as skipped), each
    # pointing at an existing CI, and no CI that no source row points at (an attempt that inserted a device
    # a second time would leave one). The simulator lists each class table with its subclasses.
    rows = [r for r in stack.sn_records("sys_object_source") if ":" in str(r.get("id", ""))]
    ids = Counter(r["id"] for r in rows)
    assert not [k for k, n in ids.items() if n > 1], "devices with two source rows"
    for source in SOURCES:
        path = "/api/v1/devices" if source.mode == "sensor" else "/external/v1/devices"
        devices = requests.get(f"{stack.defender_urls[source.conn_id]}{path}", timeout=30,
                               headers={"Authorization": stack.defender_token}).json()
        expected = {f"{source.conn_id}:{d['id']}" for d in devices}
        synced = {k for k in ids if k.startswith(f"{source.conn_id}:")}
        assert synced <= expected, sorted(synced - expected)[:5]
        assert len(expected - synced) <= 2 * -(-len(expected) // 50), sorted(expected - synced)  # invalid ones
    cis = {rec["sys_id"] for table in {r["target_table"] for r in rows} for rec in stack.sn_records(table)}
    targets = {r["target_sys_id"] for r in rows}
    assert targets <= cis, "source rows pointing at missing CIs"
    assert not cis - targets, f"{len(cis - targets)} CIs without a source row (a device inserted twice)"
    note = stack.api_json("GET", f"/api/v2/dags/defender_device_sync/dagRuns/{run_id}").get("note") or ""
    # The retry sent the killed attempt's devices again and ServiceNow recognised the ones it had committed.
    unchanged = re.search(r", unchanged (\d+),", note)
    assert unchanged and int(unchanged.group(1)) >= committed[victim_source], note

    counters = stack.sn_state().get("counters", {})
    scheduler_log = (stack.logs_dir / "scheduler.log").read_text(errors="replace")
    report.figures.update({
        "tasks_failed_for_missing_heartbeat": scheduler_log.count("Detected a task instance without a heartbeat"),
        "tasks_requeued_after_stuck_in_queued": scheduler_log.count("Task stuck in queued; will try to requeue"),
        "sync_run_s (3 sources x 60 devices, IRE 0.3 s/item, one worker killed)": round(total_s, 1),
        f"killed_task_retried_after_s (heartbeat timeout {HEARTBEAT_TIMEOUT} s)": round(detected_s, 1),
        "killed": f"{victim} running {victim_source}, {committed[victim_source]} of its devices committed in "
                  "ServiceNow",
        "sync_tasks_running_at_kill": running_at_kill,
        "ire_answers_the_killed_attempt_had_received": killed_log.count("IRE identifyreconcile"),
        "sync_attempts_per_worker": dict(hosts),
        "servicenow_requests_until_first_sync_done": counters.get("requests"),
        "servicenow_ire_items_until_first_sync_done": counters.get("ire_items"),
        "cmdb_source_rows": len(rows),
        "run_note": note,
    })


def test_the_next_sync_after_the_crash_inserts_nothing(stack, report):
    """After the crash-and-retry sync, a second sync finds every device unchanged (no duplicate, no re-send)."""
    before = stack.sn_state()["counters"]
    cis_before = len(stack.sn_records("sys_object_source"))
    started = time.monotonic()
    run_id = stack.trigger("defender_device_sync")
    assert stack.wait_for_run("defender_device_sync", run_id, timeout=300) == "success"
    elapsed = time.monotonic() - started
    after = stack.sn_state()["counters"]
    note = stack.api_json("GET", f"/api/v2/dags/defender_device_sync/dagRuns/{run_id}").get("note") or ""
    assert ", inserted 0, updated 0," in note, note
    assert len(stack.sn_records("sys_object_source")) == cis_before
    report.figures.update({
        "unchanged_sync_run_s (3 sources, 2 workers)": round(elapsed, 1),
        "servicenow_requests_unchanged_sync": after["requests"] - before["requests"],
        "servicenow_ire_items_unchanged_sync": after["ire_items"] - before["ire_items"],
        "run_note_unchanged_sync": note,
    })


def _live_triggerers(stack: Stack) -> list[dict]:
    jobs = stack.api_json("GET", "/api/v2/jobs", params={"job_type": "TriggererJob", "is_alive": True})["jobs"]
    dead = [name for name in TRIGGERERS if stack.process(name).poll() is not None]
    assert not dead and len(jobs) == len(TRIGGERERS), (dead, jobs)
    return jobs


def _watcher_events(stack: Stack) -> dict[int, dict]:
    """The alert watcher's asset events (``extra.payload.sources``: new alerts per source), by event id."""
    assets = stack.api_json("GET", "/api/v2/assets", params={"name_pattern": "defender_iot_alerts"})["assets"]
    asset_id = next(a["id"] for a in assets if a["name"] == "defender_iot_alerts")
    events = stack.api_json("GET", "/api/v2/assets/events", params={"asset_id": asset_id, "limit": 100})
    return {e["id"]: e for e in events["asset_events"] if (e.get("extra") or {}).get("from_trigger")}


def test_alerts_become_incidents_exactly_once_with_two_triggerers(stack, report):
    """Both triggerers alive throughout; the watcher reports each new alert once; one incident per alert.

    The incidents alone could not show a watcher running in both triggerers (the forwarding task looks each
    incident up by correlation_id before creating it), so the watcher's own asset events are counted too:
    two watcher instances polling the same sources would each report the new alerts.
    """
    _live_triggerers(stack)
    events_before = set(_watcher_events(stack))
    console, sensor = stack.defender_urls[DEFENDER_CONN_ID], stack.defender_urls["defender_sensor_1"]
    raised = {}
    for url, conn_id in ((console, DEFENDER_CONN_ID), (sensor, "defender_sensor_1")):
        resp = requests.post(f"{url}/sim/alerts", json={"count": 2}, timeout=30)
        resp.raise_for_status()
        body = resp.json()
        for alert in body if isinstance(body, list) else body.get("alerts", []):
            raised[f"{conn_id}:{alert['id']}"] = time.monotonic()
    assert len(raised) == 4 and alert_key({"id": 0}).startswith(DEFENDER_CONN_ID)
    seen: dict[str, float] = {}

    def all_forwarded():
        present = stack.incidents_by_alert()
        seen.update({k: time.monotonic() - t for k, t in raised.items() if k in present and k not in seen})
        return len(seen) == len(raised)

    wait_until(all_forwarded, 240, "the new alerts to become incidents", interval=0.5)
    report.figures["alert_to_incident_s (two triggerers, poll 2 s)"] = sorted(round(v, 1) for v in seen.values())
    time.sleep(8)  # a few more polls by the watcher, whichever triggerer holds it
    wait_until(lambda: all(r["state"] in ("success", "failed") for r in stack.runs("defender_alert_forwarding")),
               240, "alert forwarding runs to finish")
    _live_triggerers(stack)
    incidents = stack.incidents_by_alert()
    doubles = {k: len(v) for k, v in incidents.items() if len(v) != 1}
    assert not doubles, f"alerts with more than one incident: {doubles}"
    assert set(raised) <= set(incidents)

    new_events = [e for i, e in _watcher_events(stack).items() if i not in events_before]
    reported = Counter()
    for event in new_events:
        for conn_id, found in event["extra"]["payload"]["sources"].items():
            reported[conn_id] += found["new_alerts"]
    assert reported == Counter(k.split(":", 1)[0] for k in raised), (
        f"the watcher reported {dict(reported)} new alerts for the 4 raised: more than one watcher polled")
    polled_by = {name: (stack.logs_dir / f"{name}.log").read_text(errors="replace").count("New alerts: ")
                 for name in TRIGGERERS}
    report.figures.update({"watcher_events_for_4_alerts": len(new_events),
                           "watcher_new_alert_lines_per_triggerer": polled_by})
