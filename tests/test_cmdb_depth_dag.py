"""defender_device_sync with its CMDB depth tasks (issue 15): sensors and relations run per source in their own
tasks after the devices; a failure there leaves the devices synced and ends the run failed; settings."""

from __future__ import annotations

import pytest

from tests.test_device_sync_dag import load_dag, load_dagbag, run_dag, task_states


@pytest.mark.parametrize(("name", "value"), [("DEFENDER_RELATION_RETENTION_DAYS", "0"),
                                             ("DEFENDER_RELATION_RETENTION_DAYS", "ninety"),
                                             ("DEFENDER_SYNC_RELATIONS", "maybe"),
                                             ("DEFENDER_CVE_MIN_SCORE", "11")])
def test_bad_depth_settings_are_import_errors_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    (message,) = load_dagbag().import_errors.values()
    assert name in message


def test_depth_tasks_follow_the_devices_and_never_stop_them(monkeypatch):
    monkeypatch.delenv("DEFENDER_SOURCES", raising=False)
    dag = load_dag()
    for task_id in ("sync_sensors", "sync_relations", "sync_cves"):
        task = dag.get_task(task_id)
        assert task.upstream_task_ids >= {"sync_source"} and task.trigger_rule == "all_done"
        assert "report" in task.downstream_task_ids


@pytest.mark.airflow_db
def test_a_failed_relations_task_leaves_devices_synced_and_fails_the_run(airflow_db, monkeypatch,
                                                                          defender_sim_factory, servicenow_conn,
                                                                          capfd):
    defender_sim_factory(mode="sensor", devices=20, conn_id="depthdag_sensor")
    monkeypatch.setenv("DEFENDER_SOURCES", "depthdag_sensor")
    sn = servicenow_conn.sim
    for row in sn.table("cmdb_rel_type"):   # an instance without the "Connects to" relationship type
        if row["name"] == "Connects to::Connected by":
            sn.delete(row["sys_id"])
    dagrun = run_dag()
    states = task_states(dagrun)
    assert states["sync_source[0]"] == "success" and states["sync_sensors[0]"] == "success"
    assert states["sync_relations[0]"] == "failed" and states["report"] == "failed"
    assert str(getattr(dagrun.state, "value", dagrun.state)) == "failed"
    assert len([r for r in sn.table("sys_object_source") if r["id"].startswith("depthdag_sensor:")]) >= 18
    out, err = capfd.readouterr()
    summary = next(line for line in (out + err).splitlines() if "source(s) synced" in line and "FAILED" in line)
    assert "FAILED: 1 CMDB depth task(s): relations of depthdag_sensor (" in summary
    assert "No such relationship with name [Connects to::Connected by]" in summary   # what ServiceNow said


@pytest.mark.airflow_db
def test_relations_can_be_turned_off(airflow_db, monkeypatch, defender_sim_factory, servicenow_conn):
    defender = defender_sim_factory(mode="sensor", devices=20, conn_id="depthdag_off")
    monkeypatch.setenv("DEFENDER_SOURCES", "depthdag_off")
    monkeypatch.setenv("DEFENDER_SYNC_RELATIONS", "false")
    dagrun = run_dag()
    assert set(task_states(dagrun).values()) == {"success"}
    type_id = next(r["sys_id"] for r in servicenow_conn.sim.table("cmdb_rel_type")
                   if r["name"] == "Connects to::Connected by")
    assert not [r for r in servicenow_conn.sim.table("cmdb_rel_ci") if r["type"] == type_id]
    assert not defender.sim.counters()["by_route"].get("GET /api/v1/devices/connections")
    assert len(servicenow_conn.sim.table("cmdb_ci_nids")) == 1   # sensors still sync


@pytest.mark.airflow_db
def test_a_failed_cves_task_says_cves_in_its_failure(airflow_db, monkeypatch, defender_sim_factory, servicenow_conn,
                                                     capfd):
    defender = defender_sim_factory(mode="sensor", devices=10, conn_id="depthdag_cves")
    monkeypatch.setenv("DEFENDER_SOURCES", "depthdag_cves")
    defender.sim.set_faults(fail_next={"status": 500, "count": 10**6, "path_prefix": "/api/v1/devices/cves"})
    dagrun = run_dag()
    states = task_states(dagrun)
    assert states["sync_source[0]"] == "success" and states["sync_cves[0]"] == "failed"
    out, err = capfd.readouterr()
    summary = next(line for line in (out + err).splitlines() if "source(s) synced" in line and "FAILED" in line)
    assert "cves of depthdag_cves (CVEs of depthdag_cves failed: " in summary   # not "Cves of"
