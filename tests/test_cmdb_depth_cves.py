"""CMDB depth (issue 15): Defender's device CVEs in Vulnerability Response when the instance has it, else as
key values on the CI; a CVE that disappears is closed, never deleted; minimum score; change detection."""

from __future__ import annotations

import copy
import json

import pytest
from defender_servicenow.cmdb_depth.cves import CORRELATION_PREFIX, VIT, CveSync, cve_digest, plan_cves
from defender_servicenow.cmdb_depth.models import Cve, parse_v3_device_cves, sensor_cves_by_ip
from defender_servicenow.cmdb_depth.state import device_cis
from defender_servicenow.cmdb_depth.summary import DepthIncompleteError
from defender_servicenow.models import InvalidRecord
from defender_servicenow.sources import ApplianceSource
from defender_servicenow.sync import MemoryStateStore

from tests.test_cmdb_depth import SOURCE_NAME, engines, writes

VR_TABLES = {"sn_vul_entry": None, "sn_vul_vulnerable_item": "task"}


def test_both_documented_cve_shapes_are_parsed():
    sample = {"u_id": 135, "u_name": "192.168.1.127", "u_cves": [
        {"u_cve_id": "CVE-2015-2373", "u_score": "10.0", "u_ip_address": "192.168.1.127",
         "u_description": "RDP", "u_attack_vector": "NETWORK"}, {"u_score": "1.0"}]}
    device_id, cves = parse_v3_device_cves(sample, "cm")
    assert device_id == 135 and cves == [Cve("CVE-2015-2373", 10.0, "NETWORK", "RDP")]
    assert isinstance(parse_v3_device_cves({"u_cves": []}, "cm"), InvalidRecord)
    by_ip = sensor_cves_by_ip([{"cveId": "cve-2007-0099", "score": "9.3", "ipAddress": "10.35.1.51",
                                "attackVector": "NETWORK", "description": "msxml3"},
                               {"cveId": "CVE-X", "score": "n/a", "ipAddress": "not an ip"}])
    assert by_ip == {"10.35.1.51": [Cve("CVE-2007-0099", 9.3, "NETWORK", "msxml3")]}


def test_plan_opens_new_closes_vanished_and_skips_unchanged():
    a, b = Cve("CVE-1", 5.0), Cve("CVE-2", 7.0)
    recorded = {"1": {"CVE-1": [cve_digest(a), "", 1, 5.0], "CVE-9": ["x", "", 1, 2.0]},
                "2": {"CVE-2": [cve_digest(b), "", 1, 7.0]}}
    plan = plan_cves({1: {"CVE-1": a, "CVE-2": b}, 2: {"CVE-2": b}, 3: {"CVE-1": a}}, recorded,
                     {1: ("s1", "cmdb_ci_ot"), 2: ("s2", "cmdb_ci_ot")})
    assert plan == {1: ([b], ["CVE-9"])}   # device 2 unchanged; device 3 has no CI of this source


def kv_rows(sn) -> dict[str, dict]:
    return {r["key"]: json.loads(r["value"]) for r in sn.table("cmdb_key_value") if r["key"].startswith("defender.cve.")}


def cve_engine(source_id, store, source=None, batch_size=100, **kw):
    from defender_servicenow.hooks.defender import DefenderIoTHook
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    return CveSync(source=source or ApplianceSource(DefenderIoTHook(source_id)),
                   servicenow=ServiceNowHook("servicenow_default", max_retry_time=2, batch_size=batch_size),
                   state_store=store, source_name=SOURCE_NAME, data_source="Other Automated", **kw)


def test_without_vulnerability_response_cves_are_key_values_closed_not_deleted(defender_sim_factory,
                                                                              servicenow_conn):
    defender = defender_sim_factory(mode="sensor", devices=60, conn_id="cve_sensor")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    engines("cve_sensor", store)[0].run()
    first = cve_engine("cve_sensor", store).run()
    rows = kv_rows(sn)
    assert first.counts["opened"] == len(rows) > 0 and first.failed == 0
    assert "no Vulnerability Response" in first.note
    assert all(v["status"] == "open" and v["score"] is not None for v in rows.values())
    before = writes(sn)
    assert cve_engine("cve_sensor", store).run().counts.get("opened") is None   # no change: nothing written
    assert writes(sn) == before
    # the sensor stops reporting the CVEs of one device (deleted there; its CI is not retired yet): they are
    # closed, the rows stay
    recorded = {int(d): cves for k, shard in store.data.items() if k.startswith("cve_sensor/cves/0")
                for d, cves in shard.items()}
    device_id = min(recorded)
    defender.sim.delete_device(device_id)
    closed = cve_engine("cve_sensor", store).run()
    assert closed.counts["closed"] == len(recorded[device_id])
    after = kv_rows(sn)
    assert len(after) == len(rows) and sum(v["status"] == "closed" for v in after.values()) >= 1


def test_minimum_score_leaves_lower_cves_out(defender_sim_factory, servicenow_conn):
    defender_sim_factory(mode="management_console", devices=120, sensors=2, conn_id="cve_cm_min")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    engines("cve_cm_min", store)[0].run()
    cve_engine("cve_cm_min", store, min_score=9.5).run()
    assert kv_rows(sn) and all(v["score"] >= 9.5 for v in kv_rows(sn).values())


@pytest.fixture
def vr_conn(servicenow_sim_factory, monkeypatch):
    from include.simulators.servicenow_sim import SIM_PASSWORD, SIM_USER

    handle = servicenow_sim_factory(extra_tables=VR_TABLES)
    monkeypatch.setenv("AIRFLOW_CONN_SERVICENOW_DEFAULT", json.dumps(
        {"conn_type": "servicenow", "host": handle.url, "login": SIM_USER, "password": SIM_PASSWORD}))
    return handle


def test_with_vulnerability_response_each_cve_is_a_vulnerable_item_closed_then_reopened(defender_sim_factory,
                                                                                        vr_conn):
    defender = defender_sim_factory(mode="management_console", devices=120, sensors=2, conn_id="cve_cm_vr")
    sn = vr_conn.sim
    store = MemoryStateStore()
    engines("cve_cm_vr", store)[0].run()
    first = cve_engine("cve_cm_vr", store).run()
    vits = sn.table(VIT)
    assert first.note == "Vulnerability Response" and first.counts["opened"] == len(vits) > 0
    assert not sn.table("cmdb_key_value") or not kv_rows(sn)
    entries = {r["sys_id"]: r["id"] for r in sn.table("sn_vul_entry")}
    for vit in vits:
        assert vit["state"] == "1" and vit["correlation_id"].startswith(CORRELATION_PREFIX + "cve_cm_vr:")
        device_id, cve_id = vit["correlation_id"].split(":")[2:]
        assert entries[vit["vulnerability"]] == cve_id
        assert cve_id in {c[0] for c in defender.sim.inventory.cves(int(device_id))}
    assert cve_engine("cve_cm_vr", store).run().counts.get("opened") is None
    # a device whose CVEs vanish (deleted on the console): its items are closed, never deleted
    device_id = next(int(v["correlation_id"].split(":")[2]) for v in vits)
    defender.sim.delete_device(device_id)
    assert cve_engine("cve_cm_vr", store).run().counts["closed"] >= 1
    mine = [v for v in sn.table(VIT) if v["correlation_id"].split(":")[2] == str(device_id)]
    assert len(sn.table(VIT)) == len(vits) and {v["state"] for v in mine} == {"3"}
    assert all(v["close_notes"] for v in mine)


@pytest.mark.parametrize("mode", ["retire", "delete"])
def test_cleanup_closes_or_deletes_our_vulnerable_items_only(defender_sim_factory, vr_conn, mode):
    from defender_servicenow.cleanup import run_cleanup
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    defender_sim_factory(mode="management_console", devices=120, sensors=2, conn_id="cve_clean")
    sn = vr_conn.sim
    store = MemoryStateStore()
    engines("cve_clean", store)[0].run()
    cve_engine("cve_clean", store).run()
    ours = len(sn.table(VIT))
    other = sn.insert(VIT, {"state": "1", "correlation_id": "qualys:1", "short_description": "not ours"})
    hook = ServiceNowHook("servicenow_default", max_retry_time=2)
    run_cleanup(hook, {"scope": "devices", "mode": mode, "sources": ["cve_clean"], "dry_run": False,
                       "confirm": hook.instance_host}, source_name=SOURCE_NAME)
    left = {r["sys_id"]: r for r in sn.table(VIT)}
    assert left[other["sys_id"]]["state"] == "1"
    if mode == "retire":
        assert len(left) == ours + 1 and {r["state"] for k, r in left.items() if k != other["sys_id"]} == {"3"}
    else:
        assert list(left) == [other["sys_id"]]


def test_a_run_failing_half_way_leaves_no_duplicate_vulnerable_items_after_the_rerun(defender_sim_factory, vr_conn):
    """Batch calls of 4 items; the second vulnerable-item call fails (503 until the retries give up). What the
    first call created is found again by correlation_id (and was recorded): the rerun creates the rest only."""
    from defender_servicenow.exceptions import ServiceNowError

    defender = defender_sim_factory(mode="management_console", devices=120, sensors=2, conn_id="cve_half")
    sn = vr_conn.sim
    store = MemoryStateStore()
    engines("cve_half", store)[0].run()
    for cve_id in sorted({c[0] for d in device_cis(store, "cve_half") for c in defender.sim.inventory.cves(d)}):
        sn.insert("sn_vul_entry", {"id": cve_id, "name": cve_id})   # (so that every batch call is one of items)
    sn.set_faults(fail_next={"status": 503, "count": 10**6, "path_prefix": "/api/now/v1/batch", "after": 1})
    engine = cve_engine("cve_half", store, batch_size=4)
    saved, batch = [], engine.servicenow.batch
    engine.servicenow.batch = lambda requests, **kw: (saved.append(copy.deepcopy(store.data)), batch(requests, **kw))[1]
    with pytest.raises(ServiceNowError):
        engine.run()
    sn.faults.fail_next.clear()
    assert len(sn.table(VIT)) == 4
    killed = MemoryStateStore(saved[-1])   # the store as a SIGKILL during the failing call leaves it
    assert sum(bool(e[1]) for k, shard in killed.data.items() if k.startswith("cve_half/cves/0")
               for cves in shard.values() for e in cves.values()) == 4   # saved after each call, not at the end
    rerun = cve_engine("cve_half", killed, batch_size=4).run()
    ids = [v["correlation_id"] for v in sn.table(VIT)]
    assert rerun.failed == 0 and len(ids) == len(set(ids)) > 4 and rerun.counts["opened"] == len(ids) - 4
    # no state at all (lost, or killed before the first save): the items are found by correlation_id
    again = cve_engine("cve_half", MemoryStateStore({k: v for k, v in store.data.items() if "/cves/" not in k})).run()
    assert again.counts["present"] == len(ids) and "opened" not in again.counts and len(sn.table(VIT)) == len(ids)


class _Cves:
    """A source reporting the CVEs it is given (the real Source's CVE capability, nothing else)."""

    kind, supports_cves = "sensor", True

    def __init__(self, source_id, cves):
        self.source_id, self.cves = source_id, cves

    def iter_device_cves(self, min_score):
        yield from self.cves.items()


def test_a_changed_score_or_description_is_written_to_the_vulnerability_entry(defender_sim_factory, vr_conn):
    defender_sim_factory(mode="management_console", devices=20, sensors=1, conn_id="cve_score")
    sn = vr_conn.sim
    store = MemoryStateStore()
    engines("cve_score", store)[0].run()
    device_ids = sorted(device_cis(store, "cve_score"))[:2]
    first = {d: [Cve("CVE-2031-0001", 5.0, "NETWORK", "old text")] for d in device_ids}
    assert cve_engine("cve_score", store, source=_Cves("cve_score", first)).run().counts["opened"] == 2
    before = writes(sn)
    changed = {d: [Cve("CVE-2031-0001", 9.8, "NETWORK", "new text")] for d in device_ids}
    run = cve_engine("cve_score", store, source=_Cves("cve_score", changed)).run()
    entry = next(r for r in sn.table("sn_vul_entry") if r["id"] == "CVE-2031-0001")
    assert (entry["cvss_score"], entry["summary"]) == ("9.8", "new text")
    assert run.failed == 0 and run.counts["updated"] == 2 and writes(sn) == before + 1   # one entry, one PATCH
    assert cve_engine("cve_score", store, source=_Cves("cve_score", changed)).run().counts.get("updated") is None
    # the entry row is gone (deleted on the instance, cannot be created now): the change is not counted as
    # written, the run says so, and it is tried again next run
    sn.set_faults(deny_writes=["sn_vul_entry"])
    sn.delete(entry["sys_id"])
    later = {d: [Cve("CVE-2031-0001", 4.0, "NETWORK", "newer text")] for d in device_ids}
    with pytest.raises(DepthIncompleteError, match="failed 2, .*no sn_vul_entry row could be found") as failed:
        cve_engine("cve_score", store, source=_Cves("cve_score", later)).run()
    assert "updated" not in str(failed.value)
    sn.set_faults(deny_writes=False)
    retried = cve_engine("cve_score", store, source=_Cves("cve_score", later)).run()
    assert retried.failed == 0 and retried.counts["updated"] == 2
    assert next(r for r in sn.table("sn_vul_entry") if r["id"] == "CVE-2031-0001")["cvss_score"] == "4.0"
