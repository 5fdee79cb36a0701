"""State keys the alert forwarding shares with the alert trigger (asset ``defender_iot_alerts``), and the
rules' first-seen times, which both record: a rule applies to alerts raised after the first process that ran
with it started."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

log = logging.getLogger("defender_servicenow.forwarding")


def watermark_key(source: str) -> str:
    """Before the ledger: the newest alert forwarded for a source (read once, to start the ledger there)."""
    return f"forwarded_up_to:{source}"


def rule_first_seen_key(rule_name: str) -> str:
    """When a rule was first seen by the trigger or the forwarding task, whichever ran first (ISO-8601 UTC)."""
    return f"rule_first_seen:{rule_name}"


def watch_start_key(source: str) -> str:
    """Trigger-owned: when the alert trigger started watching a source (epoch ms); written once."""
    return f"watch_start:{source}"


def seen_key(source: str) -> str:
    """Trigger-owned: the newest alert the trigger has seen for a source."""
    return f"seen:{source}"


def inventory_key(source: str) -> str:
    """Task-owned: the device facts protocol rules need, refreshed every DEFENDER_SYNC_FREQUENCY_MINUTES."""
    return f"inventory:{source}"


class StateStore(Protocol):
    """The sync half of Airflow's asset state accessor (``get``/``set``)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...


def record_first_seen(state: StateStore, rule_names: Sequence[str], now: datetime) -> dict[str, datetime]:
    """The first-seen time of each rule, recording ``now`` for a rule no process has seen yet (the trigger
    does the same): a rule applies to alerts raised after the first process that ran with it started, so the
    result never depends on whether the watcher or a forwarding run came first."""
    out: dict[str, datetime] = {}
    for name in rule_names:
        raw = state.get(rule_first_seen_key(name))
        try:
            out[name] = datetime.fromisoformat(raw) if raw else None
        except (TypeError, ValueError):
            log.warning("Unreadable first-seen time %r of rule %r: recording a new one", raw, name)
            out[name] = None
        if out[name] is None:
            out[name] = now
            state.set(rule_first_seen_key(name), now.isoformat())
            log.info("Forwarding rule %r first seen at %s: it applies to alerts raised from then on", name,
                     now.isoformat())
    return out
