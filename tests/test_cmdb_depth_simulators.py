"""Simulator contract for CMDB depth (issue 15): the console's device CVEs and connections, generated link
density, and the ServiceNow side (NIDS class, relation types, IRE relations by sys_object_source)."""

from __future__ import annotations

import requests

from include.simulators.inventory import Inventory


def test_console_device_cves_are_paged_filtered_and_need_the_token(defender_sim_factory):
    cm = defender_sim_factory(mode="management_console", devices=200, sensors=2, conn_id="simcve_cm")
    url = f"{cm.url}/external/v3/integration/devicecves/0"
    assert requests.get(url, timeout=10).status_code == 401
    body = requests.get(url, headers=cm.headers, params={"size": 3}, timeout=10).json()
    assert body["u_count"] > 3 and len(body["u_device_cves"]) == 3
    record = body["u_device_cves"][0]
    assert set(record) >= {"u_id", "u_name", "u_ip_address_objects", "u_mac_address_objects", "u_last_activity",
                           "u_last_update", "u_cves"}
    assert set(record["u_cves"][0]) == {"u_cve_id", "u_score", "u_ip_address", "u_description", "u_attack_vector"}
    assert isinstance(record["u_cves"][0]["u_score"], str)       # documented as a string
    pages = [requests.get(url, headers=cm.headers, params={"page": p, "size": 3}, timeout=10).json()
             for p in range(-(-body["u_count"] // 3))]
    assert len({r["u_id"] for page in pages for r in page["u_device_cves"]}) == body["u_count"]
    high = requests.get(url, headers=cm.headers, params={"score": "9.9", "size": 500}, timeout=10).json()
    assert all(float(c["u_score"]) >= 9.9 for r in high["u_device_cves"] for c in r["u_cves"])
    one = requests.get(url, headers=cm.headers, params={"deviceIds": str(record["u_id"])}, timeout=10).json()
    assert [r["u_id"] for r in one["u_device_cves"]] == [record["u_id"]]
    assert requests.get(url, headers=cm.headers, params={"score": "high"}, timeout=10).status_code == 400


def test_extra_links_are_symmetric_and_reach_the_asked_density():
    inventory = Inventory(2000, 1, links_per_device=3.44)
    for device_id in range(1, 2001):
        for other in inventory.neighbours(device_id):
            assert device_id in inventory.neighbours(other)
    edges = sum(1 for a in range(1, 2001) for b in inventory.neighbours(a) if b > a)
    assert 4.5 * 2000 < edges < 5.5 * 2000
    assert Inventory(100, 1).neighbours(10) == Inventory(100, 1, links_per_device=0).neighbours(10)


def test_servicenow_nids_class_and_relation_types(servicenow_sim):
    sim = servicenow_sim.sim
    assert sim.ancestors("cmdb_ci_nids")[:3] == ["cmdb_ci_nids", "cmdb_ci_ids_network", "cmdb_ci_netgear"]
    names = {r["name"] for r in sim.table("cmdb_rel_type")}
    assert {"Detects::Detected by", "Connects to::Connected by"} <= names


def test_ire_relates_two_cis_found_by_their_source_keys_and_refuses_unknown_types(servicenow_conn):
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    hook = ServiceNowHook("servicenow_default", max_retry_time=2)
    src = {"source_name": "MicrosoftDefenderIoT"}
    made = hook.identify_reconcile([
        {"className": "cmdb_ci_ot_plc", "values": {"name": "plc"}, "sys_object_source_info": {**src,
                                                                                            "source_native_key": "s:1"}},
        {"className": "cmdb_ci_ot_hmi", "values": {"name": "hmi"}, "sys_object_source_info": {**src,
                                                                                            "source_native_key": "s:2"}}],
        "Other Automated")
    ends = [{"className": c, "values": {}, "sys_object_source_info": {**src, "source_native_key": k}}
            for c, k in (("cmdb_ci_ot_plc", "s:1"), ("cmdb_ci_ot_hmi", "s:2"))]
    first = hook.identify_reconcile(ends, "Other Automated",
                                    relations=[{"parent": 0, "child": 1, "type": "Connects to::Connected by"}])
    assert [i["sysId"] for i in first["items"]] == [i["sysId"] for i in made["items"]]
    assert [i["operation"] for i in first["items"]] == ["NO_CHANGE", "NO_CHANGE"]   # ends unchanged
    assert first["relations"][0]["operation"] == "INSERT"
    again = hook.identify_reconcile(ends, "Other Automated",
                                    relations=[{"parent": 0, "child": 1, "type": "Connects to::Connected by"}])
    assert again["relations"][0]["operation"] == "NO_CHANGE"
    bad = hook.identify_reconcile(ends, "Other Automated", relations=[{"parent": 0, "child": 1, "type": "Talks to"}])
    assert "No such relationship with name [Talks to]" in bad["relations"][0]["errors"][0]["message"]
    assert len(servicenow_conn.sim.table("cmdb_rel_ci")) == 1
