"""Alert forwarding engine: Defender alerts -> ServiceNow incidents or application-table rows, exactly once.

Delivery is reconciled, not inferred from a time watermark. Every run of a source reads the alerts of the
reconcile window (``DEFENDER_ALERT_RECONCILE_HOURS``, default 24, back from now; alerts still pending from
before it are re-read one window per run, from the oldest) and compares them with its delivery ledger (:mod:`defender_servicenow.ledger`): every alert not
yet confirmed by ServiceNow is forwarded, whatever its time stamp, so alerts that arrive late (a sensor
reconnecting to its management console), alerts of a sensor whose clock is behind and alerts raised while
the watcher was down all land. When nothing is missing a run costs one Defender request and no ServiceNow
request.

Per chunk of alerts and ServiceNow connection: one bulk CI lookup (``sys_object_source`` + ``cmdb_ci``), one
bulk look-up of the records that already exist per destination, and one Batch API call that creates the
missing ones; the ledger is saved after every confirmed chunk, so a retry resumes. A destination that fails
is parked for the rest of the run (its alerts stay pending, retried next run) and never holds up the
others. Records are built in :mod:`defender_servicenow.records`; I/O goes through the hooks.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk.exceptions import AirflowNotFoundException

from defender_servicenow import settings
from defender_servicenow.columns import ColumnLengths
from defender_servicenow.exceptions import (
    DefenderAuthError,
    IntegrationError,
    ServiceNowAuthError,
    ServiceNowError,
)
from defender_servicenow.forwarding_devices import DeviceReferences
from defender_servicenow.forwarding_report import (  # noqa: F401  (re-exported for callers)
    Failure,
    ForwardingCredentialsError,
    ForwardingIncompleteError,
    SourceReport,
    failure_sentence,
    raise_if_incomplete,
)
from defender_servicenow.forwarding_state import (  # noqa: F401  (re-exported for callers)
    StateStore,
    inventory_key,
    record_first_seen,
    rule_first_seen_key,
    seen_key,
    watch_start_key,
    watermark_key,
)
from defender_servicenow.hooks.servicenow_wire import in_queries
from defender_servicenow.ledger import (
    LEGACY_MARGIN_MS,
    Ledger,
    alert_key,
    dead_letter_key,
    ledger_key,
    note_dead_letters,
    status_key,
    status_record,
)
from defender_servicenow.ledger_state import LedgerState
from defender_servicenow.models import Alert, InvalidRecord, datetime_to_ms, ms_to_datetime
from defender_servicenow.records import (  # noqa: F401  (re-exported for callers)
    CORRELATION_DISPLAY,
    AlertContext,
    DeviceRef,
    build_application_record,
    build_incident,
    correlation_id,
    legacy_record_key,
    record_key,
    record_key_field,
    render_description,
    sn_time,
)
from defender_servicenow.rules import Destination, RuleSet

log = logging.getLogger(__name__)

CHUNK_SIZE = 100  # alerts per lookup query and per Batch API call
SERVICENOW_MAX_RETRY_SECONDS = 120.0  # per call; the task's own retries cover longer outages


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class AlertForwarder(DeviceReferences):
    """One forwarding run over one or more sources (the DAG maps one task per source).

    :param rules: the validated rules.
    :param state: the asset state accessor (sync ``get``/``set``) of ``defender_iot_alerts``.
    :param defender_hook / servicenow_hook: factories ``conn_id -> source`` / ``conn_id -> hook``. Of the
        :class:`~defender_servicenow.sources.Source` the engine uses ``kind``, ``name``, ``aggregates_sensors``,
        ``get_alerts(from_time=, to_time=)`` and ``iter_devices()``.
    :param failure_context: ``dag_id``, ``run_id``, ``task_id``, ``map_index``, ``try_number`` for the
        ``last_failure`` of ``status:<source>``.
    """

    def __init__(self, rules: RuleSet, state: StateStore, *, defender_hook: Callable[[str], Any],
                 servicenow_hook: Callable[[str], Any], source_name: str | None = None, dry_run: bool = False,
                 chunk_size: int = CHUNK_SIZE, clock: Callable[[], datetime] | None = None,
                 reconcile_hours: float | None = None, inventory_minutes: float | None = None,
                 failure_context: Mapping[str, Any] | None = None, max_value_bytes: int | None = None):
        self.rules = rules
        self.state = state
        self.defender_hook = defender_hook
        self.servicenow_hook = servicenow_hook
        self.source_name = source_name or settings.source_name()
        self.dry_run = dry_run
        self.chunk_size = chunk_size
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.failure_context = dict(failure_context or {})
        self._sn_hooks: dict[str, Any] = {}
        self._columns = ColumnLengths(d for r in rules.enabled for d in rules.destinations_of(r))
        hours = settings.alert_reconcile_hours() if reconcile_hours is None else reconcile_hours
        self.reconcile_ms = int(hours * 3_600_000)
        minutes = settings.sync_frequency_minutes() if inventory_minutes is None else inventory_minutes
        self.inventory_ms = int(minutes * 60_000)
        if max_value_bytes is None:
            from defender_servicenow.sync_state import max_value_bytes as configured

            max_value_bytes = configured()
        self.max_value_bytes = max_value_bytes
        self._ledger_state: LedgerState | None = None

    def _sn(self, conn_id: str):
        if conn_id not in self._sn_hooks:
            self._sn_hooks[conn_id] = self.servicenow_hook(conn_id)
        return self._sn_hooks[conn_id]

    def first_seen(self) -> dict[str, datetime | None]:
        names = [r.name for r in self.rules.enabled]
        if self.dry_run:   # a dry run writes nothing
            out = {}
            for name in names:
                raw = self.state.get(rule_first_seen_key(name))
                out[name] = datetime.fromisoformat(raw) if isinstance(raw, str) and raw else None
            return out
        return record_first_seen(self.state, names, self.clock())

    # ------------------------------------------------------------------ public

    def run(self, sources: Sequence[str], *, since: datetime | None = None,
            until: datetime | None = None) -> list[SourceReport]:
        first_seen = self.first_seen()
        reports = []
        for src in sources:
            report = self.forward_source(src, first_seen, since=since, until=until)
            self._log_report(report)
            reports.append(report)
        return reports

    def forward_source(self, source: str, first_seen: Mapping[str, datetime | None], *,
                       since: datetime | None = None, until: datetime | None = None) -> SourceReport:
        report = SourceReport(source)
        replay = since is not None
        now_ms = datetime_to_ms(self.clock())
        ledger: Ledger | None = None
        kind: str | None = None
        per_sensor = False
        valid: list[Alert] = []
        try:
            if not replay:
                ledger = self._ledger(source, first_seen, now_ms)
            dhook = self.defender_hook(source)
            kind, per_sensor = dhook.kind, dhook.aggregates_sensors
            appliance = dhook.name
            if replay:
                records = dhook.get_alerts(from_time=since, to_time=until)
                report.window = f"replay {since.isoformat()} .. {until.isoformat() if until else 'now'}"
            else:
                read_from = ledger.read_from_ms(now_ms - self.reconcile_ms)
                records = dhook.get_alerts(from_time=ms_to_datetime(read_from))
                ledger.start_keys((r for r in records if isinstance(r, Alert)), now_ms)
                report.window = f"reconciling from {ms_to_datetime(read_from).isoformat()}"
                records += self._parked(source, dhook, ledger, now_ms, report)
            invalid = [r for r in records if isinstance(r, InvalidRecord)]
            report.invalid = [f"{r.record_id}: {r.reason}" for r in invalid]
            valid = sorted((r for r in records if isinstance(r, Alert)), key=lambda a: (a.time, a.id))
            if ledger is not None:
                valid = [a for a in valid if datetime_to_ms(a.time) >= ledger.floor_ms]
            report.flagged = sum(1 for a in valid if a.message.startswith("[Forwarding note:"))
            if not replay:   # the window and the parked slice may overlap at their edge
                valid = list({alert_key(a): a for a in valid}.values())
            todo = valid if replay else [a for a in valid if alert_key(a) not in ledger.done]
            report.seen = len(todo)
            by_protocol = self.rules.needs_protocols and dhook.reports_protocols
            if self.rules.needs_protocols and not by_protocol and todo:
                log.warning("%s reports no device protocols (%s), so the rules that match on protocols (%s) cannot "
                            "match its alerts; the other rules apply as usual", source, kind,
                            ", ".join(r.name for r in self.rules.rules if r.needs_protocols))
            devices = self._devices(source, dhook, now_ms) if by_protocol and todo else {}
        except (IntegrationError, AirflowNotFoundException) as exc:  # one bad source must not stop the others
            report.error = str(exc)
            report.credentials_rejected = isinstance(exc, (DefenderAuthError, ServiceNowAuthError))
            self._finish(source, report, kind, ledger, [], now_ms, invalid=None, per_sensor=per_sensor)
            return report

        contexts: list[AlertContext] = []
        targets: dict[str, set[Destination]] = {}
        for alert in todo:
            key = alert_key(alert)
            src = self._device_ref(devices, alert.source_device_id, alert.source_address)
            dst = self._device_ref(devices, alert.destination_device_id, alert.destination_address)
            protocols = [p for ref in (src, dst) if ref for p in ref.protocols]
            names, dests = self.rules.match(alert, protocols=protocols, first_seen=first_seen, replay=replay)
            report.matched.update(names)
            parked = ledger.pending_dests(key) if ledger is not None else None
            dests = parked if parked is not None else dests
            if not dests:
                report.unmatched += 1
                unknown = by_protocol and any(
                    i is not None and str(i) not in devices
                    for i in (alert.source_device_id, alert.destination_device_id))
                if ledger is not None and not self.dry_run and not unknown:   # else decided after a refresh
                    ledger.settle(alert, ())
                continue
            contexts.append(AlertContext(alert, appliance, src, dst, tuple(names)))
            targets[key] = set(dests)

        keys_since = ledger.keys_since_ms if ledger is not None else self._keys_since(source, now_ms)
        broken: dict[Destination, str] = {}   # parked for the rest of this run
        for chunk in _chunks(contexts, self.chunk_size):
            pending = {alert_key(c.alert): set(targets[alert_key(c.alert)]) for c in chunk}
            by_conn: dict[str, list[AlertContext]] = defaultdict(list)
            for c in chunk:
                for conn in sorted({d.connection_id for d in targets[alert_key(c.alert)]}):
                    by_conn[conn].append(c)
            for conn, items in by_conn.items():
                self._forward_to(conn, items, targets, pending, report, broken, keys_since)
            if ledger is not None and not self.dry_run:
                for c in chunk:
                    ledger.settle(c.alert, pending[alert_key(c.alert)])
                self._ledger_state.save(ledger)   # progress per confirmed chunk (only what changed)
        self._finish(source, report, kind, ledger, valid, now_ms, invalid=invalid, per_sensor=per_sensor)
        return report

    # ------------------------------------------------------------------ steps

    def _ledger(self, source: str, first_seen: Mapping[str, datetime | None], now_ms: int) -> Ledger:
        self._ledger_state = LedgerState(self.state, source, self.max_value_bytes)
        current = self._ledger_state.load()
        if current is not None:
            return current
        old = self.state.get(watermark_key(source))
        if isinstance(old, Mapping) and "time_ms" in old:
            # upgraded from the watermark: start where it was (with the old 10-minute look-back), and
            # recognise the records written under the previous keys
            floor = int(old["time_ms"]) - 10 * 60_000
            log.info("%s: continuing from the previous forwarding watermark %s", source,
                     ms_to_datetime(int(old["time_ms"])).isoformat())
        else:
            # First run: nothing before the earliest rule can match (rules only apply to alerts raised after
            # they exist); a source added later starts when the trigger began watching it.
            known = [datetime_to_ms(t) for t in first_seen.values() if t is not None]
            floor = min(known) if known else now_ms
            watched = self.state.get(watch_start_key(source))
            if isinstance(watched, int) and watched > floor:
                floor = watched
            log.info("%s: no forwarding ledger yet; forwarding alerts raised from %s (earlier alerts are not "
                     "replayed; use the since/until params for that)", source, ms_to_datetime(floor).isoformat())
        ledger = Ledger(floor_ms=floor, keys_since_ms=None)   # set by the first read (Ledger.start_keys)
        if not self.dry_run:
            self._ledger_state.save(ledger)
        return ledger

    def _parked(self, source: str, dhook, ledger: Ledger, now_ms: int, report: SourceReport) -> list[Alert]:
        """The alerts parked before the reconcile window (a destination that failed for longer): one extra
        read of at most one window from the oldest of them, keeping only the parked ones, so the per-run
        Defender read stays bounded however long a destination is broken; later slices follow next runs."""
        window = ledger.parked_slice(now_ms - self.reconcile_ms, self.reconcile_ms)
        if window is None:
            return []
        lo, hi, older = window
        found = [r for r in dhook.get_alerts(from_time=ms_to_datetime(lo), to_time=ms_to_datetime(hi))
                 if isinstance(r, Alert) and alert_key(r) in ledger.pending]
        unlisted = [] if self.dry_run else ledger.mark_unlisted(lo, hi, {alert_key(a) for a in found})
        if unlisted:
            log.warning("%s: %d parked alert(s) are no longer listed by Defender (%s): they stay in the pending "
                        "list and its count, but are not retried; forward them with a replay (since/until) if "
                        "Defender still has them", source, len(unlisted), ", ".join(unlisted[:20]))
        report.window += f", retrying parked alerts of {ms_to_datetime(lo).isoformat()} .. {ms_to_datetime(hi).isoformat()}"
        if older:
            log.warning("%s: %d parked alert(s) older than the reconcile window (DEFENDER_ALERT_RECONCILE_HOURS) "
                        "are raised after %s and stay parked this run: they are retried slice by slice (one "
                        "window per run) once the destination works; nothing is dropped", source, older,
                        ms_to_datetime(hi).isoformat())
        return found

    def _keys_since(self, source: str, now_ms: int) -> int:
        ledger = Ledger.from_state(self.state.get(ledger_key(source)))
        return ledger.keys_since_ms if ledger is not None and ledger.keys_since_ms is not None else now_ms

    def _finish(self, source: str, report: SourceReport, kind: str | None, ledger: Ledger | None,
                valid: Sequence[Alert], now_ms: int, *, invalid: Sequence[InvalidRecord] | None,
                per_sensor: bool = False) -> None:
        """Dead letters, pruning, forwarded_up_to and ``status:<source>`` (also after a failure)."""
        now_iso = ms_to_datetime(now_ms).isoformat()
        dead = self.state.get(dead_letter_key(source)) or {}
        if (invalid or dead) and not self.dry_run:
            new = note_dead_letters(dead, [(str(r.record_id), r.reason) for r in invalid or ()], now_iso,
                                    readable=[str(a.id) for a in valid])
            if new != dead:
                self.state.set(dead_letter_key(source), new)
            dead = new
        report.dead_letter = len(dead)
        if ledger is None or self.dry_run:
            return
        sensors: dict[str, int] = {}
        not_done: dict[str, int] = {}
        for a in valid:
            name = a.sensor_name or source
            sensors.setdefault(name, now_ms)
            if alert_key(a) not in ledger.done:
                not_done.setdefault(name, datetime_to_ms(a.time) - 1)
        sensors.update(not_done)
        if not report.error:
            ledger.prune(now_ms - self.reconcile_ms)
            self._ledger_state.save(ledger)
            parked = [int(p["t"]) - 1 for p in ledger.pending.values()]   # also those not read this run
            report.forwarded_up_to_ms = min([*not_done.values(), *parked], default=now_ms)
        report.pending = len(ledger.pending)
        previous = self.state.get(status_key(source)) or {}
        if report.forwarded_up_to_ms is None and previous.get("forwarded_up_to"):
            report.forwarded_up_to_ms = datetime_to_ms(datetime.fromisoformat(previous["forwarded_up_to"]))
        failure = None
        if report.failed:
            failure = {"at": now_iso, "message": failure_sentence(report), **self.failure_context}
        self.state.set(status_key(source), status_record(
            at=now_iso, kind=kind, forwarded_up_to_ms=report.forwarded_up_to_ms, pending=report.pending,
            dead_letter=report.dead_letter, failure=failure, previous=previous,
            sensors=sensors if per_sensor else None))

    def _existing(self, hook, dest: Destination, contexts: Sequence[AlertContext], keys_since_ms: int) -> set[str]:
        """The record keys of ``contexts`` that exist in ``dest``, including records written under the
        previous key (``<conn id>:<alert id>``) for alerts raised before the new keys started, when the
        record is that alert's (same time on the application table; created after the alert on incidents)
        and not a re-imaged appliance's earlier alert of the same number."""
        key_field = record_key_field(dest)
        found: set[str] = set()
        for q in in_queries(key_field, [record_key(dest, c.alert) for c in contexts]):
            found.update(row.get(key_field) for row in hook.query(dest.table, q, fields=[key_field, "sys_id"]))
        legacy = {legacy_record_key(dest, c.alert): c.alert for c in contexts
                  if record_key(dest, c.alert) not in found
                  and datetime_to_ms(c.alert.time) <= keys_since_ms}
        if legacy:
            check = "u_time" if dest.report_type != "incidents" else "sys_created_on"
            for q in in_queries(key_field, list(legacy)):
                for row in hook.query(dest.table, q, fields=[key_field, "sys_id", check]):
                    alert = legacy.get(row.get(key_field))
                    if alert is not None and _same_alert(dest, alert, row):
                        found.add(record_key(dest, alert))
        return found

    def _forward_to(self, conn: str, contexts: list[AlertContext], targets: Mapping[str, set[Destination]],
                    pending: dict[str, set[Destination]], report: SourceReport, broken: dict[Destination, str],
                    keys_since_ms: int) -> None:
        dests = sorted({d for c in contexts for d in targets[alert_key(c.alert)] if d.connection_id == conn})
        live = [d for d in dests if d not in broken]
        try:
            if live:
                hook = self._sn(conn)
                cis = self._lookup_cis(hook, contexts)
                chunk = [self._enrich(c, cis) for c in contexts]
            for dest in live:
                items = [c for c in chunk if dest in targets[alert_key(c.alert)]]
                try:
                    self._write(hook, dest, items, pending, report, keys_since_ms)
                except ServiceNowError as exc:   # one bad table must not hold up the others
                    if isinstance(exc, ServiceNowAuthError):
                        raise
                    broken[dest] = _answer(exc)
                    log.error("ServiceNow connection %s, table %s failed: %s. Its alerts stay pending (parked for "
                              "the rest of this run, retried next run)", conn, dest.table, broken[dest])
        except (ServiceNowError, AirflowNotFoundException) as exc:
            report.credentials_rejected |= isinstance(exc, ServiceNowAuthError)
            answer = _answer(exc)
            log.error("ServiceNow connection %s failed: %s", conn, answer)
            broken.update({dest: answer for dest in dests if dest not in broken})
        for c in contexts:
            for dest in sorted(pending.get(alert_key(c.alert), ())):
                if dest in broken:
                    report.failures.append(Failure(alert_key(c.alert), dest, broken[dest]))

    def _write(self, hook, dest: Destination, items: Sequence[AlertContext],
               pending: dict[str, set[Destination]], report: SourceReport, keys_since_ms: int) -> None:
        self._columns.check(hook, dest, [record_key(dest, c.alert) for c in items])   # read once per run
        existing = self._existing(hook, dest, items, keys_since_ms)
        create = []
        for c in items:
            if record_key(dest, c.alert) in existing:
                report.present += 1
                pending[alert_key(c.alert)].discard(dest)
            else:
                create.append(c)
        if not create:
            return
        if self.dry_run:
            report.would_create += len(create)
            log.info("Dry run: would create %d %s records on %s for alerts %s", len(create), dest.table,
                     dest.connection_id, ", ".join(str(c.alert.id) for c in create))
            return
        from defender_servicenow.hooks.servicenow_wire import BatchRequest

        requests_ = [BatchRequest(id=str(i), method="POST",
                                  url=f"/api/now/table/{dest.table}?sysparm_fields=sys_id,number",
                                  body=build_incident(c, self.rules) if dest.report_type == "incidents"
                                  else build_application_record(c))
                     for i, c in enumerate(create)]
        for c, answer in zip(create, hook.batch(requests_), strict=True):
            if answer.ok:
                report.created += 1
                pending[alert_key(c.alert)].discard(dest)
            else:
                report.failures.append(Failure(alert_key(c.alert), dest, f"HTTP {answer.status_code}: "
                                               f"{answer.error_message or 'no message'}"))

    @staticmethod
    def _log_report(r: SourceReport) -> None:
        if r.error:
            log.error("%s: could not read alerts: %s", r.source, r.error)
        for text in r.invalid[:20]:
            log.warning("%s: an alert record could not be read even with fallbacks, kept in the dead-letter set "
                        "and retried every run: %s", r.source, text)
        if r.flagged:
            log.warning("%s: %d alert(s) had values Defender does not document (e.g. an unknown severity); "
                        "forwarded with safe fallbacks, flagged in the record", r.source, r.flagged)
        grouped: dict[tuple[Destination, str], list[str]] = defaultdict(list)
        for f in r.failures:
            grouped[(f.destination, f.answer)].append(f.alert.rsplit(":", 1)[-1])
        for (dest, answer), ids in grouped.items():
            log.error("%s: %d alert(s) not forwarded to %s on %s (ids %s): %s. They stay pending and are retried "
                      "every run; fix the destination (table, roles) if this persists", r.source, len(ids),
                      dest.table, dest.connection_id, ", ".join(ids[:50]), answer)
        level = logging.WARNING if (r.failed or r.pending or r.dead_letter) else logging.INFO
        log.log(level, "%s", r.summary())


def _same_alert(dest: Destination, alert: Alert, row: Mapping) -> bool:
    if dest.report_type != "incidents":
        return row.get("u_time") == sn_time(alert.time)
    try:
        created = datetime.strptime(str(row.get("sys_created_on")), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return False
    return created >= alert.time - timedelta(milliseconds=LEGACY_MARGIN_MS)


def _answer(exc: Exception) -> str:
    answer = str(exc)
    if getattr(exc, "answer", None) and exc.answer not in answer:
        answer += f" (ServiceNow answered: {exc.answer})"
    return answer
