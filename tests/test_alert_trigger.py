"""DefenderAlertTrigger: serialisation, events for new alerts only, durable watermarks, resilience.

run() is driven directly with a fake asset state store (airflow-asset-state.md §3), against the Defender
simulator in both appliance modes.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from defender_servicenow.triggers.alerts import CLASSPATH, DefenderAlertTrigger


class FakeAssetStateStore:
    """Same method names/signatures as AssetStateStoreAccessors (async half)."""

    def __init__(self, initial=None):
        self.data = dict(initial or {})
        self.writes: list[str] = []

    async def aget(self, key, default=None):
        return self.data.get(key, default)

    async def aset(self, key, value):
        if value is None:
            raise ValueError("Cannot set value as None")
        json.dumps(value, allow_nan=False)  # the real store only takes JSON values
        self.writes.append(key)
        self.data[key] = value

    async def adelete(self, key):
        self.data.pop(key, None)


def make_trigger(sources, store, **kw) -> DefenderAlertTrigger:
    trigger = DefenderAlertTrigger(sources=sources, poll_interval=kw.pop("poll_interval", 0.05), **kw)
    assert trigger.asset_state_store is None  # only the triggerer injects it
    trigger.asset_state_store = store
    return trigger


async def next_event(trigger, timeout=10.0):
    gen = trigger.run()
    try:
        return await asyncio.wait_for(gen.__anext__(), timeout)
    finally:
        await gen.aclose()


def test_serialize_round_trips():
    trigger = DefenderAlertTrigger(sources=["s1", "s2"], poll_interval=3, rule_names=["a", "b"])
    classpath, kwargs = trigger.serialize()
    assert classpath == CLASSPATH
    json.dumps(kwargs)  # JSON-serialisable kwargs: the trigger's identity
    clone = DefenderAlertTrigger(**kwargs)
    assert clone.serialize() == (classpath, kwargs)
    assert kwargs == {"sources": ["s1", "s2"], "poll_interval": 3.0, "rule_names": ["a", "b"],
                      "lookback_minutes": 10.0}


async def test_run_refuses_without_state_store():
    with pytest.raises(RuntimeError, match="AssetWatcher"):
        await DefenderAlertTrigger(sources=["x"]).run().__anext__()


@pytest.mark.parametrize("mode", ["sensor", "management_console"])
async def test_first_start_watches_from_now_then_emits_new_alerts_only(defender_sim_factory, mode):
    sim = defender_sim_factory(mode=mode, alerts=15, conn_id="defender_trig")
    store = FakeAssetStateStore()
    trigger = make_trigger(["defender_trig"], store, rule_names=["r1"])

    # First start: history (15 alerts) is not an event; the watermark and the rule's first-seen are recorded.
    gen = trigger.run()
    pending = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.5)
    assert not pending.done(), "existing alerts must not wake the DAG"
    assert store.data["seen:defender_trig"]["time_ms"] > 0 and "rule_first_seen:r1" in store.data
    assert store.data["watch_start:defender_trig"] == store.data["seen:defender_trig"]["time_ms"]
    first_seen = store.data["rule_first_seen:r1"]

    new = await asyncio.to_thread(sim.sim.add_alerts, 3)
    event = await asyncio.wait_for(pending, 10)
    await gen.aclose()
    assert event.payload["sources"]["defender_trig"]["new_alerts"] == 3
    seen = store.data["seen:defender_trig"]
    assert seen["time_ms"] == max(a["time"] for a in new)
    assert set(seen["ids"]) <= {a["id"] for a in new}

    # A fresh instance (the triggerer restarts it after the event) resumes from the stored watermark.
    again = make_trigger(["defender_trig"], store, rule_names=["r1"])
    gen = again.run()
    pending = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.4)
    assert not pending.done(), "alerts already seen must not produce a second event"
    await asyncio.to_thread(sim.sim.add_alerts, 1)
    event = await asyncio.wait_for(pending, 10)
    await gen.aclose()
    assert event.payload["sources"]["defender_trig"]["new_alerts"] == 1
    assert store.data["rule_first_seen:r1"] == first_seen  # recorded once, never moved


async def test_two_sources_and_transient_failures_are_survived(defender_sim_factory, capfd):
    a = defender_sim_factory(mode="sensor", alerts=2, conn_id="defender_a")
    b = defender_sim_factory(mode="sensor", alerts=2, conn_id="defender_b", name="sensor-b")
    store = FakeAssetStateStore({"seen:defender_a": {"time_ms": 1, "ids": []},
                                 "seen:defender_b": {"time_ms": 10**13, "ids": []}})
    # Source a answers 503 then invalid JSON before it recovers; b has nothing new (watermark in the future).
    a.sim.set_faults(fail_next={"count": 1, "status": 503, "path_prefix": "/api"}, invalid_json_next=1)
    trigger = make_trigger(["defender_a", "defender_b"], store, poll_interval=0.02)
    event = await next_event(trigger, timeout=15)
    assert set(event.payload["sources"]) == {"defender_a"}
    assert event.payload["sources"]["defender_a"]["new_alerts"] == 2
    out = "".join(capfd.readouterr())
    failures = [line for line in out.splitlines() if "polling alerts failed" in line]
    assert len(failures) >= 2 and any("HTTP 503" in m for m in failures), out
    assert "works again" in out
    assert a.token not in out  # no secrets in logs
    assert store.data["seen:defender_b"] == {"time_ms": 10**13, "ids": []}
    assert b.sim.counters()["requests"] >= 1  # b was polled too, it just had nothing new


async def test_missing_connection_is_logged_and_polling_goes_on(defender_sim_factory, capfd):
    good = defender_sim_factory(mode="sensor", alerts=1, conn_id="defender_ok")
    store = FakeAssetStateStore({"seen:defender_ok": {"time_ms": 1, "ids": []},
                                 "seen:defender_missing": {"time_ms": 1, "ids": []}})
    trigger = make_trigger(["defender_missing", "defender_ok"], store)
    event = await next_event(trigger)
    assert list(event.payload["sources"]) == ["defender_ok"]
    assert "defender_missing: polling alerts failed" in "".join(capfd.readouterr())
    assert good.sim.counters()["requests"] >= 1


async def test_a_bad_connection_setting_is_reported_as_such(defender_sim_factory, monkeypatch, capfd):
    good = defender_sim_factory(mode="sensor", alerts=1, conn_id="defender_ok2")
    conn = json.loads(__import__("os").environ["AIRFLOW_CONN_DEFENDER_OK2"])
    monkeypatch.setenv("AIRFLOW_CONN_DEFENDER_BADTIMEOUT", json.dumps({**conn, "extra": {"timeout": "soon"}}))
    store = FakeAssetStateStore({"seen:defender_ok2": {"time_ms": 1, "ids": []},
                                 "seen:defender_badtimeout": {"time_ms": 1, "ids": []}})
    event = await next_event(make_trigger(["defender_badtimeout", "defender_ok2"], store))
    assert list(event.payload["sources"]) == ["defender_ok2"]
    out = "".join(capfd.readouterr())
    assert "connection settings: Connection 'defender_badtimeout': extra timeout='soon' is not a number" in out
    assert good.token not in out


async def test_an_alert_delivered_late_wakes_the_dag(defender_sim_factory):
    """A sensor reconnecting to its management console delivers alerts with old times but new ids."""
    sim = defender_sim_factory(mode="management_console", alerts=3, conn_id="defender_late")
    store = FakeAssetStateStore()
    trigger = make_trigger(["defender_late"], store)
    gen = trigger.run()
    pending = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.5)
    assert not pending.done()
    watermark = store.data["seen:defender_late"]["time_ms"]
    (late,) = sim.sim.add_alerts(1, time=watermark - 120_000, severity="Major", engine="Anomaly")
    event = await asyncio.wait_for(pending, 10)
    await gen.aclose()
    assert event.payload["sources"]["defender_late"]["new_alerts"] == 1
    seen = store.data["seen:defender_late"]
    assert seen["time_ms"] == watermark and seen["max_id"] == late["id"]

    # Outside the look-back window, a late alert is left to a replay (since/until params).
    sim.sim.add_alerts(1, time=watermark - 11 * 60_000)
    quiet = make_trigger(["defender_late"], store, lookback_minutes=10)
    gen = quiet.run()
    pending = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.5)
    assert not pending.done()
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await gen.aclose()
