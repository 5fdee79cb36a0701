"""Device sync state: the per-source change-detection state in the asset state store, and the failure
record the DAG and the health page read (moved from :mod:`.sync`; see its docstring for the layout)."""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable
from typing import Any, Protocol

log = logging.getLogger("defender_servicenow.sync")

STATE_VERSION = 1
DEFAULT_SHARDS = 128
DEFAULT_MAX_VALUE_BYTES = 65535          # Airflow's default [state_store] max_value_storage_bytes


class StateStore(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...
    def set(self, key: str, value: Any) -> None: ...


class MemoryStateStore:
    """In-memory stand-in for the asset state store (tests, benchmarks); counts writes."""

    def __init__(self, data: dict | None = None):
        self.data: dict[str, Any] = dict(data or {})
        self.writes = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        if value is None:
            raise ValueError("Cannot set value as None")
        self.writes += 1
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


# --------------------------------------------------------------------------- state


def max_value_bytes() -> int:
    """Airflow's ``[state_store] max_value_storage_bytes`` (0 = no limit; 65535 when not configured)."""
    try:
        from airflow.configuration import conf

        return conf.getint("state_store", "max_value_storage_bytes", fallback=DEFAULT_MAX_VALUE_BYTES)
    except ImportError:   # pragma: no cover - the engine without Airflow
        return DEFAULT_MAX_VALUE_BYTES


class SourceState:
    """The per-source change-detection state, sharded over the store's keys; writes only changed shards.

    Shards are sized to the inventory: when a shard to write would pass ``fill`` of the store's value limit
    (``max_value_bytes``, as Airflow measures it: ``len(json.dumps(value))``), every device is spread over
    enough shards (doubling) that each stays below half the limit, and the new count is recorded at once.
    """

    def __init__(self, store: StateStore, source: str, shards: int = DEFAULT_SHARDS,
                 max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES, fill: float = 0.8):
        self.store, self.source = store, source
        self.max_value_bytes, self.fill = max_value_bytes, fill
        self.meta: dict = store.get(self._meta_key(), None) or {}
        self.shards = int(self.meta.get("shards") or shards)
        self._data: list[dict] = [dict(store.get(self._shard_key(i), None) or {}) for i in range(self.shards)]
        self._dirty: set[int] = set()

    def _meta_key(self) -> str:
        return f"{self.source}/meta"

    def _shard_key(self, index: int) -> str:
        return f"{self.source}/devices/{index:03d}"

    def _shard(self, device_id: str) -> int:
        return zlib.crc32(device_id.encode()) % self.shards

    def get(self, device_id: str) -> list | None:
        return self._data[self._shard(device_id)].get(device_id)

    def put(self, device_id: str, entry: list) -> None:
        index = self._shard(device_id)
        if self._data[index].get(device_id) != entry:
            self._data[index][device_id] = entry
            self._dirty.add(index)

    def remove(self, device_id: str) -> None:
        index = self._shard(device_id)
        if self._data[index].pop(device_id, None) is not None:
            self._dirty.add(index)

    def items(self) -> Iterable[tuple[str, list]]:
        for shard in self._data:
            yield from list(shard.items())

    def __len__(self) -> int:
        return sum(len(s) for s in self._data)

    def _size(self, index: int) -> int:
        return len(json.dumps(self._data[index]))

    def _fit(self) -> None:
        """Grow the shard count when a changed shard comes near the store's value limit."""
        limit = self.max_value_bytes
        if limit <= 0 or not self._dirty or max(map(self._size, self._dirty)) <= limit * self.fill:
            return
        total = sum(map(self._size, range(self.shards)))
        count = self.shards
        while total / count > limit / 2:
            count *= 2
        entries = [e for shard in self._data for e in shard.items()]
        old = self.shards
        self.shards, self._data = count, [{} for _ in range(count)]
        for device_id, entry in entries:
            self._data[self._shard(device_id)][device_id] = entry
        self._dirty = set(range(count))
        log.info("State of %s: %d devices take about %d bytes; spread over %d shards (was %d) so that no value "
                 "passes the state store's max_value_storage_bytes (%d)", self.source, len(entries), total, count,
                 old, limit)
        self._resharded = True

    def save(self) -> int:
        """Write the changed shards; returns how many."""
        self._fit()
        for index in sorted(self._dirty):
            self.store.set(self._shard_key(index), self._data[index])
        written = len(self._dirty)
        self._dirty.clear()
        if getattr(self, "_resharded", False):   # the shard count goes with the shards it describes
            self._resharded = False
            self.save_meta()
        return written

    def save_meta(self, **values: Any) -> None:
        self.meta = {**self.meta, "version": STATE_VERSION, "shards": self.shards, **values}
        self.store.set(self._meta_key(), self.meta)


def record_failure(store: StateStore, source: str, failure: dict, *, kind: str | None = None) -> None:
    """Mark ``<source>/meta`` failed (``last_outcome``, ``last_failure``); keeps everything else."""
    meta = dict(store.get(f"{source}/meta", None) or {})
    meta.update(last_outcome="failed", last_failure=failure, **({"kind": kind} if kind else {}))
    store.set(f"{source}/meta", meta)


def run_failures(store: StateStore | None, sources: Iterable[str], run_id: str | None) -> dict[str, str]:
    """source -> why its sync failed in run ``run_id`` (from ``<source>/meta``; a plain reason if unrecorded)."""
    out = {}
    for source in sources:
        meta = (store.get(f"{source}/meta", None) or {}) if store is not None else {}
        failure = meta.get("last_failure") or {}
        if meta.get("last_outcome") == "failed" and failure.get("run_id") == run_id and failure.get("message"):
            out[source] = str(failure["message"])
        else:
            out[source] = "its task did not finish (see its log)"
    return out
