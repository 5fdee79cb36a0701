"""The alert trigger's lock-out guard (triggers/guard.py): after a source rejects its credentials, neither this
trigger instance nor the ones after it (one per event, or after a triggerer restart) log in to or poll that
source again until its connection changes or the cool-down passes; one plain log line says so."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime, timedelta, timezone

from defender_servicenow.triggers import alerts as alerts_module

from include.simulators.azure_sim import SIM_CLIENT_SECRET
from tests.test_alert_trigger import FakeAssetStateStore, make_trigger


async def _run_for(trigger, seconds: float) -> None:
    """Run one trigger instance for a while (it must not fire), then stop it as the triggerer would."""
    gen = trigger.run()
    pending = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(seconds)
    assert not pending.done(), "no event expected"
    pending.cancel()
    await asyncio.gather(pending, return_exceptions=True)
    await gen.aclose()


def _set_password(monkeypatch, conn_id: str, password: str) -> None:
    conn = json.loads(os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"])
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({**conn, "password": password}))


async def test_a_rejected_client_secret_is_not_retried_by_later_trigger_instances(azure_sim_factory, monkeypatch,
                                                                                 capfd):
    monkeypatch.setattr(alerts_module, "AUTH_RECHECK_SECONDS", 0.05)
    az = azure_sim_factory("trig_lock_azure", secret="wrong-secret-value", alerts=0, quota=1000)
    store = FakeAssetStateStore()
    for _ in range(3):   # three instances, as after three events of other sources or triggerer restarts
        await _run_for(make_trigger(["trig_lock_azure"], store, poll_interval=0.02), 1.0)
    assert az.sim.counters["token"] == 1 and az.sim.counters["arg"] == 0   # one sign-in attempt in all
    record = store.data["auth:trig_lock_azure"]
    assert record["status"] == "credentials_rejected" and "wrong-secret-value" not in json.dumps(record)
    out = "".join(capfd.readouterr())
    lines = [line for line in out.splitlines() if "lock-out guard" in line]
    assert 1 <= len(lines) <= 3, out   # one line per instance, not one per poll
    assert "wrong-secret-value" not in out

    # the cool-down passed: one new attempt (still rejected: a new record, a new cool-down)
    store.data["auth:trig_lock_azure"] = {**record, "until": (datetime.now(timezone.utc)
                                                               - timedelta(seconds=1)).isoformat()}
    await _run_for(make_trigger(["trig_lock_azure"], store, poll_interval=0.02), 1.0)
    assert az.sim.counters["token"] == 2

    # the connection is fixed: polling resumes at once, the guard records the success
    _set_password(monkeypatch, "trig_lock_azure", SIM_CLIENT_SECRET)
    await _run_for(make_trigger(["trig_lock_azure"], store, poll_interval=0.02), 1.0)
    assert az.sim.counters["token"] == 3 and az.sim.counters["arg"] >= 2
    assert store.data["auth:trig_lock_azure"]["status"] == "ok"


async def test_a_rejected_api_token_stops_polling_the_appliance(defender_sim_factory, monkeypatch, capfd):
    monkeypatch.setattr(alerts_module, "AUTH_RECHECK_SECONDS", 0.05)
    sim = defender_sim_factory(mode="sensor", alerts=1, conn_id="trig_lock_app")
    _set_password(monkeypatch, "trig_lock_app", "revoked-token-123")
    store = FakeAssetStateStore({"seen:trig_lock_app": {"time_ms": 1, "ids": []}})
    for _ in range(3):
        await _run_for(make_trigger(["trig_lock_app"], store, poll_interval=0.02), 1.0)
    assert sim.sim.counters()["unauthorized"] == 1   # not one per poll, not one per instance
    out = "".join(capfd.readouterr())
    assert "lock-out guard" in out and "revoked-token-123" not in out

    _set_password(monkeypatch, "trig_lock_app", sim.token)   # a new token: polled again, the alert wakes the DAG
    gen = make_trigger(["trig_lock_app"], store, poll_interval=0.02).run()
    try:
        event = await asyncio.wait_for(gen.__anext__(), 10)
    finally:
        await gen.aclose()
    assert event.payload["sources"]["trig_lock_app"]["new_alerts"] == 1
