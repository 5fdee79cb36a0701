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

import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from defender_servicenow.exceptions import (
    ConfigError,
    ServiceNowError,
)
from defender_servicenow.hooks.servicenow_wire import sys_id_of as _ref
from defender_servicenow.manufacturers import ManufacturerResolver
from defender_servicenow.mapping import (
    ClassMapping,
    MappingError,
    identifiers,
    map_device,
    payload_digest,
    without_identifiers,
)
from defender_servicenow.sync_items import (
    _MISSING_RULE,
    _TABLE_IN_MESSAGE,
    first_contact_item,
    rename_item,
    without_entries,
)
from defender_servicenow.sync_state import (  # noqa: F401  (re-exported: callers import them from here)
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_SHARDS,
    STATE_VERSION,
    MemoryStateStore,
    SourceState,
    StateStore,
    record_failure,
    run_failures,
)
from defender_servicenow.sync_summary import SyncSummary, item_failures  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

DELETED_LOOKBACK = timedelta(hours=1)   # overlap when asking the console for devices deleted since the last sync
RETIRED = {"install_status": "7", "operational_status": "6"}
REVIVED = {"install_status": "1", "operational_status": "1"}
_MAX_DETAIL_LINES = 200                   # per-device log lines per kind; the rest are counted
_INSERT_OPS = {"INSERT", "INSERT_AS_PARTIAL", "INSERT_AS_INCOMPLETE"}
_D, _SYS_ID, _CLASS, _MISSING, _RETIRED = range(5)


class SyncConfigError(ConfigError):
    """A setting ServiceNow rejects for every item (e.g. the data source): retrying cannot help."""


# --------------------------------------------------------------------------- engine


@dataclass
class _Pending:
    device_id: str
    digest: str
    class_name: str
    follow_up: dict | None = None    # first contact: the rename item, sent once the CI is identified
    is_follow_up: bool = False
    item: dict | None = None         # what was sent (to resend it without entries the instance refuses)


class DeviceSync:
    """Sync one Defender source into the CMDB. See the module docstring for the steps.

    :param source: the Defender connection id (prefix of every native key and state key).
    :param defender: a :class:`~defender_servicenow.sources.Source` (``kind``, ``iter_devices``,
        ``deleted_device_ids`` (empty where unsupported) and ``retires_missing``).
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
                 "%d in parallel", self.source, self.defender.kind, mode, len(state), self.batch_size,
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
                    state.save_meta(last_success=started.isoformat(), kind=self.defender.kind,
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
        candidates = self._deleted_on_source(state, present)   # empty where the source reports no deletions
        if not self.defender.retires_missing:
            pass   # the source reports its deletions; a device missing from its inventory is not counted
        elif self.run_id is not None and state.meta.get("missing_counted_for") == self.run_id:
            # a retry of a run that already counted the missing devices: count once per run
            log.info("Missing devices of %s were already counted in this run (%s)", self.source, self.run_id)
        else:
            deleted = set(candidates)
            for device_id, entry in state.items():
                if device_id in present or entry[_RETIRED] or device_id in deleted:
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

    def _deleted_on_source(self, state: SourceState, present: set[str]) -> list[str]:
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
