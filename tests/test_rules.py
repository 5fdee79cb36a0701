"""Forwarding rules: validation errors name the rule and the field; every criterion; dedup of destinations."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import yaml
from defender_servicenow import settings
from defender_servicenow.exceptions import ConfigError
from defender_servicenow.models import Alert
from defender_servicenow.rules import Destination, is_system_notification, load_rules, parse_rules

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
ACTION = {"type": "servicenow", "report_type": "incidents"}


def make_alert(**kw) -> Alert:
    values = dict(source="defender_iot_default", id=7, time=T0, title="Address Scan Detected", message="scan",
                  severity="Major", engine="Anomaly", source_device_id=3, destination_device_id=4)
    values.update(kw)
    return Alert(**values)


def ruleset(*rules, **top):
    return parse_rules({"rules": list(rules), **top}, default_connection_id="servicenow_default")


def rule(**kw):
    return {"name": "r", "actions": [ACTION], **kw}


# --------------------------------------------------------------------------- validation


def test_default_rules_file_is_valid():
    rules = load_rules(settings.rules_file(), default_connection_id="servicenow_default")
    assert rules.names and len(set(rules.names)) == len(rules.names)
    assert rules.impact_urgency("Critical").impact == 1


@pytest.mark.parametrize("bad, field, rule_name", [
    (rule(name="sev", minimum_severity="High"), "minimum_severity", "sev"),
    (rule(name="eng", engines=["Malware", "Heuristics"]), "engines", "eng"),
    (rule(name="noact", actions=[]), "actions", "noact"),
    ({"name": "missing"}, "actions", "missing"),
    (rule(name="rt", actions=[{"type": "servicenow", "report_type": "tickets"}]), "actions[0].report_type", "rt"),
    (rule(name="tbl", actions=[{"type": "servicenow", "report_type": "incidents", "table": "u_defender_iot_alert"}]),
     "actions[0]", "tbl"),
    (rule(name="apptbl", actions=[{"type": "servicenow", "report_type": "defender_for_iot_application",
                                   "table": "Bad Table!"}]), "actions[0]", "apptbl"),
    (rule(name="typo", minimum_severty="Major"), "minimum_severty", "typo"),
    (rule(name="proto", protocols=[]), "protocols", "proto"),
    (rule(name="act", actions=[{"type": "email", "report_type": "incidents"}]), "actions[0].type", "act"),
])
def test_bad_rules_name_the_rule_and_the_field(bad, field, rule_name):
    with pytest.raises(ConfigError) as err:
        ruleset(bad)
    message = str(err.value)
    assert repr(rule_name) in message and f"field {field}" in message


def test_duplicate_rule_names_are_rejected():
    with pytest.raises(ConfigError, match=r"rule 'twice', field name: duplicate"):
        ruleset(rule(name="twice"), rule(name="twice", minimum_severity="Critical"))


def test_bad_severity_mapping_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="severity_mapping"):
        ruleset(rule(), severity_mapping={"Critical": {"impact": 0, "urgency": 1}})
    path = tmp_path / "rules.yaml"
    path.write_text("rules: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_rules(path, default_connection_id="sn")
    with pytest.raises(ConfigError, match="DEFENDER_FORWARDING_RULES_FILE"):
        load_rules(tmp_path / "missing.yaml", default_connection_id="sn")
    path.write_text(yaml.safe_dump({"rules": [rule(name="ok")]}))
    assert load_rules(path, default_connection_id="sn").names == ("ok",)


def test_defaults_and_table_resolution():
    rules = ruleset(rule(name="a", actions=[ACTION, {"type": "servicenow", "report_type": "defender_for_iot_application",
                                                     "connection_id": "sn_other"}]))
    (r,) = rules.rules
    assert r.minimum_severity == "Warning" and r.protocols == "all" and r.engines == "all"
    assert r.report_alert_notifications and not r.report_system_notifications
    assert rules.destinations_of(r) == [Destination("servicenow_default", "incidents", "incident"),
                                        Destination("sn_other", "defender_for_iot_application", "u_defender_iot_alert")]


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize("minimum, severity, expected", [
    ("Warning", "Warning", True), ("Minor", "Warning", False), ("Minor", "Minor", True),
    ("Minor", "Critical", True), ("Major", "Minor", False), ("Major", "Major", True),
    ("Critical", "Major", False), ("Critical", "Critical", True),
])
def test_minimum_severity_edges(minimum, severity, expected):
    rules = ruleset(rule(minimum_severity=minimum))
    assert bool(rules.match(make_alert(severity=severity))[1]) is expected


@pytest.mark.parametrize("engines, engine, expected", [
    ("all", "Malware", True), ("ALL", "Operational", True), (["Malware"], "Malware", True),
    (["Malware", "Anomaly"], "Anomaly", True), (["Malware"], "Policy Violation", False),
    ("Protocol Violation", "Protocol Violation", True),
])
def test_engines_all_or_list(engines, engine, expected):
    rules = ruleset(rule(engines=engines))
    assert bool(rules.match(make_alert(engine=engine))[1]) is expected


@pytest.mark.parametrize("protocols, device_protocols, expected", [
    ("all", [], True),
    (["MODBUS"], ["Modbus", "HTTP"], True),  # case-insensitive
    (["MODBUS", "DNP3"], ["DNP3"], True),
    (["MODBUS"], ["HTTP"], False),
    (["MODBUS"], [], False),  # devices unknown: cannot tell the protocol, no match
])
def test_protocols_from_the_devices(protocols, device_protocols, expected):
    rules = ruleset(rule(protocols=protocols))
    assert rules.needs_protocols is (protocols != "all")
    assert bool(rules.match(make_alert(), protocols=device_protocols)[1]) is expected


@pytest.mark.parametrize("title, engine, system", [
    ("No Traffic Detected on Sensor Interface", "Operational", True),
    ("Traffic Detected on sensor Interface", "Operational", True),
    ("Sensor disconnected from the management console", "Operational", True),
    ("Remote backup failed", "Operational", True),
    ("Suspicion of Unresponsive MODBUS Device", "Operational", False),
    ("Device is Suspected to be Disconnected (Unresponsive)", "Operational", False),
    ("Sensor traffic anomaly", "Anomaly", False),  # only Operational alerts are about the appliance
])
def test_system_notification_classification(title, engine, system):
    assert is_system_notification(make_alert(title=title, engine=engine)) is system


@pytest.mark.parametrize("alerts_on, system_on, title, expected", [
    (True, False, "Address Scan Detected", True),
    (True, False, "No Traffic Detected on Sensor Interface", False),
    (False, True, "No Traffic Detected on Sensor Interface", True),
    (False, True, "Address Scan Detected", False),
    (True, True, "No Traffic Detected on Sensor Interface", True),
])
def test_alert_vs_system_notifications(alerts_on, system_on, title, expected):
    rules = ruleset(rule(report_alert_notifications=alerts_on, report_system_notifications=system_on,
                         engines=["Anomaly"], protocols=["MODBUS"]))
    engine = "Operational" if "Sensor" in title else "Anomaly"
    # system notifications ignore the engine and protocol criteria (they carry no traffic)
    assert bool(rules.match(make_alert(title=title, engine=engine, severity="Major"), protocols=["MODBUS"])[1]) \
        is expected


def test_disabled_rules_never_match():
    assert ruleset(rule(enabled=False)).match(make_alert()) == ([], set())


def test_rules_apply_only_after_first_seen_unless_replay():
    rules = ruleset(rule(name="new"))
    seen = {"new": T0 + timedelta(seconds=1)}
    assert rules.match(make_alert(), first_seen=seen)[0] == []
    assert rules.match(make_alert(time=T0 + timedelta(seconds=1)), first_seen=seen)[0] == ["new"]
    assert rules.match(make_alert(), first_seen=seen, replay=True)[0] == ["new"]
    assert rules.match(make_alert(), first_seen={})[0] == ["new"]  # no record yet: applies


def test_one_destination_per_connection_report_type_and_table():
    app = {"type": "servicenow", "report_type": "defender_for_iot_application"}
    rules = ruleset(
        rule(name="a", actions=[ACTION]),
        rule(name="b", minimum_severity="Major", actions=[{**ACTION, "table": "incident", "connection_id":
                                                          "servicenow_default"}, app]),
        rule(name="c", actions=[{**ACTION, "table": "sn_si_incident"}]),
        rule(name="d", minimum_severity="Critical", actions=[app]),
    )
    names, dests = rules.match(make_alert(severity="Major"))
    assert names == ["a", "b", "c"]
    assert dests == {Destination("servicenow_default", "incidents", "incident"),
                     Destination("servicenow_default", "incidents", "sn_si_incident"),
                     Destination("servicenow_default", "defender_for_iot_application", "u_defender_iot_alert")}
