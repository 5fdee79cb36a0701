"""Defender for IoT in Azure as a source of alerts: dag.test() of defender_alert_forwarding against the Azure
simulator — cloud severities through the rules, exactly once although Resource Graph lags (an alert that
appears late, with an older start time, is still forwarded once), and the closed loop in the cloud (an
incident closed by a person closes its Azure alert; a missing Security Admin role is reported once)."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone

import pytest
from defender_servicenow.azure_models import stable_id

from include.simulators.azure_sim import SIM_READER_ID
from tests.test_alert_forwarding_dag import load_dag, run

pytestmark = pytest.mark.airflow_db


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def add_alert(sim, severity: str, start: datetime, **ext) -> dict:
    """A new alert in Resource Graph (as a sensor reports it to Azure) with this start time."""
    alert = sim.add_alert(severity=severity, startTimeUtc=_iso(start), endTimeUtc=_iso(start))
    alert["properties"]["extendedProperties"].update(ext)
    return alert


def key(conn_id: str, alert: dict) -> str:
    start = datetime.fromisoformat(alert["properties"]["startTimeUtc"].replace("Z", "+00:00"))
    return f"defender-iot:{conn_id}:{stable_id(alert['id'])}@{int(start.timestamp() * 1000)}"


def _past(moment: datetime) -> None:
    """Wait until the clock has passed ``moment`` (an alert stamped later than the run would not be read)."""
    while datetime.now(timezone.utc) <= moment:
        time.sleep(0.01)


def test_cloud_alerts_become_incidents_once_also_when_resource_graph_lags(
        airflow_db, azure_sim_factory, servicenow_conn, monkeypatch, tmp_path):
    conn = "dagtest_azure_fwd"
    az = azure_sim_factory(conn, devices=20, alerts=4, quota=1000)
    dag = load_dag(monkeypatch, tmp_path, conn, [
        {"name": "azure-major", "minimum_severity": "Major",
         "actions": [{"type": "servicenow", "report_type": "incidents"}]}])
    sn = servicenow_conn.sim

    assert run(dag).state == "success"                    # 1. baseline: the history is not replayed
    assert sn.table("incident") == []
    baseline_end = datetime.now(timezone.utc)

    now = datetime.now(timezone.utc)                      # 2. new cloud alerts, one per severity
    new = {s: add_alert(az.sim, s, now, SourceDeviceAddress="10.1.2.3", DestinationDeviceAddress="10.1.2.4")
           for s in ("Informational", "Low", "Medium", "High")}
    _past(now)
    assert run(dag).state == "success"
    incidents = {i["correlation_id"]: i for i in sn.table("incident")}
    assert set(incidents) == {key(conn, new["Medium"]), key(conn, new["High"])}   # Major and Critical only
    high = incidents[key(conn, new["High"])]
    assert high["impact"] == "1"                          # High -> Critical
    assert "10.1.2.3" in high["description"] and "10.1.2.4" in high["description"]
    assert "Check the PLC program." in high["description"]  # remediation steps

    # 3. Resource Graph lags the sensor: an alert that started before the last run shows up only now
    late = add_alert(az.sim, "High", baseline_end + (now - baseline_end) / 2)
    assert run(dag).state == "success"
    counts = Counter(i["correlation_id"] for i in sn.table("incident"))
    assert counts[key(conn, late)] == 1 and set(counts.values()) == {1} and len(counts) == 3

    assert run(dag).state == "success"                    # 4. nothing new: nothing duplicated
    assert len(sn.table("incident")) == 3


def _close_incident(incident: dict) -> None:
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    ServiceNowHook("servicenow_default").update_record("incident", incident["sys_id"], {
        "state": "7", "close_code": "Solved (Permanently)", "close_notes": "Handled by the OT team"})


def test_an_incident_closed_by_a_person_closes_its_azure_alert(airflow_db, azure_sim_factory, servicenow_conn,
                                                               monkeypatch, tmp_path):
    conn = "dagtest_azure_loop"
    az = azure_sim_factory(conn, devices=10, alerts=0, quota=1000)
    monkeypatch.setenv("DEFENDER_HANDLE_ALERTS_ON_CLOSE", "handle")
    dag = load_dag(monkeypatch, tmp_path, conn, [
        {"name": "azure-loop", "actions": [{"type": "servicenow", "report_type": "incidents"}]}])
    assert run(dag).state == "success"                    # baseline
    now = datetime.now(timezone.utc)
    alerts = [add_alert(az.sim, "High", now), add_alert(az.sim, "Medium", now)]
    _past(now)
    assert run(dag).state == "success"
    incidents = {i["correlation_id"]: i for i in servicenow_conn.sim.table("incident")}
    _close_incident(incidents[key(conn, alerts[0])])
    assert run(dag).state == "success"
    assert [a["properties"]["status"] for a in alerts] == ["Closed", "New"]
    patches = az.sim.counters["patch"]
    assert run(dag).state == "success"                    # a rerun closes nothing twice
    assert patches == 1 and az.sim.counters["patch"] == patches


def test_without_security_admin_the_closed_loop_fails_once_and_plainly(
        airflow_db, azure_sim_factory, servicenow_conn, monkeypatch, tmp_path, caplog):
    conn = "dagtest_azure_reader"
    az = azure_sim_factory(conn, client_id=SIM_READER_ID, devices=10, alerts=0, quota=1000)
    monkeypatch.setenv("DEFENDER_HANDLE_ALERTS_ON_CLOSE", "handle")
    dag = load_dag(monkeypatch, tmp_path, conn, [
        {"name": "azure-reader", "actions": [{"type": "servicenow", "report_type": "incidents"}]}])
    dag.get_task("handle_closed_alerts").retries = 0
    assert run(dag).state == "success"
    now = datetime.now(timezone.utc)
    alerts = [add_alert(az.sim, "High", now) for _ in range(3)]
    _past(now)
    assert run(dag).state == "success"
    for incident in servicenow_conn.sim.table("incident"):
        _close_incident(incident)
    before = az.sim.counters["patch"]
    with caplog.at_level("ERROR"):
        assert run(dag).state == "failed"
    assert az.sim.counters["patch"] - before == 1   # one refused PATCH, not one per alert
    assert [a["properties"]["status"] for a in alerts] == ["New"] * 3
    refused = [r.getMessage() for r in caplog.records if "Security Admin" in r.getMessage()]
    assert refused and "403" in refused[0]


def test_a_cloud_incident_names_its_device_s_ci_sensor_site_and_zone(airflow_db, azure_sim_factory,
                                                                      servicenow_conn, monkeypatch, tmp_path):
    """Azure alerts carry no site, zone or device id: the forwarding reads the devices the alert names
    (DeviceResourceIds) and links the incident to the CI the device sync wrote for its source device."""
    from tests.test_device_sync_dag import cis, run_dag

    conn = "dagtest_azure_place"
    az = azure_sim_factory(conn, devices=20, alerts=0, quota=1000)
    monkeypatch.setenv("DEFENDER_SOURCES", conn)
    assert run_dag().state == "success"                   # the device sync writes the CIs
    dag = load_dag(monkeypatch, tmp_path, conn, [
        {"name": "azure-all", "actions": [{"type": "servicenow", "report_type": "incidents"}]}])
    assert run(dag).state == "success"                    # baseline
    now = datetime.now(timezone.utc)
    alert = add_alert(az.sim, "High", now)
    device = next(d for d in az.sim.devices if d["id"] == alert["properties"]["extendedProperties"]["DeviceResourceIds"])
    sensor = device["properties"]["sensor"]
    _past(now)
    assert run(dag).state == "success"
    (incident,) = servicenow_conn.sim.table("incident")
    ci = cis(servicenow_conn.sim, conn)[f"{conn}:{stable_id(device['id'])}"]
    assert incident["cmdb_ci"] == ci["sys_id"]
    text = incident["description"]
    assert f"Sensor: {sensor['name']}" in text and f"Zone: {sensor['zone']}" in text, text
    assert f"Site: {sensor['site']}" in text and f"Source: {ci['name']}" in text, text


def test_a_protocol_rule_says_it_cannot_match_cloud_alerts_and_holds_nothing(
        airflow_db, azure_sim_factory, servicenow_conn, monkeypatch, tmp_path, capfd, caplog):
    """Resource Graph has no device protocols: a rule on protocols cannot match an Azure alert. The run says so,
    reads no inventory for it, and the alerts no rule matches are settled (not held as pending)."""
    from tests.asset_state import read_asset_state

    conn = "dagtest_azure_proto"
    az = azure_sim_factory(conn, devices=20, alerts=0, quota=1000)
    dag = load_dag(monkeypatch, tmp_path, conn, [
        {"name": "modbus-only", "protocols": ["Modbus"],
         "actions": [{"type": "servicenow", "report_type": "incidents"}]},
        {"name": "critical", "minimum_severity": "Critical",
         "actions": [{"type": "servicenow", "report_type": "incidents"}]}])
    assert run(dag).state == "success"                    # baseline
    now = datetime.now(timezone.utc)
    high, low = add_alert(az.sim, "High", now), add_alert(az.sim, "Low", now)
    _past(now)
    arg_before = az.sim.counters["arg"]
    capfd.readouterr()
    caplog.clear()
    assert run(dag).state == "success"
    assert [i["correlation_id"] for i in servicenow_conn.sim.table("incident")] == [key(conn, high)]
    # Said once. Where it lands depends on what ran before in this process: alone, the task's log reaches the
    # terminal only; after another Airflow test, only the log records (pytest's capture, not capfd).
    out, err = capfd.readouterr()
    said = [[line for line in (out + err).splitlines() if "reports no device protocols" in line],
            [r.getMessage() for r in caplog.records if "reports no device protocols" in r.getMessage()]]
    assert max(map(len, said)) == 1 and all("(modbus-only)" in line for lines in said for line in lines), said
    assert az.sim.counters["arg"] - arg_before <= 3       # alerts, their devices, nothing more (no inventory)
    assert read_asset_state("defender_iot_alerts", f"status:{conn}")["pending"] == 0
    assert key(conn, low) not in {i["correlation_id"] for i in servicenow_conn.sim.table("incident")}
