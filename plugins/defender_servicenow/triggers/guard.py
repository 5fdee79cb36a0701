"""The alert trigger's lock-out guard: after a source rejects its credentials (Entra ID refuses the client secret,
an appliance answers 401/403 to the API token), the trigger neither logs in to nor polls that source until the
connection's settings change or ``DEFENDER_AUTH_COOLDOWN_MINUTES`` pass, and says so in one log line.

It is :class:`defender_servicenow.hooks.lockout.AuthGuard` (same record, same salted fingerprint) kept where the
triggerer can reach it: the watched asset's own state store (key ``auth:<conn id>``; the trigger is its only
writer), read and written with the async accessors, the 200,000-round fingerprint computed off the event loop.
So the guard survives the trigger's restarts (after each event, after a triggerer restart). It is separate from
the tasks' guard (asset ``defender_servicenow_auth``), which the triggerer cannot read: a rejection seen by the
trigger does not stop the DAG's tasks, and one seen by a task does not stop the trigger (each stops itself
after its own first rejection).
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime, timezone
from typing import Any

from defender_servicenow.hooks.lockout import AuthGuard


def guard_key(conn_id: str) -> str:
    return f"auth:{conn_id}"


class _Snapshot:
    """A sync one-record view of the async store, for AuthGuard."""

    def __init__(self, key: str, value: Any = None):
        self.data = {key: value} if value else {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value


class TriggerAuthGuard:
    """:param store: the trigger's ``asset_state_store`` (async ``aget``/``aset``)."""

    def __init__(self, store: Any, cooldown_minutes: float):
        self.store, self.cooldown_minutes = store, cooldown_minutes
        self._verdicts: dict[str, tuple[str, datetime]] = {}   # conn id -> (sha256 of material, suspended until)
        self._rejected: set[str] = set()   # sources with a stored rejection (cleared on the first good poll)

    def _guard(self, conn_id: str, record: Any = None) -> tuple[AuthGuard, _Snapshot]:
        snapshot = _Snapshot(guard_key(conn_id), record)
        guard = AuthGuard(snapshot, "defender", conn_id, cooldown_minutes=self.cooldown_minutes)
        guard.key = guard_key(conn_id)
        return guard, snapshot

    async def suspended(self, conn_id: str, material: str) -> str | None:
        """A plain sentence while logins to this source are suspended for these settings, else None."""
        record = await self.store.aget(guard_key(conn_id))
        if not isinstance(record, dict) or record.get("status") != "credentials_rejected":
            return None
        self._rejected.add(conn_id)
        try:
            if datetime.now(timezone.utc) >= datetime.fromisoformat(record["until"]):
                return None   # the cool-down passed: one more attempt (no fingerprint needed)
        except (KeyError, TypeError, ValueError):
            return None
        digest = hashlib.sha256(material.encode()).hexdigest()   # in memory only: no PBKDF2 on every poll
        known = self._verdicts.get(conn_id)
        if known and known[0] == digest and datetime.now(timezone.utc) < known[1]:
            return self._sentence(conn_id, record)
        guard, _ = self._guard(conn_id, record)
        sentence = await asyncio.to_thread(guard.check, material)
        if sentence:
            self._verdicts[conn_id] = (digest, datetime.fromisoformat(record["until"]))
        return sentence and self._sentence(conn_id, record)

    @staticmethod
    def _sentence(conn_id: str, record: dict) -> str:
        return (f"{conn_id}: its credentials were rejected at {record.get('at')} ({record.get('message')}); the "
                f"alert trigger neither logs in nor polls it until the connection is changed or "
                f"{record.get('until')} (lock-out guard). Fix the connection's credentials.")

    async def rejected(self, conn_id: str, material: str, message: str) -> None:
        self._rejected.add(conn_id)
        self._verdicts.pop(conn_id, None)
        await asyncio.shield(self._record(conn_id, material, message))   # stored even if the trigger stops now

    async def _record(self, conn_id: str, material: str, message: str) -> None:
        guard, snapshot = self._guard(conn_id)
        await asyncio.to_thread(guard.rejected, material, message)
        await self.store.aset(guard_key(conn_id), snapshot.data[guard_key(conn_id)])

    async def accepted(self, conn_id: str) -> None:
        if conn_id in self._rejected:
            await self.store.aset(guard_key(conn_id), {"status": "ok", "at": datetime.now(timezone.utc).isoformat(),
                                                       "message": "credentials accepted"})
            self._rejected.discard(conn_id)
