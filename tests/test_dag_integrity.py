"""Every DAG file imports cleanly, with the ids, schedules and params users rely on (interface.md)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"defender_device_sync", "defender_alert_forwarding", "defender_servicenow_cleanup"}


@pytest.fixture
def dagbag(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("DEFENDER_SOURCES", "defender_iot_default")
    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_all_dags_present_with_docs(dagbag):
    assert EXPECTED <= set(dagbag.dag_ids)
    for dag_id in EXPECTED:
        dag = dagbag.dags.get(dag_id)
        assert dag.doc_md, f"{dag_id} has no doc_md for the UI"
        assert dag.max_active_runs == 1, f"{dag_id} must not run concurrently with itself"


def test_sync_schedule_follows_frequency(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("DEFENDER_SYNC_FREQUENCY_MINUTES", "15")
    bag = DagBag(dag_folder=str(ROOT / "dags" / "defender_device_sync.py"))
    dag = bag.dags.get("defender_device_sync")
    assert dag.timetable.delta == timedelta(minutes=15)
    assert dag.catchup is False


@pytest.mark.parametrize("raw", ["4", "abc"])
def test_bad_frequency_is_an_import_error_naming_the_variable(monkeypatch, raw):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("DEFENDER_SYNC_FREQUENCY_MINUTES", raw)
    bag = DagBag(dag_folder=str(ROOT / "dags" / "defender_device_sync.py"))
    assert "defender_device_sync" not in bag.dag_ids
    (message,) = bag.import_errors.values()
    assert "DEFENDER_SYNC_FREQUENCY_MINUTES" in message


def test_params_match_interface(dagbag):
    sync = dagbag.dags.get("defender_device_sync").params
    assert {"full_resync", "dry_run", "sources"} <= set(sync.keys())
    assert sync["full_resync"] is False and sync["dry_run"] is False
    fwd = dagbag.dags.get("defender_alert_forwarding").params
    assert {"since", "until", "dry_run", "sources"} <= set(fwd.keys())
    cleanup = dagbag.dags.get("defender_servicenow_cleanup")
    params = cleanup.params
    assert {"scope", "mode", "sources", "older_than_days", "dry_run", "confirm"} <= set(params.keys())
    assert params["dry_run"] is True and params["mode"] == "retire" and params["scope"] == "both"
    assert type(cleanup.timetable).__name__ == "NullTimetable", "clean-up must be manual only"


def test_forwarding_is_event_driven(dagbag):
    dag = dagbag.dags.get("defender_alert_forwarding")
    assets = list(getattr(dag.timetable.asset_condition, "objects", []))
    assert assets, "defender_alert_forwarding must be scheduled on an asset with a watcher"
    watchers = [w for asset in assets for w in getattr(asset, "watchers", [])]
    assert watchers, "the alerts asset needs an AssetWatcher (triggerer), not a cron"


def test_connection_types_registered_with_ui_metadata():
    from airflow.providers_manager import ProvidersManager

    pm = ProvidersManager()
    assert "airflow-provider-defender-servicenow" in pm.providers
    behaviours = pm.field_behaviours
    assert behaviours["servicenow"]["relabeling"]["host"] == "Instance URL"
    assert "login" in behaviours["defender_iot"]["hidden_fields"]
    hooks = pm.hooks
    assert hooks["servicenow"].hook_class_name.endswith("ServiceNowHook")
    assert hooks["defender_iot"].hook_class_name.endswith("DefenderIoTHook")


@pytest.mark.parametrize(("raw", "expected"), [(None, timedelta(minutes=30)), ("15", timedelta(minutes=15)),
                                               ("0", None)])
def test_forwarding_safety_run_schedule(monkeypatch, raw, expected):
    """Besides the watcher's events, a periodic run catches up after a lost event or a stopped triggerer."""
    from airflow.dag_processing.dagbag import DagBag

    if raw is None:
        monkeypatch.delenv("DEFENDER_ALERT_SAFETY_RUN_MINUTES", raising=False)
    else:
        monkeypatch.setenv("DEFENDER_ALERT_SAFETY_RUN_MINUTES", raw)
    bag = DagBag(dag_folder=str(ROOT / "dags" / "defender_alert_forwarding.py"))
    timetable = bag.dags["defender_alert_forwarding"].timetable
    assert list(timetable.asset_condition.objects), "always started by the alert watcher"
    inner = getattr(timetable, "timetable", None)
    assert (inner.delta if inner is not None else None) == expected


def test_forwarding_safety_run_rejects_tiny_intervals(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("DEFENDER_ALERT_SAFETY_RUN_MINUTES", "2")
    bag = DagBag(dag_folder=str(ROOT / "dags" / "defender_alert_forwarding.py"))
    (message,) = bag.import_errors.values()
    assert "DEFENDER_ALERT_SAFETY_RUN_MINUTES" in message


@pytest.mark.parametrize(("raw", "has_task"), [(None, False), ("off", False), ("handle", True),
                                               ("handleAndLearn", True)])
def test_closed_loop_task_only_when_enabled(monkeypatch, raw, has_task):
    from airflow.dag_processing.dagbag import DagBag

    if raw is None:
        monkeypatch.delenv("DEFENDER_HANDLE_ALERTS_ON_CLOSE", raising=False)
    else:
        monkeypatch.setenv("DEFENDER_HANDLE_ALERTS_ON_CLOSE", raw)
    bag = DagBag(dag_folder=str(ROOT / "dags" / "defender_alert_forwarding.py"))
    assert bag.import_errors == {}
    dag = bag.dags["defender_alert_forwarding"]
    assert ("handle_closed_alerts" in dag.task_ids) is has_task


def test_closed_loop_setting_is_validated(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("DEFENDER_HANDLE_ALERTS_ON_CLOSE", "close")
    bag = DagBag(dag_folder=str(ROOT / "dags" / "defender_alert_forwarding.py"))
    (message,) = bag.import_errors.values()
    assert "DEFENDER_HANDLE_ALERTS_ON_CLOSE" in message and "handleAndLearn" in message
