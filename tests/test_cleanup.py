"""Clean-up engine and DAG: params, confirmation, planning (pure), and runs against the ServiceNow simulator."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from defender_servicenow import cleanup
from defender_servicenow.cleanup import CleanupParams, CleanupRefusedError, Found, build_plan, validate_params
from defender_servicenow.exceptions import ConfigError

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
OURS = "MicrosoftDefenderIoT"

# --------------------------------------------------------------------------- params and confirmation


def test_params_defaults_are_a_safe_dry_run():
    p = validate_params({})
    assert (p.scope, p.mode, p.sources, p.older_than_days, p.dry_run) == ("both", "retire", (), None, True)


@pytest.mark.parametrize(("raw", "fragment"), [
    ({"scope": "everything"}, "scope='everything': choose one of devices, alerts, both"),
    ({"mode": "purge"}, "mode='purge'"),
    ({"sources": ["ok", "bad id"]}, "sources="),
    ({"older_than_days": 0}, "older_than_days=0: give a whole number of days of at least 1"),
    ({"older_than_days": "soon"}, "older_than_days='soon'"),
    ({"older_than_days": 2.5}, "older_than_days=2.5"),
    ({"dry_run": "maybe"}, "dry_run='maybe': give true or false"),
    ({"colour": "red"}, "unknown param(s) colour"),
])
def test_bad_params_get_plain_messages(raw, fragment):
    with pytest.raises(ConfigError) as err:
        validate_params(raw)
    assert fragment in str(err.value)


def test_params_accept_ui_and_rest_shapes():
    p = validate_params({"sources": "s1, s2,s1", "older_than_days": "30", "dry_run": "false", "confirm": " h "})
    assert p.sources == ("s1", "s2") and p.older_than_days == 30 and p.dry_run is False and p.confirm == "h"


@pytest.mark.parametrize("confirm", ["", "dev1.example.com", "dev12345"])
def test_missing_or_wrong_confirmation_refuses_naming_the_host(confirm):
    params = CleanupParams(mode="delete", dry_run=False, confirm=confirm)
    with pytest.raises(CleanupRefusedError) as err:
        cleanup.check_confirmation(params, "dev12345.service-now.com")
    message = str(err.value)
    assert "'dev12345.service-now.com'" in message and "Nothing was changed" in message


def test_confirmation_matches_host_case_insensitively_and_dry_run_needs_none():
    cleanup.check_confirmation(CleanupParams(dry_run=False, confirm="DEV1.service-now.com"), "dev1.service-now.com")
    cleanup.check_confirmation(CleanupParams(dry_run=True), "dev1.service-now.com")


# --------------------------------------------------------------------------- planning (pure)


def _found() -> Found:
    old, new = "2025-01-01 00:00:00", "2025-05-31 00:00:00"
    return Found(
        source_rows=[
            {"sys_id": "s1", "name": OURS, "id": "sensor1:1", "target_sys_id": "ci1", "sys_updated_on": old},
            {"sys_id": "s2", "name": OURS, "id": "sensor1:2", "target_sys_id": "ci2", "sys_updated_on": old},
            {"sys_id": "s3", "name": OURS, "id": "sensor2:3", "target_sys_id": "ci3", "sys_updated_on": old},
            {"sys_id": "s4", "name": OURS, "id": "sensor2:4", "target_sys_id": "gone", "sys_updated_on": old},
            {"sys_id": "s5", "name": OURS, "id": "sensor2:5", "target_sys_id": "ci5", "sys_updated_on": old},
        ],
        cis={
            "ci1": {"sys_id": "ci1", "name": "plc-1", "sys_class_name": "cmdb_ci_ot_plc", "install_status": "1",
                    "operational_status": "1", "sys_updated_on": old},
            "ci2": {"sys_id": "ci2", "name": "hmi-2", "sys_class_name": "cmdb_ci_ot_hmi", "install_status": "7",
                    "operational_status": "6", "sys_updated_on": old},
            "ci3": {"sys_id": "ci3", "name": "srv-3", "sys_class_name": "cmdb_ci_server", "install_status": "1",
                    "operational_status": "1", "sys_updated_on": new},
            "ci5": {"sys_id": "ci5", "name": "shared-5", "sys_class_name": "cmdb_ci_server",
                    "install_status": "1", "operational_status": "1", "sys_updated_on": old},
        },
        shared={"ci5"},
        dependents={
            "cmdb_ci_network_adapter": [{"sys_id": "n1", "name": "eth0", "cmdb_ci": {"value": "ci1"}},
                                        {"sys_id": "n5", "name": "eth0", "cmdb_ci": "ci5"}],
            "cmdb_ci_ip_address": [{"sys_id": "ip1", "ip_address": "10.0.0.1", "nic": "n1"},
                                   {"sys_id": "ip5", "ip_address": "10.0.0.5", "cmdb_ci": "ci5"}],
            "task_ci": [{"sys_id": "t1", "task": "i1", "ci_item": "ci1"}, {"sys_id": "t9", "task": "other"}],
        },
        tasks={"incident": [
            {"sys_id": "i1", "number": "INC1", "state": "1", "sys_updated_on": old},
            {"sys_id": "i2", "number": "INC2", "state": "7", "sys_updated_on": old},
            {"sys_id": "i3", "number": "INC3", "state": "2", "sys_updated_on": new},
        ], "sn_si_incident": [{"sys_id": "r1", "number": "SIR1", "state": "10", "sys_updated_on": old}]},
        app_rows={cleanup.APPLICATION_TABLE: [{"sys_id": "a1", "u_alert_key": "sensor1:9", "sys_updated_on": old}]},
    )


def _by_table(plan) -> dict[str, list[str]]:
    return {t.table: [a.sys_id for a in t.actions] for t in plan.tables if t.actions}


def test_retire_plan_retires_open_cis_closes_open_incidents_and_keeps_the_rest():
    plan = build_plan(_found(), CleanupParams(mode="retire"), NOW)
    assert _by_table(plan) == {"incident": ["i1", "i3"], "sn_si_incident": ["r1"], "cmdb_ci": ["ci1", "ci3"]}
    tables = {t.table: t for t in plan.tables}
    assert tables["cmdb_ci"].already == 1 and tables["cmdb_ci"].kept == 1  # hmi-2 retired; shared-5 kept
    assert tables["incident"].already == 1 and tables[cleanup.APPLICATION_TABLE].kept == 1
    ci1 = tables["cmdb_ci"].actions[0]
    assert (ci1.method, ci1.url_table, ci1.body) == ("PATCH", "cmdb_ci_ot_plc", cleanup.RETIRED)
    inc = tables["incident"].actions[0].body
    assert inc["state"] == "7" and inc["close_code"] and "Defender for IoT integration" in inc["close_notes"]
    assert tables["sn_si_incident"].actions[0].body["state"] == "3"


def test_delete_plan_orders_children_first_and_never_touches_shared_cis():
    plan = build_plan(_found(), CleanupParams(mode="delete"), NOW)
    assert _by_table(plan) == {
        "task_ci": ["t1"], "incident": ["i1", "i2", "i3"], "sn_si_incident": ["r1"], cleanup.APPLICATION_TABLE: ["a1"],
        "cmdb_ci_ip_address": ["ip1"], "cmdb_ci_network_adapter": ["n1"],  # n5, ip5: the shared CI's
        "cmdb_ci": ["ci1", "ci2", "ci3"],
        "sys_object_source": ["s1", "s2", "s3", "s4", "s5"],  # s4: CI already gone; s5: only our marker
    }
    order = [t.table for t in plan.tables if t.actions]
    assert order.index("cmdb_ci_ip_address") < order.index("cmdb_ci_network_adapter") < order.index("cmdb_ci") \
        < order.index("sys_object_source")
    assert all(a.method == "DELETE" and a.body is None for t in plan.tables for a in t.actions)


def test_older_than_days_and_scope_limit_the_plan():
    plan = build_plan(_found(), CleanupParams(mode="delete", scope="devices", older_than_days=30), NOW)
    assert _by_table(plan) == {"cmdb_ci_ip_address": ["ip1"], "cmdb_ci_network_adapter": ["n1"],
                               "cmdb_ci": ["ci1", "ci2"], "sys_object_source": ["s1", "s2", "s4", "s5"]}
    plan = build_plan(_found(), CleanupParams(mode="retire", scope="alerts", older_than_days=30), NOW)
    assert _by_table(plan) == {"incident": ["i1"], "sn_si_incident": ["r1"]}


def test_dry_run_report_lists_names_and_counts():
    plan = build_plan(_found(), CleanupParams(mode="delete"), NOW)
    lines = cleanup.describe_plan(plan, sample_size=2)
    assert "cmdb_ci: delete 3: plc-1, hmi-2 ... and 1 more" in lines
    summary = cleanup.summary_line(cleanup.apply_plan(None, plan))  # dry run: no hook needed, nothing sent
    assert summary.startswith("Clean-up DRY RUN mode=delete scope=both")
    assert "would delete 3 cmdb_ci" in summary and "would delete 5 sys_object_source" in summary


class _ScriptedHook:
    """Answers Batch API calls from a script: sys_id -> status (default 204); records what was sent."""

    batch_size = 2

    def __init__(self, statuses: dict[str, int]):
        self.statuses, self.sent = statuses, []

    def batch(self, requests):
        from defender_servicenow.hooks.servicenow import BatchResponse

        self.sent.append([r.url for r in requests])
        return [BatchResponse(r.id, self.statuses.get(r.url.rsplit("/", 1)[1], 204), None,
                              "ACL Exception Delete Failed" if self.statuses.get(r.url.rsplit("/", 1)[1]) == 403
                              else None) for r in requests]


def test_apply_counts_404_as_already_gone_and_stops_before_the_parents_of_a_failed_child():
    params = CleanupParams(mode="delete", scope="devices", dry_run=False)
    plan = build_plan(_found(), params, NOW)
    hook = _ScriptedHook({"ip1": 404, "n1": 403})
    report = cleanup.apply_plan(hook, plan)
    assert report.gone["cmdb_ci_ip_address"] == 1 and report.failed["cmdb_ci_network_adapter"] == 1
    assert report.stopped_at == "cmdb_ci_network_adapter" and not report.ok
    assert not any("/cmdb_ci_ot_plc/" in url for call in hook.sent for url in call)  # CI kept for the rerun
    assert "n1" in report.errors[0] and "403" in report.errors[0]


def test_apply_sends_patches_in_batches_of_the_hook_size():
    plan = build_plan(_found(), CleanupParams(mode="retire", dry_run=False), NOW)
    hook = _ScriptedHook({})
    report = cleanup.apply_plan(hook, plan)
    assert report.ok and report.done == {"incident": 2, "sn_si_incident": 1, "cmdb_ci": 2}
    assert [len(call) for call in hook.sent] == [2, 1, 2]
    rows = {r["table"]: r for r in cleanup.report_rows(report)}
    assert rows["cmdb_ci"] == {"table": "cmdb_ci", "action": "retire", "planned": 2, "done": 2, "already_done": 1,
                               "kept": 1, "failed": 0}


# --------------------------------------------------------------------------- against the ServiceNow simulator

OTHER = "SCCM"
OLD = "2020-01-01 00:00:00"


def _device(source_name: str, key: str, name: str, mac: str, ip: str, cls: str = "cmdb_ci_ot_plc") -> dict:
    """An IRE item with the shape the device sync sends (values, lookup, related, sys_object_source_info);
    the IP is also a lookup item so that the IRE links it to the adapter (``nic``) and the CI."""
    return {
        "className": cls,
        "values": {"name": name, "model_number": "M-1"},
        "lookup": [{"className": "cmdb_ci_network_adapter", "values": {"name": mac, "mac_address": mac}},
                   {"className": "cmdb_ci_ip_address", "values": {"ip_address": ip, "mac_address": mac}}],
        "related": [{"className": "cmdb_ot_entity", "values": {"ot_asset_type": "PLC", "ot_correlation_id": key}},
                    {"className": "cmdb_key_value", "values": {"key": "defender.protocols", "value": "MODBUS"}}],
        "sys_object_source_info": {"source_name": source_name, "source_native_key": key},
    }


@pytest.fixture
def world(servicenow_conn):
    """The simulator holding our CIs/incidents/application rows and another source's, plus a hook to it."""
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    sim = servicenow_conn.sim
    hook = ServiceNowHook("servicenow_default")
    items = [_device(OURS, "sensor1:1", "plc-1", "00:00:00:00:00:01", "10.0.0.1"),
             _device(OURS, "sensor1:2", "hmi-2", "00:00:00:00:00:02", "10.0.0.2", "cmdb_ci_ot_hmi"),
             _device(OURS, "sensor2:3", "srv-3", "00:00:00:00:00:03", "10.0.0.3", "cmdb_ci_server"),
             _device(OTHER, "sccm-77", "laptop-77", "00:00:00:00:00:77", "10.0.0.77", "cmdb_ci_computer")]
    result = hook.identify_reconcile(items, "Other Automated")
    assert not any(item.get("errors") for item in result["items"])
    for key, state in (("sensor1:100", "1"), ("sensor1:101", "7"), ("sensor2:102", "2")):
        values = {"short_description": f"alert {key}", "state": state, "correlation_id": f"defender-iot:{key}",
                  "correlation_display": "Microsoft Defender for IoT"}
        if state == "7":
            values.update(close_code="Closed/Resolved by Caller", close_notes="done")
        sim.insert("incident", values)
    sim.insert("incident", {"short_description": "someone else's", "correlation_id": "other-tool:1",
                            "correlation_display": "Other"})
    sim.insert("incident", {"short_description": "look-alike", "correlation_id": "defender-iot:sensor1:999",
                            "correlation_display": "Not us"})
    sim.insert("sn_si_incident", {"short_description": "sir", "correlation_id": "defender-iot:sensor1:103",
                                  "correlation_display": "Microsoft Defender for IoT", "state": "10"})
    sim.insert("u_defender_iot_alert", {"u_alert_key": "sensor1:100"})
    sim.insert("u_defender_iot_alert", {"u_alert_key": "sensor2:102"})
    return sim, hook


def _snapshot(sim) -> dict:
    tables = ("cmdb_ci", "sys_object_source", "cmdb_ci_network_adapter", "cmdb_ci_ip_address", "incident",
              "sn_si_incident", "u_defender_iot_alert", "cmdb_key_value", "cmdb_ot_entity")
    return {t: sorted((dict(r) for r in sim.table(t)), key=lambda r: r["sys_id"]) for t in tables}


def _ours_ci_ids(sim, prefix: str = "") -> set[str]:
    return {r["target_sys_id"] for r in sim.table("sys_object_source")
            if r["name"] == OURS and r["id"].startswith(prefix)}


def _other_ci_id(sim) -> str:
    return next(r["target_sys_id"] for r in sim.table("sys_object_source") if r["name"] == OTHER)


def _run(hook, **params):
    return cleanup.run_cleanup(hook, params)


def _rows(result) -> dict[str, dict]:
    return {r["table"]: r for r in result["tables"]}


def test_dry_run_changes_nothing_and_lists_exactly_ours(world, caplog):
    sim, hook = world
    before = _snapshot(sim)
    caplog.set_level("INFO", logger="defender_servicenow.cleanup")
    result = _run(hook, mode="delete")  # dry_run defaults to true: no confirmation needed
    assert _snapshot(sim) == before
    rows = _rows(result)
    assert {t: r["planned"] for t, r in rows.items() if r["planned"]} == {
        "incident": 3, "sn_si_incident": 1, "u_defender_iot_alert": 2, "cmdb_ci_ip_address": 3,
        "cmdb_ci_network_adapter": 3, "cmdb_ci": 3, "sys_object_source": 3, "cmdb_key_value": 3,
        "cmdb_ot_entity": 3}
    assert result["summary"].startswith("Clean-up DRY RUN mode=delete") and "would delete 3 cmdb_ci" in result["summary"]
    assert "cmdb_ci: delete 3: " in caplog.text and "plc-1" in caplog.text and "laptop-77" not in caplog.text
    assert "INC" in caplog.text and "Per table:" in caplog.text


@pytest.mark.parametrize("scope", ["devices", "alerts", "both"])
def test_retire_touches_only_ours(world, scope):
    sim, hook = world
    other_ci = _other_ci_id(sim)
    before = _snapshot(sim)
    result = _run(hook, scope=scope, mode="retire", dry_run=False, confirm=hook.instance_host)
    cis = {r["sys_id"]: r for r in sim.table("cmdb_ci")}
    ours = _ours_ci_ids(sim)
    retired = scope != "alerts"
    assert all(((cis[i].get("install_status"), cis[i].get("operational_status")) == ("7", "6")) is retired
               for i in ours)
    assert cis[other_ci] == next(r for r in before["cmdb_ci"] if r["sys_id"] == other_ci)
    incidents = {r["correlation_id"]: r for r in sim.table("incident")}
    closed = scope != "devices"
    for key in ("sensor1:100", "sensor2:102"):
        inc = incidents[f"defender-iot:{key}"]
        assert (inc["state"] == "7") is closed
        if closed:
            assert inc["close_code"] and "integration was removed" in inc["close_notes"]
    assert incidents["defender-iot:sensor1:101"]["close_notes"] == "done"  # already closed: not touched again
    assert incidents["other-tool:1"]["state"] == "1" and incidents["defender-iot:sensor1:999"]["state"] == "1"
    assert [r["state"] for r in sim.table("sn_si_incident")] == (["3"] if closed else ["10"])
    for table in ("sys_object_source", "cmdb_ci_network_adapter", "cmdb_ci_ip_address", "u_defender_iot_alert"):
        assert len(sim.table(table)) == len(before[table])  # retire deletes nothing
    rows = _rows(result)
    if closed:
        assert (rows["incident"]["done"], rows["incident"]["already_done"]) == (2, 1)
        assert rows["u_defender_iot_alert"]["kept"] == 2
    # A rerun finds everything already done.
    again = _rows(_run(hook, scope=scope, mode="retire", dry_run=False, confirm=hook.instance_host))
    assert sum(r["done"] for r in again.values()) == 0
    if retired:
        assert again["cmdb_ci"]["already_done"] == 3


@pytest.mark.parametrize("scope", ["devices", "alerts", "both"])
def test_delete_touches_only_ours(world, scope):
    sim, hook = world
    other_ci = _other_ci_id(sim)
    before = _snapshot(sim)
    _run(hook, scope=scope, mode="delete", dry_run=False, confirm=hook.instance_host.upper())
    after = _snapshot(sim)
    gone = {t: {r["sys_id"] for r in before[t]} - {r["sys_id"] for r in after[t]} for t in before}
    if scope == "alerts":
        assert all(not gone[t] for t in ("cmdb_ci", "sys_object_source", "cmdb_ci_network_adapter"))
    else:
        assert not _ours_ci_ids(sim) and not [r for r in after["sys_object_source"] if r["name"] == OURS]
        assert other_ci in {r["sys_id"] for r in after["cmdb_ci"]}
        assert [r["name"] for r in after["cmdb_ci_network_adapter"]] == ["00:00:00:00:00:77"]
        assert [r["ip_address"] for r in after["cmdb_ci_ip_address"]] == ["10.0.0.77"]
        parts = ("cmdb_ci_network_adapter", "cmdb_ci_ip_address")  # CI subclasses too
        assert {r["sys_id"] for r in after["cmdb_ci"] if r["sys_class_name"] not in parts} == {other_ci}
    incidents = sorted(r["correlation_id"] for r in after["incident"])
    if scope == "devices":
        assert len(incidents) == 5 and len(after["u_defender_iot_alert"]) == 2
    else:
        assert incidents == ["defender-iot:sensor1:999", "other-tool:1"]
        assert not after["sn_si_incident"] and not after["u_defender_iot_alert"]


def test_sources_filter_and_older_than_days(world):
    sim, hook = world
    s1 = _ours_ci_ids(sim, "sensor1:")
    result = _run(hook, mode="delete", dry_run=False, confirm=hook.instance_host, sources=["sensor1"])
    assert _ours_ci_ids(sim) == _ours_ci_ids(sim, "sensor2:") and len(_ours_ci_ids(sim)) == 1
    assert not s1 & {r["sys_id"] for r in sim.table("cmdb_ci")}
    assert sorted(r["correlation_id"] for r in sim.table("incident")) == [
        "defender-iot:sensor1:999", "defender-iot:sensor2:102", "other-tool:1"]
    assert [r["u_alert_key"] for r in sim.table("u_defender_iot_alert")] == ["sensor2:102"]
    assert _rows(result)["cmdb_ci"]["done"] == 2
    # older_than_days: only records last updated before the cutoff.
    assert _rows(_run(hook, mode="retire", older_than_days=30))["cmdb_ci"]["planned"] == 0
    with sim.lock:  # the Table API never lets a client set sys_updated_on: age the record in place
        sim.get(next(iter(_ours_ci_ids(sim))))["sys_updated_on"] = OLD
    rows = _rows(_run(hook, mode="retire", older_than_days=30, dry_run=False, confirm=hook.instance_host))
    assert rows["cmdb_ci"]["done"] == 1 and rows["incident"]["planned"] == 0


@pytest.mark.parametrize("confirm", [None, "", "wrong.service-now.com"])
def test_missing_or_wrong_confirmation_refuses_before_any_write(world, confirm):
    sim, hook = world
    before, requests = _snapshot(sim), sim.counters()["requests"]
    with pytest.raises(CleanupRefusedError, match=f"host name '{hook.instance_host}'"):
        _run(hook, mode="delete", dry_run=False, confirm=confirm)
    assert _snapshot(sim) == before and sim.counters()["requests"] == requests  # not even a read


def test_rerun_after_a_failure_mid_way_completes_without_double_work(world):
    sim, hook = world
    hook.batch_size = 2  # one Batch API call per two writes, so the fault lands mid-way
    planned = {r["table"]: r["planned"] for r in _run(hook, mode="delete")["tables"]}
    real_batch, calls = hook.batch, []

    def batch(requests):  # the 4th Batch API call meets an injected 500
        calls.append(len(requests))
        if len(calls) == 4:
            sim.set_faults(fail_next={"count": 1, "status": 500, "path_prefix": "/api/now/v1/batch"})
        return real_batch(requests)

    hook.batch = batch
    with pytest.raises(cleanup.CleanupIncompleteError, match="run the clean-up again") as err:
        _run(hook, mode="delete", dry_run=False, confirm=hook.instance_host)
    assert "HTTP 500" in str(err.value)
    remaining = {r["table"]: r["planned"] for r in _run(hook, mode="delete")["tables"]}
    done_first = sum(planned.values()) - sum(remaining.values())
    assert 0 < done_first < sum(planned.values())
    items_before = sim.counters()["batch_items"]
    second = _run(hook, mode="delete", dry_run=False, confirm=hook.instance_host)
    rows = _rows(second)
    assert sum(r["done"] for r in rows.values()) == sum(remaining.values())
    assert sum(r["already_done"] for r in rows.values()) == 0  # nothing sent twice
    assert sim.counters()["batch_items"] - items_before == sum(remaining.values())
    assert not _ours_ci_ids(sim) and {r["correlation_id"] for r in sim.table("incident")} == {
        "other-tool:1", "defender-iot:sensor1:999"}


def test_a_ci_another_source_also_reports_is_never_retired_or_deleted(world):
    sim, hook = world
    # SCCM reports plc-1 too: the IRE matches its MAC and adds SCCM's own sys_object_source row to that CI.
    result = hook.identify_reconcile([_device(OTHER, "sccm-1", "plc-1", "00:00:00:00:00:01", "10.0.0.1")],
                                     "SCCM")
    shared = result["items"][0]["sysId"]
    assert shared in _ours_ci_ids(sim)
    rows = _rows(_run(hook, scope="devices", mode="retire", dry_run=False, confirm=hook.instance_host))
    assert (rows["cmdb_ci"]["done"], rows["cmdb_ci"]["kept"]) == (2, 1)
    assert sim.get(shared).get("install_status") != "7"
    _run(hook, scope="devices", mode="delete", dry_run=False, confirm=hook.instance_host)
    assert sim.get(shared) is not None and not _ours_ci_ids(sim)  # only our marker row went
    assert {r["name"] for r in sim.table("sys_object_source")} == {OTHER}
    assert sim.lookup("cmdb_ci_network_adapter", "cmdb_ci", shared)  # its parts stay with it


def test_instance_without_sir_and_with_a_custom_application_table(servicenow_sim_factory, monkeypatch, tmp_path):
    import json

    from defender_servicenow.hooks.servicenow import ServiceNowHook

    from include.simulators.servicenow_sim import SIM_PASSWORD, SIM_USER

    handle = servicenow_sim_factory(absent_tables=("sn_si_incident",), extra_tables={"u_ot_alerts": None})
    monkeypatch.setenv("AIRFLOW_CONN_SN_NOSIR", json.dumps(
        {"conn_type": "servicenow", "host": handle.url, "login": SIM_USER, "password": SIM_PASSWORD}))
    sim, hook = handle.sim, ServiceNowHook("sn_nosir")
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: app\n    enabled: false\n    minimum_severity: Minor\n    actions:\n"
                     "      - type: servicenow\n        connection_id: sn_nosir\n"
                     "        report_type: defender_for_iot_application\n        table: u_ot_alerts\n")
    tables = cleanup.application_tables("sn_nosir", str(rules))
    assert tables == ["u_defender_iot_alert", "u_ot_alerts"]
    assert cleanup.application_tables("sn_nosir", str(tmp_path / "missing.yaml")) == ["u_defender_iot_alert"]
    sim.insert("u_ot_alerts", {"u_alert_key": "cm:5"})
    sim.insert("sys_choice", {"name": "incident", "element": "close_code", "value": "No resolution provided",
                              "label": "No resolution provided", "inactive": "false"})
    sim.insert("incident", {"correlation_id": "defender-iot:cm:5", "correlation_display": "Microsoft Defender for IoT"})
    result = cleanup.run_cleanup(hook, {"scope": "alerts", "dry_run": False, "confirm": "127.0.0.1"},
                                 application_tables=tables)
    assert "not on this instance: sn_si_incident" in result["summary"]
    assert sim.table("incident")[0]["close_code"] == "No resolution provided"
    cleanup.run_cleanup(hook, {"scope": "alerts", "mode": "delete", "dry_run": False, "confirm": "127.0.0.1"},
                        application_tables=tables)
    assert sim.table("u_ot_alerts") == [] and sim.table("incident") == []


# --------------------------------------------------------------------------- the DAG itself


@pytest.mark.airflow_db
def test_dag_dry_run_by_default_then_refuses_then_retires(world, airflow_db):
    from pathlib import Path

    from airflow.dag_processing.dagbag import DagBag

    sim, hook = world
    path = Path(__file__).resolve().parents[1] / "dags" / "defender_servicenow_cleanup.py"
    dag = DagBag(dag_folder=str(path)).dags["defender_servicenow_cleanup"]
    before = _snapshot(sim)
    assert dag.test().state == "success"  # defaults: dry run of everything
    assert _snapshot(sim) == before
    # Full conf on every run: dag.test() in one process keeps the previous run's params otherwise.
    conf = {"scope": "both", "mode": "delete", "sources": [], "older_than_days": None, "dry_run": False}
    refused = dag.test(run_conf={**conf, "confirm": "prod.service-now.com"})
    assert refused.state == "failed" and _snapshot(sim) == before
    ours = _ours_ci_ids(sim)
    run = dag.test(run_conf={**conf, "scope": "devices", "mode": "retire", "confirm": hook.instance_host})
    assert run.state == "success"
    assert len(ours) == 3 and all(sim.get(i)["install_status"] == "7" for i in ours)
    assert sim.get(_other_ci_id(sim)).get("install_status") != "7"
    assert all(r["state"] != "7" for r in sim.table("incident") if r["correlation_id"] != "defender-iot:sensor1:101")


@pytest.mark.parametrize("mode", ["retire", "delete"])
def test_a_ci_another_of_our_sources_still_reports_is_kept(world, mode):
    """Two sensors see one device (same MAC: one CI, two of our markers); cleaning only sensor1 must not
    retire or delete the CI sensor2 still reports -- only sensor1's own marker goes."""
    sim, hook = world
    res = hook.identify_reconcile([_device(OURS, "sensor2:44", "plc-1", "00:00:00:00:00:01", "10.0.0.1")],
                                  "Other Automated")
    ci = res["items"][0]["sysId"]
    assert {r["id"] for r in sim.table("sys_object_source") if r["target_sys_id"] == ci} == {"sensor1:1",
                                                                                             "sensor2:44"}
    _run(hook, scope="devices", mode=mode, dry_run=False, confirm=hook.instance_host, sources=["sensor1"])
    kept = sim.get(ci)
    assert kept is not None and kept.get("install_status") != "7"
    markers = {r["id"] for r in sim.table("sys_object_source") if r["target_sys_id"] == ci}
    assert markers == ({"sensor2:44"} if mode == "delete" else {"sensor1:1", "sensor2:44"})
