"""The production engine, live: CeleryExecutor with real Postgres and Redis, two Celery workers, two triggerers.

One stack for the module (scripts/services.py starts Postgres and Redis from the Debian packages;
scripts/stack.py starts the api-server, scheduler, dag-processor, two triggerers, two Celery workers named
``worker-a`` and ``worker-b``, the ServiceNow simulator and three Defender simulators: two sensors and a
management console). Everything is checked through Airflow's REST API and the simulators.

Which worker ran a task: every process shares this machine's hostname, so each worker reports its own name
as the task instances' ``hostname`` through Airflow's ``[core] hostname_callable`` (in containers each
worker has its own hostname anyway); the workers' own logs confirm it (``celery@worker-a ready``).

A dead worker: the worker is SIGKILLed with every process it started (what a lost machine or container
does; killing only the Celery parent would leave its pool child running the task). The scheduler notices
the task's missing heartbeats after ``[scheduler] task_instance_heartbeat_timeout`` (shortened here to
HEARTBEAT_TIMEOUT; 300 s by default) and retries it on the worker that is left. A task the dead worker had
already taken from Redis but not yet started stays queued until ``[scheduler] task_queued_timeout``
(QUEUED_TIMEOUT here; 600 s by default), when the scheduler queues it again. The sync DAG's own retry
delay (1-2 minutes) is shortened by a cluster policy in the test's AIRFLOW_HOME, to keep the wall time down.

Timings are reported (terminal summary, ``<tmp>/distributed.json``), never asserted.
"""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.distributed

WORKERS = ("worker-a", "worker-b")
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
    try:
        import airflow.providers.celery  # noqa: F401
    except ImportError:
        gaps.append("apache-airflow-providers-celery (make install)")
    return gaps


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
    gaps = _missing()
    if gaps:
        pytest.skip("distributed engine test needs " + ", ".join(gaps))
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
    config = stack.api("GET", "/api/v2/config/sections/core/options/executor")  # may be hidden: env is the truth
    assert stack.env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", config.status_code
    jobs = stack.api_json("GET", "/api/v2/jobs", params={"job_type": "TriggererJob", "is_alive": True})["jobs"]
    assert len(jobs) == 2, jobs
    for worker in WORKERS:
        wait_until(lambda w=worker: f"celery@{w} ready" in (stack.logs_dir / f"{w}.log").read_text(errors="replace"),
                   60, f"{worker} to be ready")


def test_sync_spreads_over_both_workers_and_survives_a_killed_worker(stack, report):
    """The first sync (the one that creates every CI) loses a worker mid-sync and still ends right."""
    started = time.monotonic()
    try:  # the DAG's first scheduled run starts as soon as it is parsed (unpaused at creation)
        runs = wait_until(lambda: stack.runs("defender_device_sync"), 30, "the first scheduled sync run")
        run_id = runs[-1]["dag_run_id"]
    except StackError:
        run_id = stack.trigger("defender_device_sync")

    def running_on_both():
        tis = _sync_tis(stack, run_id)
        hosts = {t["hostname"] for t in tis if t["state"] == "running"}
        return tis if set(WORKERS) <= hosts else None

    tis = wait_until(running_on_both, 180, "sync tasks running on both workers", interval=0.5)
    victim_ti = next(t for t in tis if t["state"] == "running" and t["hostname"] == WORKERS[0])
    victim, survivor = WORKERS[0], WORKERS[1]
    killed_at = time.monotonic()
    stack.kill(victim)

    def retried():
        ti = next(t for t in _sync_tis(stack, run_id) if t["map_index"] == victim_ti["map_index"])
        return ti if ti["try_number"] > victim_ti["try_number"] else None

    wait_until(retried, HEARTBEAT_TIMEOUT + 120, "the killed worker's task to be retried", interval=0.5)
    detected_s = time.monotonic() - killed_at
    state = stack.wait_for_run("defender_device_sync", run_id, timeout=300)
    total_s = time.monotonic() - started
    tis = _sync_tis(stack, run_id)
    assert state == "success", [(t["map_index"], t["state"], t["hostname"], t["try_number"]) for t in tis]

    # The killed attempt failed on the victim (heartbeat timeout); the retry ran on the survivor.
    tries = _tries(stack, run_id, victim_ti["map_index"])
    first = next(t for t in tries if t["try_number"] == victim_ti["try_number"])
    last = max(tries, key=lambda t: t["try_number"])
    assert first["hostname"] == victim and first["state"] == "failed", first
    assert last["hostname"] == survivor and last["state"] == "success", last
    hosts = Counter(t["hostname"] for ti in tis for t in _tries(stack, run_id, ti["map_index"]))
    assert set(WORKERS) <= set(hosts), hosts
    assert f"celery@{victim} ready" in (stack.logs_dir / f"{victim}.log").read_text(errors="replace")

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

    counters = stack.sn_state().get("counters", {})
    scheduler_log = (stack.logs_dir / "scheduler.log").read_text(errors="replace")
    report.figures.update({
        "tasks_failed_for_missing_heartbeat": scheduler_log.count("Detected a task instance without a heartbeat"),
        "tasks_requeued_after_stuck_in_queued": scheduler_log.count("Task stuck in queued; will try to requeue"),
        "sync_run_s (3 sources x 60 devices, IRE 0.3 s/item, one worker killed)": round(total_s, 1),
        f"killed_task_retried_after_s (heartbeat timeout {HEARTBEAT_TIMEOUT} s)": round(detected_s, 1),
        "task_attempts_per_worker": dict(hosts),
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


def test_alerts_become_incidents_exactly_once_with_two_triggerers(stack, report):
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

    wait_until(all_forwarded, 180, "the new alerts to become incidents", interval=0.5)
    report.figures["alert_to_incident_s (two triggerers, poll 2 s)"] = sorted(round(v, 1) for v in seen.values())
    time.sleep(8)  # a few more polls by the watcher, whichever triggerer holds it
    wait_until(lambda: all(r["state"] in ("success", "failed") for r in stack.runs("defender_alert_forwarding")),
               180, "alert forwarding runs to finish")
    incidents = stack.incidents_by_alert()
    doubles = {k: len(v) for k, v in incidents.items() if len(v) != 1}
    assert not doubles, f"alerts with more than one incident: {doubles}"
    assert set(raised) <= set(incidents)
