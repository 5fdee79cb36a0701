"""defender_device_sync: DAG import and settings validation, then dag.test() runs against the simulators.

Settings are read when the DAG file is parsed, so every test sets its environment first and loads the file
fresh (DagBag on the one file).
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from include.simulators.servicenow_sim import SIM_PASSWORD

DAG_FILE = Path(__file__).resolve().parents[1] / "dags" / "defender_device_sync.py"


def load_dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAG_FILE), safe_mode=False)


def load_dag():
    bag = load_dagbag()
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["defender_device_sync"]


# --------------------------------------------------------------------------- import and settings


def test_dag_imports_with_defaults(monkeypatch):
    for name in ("DEFENDER_SOURCES", "DEFENDER_SYNC_FREQUENCY_MINUTES", "DEFENDER_RETIRE_AFTER_MISSING_RUNS"):
        monkeypatch.delenv(name, raising=False)
    dag = load_dag()
    assert dag.timetable.delta == timedelta(hours=1)
    assert dag.catchup is False and dag.max_active_runs == 1
    assert set(dag.params) == {"full_resync", "dry_run", "sources"}
    assert dag.params["full_resync"] is False and dag.params["dry_run"] is False and dag.params["sources"] == []
    assert "Enable Sync" in dag.doc_md and "pause" in dag.doc_md.lower()
    assert {t.task_id for t in dag.tasks} == {"select_sources", "sync_source", "sync_sensors", "sync_relations",
                                              "sync_cves", "report"}
    sync = dag.get_task("sync_source")
    assert sync.retries >= 1 and sync.retry_exponential_backoff


def test_frequency_setting_is_the_schedule(monkeypatch):
    monkeypatch.setenv("DEFENDER_SYNC_FREQUENCY_MINUTES", "5")
    dag = load_dag()
    assert dag.timetable.delta == timedelta(minutes=5)


@pytest.mark.parametrize(("value", "rule"), [("4", "at least 5"), ("0", "at least 5"), ("-10", "at least 5"),
                                             ("abc", "whole number"), ("7.5", "whole number")])
def test_bad_frequency_is_an_import_error_naming_the_variable(monkeypatch, value, rule):
    monkeypatch.setenv("DEFENDER_SYNC_FREQUENCY_MINUTES", value)
    bag = load_dagbag()
    assert "defender_device_sync" not in bag.dags
    (message,) = bag.import_errors.values()
    assert "DEFENDER_SYNC_FREQUENCY_MINUTES" in message and rule in message


@pytest.mark.parametrize(("name", "value"), [("DEFENDER_RETIRE_AFTER_MISSING_RUNS", "0"),
                                             ("DEFENDER_SOURCES", "a,,b")])
def test_other_bad_settings_are_import_errors(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    (message,) = load_dagbag().import_errors.values()
    assert name in message


# --------------------------------------------------------------------------- dag.test() against the simulators


@pytest.fixture
def fast_servicenow_retries(monkeypatch):
    """The hook's retries of one call take at most 1 s here (default 300 s)."""
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    monkeypatch.setitem(ServiceNowHook.__init__.__kwdefaults__, "max_retry_time", 1.0)


def run_dag(conf: dict | None = None, *, retries: int = 0):
    dag = load_dag()
    for task in dag.tasks:
        task.retries = retries          # dag.test() would otherwise wait for the retry delay
    return dag.test(run_conf=conf or {})


def task_states(dagrun) -> dict[str, str]:
    out = {}
    for ti in dagrun.get_task_instances():
        key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        out[key] = str(getattr(ti.state, "value", ti.state))
    return out


def last_sync_events(source: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                               .where(AssetModel.name == f"defender_device_sync/{source}")
                               .order_by(AssetEvent.id)).all()
        return [dict(row.extra or {}) for row in rows]


def cis(sn_sim, prefix: str) -> dict[str, dict]:
    return {r["id"]: sn_sim.get(r["target_sys_id"]) for r in sn_sim.table("sys_object_source")
            if r["id"].startswith(prefix + ":")}


def ire_requests(sn_sim) -> int:
    return sum(n for route, n in sn_sim.counters().get("by_route", {}).items() if "identifyreconcile" in route)


@pytest.mark.airflow_db
def test_sensor_architecture_two_sensors(airflow_db, monkeypatch, defender_sim_factory, servicenow_conn):
    s1 = defender_sim_factory(mode="sensor", devices=30, seed=11, conn_id="dagtest_sensor_1")
    defender_sim_factory(mode="sensor", devices=20, seed=12, conn_id="dagtest_sensor_2")
    monkeypatch.setenv("DEFENDER_SOURCES", "dagtest_sensor_1,dagtest_sensor_2")
    monkeypatch.setenv("DEFENDER_RETIRE_AFTER_MISSING_RUNS", "1")
    sn = servicenow_conn.sim

    first = run_dag()                                     # 1. the first sync creates the CIs
    assert task_states(first) == {"select_sources": "success", "sync_source[0]": "success",
                                  "sync_source[1]": "success", "report": "success",
                                  **{f"{t}[{i}]": "success" for t in ("sync_sensors", "sync_relations", "sync_cves")
                                     for i in (0, 1)}}
    ci1, ci2 = cis(sn, "dagtest_sensor_1"), cis(sn, "dagtest_sensor_2")
    assert len(ci1) >= 28 and len(ci2) >= 18
    (event,) = last_sync_events("dagtest_sensor_1")
    assert event["seen"] == 30 and event["failed"] == 0
    # A device with neither MAC nor serial is identified by name (the IRE's last resort); both generated
    # inventories have such a device with the same name, so whichever sensor syncs second joins the first
    # one's CI ("updated") instead of inserting a duplicate.
    shared = {ci["sys_id"] for ci in ci1.values()} & {ci["sys_id"] for ci in ci2.values()}
    assert event["inserted"] + event["updated"] == len(ci1) and event["updated"] <= len(shared)

    writes = ire_requests(sn)                             # 2. a second sync sends no writes
    second = run_dag()
    assert str(second.state.value if hasattr(second.state, "value") else second.state) == "success"
    assert ire_requests(sn) == writes
    assert last_sync_events("dagtest_sensor_1")[-1]["unchanged"] == len(ci1)
    assert len(shared) <= 2, f"unexpectedly many CIs shared by both sensors: {len(shared)}"

    changed_key, deleted_key = sorted(ci1)[:2]            # 3. changed -> updated, deleted -> retired
    s1.sim.update_device(int(changed_key.split(":")[1]), name="Renamed-PLC")
    s1.sim.delete_device(int(deleted_key.split(":")[1]))
    run_dag()
    after = cis(sn, "dagtest_sensor_1")
    assert after[changed_key]["name"] == "Renamed-PLC" and after[changed_key]["sys_id"] == ci1[changed_key]["sys_id"]
    assert (after[deleted_key]["install_status"], after[deleted_key]["operational_status"]) == ("7", "6")
    event = last_sync_events("dagtest_sensor_1")[-1]
    assert (event["updated"], event["retired"], event["inserted"]) == (1, 1, 0)
    assert len(cis(sn, "dagtest_sensor_2")) == len(ci2)


@pytest.mark.airflow_db
def test_management_console_rerun_after_outage_duplicates_nothing(airflow_db, monkeypatch, defender_sim_factory,
                                                                   servicenow_conn, fast_servicenow_retries):
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    defender_sim_factory(mode="management_console", devices=250, sensors=2, conn_id="dagtest_cm")
    monkeypatch.setenv("DEFENDER_SOURCES", "dagtest_cm")
    sn = servicenow_conn.sim
    real, calls, lock = ServiceNowHook.identify_reconcile, [], threading.Lock()
    first_two_done, outage = threading.Semaphore(0), threading.Event()

    def flaky(self, *args, **kw):                         # ServiceNow answers 503 from the 3rd IRE call on
        with lock:
            calls.append(1)
            n = len(calls)
        if n == 3:   # the first two calls may still be in flight (4 in parallel): let them land first
            assert first_two_done.acquire(timeout=120) and first_two_done.acquire(timeout=120)
            sn.set_faults(fail_next={"count": 100000, "status": 503, "path_prefix": "/api/now/identifyreconcile"})
            outage.set()
        elif n > 3:
            assert outage.wait(timeout=120)
        try:
            return real(self, *args, **kw)
        finally:
            if n <= 2:
                first_two_done.release()

    monkeypatch.setattr(ServiceNowHook, "identify_reconcile", flaky)
    failed = run_dag()
    assert task_states(failed)["sync_source[0]"] == "failed"
    assert task_states(failed)["report"] == "failed"             # reports what did sync, then fails the run
    assert str(getattr(failed.state, "value", failed.state)) == "failed"
    partial = cis(sn, "dagtest_cm")
    assert 0 < len(partial) < 240 and last_sync_events("dagtest_cm") == []

    sn.faults.fail_next.clear()
    ok = run_dag()
    assert task_states(ok)["sync_source[0]"] == "success"
    written = cis(sn, "dagtest_cm")
    devices_cis = [c for c in sn.select("cmdb_ci_hardware") if c.get("sys_class_name") != "cmdb_ci_nids"]
    assert len(written) == len(devices_cis) >= 240         # one CI per device (sensors are NIDS CIs), no duplicates
    assert all(written[k]["sys_id"] == ci["sys_id"] for k, ci in partial.items())
    event = last_sync_events("dagtest_cm")[-1]
    assert event["inserted"] == len(written) - len(partial) and event["failed"] == 0


@pytest.mark.airflow_db
def test_unknown_source_param_fails_plainly(airflow_db, monkeypatch, defender_sim_factory, servicenow_conn, capfd):
    defender_sim_factory(mode="sensor", devices=5, conn_id="dagtest_sensor_1")
    monkeypatch.setenv("DEFENDER_SOURCES", "dagtest_sensor_1")
    dagrun = run_dag({"sources": ["dagtest_sensor_9"]})
    assert task_states(dagrun)["select_sources"] == "failed"
    out, err = capfd.readouterr()
    assert "Unknown source(s) 'dagtest_sensor_9' in the 'sources' param" in out + err
    assert str(getattr(dagrun.state, "value", dagrun.state)) == "failed"          # the run looks failed
    assert "FAILED: 0 source(s): the 'sources' param was rejected" in out + err
    assert cis(servicenow_conn.sim, "dagtest_sensor_1") == {}


@pytest.mark.airflow_db
def test_a_source_without_connection_fails_plainly_and_others_sync(airflow_db, monkeypatch, defender_sim_factory,
                                                                    servicenow_conn, capfd):
    defender_sim_factory(mode="sensor", devices=5, conn_id="dagtest_sensor_1")
    monkeypatch.setenv("DEFENDER_SOURCES", "dagtest_sensor_1,dagtest_no_such_conn")
    dagrun = run_dag()
    states = task_states(dagrun)
    assert states["sync_source[0]"] == "success" and states["sync_source[1]"] == "failed"
    out, err = capfd.readouterr()
    assert "Sync of dagtest_no_such_conn failed" in out + err and "remove it from DEFENDER_SOURCES" in out + err
    assert len(cis(servicenow_conn.sim, "dagtest_sensor_1")) >= 4
    assert str(getattr(dagrun.state, "value", dagrun.state)) == "failed"          # after the other synced
    summary = [line for line in (out + err).splitlines() if "source(s) synced" in line][-1]
    assert "1 source(s) synced" in summary and "FAILED: 1 source(s): dagtest_no_such_conn (Sync of " in summary
    meta = sync_state("dagtest_no_such_conn/meta")
    assert meta["last_outcome"] == "failed" and meta["last_failure"]["task_id"] == "sync_source"
    assert meta["last_failure"]["run_id"] == dagrun.run_id and meta["last_failure"]["map_index"] == 1
    ok = sync_state("dagtest_sensor_1/meta")
    assert ok["last_outcome"] == "ok" and ok["kind"] == "sensor"


def sync_state(key: str):
    """A value of the asset state store of defender_device_sync_state, read back from Airflow's DB."""
    import json

    from airflow.models.asset import AssetModel
    from airflow.models.asset_state_store import AssetStateStoreModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalars(select(AssetStateStoreModel).join(AssetModel, AssetStateStoreModel.asset_id == AssetModel.id)
                              .where(AssetModel.name == "defender_device_sync_state",
                                     AssetStateStoreModel.key == key)).one()
        return json.loads(row.value)


@pytest.mark.airflow_db
def test_rejected_servicenow_credentials_stop_further_logins_by_the_sync(airflow_db, monkeypatch, defender_sim_factory,
                                                                        servicenow_conn, fast_servicenow_retries, capfd):
    """After ServiceNow rejects the credentials, the next sync fails plainly without a request to ServiceNow
    (the lock-out guard shared with the forwarding DAG), so scheduled runs cannot lock the user out."""
    # A source of its own: other tests leave sync state for dagtest_sensor_1, and an unchanged sync needs no login.
    defender_sim_factory(mode="sensor", devices=5, conn_id="dagtest_lockout_sensor")
    monkeypatch.setenv("DEFENDER_SOURCES", "dagtest_lockout_sensor")
    sn = servicenow_conn.sim
    sn.set_faults(reject_credentials=True, revoke_tokens=True)
    first = run_dag()
    assert str(getattr(first.state, "value", first.state)) == "failed"
    sent = sn.counters()["requests"]
    assert sent > 0
    second = run_dag()
    assert str(getattr(second.state, "value", second.state)) == "failed"
    assert sn.counters()["requests"] == sent                      # no login attempt while locked
    out, err = capfd.readouterr()
    assert "lock-out guard" in out + err
    assert "lock-out guard" in sync_state("dagtest_lockout_sensor/meta")["last_failure"]["message"]
    assert SIM_PASSWORD not in out + err


@pytest.mark.airflow_db
def test_devices_servicenow_refuses_fail_the_run_after_everything_else_synced(airflow_db, monkeypatch,
                                                                              defender_sim_factory, servicenow_conn,
                                                                              capfd):
    """Issue 11, item 5: IRE item errors (here MULTI_MATCH: two CIs of another tool share a device's serial)
    fail the source's task (no retry: it would get the same answer) and the run; the rest is synced and
    recorded, and the refused device is sent again by the next run."""
    s1 = defender_sim_factory(mode="sensor", devices=8, seed=21, conn_id="dagtest_refused_1")
    defender_sim_factory(mode="sensor", devices=6, seed=22, conn_id="dagtest_refused_2")
    monkeypatch.setenv("DEFENDER_SOURCES", "dagtest_refused_1,dagtest_refused_2")
    sn = servicenow_conn.sim
    for n in (1, 2):
        sn.insert("cmdb_ci_computer", {"name": f"sccm-{n}", "serial_number": "SN-DUP-4711", "discovery_source": "SCCM"})
    victim = s1.sim.device_ids()[0]
    s1.sim.update_device(victim, name="PLC with a shared serial", macAddresses=["00:1b:1b:42:42:42"], firmware=[
        {"slot": "N/A", "additionalData": "N/A", "moduleAddress": "N/A", "rack": "N/A", "address": "10.9.0.1",
         "model": "S7-1500", "serial": "SN-DUP-4711", "firmwareVersion": "2.9"}])
    dagrun = run_dag()
    states = task_states(dagrun)
    assert states["sync_source[0]"] == "failed" and states["sync_source[1]"] == "success"
    assert str(getattr(dagrun.state, "value", dagrun.state)) == "failed"
    out, err = capfd.readouterr()
    summary = [line for line in (out + err).splitlines() if "source(s) synced" in line][-1]
    assert "FAILED: 1 source(s): dagtest_refused_1 (ServiceNow refused 1 device(s) of dagtest_refused_1 " \
           f"(MULTI_MATCH 1; e.g. MULTI_MATCH: device ids {victim})" in summary
    written = cis(sn, "dagtest_refused_1")
    assert f"dagtest_refused_1:{victim}" not in written and len(written) >= 6      # the others are synced
    meta = sync_state("dagtest_refused_1/meta")
    assert meta["last_outcome"] == "failed" and "MULTI_MATCH" in meta["last_failure"]["message"]
    assert meta["last_success"]                                                   # the sync itself completed
    again = run_dag()                                                             # still refused: sent again
    assert task_states(again)["sync_source[0]"] == "failed"
    assert "MULTI_MATCH" in sync_state("dagtest_refused_1/meta")["last_failure"]["message"]
