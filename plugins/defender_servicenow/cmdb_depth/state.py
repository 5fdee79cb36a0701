"""State of sensors, sensor links and relations, in the device sync's asset state store
(``defender_device_sync_state``), reusing its sharded, change-only ``SourceState``.

Keys (one writer each: the source's mapped task of that kind): ``<source>/<kind>/meta`` and
``<source>/<kind>/<nnn>``, kind = ``sensors``, ``sensor_links``, ``relations`` or ``cves``. The device entries
(``<source>/devices/<nnn>``) are only read, for the device CIs' sys_ids and classes.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from defender_servicenow.sync import DEFAULT_MAX_VALUE_BYTES, SourceState, StateStore

KINDS = ("sensors", "sensor_links", "relations", "cves")
_SYS_ID, _CLASS, _RETIRED = 1, 2, 4   # device entry: [digest, sys_id, class, missing runs, retired]


class DepthState(SourceState):
    """``SourceState`` under ``<source>/<kind>/...`` keys."""

    def __init__(self, store: StateStore, source: str, kind: str, shards: int = 8,
                 max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES):
        if kind not in KINDS:
            raise ValueError(f"unknown state kind {kind!r}")
        self.kind = kind
        super().__init__(store, source, shards=shards, max_value_bytes=max_value_bytes)

    def _meta_key(self) -> str:
        return f"{self.source}/{self.kind}/meta"

    def _shard_key(self, index: int) -> str:
        return f"{self.source}/{self.kind}/{index:03d}"


def device_cis(store: StateStore, source: str, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
               ) -> dict[int, tuple[str, str]]:
    """Device id -> (sys_id, class) of this source's device CIs that ServiceNow confirmed and that are not
    retired: the only CIs a relation of this source may join."""
    out = {}
    for device_id, entry in SourceState(store, source, max_value_bytes=max_value_bytes).items():
        if entry[_SYS_ID] and not entry[_RETIRED] and str(device_id).isdigit():
            out[int(device_id)] = (entry[_SYS_ID], entry[_CLASS])
    return out


def today() -> int:
    """Days since the epoch (UTC): relation ages are kept per day, so state changes at most daily."""
    return int(datetime.now(timezone.utc).timestamp() // 86400)


def day_of(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() // 86400)


def record_depth_failure(store: StateStore, source: str, kind: str, failure: dict) -> None:
    """``<source>/<kind>/meta``: ``last_outcome`` failed and ``last_failure`` (the report task reads it)."""
    key = f"{source}/{kind}/meta"
    meta: dict[str, Any] = dict(store.get(key, None) or {})
    store.set(key, {**meta, "last_outcome": "failed", "last_failure": failure})


def depth_failure_reason(store: StateStore | None, source: str, kind: str, run_id: str | None) -> str:
    meta = (store.get(f"{source}/{kind}/meta", None) or {}) if store is not None else {}
    failure = meta.get("last_failure") or {}
    if failure.get("message") and (run_id is None or failure.get("run_id") == run_id):
        return str(failure["message"])
    return f"the {kind} task failed before it could say why; read its log"
