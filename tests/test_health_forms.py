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


def ui_dropdown_labels(schema: dict) -> list[str]:
    """The UI's rule (FieldDropdown): one option per ``enum`` value, None shown as "null" (or its display)."""
    display = schema.get("values_display") or {}
    return [display.get("null" if v is None else str(v), "null" if v is None else str(v)) for v in schema["enum"]]


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


# ----------------------------------------------------------------- what the live UI is served (REST API)

@pytest.fixture(scope="module")
def served(airflow_db):
    """The three DAGs parsed and stored as the dag-processor does, and an authenticated REST client."""
    from airflow.api_fastapi.app import create_app
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from fastapi.testclient import TestClient

    from tests.test_health_api import _token

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=str(ROOT / "dags"), bundle_path=ROOT / "dags", bundle_name="dags-folder")
    assert not bag.import_errors, bag.import_errors
    sync_bag_to_db(bag, "dags-folder", None)
    with TestClient(create_app("core"), base_url="http://testserver") as client:
        client.headers["Authorization"] = f"Bearer {_token()}"
        yield client


@pytest.mark.airflow_db
@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_the_trigger_form_the_ui_gets(served, dag_id):
    """GET /api/v2/dags/<id>/details is what the UI's trigger form renders (FlexibleForm)."""
    resp = served.get(f"/api/v2/dags/{dag_id}/details")
    assert resp.status_code == 200, resp.text
    params = resp.json()["params"]
    assert "sources" in params
    for name, param in params.items():
        schema = param["schema"]
        assert schema.get("title"), f"{dag_id}.{name}: no title in the served form"
        assert param.get("description") or schema.get("description"), f"{dag_id}.{name}: no description"
    assert not ui_marks_required(params["sources"]["schema"]), params["sources"]
    assert params["sources"]["value"] in ([], None)


@pytest.mark.airflow_db
def test_the_connection_forms_the_ui_gets(served):
    """GET /ui/connections/hook_meta (the UI's private API) is what the UI's connection form renders."""
    resp = served.get("/ui/connections/hook_meta")
    assert resp.status_code == 200, resp.text
    meta = {m["connection_type"]: m for m in resp.json()}
    auth = meta["servicenow"]["extra_fields"]["auth_type"]["schema"]
    assert ui_dropdown_labels(auth) == ["oauth_password", "oauth_client_credentials", "basic"]
    appliance = meta["defender_iot"]["extra_fields"]["appliance"]["schema"]
    assert ui_dropdown_labels(appliance) == ["sensor", "management_console"]
