"""Defender for IoT in Azure as a source of devices: dag.test() of defender_device_sync against the Azure
simulator and the ServiceNow simulator; the mapping of a cloud device equals its appliance twin's."""

from __future__ import annotations

import pytest
from defender_servicenow.azure_models import parse_azure_device
from defender_servicenow.mapping import load_class_mapping, map_device
from defender_servicenow.models import Device, parse_device

from include.simulators.azure_sim import AzureSimConfig, AzureSimulator
from tests.test_device_sync_dag import cis, ire_requests, last_sync_events, run_dag, task_states

KEYS = ("defender.sensor", "defender.site", "defender.zone", "defender.criticality", "defender.authorized",
        "defender.azure_resource_id")


def _keys(item: dict) -> dict[str, str]:
    return {r["values"]["key"]: r["values"]["value"] for r in item["related"] if r["className"] == "cmdb_key_value"}


def test_a_cloud_device_maps_to_the_class_and_attributes_of_its_appliance_twin():
    """The Azure simulator's device i is the appliance simulator's device i in ARG shape: same class, same
    identifying values (name, MACs, IPs, serial), same hardware; Azure adds criticality and its ARM id."""
    mapping, sim = load_class_mapping(), AzureSimulator(AzureSimConfig(devices=110))
    compared = 0
    for i in range(1, 111):
        cloud = parse_azure_device(sim.devices[i - 1], source="az", source_name="Azure")
        twin = parse_device(sim.inventory.device(i), source="az", appliance_name="Azure", sensor_name="s")
        assert isinstance(cloud, Device) and isinstance(twin, Device), (i, cloud, twin)
        if mapping.class_for(twin.type, twin.operating_system) == "skip":
            continue
        a, b = map_device(cloud, source_name="x", mapping=mapping), map_device(twin, source_name="x", mapping=mapping)
        assert a["className"] == b["className"], (i, cloud.type, twin.type)
        for field in ("name", "manufacturer", "model_number", "serial_number", "firmware_version"):
            assert a["values"].get(field) == b["values"].get(field), (i, field)
        assert sorted(map(str, a["lookup"])) == sorted(map(str, b["lookup"])), i
        keys = _keys(a)
        assert keys["defender.criticality"] in ("High", "Normal")
        assert keys["defender.azure_resource_id"] == cloud.resource_id
        assert keys["defender.authorized"] == _keys(b)["defender.authorized"]
        compared += 1
    assert compared > 100


def test_the_device_s_own_hardware_model_and_serial_win_over_its_modules():
    device = Device(source="az", appliance_name="Azure", id=1, name="PLC-1", type="PLC", hardware_model="S7-1500",
                    serial_number="HW-42", mac_addresses=["00:1b:1b:00:00:01"])
    values = map_device(device, source_name="x", mapping=load_class_mapping())["values"]
    assert (values["model_number"], values["serial_number"]) == ("S7-1500", "HW-42")


@pytest.mark.airflow_db
def test_device_sync_dag_with_an_azure_source(airflow_db, monkeypatch, azure_sim_factory, servicenow_conn, capfd):
    az = azure_sim_factory("dagtest_azure_sync", devices=80, alerts=0, quota=1000)
    monkeypatch.setenv("DEFENDER_SOURCES", "dagtest_azure_sync")
    monkeypatch.setenv("DEFENDER_RETIRE_AFTER_MISSING_RUNS", "2")
    sn, mapping = servicenow_conn.sim, load_class_mapping()

    first = run_dag()                                      # 1. the first sync creates one CI per device
    assert task_states(first) == {"select_sources": "success", "sync_source[0]": "success", "report": "success",
                                  **{f"{t}[0]": "success" for t in ("sync_sensors", "sync_relations", "sync_cves")}}
    captured = capfd.readouterr()   # the report reads the mapped results without an ERROR line for a fine run
    assert "XCom not found" not in captured.out + captured.err
    (event,) = last_sync_events("dagtest_azure_sync")
    active = [d for d in az.sim.devices if d["properties"]["deviceStatus"] == "Active"]
    assert event["seen"] == len(active) == 78 and event["failed"] == 0     # devices 37 and 74 are Removed/Deleted
    written = cis(sn, "dagtest_azure_sync")
    assert len(written) == event["inserted"] + event["updated"] == event["seen"] - event["skipped"]
    assert len({ci["sys_id"] for ci in written.values()}) >= len(written) - 2   # same-named, unidentifiable
    by_key = {f"dagtest_azure_sync:{d.id}": d for d in
              (parse_azure_device(r, source="dagtest_azure_sync", source_name="x") for r in active)}
    for key, ci in written.items():                        # the class the appliance's type would give
        assert ci["sys_class_name"] == mapping.class_for(by_key[key].type, by_key[key].operating_system)
    plc = next(k for k, d in by_key.items() if d.type == "PLC" and k in written)
    values = {r["key"]: r["value"] for r in sn.table("cmdb_key_value")
              if r.get("configuration_item") == written[plc]["sys_id"]}
    assert set(KEYS) <= set(values) and values["defender.criticality"] == "High"
    assert values["defender.sensor"] == by_key[plc].sensor_name

    writes = ire_requests(sn)                              # 2. a resync with nothing changed writes nothing
    second = run_dag()
    assert task_states(second)["report"] == "success" and ire_requests(sn) == writes
    assert last_sync_events("dagtest_azure_sync")[-1]["unchanged"] == len(written)

    removed_key, gone_key = sorted(written)[:2]            # 3. Removed -> retired at once; gone -> after 2 runs
    index = {f"dagtest_azure_sync:{d.id}": n for n, d in enumerate(
        (parse_azure_device(r, source="dagtest_azure_sync", source_name="x") for r in az.sim.devices), 1)}
    az.sim.update_device(index[removed_key], deviceStatus="Removed")
    az.sim.drop_device(index[gone_key])
    run_dag()
    after = cis(sn, "dagtest_azure_sync")
    assert after[removed_key]["install_status"] == "7" and after[gone_key].get("install_status") != "7"
    assert last_sync_events("dagtest_azure_sync")[-1]["retired"] == 1
    run_dag()
    after = cis(sn, "dagtest_azure_sync")
    assert (after[gone_key]["install_status"], after[gone_key]["operational_status"]) == ("7", "6")
    assert last_sync_events("dagtest_azure_sync")[-1]["retired"] == 1
    assert len(after) == len(written)                      # retired, never deleted
