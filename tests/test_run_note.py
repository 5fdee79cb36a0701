"""The optional run note goes through Airflow's REST API: token, then PATCH with update_mask=note; any
failure is logged and returns False, never raises (a note must not fail a sync)."""

from __future__ import annotations

import json

import pytest
from defender_servicenow.run_note import set_run_note
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from include.simulators.runner import serve_in_thread


@pytest.fixture
def fake_airflow_api(monkeypatch):
    seen: list[dict] = []
    app = FastAPI()

    @app.post("/auth/token")
    async def token(request: Request):
        body = await request.json()
        if body != {"username": "admin", "password": "s3cret-Pass"}:
            return JSONResponse({"detail": "Invalid credentials"}, status_code=401)
        return JSONResponse({"access_token": "jwt-token-abcdef"}, status_code=201)

    @app.patch("/api/v2/dags/{dag_id}/dagRuns/{run_id}")
    async def patch(dag_id: str, run_id: str, request: Request):
        seen.append({"dag_id": dag_id, "run_id": run_id, "mask": request.query_params.get("update_mask"),
                     "auth": request.headers.get("authorization"), "body": await request.json()})
        return JSONResponse({"note": seen[-1]["body"]["note"]})

    server = serve_in_thread(app)

    def connect(password="s3cret-Pass"):
        monkeypatch.setenv("AIRFLOW_CONN_AIRFLOW_API", json.dumps(
            {"conn_type": "http", "host": server.url, "login": "admin", "password": password}))

    yield connect, seen
    server.stop()


def test_note_is_patched_with_a_fresh_token(fake_airflow_api):
    connect, seen = fake_airflow_api
    connect()
    run_id = "manual__2026-11-26T10:00:00+00:00"
    assert set_run_note("airflow_api", "defender_device_sync", run_id, "Last Sync: " + "x" * 2000)
    (call,) = seen
    assert (call["dag_id"], call["run_id"], call["mask"]) == ("defender_device_sync", run_id, "note")
    assert call["auth"] == "Bearer jwt-token-abcdef"
    assert call["body"]["note"].startswith("Last Sync: ") and len(call["body"]["note"]) == 1000


@pytest.mark.parametrize("case", ["bad password", "missing connection", "server down"])
def test_failures_are_logged_not_raised(fake_airflow_api, monkeypatch, caplog, case):
    connect, seen = fake_airflow_api
    if case == "bad password":
        connect(password="wrong-password-123")
    elif case == "server down":
        monkeypatch.setenv("AIRFLOW_CONN_AIRFLOW_API", json.dumps(
            {"conn_type": "http", "host": "http://127.0.0.1:9", "login": "admin", "password": "s3cret-Pass"}))
    caplog.set_level("WARNING", logger="defender_servicenow.run_note")
    assert set_run_note("airflow_api", "d", "r", "note", timeout=2) is False
    assert seen == [] and "Could not write the run note" in caplog.text
    assert "s3cret-Pass" not in caplog.text and "wrong-password-123" not in caplog.text
