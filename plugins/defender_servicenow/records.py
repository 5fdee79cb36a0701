"""ServiceNow records built from Defender alerts (pure): incident / security incident and the Defender for
IoT application table row. Identity: ``correlation_id`` = ``defender-iot:<alert key>`` on incidents,
``u_alert_key`` = ``<alert key>`` on the application table (alert key: :func:`ledger.alert_key`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from defender_servicenow import settings
from defender_servicenow.ledger import alert_key, legacy_key
from defender_servicenow.models import Alert
from defender_servicenow.rules import Destination, RuleSet, is_system_notification

CORRELATION_DISPLAY = "Microsoft Defender for IoT"
CORRELATION_PREFIX = "defender-iot:"
TEMPLATES_DIR = settings.PROJECT_ROOT / "include" / "templates"


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
    return f"{CORRELATION_PREFIX}{alert_key(alert)}"


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
        "u_alert_key": alert_key(a), "u_alert_id": str(a.id), "u_alert_uuid": text(a.uuid),
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
    return correlation_id(alert) if dest.report_type == "incidents" else alert_key(alert)


def legacy_record_key(dest: Destination, alert: Alert) -> str:
    """The key of a record written before the re-image-proof keys."""
    return (CORRELATION_PREFIX + legacy_key(alert)) if dest.report_type == "incidents" else legacy_key(alert)
