"""The health page's routes inside Airflow's own API server app (in-process): auth, JSON shape, no secrets."""

from __future__ import annotations

import json

import pytest

from tests.asset_state import write_asset_state

pytestmark = pytest.mark.airflow_db

SECRETS = ["sn-password-Zq81", "sn-client-secret-Kx22", "defender-token-Pw93"]
FAILURE = {"at": "2026-03-01T11:00:00+00:00", "message": "Sync of sensor_bad failed: it answered HTTP 401.",
           "dag_id": "defender_device_sync", "run_id": "manual__1", "task_id": "sync_source", "map_index": 1,
           "try_number": 1}


@pytest.fixture
def client(airflow_db, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("DEFENDER_SOURCES", "sensor_ok,sensor_bad")
    # A connection id of its own: other tests in the session record the state of servicenow_default.
    monkeypatch.setenv("SERVICENOW_CONN_ID", "servicenow_health")
    monkeypatch.setenv("AIRFLOW_CONN_SENSOR_OK", json.dumps(
        {"conn_type": "defender_iot", "host": "https://10.0.0.1", "password": SECRETS[2],
         "extra": {"appliance": "sensor"}}))
    monkeypatch.setenv("AIRFLOW_CONN_SERVICENOW_HEALTH", json.dumps(
        {"conn_type": "servicenow", "host": "https://sn.example", "login": "u", "password": SECRETS[0],
         "extra": {"client_id": "c", "client_secret": SECRETS[1]}}))
    from airflow.api_fastapi.app import create_app

    with TestClient(create_app("core"), base_url="http://testserver") as test_client:
        yield test_client


def _token() -> str:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))


def _record_state(sync_meta: dict) -> None:
    """Write ``sensor_ok/meta`` as the device sync would (through the state backend)."""
    write_asset_state("defender_device_sync_state", "sensor_ok/meta", sync_meta)


ROUTES = ["/defender-servicenow/", "/defender-servicenow/api/health"]
OTHER_PATHS = ["/defender-servicenow/docs", "/defender-servicenow/redoc", "/defender-servicenow/openapi.json",
               "/defender-servicenow/api/health/", "/defender-servicenow/no-such-page", "/defender-servicenow/api/x"]


@pytest.mark.parametrize("path", ROUTES + OTHER_PATHS)
def test_anonymous_and_forged_tokens_are_refused(client, path):
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403
    assert client.get(path, cookies={"_token": "forged"}).status_code == 403


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_refused_to_anonymous_users(client, method):
    for path in ROUTES + OTHER_PATHS[:1]:
        assert client.request(method, path).status_code == 401, (method, path)


def test_a_logged_in_user_gets_200_on_the_routes_and_404_elsewhere(client):
    headers = {"Authorization": f"Bearer {_token()}"}
    assert [client.get(p, headers=headers).status_code for p in ROUTES] == [200, 200]
    for path in OTHER_PATHS:
        resp = client.get(path, headers=headers)
        assert resp.status_code == 404, (path, resp.status_code)
        assert resp.json()["detail"].startswith("No such page"), resp.text   # not an OpenAPI document


def test_logged_in_user_gets_the_json_and_no_secret(client):
    from datetime import datetime, timezone

    _record_state({"last_success": datetime.now(timezone.utc).isoformat(), "last_outcome": "ok",
                   "counts": {"seen": 3, "inserted": 3}})
    write_asset_state("defender_device_sync_state", "sensor_bad/meta",
                      {"last_outcome": "failed", "last_failure": FAILURE})
    resp = client.get("/defender-servicenow/api/health", headers={"Authorization": f"Bearer {_token()}"})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert set(doc) == {"generated_at", "sources", "servicenow"}
    by_id = {s["id"]: s for s in doc["sources"]}
    assert list(by_id) == ["sensor_ok", "sensor_bad"]
    ok = by_id["sensor_ok"]
    assert set(ok) == {"id", "kind", "status", "last_sync", "last_counts", "last_failure", "alerts"}
    assert ok["status"] == "ok" and ok["kind"] == "sensor" and ok["last_counts"]["seen"] == 3
    # The shape of interface.md's "Sync health page", key by key.
    assert set(ok["last_counts"]) == {"seen", "inserted", "updated", "unchanged", "retired", "skipped", "failed"}
    assert set(ok["alerts"]) == {"forwarded_up_to", "pending", "dead_letter"}
    assert ok["last_failure"] is None
    bad = by_id["sensor_bad"]
    assert bad["status"] == "failing" and bad["kind"] is None and bad["last_sync"] is None
    assert bad["last_failure"] == {"at": FAILURE["at"], "message": FAILURE["message"],
                                   "log_url": "/dags/defender_device_sync/runs/manual__1/tasks/sync_source/mapped/1"
                                              "?try_number=1"}
    assert doc["servicenow"] == {"id": "servicenow_health", "status": "unknown"}
    assert not [s for s in SECRETS if s in resp.text]


def test_the_ui_session_cookie_opens_the_page_without_secrets(client):
    resp = client.get("/defender-servicenow/", cookies={"_token": _token()})
    assert resp.status_code == 200, resp.text
    html = resp.text
    assert "Defender ⇄ ServiceNow" in html and 'data-source="sensor_ok"' in html and 'data-source="sensor_bad"' in html
    assert 'href="/dags/defender_device_sync"' in html
    assert not [s for s in SECRETS if s in html]
    assert _token() not in html


def test_navigation_entry_is_registered_once(client):
    resp = client.get("/api/v2/plugins", headers={"Authorization": f"Bearer {_token()}"})
    plugins = [p for p in resp.json()["plugins"] if p["name"] == "defender_servicenow"]
    assert len(plugins) == 1
    assert plugins[0]["external_views"][0]["name"] == "Defender ⇄ ServiceNow"
    assert plugins[0]["fastapi_apps"][0]["url_prefix"] == "/defender-servicenow"
    errors = client.get("/api/v2/plugins/importErrors", headers={"Authorization": f"Bearer {_token()}"}).json()
    assert errors["total_entries"] == 0, errors


def test_refresh_interval_setting_and_its_validation(client, monkeypatch):
    cookies = {"_token": _token()}
    monkeypatch.setenv("DEFENDER_HEALTH_REFRESH_SECONDS", "5")
    html = client.get("/defender-servicenow/", cookies=cookies).text
    assert 'data-refresh="5"' in html and "refreshes every 5 s" in html
    monkeypatch.setenv("DEFENDER_HEALTH_REFRESH_SECONDS", "1")
    html = client.get("/defender-servicenow/", cookies=cookies).text
    assert "DEFENDER_HEALTH_REFRESH_SECONDS" in html and 'data-refresh="30"' in html
