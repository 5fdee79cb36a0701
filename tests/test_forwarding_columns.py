"""Column lengths (issue #10, case 10): a key column too short for the keys (a custom string column left at
ServiceNow's default of 40 characters) stops that destination with a plain error naming table and column,
instead of cutting the keys and creating every record again on every run. sys_dictionary is read once per
run; an instance where it cannot be read gets one warning and forwarding carries on."""

from __future__ import annotations

import json
import logging

import pytest
from defender_servicenow import forwarding as fwd

from tests.test_forwarding import (
    PLC_TITLE,
    SRC,
    DictState,
    baseline,
    forget_done,
    forwarder,
    pending,
    routes,
    rules_with,
)

APP = {"type": "servicenow", "report_type": "defender_for_iot_application"}


@pytest.fixture
def instance(servicenow_sim_factory, monkeypatch):
    from include.simulators.servicenow_sim import SIM_PASSWORD, SIM_USER

    def start(**config):
        sn = servicenow_sim_factory(**config)
        monkeypatch.setenv("AIRFLOW_CONN_SERVICENOW_DEFAULT", json.dumps(
            {"conn_type": "servicenow", "host": sn.url, "login": SIM_USER, "password": SIM_PASSWORD}))
        return sn
    return start


def test_a_key_column_too_short_stops_its_destination_with_a_plain_error(defender_sim_factory, instance):
    conn = "defender_plant_rotterdam_sensor"                  # keys of 47 characters
    d = defender_sim_factory(mode="sensor", alerts=0, conn_id=conn)
    sn = instance(column_lengths={"u_defender_iot_alert.u_alert_key": 40})      # the platform default
    rules = rules_with({"type": "servicenow"}, APP)
    state = DictState()
    baseline(rules, state, [conn])
    d.sim.add_alerts(3, severity="Major", engine="Malware", title=PLC_TITLE)
    engine = forwarder(rules, state, retry_seconds=1)
    engine.chunk_size = 2                                     # two chunks: the dictionary is still read once
    before = routes(sn)
    (report,) = engine.run([conn])
    assert sn.sim.table("u_defender_iot_alert") == []         # nothing cut, nothing written
    assert report.created == 3 and len(sn.sim.table("incident")) == 3   # the other destination goes on
    assert len(report.failures) == 3
    answer = report.failures[0].answer
    assert "u_defender_iot_alert.u_alert_key holds 40 characters" in answer and "at least 255" in answer
    assert "need up to 47" in answer
    with pytest.raises(fwd.ForwardingIncompleteError):
        fwd.raise_if_incomplete([report])
    assert len(pending(state, conn)) == 3
    used = {k: v - before.get(k, 0) for k, v in routes(sn).items()}
    assert used["GET /api/now/table/sys_dictionary"] == 1
    assert "u_alert_key" in state.data[f"status:{conn}"]["last_failure"]["message"]

    (row,) = [r for r in sn.sim.table("sys_dictionary") if r["element"] == "u_alert_key"]
    sn.sim.update(row["sys_id"], {"max_length": "255"})      # an admin widens the column
    (fixed,) = forwarder(rules, state).run([conn])
    assert fixed.failures == [] and fixed.created == 3
    assert sorted(len(r["u_alert_key"]) for r in sn.sim.table("u_defender_iot_alert")) == [47, 47, 47]
    assert pending(state, conn) == {}


def test_without_the_check_a_short_column_duplicates_every_run(defender_sim_factory, instance, monkeypatch):
    """Why the check exists: the simulator cuts the keys as ServiceNow does, and the cut key never matches."""
    from defender_servicenow import columns

    monkeypatch.setattr(columns, "check", lambda dest, length, keys: None)
    conn = "defender_plant_rotterdam_sensor"
    d = defender_sim_factory(mode="sensor", alerts=0, conn_id=conn)
    sn = instance(column_lengths={"u_defender_iot_alert.u_alert_key": 40})
    rules = rules_with(APP)
    state = DictState()
    baseline(rules, state, [conn])
    d.sim.add_alerts(1, severity="Major", engine="Malware", title=PLC_TITLE)
    forwarder(rules, state).run([conn])
    forget_done(state, conn)                                  # e.g. a replay: the look-up decides
    forwarder(rules, state).run([conn])
    assert len(sn.sim.table("u_defender_iot_alert")) == 2    # duplicated


def test_long_enough_columns_pass_and_cost_one_read_per_run(defender_sim_factory, servicenow_conn):
    d = defender_sim_factory(mode="sensor", alerts=0)
    rules = rules_with({"type": "servicenow"}, APP)
    state = DictState()
    baseline(rules, state, [SRC])
    d.sim.add_alerts(2, severity="Major", engine="Malware", title=PLC_TITLE)
    before = routes(servicenow_conn)
    (report,) = forwarder(rules, state).run([SRC])
    assert report.created == 4 and report.failures == []
    assert routes(servicenow_conn)["GET /api/now/table/sys_dictionary"] - before.get(
        "GET /api/now/table/sys_dictionary", 0) == 1


@pytest.mark.parametrize("acl", ["403", "rows_filtered"])
def test_an_unreadable_sys_dictionary_is_one_warning_and_forwarding_carries_on(defender_sim_factory, instance,
                                                                               caplog, acl):
    d = defender_sim_factory(mode="sensor", alerts=0)
    sn = instance()
    if acl == "403":
        sn.sim.set_faults(deny_reads=["sys_dictionary"])
    else:
        for row in sn.sim.table("sys_dictionary"):
            sn.sim.delete(row["sys_id"])
    rules = rules_with({"type": "servicenow"}, APP)
    state = DictState()
    baseline(rules, state, [SRC])
    d.sim.add_alerts(3, severity="Major", engine="Malware", title=PLC_TITLE)
    engine = forwarder(rules, state)
    engine.chunk_size = 2
    with caplog.at_level(logging.WARNING, logger="defender_servicenow.columns"):
        (report,) = engine.run([SRC])
    assert report.created == 6 and report.failures == []
    warnings = [r for r in caplog.records if r.name == "defender_servicenow.columns"]
    assert len(warnings) == 1 and "sys_dictionary" in warnings[0].getMessage()
