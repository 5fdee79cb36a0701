"""Alert forwarding engine: record building, template, watermarks (pure), and the engine against both
simulators (exactly once, one bulk lookup per chunk, outage then recovery)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from defender_servicenow import forwarding as fwd
from defender_servicenow.hooks.defender import DefenderIoTHook
from defender_servicenow.hooks.servicenow import ServiceNowHook
from defender_servicenow.models import Alert
from defender_servicenow.rules import parse_rules

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
    assert record["correlation_id"] == "defender-iot:defender_iot_default:7"
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
    assert record["u_alert_key"] == "defender_iot_default:7"
    assert record["u_time"] == "2025-03-01 12:00:00"
    assert record["u_source_name"] == "PLC-7 Ünïcode" and record["u_destination_ci"] == "ci-dst"
    assert record["u_protocols"] == "HTTP, MODBUS" and record["u_notification_type"] == "alert"
    assert record["u_remediation_steps"].splitlines() == ["Check the master's configuration",
                                                          "Notify the security officer"]
    assert all(isinstance(v, str) for v in record.values())  # ServiceNow takes strings


# --------------------------------------------------------------------------- watermarks and queries


def test_after_watermark_skips_ids_done_at_the_same_millisecond():
    alerts = [make_alert(id=i, time=T0 + timedelta(milliseconds=ms)) for i, ms in ((1, 0), (2, 0), (3, 5), (4, -1))]
    after = fwd.after_watermark(alerts, fwd.make_watermark(T0_MS, [1]))
    assert [a.id for a in after] == [2, 3]
    assert [a.id for a in fwd.after_watermark(alerts, None)] == [4, 1, 2, 3]


def test_advance_watermark_stops_at_the_first_unconfirmed_alert():
    alerts = [make_alert(id=i, time=T0 + timedelta(milliseconds=ms)) for i, ms in ((1, 0), (2, 0), (3, 5), (4, 9))]
    keys = {a.id: a.key for a in alerts}
    wm = fwd.make_watermark(T0_MS - 1)
    assert fwd.advance_watermark(wm, alerts, {keys[1], keys[2], keys[4]}) == fwd.make_watermark(T0_MS, [1, 2])
    assert fwd.advance_watermark(wm, alerts, {keys[2]}) == wm
    assert fwd.advance_watermark(wm, alerts, set(keys.values())) == fwd.make_watermark(T0_MS + 9, [4])


def test_an_alert_stamped_in_the_future_does_not_move_the_watermark():
    """An appliance whose clock runs ahead must not push the watermark past correctly stamped alerts."""
    wm = fwd.make_watermark(T0_MS)
    alerts = [make_alert(id=1, time=T0 + timedelta(seconds=5)), make_alert(id=2, time=T0 + timedelta(hours=2))]
    done = {a.key for a in alerts}
    assert fwd.advance_watermark(wm, alerts, done) == fwd.make_watermark(T0_MS + 7_200_000, [2])
    ceiling = T0_MS + 60_000
    assert fwd.advance_watermark(wm, alerts, done, ceiling_ms=ceiling) == fwd.make_watermark(T0_MS + 5_000, [1])


def test_in_queries_split_long_lists():
    values = [f"defender-iot:defender_iot_default:{i}" for i in range(400)]
    queries = list(fwd.in_queries("correlation_id", values, max_chars=2000))
    assert len(queries) > 1 and all(len(q) <= 2000 for q in queries)
    assert [v for q in queries for v in q.removeprefix("correlation_idIN").split(",")] == values
    assert list(fwd.in_queries("id", ["a", "b"], prefix="name=X")) == ["name=X^idINa,b"]


# --------------------------------------------------------------------------- the engine against the simulators

PLC_TITLE = "Unauthorized PLC Programming"


class DictState:
    """The sync half of the asset state accessor, in memory (values must be JSON, like the real store)."""

    def __init__(self, data=None):
        self.data = dict(data or {})

    def get(self, key, default=None):
        return self.data.get(key, default)

    def set(self, key, value):
        assert value is not None
        json.dumps(value, allow_nan=False)
        self.data[key] = value


def forwarder(rules, state, *, dry_run=False, retry_seconds=60.0, hooks=None):
    hooks = {} if hooks is None else hooks

    def sn(conn_id):
        hooks[conn_id] = ServiceNowHook(conn_id, max_retry_time=retry_seconds)
        return hooks[conn_id]

    return fwd.AlertForwarder(rules, state, defender_hook=DefenderIoTHook, servicenow_hook=sn, dry_run=dry_run)


def routes(sn_handle) -> dict:
    return {k: v for k, v in sn_handle.sim.counters()["by_route"].items() if "/api/now" in k}


def seed_ci(sn_handle, conn_id, device_id, name):
    ci = sn_handle.sim.insert("cmdb_ci_ot_plc", {"name": name})
    sn_handle.sim.insert("sys_object_source", {"name": "MicrosoftDefenderIoT", "id": f"{conn_id}:{device_id}",
                                               "target_sys_id": ci["sys_id"], "target_table": "cmdb_ci_ot_plc"})
    return ci["sys_id"]


def baseline(rules, state, sources):
    """First run: no watermark and no first-seen record -> starts from now, forwards nothing."""
    reports = forwarder(rules, state).run(sources)
    assert all(r.seen == 0 and r.created == 0 for r in reports)


def test_incidents_exactly_once_with_cmdb_links(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=5)
    sn = servicenow_conn
    rules = rules_with({"type": "servicenow", "report_type": "incidents"})
    state = DictState()
    baseline(rules, state, ["defender_iot_default"])
    wm0 = state.data["forwarded_up_to:defender_iot_default"]

    src, dst = d.sim.device_ids()[:2]
    plc = seed_ci(sn, "defender_iot_default", src, "PLC Line 7")
    hmi = seed_ci(sn, "defender_iot_default", dst, "HMI 2")
    new = d.sim.add_alerts(3, sourceDevice=src, destinationDevice=dst, severity="Critical", engine="Malware",
                           title=PLC_TITLE)
    new += d.sim.add_alerts(1, sourceDevice=0, destinationDevice=dst, severity="Minor", engine="Anomaly",
                            title="Address Scan Detected")
    before = routes(sn)
    (report,) = forwarder(rules, state).run(["defender_iot_default"])
    assert (report.seen, report.created, report.present, report.failures) == (4, 4, 0, [])
    incidents = {r["correlation_id"]: r for r in sn.sim.table("incident")}
    assert set(incidents) == {f"defender-iot:defender_iot_default:{a['id']}" for a in new}
    first = incidents[f"defender-iot:defender_iot_default:{new[0]['id']}"]
    assert first["cmdb_ci"] == plc and "PLC Line 7" in first["description"] and "HMI 2" in first["description"]
    assert first["correlation_display"] == "Microsoft Defender for IoT" and first["priority"] == "1"
    assert incidents[f"defender-iot:defender_iot_default:{new[3]['id']}"]["cmdb_ci"] == hmi  # destination's CI
    # bulk: one existing-record lookup and one Batch API call for the 4 alerts (plus 2 CI lookups)
    used = {k: v - before.get(k, 0) for k, v in routes(sn).items() if v - before.get(k, 0)}
    assert used["GET /api/now/table/incident"] == 1 and used["POST /api/now/v1/batch"] == 1, used
    assert state.data["forwarded_up_to:defender_iot_default"]["time_ms"] == max(a["time"] for a in new)

    # The same run again (e.g. the watermark write was lost): everything is found, nothing is created twice.
    state.data["forwarded_up_to:defender_iot_default"] = wm0
    (again,) = forwarder(rules, state).run(["defender_iot_default"])
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
    baseline(rules, state, ["defender_iot_default"])
    crit = d.sim.add_alerts(2, severity="Critical", engine="Malware", title="Suspicion of Malicious Activity")
    warn = d.sim.add_alerts(1, severity="Warning", engine="Anomaly", title="Address Scan Detected")
    (report,) = forwarder(rules, state).run(["defender_iot_default"])
    assert report.matched == {"app": 3, "critical": 2} and report.failures == []
    rows = {r["u_alert_key"]: r for r in sn.sim.table("u_defender_iot_alert")}
    assert set(rows) == {f"defender_iot_default:{a['id']}" for a in crit + warn}  # once per table, not per rule
    row = rows[f"defender_iot_default:{crit[0]['id']}"]
    assert row["u_severity"] == "Critical" and row["u_sensor_name"] == crit[0]["sensorName"]
    assert row["u_alert_uuid"] == crit[0]["uuid"] and row["u_rules"] == "app, critical"
    assert sorted(r["correlation_id"] for r in sn.sim.table("sn_si_incident")) == sorted(
        f"defender-iot:defender_iot_default:{a['id']}" for a in crit)
    assert sn.sim.table("incident") == []


def test_servicenow_outage_delays_alerts_but_loses_none(defender_sim_factory, servicenow_conn, caplog):
    d = defender_sim_factory(mode="sensor", alerts=2)
    sn = servicenow_conn
    rules = rules_with()
    state = DictState()
    baseline(rules, state, ["defender_iot_default"])
    wm0 = state.data["forwarded_up_to:defender_iot_default"]
    new = d.sim.add_alerts(5, severity="Major", engine="Policy Violation", title="Internet Access Detected")
    sn.sim.set_faults(fail_next={"status": 503, "count": 10**6, "path_prefix": "/api/now"})
    (report,) = forwarder(rules, state, retry_seconds=1).run(["defender_iot_default"])
    assert report.created == 0 and len(report.failures) == 5
    assert "503" in report.failures[0].answer or "unavailable" in report.failures[0].answer.lower()
    assert state.data["forwarded_up_to:defender_iot_default"] == wm0  # not advanced
    with pytest.raises(fwd.ForwardingIncompleteError, match="5 alert"):
        fwd.raise_if_incomplete([report])
    assert sn.sim.table("incident") == []

    sn.sim.faults.fail_next.clear()  # ServiceNow is back
    more = d.sim.add_alerts(2, severity="Critical", engine="Malware", title=PLC_TITLE)
    (report,) = forwarder(rules, state).run(["defender_iot_default"])
    assert (report.created, report.failures) == (7, [])
    ids = [r["correlation_id"] for r in sn.sim.table("incident")]
    assert sorted(ids) == sorted(f"defender-iot:defender_iot_default:{a['id']}" for a in new + more)


def test_alerts_delivered_late_are_forwarded_once(defender_sim_factory, servicenow_conn):
    """A management console receives a reconnecting sensor's alerts late: old times, new ids."""
    d = defender_sim_factory(mode="management_console", alerts=0)
    sn = servicenow_conn
    rules = rules_with()
    state = DictState()
    baseline(rules, state, ["defender_iot_default"])
    # as if forwarding had been running for an hour (tracking of late alerts starts with the first run)
    state.data["recent:defender_iot_default"]["floor_ms"] -= 3_600_000
    on_time = d.sim.add_alerts(2, severity="Major", engine="Anomaly", title="Address Scan Detected")
    (report,) = forwarder(rules, state).run(["defender_iot_default"])
    assert report.created == 2
    watermark = state.data["forwarded_up_to:defender_iot_default"]["time_ms"]

    late = d.sim.add_alerts(1, time=watermark - 60_000, severity="Critical", engine="Malware", title=PLC_TITLE)
    too_late = d.sim.add_alerts(1, time=watermark - 11 * 60_000, severity="Critical", engine="Malware")
    (report,) = forwarder(rules, state).run(["defender_iot_default"])
    assert (report.seen, report.created, report.present) == (1, 1, 0)
    assert state.data["forwarded_up_to:defender_iot_default"]["time_ms"] == watermark  # not moved back
    (again,) = forwarder(rules, state).run(["defender_iot_default"])
    assert (again.seen, again.created) == (0, 0)  # remembered in recent:<conn>, no lookup needed
    keys = sorted(r["correlation_id"] for r in sn.sim.table("incident"))
    assert keys == sorted(f"defender-iot:defender_iot_default:{a['id']}" for a in on_time + late)
    assert f"defender-iot:defender_iot_default:{too_late[0]['id']}" not in keys  # beyond the look-back: replay


def test_a_late_alert_that_failed_holds_the_watermark_until_it_lands(defender_sim_factory, servicenow_conn,
                                                                      monkeypatch):
    """One destination refuses the late alert while newer alerts keep flowing to another: the watermark must
    not run past the late alert's look-back window, or the alert would never be found again."""
    monkeypatch.setattr(fwd, "FUTURE_MARGIN_MS", 3_600_000)   # this test stamps alerts up to 12 min ahead
    d = defender_sim_factory(mode="management_console", alerts=0)
    sn = servicenow_conn
    rules = parse_rules({"rules": [
        {"name": "crit", "minimum_severity": "Critical", "actions": [{"type": "servicenow", "table": "sn_si_incident"}]},
        {"name": "anom", "engines": ["Anomaly"], "actions": [{"type": "servicenow"}]}]},
        default_connection_id="servicenow_default")
    state, src = DictState(), "defender_iot_default"
    baseline(rules, state, [src])
    state.data[f"recent:{src}"]["floor_ms"] -= 3_600_000
    d.sim.add_alerts(2, severity="Major", engine="Anomaly", title="Address Scan Detected")
    (report,) = forwarder(rules, state).run([src])
    wm = state.data[f"forwarded_up_to:{src}"]["time_ms"]
    sn.sim.set_faults(deny_writes=["sn_si_incident"])
    late = d.sim.add_alerts(1, time=wm - 60_000, severity="Critical", engine="Malware", title=PLC_TITLE)
    for minutes in (5, 12):   # newer alerts keep going through to the incident table
        d.sim.add_alerts(1, time=wm + minutes * 60_000, severity="Major", engine="Anomaly",
                         title="Address Scan Detected")
        (report,) = forwarder(rules, state, retry_seconds=1).run([src])
        assert len(report.failures) == 1 and report.failures[0].alert.endswith(f":{late[0]['id']}")
        assert state.data[f"forwarded_up_to:{src}"]["time_ms"] == wm   # held by the failed late alert
    assert len(sn.sim.table("incident")) == 4
    sn.sim.set_faults(deny_writes=[])
    (report,) = forwarder(rules, state).run([src])
    assert report.failures == [] and len(sn.sim.table("incident")) == 4            # no duplicates
    assert [x["correlation_id"] for x in sn.sim.table("sn_si_incident")] == [f"defender-iot:{src}:{late[0]['id']}"]
    assert state.data[f"forwarded_up_to:{src}"]["time_ms"] == wm + 12 * 60_000


def test_a_source_added_later_starts_when_it_was_first_watched(defender_sim_factory, servicenow_conn):
    """Rules that exist for months must not flood ServiceNow with a newly added sensor's backlog."""
    d = defender_sim_factory(mode="sensor", alerts=0)
    old = d.sim.add_alerts(2, severity="Major", engine="Anomaly", title="Address Scan Detected")
    rules = rules_with()
    rule_since = datetime.fromtimestamp(min(a["time"] for a in old) / 1000 - 3600, timezone.utc)
    watched_ms = max(a["time"] for a in old) + 1
    state = DictState({"rule_first_seen:all": rule_since.isoformat(),
                       "watch_start:defender_iot_default": watched_ms})   # what the trigger records
    new = d.sim.add_alerts(1, time=watched_ms + 1000, severity="Major", engine="Anomaly",
                           title="Address Scan Detected")
    (report,) = forwarder(rules, state).run(["defender_iot_default"])
    assert report.created == 1
    assert [r["correlation_id"] for r in servicenow_conn.sim.table("incident")] == [
        f"defender-iot:defender_iot_default:{new[0]['id']}"]


def test_late_alert_tracking_is_pure():
    wm = fwd.make_watermark(T0_MS + 1000, [9])
    alerts = [make_alert(id=i, time=T0 + timedelta(milliseconds=ms)) for i, ms in
              ((1, -700_000), (2, 0), (3, 500), (9, 1000), (10, 2000))]
    recent = {"floor_ms": T0_MS - 10**6, "ids": {"2": T0_MS}}
    assert [a.id for a in fwd.late_alerts(alerts, wm, recent, 600_000)] == [3]
    assert fwd.late_alerts(alerts, wm, {}, 600_000) == []  # no tracking yet: nothing is late
    assert fwd.late_alerts(alerts, wm, recent, 0) == []
    kept = fwd.prune_recent(recent, [alerts[2]], wm, 600_000, floor_ms=T0_MS)
    assert kept == {"floor_ms": T0_MS - 10**6, "ids": {"2": T0_MS, "3": T0_MS + 500}}
    later = fwd.prune_recent(kept, [], fwd.make_watermark(T0_MS + 600_200), 600_000, floor_ms=T0_MS)
    assert later["ids"] == {"3": T0_MS + 500}  # "2" fell out of the window
    assert fwd.prune_recent({}, [], wm, 600_000, floor_ms=T0_MS)["floor_ms"] == T0_MS


def test_partial_batch_failure_keeps_the_watermark_before_the_failed_alert(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=1)
    sn = servicenow_conn
    rules = rules_with()
    state = DictState()
    baseline(rules, state, ["defender_iot_default"])
    first = d.sim.add_alerts(1, severity="Major", engine="Malware", title=PLC_TITLE)
    sn.sim.insert("incident", {"correlation_id": f"defender-iot:defender_iot_default:{first[0]['id']}",
                               "short_description": "created by an earlier, interrupted run"})
    later = d.sim.add_alerts(2, severity="Major", engine="Malware", title=PLC_TITLE)
    (report,) = forwarder(rules, state).run(["defender_iot_default"])
    assert (report.created, report.present) == (2, 1)
    assert state.data["forwarded_up_to:defender_iot_default"]["time_ms"] == later[-1]["time"]


def test_replays_ignore_first_seen_and_overlapping_windows_create_nothing_twice(defender_sim_factory,
                                                                               servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=0)
    sn = servicenow_conn
    rules = rules_with()
    alerts = [d.sim.add_alerts(1, severity="Major", engine="Malware", title=PLC_TITLE,
                               time=T0_MS + i * 60_000)[0] for i in range(6)]
    state = DictState({"rule_first_seen:all": (T0 + timedelta(days=1)).isoformat(),
                       "forwarded_up_to:defender_iot_default": fwd.make_watermark(T0_MS - 1)})
    (normal,) = forwarder(rules, state).run(["defender_iot_default"])
    assert (normal.seen, normal.created) == (6, 0)  # raised before the rule existed
    at = lambda minutes: T0 + timedelta(minutes=minutes)  # noqa: E731
    (dry,) = forwarder(rules, state, dry_run=True).run(["defender_iot_default"], since=at(0), until=at(4))
    assert (dry.would_create, len(sn.sim.table("incident"))) == (4, 0)
    (r1,) = forwarder(rules, state).run(["defender_iot_default"], since=at(0), until=at(4))
    (r2,) = forwarder(rules, state).run(["defender_iot_default"], since=at(2), until=at(6))
    assert (r1.created, r1.present, r2.created, r2.present) == (4, 0, 2, 2)
    assert sorted(r["correlation_id"] for r in sn.sim.table("incident")) == sorted(
        f"defender-iot:defender_iot_default:{a['id']}" for a in alerts)


def test_protocol_rules_read_the_inventory_once(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=0, devices=40)
    modbus = next(i for i in d.sim.device_ids()
                  if any(p.get("name") == "MODBUS" for p in d.sim.device(i).get("protocols") or []))
    other = next(i for i in d.sim.device_ids()
                 if not any(p.get("name") == "MODBUS" for p in d.sim.device(i).get("protocols") or []))
    rules = parse_rules({"rules": [{"name": "modbus", "protocols": ["modbus"], "actions": [{"type": "servicenow"}]}]},
                        default_connection_id="servicenow_default")
    state = DictState({"forwarded_up_to:defender_iot_default": fwd.make_watermark(1)})
    hit = d.sim.add_alerts(2, sourceDevice=modbus, destinationDevice=0, severity="Major", engine="Malware",
                           title=PLC_TITLE)
    d.sim.add_alerts(2, sourceDevice=other, destinationDevice=0, severity="Major", engine="Malware", title=PLC_TITLE)
    before = d.sim.counters()["by_route"].get("GET /api/v1/devices", 0)
    (report,) = forwarder(rules, state).run(["defender_iot_default"])
    assert d.sim.counters()["by_route"].get("GET /api/v1/devices", 0) - before == 1
    assert (report.matched["modbus"], report.created, report.unmatched) == (2, 2, 2)
    assert {r["correlation_id"] for r in servicenow_conn.sim.table("incident")} == {
        f"defender-iot:defender_iot_default:{a['id']}" for a in hit}


def test_a_broken_source_does_not_stop_the_others(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=0, conn_id="defender_good")
    rules = rules_with()
    state = DictState({"forwarded_up_to:defender_good": fwd.make_watermark(1),
                       "forwarded_up_to:defender_gone": fwd.make_watermark(1)})
    d.sim.add_alerts(2, severity="Major", engine="Malware", title=PLC_TITLE)
    gone, good = forwarder(rules, state).run(["defender_gone", "defender_good"])
    assert "defender_gone" in gone.error and good.created == 2
    with pytest.raises(fwd.ForwardingIncompleteError, match="sources not read: defender_gone"):
        fwd.raise_if_incomplete([gone, good])
    assert state.data["forwarded_up_to:defender_gone"] == fwd.make_watermark(1)


def test_rejected_credentials_are_not_retried_and_lose_nothing(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=0)
    sn = servicenow_conn
    rules = rules_with()
    state = DictState()
    baseline(rules, state, ["defender_iot_default"])
    wm0 = state.data["forwarded_up_to:defender_iot_default"]
    new = d.sim.add_alerts(2, severity="Major", engine="Anomaly", title="Address Scan Detected")
    sn.sim.set_faults(reject_credentials=True, revoke_tokens=True)
    (report,) = forwarder(rules, state, retry_seconds=1).run(["defender_iot_default"])
    assert report.credentials_rejected and report.created == 0
    with pytest.raises(fwd.ForwardingCredentialsError, match="not retried") as err:
        fwd.raise_if_incomplete([report])
    assert all(secret not in str(err.value) for secret in ("sim-Password-1", "sim-client-secret-0123456789"))  # no secret
    assert state.data["forwarded_up_to:defender_iot_default"] == wm0

    sn.sim.set_faults(reject_credentials=False)                  # fixed by an admin
    (report,) = forwarder(rules, state).run(["defender_iot_default"])
    assert report.created == 2 and not report.credentials_rejected
    assert sorted(r["correlation_id"] for r in sn.sim.table("incident")) == sorted(
        f"defender-iot:defender_iot_default:{a['id']}" for a in new)


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
    baseline(rules, state, ["defender_iot_default"])
    wm0 = state.data["forwarded_up_to:defender_iot_default"]
    d.sim.add_alerts(3, severity="Major", engine="Anomaly", title="Address Scan Detected")
    engine = forwarder(rules, state, retry_seconds=1)
    engine.chunk_size = 2                                              # two chunks: the failure comes first
    (report,) = engine.run(["defender_iot_default"])
    assert report.created == 3 and len(sn.sim.table("incident")) == 3
    assert len(report.failures) == 3 and all(f.destination.table == "sn_si_incident" for f in report.failures)
    assert "table" in report.failures[0].answer.lower()
    assert state.data["forwarded_up_to:defender_iot_default"] == wm0   # retried later, nothing lost
