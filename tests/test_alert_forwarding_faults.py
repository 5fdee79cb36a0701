"""defender_alert_forwarding end to end under a fault schedule (issue #10): a sequence of ``dag.test()`` runs
against both simulators in which alerts arrive late (older than the trigger's 10-minute look-back), one
sensor's clock runs two hours behind, a source is down for a run, a destination does not exist for two runs
(no Security Incident Response plugin, so no ``sn_si_incident``) and an appliance is re-imaged (its alert
numbering restarts). At the end every matching alert exists exactly once in each table its rules name, and
every run in which anything failed ended failed.

Connection ids and rule names are this module's own, so the asset state of other tests never leaks in.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from tests.asset_state import read_asset_state, write_asset_state
from tests.test_alert_forwarding_dag import load_dag, run

pytestmark = pytest.mark.airflow_db

CM, SENSOR = "e2e_faults_cm", "e2e_faults_sensor"
ALL, CRIT = "e2e-faults-all", "e2e-faults-crit"
TITLE = "Unauthorized PLC Programming"
HOUR_MS = 3_600_000


def alert_state(key: str, value=None):
    """Read (or, with ``value``, write) a key of the ``defender_iot_alerts`` asset state in Airflow's DB."""
    if value is None:
        return read_asset_state("defender_iot_alerts", key)
    write_asset_state("defender_iot_alerts", key, value)


def cid(conn: str, alert: dict) -> str:
    return f"defender-iot:{conn}:{alert['id']}@{alert['time']}"


def test_every_matching_alert_lands_exactly_once_under_a_fault_schedule(
        airflow_db, defender_sim_factory, servicenow_sim_factory, monkeypatch, tmp_path):
    from defender_servicenow import forwarding
    from defender_servicenow.hooks import _http

    from include.simulators.servicenow_sim import SIM_PASSWORD, SIM_USER

    sn = servicenow_sim_factory(absent_tables=("sn_si_incident",))          # broken destination at first
    monkeypatch.setenv("AIRFLOW_CONN_SERVICENOW_DEFAULT", json.dumps(
        {"conn_type": "servicenow", "host": sn.url, "login": SIM_USER, "password": SIM_PASSWORD}))
    cm = defender_sim_factory(mode="management_console", alerts=0, sensors=3, conn_id=CM)
    sensor = defender_sim_factory(mode="sensor", alerts=0, conn_id=SENSOR)
    monkeypatch.setattr(_http, "_sleep", lambda seconds: None)                # retries without waiting
    monkeypatch.setattr(forwarding, "SERVICENOW_MAX_RETRY_SECONDS", 1.0)
    dag = load_dag(monkeypatch, tmp_path, f"{CM},{SENSOR}", [
        {"name": ALL, "actions": [{"type": "servicenow"}]},
        {"name": CRIT, "minimum_severity": "Critical", "actions": [{"type": "servicenow", "table": "sn_si_incident"}]},
    ])
    dag.get_task("forward_alerts").retries = 0          # a failed run ends failed now instead of retrying
    # The rules have existed for six hours (as if recorded by the watcher back then).
    six_hours_ago = datetime.now(timezone.utc) - timedelta(hours=6)
    for rule in (ALL, CRIT):
        alert_state(f"rule_first_seen:{rule}", six_hours_ago.isoformat())

    raised: dict[str, list[dict]] = {CM: [], SENSOR: []}

    def add(handle, conn, n, severity="Major", **fields):
        new = handle.sim.add_alerts(n, severity=severity, engine="Malware", title=TITLE, **fields)
        raised[conn] += new
        return new

    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    # Run 1: the console's sensors 1 and 2 on time, sensor 3 with its clock two hours behind; the sensor
    # source too. sn_si_incident does not exist: the Critical alerts cannot land there -> the run fails.
    add(cm, CM, 3, sensorId=1)
    add(cm, CM, 1, "Critical", sensorId=2)
    add(cm, CM, 2, sensorId=3, time=now_ms - 2 * HOUR_MS)
    add(sensor, SENSOR, 2)
    add(sensor, SENSOR, 1, "Critical")
    assert run(dag).state == "failed"
    assert len(sn.sim.table("incident")) == 9                         # the other destination is not held up
    assert alert_state(f"status:{CM}")["last_outcome"] == "failed"

    # Run 2: the sensor source is down; the console receives late alerts from a reconnecting sensor 2
    # (raised an hour ago: far older than the trigger's 10-minute look-back), more skewed alerts from sensor 3.
    sensor.sim.set_faults(fail_next={"status": 503, "count": 10**6, "path_prefix": "/api"})
    add(cm, CM, 2, sensorId=2, time=now_ms - HOUR_MS)
    add(cm, CM, 1, "Critical", sensorId=2, time=now_ms - HOUR_MS + 1)
    add(cm, CM, 1, sensorId=3, time=now_ms - 2 * HOUR_MS + 60_000)
    add(sensor, SENSOR, 1)                                             # raised while its source is unreadable
    assert run(dag).state == "failed"
    assert "could not be read" in alert_state(f"status:{SENSOR}")["last_failure"]["message"]

    assert len(sn.sim.table("incident")) == 13                        # late and skewed ones: all there

    # Run 3: the plugin is activated and the sensor is back: everything pending lands.
    sn.sim.add_table("sn_si_incident")
    sensor.sim.set_faults(fail_next=None)
    add(cm, CM, 1, sensorId=1)
    assert run(dag).state == "success"
    assert alert_state(f"status:{SENSOR}")["pending"] == 0

    # Run 4: the sensor is re-imaged: its numbering restarts at 1 under the same connection id.
    before = {a["id"] for a in raised[SENSOR]}
    sensor.sim.alerts.clear()
    reimaged = add(sensor, SENSOR, 2) + add(sensor, SENSOR, 1, "Critical")
    assert {a["id"] for a in reimaged} <= before                       # the ids of earlier alerts again
    assert run(dag).state == "success"

    # Run 5: nothing new: all good, and ServiceNow is not asked anything.
    requests = sn.sim.counters()["requests"]
    assert run(dag).state == "success"
    assert sn.sim.counters()["requests"] == requests

    incidents = Counter(r["correlation_id"] for r in sn.sim.table("incident"))
    security = Counter(r["correlation_id"] for r in sn.sim.table("sn_si_incident"))
    expected_all = {cid(conn, a) for conn, alerts in raised.items() for a in alerts}
    expected_crit = {cid(conn, a) for conn, alerts in raised.items() for a in alerts if a["severity"] == "Critical"}
    assert set(incidents) == expected_all and set(incidents.values()) == {1}
    assert set(security) == expected_crit and set(security.values()) == {1}
    for conn in (CM, SENSOR):
        status = alert_state(f"status:{conn}")
        assert status["last_outcome"] == "ok" and status["pending"] == 0, status
