"""Lock-out guard: after a service rejects a connection's credentials, no further login is tried with them
until the connection's settings change or a cool-down passes (``SERVICENOW_AUTH_COOLDOWN_MINUTES`` /
``DEFENDER_AUTH_COOLDOWN_MINUTES``, default 30), so that repeated runs cannot lock the integration user out.

State: asset ``defender_servicenow_auth``, key ``servicenow:<conn id>`` or ``defender:<conn id>``:
``{"status": "ok" | "credentials_rejected" | "unreachable", "at", "message", "until", "salt", "fingerprint"}``
(``unreachable``: the last attempt could not reach the service; it suspends nothing). The
fingerprint is a salted PBKDF2 (200,000 rounds) of the connection's settings and secret: it tells whether
the settings changed without storing anything from which the secret can be recovered cheaply.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

AUTH_ASSET = "defender_servicenow_auth"
ROUNDS = 200_000
RECHECK = timedelta(seconds=60)   # how often a working hook re-reads the record another task may have changed


def _fingerprint(material: str, salt: str) -> str:
    return hashlib.pbkdf2_hmac("sha256", material.encode(), bytes.fromhex(salt), ROUNDS).hex()


def _when(value) -> str:
    """``2026-03-01 12:00:05 UTC`` for people (an unreadable value as it is)."""
    try:
        at = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError):
        return str(value)


class AuthGuard:
    """:param store: the asset state accessor of ``defender_servicenow_auth`` (sync ``get``/``set``).
    :param kind: ``servicenow`` or ``defender``. :param material: the connection's settings and secret."""

    def __init__(self, store: Any, kind: str, conn_id: str, *, cooldown_minutes: float,
                 clock: Callable[[], datetime] | None = None):
        self.store, self.kind, self.conn_id = store, kind, conn_id
        self.key = f"{kind}:{conn_id}"
        self.cooldown = timedelta(minutes=cooldown_minutes)
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self._status: str | None = None
        self._rejected_here = False
        self._material: str | None = None
        self._read_at: datetime | None = None

    def check(self, material: str) -> str | None:
        """A plain sentence when logins are suspended for these settings, else None."""
        self._material = material
        record = self.store.get(self.key) or {}
        self._status, self._read_at = record.get("status"), self.clock()
        if record.get("status") != "credentials_rejected":
            return None
        try:
            until = datetime.fromisoformat(record["until"])
            same = _fingerprint(material, record["salt"]) == record["fingerprint"]
        except (KeyError, TypeError, ValueError):
            return None
        if not same or self.clock() >= until:
            return None
        said = f" ({record['message']})" if record.get("message") else ""   # e.g. "<path> answered HTTP 401"
        return (f"{self.kind} connection {self.conn_id!r}: its credentials were rejected at "
                f"{_when(record.get('at'))}{said}; no login is tried with them until the connection is changed "
                f"or {_when(until)} (lock-out guard). Fix the connection's credentials.")

    def rejected(self, material: str, message: str) -> None:
        now, salt = self.clock(), os.urandom(16).hex()
        self.store.set(self.key, {"status": "credentials_rejected", "at": now.isoformat(),
                                  "until": (now + self.cooldown).isoformat(), "message": message[:300],
                                  "salt": salt, "fingerprint": _fingerprint(material, salt)})
        self._status = "credentials_rejected"
        self._rejected_here = True

    def unreachable(self, message: str) -> None:
        """The service could not be reached (connection refused, timeout, proxy, TLS). Recorded for the sync
        health page; it never replaces a rejection that keeps logins suspended, whether this hook recorded it
        or another task on the same connection did since this one checked."""
        if self._rejected_here or self._status == "unreachable":
            return
        if self._material is not None and self.check(self._material):
            return
        self.store.set(self.key, {"status": "unreachable", "at": self.clock().isoformat(), "message": message[:300]})
        self._status = "unreachable"

    def accepted(self) -> None:
        """An accepted answer: the record says ``ok`` (written only when it said something else; re-read at
        most every :data:`RECHECK`, so that an ``unreachable`` another task recorded meanwhile does not outlive
        this task's successes)."""
        now = self.clock()
        if self._status == "ok" and (self._read_at is None or now - self._read_at >= RECHECK):
            self._status, self._read_at = (self.store.get(self.key) or {}).get("status"), now
        if self._status != "ok":
            self.store.set(self.key, {"status": "ok", "at": self.clock().isoformat(),
                                      "message": "credentials accepted"})
            self._status = "ok"
