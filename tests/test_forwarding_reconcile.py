"""Issue #10 cases against both simulators: the watcher starting after a forwarding run, late and skewed
alerts, malformed alerts, re-imaged appliances and upgrades from the previous keys."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from defender_servicenow.rules import parse_rules

from tests.test_forwarding import PLC_TITLE, SRC, DictState, baseline, cid, forwarder, routes, rules_with


def test_watcher_starting_after_a_forwarding_run_loses_nothing(defender_sim_factory, servicenow_conn):
    """Case 1: a safety run before the watcher's first start records the rule's first-seen time itself, so
    the watcher's later start does not turn the alerts in between into 'raised before the rule'."""
    d = defender_sim_factory(mode="sensor", alerts=0)
    rules = rules_with()
    state = DictState()
    baseline(rules, state, [SRC])
    assert "rule_first_seen:all" in state.data
    new = d.sim.add_alerts(2, severity="Major", engine="Malware", title=PLC_TITLE)
    # the watcher starts now: it records first-seen only when no process has
    state.data.setdefault("rule_first_seen:all", (datetime.now(timezone.utc) + timedelta(seconds=5)).isoformat())
    (report,) = forwarder(rules, state).run([SRC])
    assert report.created == 2 and report.unmatched == 0
    assert sorted(r["correlation_id"] for r in servicenow_conn.sim.table("incident")) == sorted(cid(a) for a in new)


def test_a_sensor_whose_clock_is_behind_loses_nothing(defender_sim_factory, servicenow_conn):
    """Case 2: one sensor's clock is 2 hours behind the others: its alerts are older than everything already
    forwarded, every time; the reconcile sweep still forwards each of them once."""
    d = defender_sim_factory(mode="management_console", alerts=0, sensors=2)
    rules = rules_with()
    state = DictState({"rule_first_seen:all": datetime(2000, 1, 1, tzinfo=timezone.utc).isoformat()})
    baseline(rules, state, [SRC])
    state.data[f"ledger:{SRC}"]["floor_ms"] -= 6 * 3_600_000
    forwarded = []
    for _ in range(3):
        good = d.sim.add_alerts(1, severity="Major", engine="Anomaly", title="Address Scan Detected")
        skewed = d.sim.add_alerts(1, time=good[0]["time"] - 2 * 3_600_000, severity="Major", engine="Anomaly",
                                  title="Address Scan Detected")
        forwarded += good + skewed
        (report,) = forwarder(rules, state).run([SRC])
        assert report.created == 2 and report.failures == []
    assert sorted(r["correlation_id"] for r in servicenow_conn.sim.table("incident")) == sorted(
        cid(a) for a in forwarded)


def test_a_malformed_alert_is_forwarded_with_a_safe_fallback(defender_sim_factory, servicenow_conn):
    """Case 3: severity 'High' is not a Defender severity: the alert is forwarded as Critical (so a
    minimum_severity never hides it), flagged in the record, and the run says so at WARNING."""
    d = defender_sim_factory(mode="sensor", alerts=0)
    rules = parse_rules({"rules": [{"name": "crit", "minimum_severity": "Critical",
                                    "actions": [{"type": "servicenow"}]}]}, default_connection_id="servicenow_default")
    state = DictState()
    baseline(rules, state, [SRC])
    (odd,) = d.sim.add_alerts(1, severity="High", engine="Malware", title=PLC_TITLE)
    (report,) = forwarder(rules, state).run([SRC])
    assert (report.created, report.flagged) == (1, 1)
    (incident,) = servicenow_conn.sim.table("incident")
    assert incident["correlation_id"] == cid(odd) and incident["impact"] == "1" and incident["urgency"] == "1"
    assert "severity 'High'" in incident["description"] and "forwarded as Critical" in incident["description"]


def test_a_re_imaged_appliance_has_its_new_alerts_forwarded(defender_sim_factory, servicenow_conn):
    """Case 4: the appliance is re-imaged under the same connection id and numbers its alerts from 1 again:
    the new alerts are not mistaken for the old ones."""
    d = defender_sim_factory(mode="sensor", alerts=0)
    rules = rules_with()
    state = DictState()
    baseline(rules, state, [SRC])
    before = d.sim.add_alerts(2, severity="Major", engine="Malware", title=PLC_TITLE)
    forwarder(rules, state).run([SRC])
    d.sim.alerts.clear()                                   # re-imaged: numbering restarts
    after = d.sim.add_alerts(2, severity="Major", engine="Malware", title=PLC_TITLE)
    assert [a["id"] for a in after] == [a["id"] for a in before]
    (report,) = forwarder(rules, state).run([SRC])
    assert (report.created, report.present) == (2, 0)
    assert sorted(r["correlation_id"] for r in servicenow_conn.sim.table("incident")) == sorted(
        cid(a) for a in before + after)


def test_records_written_under_the_previous_keys_are_recognised_after_the_upgrade(defender_sim_factory,
                                                                                  servicenow_conn):
    """Upgrading: alerts forwarded by the previous version (key ``<conn>:<id>``, watermark state) are found,
    not created again; an old record of the same number but an earlier alert (re-imaged) is not."""
    d = defender_sim_factory(mode="sensor", alerts=0)
    sn = servicenow_conn
    rules = rules_with({"type": "servicenow"}, {"type": "servicenow", "report_type": "defender_for_iot_application"})
    done = d.sim.add_alerts(2, severity="Major", engine="Malware", title=PLC_TITLE)
    for a in done:   # what the previous version wrote
        sn.sim.insert("incident", {"correlation_id": f"defender-iot:{SRC}:{a['id']}", "short_description": "old"})
        sn.sim.insert("u_defender_iot_alert", {"u_alert_key": f"{SRC}:{a['id']}", "u_time": datetime.fromtimestamp(
            a["time"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")})
    state = DictState({"rule_first_seen:all": datetime(2000, 1, 1, tzinfo=timezone.utc).isoformat(),
                       f"forwarded_up_to:{SRC}": {"time_ms": done[0]["time"] - 1, "ids": []}})
    # The upgrade happens after these alerts were raised: the simulator stamps alerts with a strictly
    # increasing clock that may run a millisecond ahead of this one, so wait until it has passed them.
    while datetime.now(timezone.utc).timestamp() * 1000 <= max(a["time"] for a in done):
        time.sleep(0.005)
    (report,) = forwarder(rules, state).run([SRC])
    assert (report.created, report.present) == (0, 4)
    assert len(sn.sim.table("incident")) == 2 and len(sn.sim.table("u_defender_iot_alert")) == 2


def test_upgrading_while_the_appliance_clock_is_ahead_creates_no_duplicates(defender_sim_factory, servicenow_conn):
    """The appliance's clock is 5 minutes ahead of Airflow's when the upgrade happens: the newest alerts the
    previous version forwarded (under ``<conn>:<id>``) carry times after the upgrade's own clock, and are
    still recognised, not created again."""
    d = defender_sim_factory(mode="sensor", alerts=0)
    sn = servicenow_conn
    rules = rules_with({"type": "servicenow"}, {"type": "servicenow", "report_type": "defender_for_iot_application"})
    ahead_ms = int(datetime.now(timezone.utc).timestamp() * 1000) + 5 * 60_000
    done = [d.sim.add_alerts(1, time=ahead_ms + i, severity="Major", engine="Malware", title=PLC_TITLE)[0]
            for i in range(2)]
    for a in done:   # what the previous version wrote
        sn.sim.insert("incident", {"correlation_id": f"defender-iot:{SRC}:{a['id']}", "short_description": "old"})
        sn.sim.insert("u_defender_iot_alert", {"u_alert_key": f"{SRC}:{a['id']}", "u_time": datetime.fromtimestamp(
            a["time"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")})
    state = DictState({"rule_first_seen:all": datetime(2000, 1, 1, tzinfo=timezone.utc).isoformat(),
                       f"forwarded_up_to:{SRC}": {"time_ms": done[-1]["time"], "ids": [done[-1]["id"]]}})
    (report,) = forwarder(rules, state).run([SRC])
    assert (report.created, report.present) == (0, 4)
    assert len(sn.sim.table("incident")) == 2 and len(sn.sim.table("u_defender_iot_alert")) == 2
    # alerts raised after the upgrade are not looked up under the previous key
    d.sim.add_alerts(1, time=ahead_ms + 10, severity="Major", engine="Malware", title=PLC_TITLE)
    before = routes(sn)
    (later,) = forwarder(rules, state).run([SRC])
    assert later.created == 2
    used = {k: v - before.get(k, 0) for k, v in routes(sn).items()}
    assert used["GET /api/now/table/incident"] == 1 and used["GET /api/now/table/u_defender_iot_alert"] == 1


def test_a_record_read_again_leaves_the_dead_letter_set_and_is_not_counted_twice(defender_sim_factory,
                                                                                 servicenow_conn):
    """A record that could not be read in an earlier run (dead letter) and reads fine now is forwarded (or
    pending) and leaves the dead-letter set: the health data never counts one alert as both."""
    d = defender_sim_factory(mode="sensor", alerts=0)
    rules = rules_with()
    state = DictState()
    baseline(rules, state, [SRC])
    (alert,) = d.sim.add_alerts(1, severity="Major", engine="Malware", title=PLC_TITLE)
    state.data[f"dead_letter:{SRC}"] = {str(alert["id"]): {"reason": "missing 'time'", "first_at": "x",
                                                           "last_at": "x", "attempts": 1},
                                        "999": {"reason": "missing 'time'", "first_at": "x", "last_at": "x",
                                                "attempts": 1}}
    servicenow_conn.sim.set_faults(deny_writes=["incident"])             # so the alert stays pending
    (report,) = forwarder(rules, state, retry_seconds=1).run([SRC])
    status = state.data[f"status:{SRC}"]
    assert (report.pending, report.dead_letter) == (1, 1) and (status["pending"], status["dead_letter"]) == (1, 1)
    assert list(state.data[f"dead_letter:{SRC}"]) == ["999"]              # still unreadable: kept, counted
