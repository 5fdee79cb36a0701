"""CMDB depth (issue 15): sensors as cmdb_ci_nids CIs related to their devices, device connections as
cmdb_rel_ci relations -- pure planning first, then the engines against both simulators through the hooks."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from defender_servicenow.cmdb_depth.ire import CONNECTS, DETECTS, End, Link, batches, payload
from defender_servicenow.cmdb_depth.models import (
    Sensor,
    host_of,
    parse_azure_sensor,
    parse_sensor_connection,
    parse_v3_connection,
    parse_v3_sensor,
)
from defender_servicenow.cmdb_depth.relations import RelationSync, plan_relations
from defender_servicenow.cmdb_depth.sensors import SensorSync, map_sensor
from defender_servicenow.cmdb_depth.state import device_cis
from defender_servicenow.cmdb_depth.summary import DepthIncompleteError
from defender_servicenow.mapping import load_class_mapping
from defender_servicenow.models import InvalidRecord
from defender_servicenow.sources import ApplianceSource
from defender_servicenow.sync import DeviceSync, MemoryStateStore

SOURCE_NAME = "MicrosoftDefenderIoT"


# --------------------------------------------------------------------------- parsing (pure)

def test_sensor_records_of_each_source_kind_are_parsed():
    v3 = parse_v3_sensor({"u_id": 1, "u_name": "Microsoft Defender for IoT", "u_interface_address": "https://10.1.0.9",
                          "u_connection_state": "SYNCED", "u_version": "22.2.5.7-r-2121448",
                          "u_is_in_learning_mode": False, "u_zone_id": 1}, "cm")
    assert (v3.key, v3.ip, v3.version, v3.status, v3.connected) == ("1", "10.1.0.9", "22.2.5.7-r-2121448",
                                                                   "SYNCED", True)
    azure = parse_azure_sensor({"name": "Sensor-A", "properties": {"ip": "10.2.0.4", "mac": "00-0F-38-67-4F-1C",
                                                                  "sensorStatus": "Disconnected", "zone": "Line 1",
                                                                  "sensorVersion": "25.2.1"}}, "az")
    assert (azure.key, azure.mac, azure.zone, azure.connected) == ("sensor-a", "00:0f:38:67:4f:1c", "Line 1", False)
    assert isinstance(parse_v3_sensor({"u_name": "no id"}, "cm"), InvalidRecord)
    assert host_of("https://sensor.plant.example:443/") == (None, "sensor.plant.example")


def test_connection_records_are_parsed_and_bad_ones_kept_as_invalid():
    c = parse_sensor_connection({"firstDeviceId": 171, "secondDeviceId": 22, "lastSeen": 1511281457933,
                                 "discovered": 1511872830000, "ports": [502],
                                 "protocols": [{"name": "modbus", "commands": ["Read Coils"]}]}, "s")
    assert (c.first, c.second, c.protocols, c.ports) == (171, 22, ("modbus",), (502,))
    assert c.last_seen.year == 2017
    v3 = parse_v3_connection({"u_src_device_id": 103, "u_dest_device_id": 95, "u_connection_type": "Two Way"}, "cm")
    assert (v3.first, v3.second, v3.last_seen, v3.kind) == (103, 95, None, "Two Way")
    for bad in ({"firstDeviceId": 3, "secondDeviceId": 3}, {"firstDeviceId": "3"}, None):
        assert isinstance(parse_sensor_connection(bad, "s"), InvalidRecord)


def test_sensor_item_is_a_nids_ci_identified_by_its_source_key():
    item = map_sensor(Sensor("1", "sensor-1", ip="10.1.0.9", mac="00:0f:38:67:4f:1c", version="22.2",
                             status="DISCONNECTED", zone="Zone 1", site="Plant"), source="cm", source_name="X")
    assert item["className"] == "cmdb_ci_nids"
    assert item["sys_object_source_info"] == {"source_name": "X", "source_native_key": "sensor:cm:1"}
    assert item["values"]["firmware_version"] == "22.2" and item["values"]["zone"] == "Zone 1"
    assert item["values"]["operational_status"] == "2"   # disconnected -> non-operational
    assert {x["className"] for x in item["lookup"]} == {"cmdb_ci_network_adapter", "cmdb_ci_ip_address"}
    assert {"key": "defender.site", "value": "Plant"} in [r["values"] for r in item["related"]]


# --------------------------------------------------------------------------- relation planning (pure)

DEVICES = {1: ("a" * 32, "cmdb_ci_ot_plc"), 2: ("b" * 32, "cmdb_ci_ot_hmi"), 3: ("c" * 32, "cmdb_ci_ot")}


def test_plan_creates_new_keeps_known_and_skips_unknown_ends():
    listed = {"1>2": (1, 2, 100), "2>3": (2, 3, 100), "3>9": (3, 9, 100)}
    recorded = {"2>3": ["b" * 32, "c" * 32, 99, 1]}
    plan = plan_relations(listed, recorded, DEVICES, now_day=100, retention_days=90)
    assert [c[0] for c in plan.create] == ["1>2"]
    assert plan.unchanged == 1 and plan.unknown_end == 1 and plan.touch == {"2>3": 100} and not plan.remove


def test_plan_removes_connections_not_seen_for_the_retention_period():
    recorded = {"1>2": ["a" * 32, "b" * 32, 5, 1], "2>3": ["b" * 32, "c" * 32, 50, 1]}
    plan = plan_relations({"2>3": (2, 3, 5)}, recorded, DEVICES, now_day=100, retention_days=90)
    assert sorted(k for k, _ in plan.remove) == ["1>2", "2>3"] and plan.stale == 1 and not plan.create
    kept = plan_relations({}, recorded, DEVICES, now_day=100, retention_days=60)
    assert [k for k, _ in kept.remove] == ["1>2"]   # day 50 is within 60 days of day 100, day 5 is not


def test_plan_recreates_a_relation_whose_ci_was_replaced():
    recorded = {"1>2": ["0" * 32, "b" * 32, 100, 1]}
    plan = plan_relations({"1>2": (1, 2, 100)}, recorded, DEVICES, now_day=100, retention_days=90)
    assert [k for k, _ in plan.remove] == ["1>2"] and [c[0] for c in plan.create] == ["1>2"]


def test_batches_share_ends_and_never_exceed_the_item_limit():
    ends = [End(f"s:{i}", "cmdb_ci_ot") for i in range(30)]
    links = [Link(f"{i}>{j}", ends[i], ends[j], CONNECTS) for i in range(30) for j in range(i + 1, 30)]
    groups = list(batches(links, max_items=10))
    assert sum(map(len, groups)) == len(links)
    for group in groups:
        items, relations = payload(group, SOURCE_NAME)
        assert len(items) <= 10 and len(relations) == len(group)
        assert len({i["sys_object_source_info"]["source_native_key"] for i in items}) == len(items)
        assert all(i["values"] == {} for i in items)   # the ends are identified, never changed


# --------------------------------------------------------------------------- against the simulators

def engines(source_id: str, store, **kw):
    from defender_servicenow.hooks.defender import DefenderIoTHook
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    servicenow = ServiceNowHook("servicenow_default", max_retry_time=2)
    source = ApplianceSource(DefenderIoTHook(source_id))
    common = dict(source=source, servicenow=servicenow, state_store=store, source_name=SOURCE_NAME,
                  data_source="Other Automated")
    devices = DeviceSync(source=source_id, defender=source, servicenow=servicenow, state_store=store,
                         mapping=load_class_mapping(), source_name=SOURCE_NAME, data_source="Other Automated",
                         batch_size=50, parallel=2)
    return devices, SensorSync(**common, **kw.pop("sensor_kw", {})), RelationSync(**common, **kw)


def rels(sn, type_name: str) -> list[dict]:
    type_id = next(r["sys_id"] for r in sn.table("cmdb_rel_type") if r["name"] == type_name)
    return [r for r in sn.table("cmdb_rel_ci") if r["type"] == type_id]


def writes(sn) -> int:
    """Requests that can change the instance: IRE commits and Table/Batch API writes."""
    by_route = sn.counters().get("by_route", {})
    return sum(n for route, n in by_route.items()
               if route.startswith(("POST", "PATCH", "PUT", "DELETE")) and "oauth" not in route)


def test_sensor_source_gets_a_nids_ci_device_links_and_connection_relations(defender_sim_factory,
                                                                            servicenow_conn):
    defender = defender_sim_factory(mode="sensor", devices=60, conn_id="depth_sensor_1", name="sensor-north")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    devices, sensors, relations = engines("depth_sensor_1", store)
    devices.run()
    s = sensors.run()
    assert s.counts["inserted"] == 1 and s.failed == 0
    nids = [r for r in sn.table("cmdb_ci_nids")]
    assert len(nids) == 1 and nids[0]["name"] == "sensor-north" and nids[0]["install_status"] == "1"
    own = device_cis(store, "depth_sensor_1")
    detects = rels(sn, DETECTS)
    assert len(detects) == len(own) == s.counts["links_created"]
    assert {r["parent"] for r in detects} == {nids[0]["sys_id"]}
    assert {r["child"] for r in detects} == {sys_id for sys_id, _ in own.values()}
    r = relations.run()
    connects = rels(sn, CONNECTS)
    assert r.counts["created"] == len(connects) > 0 and r.failed == 0
    assert {x["parent"] for x in connects} | {x["child"] for x in connects} <= {s for s, _ in own.values()}
    expected = {(a, b) for a in own for b in defender.sim.inventory.neighbours(a) if a < b and b in own}
    by_sys = {sys_id: i for i, (sys_id, _) in own.items()}
    assert {(by_sys[x["parent"]], by_sys[x["child"]]) for x in connects} == expected
    # IRE relations cost far less than one request per relation
    ire = sum(n for route, n in sn.counters()["by_route"].items() if "identifyreconcile" in route)
    assert ire < len(connects) / 3
    # a resync with no change writes nothing at all
    before = writes(sn)
    assert sensors.run().counts.get("unchanged") == 1 and relations.run().counts["unchanged"] == len(connects)
    assert writes(sn) == before and len(rels(sn, CONNECTS)) == len(connects)


def test_management_console_sensors_become_cis_and_devices_join_their_own_sensor(defender_sim_factory,
                                                                                servicenow_conn):
    defender = defender_sim_factory(mode="management_console", devices=80, sensors=2, conn_id="depth_cm_1")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    devices, sensors, relations = engines("depth_cm_1", store)
    devices.run()
    assert sensors.run().counts["inserted"] == 2
    nids = {r["correlation_id"]: r for r in sn.table("cmdb_ci_nids")}
    assert set(nids) == {"sensor:depth_cm_1:1", "sensor:depth_cm_1:2"}
    assert all(r["zone"] and r["firmware_version"] for r in nids.values())
    own = device_cis(store, "depth_cm_1")
    sensor_of = {nids[f"sensor:depth_cm_1:{defender.sim.device(i)['sensorId']}"]["sys_id"]: set() for i in own}
    for i, (sys_id, _) in own.items():
        sensor_of[nids[f"sensor:depth_cm_1:{defender.sim.device(i)['sensorId']}"]["sys_id"]].add(sys_id)
    found: dict[str, set] = {}
    for r in rels(sn, DETECTS):
        found.setdefault(r["parent"], set()).add(r["child"])
    assert found == sensor_of
    r = relations.run()
    assert r.counts["created"] == len(rels(sn, CONNECTS)) > 0 and r.failed == 0


def test_connections_never_join_cis_of_another_source(defender_sim_factory, servicenow_conn):
    defender_sim_factory(mode="sensor", devices=30, seed=1, conn_id="depth_a")
    defender_sim_factory(mode="sensor", devices=30, seed=2, conn_id="depth_b")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    a_devices, _, _ = engines("depth_a", store)
    a_devices.run()
    b_devices, _, b_relations = engines("depth_b", store)
    b_devices.run()
    # source b's inventory lists connections to device ids that only source a has synced: drop b's CIs of
    # some devices from b's state to make those ids unknown to b, while a still has CIs with those ids
    from defender_servicenow.sync import SourceState

    b_state = SourceState(store, "depth_b")
    for device_id in ("1", "2", "3"):
        b_state.remove(device_id)
    b_state.save()
    r = b_relations.run()
    assert r.counts["unknown_end"] > 0
    a_cis = {sys_id for sys_id, _ in device_cis(store, "depth_a").values()}
    b_cis = {sys_id for sys_id, _ in device_cis(store, "depth_b").values()}
    assert a_cis.isdisjoint(b_cis)
    for rel in rels(sn, CONNECTS):
        assert rel["parent"] in b_cis and rel["child"] in b_cis


def test_relations_not_seen_for_the_retention_period_are_removed_and_others_left(defender_sim_factory,
                                                                               servicenow_conn, monkeypatch):
    defender_sim_factory(mode="sensor", devices=30, conn_id="depth_ret")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    devices, _, relations = engines("depth_ret", store, retention_days=90)
    devices.run()
    relations.run()
    created = len(rels(sn, CONNECTS))
    # someone else's relation between two of our CIs: never removed by us
    own = list(device_cis(store, "depth_ret").values())
    type_id = next(r["sys_id"] for r in sn.table("cmdb_rel_type") if r["name"] == CONNECTS)
    sn.insert("cmdb_rel_ci", {"parent": own[0][0], "child": own[-1][0], "type": type_id})
    # 100 days later the sensor no longer lists any connection (its connections' lastSeen are far older)
    import defender_servicenow.cmdb_depth.relations as module

    monkeypatch.setattr(module, "today", lambda: int(datetime.now(timezone.utc).timestamp() // 86400) + 400)
    r = relations.run()
    assert r.counts["removed"] == created and r.counts["stale"] > 0
    assert len(rels(sn, CONNECTS)) == 1


def test_a_relation_the_ire_refuses_fails_the_task_after_recording_the_rest(defender_sim_factory,
                                                                          servicenow_conn):
    defender_sim_factory(mode="sensor", devices=30, conn_id="depth_bad")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    devices, _, relations = engines("depth_bad", store)
    devices.run()
    # an instance without the "Connects to" relationship type
    for row in sn.table("cmdb_rel_type"):
        if row["name"] == CONNECTS:
            sn.delete(row["sys_id"])
    with pytest.raises(DepthIncompleteError, match="could not be written"):
        relations.run()
    assert not sn.table("cmdb_rel_ci")


def test_dry_run_writes_nothing(defender_sim_factory, servicenow_conn):
    defender_sim_factory(mode="sensor", devices=30, conn_id="depth_dry")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    devices, _, _ = engines("depth_dry", store)
    devices.run()
    before, keys = writes(sn), set(store.data)
    _, sensors, relations = engines("depth_dry", store, dry_run=True, sensor_kw={"dry_run": True})
    assert sensors.run().dry_run and relations.run().counts["created"] > 0
    assert not sn.table("cmdb_ci_nids") and not sn.table("cmdb_rel_ci") and set(store.data) == keys
    assert writes(sn) > before   # only the IRE's /query endpoint, which commits nothing


@pytest.mark.parametrize("mode", ["retire", "delete"])
def test_cleanup_covers_sensor_cis_and_the_relations(defender_sim_factory, servicenow_conn, mode):
    from defender_servicenow.cleanup import run_cleanup
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    defender_sim_factory(mode="sensor", devices=20, conn_id="depth_clean")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    for engine in engines("depth_clean", store):
        engine.run()
    other = sn.insert("cmdb_ci_ot", {"name": "someone else's CI"})
    type_id = next(r["sys_id"] for r in sn.table("cmdb_rel_type") if r["name"] == CONNECTS)
    foreign = sn.insert("cmdb_rel_ci", {"parent": other["sys_id"], "child": other["sys_id"], "type": type_id})
    ours = len(sn.table("cmdb_rel_ci")) - 1
    assert ours > 20 and len(sn.table("cmdb_ci_nids")) == 1
    hook = ServiceNowHook("servicenow_default", max_retry_time=2)
    run_cleanup(hook, {"scope": "devices", "mode": mode, "sources": ["depth_clean"], "dry_run": False,
                       "confirm": hook.instance_host}, source_name=SOURCE_NAME)
    nids = sn.table("cmdb_ci_nids")
    if mode == "retire":   # the sensor CI is retired like the devices; relations stay as history
        assert [(r["install_status"], r["operational_status"]) for r in nids] == [("7", "6")]
        assert len(sn.table("cmdb_rel_ci")) == ours + 1
    else:                  # everything we wrote goes, relations first; someone else's relation stays
        assert nids == [] and [r["sys_id"] for r in sn.table("cmdb_rel_ci")] == [foreign["sys_id"]]
    assert sn.get(other["sys_id"])["name"] == "someone else's CI"


def test_azure_sensors_become_cis_and_devices_join_the_sensor_named_on_them(azure_sim_factory, servicenow_conn):
    from defender_servicenow.hooks.azure import DefenderIoTAzureHook
    from defender_servicenow.hooks.servicenow import ServiceNowHook
    from defender_servicenow.sources import AzureSource

    azure_sim_factory("depth_azure", devices=40, sensors=2)
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    servicenow = ServiceNowHook("servicenow_default", max_retry_time=2)
    source = AzureSource(DefenderIoTAzureHook("depth_azure"))
    DeviceSync(source="depth_azure", defender=source, servicenow=servicenow, state_store=store,
               mapping=load_class_mapping(), source_name=SOURCE_NAME, data_source="Other Automated").run()
    common = dict(source=source, servicenow=servicenow, state_store=store, source_name=SOURCE_NAME,
                  data_source="Other Automated")
    s = SensorSync(**common).run()
    assert s.counts["inserted"] == 2 and s.failed == 0
    nids = sn.table("cmdb_ci_nids")
    assert sorted(r["firmware_version"] for r in nids) == ["25.2.1", "25.2.1"] and all(r["zone"] for r in nids)
    own = device_cis(store, "depth_azure")
    assert len(rels(sn, DETECTS)) == s.counts["links_created"] == len(own) > 30
    r = RelationSync(**common).run()
    assert r.counts == {} and "no device connections" in r.note   # Azure publishes none: nothing read or written


def test_a_full_resync_keeps_our_relations_ours_so_retention_still_removes_them(defender_sim_factory,
                                                                              servicenow_conn, monkeypatch):
    defender_sim_factory(mode="sensor", devices=20, conn_id="depth_full")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    devices, _, relations = engines("depth_full", store)
    devices.run()
    created = relations.run().counts["created"]
    again = engines("depth_full", store, full_resync=True)[2].run()
    assert again.counts["existing"] == created and len(rels(sn, CONNECTS)) == created
    import defender_servicenow.cmdb_depth.relations as module

    monkeypatch.setattr(module, "today", lambda: int(datetime.now(timezone.utc).timestamp() // 86400) + 400)
    assert relations.run().counts["removed"] == created and not rels(sn, CONNECTS)
