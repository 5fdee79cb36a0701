"""Delivery ledger of the alert forwarding engine (pure): which alerts of a source ServiceNow confirmed,
which are still pending for which destination, which records could not be read at all.

State keys (asset ``defender_iot_alerts``, written only by the forwarding task of that source):

* ``ledger:<conn id>`` (and its segments, see :mod:`defender_servicenow.ledger_state`, which keeps every
  value within the state store's limit): ``floor_ms``, ``keys_since_ms``, ``done`` {alert key: time ms} and
  ``pending`` {alert key: {"t": time ms, "dests": ["<conn>|<report type>|<table>", ...]}}. ``done`` holds
  every alert of the reconcile window that needs nothing more (confirmed by ServiceNow for every
  destination, or matched by no rule); ``pending`` the alerts a destination has not confirmed yet: retried
  every run while in the window, and before it one window per run from the oldest
  (:meth:`Ledger.parked_slice`); ``"unlisted": true`` marks a parked alert Defender no longer lists (kept
  and counted, not retried).
  ``floor_ms``: alerts raised before it are never forwarded (rules apply to alerts raised after they existed;
  a replay forwards older ones). ``keys_since_ms``: when the re-image-proof keys started, in the
  appliance's clock: the newest alert time of the first successful read after the ledger started (or
  Airflow's clock then, if later); alerts raised up to it may have records under the previous key
  (``<conn id>:<alert id>``). ``null`` until that first read (an appliance clock ahead of Airflow's must
  not hide the newest alerts the previous version forwarded).
* ``dead_letter:<conn id>`` = ``{record id: {"reason", "first_at", "last_at", "attempts"}}``: records that
  cannot be read even with fallbacks (e.g. no alert id); re-read and retried every run while Defender
  still lists them, counted in the run's summary line.
* ``status:<conn id>``: the health summary of the contract (``status_record``).

The alert key is ``<conn id>:<alert id>@<alert time ms>``: an appliance re-imaged under the same connection
restarts its numbering, but not its clock, so a new alert never takes an old alert's key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from defender_servicenow.models import Alert, datetime_to_ms, ms_to_datetime
from defender_servicenow.rules import Destination

MAX_DEAD_LETTER = 1000
LEGACY_MARGIN_MS = 10 * 60_000  # a record under the previous key counts when created from alert time - this


def alert_key(alert: Alert) -> str:
    """The re-image-proof identity of an alert (see the module docstring): :attr:`models.Alert.key`."""
    return alert.key


def legacy_key(alert: Alert) -> str:
    """The key records were written under before: ``<conn id>:<alert id>``."""
    return f"{alert.source}:{alert.id}"


def ledger_key(source: str) -> str:
    return f"ledger:{source}"


def dead_letter_key(source: str) -> str:
    return f"dead_letter:{source}"


def status_key(source: str) -> str:
    return f"status:{source}"


def dest_text(dest: Destination) -> str:
    return f"{dest.connection_id}|{dest.report_type}|{dest.table}"


def dest_of(text: str) -> Destination:
    conn, report_type, table = text.split("|")
    return Destination(conn, report_type, table)


@dataclass
class Ledger:
    floor_ms: int
    keys_since_ms: int | None
    done: dict[str, int] = field(default_factory=dict)
    pending: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_state(cls, raw: Any) -> Ledger | None:
        if not isinstance(raw, Mapping) or "floor_ms" not in raw:
            return None
        keys_since = raw.get("keys_since_ms", raw["floor_ms"])
        return cls(int(raw["floor_ms"]), None if keys_since is None else int(keys_since),
                   {str(k): int(v) for k, v in (raw.get("done") or {}).items()},
                   {str(k): dict(v) for k, v in (raw.get("pending") or {}).items()})

    def as_state(self) -> dict:
        return {"floor_ms": self.floor_ms, "keys_since_ms": self.keys_since_ms, "done": self.done,
                "pending": self.pending}

    def start_keys(self, alerts: Iterable[Alert], now_ms: int) -> None:
        """After the first successful read: records under the previous key can exist for every alert the
        appliance already had, whatever its clock says."""
        if self.keys_since_ms is None:
            self.keys_since_ms = max([now_ms, *(datetime_to_ms(a.time) for a in alerts)])

    def pending_dests(self, key: str) -> set[Destination] | None:
        entry = self.pending.get(key)
        return None if entry is None else {dest_of(d) for d in entry.get("dests") or ()}

    def settle(self, alert: Alert, remaining: Iterable[Destination]) -> None:
        """Record the outcome for one alert: done, or pending for the destinations that did not confirm."""
        key, ms = alert_key(alert), datetime_to_ms(alert.time)
        left = sorted(dest_text(d) for d in remaining)
        if left:
            self.pending[key] = {"t": ms, "dests": left}
        else:
            self.pending.pop(key, None)
            self.done[key] = ms

    def mark_unlisted(self, from_ms: int, to_ms: int, listed: set[str]) -> list[str]:
        """Mark the parked alerts raised in ``[from_ms, to_ms)`` that a read of that range did not list
        (e.g. purged by the appliance): they stay pending and counted, but no longer hold the parked slice
        back. Returns their keys."""
        keys = sorted(k for k, p in self.pending.items()
                      if from_ms <= int(p["t"]) < to_ms and k not in listed and not p.get("unlisted"))
        for key in keys:
            self.pending[key]["unlisted"] = True
        return keys

    def prune(self, keep_from_ms: int) -> None:
        """Forget ``done`` entries older than the reconcile window (they are never read again)."""
        self.done = {k: t for k, t in self.done.items() if t >= keep_from_ms}

    def read_from_ms(self, window_start_ms: int) -> int:
        """Where the sweep starts: the reconcile window (never before the floor). Alerts parked before it
        are retried by :meth:`parked_slice`, so a destination broken for days never widens the sweep."""
        return max(self.floor_ms, window_start_ms)

    def parked_slice(self, window_start_ms: int, span_ms: int) -> tuple[int, int, int] | None:
        """``(from ms, to ms, parked left older)`` of the extra read that retries alerts parked before the
        window: at most ``span_ms`` (one window) from the oldest parked alert; ``parked left older`` counts
        the parked alerts between that slice and the window (they stay parked, read by later runs as the
        slice moves on). ``None`` when nothing is parked before the window."""
        start = self.read_from_ms(window_start_ms)
        old = sorted(int(p["t"]) for p in self.pending.values() if int(p["t"]) < start and not p.get("unlisted"))
        if not old:
            return None
        lo = max(self.floor_ms, old[0])
        hi = min(start, lo + span_ms)
        return lo, hi, sum(1 for t in old if t > hi)


def note_dead_letters(current: Mapping, invalid: Iterable[tuple[str, str]], now_iso: str,
                      readable: Iterable[str] = ()) -> dict:
    """The dead-letter set after a run that could not read ``invalid`` ((record id, reason) pairs) and read
    the alerts with ids ``readable``.

    Entries seen again are updated (attempts counted); entries whose record reads fine now leave (the
    alert is forwarded or pending, counted there, not twice); entries not seen again stay (the record may
    be outside the window read); at most ``MAX_DEAD_LETTER`` are kept, the most recent."""
    invalid = list(invalid)
    unreadable, read = {record_id for record_id, _ in invalid}, set(readable)
    out = {k: dict(v) for k, v in current.items() if k in unreadable or k not in read}
    for record_id, reason in invalid:
        entry = out.setdefault(record_id, {"first_at": now_iso, "attempts": 0})
        entry.update(reason=reason, last_at=now_iso, attempts=int(entry.get("attempts", 0)) + 1)
    if len(out) > MAX_DEAD_LETTER:
        out = dict(sorted(out.items(), key=lambda kv: kv[1]["last_at"])[-MAX_DEAD_LETTER:])
    return out


def status_record(*, at: str, kind: str | None, forwarded_up_to_ms: int | None, pending: int, dead_letter: int,
                  failure: dict | None, previous: Mapping | None, sensors: Mapping[str, int] | None = None) -> dict:
    """``status:<conn id>`` (contract: health data); ``last_failure`` is kept after a later success."""
    record = {"at": at, "kind": kind,
              "forwarded_up_to": ms_to_datetime(forwarded_up_to_ms).isoformat() if forwarded_up_to_ms else None,
              "pending": pending, "dead_letter": dead_letter, "last_outcome": "failed" if failure else "ok",
              "last_failure": failure or (previous or {}).get("last_failure")}
    if sensors:
        record["sensors"] = {name: ms_to_datetime(ms).isoformat() for name, ms in sorted(sensors.items())}
    return record
