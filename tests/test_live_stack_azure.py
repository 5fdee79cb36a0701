"""End to end with an Azure source: real Airflow processes (scripts/stack.py) with the Azure simulator as the
only Defender source. An alert raised in Azure becomes exactly one incident without a manual trigger (the
triggerer's Resource Graph poll wakes the forwarding DAG). One short test: the stack takes about a minute."""

from __future__ import annotations

import time

import pytest
from defender_servicenow.azure_models import stable_id

from scripts.stack import AZURE, SourceSpec, Stack, StackOptions, wait_until

pytestmark = pytest.mark.live

CONN_ID = "defender_iot_azure_live"


def test_an_azure_alert_becomes_an_incident_without_a_manual_trigger(tmp_path_factory):
    home = tmp_path_factory.mktemp("live_azure") / "airflow_home"
    stack = Stack(StackOptions(home=home, fast=True, alert_poll_seconds=2,
                               sources=(SourceSpec(CONN_ID, AZURE, devices=20, name="Defender for IoT (Azure)"),)))
    try:
        stack.start()
        stack.wait_for_dags()
        before = {r["dag_run_id"] for r in stack.runs("defender_alert_forwarding")}
        time.sleep(8)   # the triggerer has started watching (history is not forwarded)
        (alert,) = stack.add_azure_alerts(CONN_ID, 1, severity="High")
        key = f"{CONN_ID}:{stable_id(alert['id'])}"
        wait_until(lambda: key in stack.incidents_by_alert(), 240, "the Azure alert to become an incident")
        time.sleep(6)   # a few more polls: still one incident
        wait_until(lambda: all(r["state"] in ("success", "failed") for r in stack.runs("defender_alert_forwarding")),
                   180, "alert forwarding runs to finish")
        incidents = stack.incidents_by_alert()
        assert len(incidents[key]) == 1 and incidents[key][0]["impact"] == "1"   # High -> Critical
        new_runs = [r for r in stack.runs("defender_alert_forwarding") if r["dag_run_id"] not in before]
        assert new_runs and {r["run_type"] for r in new_runs} == {"asset_triggered"}
        assert all(r["state"] == "success" for r in new_runs)
    finally:
        stack.stop()
