"""Alert forwarding engine: Defender alerts -> ServiceNow incidents or application-table rows, exactly once.

Per source: read the alerts newer than the task's ``forwarded_up_to:<conn id>`` watermark (or a replay
window), apply the rules (:mod:`defender_servicenow.rules`), then per ServiceNow connection and chunk of
alerts: one bulk CI lookup (``sys_object_source`` + ``cmdb_ci``), one bulk look-up of the records that
already exist (``correlation_idIN...`` / ``u_alert_key IN...``) per destination, and one Batch API call that
creates the missing ones. The watermark moves only over alerts whose every destination ServiceNow
confirmed, so an outage delays alerts but loses none, and a retry or rerun finds what already exists.

Record building and watermark arithmetic are pure functions; I/O goes through the hooks.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import jinja2
from airflow.sdk.exceptions import AirflowNotFoundException

from defender_servicenow import settings
from defender_servicenow.exceptions import (
    DefenderAuthError,
    IntegrationError,
    ServiceNowAuthError,
    ServiceNowError,
)
from defender_servicenow.hooks.servicenow import in_queries  # noqa: F401  (re-exported for callers)
from defender_servicenow.hooks.servicenow import sys_id_of as _ref
from defender_servicenow.models import Alert, Device, InvalidRecord, datetime_to_ms, ms_to_datetime
from defender_servicenow.rules import Destination, RuleSet, is_system_notification

log = logging.getLogger(__name__)

CORRELATION_DISPLAY = "Microsoft Defender for IoT"
TEMPLATES_DIR = settings.PROJECT_ROOT / "include" / "templates"
CHUNK_SIZE = 100  # alerts per lookup query and per Batch API call
FUTURE_MARGIN_MS = 10 * 60_000  # alerts stamped later than now + this do not move the watermark (clock skew)
SERVICENOW_MAX_RETRY_SECONDS = 120.0  # per call; the task's own retries cover longer outages


def watermark_key(source: str) -> str:
    """Task-owned: the newest alert forwarded (and confirmed) for a source."""
    return f"forwarded_up_to:{source}"


def rule_first_seen_key(rule_name: str) -> str:
    """Trigger-owned: when the alert trigger first saw a rule (ISO-8601 UTC)."""
    return f"rule_first_seen:{rule_name}"


def recent_key(source: str) -> str:
    """Task-owned: ``{alert id: time_ms}`` of the alerts handled within the look-back window behind the
    watermark, so that late alerts (raised earlier, delivered later) are found without re-sending others."""
    return f"recent:{source}"


def watch_start_key(source: str) -> str:
    """Trigger-owned: when the alert trigger started watching a source (epoch ms); written once."""
    return f"watch_start:{source}"


def seen_key(source: str) -> str:
    """Trigger-owned: the newest alert the trigger has seen for a source."""
    return f"seen:{source}"


class StateStore(Protocol):
    """The sync half of Airflow's asset state accessor (``get``/``set``)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...


class ForwardingIncompleteError(IntegrationError):
    """Some alerts could not be forwarded; the watermark stays before them so the retry resumes there."""


class ForwardingCredentialsError(ForwardingIncompleteError):
    """ServiceNow or Defender rejected the credentials: retrying at once cannot help (and repeated failed
    logins can lock the integration user out); the next run resumes from the watermark."""


# --------------------------------------------------------------------------- watermarks (pure)


def make_watermark(time_ms: int, ids: Iterable[int] = ()) -> dict:
    return {"time_ms": int(time_ms), "ids": sorted({int(i) for i in ids})}


def after_watermark(alerts: Iterable[Alert], watermark: Mapping | None) -> list[Alert]:
    """The alerts strictly after ``watermark`` (``fromTime`` is inclusive: skip the ids already done at
    exactly the watermark time), in (time, id) order."""
    ordered = sorted(alerts, key=lambda a: (a.time, a.id))
    if not watermark:
        return ordered
    t, done = int(watermark["time_ms"]), set(watermark.get("ids") or ())
    return [a for a in ordered if (ms := datetime_to_ms(a.time)) > t or (ms == t and a.id not in done)]


def late_alerts(alerts: Iterable[Alert], watermark: Mapping | None, recent: Mapping,
                lookback_ms: int) -> list[Alert]:
    """Alerts at or before ``watermark`` but within ``lookback_ms`` of it (and not before ``recent``'s
    floor, the time the look-back started) that were not handled yet: alerts a management console received
    late from a sensor, or a sensor listed after a later one."""
    if not watermark or lookback_ms <= 0:
        return []
    t, done = int(watermark["time_ms"]), set(watermark.get("ids") or ())
    floor = max(t - lookback_ms, int(recent.get("floor_ms", t)))
    handled = recent.get("ids") or {}
    out = []
    for a in sorted(alerts, key=lambda a: (a.time, a.id)):
        ms = datetime_to_ms(a.time)
        if floor <= ms <= t and str(a.id) not in handled and not (ms == t and a.id in done):
            out.append(a)
    return out


def prune_recent(recent: Mapping, handled: Iterable[Alert], watermark: Mapping, lookback_ms: int,
                 floor_ms: int) -> dict:
    """``recent`` plus the ``handled`` alerts, keeping only those inside the look-back window.
    ``floor_ms`` (the watermark this run started from) is where tracking starts when ``recent`` is new."""
    t = int(watermark["time_ms"])
    floor = int(recent.get("floor_ms", floor_ms))
    merged = {**(recent.get("ids") or {}), **{str(a.id): datetime_to_ms(a.time) for a in handled}}
    return {"floor_ms": floor, "ids": {k: v for k, v in merged.items() if t - lookback_ms <= v <= t}}


def advance_watermark(watermark: Mapping, alerts: Sequence[Alert], done: set[str],
                      ceiling_ms: int | None = None) -> dict:
    """The watermark after the longest prefix of ``alerts`` (time order) whose keys are all in ``done``.

    Late alerts (at or before the watermark) do not move it, but one that is not done stops it: the
    watermark then stays where it is, so the late alert stays inside the look-back window and is retried
    until ServiceNow confirms it, however many newer alerts go through meanwhile.

    ``ceiling_ms`` (now plus a margin): an alert stamped later than that (an appliance whose clock is ahead)
    does not move the watermark, which would otherwise skip correctly stamped alerts that arrive after it.
    """
    t, ids = int(watermark["time_ms"]), set(watermark.get("ids") or ())
    for alert in sorted(alerts, key=lambda a: (a.time, a.id)):
        ms = datetime_to_ms(alert.time)
        if alert.key not in done or (ceiling_ms is not None and ms > ceiling_ms):
            break
        if ms < t or (ms == t and alert.id in ids):
            continue
        if ms > t:
            t, ids = ms, set()
        ids.add(alert.id)
    return make_watermark(t, ids)


# --------------------------------------------------------------------------- record building (pure)


@dataclass(frozen=True)
class DeviceRef:
    """What we know of an alert's source or destination device."""

    id: int | None
    name: str | None
    address: str | None
    ci: str | None = None  # cmdb_ci sys_id of the synced CI
    protocols: tuple[str, ...] = ()


@dataclass(frozen=True)
class AlertContext:
    alert: Alert
    appliance: str
    source: DeviceRef | None
    destination: DeviceRef | None
    rules: tuple[str, ...]

    @property
    def sensor(self) -> str:
        return self.alert.sensor_name or self.appliance

    @property
    def cmdb_ci(self) -> str | None:
        for ref in (self.source, self.destination):
            if ref and ref.ci:
                return ref.ci
        return None


def correlation_id(alert: Alert) -> str:
    return f"defender-iot:{alert.key}"


def sn_time(value: datetime) -> str:
    """ServiceNow's raw date-time format (UTC)."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@lru_cache(maxsize=4)
def _environment(directory: str) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(directory), autoescape=False,
                              undefined=jinja2.ChainableUndefined, keep_trailing_newline=False)


def render_description(ctx: AlertContext, template: str = "incident_description.j2",
                       directory: Path | str = TEMPLATES_DIR) -> str:
    """The incident description from ``include/templates/<template>`` (jinja2, plain text)."""
    a = ctx.alert
    return _environment(str(directory)).get_template(template).render(
        alert=a, source=ctx.source, destination=ctx.destination, sensor=ctx.sensor, zone=a.zone_name,
        site=a.site_name, appliance=ctx.appliance, rules=list(ctx.rules),
        time_text=a.time.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    ).strip() + "\n"


def build_incident(ctx: AlertContext, rules: RuleSet) -> dict:
    """The ``incident`` / ``sn_si_incident`` record for one alert."""
    a = ctx.alert
    level = rules.impact_urgency(a.severity)
    record = {
        "short_description": f"{a.title} ({ctx.sensor})"[:160],
        "description": render_description(ctx),
        "impact": str(level.impact),
        "urgency": str(level.urgency),
        "correlation_id": correlation_id(a),
        "correlation_display": CORRELATION_DISPLAY,
    }
    if ctx.cmdb_ci:
        record["cmdb_ci"] = ctx.cmdb_ci
    return record


def build_application_record(ctx: AlertContext) -> dict:
    """The Defender for IoT application table row for one alert (columns: docs/design.md)."""
    a = ctx.alert
    src, dst = ctx.source, ctx.destination

    def text(v: Any) -> str:
        return "" if v is None else str(v)

    return {
        "u_alert_key": a.key, "u_alert_id": str(a.id), "u_alert_uuid": text(a.uuid),
        "u_source_connection": a.source, "u_appliance": ctx.appliance,
        "u_time": sn_time(a.time), "u_title": a.title, "u_message": a.message,
        "u_severity": a.severity, "u_engine": a.engine,
        "u_notification_type": "system" if is_system_notification(a) else "alert",
        "u_source_device_id": text(a.source_device_id), "u_source_name": text(src and src.name),
        "u_source_address": text(a.source_address or (src and src.address)), "u_source_ci": text(src and src.ci),
        "u_destination_device_id": text(a.destination_device_id), "u_destination_name": text(dst and dst.name),
        "u_destination_address": text(a.destination_address or (dst and dst.address)),
        "u_destination_ci": text(dst and dst.ci),
        "u_protocols": ", ".join(sorted({p for ref in (src, dst) if ref for p in ref.protocols})),
        "u_remediation_steps": "\n".join(a.remediation_steps),
        "u_additional_information": json.dumps(a.additional_information) if a.additional_information else "",
        "u_handled": "" if a.handled is None else str(a.handled).lower(),
        "u_sensor_id": text(a.sensor_id), "u_sensor_name": ctx.sensor,
        "u_zone_id": text(a.zone_id), "u_zone_name": text(a.zone_name),
        "u_site_id": text(a.site_id), "u_site_name": text(a.site_name),
        "u_rules": ", ".join(ctx.rules),
    }


def record_key_field(dest: Destination) -> str:
    return "correlation_id" if dest.report_type == "incidents" else "u_alert_key"


def record_key(dest: Destination, alert: Alert) -> str:
    return correlation_id(alert) if dest.report_type == "incidents" else alert.key


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --------------------------------------------------------------------------- the run


@dataclass
class Failure:
    alert: str
    destination: Destination
    answer: str


@dataclass
class SourceReport:
    source: str
    window: str = ""
    seen: int = 0
    invalid: list[str] = field(default_factory=list)
    matched: Counter = field(default_factory=Counter)
    unmatched: int = 0
    created: int = 0
    present: int = 0
    would_create: int = 0
    failures: list[Failure] = field(default_factory=list)
    error: str | None = None
    credentials_rejected: bool = False
    watermark: dict | None = None

    def as_dict(self) -> dict:
        return {"source": self.source, "window": self.window, "seen": self.seen, "invalid": len(self.invalid),
                "matched": dict(self.matched), "unmatched": self.unmatched, "created": self.created,
                "already_present": self.present, "would_create": self.would_create,
                "failed": [f"{f.alert} -> {f.destination.table}@{f.destination.connection_id}: {f.answer}"
                           for f in self.failures], "error": self.error, "watermark": self.watermark}


class AlertForwarder:
    """One forwarding run over several sources.

    :param rules: the validated rules.
    :param state: the asset state accessor (sync ``get``/``set``); the forwarder writes only its
        ``forwarded_up_to:<conn id>`` keys and reads the trigger's ``rule_first_seen:<name>`` keys.
    :param defender_hook / servicenow_hook: factories ``conn_id -> hook``.
    """

    def __init__(self, rules: RuleSet, state: StateStore, *, defender_hook: Callable[[str], Any],
                 servicenow_hook: Callable[[str], Any], source_name: str | None = None, dry_run: bool = False,
                 chunk_size: int = CHUNK_SIZE, clock: Callable[[], datetime] | None = None,
                 lookback_minutes: float | None = None):
        self.rules = rules
        self.state = state
        self.defender_hook = defender_hook
        self.servicenow_hook = servicenow_hook
        self.source_name = source_name or settings.source_name()
        self.dry_run = dry_run
        self.chunk_size = chunk_size
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self._sn_hooks: dict[str, Any] = {}
        minutes = settings.alert_lookback_minutes() if lookback_minutes is None else lookback_minutes
        self.lookback_ms = int(minutes * 60_000)

    def _sn(self, conn_id: str):
        if conn_id not in self._sn_hooks:
            self._sn_hooks[conn_id] = self.servicenow_hook(conn_id)
        return self._sn_hooks[conn_id]

    def first_seen(self) -> dict[str, datetime | None]:
        out: dict[str, datetime | None] = {}
        for rule in self.rules.enabled:
            raw = self.state.get(rule_first_seen_key(rule.name))
            try:
                out[rule.name] = datetime.fromisoformat(raw) if raw else None
            except (TypeError, ValueError):
                log.warning("Ignoring unreadable first-seen time %r of rule %r", raw, rule.name)
                out[rule.name] = None
        return out

    # ------------------------------------------------------------------ public

    def run(self, sources: Sequence[str], *, since: datetime | None = None,
            until: datetime | None = None) -> list[SourceReport]:
        first_seen = self.first_seen()
        reports = [self.forward_source(src, first_seen, since=since, until=until) for src in sources]
        for r in reports:
            self._log_report(r)
        totals = Counter()
        for r in reports:
            totals.update(seen=r.seen, created=r.created, present=r.present, failed=len(r.failures),
                          would_create=r.would_create, invalid=len(r.invalid), errors=int(bool(r.error)))
        mode = "dry run, " if self.dry_run else ""
        mode += f"replay {since.isoformat()} .. {(until or self.clock()).isoformat()}, " if since else ""
        log.info("Alert forwarding summary (%s%d sources): seen %d, created %d, already present %d, "
                 "would create %d, failed %d, invalid %d, source errors %d", mode, len(reports), totals["seen"],
                 totals["created"], totals["present"], totals["would_create"], totals["failed"],
                 totals["invalid"], totals["errors"])
        return reports

    def forward_source(self, source: str, first_seen: Mapping[str, datetime | None], *,
                       since: datetime | None = None, until: datetime | None = None) -> SourceReport:
        report = SourceReport(source)
        replay = since is not None
        try:
            dhook = self.defender_hook(source)
            appliance = dhook.appliance_name
            if replay:
                watermark = None
                records = dhook.get_alerts(from_time=since, to_time=until)
                report.window = f"replay {since.isoformat()} .. {until.isoformat() if until else 'now'}"
            else:
                watermark = self._watermark(source, first_seen)
                report.window = f"after {ms_to_datetime(watermark['time_ms']).isoformat()}"
                records = dhook.get_alerts(from_time=ms_to_datetime(watermark["time_ms"] - self.lookback_ms))
            report.invalid = [f"{r.record_id}: {r.reason}" for r in records if isinstance(r, InvalidRecord)]
            valid = [r for r in records if isinstance(r, Alert)]
            alerts = after_watermark(valid, watermark)
            recent = (self.state.get(recent_key(source)) or {}) if not replay else {}
            new_keys = {a.key for a in alerts}
            late = [a for a in late_alerts(valid, watermark, recent, self.lookback_ms)
                    if a.key not in new_keys] if not replay else []
            if late:
                log.warning("%s: %d alert(s) arrived late (raised before the watermark, ids %s); forwarding them "
                            "now", source, len(late), ", ".join(str(a.id) for a in late[:20]))
                alerts = sorted(late + alerts, key=lambda a: (a.time, a.id))
            report.seen = len(alerts)
            devices = self._devices(dhook, alerts) if self.rules.needs_protocols and alerts else {}
        except (IntegrationError, AirflowNotFoundException) as exc:  # one bad source must not stop the others
            report.error = str(exc)
            report.credentials_rejected = isinstance(exc, (DefenderAuthError, ServiceNowAuthError))
            return report

        contexts: dict[str, AlertContext] = {}
        targets: dict[str, set[Destination]] = {}
        for alert in alerts:
            src, dst = (self._device_ref(devices, alert.source_device_id, alert.source_address),
                        self._device_ref(devices, alert.destination_device_id, alert.destination_address))
            protocols = [p for ref in (src, dst) if ref for p in ref.protocols]
            names, dests = self.rules.match(alert, protocols=protocols, first_seen=first_seen, replay=replay)
            report.matched.update(names)
            if not dests:
                report.unmatched += 1
                continue
            contexts[alert.key] = AlertContext(alert, appliance, src, dst, tuple(names))
            targets[alert.key] = dests

        pending = {key: set(dests) for key, dests in targets.items()}
        by_conn: dict[str, list[str]] = defaultdict(list)
        for key, dests in targets.items():
            for conn in sorted({d.connection_id for d in dests}):
                by_conn[conn].append(key)
        for conn, keys in by_conn.items():
            self._forward_to(conn, [contexts[k] for k in keys], targets, pending, report)

        if not replay and not self.dry_run:
            done = {a.key for a in alerts if not pending.get(a.key)}
            ceiling = datetime_to_ms(self.clock()) + FUTURE_MARGIN_MS
            ahead = [a for a in alerts if datetime_to_ms(a.time) > ceiling]
            if ahead:
                log.warning("%s: %d alert(s) are stamped more than %d minutes in the future (ids %s): check the "
                            "appliance's clock; they are forwarded, but the watermark waits for real time",
                            source, len(ahead), FUTURE_MARGIN_MS // 60_000, ", ".join(str(a.id) for a in ahead[:20]))
            # a failed late alert, or one stamped in the future, holds the watermark
            report.watermark = advance_watermark(watermark, alerts, done, ceiling_ms=ceiling)
            if report.watermark != make_watermark(watermark["time_ms"], watermark.get("ids") or ()):
                self.state.set(watermark_key(source), report.watermark)
            if self.lookback_ms > 0:
                new_recent = prune_recent(recent, [a for a in alerts if a.key in done], report.watermark,
                                          self.lookback_ms, floor_ms=int(watermark["time_ms"]))
                if new_recent != recent:
                    self.state.set(recent_key(source), new_recent)
        return report

    # ------------------------------------------------------------------ steps

    def _watermark(self, source: str, first_seen: Mapping[str, datetime | None]) -> dict:
        current = self.state.get(watermark_key(source))
        if current:
            return current
        # First run for this source: nothing before the earliest rule can match (rules only apply to
        # alerts raised after they exist); without any first-seen record, start from now.
        # A source added later starts when the trigger began watching it, not with the rules' history.
        known = [t for t in first_seen.values() if t is not None]
        start = min(known) if known else self.clock()
        watched = self.state.get(watch_start_key(source))
        if isinstance(watched, int) and watched > datetime_to_ms(start):
            start = ms_to_datetime(watched)
        watermark = make_watermark(datetime_to_ms(start))
        log.info("%s: no forwarding watermark yet; starting from %s (earlier alerts are not replayed; use the "
                 "since/until params for that)", source, start.isoformat())
        if not self.dry_run:
            self.state.set(watermark_key(source), watermark)
        return watermark

    @staticmethod
    def _devices(dhook, alerts: Sequence[Alert]) -> dict[int, Device]:
        """The source's inventory (once per run, only when a rule lists protocols)."""
        wanted = {i for a in alerts for i in (a.source_device_id, a.destination_device_id) if i}
        if not wanted:
            return {}
        return {d.id: d for d in dhook.iter_devices() if isinstance(d, Device) and d.id in wanted}

    @staticmethod
    def _device_ref(devices: Mapping[int, Device], device_id: int | None, address: str | None) -> DeviceRef | None:
        if device_id is None and not address:
            return None
        device = devices.get(device_id) if device_id is not None else None
        if device is None:
            return DeviceRef(device_id, None, address)
        return DeviceRef(device_id, device.name, address or next(iter(device.ip_addresses), None),
                         protocols=tuple(device.protocols))

    def _lookup_cis(self, hook, contexts: Sequence[AlertContext]) -> dict[str, tuple[str, str]]:
        """``"<conn>:<device id>"`` -> (cmdb_ci sys_id, CI name), in bulk (one query per chunk and table)."""
        native = [f"{c.alert.source}:{ref.id}" for c in contexts for ref in (c.source, c.destination)
                  if ref and ref.id is not None]
        if not native:
            return {}
        links: dict[str, str] = {}
        for q in in_queries("id", native, prefix=f"name={self.source_name}"):
            for row in hook.query("sys_object_source", q, fields=["id", "target_sys_id"]):
                if _ref(row.get("target_sys_id")):
                    links[row.get("id")] = _ref(row.get("target_sys_id"))
        names: dict[str, str] = {}
        for q in in_queries("sys_id", links.values()):
            for row in hook.query("cmdb_ci", q, fields=["sys_id", "name"]):
                names[row.get("sys_id")] = row.get("name") or ""
        return {key: (sys_id, names.get(sys_id, "")) for key, sys_id in links.items()}

    @staticmethod
    def _enrich(ctx: AlertContext, cis: Mapping[str, tuple[str, str]]) -> AlertContext:
        def one(ref: DeviceRef | None) -> DeviceRef | None:
            if ref is None or ref.id is None:
                return ref
            ci, name = cis.get(f"{ctx.alert.source}:{ref.id}", (None, None))
            return DeviceRef(ref.id, ref.name or name or None, ref.address, ci, ref.protocols)

        return AlertContext(ctx.alert, ctx.appliance, one(ctx.source), one(ctx.destination), ctx.rules)

    def _existing(self, hook, dest: Destination, contexts: Sequence[AlertContext]) -> set[str]:
        key_field = record_key_field(dest)
        found: set[str] = set()
        for q in in_queries(key_field, [record_key(dest, c.alert) for c in contexts]):
            found.update(row.get(key_field) for row in hook.query(dest.table, q, fields=[key_field, "sys_id"]))
        return found

    def _forward_to(self, conn: str, contexts: list[AlertContext], targets: Mapping[str, set[Destination]],
                    pending: dict[str, set[Destination]], report: SourceReport) -> None:
        dests = sorted({d for c in contexts for d in targets[c.alert.key] if d.connection_id == conn})
        broken: dict[Destination, str] = {}   # a destination that failed (e.g. no such table) is not retried
        try:
            hook = self._sn(conn)
            for chunk in _chunks(contexts, self.chunk_size):
                cis = self._lookup_cis(hook, chunk)
                chunk = [self._enrich(c, cis) for c in chunk]
                for dest in dests:
                    items = [c for c in chunk if dest in targets[c.alert.key]]
                    if not items or dest in broken:
                        continue
                    try:
                        self._write(hook, dest, items, pending, report)
                    except ServiceNowError as exc:   # one bad table must not hold up the others
                        if isinstance(exc, ServiceNowAuthError):
                            raise
                        broken[dest] = _answer(exc)
                        log.error("ServiceNow connection %s, table %s failed: %s", conn, dest.table, broken[dest])
        except (ServiceNowError, AirflowNotFoundException) as exc:
            report.credentials_rejected |= isinstance(exc, ServiceNowAuthError)
            answer = _answer(exc)
            log.error("ServiceNow connection %s failed: %s", conn, answer)
            broken.update({dest: answer for dest in dests if dest not in broken})
        for c in contexts:
            for dest in sorted(pending.get(c.alert.key, ())):
                if dest in broken:
                    report.failures.append(Failure(c.alert.key, dest, broken[dest]))

    def _write(self, hook, dest: Destination, items: Sequence[AlertContext],
               pending: dict[str, set[Destination]], report: SourceReport) -> None:
        existing = self._existing(hook, dest, items)
        create = []
        for c in items:
            if record_key(dest, c.alert) in existing:
                report.present += 1
                pending[c.alert.key].discard(dest)
            else:
                create.append(c)
        if not create:
            return
        if self.dry_run:
            report.would_create += len(create)
            log.info("Dry run: would create %d %s records on %s for alerts %s", len(create), dest.table,
                     dest.connection_id, ", ".join(str(c.alert.id) for c in create))
            return
        from defender_servicenow.hooks.servicenow import BatchRequest

        requests_ = [BatchRequest(id=str(i), method="POST",
                                  url=f"/api/now/table/{dest.table}?sysparm_fields=sys_id,number",
                                  body=build_incident(c, self.rules) if dest.report_type == "incidents"
                                  else build_application_record(c))
                     for i, c in enumerate(create)]
        for c, answer in zip(create, hook.batch(requests_), strict=True):
            if answer.ok:
                report.created += 1
                pending[c.alert.key].discard(dest)
            else:
                report.failures.append(Failure(c.alert.key, dest, f"HTTP {answer.status_code}: "
                                               f"{answer.error_message or 'no message'}"))

    @staticmethod
    def _log_report(r: SourceReport) -> None:
        if r.error:
            log.error("%s: could not read alerts: %s", r.source, r.error)
            return
        matched = ", ".join(f"{name}: {n}" for name, n in sorted(r.matched.items())) or "none"
        log.info("%s (%s): %d new alerts, %d matched no rule; matched per rule: %s; created %d, already "
                 "present %d, would create %d, failed %d", r.source, r.window, r.seen, r.unmatched, matched,
                 r.created, r.present, r.would_create, len(r.failures))
        for text in r.invalid[:20]:
            log.warning("%s: skipped an invalid alert record %s", r.source, text)
        grouped: dict[tuple[Destination, str], list[str]] = defaultdict(list)
        for f in r.failures:
            grouped[(f.destination, f.answer)].append(f.alert.rsplit(":", 1)[-1])
        for (dest, answer), ids in grouped.items():
            log.error("%s: %d alert(s) not forwarded to %s on %s (ids %s): %s", r.source, len(ids), dest.table,
                      dest.connection_id, ", ".join(ids), answer)
        if r.watermark:
            log.info("%s: forwarded up to %s", r.source, ms_to_datetime(r.watermark["time_ms"]).isoformat())


def _answer(exc: Exception) -> str:
    answer = str(exc)
    if getattr(exc, "answer", None) and exc.answer not in answer:
        answer += f" (ServiceNow answered: {exc.answer})"
    return answer


def raise_if_incomplete(reports: Sequence[SourceReport]) -> None:
    """Fail the task (so that it retries from the watermark) when anything was not forwarded."""
    failed = [f.alert for r in reports for f in r.failures]
    errors = [f"{r.source}: {r.error}" for r in reports if r.error]
    if failed or errors:
        parts = []
        if failed:
            shown = ", ".join(sorted(set(failed))[:20])
            parts.append(f"{len(set(failed))} alert(s) not forwarded ({shown})")
        if errors:
            parts.append("sources not read: " + "; ".join(errors))
        if any(r.credentials_rejected for r in reports):
            raise ForwardingCredentialsError(
                "; ".join(parts) + ". Credentials were rejected: fix the connection named above (the task is not "
                "retried, so the integration user is not locked out). Nothing is lost: the forwarding watermark "
                "stays before these alerts and the next run resumes there without duplicates.")
        raise ForwardingIncompleteError(
            "; ".join(parts) + ". The forwarding watermark stays before them; the task retries and the next "
            "run resumes there without duplicates. Check the ServiceNow/Defender connections if this persists.")
