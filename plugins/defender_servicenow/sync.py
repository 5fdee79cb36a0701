"""Device sync engine: Defender for IoT inventory -> ServiceNow CMDB through the IRE.

One :class:`DeviceSync` per source (a sensor or a management console). It takes the two hooks and a
state store (anything with ``get(key, default)`` / ``set(key, value)``, e.g. Airflow's asset state store
accessor or :class:`MemoryStateStore`), so it runs and is tested without Airflow.

A run:

1. streams the source's complete inventory; each device is mapped (:mod:`.mapping`); one that cannot be
   mapped is skipped with its id and reason;
2. compares the payload digest with the digest recorded at the last confirmed sync; unchanged devices are
   not sent (``full_resync`` sends everything);
3. sends the rest to the IRE in batches, several batches in parallel; per-item errors (MULTI_MATCH, ...)
   are reported per device, the rest is committed and recorded;
4. only after a complete extraction and a fully sent run, retires CIs of deleted devices (management
   console ``deleteddevices``; sensors: absent from ``retire_after_missing_runs`` consecutive runs):
   ``install_status=7``, ``operational_status=6`` through the Table API on the recorded sys_id;
5. writes the state shards it changed (also when it fails part way, so what ServiceNow confirmed is never
   sent twice) and, on success, the source's ``last sync`` record.

State layout (one writer per key: each source only writes its own keys)::

    <source>/meta            {"version", "shards", "last_success", "last_started", "counts"}
    <source>/devices/<nnn>   {"<device id>": [digest, sys_id, class, missing_runs, retired], ...}
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from defender_servicenow.exceptions import (
    ConfigError,
    ServiceNowError,
    ServiceNowForbiddenError,
    ServiceNowInvalidTableError,
)
from defender_servicenow.hooks.servicenow import BatchRequest
from defender_servicenow.hooks.servicenow import sys_id_of as _ref
from defender_servicenow.mapping import (
    ClassMapping,
    MappingError,
    identifiers,
    map_device,
    payload_digest,
    without_identifiers,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
DEFAULT_SHARDS = 128
DEFAULT_MAX_VALUE_BYTES = 65535          # Airflow's default [state_store] max_value_storage_bytes
DELETED_LOOKBACK = timedelta(hours=1)   # overlap when asking the console for devices deleted since the last sync
RETIRED = {"install_status": "7", "operational_status": "6"}
REVIVED = {"install_status": "1", "operational_status": "1"}
_MAX_DETAIL_LINES = 200                   # per-device log lines per kind; the rest are counted
_INSERT_OPS = {"INSERT", "INSERT_AS_PARTIAL", "INSERT_AS_INCOMPLETE"}
_D, _SYS_ID, _CLASS, _MISSING, _RETIRED = range(5)


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


class SyncConfigError(ConfigError):
    """A setting ServiceNow rejects for every item (e.g. the data source): retrying cannot help."""


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


def item_failures(summary: SyncSummary) -> str | None:
    """Why a sync whose IRE refused some devices counts as failed (None when none were refused).

    The run completes first (every confirmed device recorded, retirement done); the refused devices are not
    recorded, so the next run sends them again. A retry of the task would only repeat the same answers."""
    if not summary.failed:
        return None
    codes = ", ".join(f"{code} {count}" for code, count in sorted(summary.errors.items()))
    examples = "; ".join(f"{code}: device ids {', '.join(ids[:5])}" for code, ids in sorted(summary.examples.items()))
    verb = "would refuse" if summary.dry_run else "refused"
    return (f"ServiceNow {verb} {summary.failed} device(s) of {summary.source} ({codes}; e.g. {examples}). "
            "The other devices are synced; these are sent again next run. The task log lists each device with "
            "ServiceNow's message: fix the CMDB (e.g. merge the duplicate CIs behind a MULTI_MATCH) or the "
            "device on the source")


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


# --------------------------------------------------------------------------- manufacturers


class ManufacturerResolver:
    """Vendor name -> ``core_company`` sys_id (the IRE takes references as sys_ids only).

    Looks names up in bulk, creates the missing companies (``manufacturer=true``) unless ``create`` is
    false (dry run), and caches the answers for the run.
    """

    def __init__(self, servicenow, *, create: bool = True, chunk: int = 50):
        self.servicenow, self.create, self.chunk = servicenow, create, chunk
        self.cache: dict[str, str | None] = {}
        self.created = 0
        self.unavailable = False   # core_company cannot be read or written: devices go without manufacturer

    def resolve(self, names: Iterable[str]) -> dict[str, str | None]:
        missing = sorted({n for n in names if n and n not in self.cache})
        if self.unavailable:
            self.cache.update(dict.fromkeys(missing))
            return self.cache
        try:
            self._resolve(missing)
        except (ServiceNowForbiddenError, ServiceNowInvalidTableError) as exc:
            self.unavailable = True
            self.cache.update({n: self.cache.get(n) for n in missing})
            log.warning("ServiceNow refused the table core_company (HTTP %s: %s): devices are synced without "
                        "their manufacturer this run. Give the integration user read and create access to "
                        "core_company to sync manufacturers.", exc.status, exc)
        return self.cache

    def _resolve(self, missing: list[str]) -> None:
        for part in self._parts(missing):
            query = "^OR".join("name=" + n.replace("^", "^^") for n in part)
            found: dict[str, str] = {}
            for row in self.servicenow.query("core_company", query, fields=["sys_id", "name"]):
                found.setdefault(str(row.get("name", "")).lower(), row["sys_id"])
            absent = [n for n in part if n.lower() not in found]
            if absent and self.create:   # one Batch API call creates the chunk's missing companies
                found.update((n.lower(), sys_id) for n, sys_id in self._create(absent).items())
            for name in part:
                self.cache[name] = found.get(name.lower())

    def _create(self, names: list[str]) -> dict[str, str]:
        """Create ``names`` in ``core_company`` (``manufacturer=true``) through the Batch API; name -> sys_id.
        A refused create (403 ACL, 400 invalid table) makes the table unavailable for the run; any other
        failed item fails the sync, naming the company and what ServiceNow answered."""
        answers = self.servicenow.batch([
            BatchRequest(id=str(i), method="POST", url="/api/now/table/core_company?sysparm_fields=sys_id,name",
                         body={"name": name, "manufacturer": "true"}) for i, name in enumerate(names)])
        out = {}
        for name, answer in zip(names, answers, strict=True):
            sys_id = ((answer.body or {}).get("result") or {}).get("sys_id") if answer.ok else None
            if sys_id:
                out[name] = sys_id
                self.created += 1
                log.info("Created the manufacturer %r in core_company (%s)", name, sys_id)
                continue
            message = (f"Creating the manufacturer {name!r} in core_company failed: HTTP {answer.status_code}: "
                       f"{answer.error_message}")
            if answer.status_code == 403:
                raise ServiceNowForbiddenError(message, status=403, answer=answer.error_message)
            if answer.status_code == 400 and "Invalid table" in str(answer.error_message):
                raise ServiceNowInvalidTableError(message, status=400, answer=answer.error_message)
            raise ServiceNowError(message + ". Run the sync again; if it persists, create the company by hand",
                                  status=answer.status_code, answer=answer.error_message)
        return out

    def _parts(self, names: list[str], max_chars: int = 3000) -> Iterable[list[str]]:
        """Chunks of at most ``chunk`` names whose encoded query stays short (URL limits: 414)."""
        part: list[str] = []
        size = 0
        for name in names:
            cost = len(name.encode("utf-8")) * 3 + 8   # worst case once percent-encoded, plus "^ORname="
            if part and (len(part) >= self.chunk or size + cost > max_chars):
                yield part
                part, size = [], 0
            part.append(name)
            size += cost
        if part:
            yield part

    def apply(self, items: list[dict]) -> list[dict]:
        """The items with each ``manufacturer`` name replaced by its sys_id (dropped when unknown in a dry
        run). New dicts: the caller's items keep the vendor name (a resent item is resolved again)."""
        cache = self.resolve(i["values"].get("manufacturer") for i in items)
        out = []
        for item in items:
            name = item["values"].get("manufacturer")
            if name is not None:
                values = {k: v for k, v in item["values"].items() if k != "manufacturer"}
                if cache.get(name):
                    values["manufacturer"] = cache[name]
                item = {**item, "values": values}
            out.append(item)
        return out


# --------------------------------------------------------------------------- summary


@dataclass
class SyncSummary:
    source: str
    seen: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    retired: int = 0
    skipped: int = 0
    failed: int = 0
    duration: float = 0.0
    dry_run: bool = False
    full_resync: bool = False
    would_send: int = 0
    would_retire: int = 0
    ire_requests: int = 0
    shared_identifiers: int = 0                                   # devices whose serial/MAC another reported
    released: int = 0                                             # gone here, CI kept: another source has it
    errors: dict[str, int] = field(default_factory=dict)          # IRE error code -> devices
    skip_reasons: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # code -> first device ids

    COUNTS = ("seen", "inserted", "updated", "unchanged", "retired", "skipped", "failed")

    def line(self) -> str:
        """The final log line: source, the counts, duration."""
        counts = " ".join(f"{name}={getattr(self, name)}" for name in self.COUNTS)
        extra = (f" (dry run, nothing written: the IRE preview above is for {self.would_send} devices; "
                 f"would retire {self.would_retire})") if self.dry_run else ""
        return f"Last sync of {self.source}: {counts} duration={self.duration:.1f}s{extra}"

    def as_dict(self) -> dict:
        return asdict(self)

    def _example(self, code: str, device_id: str) -> None:
        ids = self.examples.setdefault(code, [])
        if len(ids) < 20:
            ids.append(device_id)


# --------------------------------------------------------------------------- engine


@dataclass
class _Pending:
    device_id: str
    digest: str
    class_name: str
    follow_up: dict | None = None    # first contact: the rename item, sent once the CI is identified
    is_follow_up: bool = False
    item: dict | None = None         # what was sent (to resend it without entries the instance refuses)


# IRE item errors for entries the instance has no identification rule for: resend without those entries.
_MISSING_RULE = {"IDENTIFICATION_RULE_FOR_RELATED_ITEM_MISSING": "related",
                 "IDENTIFICATION_RULE_FOR_LOOKUP_MISSING": "lookup"}
_TABLE_IN_MESSAGE = re.compile(r"\[([A-Za-z0-9_]+)\]")


def without_entries(item: dict, part: str, table: str) -> dict:
    """``item`` without its ``part`` (``related`` or ``lookup``) entries of ``table``."""
    return {**item, part: [e for e in item.get(part) or [] if e.get("className") != table]}


def first_contact_item(item: dict, *, match_by_name: bool = False) -> dict | None:
    """The item to send for a device ServiceNow has not confirmed yet.

    ServiceNow's Hardware Rule tries the serial, then ``name``, and only then the MAC (with the adapter's
    name), and Defender names are often an IP or a label shared by devices at other sites: a name match
    would merge two devices. So the first
    contact carries the MAC (else the serial) as the name -- ServiceNow's own advice for CIs known by MAC --
    and the real name follows in a second item, matched through ``sys_object_source``. A device with no
    serial or MAC of its own gets its source key (``<conn id>:<device id>``) as first name, so it gets a CI
    of its own. ``match_by_name`` (opt-in, ``DEFENDER_SYNC_MATCH_BY_NAME``): such a device is sent as it
    is and may join an existing CI of the same name. None: the item is sent as it is.
    """
    values = item["values"]
    macs = [x["values"]["mac_address"] for x in item["lookup"] if x["className"] == "cmdb_ci_network_adapter"]
    identifier = macs[0] if macs else values.get("serial_number")
    if not identifier and not match_by_name:
        identifier = item["sys_object_source_info"]["source_native_key"]
    if not identifier or values.get("name") == identifier:
        return None
    return {**item, "values": {**values, "name": identifier}}


def rename_item(item: dict, class_name: str | None = None) -> dict:
    """The follow-up of a first contact: only the real name, matched to the CI through ``sys_object_source``
    (the first contact already wrote every other value, lookup and related entry). A few hundred bytes, so
    these go in larger batches (``DeviceSync(rename_batch_size=)``)."""
    return {"className": class_name or item["className"], "values": {"name": item["values"]["name"]},
            "sys_object_source_info": dict(item["sys_object_source_info"])}


class DeviceSync:
    """Sync one Defender source into the CMDB. See the module docstring for the steps.

    :param source: the Defender connection id (prefix of every native key and state key).
    :param defender: a ``DefenderIoTHook`` (or anything with ``appliance``, ``iter_devices`` and, for a
        management console, ``deleted_device_ids``).
    :param servicenow: a ``ServiceNowHook`` (``identify_reconcile``, ``update_record``).
    :param state_store: ``get``/``set`` key-value store owned by this source's task.
    :param batch_size: IRE items per request; ``parallel``: IRE requests in flight at once.
    :param rename_batch_size: rename items (:func:`rename_item`) per IRE request.
    """

    def __init__(self, *, source: str, defender, servicenow, state_store: StateStore, mapping: ClassMapping,
                 source_name: str, data_source: str, batch_size: int = 100, parallel: int = 4,
                 full_resync: bool = False, dry_run: bool = False, retire_after_missing_runs: int = 3,
                 shards: int = DEFAULT_SHARDS, last_seen_resolution_hours: int = 24,
                 clock: Callable[[], datetime] | None = None, run_id: str | None = None,
                 checkpoint_batches: int = 10, match_by_name: bool = False,
                 max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES, rename_batch_size: int = 1000):
        if min(batch_size, parallel, retire_after_missing_runs, rename_batch_size) < 1:
            raise ValueError("batch_size, rename_batch_size, parallel and retire_after_missing_runs must be at "
                             "least 1")
        self.source, self.defender, self.servicenow = source, defender, servicenow
        self.store, self.mapping = state_store, mapping
        self.source_name, self.data_source = source_name, data_source
        self.batch_size, self.parallel, self.rename_batch_size = batch_size, parallel, rename_batch_size
        self.full_resync, self.dry_run = full_resync, dry_run
        self.retire_after = retire_after_missing_runs
        self.shards, self.resolution = shards, last_seen_resolution_hours
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.run_id, self.checkpoint_batches, self.match_by_name = run_id, checkpoint_batches, match_by_name
        self.max_value_bytes = max_value_bytes
        self._detail: Counter = Counter()
        self._claimed: dict[str, str] = {}   # serial/MAC -> the first device of this run that reported it
        self._refused: set[tuple[str, str, str]] = set()   # (class, related|lookup, table) without an IRE rule

    # ------------------------------------------------------------------ run

    def run(self) -> SyncSummary:
        started, t0 = self.clock(), time.monotonic()
        summary = SyncSummary(source=self.source, dry_run=self.dry_run, full_resync=self.full_resync)
        self._claimed, self._collected, self._checkpoints = {}, 0, 0
        state = SourceState(self.store, self.source, self.shards, self.max_value_bytes)
        mode = "dry run" if self.dry_run else ("full resync" if self.full_resync else "changes only")
        log.info("Syncing %s (%s, %s) into ServiceNow: %d devices recorded from earlier syncs, batches of %d, "
                 "%d in parallel", self.source, self.defender.appliance, mode, len(state), self.batch_size,
                 self.parallel)
        ok = False
        try:
            present = self._send_inventory(state, summary)
            self._retire(state, summary, present)
            ok = True
        finally:
            summary.duration = time.monotonic() - t0
            if not self.dry_run:
                written = state.save() + self._checkpoints
                if ok:
                    state.save_meta(last_success=started.isoformat(), kind=self.defender.appliance,
                                    last_outcome="ok", missing_counted_for=self.run_id,
                                    counts={k: getattr(summary, k) for k in SyncSummary.COUNTS})
                log.info("Recorded the state of %s: %d devices known, %d state shards written", self.source,
                         len(state), written)
            self._log_totals(summary)
            if not ok:
                log.error("Sync of %s stopped part way; what ServiceNow confirmed so far is recorded: %s",
                          self.source, summary.line())
        log.info(summary.line())
        return summary

    # ------------------------------------------------------------------ send

    def _send_inventory(self, state: SourceState, summary: SyncSummary) -> set[str]:
        """Stream, map, diff and send; return the ids present in the (complete) inventory.

        Two queues: full items (``batch_size`` per IRE request) and the renames that follow first contacts
        (``rename_batch_size`` per request; sent once full, or at the end when nothing else is left)."""
        present: set[str] = set()
        self._batch: list[tuple[dict, _Pending]] = []
        self._renames: list[tuple[dict, _Pending]] = []
        in_flight: deque[tuple[Future, list[_Pending]]] = deque()
        failure: BaseException | None = None
        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix=f"ire-{self.source}")
        manufacturers = ManufacturerResolver(self.servicenow, create=not self.dry_run)

        def submit(queue: str) -> None:
            batch = getattr(self, queue)
            setattr(self, queue, [])
            items, pending = [b[0] for b in batch], [b[1] for b in batch]
            items = manufacturers.apply(items)
            summary.would_send += len(items) if self.dry_run else 0
            summary.ire_requests += 1
            kwargs = {"dry_run": True} if self.dry_run else {}   # dry run: the IRE's /query endpoint
            in_flight.append((pool.submit(self.servicenow.identify_reconcile, items, self.data_source, **kwargs),
                              pending))
            while len(in_flight) >= self.parallel * 2:   # bounded memory: wait for the oldest
                self._collect(*in_flight.popleft(), state, summary)
                full_renames()

        def full_renames() -> None:
            if len(self._renames) >= self.rename_batch_size:
                submit("_renames")

        try:
            for record in self.defender.iter_devices():
                item, pending = self._prepare(record, state, summary, present)
                if item is not None:
                    self._batch.append((item, pending))
                if len(self._batch) >= self.batch_size:
                    submit("_batch")
                full_renames()
            while self._batch or self._renames or in_flight:   # the rest, and the renames of first contacts
                if self._batch:
                    submit("_batch")
                elif in_flight:
                    self._collect(*in_flight.popleft(), state, summary)
                    full_renames()
                else:
                    submit("_renames")
        except BaseException as exc:   # stop sending, but record what ServiceNow already confirmed
            failure = exc
            for future, _ in in_flight:
                future.cancel()
        finally:
            while in_flight:
                future, pending = in_flight.popleft()
                if future.cancelled():
                    continue
                try:
                    self._collect(future, pending, state, summary)
                except BaseException as exc:
                    failure = failure or exc
            pool.shutdown(wait=True)
            self._batch, self._renames = [], []
        if failure is not None:
            raise failure
        return present

    def _prepare(self, record, state: SourceState, summary: SyncSummary, present: set[str]):
        """One inventory record -> ``(IRE item, pending)`` to send, or ``(None, None)`` (skipped/unchanged)."""
        if not hasattr(record, "native_key"):   # InvalidRecord
            summary.skipped += 1
            summary.skip_reasons["invalid record"] = summary.skip_reasons.get("invalid record", 0) + 1
            if record.record_id is not None:
                present.add(str(record.record_id))   # it exists: not "missing"
            self._detail_log("skipped", "Skipped record %s of %s: %s", record.record_id or "(no id)", self.source,
                             record.reason)
            return None, None
        device_id = str(record.id)
        if device_id in present:
            return None, None   # listed twice in one inventory
        present.add(device_id)
        summary.seen += 1
        try:
            item = map_device(record, source_name=self.source_name, mapping=self.mapping)
        except MappingError as exc:
            summary.skipped += 1
            summary.skip_reasons[str(exc)] = summary.skip_reasons.get(str(exc), 0) + 1
            self._detail_log("skipped", "Skipped device %s (%s) of %s: %s", device_id, record.name, self.source, exc)
            return None, None
        shared = {i for i in identifiers(item) if self._claimed.setdefault(i, device_id) != device_id}
        if shared:   # another device of this inventory already reported that serial / MAC
            item = without_identifiers(item, shared)
            summary.shared_identifiers += 1
            self._detail_log("sharing identifiers", "Device %s (%s) of %s reports %s like an earlier device; "
                             "not used to identify it (kept as defender.shared_* values)", device_id, record.name,
                             self.source, ", ".join(sorted(i.split(":", 1)[1] for i in shared)))
        digest = payload_digest(item, last_seen_resolution_hours=self.resolution)
        entry = state.get(device_id)
        if entry and entry[_MISSING]:
            state.put(device_id, [*entry[:_MISSING], 0, entry[_RETIRED]])
        revived = bool(entry and entry[_RETIRED])
        if entry and not revived and not self.full_resync and entry[_D] == digest:
            summary.unchanged += 1
            return None, None
        if revived or self.full_resync:   # a full resync also brings back CIs retired outside the sync
            item["values"].update(REVIVED)
        item = self._without_refused_entries(item)   # after the digest: state stays what Defender reports
        pending = _Pending(device_id, digest, item["className"], item=item)
        if not (entry and entry[_SYS_ID]):
            first = first_contact_item(item, match_by_name=self.match_by_name)
            if first is not None:   # identify by serial/MAC first; the real name follows once it is known
                pending.follow_up, pending.item = rename_item(item), first
                return first, pending
        return item, pending

    def _without_refused_entries(self, item: dict) -> dict:
        for (class_name, part, table) in self._refused:
            if class_name == item["className"]:
                item = without_entries(item, part, table)
        return item

    def _resend_without(self, p: _Pending, code: str, message: str) -> bool:
        """An item refused for a related/lookup table the instance has no IRE rule for: note the table for
        this class and queue the item again without it. False when there is nothing left to drop."""
        part, found = _MISSING_RULE[code], _TABLE_IN_MESSAGE.search(message)
        table = found.group(1) if found else None
        if p.item is None or table is None or not any(e.get("className") == table for e in p.item.get(part) or []):
            return False
        key = (p.item["className"], part, table)
        if key not in self._refused:
            self._refused.add(key)
            log.warning("ServiceNow has no IRE %s rule for %s on class %s (%s): devices of that class are sent "
                        "without their %s entries from now on. To keep them, add the rule to the class's "
                        "identification rule (CI Class Manager > %s > Identification rule).", part, table,
                        p.item["className"], code, table, p.item["className"])
        retry = _Pending(p.device_id, p.digest, p.class_name, p.follow_up, p.is_follow_up,
                         without_entries(p.item, part, table))
        self._batch.append((retry.item, retry))
        return True

    def _collect(self, future: Future, pending: list[_Pending], state: SourceState, summary: SyncSummary) -> None:
        """Apply one IRE answer: count, log per device, record the confirmed items; every
        ``checkpoint_batches`` answers the changed state shards are written (a killed worker re-sends
        at most that much)."""
        result = future.result()
        by_index: dict[int, dict] = {}
        for position, item in enumerate(result.get("items") or []):
            for index in [i for i in (item.get("inputIndices") or []) if isinstance(i, int)] or [position]:
                by_index.setdefault(index, item)
        data_source_errors = 0
        for index, p in enumerate(pending):
            item = by_index.get(index)
            errors = (item or {}).get("errors") or []
            sys_id = (item or {}).get("sysId")
            operation = str((item or {}).get("operation") or "")
            unidentified = not self.dry_run and (not sys_id or sys_id == "Unknown")   # a preview has no sys_id
            if item is None or errors or unidentified:
                code = str(errors[0].get("error", "ERROR")) if errors else "NO_RESULT"
                message = str(errors[0].get("message", "")) if errors else "ServiceNow returned no result for it"
                if code in _MISSING_RULE and self._resend_without(p, code, message):
                    continue
                if code == "INVALID_INPUT_DATA" and "data source" in message:
                    data_source_errors += 1
                summary.failed += 1
                summary.errors[code] = summary.errors.get(code, 0) + 1
                summary._example(code, p.device_id)
                self._detail_log("failed", "ServiceNow rejected device %s of %s (%s): %s %s", p.device_id,
                                 self.source, p.class_name, code, message[:300])
                continue
            if p.is_follow_up:
                pass   # counted with its first contact
            elif operation in _INSERT_OPS:
                summary.inserted += 1
            elif operation == "NO_CHANGE":
                summary.unchanged += 1
            else:
                summary.updated += 1
            if self.dry_run:
                continue
            # A first contact is recorded without digest: if its follow-up never lands, the next run resends.
            state.put(p.device_id, ["" if p.follow_up else p.digest, sys_id,
                                    item.get("className") or p.class_name, 0, 0])
            if p.follow_up:
                rename = rename_item(p.follow_up, item.get("className"))
                self._renames.append((rename, _Pending(p.device_id, p.digest, rename["className"], is_follow_up=True,
                                                       item=rename)))
        self._collected += 1
        if not self.dry_run and self._collected % self.checkpoint_batches == 0:
            self._checkpoints += state.save()
        if data_source_errors and data_source_errors == len(pending):
            raise SyncConfigError(
                f"ServiceNow rejected the data source {self.data_source!r} for every item "
                "(INVALID_INPUT_DATA). It must be a choice of cmdb_ci.discovery_source: add the choice on the "
                "instance or set SERVICENOW_DATA_SOURCE to an existing one (default 'Other Automated')")

    # ------------------------------------------------------------------ retire

    def _retire(self, state: SourceState, summary: SyncSummary, present: set[str]) -> None:
        """Retire CIs of devices deleted on the source (only called after a complete, fully sent run)."""
        counted = {}   # device id -> its new missing counter, applied once every retirement went through
        if self.defender.appliance == "management_console":
            candidates = self._deleted_on_console(state, present)
        elif self.run_id is not None and state.meta.get("missing_counted_for") == self.run_id:
            candidates = []   # a retry of a run that already counted the missing devices: count once per run
            log.info("Missing devices of %s were already counted in this run (%s)", self.source, self.run_id)
        else:
            candidates = []
            for device_id, entry in state.items():
                if device_id in present or entry[_RETIRED]:
                    continue
                missing = entry[_MISSING] + 1
                if missing >= self.retire_after:
                    candidates.append(device_id)
                elif not self.dry_run:
                    counted[device_id] = missing
        shared = self._claimed_elsewhere(state, candidates)
        for device_id in candidates:
            entry = state.get(device_id)
            others = shared.get(device_id)
            if others is not None:
                self._release(state, device_id, entry, others, summary)
                continue
            if self.dry_run:
                summary.would_retire += 1
                log.info("Would retire device %s of %s (%s %s)", device_id, self.source, entry[_CLASS],
                         entry[_SYS_ID])
                continue
            try:
                self.servicenow.update_record(entry[_CLASS], entry[_SYS_ID], dict(RETIRED))
            except ServiceNowError as exc:
                if exc.status == 404:
                    log.info("The CI of device %s of %s (%s %s) no longer exists in ServiceNow; forgetting it",
                             device_id, self.source, entry[_CLASS], entry[_SYS_ID])
                    state.remove(device_id)
                    continue
                raise
            self._retired(state, device_id, entry, summary)
        for device_id, missing in counted.items():   # only after a retirement pass that went through
            state.put(device_id, [*state.get(device_id)[:_MISSING], missing, 0])
            log.info("Device %s of %s is missing from the inventory (%d of %d runs before it is retired)",
                     device_id, self.source, missing, self.retire_after)

    def _retired(self, state: SourceState, device_id: str, entry: list, summary: SyncSummary) -> None:
        summary.retired += 1
        state.put(device_id, [entry[_D], entry[_SYS_ID], entry[_CLASS], 0, 1])
        self._detail_log("retired", "Retired device %s of %s: %s %s (install_status 7, operational_status 6)",
                         device_id, self.source, entry[_CLASS], entry[_SYS_ID])

    def _claimed_elsewhere(self, state: SourceState, candidates: list[str]) -> dict[str, tuple[list[str], list[str]]]:
        """Candidates whose CI another source also reports (another sensor, another discovery tool):
        device id -> (other sources' ``name:id``, sys_ids of this source's own ``sys_object_source`` rows)."""
        if not candidates:
            return {}
        by_ci: dict[str, list[str]] = defaultdict(list)
        for device_id in candidates:
            by_ci[state.get(device_id)[_SYS_ID]].append(device_id)
        rows = self.servicenow.query_in("sys_object_source", "target_sys_id", list(by_ci),
                                        fields=["sys_id", "name", "id", "target_sys_id"])
        claims: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            claims[_ref(row.get("target_sys_id"))].append(row)
        out = {}
        for sys_id, device_ids in by_ci.items():
            for device_id in device_ids:
                own_key = f"{self.source}:{device_id}"
                mine = [r for r in claims[sys_id] if r.get("name") == self.source_name and r.get("id") == own_key]
                others = [f"{r.get('name')}:{r.get('id')}" for r in claims[sys_id] if r not in mine]
                if others:
                    out[device_id] = (others, [r["sys_id"] for r in mine if r.get("sys_id")])
        return out

    def _release(self, state: SourceState, device_id: str, entry: list, claims: tuple[list[str], list[str]],
                 summary: SyncSummary) -> None:
        """The device left this source but its CI is still reported by another: keep the CI, drop this
        source's claim (its ``sys_object_source`` row), so that the last source to lose it retires it."""
        others, own_rows = claims
        if self.dry_run:
            log.info("Would keep the CI of device %s of %s (%s %s): still reported by %s", device_id, self.source,
                     entry[_CLASS], entry[_SYS_ID], ", ".join(others[:5]))
            return
        for row_id in own_rows:
            self.servicenow.delete_record("sys_object_source", row_id)
        # Another source may have released its claim at the same moment: whoever deletes last sees no claim
        # left and retires the CI, so it never stays installed with nobody reporting it.
        left = self.servicenow.query_in("sys_object_source", "target_sys_id", [entry[_SYS_ID]], fields=["sys_id"])
        if not left:
            self.servicenow.update_record(entry[_CLASS], entry[_SYS_ID], dict(RETIRED))
            self._retired(state, device_id, entry, summary)
            return
        state.remove(device_id)
        summary.released += 1
        self._detail_log("released", "Device %s of %s is gone from this source, but its CI (%s %s) is still "
                         "reported by %s: the CI stays; this source's claim on it is released", device_id,
                         self.source, entry[_CLASS], entry[_SYS_ID], ", ".join(others[:5]))

    def _deleted_on_console(self, state: SourceState, present: set[str]) -> list[str]:
        last = self.meta_last_success(state)
        if last is None:
            return []   # first sync: nothing recorded yet that could be retired
        deleted = self.defender.deleted_device_ids(last - DELETED_LOOKBACK)
        out = []
        for device_id in map(str, deleted):
            entry = state.get(device_id)
            if entry and not entry[_RETIRED] and device_id not in present:
                out.append(device_id)
        return out

    @staticmethod
    def meta_last_success(state: SourceState) -> datetime | None:
        raw = state.meta.get("last_success")
        try:
            return datetime.fromisoformat(raw) if raw else None
        except ValueError:
            return None

    # ------------------------------------------------------------------ logging

    def _detail_log(self, kind: str, message: str, *args: Any) -> None:
        self._detail[kind] += 1
        if self._detail[kind] <= _MAX_DETAIL_LINES:
            (log.info if kind == "retired" else log.warning)(message, *args)

    def _log_totals(self, summary: SyncSummary) -> None:
        for kind, count in self._detail.items():
            if count > _MAX_DETAIL_LINES:
                log.warning("... and %d more devices %s (only the first %d are listed above)",
                            count - _MAX_DETAIL_LINES, kind, _MAX_DETAIL_LINES)
        for code, count in sorted(summary.errors.items()):
            log.warning("%s: %d devices failed with %s, e.g. device ids %s", self.source, count, code,
                        ", ".join(summary.examples.get(code, [])[:10]))
        for reason, count in sorted(summary.skip_reasons.items()):
            log.warning("%s: %d skipped: %s", self.source, count, reason)
