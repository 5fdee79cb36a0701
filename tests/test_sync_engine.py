"""Device sync engine: change detection, per-item errors, failures part way, retirement, dry run.

The first group drives the engine with small in-process fakes (exact control over answers); the second
runs it against the Defender and ServiceNow simulators through the real hooks.
"""

from __future__ import annotations

import itertools
import re

import pytest
from defender_servicenow.exceptions import ServiceNowAuthError, ServiceNowUnavailableError
from defender_servicenow.mapping import load_class_mapping
from defender_servicenow.models import Device, Firmware, InvalidRecord
from defender_servicenow.sync import DeviceSync, MemoryStateStore, SourceState, SyncConfigError

MAPPING = load_class_mapping()


def device(i: int, source: str = "sensor_a", **fields) -> Device:
    base = dict(source=source, appliance_name="sensor-a", id=i, name=f"PLC-{i}", type="PLC",
                mac_addresses=[f"00:02:a2:00:00:{i:02x}"], ip_addresses=[f"10.0.0.{i}"], vendor="Siemens",
                firmware=[Firmware(serial=f"SN{i}", model="1756-L73")])
    return Device(**{**base, **fields})


class FakeDefender:
    """A Source (sources.py) over a list: ``kind`` sensor counts missing devices, a console reports deletions."""

    def __init__(self, devices, appliance="sensor", deleted=()):
        self.devices, self.kind, self.deleted = list(devices), appliance, list(deleted)
        self.fail_after: int | None = None
        self.retires_missing = appliance != "management_console"

    def iter_devices(self):
        for n, d in enumerate(self.devices):
            if self.fail_after is not None and n >= self.fail_after:
                from defender_servicenow.exceptions import DefenderUnreachableError
                raise DefenderUnreachableError("sensor unreachable")
            yield d

    def deleted_device_ids(self, since):
        return self.deleted


class FakeServiceNow:
    """The IRE by native key; ``errors`` maps native keys to an error code; ``fail_on_call`` raises."""

    def __init__(self):
        self.cis: dict[str, dict] = {}
        self.calls = 0
        self.items_sent = 0
        self.errors: dict[str, str] = {}
        self.fail_on_call: int | None = None
        self.fail_with = ServiceNowUnavailableError("503 for a while")
        self.updates: list[tuple] = []
        self.companies: dict[str, str] = {}
        self._ids = itertools.count(1)

    def identify_reconcile(self, items, data_source, *, dry_run=False):
        self.calls += 1
        self.payloads = [*getattr(self, "payloads", []), items]
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise self.fail_with
        out = []
        for index, item in enumerate(items):
            key = item["sys_object_source_info"]["source_native_key"]
            assert data_source == "Other Automated"
            if key in self.errors:
                out.append({"className": item["className"], "sysId": "Unknown", "inputIndices": [index],
                            "errors": [{"error": self.errors[key], "message": "explained"}]})
                continue
            if dry_run:
                op = "UPDATE" if key in self.cis else "INSERT"
                out.append({"className": item["className"], "operation": op,
                            "sysId": self.cis.get(key, {}).get("sys_id", "Unknown"), "inputIndices": [index]})
                continue
            self.items_sent += 1
            ci = self.cis.get(key)
            op = "UPDATE" if ci else "INSERT"
            if not ci:
                ci = self.cis[key] = {"sys_id": f"{next(self._ids):032x}"}
            ci.update(item["values"], className=item["className"])
            out.append({"className": item["className"], "operation": op, "sysId": ci["sys_id"],
                        "inputIndices": [index]})
        return {"items": out}

    def update_record(self, table, sys_id, values):
        self.updates.append((table, sys_id, values))
        for ci in self.cis.values():
            if ci["sys_id"] == sys_id:
                ci.update(values)
        return {"sys_id": sys_id}

    def query(self, table, query="", fields=None, limit=None):
        assert table == "core_company"
        names = [part.removeprefix("name=") for part in query.split("^OR")]
        return [{"sys_id": self.companies[n], "name": n} for n in names if n in self.companies]

    def create_record(self, table, values):
        self.companies[values["name"]] = sys_id = f"c{next(self._ids):031x}"
        return {"sys_id": sys_id}

    def batch(self, requests_):
        from defender_servicenow.hooks.servicenow import BatchResponse

        self.calls_batch = getattr(self, "calls_batch", 0) + 1
        out = []
        for r in requests_:
            assert r.method == "POST" and r.url.startswith("/api/now/table/core_company")
            sys_id = self.create_record("core_company", r.body)["sys_id"]
            out.append(BatchResponse(r.id, 201, {"result": {"sys_id": sys_id, "name": r.body["name"]}}))
        return out

    other_claims: list[dict] = []   # sys_object_source rows of other sources
    deleted: list[tuple] = []

    def query_in(self, table, field, values, query="", fields=None):
        assert (table, field) == ("sys_object_source", "target_sys_id")
        wanted = set(values)
        rows = [{"sys_id": f"so-{key}", "name": "MicrosoftDefenderIoT", "id": key, "target_sys_id": ci["sys_id"]}
                for key, ci in self.cis.items() if ci["sys_id"] in wanted]
        return rows + [r for r in self.other_claims if r["target_sys_id"] in wanted]

    def delete_record(self, table, sys_id):
        self.deleted = [*self.deleted, (table, sys_id)]


def run(defender, servicenow, store, **kw):
    options = dict(source="sensor_a", defender=defender, servicenow=servicenow, state_store=store,
                   mapping=MAPPING, source_name="MicrosoftDefenderIoT", data_source="Other Automated",
                   batch_size=3, parallel=2)
    return DeviceSync(**{**options, **kw}).run()


def test_first_sync_inserts_then_nothing_is_resent():
    defender, sn, store = FakeDefender([device(i) for i in range(1, 11)]), FakeServiceNow(), MemoryStateStore()
    first = run(defender, sn, store)
    assert (first.seen, first.inserted, first.updated, first.unchanged) == (10, 10, 0, 0)
    # first contact by MAC (MAC as name), then the full item: 2 items per new device, batches of 3
    assert sn.items_sent == 20 and sn.calls <= 8
    assert sorted(ci["name"] for ci in sn.cis.values()) == sorted(f"PLC-{i}" for i in range(1, 11))
    assert all(ci["manufacturer"] == sn.companies["Siemens"] for ci in sn.cis.values())  # sys_id, not name
    calls, writes = sn.calls, store.writes
    second = run(defender, sn, store)
    assert (second.seen, second.inserted, second.updated, second.unchanged) == (10, 0, 0, 10)
    assert sn.calls == calls                                       # no-change resync: no IRE call at all
    assert store.writes == writes + 1                              # only the meta record
    defender.devices[4] = device(5, vendor="Rockwell")
    third = run(defender, sn, store)
    assert (third.updated, third.unchanged) == (1, 9) and sn.items_sent == 21
    full = run(defender, sn, store, full_resync=True)
    assert full.updated == 10 and sn.items_sent == 31


def test_first_contact_never_uses_the_name_alone():
    from defender_servicenow.mapping import map_device
    from defender_servicenow.sync import first_contact_item

    with_mac = map_device(device(1), source_name="s", mapping=MAPPING)
    assert first_contact_item(with_mac)["values"]["name"] == "00:02:a2:00:00:01"
    serial_only = map_device(device(2, mac_addresses=[]), source_name="s", mapping=MAPPING)
    assert first_contact_item(serial_only)["values"]["name"] == "SN2"
    neither = map_device(device(3, mac_addresses=[], firmware=[]), source_name="s", mapping=MAPPING)
    assert first_contact_item(neither)["values"]["name"] == "sensor_a:3"   # its source key, not "PLC-3"
    assert first_contact_item(neither, match_by_name=True) is None          # opt-in: sent by its name


def test_first_sync_sends_full_items_in_batches_and_small_renames_in_larger_ones():
    """First-sync cost: one full item per new device (batch_size per request), then one rename item (name and
    source key only) per device in batches of rename_batch_size; new manufacturers in one Batch API call."""
    devices = [device(i, vendor=f"Vendor {i % 4}") for i in range(1, 26)]
    sn, store = FakeServiceNow(), MemoryStateStore()
    summary = run(FakeDefender(devices), sn, store, batch_size=5, rename_batch_size=20)
    assert summary.inserted == 25 and summary.failed == 0
    full = [p for p in sn.payloads if "lookup" in p[0]]
    renames = [p for p in sn.payloads if "lookup" not in p[0]]
    assert [len(p) for p in full] == [5] * 5 and sorted(len(p) for p in renames) == [5, 20]
    assert all(set(i) == {"className", "values", "sys_object_source_info"} and list(i["values"]) == ["name"]
               for p in renames for i in p)
    assert sn.calls == 7 and sn.calls_batch == 1 and len(sn.companies) == 4
    assert sorted(ci["name"] for ci in sn.cis.values()) == sorted(f"PLC-{i}" for i in range(1, 26))
    assert all(ci["manufacturer"] == sn.companies[f"Vendor {int(k.split(':')[1]) % 4}"] for k, ci in sn.cis.items())


def test_item_errors_are_reported_per_device_and_not_recorded(caplog):
    defender, sn, store = FakeDefender([device(i) for i in range(1, 6)]), FakeServiceNow(), MemoryStateStore()
    sn.errors["sensor_a:3"] = "MULTI_MATCH"
    summary = run(defender, sn, store)
    assert (summary.inserted, summary.failed) == (4, 1)
    assert summary.errors == {"MULTI_MATCH": 1} and summary.examples["MULTI_MATCH"] == ["3"]
    assert "device 3 of sensor_a" in caplog.text and "MULTI_MATCH" in caplog.text
    del sn.errors["sensor_a:3"]
    again = run(defender, sn, store)                               # only the failed one is resent
    assert (again.inserted, again.unchanged) == (1, 4)


def test_failure_part_way_records_what_was_confirmed():
    defender, sn, store = FakeDefender([device(i) for i in range(1, 13)]), FakeServiceNow(), MemoryStateStore()
    sn.fail_on_call = 3
    with pytest.raises(ServiceNowUnavailableError):
        run(defender, sn, store, parallel=1)
    confirmed = len(SourceState(store, "sensor_a"))
    assert 0 < confirmed < 12                                      # the batches confirmed before the 503
    assert "last_success" not in store.get("sensor_a/meta", {})
    sn.fail_on_call = None
    again = run(defender, sn, store)
    assert again.inserted == 12 - confirmed and again.failed == 0
    assert len(sn.cis) == 12
    assert sn.items_sent == 24                                     # 2 per device, none sent twice
    assert all(ci["name"].startswith("PLC-") for ci in sn.cis.values())


def test_auth_failure_propagates_unchanged():
    sn = FakeServiceNow()
    sn.fail_on_call, sn.fail_with = 1, ServiceNowAuthError("credentials rejected")
    with pytest.raises(ServiceNowAuthError):
        run(FakeDefender([device(1)]), sn, MemoryStateStore())


def test_invalid_data_source_fails_the_run():
    sn = FakeServiceNow()
    sn.errors = {f"sensor_a:{i}": "INVALID_INPUT_DATA" for i in (1, 2)}
    original = sn.identify_reconcile

    def reject(items, data_source, **kw):
        result = original(items, data_source, **kw)
        for item in result["items"]:
            item["errors"] = [{"error": "INVALID_INPUT_DATA", "message": "In payload invalid data source [x] exist"}]
        return result

    sn.identify_reconcile = reject
    with pytest.raises(SyncConfigError, match="SERVICENOW_DATA_SOURCE"):
        run(FakeDefender([device(1), device(2)]), sn, MemoryStateStore())


def test_unmappable_and_invalid_records_are_skipped_and_counted():
    records = [device(1), device(2, type="Physical Location"),
               InvalidRecord(source="sensor_a", record_id="99", reason="device: 'id' is not an integer")]
    summary = run(FakeDefender(records), FakeServiceNow(), MemoryStateStore())
    assert (summary.seen, summary.inserted, summary.skipped) == (2, 1, 2)


def test_sensor_device_missing_n_runs_is_retired_never_on_failed_extraction():
    devices = [device(i) for i in range(1, 5)]
    defender, sn, store = FakeDefender(devices), FakeServiceNow(), MemoryStateStore()
    run(defender, sn, store, retire_after_missing_runs=2)
    defender.devices = devices[:3]                                  # device 4 gone
    defender.fail_after = 1
    with pytest.raises(Exception, match="unreachable"):
        run(defender, sn, store, retire_after_missing_runs=2)
    defender.fail_after = None
    assert run(defender, sn, store, retire_after_missing_runs=2).retired == 0   # missing 1 of 2
    summary = run(defender, sn, store, retire_after_missing_runs=2)
    assert summary.retired == 1
    assert sn.updates == [("cmdb_ci_ot_plc", sn.cis["sensor_a:4"]["sys_id"],
                           {"install_status": "7", "operational_status": "6"})]
    assert run(defender, sn, store, retire_after_missing_runs=2).retired == 0   # only once
    defender.devices = devices                                      # it comes back: revived
    back = run(defender, sn, store, retire_after_missing_runs=2)
    assert back.updated == 1 and sn.cis["sensor_a:4"]["install_status"] == "1"


def test_a_device_another_source_still_reports_is_released_not_retired():
    devices = [device(i) for i in range(1, 4)]
    defender, sn, store = FakeDefender(devices), FakeServiceNow(), MemoryStateStore()
    run(defender, sn, store, retire_after_missing_runs=1)
    ci = sn.cis["sensor_a:3"]["sys_id"]
    sn.other_claims = [{"sys_id": "so-other", "name": "MicrosoftDefenderIoT", "id": "sensor_b:77",
                        "target_sys_id": ci}]                       # sensor b sees the same device
    defender.devices = devices[:2]                                  # device 3 gone from sensor a
    summary = run(defender, sn, store, retire_after_missing_runs=1)
    assert (summary.retired, summary.released) == (0, 1) and sn.updates == []   # the CI stays operational
    assert sn.deleted == [("sys_object_source", "so-sensor_a:3")]   # only sensor a's own claim is dropped
    assert SourceState(store, "sensor_a").get("3") is None
    assert run(defender, sn, store, retire_after_missing_runs=1).released == 0  # once


def test_console_deleted_devices_are_retired():
    devices = [device(i, source="sensor_a") for i in range(1, 5)]
    defender, sn, store = FakeDefender(devices, appliance="management_console"), FakeServiceNow(), MemoryStateStore()
    run(defender, sn, store)
    defender.devices, defender.deleted = devices[:3], [4, 77]
    summary = run(defender, sn, store)
    assert summary.retired == 1 and sn.cis["sensor_a:4"]["install_status"] == "7"


def test_a_source_with_deletions_and_missing_counts_retires_both():
    """Azure: a Removed/Deleted device is retired at once; one gone from the inventory after N syncs."""
    devices = [device(i) for i in range(1, 6)]
    defender, sn, store = FakeDefender(devices, appliance="azure"), FakeServiceNow(), MemoryStateStore()
    assert defender.retires_missing
    run(defender, sn, store)
    defender.devices, defender.deleted = devices[:3], [4]          # 4 reported deleted, 5 just gone
    first = run(defender, sn, store, retire_after_missing_runs=2)
    assert first.retired == 1 and sn.cis["sensor_a:4"]["install_status"] == "7"
    assert sn.cis["sensor_a:5"].get("install_status") != "7"
    second = run(defender, sn, store, retire_after_missing_runs=2)
    assert second.retired == 1 and sn.cis["sensor_a:5"]["install_status"] == "7"
    assert run(defender, sn, store, retire_after_missing_runs=2).retired == 0   # once


def test_dry_run_writes_nothing():
    defender, sn, store = FakeDefender([device(i) for i in range(1, 5)]), FakeServiceNow(), MemoryStateStore()
    summary = run(defender, sn, store, dry_run=True)
    assert summary.dry_run and summary.would_send == 4 and summary.inserted == 4
    assert sn.cis == {} and sn.companies == {} and store.writes == 0
    assert "dry run" in summary.line()


# --------------------------------------------------------------------------- against the simulators


def sim_engine(source, store, **kw):
    from defender_servicenow.hooks.servicenow import ServiceNowHook
    from defender_servicenow.sources import source_for

    servicenow = kw.pop("servicenow", None) or ServiceNowHook("servicenow_default", max_retry_time=2)
    options = dict(source=source, defender=source_for(source), servicenow=servicenow, state_store=store,
                   mapping=MAPPING, source_name="MicrosoftDefenderIoT", data_source="Other Automated",
                   batch_size=10, parallel=3)
    return DeviceSync(**{**options, **kw})


def cis(sn_sim, source=None) -> dict[str, dict]:
    """native key -> CI record, for the CIs this integration wrote (through sys_object_source)."""
    out = {}
    for row in sn_sim.table("sys_object_source"):
        if row["name"] == "MicrosoftDefenderIoT" and (source is None or row["id"].startswith(source + ":")):
            out[row["id"]] = sn_sim.get(row["target_sys_id"])
    return out


def ire_requests(sn_sim) -> int:
    return sum(n for route, n in sn_sim.counters().get("by_route", {}).items() if "identifyreconcile" in route)


def test_sensor_sync_creates_updates_and_retires(defender_sim_factory, servicenow_conn):
    sensor = defender_sim_factory(mode="sensor", devices=60, conn_id="defender_sensor_1")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    first = sim_engine("defender_sensor_1", store, retire_after_missing_runs=2).run()
    assert first.seen == 60 and first.inserted == first.seen - first.skipped and first.inserted > 50
    written = cis(sn, "defender_sensor_1")
    assert len(written) == first.inserted and first.failed == 0
    names = {r["id"]: r for r in sn.table("sys_object_source")}
    assert len(names) == first.inserted
    for key, ci in written.items():
        device = sensor.sim.device(int(key.split(":")[1]))
        assert ci["name"].startswith((device["name"] or "")[:20].strip()) or not device["name"]
        if ci.get("manufacturer"):
            assert sn.get(ci["manufacturer"])["name"]                 # a core_company sys_id
    # no change: no IRE call at all
    before = ire_requests(sn)
    again = sim_engine("defender_sensor_1", store, retire_after_missing_runs=2).run()
    assert again.unchanged == first.inserted and (again.inserted, again.updated) == (0, 0)
    assert ire_requests(sn) == before
    # a changed device is updated in place
    key = next(iter(written))
    device_id = int(key.split(":")[1])
    sensor.sim.update_device(device_id, vendor="Rockwell Automation")
    changed = sim_engine("defender_sensor_1", store, retire_after_missing_runs=2).run()
    assert (changed.updated, changed.inserted) == (1, 0)
    assert sn.get(cis(sn)[key]["manufacturer"])["name"] == "Rockwell Automation"
    # a deleted device is retired after 2 runs without it, once, and never deleted
    sensor.sim.delete_device(device_id)
    assert sim_engine("defender_sensor_1", store, retire_after_missing_runs=2).run().retired == 0
    assert sim_engine("defender_sensor_1", store, retire_after_missing_runs=2).run().retired == 1
    ci = cis(sn)[key]
    assert (ci["install_status"], ci["operational_status"]) == ("7", "6")
    assert len(cis(sn)) == len(written)


def test_same_name_on_two_sensors_gives_two_cis(defender_sim_factory, servicenow_conn):
    s1 = defender_sim_factory(mode="sensor", devices=5, seed=1, conn_id="defender_sensor_1")
    s2 = defender_sim_factory(mode="sensor", devices=5, seed=2, conn_id="defender_sensor_2")
    s1.sim.add_device(name="10.0.0.5", macAddresses=["00:1d:9c:00:00:01"], ipAddresses=["10.0.0.5"])
    s2.sim.add_device(name="10.0.0.5", macAddresses=["00:1d:9c:00:00:02"], ipAddresses=["10.0.0.5"])
    store = MemoryStateStore()
    for source in ("defender_sensor_1", "defender_sensor_2"):
        assert sim_engine(source, store).run().failed == 0
    shared = [ci for ci in cis(servicenow_conn.sim).values() if ci["name"] == "10.0.0.5"]
    assert len({ci["sys_id"] for ci in shared}) == 2                 # not merged by name


def test_outage_part_way_then_rerun_duplicates_nothing(defender_sim_factory, servicenow_conn):
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    defender_sim_factory(mode="sensor", devices=60, conn_id="defender_sensor_1")
    sn = servicenow_conn.sim
    hook = ServiceNowHook("servicenow_default", max_retry_time=1)
    real, calls = hook.identify_reconcile, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 4:   # ServiceNow starts answering 503 part way through
            sn.set_faults(fail_next={"count": 1000, "status": 503, "path_prefix": "/api/now/identifyreconcile"})
        return real(*args, **kw)

    hook.identify_reconcile = flaky
    store = MemoryStateStore()
    with pytest.raises(ServiceNowUnavailableError):
        sim_engine("defender_sensor_1", store, servicenow=hook, parallel=1).run()
    partial = len(cis(sn))
    assert 0 < partial < 50 and len(SourceState(store, "defender_sensor_1")) == partial
    sn.faults.fail_next.clear()                                     # ServiceNow is back
    rerun = sim_engine("defender_sensor_1", store).run()
    assert rerun.failed == 0
    written = cis(sn)
    assert len(written) == rerun.seen - rerun.skipped
    assert len({ci["sys_id"] for ci in written.values()}) == len(written)       # one CI per device
    hardware = sn.select("cmdb_ci_hardware")
    assert len(hardware) == len(written)                                        # no stray duplicates


def test_management_console_sync_retires_deleted_devices(defender_sim_factory, servicenow_conn):
    cm = defender_sim_factory(mode="management_console", devices=40, sensors=2, conn_id="defender_cm")
    sn, store = servicenow_conn.sim, MemoryStateStore()
    first = sim_engine("defender_cm", store).run()
    assert first.inserted > 30 and first.failed == 0
    written = cis(sn, "defender_cm")
    key = sorted(written)[0]
    cm.sim.delete_device(int(key.split(":")[1]))
    second = sim_engine("defender_cm", store).run()
    assert second.retired == 1 and second.inserted == 0
    assert cis(sn)[key]["install_status"] == "7"


def test_dry_run_previews_with_the_ire_query_and_writes_nothing(defender_sim_factory, servicenow_conn):
    defender_sim_factory(mode="sensor", devices=20, conn_id="defender_sensor_1")
    store = MemoryStateStore()
    summary = sim_engine("defender_sensor_1", store, dry_run=True).run()
    assert summary.would_send == summary.seen - summary.skipped and summary.inserted == summary.would_send
    assert cis(servicenow_conn.sim) == {} and store.writes == 0
    assert not [c for c in servicenow_conn.sim.table("core_company") if c.get("sys_created_by") == "admin"]


def test_hibernating_instance_fails_plainly_and_records_nothing(defender_sim_factory, servicenow_conn):
    from defender_servicenow.exceptions import ServiceNowHibernatingError

    defender_sim_factory(mode="sensor", devices=20, conn_id="defender_sensor_1")
    sn = servicenow_conn.sim
    sn.set_faults(hibernate=True)
    store = MemoryStateStore()
    with pytest.raises(ServiceNowHibernatingError) as err:
        sim_engine("defender_sensor_1", store).run()
    message = str(err.value)
    assert "hibernat" in message.lower() and "<html" not in message.lower()
    assert len(SourceState(store, "defender_sensor_1")) == 0 and cis(sn) == {}   # nothing recorded as synced
    sn.set_faults(hibernate=False)                                              # someone woke the instance
    summary = sim_engine("defender_sensor_1", store).run()
    assert summary.failed == 0 and len(cis(sn)) == summary.seen - summary.skipped


def test_devices_reporting_the_same_serial_or_mac_stay_separate_cis(defender_sim_factory, servicenow_conn):
    """A router's MAC reported for the devices behind it, or one serial on two modules: without a guard the
    IRE merges the devices into one CI (or answers MULTI_MATCH)."""
    d = defender_sim_factory(mode="sensor", devices=12, conn_id="defender_sensor_1")
    a, b, c = d.sim.device_ids()[:3]
    firmware = [{"slot": "N/A", "additionalData": "N/A", "moduleAddress": "N/A", "rack": "N/A",
                 "address": "10.9.0.1", "model": "S7-1500", "serial": "SN-4711", "firmwareVersion": "2.9"}]
    for device_id, name in ((a, "PLC north"), (b, "PLC south"), (c, "PLC east")):
        d.sim.update_device(device_id, name=name, macAddresses=["00:1b:1b:00:00:01"], firmware=firmware)
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    summary = sim_engine("defender_sensor_1", store).run()
    assert summary.failed == 0 and summary.shared_identifiers == 2
    written = cis(sn)
    shared = [written[f"defender_sensor_1:{i}"] for i in (a, b, c)]
    assert len({ci["sys_id"] for ci in shared}) == 3                      # three CIs, not one
    assert [ci["name"] for ci in shared] == ["PLC north", "PLC south", "PLC east"]
    assert len(sn.select("cmdb_ci_hardware")) == len(written)
    notes = {(r["configuration_item"], r["key"]): r["value"] for r in sn.table("cmdb_key_value")}
    assert notes[(shared[1]["sys_id"], "defender.shared_serial")] == "SN-4711"
    assert notes[(shared[2]["sys_id"], "defender.shared_mac_addresses")] == "00:1b:1b:00:00:01"
    assert (shared[0]["sys_id"], "defender.shared_serial") not in notes   # the first keeps its identifiers
    again = sim_engine("defender_sensor_1", store).run()
    assert (again.failed, again.inserted, again.updated) == (0, 0, 0)   # stable: nothing resent


def test_one_device_seen_by_two_sensors_is_retired_only_when_both_lose_it(defender_sim_factory, servicenow_conn):
    s1 = defender_sim_factory(mode="sensor", devices=6, conn_id="defender_sensor_1", seed=1)
    s2 = defender_sim_factory(mode="sensor", devices=6, conn_id="defender_sensor_2", seed=2)
    d1, d2 = s1.sim.device_ids()[0], s2.sim.device_ids()[0]
    for sim, device_id, name in ((s1, d1, "PLC seen by sensor 1"), (s2, d2, "PLC seen by sensor 2")):
        sim.sim.update_device(device_id, name=name, macAddresses=["00:1b:1b:aa:bb:01"], type="PLC")
    sn = servicenow_conn.sim
    stores = {"defender_sensor_1": MemoryStateStore(), "defender_sensor_2": MemoryStateStore()}

    def sync(source):
        return sim_engine(source, stores[source], retire_after_missing_runs=1).run()

    sync("defender_sensor_1"), sync("defender_sensor_2")
    written = cis(sn)
    ci = written[f"defender_sensor_1:{d1}"]
    assert written[f"defender_sensor_2:{d2}"]["sys_id"] == ci["sys_id"]   # one physical device, one CI

    s1.sim.delete_device(d1)
    first = sync("defender_sensor_1")
    assert (first.retired, first.released) == (0, 1)
    assert sn.get(ci["sys_id"]).get("install_status") != "7"            # sensor 2 still reports it
    assert [r["id"] for r in sn.table("sys_object_source") if r["target_sys_id"] == ci["sys_id"]] == [
        f"defender_sensor_2:{d2}"]

    s2.sim.delete_device(d2)
    last = sync("defender_sensor_2")
    assert last.retired == 1
    assert (sn.get(ci["sys_id"])["install_status"], sn.get(ci["sys_id"])["operational_status"]) == ("7", "6")


def test_entries_the_instance_has_no_ire_rule_for_are_dropped_not_fatal(defender_sim_factory, servicenow_sim_factory,
                                                                         monkeypatch, caplog):
    """An instance whose identification rules have no related-entry rule for IT classes and no lookup rule for
    cmdb_ci_ip_address: the IRE refuses such items (HTTP 200, item errors). The engine resends them without
    those entries, learns it per class (one retry per class, not per device), and says how to add the rule."""
    import json

    from include.simulators.servicenow_sim import SIM_PASSWORD, SIM_USER

    defender_sim_factory(mode="sensor", devices=80, conn_id="defender_sensor_1")
    sn = servicenow_sim_factory(related_rule_classes=("cmdb_ci_ot",),
                                lookup_rule_tables=("cmdb_serial_number", "cmdb_ci_network_adapter"))
    monkeypatch.setenv("AIRFLOW_CONN_SERVICENOW_DEFAULT", json.dumps(
        {"conn_type": "servicenow", "host": sn.url, "login": SIM_USER, "password": SIM_PASSWORD}))
    store = MemoryStateStore()
    caplog.set_level("WARNING", logger="defender_servicenow.sync")
    summary = sim_engine("defender_sensor_1", store, parallel=1).run()
    assert summary.failed == 0 and summary.inserted == summary.seen - summary.skipped
    written = cis(sn.sim)
    assert len(written) == summary.inserted
    assert sn.sim.table("cmdb_ci_ip_address") == []                       # no lookup rule: none sent
    ot = {ci["sys_id"] for ci in written.values() if ci["sys_class_name"].startswith("cmdb_ci_ot")}
    it = {ci["sys_id"] for ci in written.values()} - ot
    assert ot and it
    kv_owners = {r["configuration_item"] for r in sn.sim.table("cmdb_key_value")}
    assert kv_owners <= ot and kv_owners                                 # OT classes keep their attributes
    assert "no IRE related rule for cmdb_key_value" in caplog.text and "CI Class Manager" in caplog.text
    companies = {c["sys_id"]: c["name"] for c in sn.sim.table("core_company")}
    assert companies and not [n for n in companies.values() if re.fullmatch(r"[0-9a-f]{32}", n)]  # no junk
    assert all(companies.get(ci.get("manufacturer"), "x") for ci in written.values() if ci.get("manufacturer"))
    warnings = [r for r in caplog.records if "no IRE" in r.getMessage()]
    assert len(warnings) == len({(r.args[1], r.args[2]) for r in warnings})  # once per (table, class)
    again = sim_engine("defender_sensor_1", store).run()
    assert (again.failed, again.inserted, again.updated) == (0, 0, 0)   # stable: nothing resent


def test_full_resync_brings_back_cis_a_clean_up_retired(defender_sim_factory, servicenow_conn):
    """The documented way back after a retire-mode clean-up: full_resync=true."""
    from defender_servicenow import cleanup
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    defender_sim_factory(mode="sensor", devices=20, conn_id="defender_sensor_1")
    sn = servicenow_conn.sim
    store = MemoryStateStore()
    sim_engine("defender_sensor_1", store).run()
    hook = ServiceNowHook("servicenow_default")
    cleanup.run_cleanup(hook, {"scope": "devices", "mode": "retire", "dry_run": False,
                               "confirm": hook.instance_host})
    assert {ci.get("install_status") for ci in cis(sn).values()} == {"7"}
    assert sim_engine("defender_sensor_1", store).run().updated == 0      # change detection alone: no
    summary = sim_engine("defender_sensor_1", store, full_resync=True).run()
    assert summary.failed == 0
    assert {(ci.get("install_status"), ci.get("operational_status")) for ci in cis(sn).values()} == {("1", "1")}


# --------------------------------------------------------------------------- issue 11


def test_devices_without_serial_or_mac_never_merge_by_name(defender_sim_factory, servicenow_conn):
    """Two sites' "192.168.1.10" (no serial, no MAC) and a CI of another discovery source by that name."""
    sn = servicenow_conn.sim
    other = sn.insert("cmdb_ci_ot", {"name": "192.168.1.10", "discovery_source": "SCCM"})
    sims = [defender_sim_factory(mode="sensor", devices=3, seed=n, conn_id=f"defender_sensor_{n}") for n in (1, 2)]
    for s in sims:
        s.sim.add_device(name="192.168.1.10", macAddresses=[], ipAddresses=["192.168.1.10"])
    store = MemoryStateStore()
    for n in (1, 2):
        assert sim_engine(f"defender_sensor_{n}", store).run().failed == 0
    same = [ci for ci in cis(sn).values() if ci["name"] == "192.168.1.10"]
    assert len(same) == 2 and len({ci["sys_id"] for ci in same} | {other["sys_id"]}) == 3
    assert sn.get(other["sys_id"])["discovery_source"] == "SCCM"        # the other source's CI is untouched


def test_opt_in_joins_a_same_named_ci_of_another_discovery_source(defender_sim_factory, servicenow_conn):
    sn = servicenow_conn.sim
    other = sn.insert("cmdb_ci_ot", {"name": "HMI-PANEL-7", "discovery_source": "SCCM"})
    s = defender_sim_factory(mode="sensor", devices=2, seed=1, conn_id="defender_sensor_1")
    s.sim.add_device(name="HMI-PANEL-7", macAddresses=[], ipAddresses=["10.9.9.9"])
    sim_engine("defender_sensor_1", MemoryStateStore(), match_by_name=True).run()
    assert [ci["sys_id"] for ci in cis(sn).values() if ci["name"] == "HMI-PANEL-7"] == [other["sys_id"]]


def test_missing_counters_advance_once_per_sync_not_per_attempt():
    devices = [device(i) for i in range(1, 5)]
    defender, sn, store = FakeDefender(devices), FakeServiceNow(), MemoryStateStore()
    run(defender, sn, store, retire_after_missing_runs=2, run_id="r1")
    defender.devices = devices[:3]                                  # device 4 gone
    run(defender, sn, store, retire_after_missing_runs=2, run_id="r2")   # 4: missing 1 of 2
    defender.devices = devices[:2]                                  # device 3 gone too
    real_update = sn.update_record

    def outage(*args):
        raise ServiceNowUnavailableError("503 for a while")

    sn.update_record = outage                                       # retiring 4 fails: the attempt fails
    with pytest.raises(ServiceNowUnavailableError):
        run(defender, sn, store, retire_after_missing_runs=2, run_id="r3")
    sn.update_record = real_update
    retry = run(defender, sn, store, retire_after_missing_runs=2, run_id="r3")   # the retry of the same run
    assert retry.retired == 1                                       # 4 only; 3 has missed one sync, not two
    assert SourceState(store, "sensor_a").get("3")[3] == 1
    again = run(defender, sn, store, retire_after_missing_runs=2, run_id="r3")   # a further attempt: no count
    assert again.retired == 0 and SourceState(store, "sensor_a").get("3")[3] == 1


def test_concurrent_releases_retire_the_ci_nobody_claims(defender_sim_factory, servicenow_conn):
    """Forced interleaving: both sensors read each other's claim, then both release theirs."""
    import threading

    from defender_servicenow.hooks.servicenow import ServiceNowHook

    sims = {n: defender_sim_factory(mode="sensor", devices=4, conn_id=f"defender_sensor_{n}", seed=n) for n in (1, 2)}
    ids = {}
    for n, s in sims.items():
        ids[n] = s.sim.device_ids()[0]
        s.sim.update_device(ids[n], name=f"PLC {n}", macAddresses=["00:1b:1b:aa:bb:01"], type="PLC")
    sn, stores = servicenow_conn.sim, {n: MemoryStateStore() for n in sims}
    for n in sims:
        sim_engine(f"defender_sensor_{n}", stores[n], retire_after_missing_runs=1).run()
    ci = cis(sn)[f"defender_sensor_1:{ids[1]}"]["sys_id"]
    both_read = threading.Barrier(2, timeout=30)

    class Gated(ServiceNowHook):
        reads = 0

        def query_in(self, table, *args, **kwargs):
            rows = super().query_in(table, *args, **kwargs)
            self.reads += 1
            if self.reads == 1:      # the claim check: wait until the other sensor has read too
                both_read.wait()
            return rows

    for n, s in sims.items():
        s.sim.delete_device(ids[n])
    results, threads = {}, []
    for n in sims:
        engine = sim_engine(f"defender_sensor_{n}", stores[n], retire_after_missing_runs=1,
                            servicenow=Gated("servicenow_default", max_retry_time=2))
        threads.append(threading.Thread(target=lambda n=n, e=engine: results.__setitem__(n, e.run())))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [1, 2]
    assert (sn.get(ci)["install_status"], sn.get(ci)["operational_status"]) == ("7", "6")
    assert [r for r in sn.table("sys_object_source") if r["target_sys_id"] == ci] == []
    assert sum(r.retired for r in results.values()) >= 1


def test_core_company_unreadable_syncs_without_manufacturer(caplog):
    from defender_servicenow.exceptions import ServiceNowForbiddenError

    class NoCompanies(FakeServiceNow):
        def query(self, table, query="", fields=None, limit=None):
            raise ServiceNowForbiddenError("ACL refused core_company", status=403)

    sn, store = NoCompanies(), MemoryStateStore()
    summary = run(FakeDefender([device(i) for i in range(1, 8)]), sn, store)
    assert summary.inserted == 7 and summary.failed == 0
    assert all("manufacturer" not in ci for ci in sn.cis.values())
    warnings = [r.getMessage() for r in caplog.records if "core_company" in r.getMessage()]
    assert len(warnings) == 1


def test_progress_is_checkpointed_every_ten_batches():
    """What the state store holds while batch 12 is in flight (a SIGKILL there loses only that)."""
    store = MemoryStateStore()

    class Watching(FakeServiceNow):
        seen_at_12 = None

        def identify_reconcile(self, items, data_source, *, dry_run=False):
            if self.calls == 11:
                self.seen_at_12 = len(SourceState(store, "sensor_a"))
            return super().identify_reconcile(items, data_source, dry_run=dry_run)

    sn = Watching()
    run(FakeDefender([device(i, mac_addresses=[], firmware=[]) for i in range(1, 30)]), sn, store,
        batch_size=1, parallel=1, match_by_name=True)
    assert sn.seen_at_12 is not None and sn.seen_at_12 >= 10 - 2   # at most the in-flight batches unrecorded


def test_state_shards_fit_the_store_limit_at_200k_devices_per_source():
    import json

    from airflow.configuration import conf
    from defender_servicenow.sync_state import max_value_bytes

    limit = max_value_bytes()
    assert limit == conf.getint("state_store", "max_value_storage_bytes") > 0
    store = MemoryStateStore()
    state = SourceState(store, "sensor_a", max_value_bytes=limit)
    for i in range(200_000):
        state.put(str(i), [f"{i:016x}", f"{i:032x}", "cmdb_ci_ot_plc", 0, 0])
    state.save()
    sizes = [len(json.dumps(v)) for k, v in store.data.items() if k.startswith("sensor_a/devices/")]
    assert max(sizes) <= limit and sum(map(len, (v for k, v in store.data.items() if "/devices/" in k))) == 200_000
    again = SourceState(store, "sensor_a", max_value_bytes=limit)         # the count is recorded in the meta
    assert again.shards == state.shards > 128 and len(again) == 200_000 and again.get("199999")[1] == f"{199999:032x}"


def test_a_dry_run_with_nothing_to_send_does_not_point_at_a_preview():
    from defender_servicenow.sync_summary import SyncSummary

    nothing = SyncSummary(source="s", dry_run=True)
    assert "no device would be sent to the IRE" in nothing.line() and "preview above" not in nothing.line()
    some = SyncSummary(source="s", dry_run=True, would_send=3)
    assert "the IRE preview above is for 3 devices" in some.line()
    assert "dry run" not in SyncSummary(source="s").line()
