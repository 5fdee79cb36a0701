"""Settings are validated when DAG files are parsed: a bad value names the variable and the rule."""

from __future__ import annotations

import pytest
from defender_servicenow import settings
from defender_servicenow.exceptions import ConfigError


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, 60), ("5", 5), (" 15 ", 15), ("1440", 1440)],
)
def test_sync_frequency_valid(raw, expected):
    env = {} if raw is None else {"DEFENDER_SYNC_FREQUENCY_MINUTES": raw}
    assert settings.sync_frequency_minutes(env) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [("4", "at least 5"), ("0", "at least 5"), ("-10", "at least 5"), ("abc", "whole number"),
     ("7.5", "whole number"), ("60m", "whole number")],
)
def test_sync_frequency_invalid_names_variable_and_rule(raw, fragment):
    with pytest.raises(ConfigError) as err:
        settings.sync_frequency_minutes({"DEFENDER_SYNC_FREQUENCY_MINUTES": raw})
    assert "DEFENDER_SYNC_FREQUENCY_MINUTES" in str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, ["defender_iot_default"]), ("cm", ["cm"]), ("s1, s2 ,s3", ["s1", "s2", "s3"])],
)
def test_sources_valid(raw, expected):
    env = {} if raw is None else {"DEFENDER_SOURCES": raw}
    assert settings.defender_sources(env) == expected


@pytest.mark.parametrize("raw", ["s1,,s2", "s1,s1", "bad id", "s1;s2"])
def test_sources_invalid(raw):
    with pytest.raises(ConfigError, match="DEFENDER_SOURCES"):
        settings.defender_sources({"DEFENDER_SOURCES": raw})


def test_servicenow_conn_id_single():
    assert settings.servicenow_conn_id({}) == "servicenow_default"
    assert settings.servicenow_conn_id({"SERVICENOW_CONN_ID": "sn_prod"}) == "sn_prod"
    with pytest.raises(ConfigError, match="exactly one"):
        settings.servicenow_conn_id({"SERVICENOW_CONN_ID": "a,b"})


def test_rules_file_relative_to_project_root(tmp_path):
    assert settings.rules_file({}) == settings.PROJECT_ROOT / "include/config/forwarding_rules.yaml"
    absolute = tmp_path / "rules.yaml"
    assert settings.rules_file({"DEFENDER_FORWARDING_RULES_FILE": str(absolute)}) == absolute


def test_provider_info_registers_both_connection_types():
    from defender_servicenow.get_provider_info import get_provider_info

    info = get_provider_info()
    types = {c["connection-type"]: c for c in info["connection-types"]}
    assert set(types) == {"servicenow", "defender_iot", "defender_iot_azure"}
    assert types["defender_iot_azure"]["hook-class-name"].endswith("DefenderIoTAzureHook")
    assert types["servicenow"]["conn-fields"]["client_secret"]["schema"]["format"] == "password"
    assert info["package-name"] == "airflow-provider-defender-servicenow"


@pytest.mark.parametrize(("raw", "expected"), [(None, 10.0), ("0", 0.0), ("30", 30.0), ("2.5", 2.5)])
def test_alert_lookback_minutes(raw, expected):
    env = {} if raw is None else {"DEFENDER_ALERT_LOOKBACK_MINUTES": raw}
    assert settings.alert_lookback_minutes(env) == expected


@pytest.mark.parametrize("raw", ["-1", "abc", "nan", "20000"])
def test_alert_lookback_minutes_invalid(raw):
    with pytest.raises(ConfigError, match="DEFENDER_ALERT_LOOKBACK_MINUTES"):
        settings.alert_lookback_minutes({"DEFENDER_ALERT_LOOKBACK_MINUTES": raw})


@pytest.mark.parametrize(("raw", "expected"), [(None, 30), ("0", 0), ("5", 5), ("120", 120)])
def test_alert_safety_run_minutes(raw, expected):
    env = {} if raw is None else {"DEFENDER_ALERT_SAFETY_RUN_MINUTES": raw}
    assert settings.alert_safety_run_minutes(env) == expected


@pytest.mark.parametrize("raw", ["-1", "3", "abc", "7.5"])
def test_alert_safety_run_minutes_invalid(raw):
    with pytest.raises(ConfigError, match="DEFENDER_ALERT_SAFETY_RUN_MINUTES"):
        settings.alert_safety_run_minutes({"DEFENDER_ALERT_SAFETY_RUN_MINUTES": raw})


def test_airflow_api_conn_id_is_optional():
    assert settings.airflow_api_conn_id({}) is None
    assert settings.airflow_api_conn_id({"AIRFLOW_API_CONN_ID": "airflow_api"}) == "airflow_api"
    with pytest.raises(ConfigError, match="AIRFLOW_API_CONN_ID"):
        settings.airflow_api_conn_id({"AIRFLOW_API_CONN_ID": "a,b"})


@pytest.mark.parametrize(("raw", "expected"), [(None, None), ("off", None), ("handle", "handle"),
                                               ("HANDLEANDLEARN", "handleAndLearn")])
def test_handle_alerts_on_close(raw, expected):
    env = {} if raw is None else {"DEFENDER_HANDLE_ALERTS_ON_CLOSE": raw}
    assert settings.handle_alerts_on_close(env) == expected


def test_handle_alerts_on_close_invalid():
    with pytest.raises(ConfigError, match="DEFENDER_HANDLE_ALERTS_ON_CLOSE='close': give one of off, handle"):
        settings.handle_alerts_on_close({"DEFENDER_HANDLE_ALERTS_ON_CLOSE": "close"})
