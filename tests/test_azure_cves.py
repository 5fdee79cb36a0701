"""CVEs of Defender for IoT in Azure (issue 15, Azure part): Resource Graph's ``…/devicegroups/vulnerabilities``
records -> the same CVE records the appliance path gives, keyed like the device sync keys Azure devices; then
the CVE engine against the Azure and ServiceNow simulators (key values and Vulnerability Response)."""

from __future__ import annotations

import json

import pytest
from defender_servicenow.azure_models import VULNERABILITY_TYPE, parse_azure_device, stable_id
from defender_servicenow.cmdb_depth.cves import CORRELATION_PREFIX, VIT, CveSync
from defender_servicenow.cmdb_depth.models import Cve, parse_azure_vulnerability
from defender_servicenow.mapping import load_class_mapping
from defender_servicenow.models import InvalidRecord
from defender_servicenow.sources import AzureSource
from defender_servicenow.sync import DeviceSync, MemoryStateStore

from include.simulators.azure_sim import AzureSimConfig, AzureSimulator
from tests import test_cmdb_depth_cves
from tests.test_cmdb_depth import SOURCE_NAME, writes
from tests.test_cmdb_depth_cves import kv_rows

vr_conn = test_cmdb_depth_cves.vr_conn   # the ServiceNow simulator with Vulnerability Response tables
GROUP = "/subscriptions/s/providers/Microsoft.IoTSecurity/locations/westeurope/deviceGroups/plant"


# --------------------------------------------------------------------------- parsing (pure)

def test_a_vulnerability_record_is_the_cve_of_the_device_the_device_sync_keys_by_its_arm_id():
    device = f"{GROUP}/devices/abc"
    raw = {"id": f"{GROUP}/vulnerabilities/v1", "type": VULNERABILITY_TYPE, "properties": {
        "deviceId": device, "vulnerabilityId": "cve-2015-2373", "severityScore": 10.0, "description": "RDP"}}
    assert parse_azure_vulnerability(raw, "az") == (stable_id(device), Cve("CVE-2015-2373", 10.0, None, "RDP"))
    # the ARM example's "score" when there is no severityScore; a bare device name is a device of the record's group
    bare = {"id": f"{GROUP}/vulnerabilities/v2", "properties": {"deviceId": "abc", "vulnerabilityId": "CVE-1",
                                                                 "score": "7.5"}}
    assert parse_azure_vulnerability(bare, "az") == (stable_id(device.upper()), Cve("CVE-1", 7.5))
    unreadable = {**raw, "properties": {**raw["properties"], "severityScore": "high"}}
    assert parse_azure_vulnerability(unreadable, "az")[1].score is None   # kept, score unknown
    for bad in ({"id": "x", "properties": {"vulnerabilityId": "CVE-1"}}, {"properties": {"deviceId": device}},
                {"id": "/no/group", "properties": {"deviceId": "abc", "vulnerabilityId": "CVE-1"}}, None, []):
        assert isinstance(parse_azure_vulnerability(bad, "az"), InvalidRecord), bad


def test_simulated_vulnerabilities_are_the_appliance_cves_of_the_same_generated_devices():
    sim = AzureSimulator(AzureSimConfig(devices=300))
    by_key = {parse_azure_device(d, source="az", source_name="x").id: i for i, d in enumerate(sim.devices, 1)}
    expected = {(i, c[0]) for i in range(1, 301) for c in sim.inventory.cves(i)}
    got = set()
    for raw in sim.vulnerabilities:
        assert raw["type"] == VULNERABILITY_TYPE and raw["id"].startswith(raw["properties"]["deviceId"].split(
            "/devices/")[0] + "/vulnerabilities/")
        assert {"deviceId", "vulnerabilityId", "severityScore", "description", "severity", "source",
                "exploitType", "publishedDate", "lastModifiedDate", "affectedVersions"} <= set(raw["properties"])
        device_key, cve = parse_azure_vulnerability(raw, "az")
        got.add((by_key[device_key], cve.id))
    assert got == expected and len(expected) > 20


# --------------------------------------------------------------------------- the hook against the simulator

def test_the_hook_pages_vulnerabilities_through_resource_graph_with_quota_and_throttling(azure_sim_factory):
    from defender_servicenow.hooks.azure import DefenderIoTAzureHook

    az = azure_sim_factory("azcve_paging", devices=600, alerts=0, quota=1000)
    az.sim.faults["throttle_next"] = 1
    hook = DefenderIoTAzureHook("azcve_paging", page_size=7, max_retry_time=20)
    ids = [r["id"] for r in hook.iter_vulnerabilities()]
    total = len(az.sim.vulnerabilities)
    assert ids == sorted(ids) and len(set(ids)) == total == len(ids) > 50
    assert hook.throttled == 1 and az.sim.counters["throttled"] == 1
    assert hook.request_count == -(-total // 7) + 1          # one request per page, plus the throttled one
    # the sites / sensors extras do not hide CVEs (vulnerabilities carry no sensor; the CVE sync keeps those
    # of this source's devices)
    az2 = azure_sim_factory("azcve_sites", devices=100, alerts=0, quota=1000, extra={"sites": ["nowhere"]})
    assert len(list(DefenderIoTAzureHook("azcve_sites").iter_vulnerabilities())) == len(az2.sim.vulnerabilities)


# --------------------------------------------------------------------------- the CVE engine with an Azure source

def _azure_engines(conn_id: str, store, **kw):
    from defender_servicenow.hooks.azure import DefenderIoTAzureHook
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    servicenow = ServiceNowHook("servicenow_default", max_retry_time=2)
    source = AzureSource(DefenderIoTAzureHook(conn_id))
    devices = DeviceSync(source=conn_id, defender=source, servicenow=servicenow, state_store=store,
                         mapping=load_class_mapping(), source_name=SOURCE_NAME, data_source="Other Automated",
                         batch_size=50, parallel=2)
    return devices, CveSync(source=source, servicenow=servicenow, state_store=store, source_name=SOURCE_NAME,
                            data_source="Other Automated", **kw)


def _cve_run(conn_id, store, **kw):
    return _azure_engines(conn_id, store, **kw)[1].run()


def _synced_devices(az, conn_id):
    """simulator index -> device key, for the devices the device sync wrote (Active ones)."""
    return {i: parse_azure_device(d, source=conn_id, source_name="x").id for i, d in enumerate(az.sim.devices, 1)
            if d["properties"]["deviceStatus"] == "Active"}


def test_azure_cves_become_key_values_closed_not_deleted_and_a_resync_writes_nothing(azure_sim_factory,
                                                                                    servicenow_conn):
    az = azure_sim_factory("azcve_kv", devices=160, alerts=0, quota=1000)
    sn, store = servicenow_conn.sim, MemoryStateStore()
    az.sim.vulnerabilities.append({"id": f"{GROUP}/vulnerabilities/broken", "type": VULNERABILITY_TYPE,
                                   "subscriptionId": az.sim.config.subscriptions[0],
                                   "properties": {"vulnerabilityId": "CVE-2099-0001"}})   # no deviceId
    devices, cves = _azure_engines("azcve_kv", store)
    devices.run()
    first = cves.run()
    assert first.failed == 0 and "no Vulnerability Response" in first.note
    assert first.counts["invalid"] == 1                                       # counted, not silently dropped
    synced = _synced_devices(az, "azcve_kv")
    expected = {c[0] for i in synced for c in az.sim.inventory.cves(i)}
    rows = kv_rows(sn)
    assert {k.removeprefix("defender.cve.") for k in rows} == expected
    assert first.counts["opened"] == sum(len(az.sim.inventory.cves(i)) for i in synced)
    score = {c[0]: float(c[1]) for i in synced for c in az.sim.inventory.cves(i)}
    assert all(v["status"] == "open" and v["score"] == score[k.removeprefix("defender.cve.")]
               for k, v in rows.items())
    before = writes(sn)
    again = _cve_run("azcve_kv", store)
    assert again.counts.get("opened") is None and writes(sn) == before       # no change: nothing written
    patched = next(i for i in synced if az.sim.inventory.cves(i))             # the device is patched in Azure
    gone = az.sim.patch_device(patched)
    closed = _cve_run("azcve_kv", store)
    assert closed.counts["closed"] == len(gone) > 0 and closed.failed == 0
    ci = next(r["target_sys_id"] for r in sn.table("sys_object_source") if r["id"] == f"azcve_kv:{synced[patched]}")
    mine = {r["key"]: json.loads(r["value"]) for r in sn.table("cmdb_key_value")
            if r.get("configuration_item") == ci and r["key"].startswith("defender.cve.")}
    assert len(mine) == len(gone) and {v["status"] for v in mine.values()} == {"closed"}
    assert len(kv_rows(sn)) == len(rows)                                      # closed, never deleted


def test_azure_minimum_score_leaves_lower_cves_out_and_counts_them(azure_sim_factory, servicenow_conn):
    az = azure_sim_factory("azcve_min", devices=160, alerts=0, quota=1000)
    store = MemoryStateStore()
    devices, cves = _azure_engines("azcve_min", store, min_score=9.5)
    devices.run()
    summary = cves.run()
    rows = kv_rows(servicenow_conn.sim)
    assert rows and all(v["score"] >= 9.5 for v in rows.values())
    scores = [float(c[1]) for i in _synced_devices(az, "azcve_min") for c in az.sim.inventory.cves(i)]
    assert summary.counts["opened"] == sum(s >= 9.5 for s in scores) < len(scores)
    assert summary.counts["below_min_score"] >= len(scores) - summary.counts["opened"]


def test_azure_cves_with_vulnerability_response_are_vulnerable_items_of_the_device_cis(azure_sim_factory, vr_conn):
    az = azure_sim_factory("azcve_vr", devices=160, alerts=0, quota=1000)
    sn, store = vr_conn.sim, MemoryStateStore()
    devices, cves = _azure_engines("azcve_vr", store)
    devices.run()
    first = cves.run()
    vits = sn.table(VIT)
    assert first.note == "Vulnerability Response" and first.counts["opened"] == len(vits) > 0
    synced = _synced_devices(az, "azcve_vr")
    index = {key: i for i, key in synced.items()}
    ci_of = {r["id"]: r["target_sys_id"] for r in sn.table("sys_object_source") if r["id"].startswith("azcve_vr:")}
    entries = {r["sys_id"]: r["id"] for r in sn.table("sn_vul_entry")}
    for vit in vits:
        assert vit["state"] == "1" and vit["correlation_id"].startswith(CORRELATION_PREFIX + "azcve_vr:")
        device_key, cve_id = vit["correlation_id"].split(":")[2:]
        assert vit["cmdb_ci"] == ci_of[f"azcve_vr:{device_key}"] and entries[vit["vulnerability"]] == cve_id
        assert cve_id in {c[0] for c in az.sim.inventory.cves(index[int(device_key)])}
    before = writes(sn)
    assert _cve_run("azcve_vr", store).counts.get("opened") is None and writes(sn) == before
    device_key = int(vits[0]["correlation_id"].split(":")[2])
    az.sim.patch_device(index[device_key])
    assert _cve_run("azcve_vr", store).counts["closed"] >= 1
    mine = [v for v in sn.table(VIT) if v["correlation_id"].split(":")[2] == str(device_key)]
    assert len(sn.table(VIT)) == len(vits) and {v["state"] for v in mine} == {"3"} and all(v["close_notes"]
                                                                                           for v in mine)


# --------------------------------------------------------------------------- the DAG with an Azure source

@pytest.mark.airflow_db
def test_device_sync_dag_records_azure_cves_above_the_minimum_score(airflow_db, monkeypatch, azure_sim_factory,
                                                                    vr_conn):
    from tests.test_device_sync_dag import run_dag, task_states

    az = azure_sim_factory("dagtest_azure_cves", devices=160, alerts=0, quota=1000)
    monkeypatch.setenv("DEFENDER_SOURCES", "dagtest_azure_cves")
    monkeypatch.setenv("DEFENDER_CVE_MIN_SCORE", "9.5")
    sn = vr_conn.sim
    first = run_dag()
    assert set(task_states(first).values()) == {"success"}
    synced = _synced_devices(az, "dagtest_azure_cves")
    wanted = {(key, c[0]) for i, key in synced.items() for c in az.sim.inventory.cves(i) if float(c[1]) >= 9.5}
    got = {(int(v["correlation_id"].split(":")[2]), v["correlation_id"].split(":")[3]) for v in sn.table(VIT)}
    assert got == wanted and len(wanted) > 3 and {v["state"] for v in sn.table(VIT)} == {"1"}
    before = writes(sn)
    assert set(task_states(run_dag()).values()) == {"success"} and writes(sn) == before   # no change, no write


def test_simulator_serves_vulnerabilities_through_the_resource_graph_contract(azure_sim_factory):
    import requests

    from tests.test_azure_simulator import _query, _token

    az = azure_sim_factory(devices=2000, alerts=0, quota=1000)
    token = _token(az.url).json()["access_token"]
    query = f"iotsecurityresources | where type =~ '{VULNERABILITY_TYPE}' | project id, name, type, properties"
    seen, options = [], {"$top": 150, "resultFormat": "objectArray"}
    while True:
        page = _query(az.url, token, query + " | order by id asc", options).json()
        assert page["resultTruncated"] == "false" and page["count"] <= 150
        seen += page["data"]
        if "$skipToken" not in page:
            break
        options = {**options, "$skipToken": page["$skipToken"]}
    assert len(seen) == len(az.sim.vulnerabilities) == page["totalRecords"] > 150
    assert {r["type"] for r in seen} == {VULNERABILITY_TYPE}
    one = seen[0]["properties"]["deviceId"]
    mine = _query(az.url, token, query + f" | where properties.deviceId =~ '{one.upper()}'",
                  {"resultFormat": "objectArray"}).json()
    assert mine["count"] >= 1 and {r["properties"]["deviceId"] for r in mine["data"]} == {one}
    no_id = _query(az.url, token, f"iotsecurityresources | where type =~ '{VULNERABILITY_TYPE}' | project name",
                   {"$top": 10, "resultFormat": "objectArray"}).json()
    assert no_id["resultTruncated"] == "true" and "$skipToken" not in no_id
    assert _query(az.url, token, query + " | summarize count() by properties.deviceId").status_code == 400
    gone = az.sim.patch_device(7)                          # devices 7, 27, 47, ... have CVEs
    state = requests.get(f"{az.url}/_sim/state", timeout=10).json()
    assert len(gone) == len(az.sim.inventory.cves(7)) > 0 and state["vulnerabilities"] == len(seen) - len(gone)
