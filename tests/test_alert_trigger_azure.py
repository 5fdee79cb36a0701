"""DefenderAlertTrigger with a defender_iot_azure source: one Resource Graph query per poll, new and late
(Resource Graph lags) alerts wake the DAG, and a spent quota is waited out instead of answered with 429s."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from defender_servicenow.triggers.pollers import advance_cloud, new_cloud_alerts

from tests.test_alert_trigger import FakeAssetStateStore, make_trigger
from tests.test_azure_forwarding_dag import add_alert


def test_cloud_alerts_are_new_once_and_only_after_the_watch_started():
    wm = {"time_ms": 1000, "ids": []}
    assert new_cloud_alerts([(900, 1), (1000, 2), (1001, 3)], wm) == [(1001, 3)]   # history is not new
    wm = advance_cloud(wm, [(1001, 3)], lookback_ms=600)
    assert new_cloud_alerts([(1001, 3)], wm) == []                                   # seen
    assert new_cloud_alerts([(1001, 3), (1000 + 1, 4), (1200, 5)], wm) == [(1001, 4), (1200, 5)]
    later = advance_cloud(wm, [(5000, 6)], lookback_ms=600)
    assert later["recent"] == [[5000, 6]] and later["floor_ms"] == 1000              # pruned out of the window


async def test_an_azure_source_wakes_the_dag_for_new_and_late_alerts_with_one_query_per_poll(azure_sim_factory):
    az = azure_sim_factory("trigger_azure", devices=10, alerts=5, quota=1000)
    store = FakeAssetStateStore()
    trigger = make_trigger(["trigger_azure"], store, poll_interval=0.05)
    gen = trigger.run()
    pending = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.6)
    assert not pending.done(), "the history must not wake the DAG"
    queries, tokens = az.sim.counters["arg"], az.sim.counters["token"]
    assert queries >= 3 and tokens == 1                    # one token, renewed only before it expires
    now = datetime.now(timezone.utc)
    await asyncio.to_thread(add_alert, az.sim, "High", now)
    event = await asyncio.wait_for(pending, 10)
    await gen.aclose()
    assert event.payload["sources"]["trigger_azure"]["new_alerts"] == 1

    # Resource Graph lags: with a watch running for a while, an alert that started two minutes before the
    # watermark shows up now
    watermark = store.data["seen:trigger_azure"]
    store.data["seen:trigger_azure"] = {**watermark, "floor_ms": watermark["time_ms"] - 4 * 60_000}
    late = datetime.fromtimestamp(watermark["time_ms"] / 1000, timezone.utc) - timedelta(minutes=2)
    again = make_trigger(["trigger_azure"], store, poll_interval=0.05)
    gen = again.run()
    pending = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.3)
    assert not pending.done(), "an alert already seen must not wake the DAG again"
    before = az.sim.counters["arg"]
    await asyncio.to_thread(add_alert, az.sim, "Medium", late)
    event = await asyncio.wait_for(pending, 10)
    await gen.aclose()
    assert event.payload["sources"]["trigger_azure"]["new_alerts"] == 1
    assert az.sim.counters["arg"] - before <= 3            # a poll is one query (a page holds the window)


async def test_a_spent_quota_is_waited_out_not_hammered(azure_sim_factory):
    az = azure_sim_factory("trigger_azure_quota", devices=5, alerts=0, quota=2, quota_window=1.0)
    store = FakeAssetStateStore()
    trigger = make_trigger(["trigger_azure_quota"], store, poll_interval=0.01)
    gen = trigger.run()
    pending = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(2.5)
    assert not pending.done()
    pending.cancel()
    await asyncio.gather(pending, return_exceptions=True)
    await gen.aclose()
    assert az.sim.counters["throttled"] == 0               # never sent a query the quota would refuse
    assert 2 <= az.sim.counters["arg"] <= 8                # about 2 per 1-s window, not 250
