"""Persistence of the delivery ledger (:class:`defender_servicenow.ledger.Ledger`) within the asset state
store's value limit (``[state_store] max_value_storage_bytes``, measured as ``len(json.dumps(value))``).

* ``ledger:<conn id>`` = ``{"floor_ms", "keys_since_ms", "dests": [destination text, ...],
  "done_segments": [id, ...], "pending_segments": [id, ...]}``; written only when it changes.
* ``ledger:<conn id>/done/<id>`` = ``{"<alert id>@<time ms>": 1, ...}`` and
  ``ledger:<conn id>/pending/<id>`` = ``{"<alert id>@<time ms>": [destination index, ...], ...}`` (index
  ``-1``: Defender no longer lists the alert). Keys leave out the ``<conn id>:`` prefix of the alert key
  (a key without it is stored as ``:<key>``); the alert time is read from the key.

Each segment stays below ``SEGMENT_FILL`` of the limit. New entries are appended to the newest segment
(alerts are settled roughly in time order), so saving a confirmed chunk rewrites one segment (two when
one fills, plus the main value for the new segment list), and pruning the window rewrites only the
oldest ones. A ledger in the previous single-value format (``done`` and ``pending`` inline) is read as it
is and moved into segments at its first save: no alert is forwarded again.
"""

from __future__ import annotations

import json
from typing import Any

from defender_servicenow.ledger import Ledger, ledger_key

SEGMENT_FILL = 0.8
DEFAULT_MAX_VALUE_BYTES = 65535
UNLISTED = -1


def segment_key(source: str, part: str, segment: int) -> str:
    return f"ledger:{source}/{part}/{segment:06d}"


def done_segment_key(source: str, segment: int) -> str:
    return segment_key(source, "done", segment)


def time_of(key: str) -> int:
    return int(key.rsplit("@", 1)[1])


class _Segments:
    """One mapping (compact key -> JSON value) kept in capped segments; remembers what was saved."""

    def __init__(self, store: Any, source: str, part: str, cap: int):
        self.store, self.source, self.part, self.cap = store, source, part, cap
        self.data: dict[int, dict[str, Any]] = {}
        self.where: dict[str, int] = {}

    def load(self, ids) -> dict[str, Any]:
        for segment in map(int, ids or ()):
            self.data[segment] = dict(self.store.get(segment_key(self.source, self.part, segment), None) or {})
            for key in self.data[segment]:
                self.where[key] = segment
        return {k: v for seg in self.data.values() for k, v in seg.items()}

    def save(self, wanted: dict[str, Any]) -> tuple[int, list[int]]:
        """Bring the segments to ``wanted`` (insertion order); returns (values written, emptied ids)."""
        dirty: set[int] = set()
        for key in [k for k in self.where if k not in wanted]:
            segment = self.where.pop(key)
            del self.data[segment][key]
            dirty.add(segment)
        segment = max(self.data, default=-1)
        size = len(json.dumps(self.data[segment])) if segment >= 0 else self.cap + 1
        for key, value in wanted.items():
            where = self.where.get(key)
            if where is not None:
                if self.data[where][key] != value:
                    self.data[where][key] = value
                    dirty.add(where)
                continue
            grow = len(json.dumps({key: value})) + 1
            if size + grow > self.cap:
                segment = max(self.data, default=-1) + 1
                self.data[segment], size = {}, 2
            self.data[segment][key] = value
            self.where[key] = segment
            size += grow
            dirty.add(segment)
        written = 0
        for index in sorted(dirty):
            if self.data[index]:
                self.store.set(segment_key(self.source, self.part, index), self.data[index])
                written += 1
        emptied = [index for index in sorted(dirty) if not self.data[index]]
        for index in emptied:
            del self.data[index]
        return written, emptied

    def ids(self) -> list[int]:
        return sorted(self.data)

    def delete(self, emptied: list[int]) -> None:
        delete = getattr(self.store, "delete", None)
        for index in emptied if delete is not None else ():
            delete(segment_key(self.source, self.part, index))


class LedgerState:
    """Loads and saves one source's :class:`Ledger` (see the module docstring)."""

    def __init__(self, store: Any, source: str, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES):
        self.store, self.source = store, source
        cap = int((max_value_bytes if max_value_bytes > 0 else DEFAULT_MAX_VALUE_BYTES) * SEGMENT_FILL)
        self._done = _Segments(store, source, "done", cap)
        self._pending = _Segments(store, source, "pending", cap)
        self._dests: list[str] = []
        self._main: str | None = None     # the main value as last saved (JSON)

    def _compact(self, key: str) -> str:
        prefix = f"{self.source}:"
        return key[len(prefix):] if key.startswith(prefix) else f":{key}"

    def _expand(self, text: str) -> str:
        return text[1:] if text.startswith(":") else f"{self.source}:{text}"

    def load(self) -> Ledger | None:
        raw = self.store.get(ledger_key(self.source))
        ledger = Ledger.from_state(raw)
        if ledger is None:
            return None
        self._dests = [str(d) for d in raw.get("dests") or ()]
        for text in self._done.load(raw.get("done_segments")):
            key = self._expand(text)
            ledger.done[key] = time_of(key)
        for text, indexes in self._pending.load(raw.get("pending_segments")).items():
            key = self._expand(text)
            entry = {"t": time_of(key), "dests": sorted(self._dests[i] for i in indexes if i != UNLISTED)}
            if UNLISTED in indexes:
                entry["unlisted"] = True
            ledger.pending[key] = entry
        if "done" not in raw and "pending" not in raw:
            self._main = json.dumps(raw, sort_keys=True)
        return ledger

    def _encode(self, entry: dict) -> list[int]:
        out = []
        for dest in entry.get("dests") or ():
            if dest not in self._dests:
                self._dests.append(dest)
            out.append(self._dests.index(dest))
        return sorted(out) + ([UNLISTED] if entry.get("unlisted") else [])

    def save(self, ledger: Ledger) -> int:
        """Write what changed since the last load or save; returns how many values were written."""
        done = {self._compact(k): 1 for k in sorted(ledger.done, key=lambda k: (ledger.done[k], k))}
        pending = {self._compact(k): self._encode(v)
                   for k, v in sorted(ledger.pending.items(), key=lambda kv: (int(kv[1]["t"]), kv[0]))}
        written_done, emptied_done = self._done.save(done)
        written_pending, emptied_pending = self._pending.save(pending)
        main = {"floor_ms": ledger.floor_ms, "keys_since_ms": ledger.keys_since_ms, "dests": self._dests,
                "done_segments": self._done.ids(), "pending_segments": self._pending.ids()}
        written = written_done + written_pending
        text = json.dumps(main, sort_keys=True)
        if text != self._main:
            self.store.set(ledger_key(self.source), main)
            self._main = text
            written += 1
        self._done.delete(emptied_done)            # after the main value no longer lists them
        self._pending.delete(emptied_pending)
        return written
