"""Closed loop (opt-in): incidents closed in ServiceNow get their alerts handled on the management console,
once; sensors are skipped; a console refusing a UUID is reported and retried from the same point."""

from __future__ import annotations

import pytest
from defender_servicenow.closeloop import handle_closed_alerts, scan_key
from defender_servicenow.hooks.defender import DefenderIoTHook
from defender_servicenow.hooks.servicenow import ServiceNowHook
from defender_servicenow.sources import source_for

from tests.test_forwarding import DictState, baseline, forwarder, rules_with

CONN = "defender_iot_default"


def close(incident: dict, state: str = "7") -> None:
    ServiceNowHook("servicenow_default").update_record("incident", incident["sys_id"], {
        "state": state, "close_code": "Solved (Permanently)", "close_notes": "Handled by the OT team"})


def run(rules, state, sources=(CONN,), action="handle"):
    return handle_closed_alerts(rules, state, list(sources), action=action, defender_hook=source_for,
                                servicenow_hook=ServiceNowHook)


def listing_times(call):
    """``(call(), [from_time of every console alert listing made during it])``."""
    seen = []
    real = DefenderIoTHook.get_alerts

    def spy(self, *args, **kw):
        seen.append(kw.get("from_time"))
        return real(self, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DefenderIoTHook, "get_alerts", spy)
        return call(), seen


@pytest.fixture
def forwarded(defender_sim_factory, servicenow_conn):
    """Three alerts forwarded as incidents from a management console."""
    d = defender_sim_factory(mode="management_console", alerts=0)
    rules = rules_with({"type": "servicenow", "report_type": "incidents"})
    state = DictState()
    baseline(rules, state, [CONN])
    alerts = d.sim.add_alerts(3, severity="Major", engine="Anomaly", title="Address Scan Detected")
    (report,) = forwarder(rules, state).run([CONN])
    assert report.created == 3
    incidents = {r["correlation_id"].rsplit(":", 1)[1].split("@")[0]: r for r in servicenow_conn.sim.table("incident")}
    return d, servicenow_conn, rules, state, alerts, incidents


def test_closed_and_resolved_incidents_handle_their_alerts_once(forwarded):
    d, sn, rules, state, alerts, incidents = forwarded
    close(incidents[str(alerts[0]["id"])], "7")
    close(incidents[str(alerts[1]["id"])], "6")            # resolved counts as done too
    (report,) = run(rules, state)
    assert (report.closed, report.handled, report.already, report.failures) == (2, 2, 0, [])
    states = {a["id"]: d.sim.alert_by_uuid(a["uuid"])["state"] for a in alerts}
    assert [states[a["id"]] for a in alerts] == ["handled", "handled", "unhandled"]
    assert state.data[scan_key(CONN, "servicenow_default", "incident")]

    (again,) = run(rules, state)                            # rerun: nothing handled twice
    assert again.handled == 0 and again.failures == []
    puts = d.sim.counters()["by_route"]
    assert sum(n for route, n in puts.items() if route.startswith("PUT")) == 2


def test_handle_and_learn_and_alerts_handled_in_defender_meanwhile(forwarded):
    d, sn, rules, state, alerts, incidents = forwarded
    d.sim.handle_alert(alerts[2]["uuid"], "handle")         # an analyst handled it in Defender already
    for a in alerts[1:]:
        close(incidents[str(a["id"])])
    (report,) = run(rules, state, action="handleAndLearn")
    assert (report.handled, report.already) == (1, 1)
    assert d.sim.alert_by_uuid(alerts[1]["uuid"])["state"] != "unhandled"


def test_sensors_are_skipped_and_refusals_are_retried(forwarded, defender_sim_factory):
    d, sn, rules, state, alerts, incidents = forwarded
    defender_sim_factory(mode="sensor", conn_id="defender_sensor_x")
    (sensor,) = run(rules, state, sources=["defender_sensor_x"])
    assert sensor.skipped and "sensor" in sensor.skipped

    close(incidents[str(alerts[0]["id"])])
    d.sim.set_faults(fail_next={"count": 1, "status": 500, "path_prefix": "/external/v1/alerts/"})
    (failed,) = run(rules, state)
    assert failed.handled == 0 and len(failed.failures) == 1 and "500" in failed.failures[0]
    assert scan_key(CONN, "servicenow_default", "incident") not in state.data   # watermark not advanced
    (retried,) = run(rules, state)
    assert (retried.handled, retried.failures) == (1, [])


def test_unknown_action_is_refused():
    with pytest.raises(ValueError, match="handleAndLearn"):
        handle_closed_alerts(rules_with(), DictState(), [], action="close", defender_hook=None, servicenow_hook=None)


def test_only_our_incidents_closed_by_a_person_are_acted_on(forwarded):
    """Case 9: a retire-mode clean-up closes incidents with its own close notes: their alerts are not handled
    (that would learn their traffic into the baseline); an incident someone else created with our
    correlation_id is ignored too; both are counted."""
    from defender_servicenow.cleanup import CLOSE_NOTES

    d, sn, rules, state, alerts, incidents = forwarded
    ServiceNowHook("servicenow_default").update_record("incident", incidents[str(alerts[0]["id"])]["sys_id"], {
        "state": "7", "close_code": "Closed/Resolved by Caller", "close_notes": CLOSE_NOTES})
    forged = sn.sim.insert("incident", {"correlation_id": incidents[str(alerts[1]["id"])]["correlation_id"],
                                        "correlation_display": "Microsoft Defender for IoT", "state": "7",
                                        })
    assert forged["sys_created_by"] != "admin"   # not the integration user (SIM_USER)
    (report,) = run(rules, state, action="handleAndLearn")
    assert (report.handled, report.ignored) == (0, 2)
    assert [d.sim.alert_by_uuid(a["uuid"])["state"] for a in alerts] == ["unhandled"] * 3


def test_the_unhandled_listing_is_bounded_by_time(forwarded):
    """Case 11: the console's unhandled alerts are listed from the closed incidents' alert times only."""
    d, sn, rules, state, alerts, incidents = forwarded
    close(incidents[str(alerts[0]["id"])])
    (report,), seen = listing_times(lambda: run(rules, state))
    assert report.handled == 1 and seen and seen[0] is not None
    assert int(seen[0].timestamp() * 1000) == alerts[0]["time"] - 60_000


def test_the_first_scan_looks_back_the_reconcile_window_only(forwarded):
    """Case 11: turning the closed loop on does not act on every incident ever closed: the first scan (no
    watermark yet) looks back DEFENDER_ALERT_RECONCILE_HOURS."""
    from datetime import datetime, timedelta, timezone

    d, sn, rules, state, alerts, incidents = forwarded
    old, recent = incidents[str(alerts[0]["id"])], incidents[str(alerts[1]["id"])]
    close(old)
    close(recent)
    with sn.sim.lock:    # closed three days ago
        sn.sim.get(old["sys_id"])["sys_updated_on"] = (datetime.now(timezone.utc) - timedelta(days=3)).strftime(
            "%Y-%m-%d %H:%M:%S")
        sn.sim.version += 1
    (report,) = handle_closed_alerts(rules, state, [CONN], action="handle", defender_hook=source_for,
                                     servicenow_hook=ServiceNowHook, window_hours=24)
    assert (report.closed, report.handled) == (1, 1)
    assert [d.sim.alert_by_uuid(a["uuid"])["state"] for a in alerts] == ["unhandled", "handled", "unhandled"]


def test_incidents_under_the_previous_key_are_handled_with_a_bounded_listing(forwarded):
    """An incident created before the re-image-proof keys (``defender-iot:<conn>:<id>``) is recognised as its
    alert's (created after the alert) and handled; the listing is still bounded (by the incident's creation
    less the window), not the console's whole history."""
    from datetime import datetime, timezone

    d, sn, rules, state, alerts, incidents = forwarded
    legacy = incidents[str(alerts[2]["id"])]
    ServiceNowHook("servicenow_default").update_record("incident", legacy["sys_id"], {
        "correlation_id": f"defender-iot:{CONN}:{alerts[2]['id']}"})
    close(legacy)
    (report,), seen = listing_times(lambda: handle_closed_alerts(
        rules, state, [CONN], action="handle", defender_hook=source_for, servicenow_hook=ServiceNowHook,
        window_hours=24))
    assert (report.handled, report.already) == (1, 0)
    assert d.sim.alert_by_uuid(alerts[2]["uuid"])["state"] == "handled"
    hours_back = (datetime.now(timezone.utc) - seen[0]).total_seconds() / 3600
    assert seen[0] is not None and 24 < hours_back < 24.1


def test_without_an_integration_user_the_closed_loop_refuses_to_act(forwarded, monkeypatch):
    """With client credentials and an empty Login the loop cannot tell our incidents from anyone's: an incident
    another user created with one of our correlation ids must not handle its alert. The loop refuses, plainly."""
    import json

    from tests.fixtures.servicenow import SIM_CLIENT_ID, SIM_CLIENT_SECRET

    d, sn, rules, state, alerts, incidents = forwarded
    monkeypatch.setenv("AIRFLOW_CONN_SN_LOOP_CC", json.dumps({
        "conn_type": "servicenow", "host": sn.url, "extra": {
            "auth_type": "oauth_client_credentials", "client_id": SIM_CLIENT_ID, "client_secret": SIM_CLIENT_SECRET}}))
    target = incidents[str(alerts[0]["id"])]
    with sn.sim.lock:
        sn.sim.get(target["sys_id"])["sys_created_by"] = "mallory"   # someone else's incident, our key
    close(target)
    (report,) = handle_closed_alerts(rules, state, [CONN], action="handle", defender_hook=source_for,
                                     servicenow_hook=lambda conn: ServiceNowHook("sn_loop_cc"))
    assert report.misconfigured and report.handled == 0
    assert "names no user" in report.failures[0] and "Login" in report.failures[0]
    assert d.sim.alert_by_uuid(alerts[0]["uuid"])["state"] == "unhandled"
