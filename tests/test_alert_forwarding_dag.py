"""defender_alert_forwarding end to end with dag.test(): both simulators, both report types, both appliance
kinds, duplicate protection (reruns, overlapping replays), a ServiceNow outage and its recovery.

Each test uses its own Defender connection id, so the durable watermarks (asset state store, kept in the
session's metadata DB) of one test never leak into another.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DAG_FILE = ROOT / "dags" / "defender_alert_forwarding.py"
pytestmark = pytest.mark.airflow_db


def load_dag(monkeypatch, tmp_path, source: str, rules: list[dict]):
    """Parse the DAG file fresh with this test's settings (they are read at parse time)."""
    from airflow.dag_processing.dagbag import DagBag

    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"rules": rules}))
    monkeypatch.setenv("DEFENDER_SOURCES", source)
    monkeypatch.setenv("DEFENDER_FORWARDING_RULES_FILE", str(path))
    monkeypatch.setenv("DEFENDER_ALERT_POLL_SECONDS", "5")
    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag.dags["defender_alert_forwarding"]


def run(dag, **conf):
    return dag.test(run_conf=conf or None)


def keys(records, field):
    return Counter(r[field] for r in records)


def test_bad_rules_file_is_an_import_error_naming_rule_and_field(monkeypatch, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"rules": [{"name": "bad-one", "minimum_severity": "Severe",
                                               "actions": [{"type": "servicenow"}]}]}))
    monkeypatch.setenv("DEFENDER_FORWARDING_RULES_FILE", str(path))
    bag = DagBag(dag_folder=str(DAG_FILE))
    (message,) = bag.import_errors.values()
    assert "bad-one" in message and "minimum_severity" in message


def test_sensor_incidents_exactly_once_with_overlapping_replay(airflow_db, defender_sim_factory, servicenow_conn,
                                                                monkeypatch, tmp_path):
    d = defender_sim_factory(mode="sensor", alerts=6, conn_id="defender_dag_sensor")
    dag = load_dag(monkeypatch, tmp_path, "defender_dag_sensor", [
        {"name": "dag-sensor-all", "report_system_notifications": True,
         "actions": [{"type": "servicenow", "report_type": "incidents"}]}])
    history = d.sim.alerts[:]

    # 1st run: no watermark yet -> starts from now; history is not replayed.
    assert run(dag).state == "success"
    assert servicenow_conn.sim.table("incident") == []

    new = d.sim.add_alerts(3, severity="Critical", engine="Malware", title="Suspicion of Malicious Activity")
    assert run(dag).state == "success"
    incidents = servicenow_conn.sim.table("incident")
    assert keys(incidents, "correlation_id") == Counter(f"defender-iot:defender_dag_sensor:{a['id']}@{a['time']}" for a in new)
    assert all(i["correlation_display"] == "Microsoft Defender for IoT" and i["impact"] == "1" for i in incidents)

    # The same run again: nothing new, nothing duplicated.
    assert run(dag).state == "success"
    assert len(servicenow_conn.sim.table("incident")) == 3

    # A replay over everything (overlapping what was already forwarded) adds only the history, once.
    since = datetime.fromtimestamp(min(a["time"] for a in history) / 1000, timezone.utc) - timedelta(seconds=1)
    assert run(dag, since=since.isoformat(), until=(datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat(),
               sources=["defender_dag_sensor"]).state == "success"
    counts = keys(servicenow_conn.sim.table("incident"), "correlation_id")
    assert set(counts.values()) == {1}
    assert set(counts) == {f"defender-iot:defender_dag_sensor:{a['id']}@{a['time']}" for a in history + new}


def test_console_application_table_outage_then_recovery(airflow_db, defender_sim_factory, servicenow_conn,
                                                        monkeypatch, tmp_path):
    from defender_servicenow import forwarding

    d = defender_sim_factory(mode="management_console", alerts=3, conn_id="defender_dag_cm")
    dag = load_dag(monkeypatch, tmp_path, "defender_dag_cm", [
        {"name": "dag-cm-app", "minimum_severity": "Minor",
         "actions": [{"type": "servicenow", "report_type": "defender_for_iot_application"}]}])
    dag.get_task("forward_alerts").retries = 0  # let the run fail instead of waiting for a retry
    monkeypatch.setattr(forwarding, "SERVICENOW_MAX_RETRY_SECONDS", 1.0)
    sim = servicenow_conn.sim

    assert run(dag).state == "success"  # baseline: starts from now
    first = d.sim.add_alerts(4, severity="Major", engine="Anomaly", title="Address Scan Detected")
    d.sim.add_alerts(1, severity="Warning", engine="Anomaly", title="Address Scan Detected")  # below Minor

    sim.set_faults(fail_next={"status": 503, "count": 10**6, "path_prefix": "/api/now"})
    assert run(dag).state == "failed"  # ServiceNow down: the task fails, nothing is lost
    assert sim.table("u_defender_iot_alert") == []

    sim.faults.fail_next.clear()
    later = d.sim.add_alerts(1, severity="Critical", engine="Malware", title="Suspicion of Malicious Activity")
    assert run(dag).state == "success"
    rows = sim.table("u_defender_iot_alert")
    assert keys(rows, "u_alert_key") == Counter(f"defender_dag_cm:{a['id']}@{a['time']}" for a in first + later)
    row = next(r for r in rows if r["u_alert_key"] == f"defender_dag_cm:{later[0]['id']}@{later[0]['time']}")
    assert row["u_severity"] == "Critical" and row["u_site_name"] == later[0]["siteName"]
    assert sim.table("incident") == []

    assert run(dag, dry_run=True).state == "success"  # nothing new: a dry run writes nothing either
    assert len(sim.table("u_defender_iot_alert")) == 5


@pytest.mark.parametrize("params, error", [
    ({"since": "yesterday"}, "param since='yesterday' is not an ISO-8601"),
    ({"until": "2025-03-01T00:00:00Z"}, "until needs since"),
    ({"since": "2025-03-02T00:00:00Z", "until": "2025-03-01T00:00:00Z"}, "must be before until"),
    ({"since": "P1D"}, "must be a date-time"),
    ({"sources": ["not_configured"]}, "not_configured not in DEFENDER_SOURCES"),
])
def test_trigger_params_are_checked(monkeypatch, tmp_path, params, error):
    from defender_servicenow.exceptions import ConfigError

    dag = load_dag(monkeypatch, tmp_path, "defender_iot_default", [{"name": "p", "actions": [{"type": "servicenow"}]}])
    parse = dag.get_task("forward_alerts").python_callable.__globals__["_parse_params"]
    with pytest.raises(ConfigError, match=error):
        parse(params)
    ok = parse({"since": "2025-03-01T12:00:00+02:00", "dry_run": True})
    assert ok["since"].isoformat() == "2025-03-01T10:00:00+00:00" and ok["until"] is None
    assert ok["sources"] == ["defender_iot_default"] and ok["dry_run"] is True


def test_closed_loop_handles_alerts_of_closed_incidents(airflow_db, defender_sim_factory, servicenow_conn,
                                                        monkeypatch, tmp_path):
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    d = defender_sim_factory(mode="management_console", alerts=0, conn_id="defender_dag_loop")
    monkeypatch.setenv("DEFENDER_HANDLE_ALERTS_ON_CLOSE", "handle")
    dag = load_dag(monkeypatch, tmp_path, "defender_dag_loop", [
        {"name": "dag-loop", "actions": [{"type": "servicenow", "report_type": "incidents"}]}])
    assert "handle_closed_alerts" in dag.task_ids
    assert run(dag).state == "success"                      # baseline: watermarks start now
    alerts = d.sim.add_alerts(2, severity="Major", engine="Anomaly", title="Address Scan Detected")
    assert run(dag).state == "success"
    incident = next(i for i in servicenow_conn.sim.table("incident")
                    if i["correlation_id"].endswith(f":{alerts[0]['id']}@{alerts[0]['time']}"))
    ServiceNowHook("servicenow_default").update_record("incident", incident["sys_id"], {
        "state": "7", "close_code": "Solved (Permanently)", "close_notes": "done"})
    assert run(dag).state == "success"
    assert [d.sim.alert_by_uuid(a["uuid"])["state"] for a in alerts] == ["handled", "unhandled"]


def test_a_failed_source_fails_the_run_with_the_closed_loop_on(airflow_db, defender_sim_factory, servicenow_conn,
                                                               monkeypatch, tmp_path):
    """The closed loop is a leaf beside the forwarding, not its only downstream leaf: a source whose forwarding
    failed makes the run failed even though the closed loop succeeded (a run's state comes from its leaves)."""
    defender_sim_factory(mode="management_console", alerts=0, conn_id="defender_dag_loop_ok")
    monkeypatch.setenv("AIRFLOW_CONN_DEFENDER_DAG_LOOP_DOWN", json.dumps({
        "conn_type": "defender_iot", "host": "http://127.0.0.1:9", "password": "b" * 32,
        "extra": {"appliance": "management_console"}}))
    monkeypatch.setenv("DEFENDER_HANDLE_ALERTS_ON_CLOSE", "handle")
    dag = load_dag(monkeypatch, tmp_path, "defender_dag_loop_ok,defender_dag_loop_down", [
        {"name": "dag-loop-down", "actions": [{"type": "servicenow", "report_type": "incidents"}]}])
    for task in dag.tasks:
        task.retries = 0
    dagrun = run(dag)
    states = {(ti.task_id, ti.map_index): str(getattr(ti.state, "value", ti.state))
              for ti in dagrun.get_task_instances()}
    assert states[("handle_closed_alerts", -1)] == "success"
    assert states[("forward_alerts", 1)] == "failed" and states[("forward_alerts", 0)] == "success"
    assert dagrun.state == "failed"
