"""The source interface: source_for() picks the implementation by conn_type; the appliance adapter is a
transparent wrapper over DefenderIoTHook."""

from __future__ import annotations

import json

import pytest
from defender_servicenow.exceptions import ConfigError
from defender_servicenow.hooks.defender import DefenderIoTHook
from defender_servicenow.models import Alert
from defender_servicenow.sources import ApplianceSource, AzureSource, Source, source_for


def test_source_for_picks_by_conn_type(defender_sim_factory, azure_sim_factory, monkeypatch):
    appliance = defender_sim_factory(mode="management_console", conn_id="cm")
    azure = azure_sim_factory("az")
    cm, az = source_for(appliance.conn_id), source_for(azure.conn_id)
    assert isinstance(cm, ApplianceSource) and isinstance(az, AzureSource)
    assert isinstance(cm, Source) and isinstance(az, Source)
    assert (cm.kind, az.kind) == ("management_console", "azure")
    assert cm.supports_deletions and az.supports_deletions and az.supports_alert_state
    monkeypatch.setenv("AIRFLOW_CONN_OTHER", json.dumps({"conn_type": "http", "host": "x"}))
    with pytest.raises(ConfigError, match="defender_iot_azure"):
        source_for("other")


@pytest.mark.parametrize("mode", ["sensor", "management_console"])
def test_appliance_adapter_yields_what_the_hook_yields(defender_sim_factory, mode):
    sim = defender_sim_factory(mode=mode, devices=120, conn_id=f"src_{mode}")
    source, hook = source_for(sim.conn_id), DefenderIoTHook(sim.conn_id)
    assert list(source.iter_devices()) == list(hook.iter_devices())
    assert source.get_alerts() == hook.get_alerts()
    assert source.name == hook.appliance_name and source.kind == mode
    if mode == "sensor":
        assert source.deleted_device_ids(__import__("datetime").datetime(2020, 1, 1)) == []
        assert source.get_sensors() == []


def test_azure_source_closes_the_alert(azure_sim_factory):
    sim = azure_sim_factory("az_close", alerts=3)
    source = source_for(sim.conn_id)
    alert = next(a for a in source.get_alerts() if isinstance(a, Alert))
    assert source.set_alert_state(alert) == "Closed"
    assert sim.sim.alert_by_path[alert.resource_id.lower()]["properties"]["status"] == "Closed"
