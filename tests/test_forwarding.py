"""Alert forwarding engine: record building, template, watermarks (pure), and the engine against both
simulators (exactly once, one bulk lookup per chunk, outage then recovery)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from defender_servicenow import forwarding as fwd
from defender_servicenow.hooks.servicenow import ServiceNowHook
from defender_servicenow.models import Alert
from defender_servicenow.rules import parse_rules
from defender_servicenow.sources import source_for

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
T0_MS = int(T0.timestamp() * 1000)


def make_alert(**kw) -> Alert:
    values = dict(source="defender_iot_default", id=7, uuid="7-1740830400000", time=T0,
                  title="Illegal MODBUS Operation (Exception Raised by Master)",
                  message="A MODBUS master 192.168.110.131 attempted to initiate an illegal operation.",
                  severity="Major", engine="Protocol Violation", source_device_id=3, destination_device_id=4,
                  source_address="192.168.110.131", destination_address="192.168.110.20",
                  remediation_steps=["Check the master's configuration", "Notify the security officer"],
                  additional_information={"description": "External Addresses", "information": ["170.60.50.201"]},
                  sensor_name="sensor-plant-1", zone_name="Zone A", site_name="Rotterdam")
    values.update(kw)
    return Alert(**values)


def rules_with(*actions, **top):
    return parse_rules({"rules": [{"name": "all", "actions": list(actions) or [{"type": "servicenow"}]}], **top},
                       default_connection_id="servicenow_default")


def ctx(alert=None, source_ci="ci-src", dest_ci="ci-dst"):
    alert = alert or make_alert()
    return fwd.AlertContext(alert, "appliance-1",
                            fwd.DeviceRef(3, "PLC-7 Ünïcode", alert.source_address, source_ci, ("MODBUS",)),
                            fwd.DeviceRef(4, "HMI-2", alert.destination_address, dest_ci, ("MODBUS", "HTTP")),
                            ("all", "modbus-only"))


# --------------------------------------------------------------------------- template and records


def test_description_template_has_everything_people_need():
    text = fwd.render_description(ctx())
    for expected in ("A MODBUS master 192.168.110.131 attempted", "Severity: Major", "Engine: Protocol Violation",
                     "Source: PLC-7 Ünïcode (192.168.110.131)", "Destination: HMI-2 (192.168.110.20)",
                     "Sensor: sensor-plant-1", "Zone: Zone A", "Site: Rotterdam", "Remediation steps:",
                     "1. Check the master's configuration", "2. Notify the security officer",
                     "External Addresses:", "- 170.60.50.201", "2025-03-01 12:00:00 UTC", "alert 7",
                     "UUID 7-1740830400000", "all, modbus-only"):
        assert expected in text, expected
    assert "{{" not in text and "None" not in text


def test_description_without_devices_or_extras():
    alert = make_alert(source_device_id=None, destination_device_id=None, source_address=None,
                       destination_address=None, remediation_steps=[], additional_information=None,
                       zone_name=None, site_name=None, uuid=None)
    text = fwd.render_description(fwd.AlertContext(alert, "appliance-1", None, None, ("r",)))
    assert "Source: n/a" in text and "Destination: n/a" in text and "Zone: n/a" in text
    assert "Remediation" not in text and "UUID" not in text and "None" not in text


@pytest.mark.parametrize("severity, impact, urgency", [("Critical", "1", "1"), ("Major", "1", "2"),
                                                       ("Minor", "2", "2"), ("Warning", "3", "2")])
def test_incident_record(severity, impact, urgency):
    record = fwd.build_incident(ctx(make_alert(severity=severity)), rules_with())
    assert record["impact"] == impact and record["urgency"] == urgency
    assert record["correlation_id"] == "defender-iot:defender_iot_default:7@1740830400000"
    assert record["correlation_display"] == "Microsoft Defender for IoT"
    assert record["short_description"] == "Illegal MODBUS Operation (Exception Raised by Master) (sensor-plant-1)"
    assert record["cmdb_ci"] == "ci-src"
    assert "Remediation steps" in record["description"]


def test_incident_ci_falls_back_to_destination_and_mapping_is_configurable():
    rules = rules_with(severity_mapping={"Major": {"impact": 3, "urgency": 3}})
    record = fwd.build_incident(ctx(source_ci=None), rules)
    assert record["cmdb_ci"] == "ci-dst" and (record["impact"], record["urgency"]) == ("3", "3")
    assert "cmdb_ci" not in fwd.build_incident(ctx(source_ci=None, dest_ci=None), rules)
    long = fwd.build_incident(ctx(make_alert(title="x" * 300)), rules)
    assert len(long["short_description"]) == 160


def test_application_record_columns():
    record = fwd.build_application_record(ctx())
    assert record["u_alert_key"] == "defender_iot_default:7@1740830400000"
    assert record["u_time"] == "2025-03-01 12:00:00"
    assert record["u_source_name"] == "PLC-7 Ünïcode" and record["u_destination_ci"] == "ci-dst"
    assert record["u_protocols"] == "HTTP, MODBUS" and record["u_notification_type"] == "alert"
    assert record["u_remediation_steps"].splitlines() == ["Check the master's configuration",
                                                          "Notify the security officer"]
    assert all(isinstance(v, str) for v in record.values())  # ServiceNow takes strings


# --------------------------------------------------------------------------- queries


def test_in_queries_split_long_lists():
    values = [f"defender-iot:defender_iot_default:{i}" for i in range(400)]
    queries = list(fwd.in_queries("correlation_id", values, max_chars=2000))
    assert len(queries) > 1 and all(len(q) <= 2000 for q in queries)
    assert [v for q in queries for v in q.removeprefix("correlation_idIN").split(",")] == values
    assert list(fwd.in_queries("id", ["a", "b"], prefix="name=X")) == ["name=X^idINa,b"]


# --------------------------------------------------------------------------- the engine against the simulators

PLC_TITLE = "Unauthorized PLC Programming"
SRC = "defender_iot_default"
EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc).isoformat()


def cid(alert: dict, conn: str = SRC) -> str:
    """The correlation_id of a simulator alert."""
    return f"defender-iot:{conn}:{alert['id']}@{alert['time']}"


class DictState:
    """The sync half of the asset state accessor, in memory (values must be JSON, like the real store)."""

    def __init__(self, data=None):
        self.data = dict(data or {})
        self.writes = 0

    def get(self, key, default=None):
        return self.data.get(key, default)

    def set(self, key, value):
        assert value is not None
        json.dumps(value, allow_nan=False)
        self.data[key] = json.loads(json.dumps(value))
        self.writes += 1


def forwarder(rules, state, *, dry_run=False, retry_seconds=60.0, hooks=None, **kw):
    hooks = {} if hooks is None else hooks

    def sn(conn_id):
        hooks[conn_id] = ServiceNowHook(conn_id, max_retry_time=retry_seconds)
        return hooks[conn_id]

    return fwd.AlertForwarder(rules, state, defender_hook=source_for, servicenow_hook=sn, dry_run=dry_run, **kw)


def routes(sn_handle) -> dict:
    return {k: v for k, v in sn_handle.sim.counters()["by_route"].items() if "/api/now" in k}


def seed_ci(sn_handle, conn_id, device_id, name):
    ci = sn_handle.sim.insert("cmdb_ci_ot_plc", {"name": name})
    sn_handle.sim.insert("sys_object_source", {"name": "MicrosoftDefenderIoT", "id": f"{conn_id}:{device_id}",
                                               "target_sys_id": ci["sys_id"], "target_table": "cmdb_ci_ot_plc"})
    return ci["sys_id"]


def baseline(rules, state, sources):
    """First run: no ledger and no first-seen record -> starts from now, forwards nothing."""
    reports = forwarder(rules, state).run(sources)
    assert all(r.seen == 0 and r.created == 0 for r in reports)


def pending(state, src=SRC) -> dict:
    """The ledger's ``pending`` as the engine reads it (kept in segments, see ``ledger_state``)."""
    from defender_servicenow.ledger_state import LedgerState

    return LedgerState(state, src).load().pending


def done(state, src=SRC) -> dict:
    """The ledger's ``done`` as the engine reads it (kept in segments, see ``ledger_state``)."""
    from defender_servicenow.ledger_state import LedgerState

    return LedgerState(state, src).load().done


def forget_done(state, src=SRC) -> None:
    """As if the ledger's ``done`` had been lost (e.g. a replay): the look-up in ServiceNow decides."""
    from defender_servicenow.ledger_state import done_segment_key

    main = state.data[f"ledger:{src}"]
    for segment in main.pop("done_segments", []):
        state.data.pop(done_segment_key(src, segment), None)
    main["done"] = {}


def test_incidents_exactly_once_with_cmdb_links(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=5)
    sn = servicenow_conn
    rules = rules_with({"type": "servicenow", "report_type": "incidents"})
    state = DictState()
    baseline(rules, state, [SRC])

    src, dst = d.sim.device_ids()[:2]
    plc = seed_ci(sn, SRC, src, "PLC Line 7")
    hmi = seed_ci(sn, SRC, dst, "HMI 2")
    new = d.sim.add_alerts(3, sourceDevice=src, destinationDevice=dst, severity="Critical", engine="Malware",
                           title=PLC_TITLE)
    new += d.sim.add_alerts(1, sourceDevice=0, destinationDevice=dst, severity="Minor", engine="Anomaly",
                            title="Address Scan Detected")
    before = routes(sn)
    (report,) = forwarder(rules, state).run([SRC])
    assert (report.seen, report.created, report.present, report.failures) == (4, 4, 0, [])
    incidents = {r["correlation_id"]: r for r in sn.sim.table("incident")}
    assert set(incidents) == {cid(a) for a in new}
    first = incidents[cid(new[0])]
    assert first["cmdb_ci"] == plc and "PLC Line 7" in first["description"] and "HMI 2" in first["description"]
    assert first["correlation_display"] == "Microsoft Defender for IoT" and first["priority"] == "1"
    assert incidents[cid(new[3])]["cmdb_ci"] == hmi  # destination's CI
    # bulk: one existing-record lookup and one Batch API call for the 4 alerts (plus 2 CI lookups)
    used = {k: v - before.get(k, 0) for k, v in routes(sn).items() if v - before.get(k, 0)}
    assert used["GET /api/now/table/incident"] == 1 and used["POST /api/now/v1/batch"] == 1, used
    status = state.data[f"status:{SRC}"]
    assert status["last_outcome"] == "ok" and status["pending"] == 0 and status["kind"] == "sensor"

    # Nothing new: no ServiceNow request at all.
    before = routes(sn)
    (idle,) = forwarder(rules, state).run([SRC])
    assert (idle.seen, idle.created) == (0, 0) and routes(sn) == before

    # The same run again (e.g. the ledger write was lost): everything is found, nothing is created twice.
    forget_done(state)
    (again,) = forwarder(rules, state).run([SRC])
    assert (again.created, again.present) == (0, 4)
    assert len(sn.sim.table("incident")) == 4


def test_application_table_and_several_destinations_on_a_management_console(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="management_console", alerts=3, sensors=2)
    sn = servicenow_conn
    app = {"type": "servicenow", "report_type": "defender_for_iot_application"}
    rules = parse_rules({"rules": [
        {"name": "app", "actions": [app]},
        {"name": "critical", "minimum_severity": "Critical", "engines": ["Malware"],
         "actions": [app, {"type": "servicenow", "table": "sn_si_incident"}]},
    ]}, default_connection_id="servicenow_default")
    state = DictState()
    baseline(rules, state, [SRC])
    crit = d.sim.add_alerts(2, severity="Critical", engine="Malware", title="Suspicion of Malicious Activity")
    warn = d.sim.add_alerts(1, severity="Warning", engine="Anomaly", title="Address Scan Detected")
    (report,) = forwarder(rules, state).run([SRC])
    assert report.matched == {"app": 3, "critical": 2} and report.failures == []
    rows = {r["u_alert_key"]: r for r in sn.sim.table("u_defender_iot_alert")}
    assert set(rows) == {cid(a).removeprefix("defender-iot:") for a in crit + warn}  # once per table, not per rule
    row = rows[cid(crit[0]).removeprefix("defender-iot:")]
    assert row["u_severity"] == "Critical" and row["u_sensor_name"] == crit[0]["sensorName"]
    assert row["u_alert_uuid"] == crit[0]["uuid"] and row["u_rules"] == "app, critical"
    assert sorted(r["correlation_id"] for r in sn.sim.table("sn_si_incident")) == sorted(cid(a) for a in crit)
    assert sn.sim.table("incident") == []
    assert crit[0]["sensorName"] in state.data[f"status:{SRC}"]["sensors"]   # per-sensor progress


def test_servicenow_outage_delays_alerts_but_loses_none(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=2)
    sn = servicenow_conn
    rules = rules_with()
    state = DictState()
    baseline(rules, state, [SRC])
    new = d.sim.add_alerts(5, severity="Major", engine="Policy Violation", title="Internet Access Detected")
    sn.sim.set_faults(fail_next={"status": 503, "count": 10**6, "path_prefix": "/api/now"})
    (report,) = forwarder(rules, state, retry_seconds=1).run([SRC])
    assert report.created == 0 and len(report.failures) == 5
    assert "503" in report.failures[0].answer or "unavailable" in report.failures[0].answer.lower()
    assert set(pending(state)) == {cid(a).removeprefix("defender-iot:") for a in new}
    status = state.data[f"status:{SRC}"]
    assert status["last_outcome"] == "failed" and status["pending"] == 5 and "503" in status["last_failure"]["message"]
    with pytest.raises(fwd.ForwardingIncompleteError, match="5 alert"):
        fwd.raise_if_incomplete([report])
    assert sn.sim.table("incident") == []

    sn.sim.faults.fail_next.clear()  # ServiceNow is back
    more = d.sim.add_alerts(2, severity="Critical", engine="Malware", title=PLC_TITLE)
    (report,) = forwarder(rules, state).run([SRC])
    assert (report.created, report.failures) == (7, [])
    assert sorted(r["correlation_id"] for r in sn.sim.table("incident")) == sorted(cid(a) for a in new + more)
    status = state.data[f"status:{SRC}"]
    assert status["last_outcome"] == "ok" and status["pending"] == 0 and status["last_failure"]  # kept


def test_alerts_delivered_late_are_forwarded_once(defender_sim_factory, servicenow_conn):
    """A management console receives a reconnecting sensor's alerts late: old times, new ids."""
    d = defender_sim_factory(mode="management_console", alerts=0)
    sn = servicenow_conn
    rules = rules_with()
    state = DictState({"rule_first_seen:all": EPOCH})
    baseline(rules, state, [SRC])
    state.data[f"ledger:{SRC}"]["floor_ms"] -= 6 * 3_600_000   # as if forwarding had been running for hours
    on_time = d.sim.add_alerts(2, severity="Major", engine="Anomaly", title="Address Scan Detected")
    (report,) = forwarder(rules, state).run([SRC])
    assert report.created == 2
    newest = max(a["time"] for a in on_time)
    late = d.sim.add_alerts(1, time=newest - 60_000, severity="Critical", engine="Malware", title=PLC_TITLE)
    very_late = d.sim.add_alerts(1, time=newest - 3 * 3_600_000, severity="Critical", engine="Malware")
    (report,) = forwarder(rules, state).run([SRC])
    assert (report.seen, report.created, report.present) == (2, 2, 0)
    (again,) = forwarder(rules, state).run([SRC])
    assert (again.seen, again.created) == (0, 0)  # remembered in the ledger, no lookup needed
    keys = sorted(r["correlation_id"] for r in sn.sim.table("incident"))
    assert keys == sorted(cid(a) for a in on_time + late + very_late)


def test_a_failed_alert_stays_pending_while_newer_ones_flow(defender_sim_factory, servicenow_conn):
    """One destination refuses an alert while newer alerts keep flowing to another: the refused one stays
    pending (retried every run) and lands once the destination is fixed, without duplicates."""
    d = defender_sim_factory(mode="management_console", alerts=0)
    sn = servicenow_conn
    rules = parse_rules({"rules": [
        {"name": "crit", "minimum_severity": "Critical", "actions": [{"type": "servicenow", "table": "sn_si_incident"}]},
        {"name": "anom", "engines": ["Anomaly"], "actions": [{"type": "servicenow"}]}]},
        default_connection_id="servicenow_default")
    state = DictState()
    baseline(rules, state, [SRC])
    sn.sim.set_faults(deny_writes=["sn_si_incident"])
    late = d.sim.add_alerts(1, severity="Critical", engine="Malware", title=PLC_TITLE)
    for _ in range(2):   # newer alerts keep going through to the incident table
        d.sim.add_alerts(1, severity="Major", engine="Anomaly", title="Address Scan Detected")
        (report,) = forwarder(rules, state, retry_seconds=1).run([SRC])
        assert len(report.failures) == 1 and report.failures[0].alert.startswith(f"{SRC}:{late[0]['id']}@")
        assert list(pending(state)) == [cid(late[0]).removeprefix("defender-iot:")]
    assert len(sn.sim.table("incident")) == 2
    sn.sim.set_faults(deny_writes=[])
    (report,) = forwarder(rules, state).run([SRC])
    assert report.failures == [] and len(sn.sim.table("incident")) == 2            # no duplicates
    assert [x["correlation_id"] for x in sn.sim.table("sn_si_incident")] == [cid(late[0])]
    assert pending(state) == {}


def test_a_source_added_later_starts_when_it_was_first_watched(defender_sim_factory, servicenow_conn):
    """Rules that exist for months must not flood ServiceNow with a newly added sensor's backlog."""
    d = defender_sim_factory(mode="sensor", alerts=0)
    old = d.sim.add_alerts(2, severity="Major", engine="Anomaly", title="Address Scan Detected")
    rules = rules_with()
    rule_since = datetime.fromtimestamp(min(a["time"] for a in old) / 1000 - 3600, timezone.utc)
    watched_ms = max(a["time"] for a in old) + 1
    state = DictState({"rule_first_seen:all": rule_since.isoformat(),
                       f"watch_start:{SRC}": watched_ms})   # what the trigger records
    new = d.sim.add_alerts(1, time=watched_ms + 1000, severity="Major", engine="Anomaly",
                           title="Address Scan Detected")
    (report,) = forwarder(rules, state).run([SRC])
    assert report.created == 1
    assert [r["correlation_id"] for r in servicenow_conn.sim.table("incident")] == [cid(new[0])]


def test_an_interrupted_run_is_found_again(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=1)
    sn = servicenow_conn
    rules = rules_with()
    state = DictState()
    baseline(rules, state, [SRC])
    first = d.sim.add_alerts(1, severity="Major", engine="Malware", title=PLC_TITLE)
    sn.sim.insert("incident", {"correlation_id": cid(first[0]),
                               "short_description": "created by an earlier, interrupted run"})
    d.sim.add_alerts(2, severity="Major", engine="Malware", title=PLC_TITLE)
    (report,) = forwarder(rules, state).run([SRC])
    assert (report.created, report.present) == (2, 1)
    assert len(done(state)) == 3


def test_replays_ignore_first_seen_and_overlapping_windows_create_nothing_twice(defender_sim_factory,
                                                                               servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=0)
    sn = servicenow_conn
    rules = rules_with()
    alerts = [d.sim.add_alerts(1, severity="Major", engine="Malware", title=PLC_TITLE,
                               time=T0_MS + i * 60_000)[0] for i in range(6)]
    state = DictState({"rule_first_seen:all": (T0 + timedelta(days=1)).isoformat(),
                       f"ledger:{SRC}": {"floor_ms": T0_MS - 1, "keys_since_ms": T0_MS - 1}})
    clock = lambda: T0 + timedelta(minutes=30)  # noqa: E731
    (normal,) = forwarder(rules, state, clock=clock).run([SRC])
    assert (normal.seen, normal.created) == (6, 0)  # raised before the rule existed
    at = lambda minutes: T0 + timedelta(minutes=minutes)  # noqa: E731
    (dry,) = forwarder(rules, state, dry_run=True, clock=clock).run([SRC], since=at(0), until=at(4))
    assert (dry.would_create, len(sn.sim.table("incident"))) == (4, 0)
    (r1,) = forwarder(rules, state, clock=clock).run([SRC], since=at(0), until=at(4))
    (r2,) = forwarder(rules, state, clock=clock).run([SRC], since=at(2), until=at(6))
    assert (r1.created, r1.present, r2.created, r2.present) == (4, 0, 2, 2)
    assert sorted(r["correlation_id"] for r in sn.sim.table("incident")) == sorted(cid(a) for a in alerts)


def test_protocol_rules_read_the_inventory_once(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=0, devices=40)
    modbus = next(i for i in d.sim.device_ids()
                  if any(p.get("name") == "MODBUS" for p in d.sim.device(i).get("protocols") or []))
    other = next(i for i in d.sim.device_ids()
                 if not any(p.get("name") == "MODBUS" for p in d.sim.device(i).get("protocols") or []))
    rules = parse_rules({"rules": [{"name": "modbus", "protocols": ["modbus"], "actions": [{"type": "servicenow"}]}]},
                        default_connection_id="servicenow_default")
    state = DictState({f"ledger:{SRC}": {"floor_ms": 1, "keys_since_ms": 1}, "rule_first_seen:modbus": EPOCH})
    hit = d.sim.add_alerts(2, sourceDevice=modbus, destinationDevice=0, severity="Major", engine="Malware",
                           title=PLC_TITLE)
    d.sim.add_alerts(2, sourceDevice=other, destinationDevice=0, severity="Major", engine="Malware", title=PLC_TITLE)
    before = d.sim.counters()["by_route"].get("GET /api/v1/devices", 0)
    (report,) = forwarder(rules, state).run([SRC])
    assert d.sim.counters()["by_route"].get("GET /api/v1/devices", 0) - before == 1
    assert (report.matched["modbus"], report.created, report.unmatched) == (2, 2, 2)
    assert {r["correlation_id"] for r in servicenow_conn.sim.table("incident")} == {cid(a) for a in hit}
    # more alerts: the inventory is not read again before DEFENDER_SYNC_FREQUENCY_MINUTES
    d.sim.add_alerts(2, sourceDevice=modbus, destinationDevice=0, severity="Major", engine="Malware", title=PLC_TITLE)
    (report,) = forwarder(rules, state).run([SRC])
    assert report.created == 2 and d.sim.counters()["by_route"].get("GET /api/v1/devices", 0) - before == 1


def test_a_broken_source_does_not_stop_the_others(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=0, conn_id="defender_good")
    rules = rules_with()
    state = DictState({"rule_first_seen:all": EPOCH})
    forwarder(rules, state).run(["defender_gone", "defender_good"])
    d.sim.add_alerts(2, severity="Major", engine="Malware", title=PLC_TITLE)
    gone, good = forwarder(rules, state).run(["defender_gone", "defender_good"])
    assert "defender_gone" in gone.error and good.created == 2
    with pytest.raises(fwd.ForwardingIncompleteError, match="sources not read: defender_gone"):
        fwd.raise_if_incomplete([gone, good])
    assert state.data["status:defender_gone"]["last_outcome"] == "failed"
    assert state.data["status:defender_good"]["last_outcome"] == "ok"


def test_rejected_credentials_are_not_retried_and_lose_nothing(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=0)
    sn = servicenow_conn
    rules = rules_with()
    state = DictState()
    baseline(rules, state, [SRC])
    new = d.sim.add_alerts(2, severity="Major", engine="Anomaly", title="Address Scan Detected")
    sn.sim.set_faults(reject_credentials=True, revoke_tokens=True)
    (report,) = forwarder(rules, state, retry_seconds=1).run([SRC])
    assert report.credentials_rejected and report.created == 0
    with pytest.raises(fwd.ForwardingCredentialsError, match="not retried") as err:
        fwd.raise_if_incomplete([report])
    assert all(secret not in str(err.value) for secret in ("sim-Password-1", "sim-client-secret-0123456789"))  # no secret
    assert len(pending(state)) == 2

    sn.sim.set_faults(reject_credentials=False)                  # fixed by an admin
    (report,) = forwarder(rules, state).run([SRC])
    assert report.created == 2 and not report.credentials_rejected
    assert sorted(r["correlation_id"] for r in sn.sim.table("incident")) == sorted(cid(a) for a in new)


def test_a_missing_table_does_not_hold_up_the_other_destinations(defender_sim_factory, servicenow_sim_factory,
                                                                  monkeypatch):
    """An instance without the Security Incident Response plugin: the sn_si_incident action fails plainly,
    the incident action on the same instance still goes through, and the alerts are retried later."""
    from include.simulators.servicenow_sim import SIM_PASSWORD, SIM_USER

    d = defender_sim_factory(mode="sensor", alerts=0)
    sn = servicenow_sim_factory(absent_tables=("sn_si_incident",))
    monkeypatch.setenv("AIRFLOW_CONN_SERVICENOW_DEFAULT", json.dumps(
        {"conn_type": "servicenow", "host": sn.url, "login": SIM_USER, "password": SIM_PASSWORD}))
    rules = rules_with({"type": "servicenow"}, {"type": "servicenow", "table": "sn_si_incident"})
    state = DictState()
    baseline(rules, state, [SRC])
    d.sim.add_alerts(3, severity="Major", engine="Anomaly", title="Address Scan Detected")
    engine = forwarder(rules, state, retry_seconds=1)
    engine.chunk_size = 2                                              # two chunks: the failure comes first
    before = routes(sn)
    (report,) = engine.run([SRC])
    assert report.created == 3 and len(sn.sim.table("incident")) == 3
    assert len(report.failures) == 3 and all(f.destination.table == "sn_si_incident" for f in report.failures)
    assert "table" in report.failures[0].answer.lower()
    assert len(pending(state)) == 3   # retried later, nothing lost
    used = {k: v - before.get(k, 0) for k, v in routes(sn).items()}
    assert used.get("GET /api/now/table/sn_si_incident", 0) == 1   # parked after its first failure
