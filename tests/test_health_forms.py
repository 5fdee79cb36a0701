"""Trigger forms and the ServiceNow connection form, as the Airflow 3.3 UI shows them."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAG_IDS = ("defender_device_sync", "defender_alert_forwarding", "defender_servicenow_cleanup")


def ui_marks_required(schema: dict) -> bool:
    """The UI's rule (FlexibleForm): a param is required when its schema has a type without "null"."""
    kind = schema.get("type")
    return bool(kind) and (not isinstance(kind, list) or "null" not in kind)


@pytest.fixture(scope="module")
def dags():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return {dag_id: bag.dags[dag_id] for dag_id in DAG_IDS}


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_every_param_has_a_title_and_a_description(dags, dag_id):
    params = dags[dag_id].params
    for name in params:
        schema = params.get_param(name).schema
        assert schema.get("title"), f"{dag_id}.{name} has no title"
        assert params.get_param(name).description, f"{dag_id}.{name} has no description"


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_empty_sources_is_not_marked_required_and_defaults_to_empty(dags, dag_id):
    param = dags[dag_id].params.get_param("sources")
    assert not ui_marks_required(param.schema)
    assert param.value == []
    param.resolve([])      # the default and an explicit empty list both validate
    param.resolve(None)    # the form sends null when the field is cleared


def test_servicenow_connection_form_offers_no_null_auth_type():
    from defender_servicenow.get_provider_info import get_provider_info

    servicenow = next(c for c in get_provider_info()["connection-types"] if c["connection-type"] == "servicenow")
    assert servicenow["conn-fields"]["auth_type"]["schema"]["enum"] == [
        "oauth_password", "oauth_client_credentials", "basic"]


def test_defender_connection_form_offers_no_null_appliance():
    from defender_servicenow.get_provider_info import get_provider_info

    defender = next(c for c in get_provider_info()["connection-types"] if c["connection-type"] == "defender_iot")
    schema = defender["conn-fields"]["appliance"]["schema"]
    assert schema["enum"] == ["sensor", "management_console"]
    assert schema["default"] == "sensor"
