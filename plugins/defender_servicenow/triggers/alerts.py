"""DefenderAlertTrigger: the AssetWatcher trigger that wakes ``defender_alert_forwarding`` on new alerts.

Run by the triggerer (it must live in this installed package). Every ``poll_interval`` seconds it asks each
source for the alerts raised since its ``seen:<conn id>`` watermark (appliances: v2 alerts API, ``fromTime``;
Azure: one Resource Graph query within the quota; see triggers/pollers.py), and when
any source has new ones it stores the new watermarks and yields one event, then returns (the triggerer
starts a fresh instance ~2 s later, which resumes from the stored watermarks).

Durable state (the asset state store; this trigger is the only writer of these keys):

* ``seen:<conn id>`` = ``{"time_ms": newest alert time, "ids": [ids at that time]}``. With no watermark
  (first start), it starts from *now*: history is not replayed (use the DAG's since/until params).
* ``auth:<conn id>`` = the lock-out guard's record (triggers/guard.py): after a source rejects its credentials
  it is neither logged in to nor polled until its connection changes or ``DEFENDER_AUTH_COOLDOWN_MINUTES`` pass.
* ``rule_first_seen:<rule name>`` = ISO-8601 time at which a trigger first ran with that rule (rule names
  are kwargs, so editing the rules file re-creates the trigger); rules apply to alerts raised after that.

The event is only a wake-up: the task reconciles ``DEFENDER_ALERT_RECONCILE_HOURS`` of Defender's alerts
with its own delivery ledger, so a lost or duplicated event loses or duplicates nothing. Transient failures (network, 5xx, bad JSON, a missing
connection) are logged without secrets and retried with exponential back-off per source; polling goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import httpx
from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from defender_servicenow import settings
from defender_servicenow.exceptions import ConfigError, DefenderAuthError
from defender_servicenow.forwarding import rule_first_seen_key, seen_key, watch_start_key
from defender_servicenow.triggers.guard import TriggerAuthGuard

CLASSPATH = "defender_servicenow.triggers.alerts.DefenderAlertTrigger"
MAX_BACKOFF_SECONDS = 300.0
AUTH_RECHECK_SECONDS = 60.0   # a suspended source: how often its connection is re-read to see if it changed


class _Suspended(Exception):
    """The source's credentials were rejected: the lock-out guard holds (the message says until when)."""


def _now_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)


def new_alerts(items: Any, watermark: dict) -> list[tuple[int, int]]:
    """``(time_ms, id)`` of the alerts after ``watermark`` in a decoded alerts answer (bad items skipped).

    New means raised after the watermark time, or (``max_id``) given an id above every id seen so far:
    appliances number alerts as they receive them, so an alert that arrives late (a sensor reconnecting to
    its management console) has an old time but a new id.
    """
    if not isinstance(items, list):
        raise ValueError(f"expected a JSON list of alerts, got {type(items).__name__}")
    t, done = int(watermark["time_ms"]), set(watermark.get("ids") or ())
    max_id = watermark.get("max_id")
    parsed = []
    for item in items:
        try:
            parsed.append((int(item["time"]), int(item["id"])))
        except (KeyError, TypeError, ValueError):
            continue
    if max_id is None:  # a watermark written before max_id existed: ids up to its time count as seen
        max_id = max((i for ms, i in parsed if ms <= t), default=0)
        watermark["max_id"] = max_id
    return sorted((ms, i) for ms, i in parsed if ms > t or (ms == t and i not in done) or i > max_id)


def advance(watermark: dict, found: list[tuple[int, int]]) -> dict:
    t, ids = int(watermark["time_ms"]), set(watermark.get("ids") or ())
    max_id = max([int(watermark.get("max_id") or 0)] + [i for _, i in found])
    for ms, alert_id in sorted(found):
        if ms > t:
            t, ids = ms, set()
        if ms == t:
            ids.add(alert_id)
    return {"time_ms": t, "ids": sorted(ids), "max_id": max_id}


class DefenderAlertTrigger(BaseEventTrigger):
    """Poll Defender for IoT appliances for new alerts; yield one event when there are any.

    :param sources: Defender connection ids (conn type ``defender_iot`` or ``defender_iot_azure``).
    :param poll_interval: seconds between polls (``DEFENDER_ALERT_POLL_SECONDS``, default 15).
    :param rule_names: the forwarding rules' names, whose first-seen time this trigger records.
    :param lookback_minutes: how far behind the watermark to look for alerts delivered late
        (``DEFENDER_ALERT_LOOKBACK_MINUTES``, default 10), as the forwarding task does.
    """

    def __init__(self, sources: list[str], poll_interval: float = 15.0, rule_names: list[str] | None = None,
                 lookback_minutes: float = 10.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.sources = list(sources)
        self.poll_interval = float(poll_interval)
        self.rule_names = list(rule_names or [])
        self.lookback_minutes = float(lookback_minutes)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return CLASSPATH, {"sources": self.sources, "poll_interval": self.poll_interval,
                           "rule_names": self.rule_names, "lookback_minutes": self.lookback_minutes}

    # ------------------------------------------------------------------ run

    async def _record_rules(self, store) -> None:
        now = datetime.now(timezone.utc).isoformat()
        for name in self.rule_names:
            key = rule_first_seen_key(name)
            if await store.aget(key) is None:
                await store.aset(key, now)
                self.log.info("Forwarding rule %r first seen at %s: it applies to alerts raised from now on", name, now)

    async def _poll(self, conn_id: str, clients: dict, watermark: dict, guard: Any) -> list[tuple[int, int]]:
        """One poll of one source through its poller (triggers/pollers.py: appliance or Azure); a source whose
        credentials were rejected is not polled (:class:`_Suspended`) while the lock-out guard holds."""
        from defender_servicenow.triggers.pollers import poller_for

        if conn_id not in clients:
            poller = await poller_for(conn_id, int(self.lookback_minutes * 60_000))
            sentence = await guard.suspended(conn_id, poller.material)
            if sentence:
                await poller.aclose()
                raise _Suspended(sentence)
            clients[conn_id] = poller
        try:
            return await clients[conn_id].poll(watermark)
        except DefenderAuthError as exc:
            await guard.rejected(conn_id, clients[conn_id].material, str(exc))
            raise _Suspended(f"{conn_id}: credentials rejected ({exc}); the alert trigger neither logs in nor "
                             f"polls it until the connection is changed or for {guard.cooldown_minutes:g} "
                             "minutes (DEFENDER_AUTH_COOLDOWN_MINUTES, lock-out guard)") from None

    async def run(self) -> AsyncIterator[TriggerEvent]:
        store = self.asset_state_store  # injected by the triggerer; None in __init__ / serialize / tests
        if store is None:
            raise RuntimeError("DefenderAlertTrigger only runs as an AssetWatcher trigger (no asset state store)")
        await self._record_rules(store)
        watermarks: dict[str, dict] = {}
        for conn_id in self.sources:
            wm = await store.aget(seen_key(conn_id))
            if not wm:
                wm = {"time_ms": _now_ms(), "ids": []}
                await store.aset(seen_key(conn_id), wm)
                if await store.aget(watch_start_key(conn_id)) is None:
                    await store.aset(watch_start_key(conn_id), wm["time_ms"])
                self.log.info("%s: no alert watermark yet; watching alerts raised from now on", conn_id)
            watermarks[conn_id] = dict(wm)  # our copy: new_alerts() may note max_id in it
        clients: dict[str, Any] = {}   # conn id -> its poller
        guard = TriggerAuthGuard(store, settings.defender_auth_cooldown_minutes())
        told: set[str] = set()   # sources whose suspension this instance has logged
        failures = dict.fromkeys(self.sources, 0)
        next_poll = dict.fromkeys(self.sources, 0.0)
        loop = asyncio.get_running_loop()
        try:
            while True:
                found: dict[str, list[tuple[int, int]]] = {}
                for conn_id in self.sources:
                    if loop.time() < next_poll[conn_id]:
                        continue
                    try:
                        new = await self._poll(conn_id, clients, watermarks[conn_id], guard)
                    except _Suspended as exc:   # rejected credentials: no login, re-read the connection later
                        if conn_id not in told:
                            self.log.warning("%s", exc)
                            told.add(conn_id)
                        next_poll[conn_id] = loop.time() + max(self.poll_interval, AUTH_RECHECK_SECONDS)
                        old = clients.pop(conn_id, None)
                        if old:
                            await old.aclose()
                        continue
                    except Exception as exc:  # noqa: BLE001 - transient by design: log, back off, keep polling
                        failures[conn_id] += 1
                        delay = min(self.poll_interval * 2 ** failures[conn_id], MAX_BACKOFF_SECONDS)
                        delay = max(delay, getattr(clients.get(conn_id), "wait_s", 0.0))   # a spent quota
                        next_poll[conn_id] = loop.time() + delay
                        self.log.warning("%s: polling alerts failed (%s); attempt %d, next try in %.0f s", conn_id,
                                    _describe(exc), failures[conn_id], delay)
                        old = clients.pop(conn_id, None)
                        if old:
                            await old.aclose()
                        continue
                    await guard.accepted(conn_id)
                    told.discard(conn_id)
                    if failures[conn_id]:
                        self.log.info("%s: polling alerts works again after %d failures", conn_id, failures[conn_id])
                    wait = clients[conn_id].wait_s   # Azure: the quota is spent until it resets
                    failures[conn_id], next_poll[conn_id] = 0, (loop.time() + wait if wait else 0.0)
                    if new:
                        found[conn_id] = new
                if found:
                    payload = {}
                    for conn_id, new in found.items():
                        watermarks[conn_id] = clients[conn_id].advance(watermarks[conn_id], new)
                        await store.aset(seen_key(conn_id), watermarks[conn_id])
                        payload[conn_id] = {"new_alerts": len(new), "newest_time_ms": new[-1][0]}
                    self.log.info("New alerts: %s", ", ".join(f"{c}: {p['new_alerts']}" for c, p in payload.items()))
                    yield TriggerEvent({"sources": payload})
                    return
                await asyncio.sleep(self.poll_interval)
        finally:
            for poller in clients.values():
                await poller.aclose()


def _describe(exc: Exception) -> str:
    """A secret-free description: the exception type and status, never headers or bodies."""
    if isinstance(exc, ConfigError):
        return f"connection settings: {exc} (fix the connection; polling retries with back-off)"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from {exc.request.url.path}"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__} for {exc.request.url.path}" if _has_request(exc) else type(exc).__name__
    if isinstance(exc, ValueError):
        return f"unusable answer: {str(exc)[:120]}"
    return f"{type(exc).__name__}: {str(exc)[:120]}"


def _has_request(exc: httpx.HTTPError) -> bool:
    try:
        exc.request  # noqa: B018
        return True
    except RuntimeError:
        return False
