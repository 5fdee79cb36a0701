"""Forwarding rules: load, validate and match (pure; no I/O except reading the rules file).

The rules file schema is the one of interface.md (``rules:`` with criteria and ``actions``), plus an
optional top-level ``severity_mapping`` (Defender severity -> ServiceNow impact/urgency). Semantics follow
Defender for IoT's own forwarding rules (defender-api.md §6):

* ``minimum_severity``: alerts at that severity or higher (Warning < Minor < Major < Critical);
* ``protocols``: ``all`` or a list. The alerts API carries no protocol, so an alert matches when its source
  or destination device (looked up in the source's device inventory) speaks one of the listed protocols
  (case-insensitive); an alert whose devices are unknown does not match a protocol list;
* ``engines``: ``all`` or a list of the five Defender engines;
* ``report_alert_notifications`` / ``report_system_notifications``: an alert is a *system notification*
  when it is about the appliance itself rather than the monitored traffic: engine ``Operational`` and a
  title naming the sensor, appliance, management console, backup or licence (``Traffic Detected on sensor
  Interface``, ``No Traffic Detected on Sensor Interface``, a disconnected sensor, a failed backup). Every
  other alert is an *alert notification* (``Suspicion of Unresponsive MODBUS Device`` is about a device: an
  alert notification). System notifications are checked against ``minimum_severity`` only;
* a rule applies only to alerts raised at or after the time it was first seen (recorded durably by the
  alert trigger), except in a replay.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from defender_servicenow.exceptions import ConfigError
from defender_servicenow.models import ENGINES, SEVERITIES, Alert

Severity = Literal["Warning", "Minor", "Major", "Critical"]
Engine = Literal["Protocol Violation", "Policy Violation", "Malware", "Anomaly", "Operational"]
ReportType = Literal["incidents", "defender_for_iot_application"]

INCIDENT_TABLES = ("incident", "sn_si_incident")
DEFAULT_APPLICATION_TABLE = "u_defender_iot_alert"
_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,79}$")
_SYSTEM_TITLE = re.compile(r"\b(sensors?|appliances?|management console|backups?|licen[cs]es?)\b", re.I)

DEFAULT_SEVERITY_MAPPING: dict[str, dict[str, int]] = {
    "Critical": {"impact": 1, "urgency": 1},  # priority 1 - Critical
    "Major": {"impact": 1, "urgency": 2},  # priority 2 - High
    "Minor": {"impact": 2, "urgency": 2},  # priority 3 - Moderate
    "Warning": {"impact": 3, "urgency": 2},  # priority 4 - Low
}


def is_system_notification(alert: Alert) -> bool:
    """True for alerts about the Defender appliance itself (see the module docstring)."""
    return alert.engine == "Operational" and bool(_SYSTEM_TITLE.search(alert.title))


class Destination(NamedTuple):
    """Where an alert goes; an alert is forwarded once per distinct destination."""

    connection_id: str
    report_type: str
    table: str


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _all_or_list(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    if isinstance(value, str):  # a single name: accept it as a one-item list
        return [value]
    return value


class Action(_Strict):
    type: Literal["servicenow"]
    connection_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-]+$")
    report_type: ReportType = "incidents"
    table: str | None = None

    @model_validator(mode="after")
    def _check_table(self) -> Action:
        if self.report_type == "incidents":
            self.table = self.table or "incident"
            if self.table not in INCIDENT_TABLES:
                raise ValueError(f"table {self.table!r} is not an incident table; report_type incidents writes to "
                                 f"{' or '.join(INCIDENT_TABLES)}")
        else:
            self.table = self.table or DEFAULT_APPLICATION_TABLE
            if not _TABLE_NAME.match(self.table) or self.table in INCIDENT_TABLES:
                raise ValueError(f"table {self.table!r} is not a valid application table name (lower-case letters, "
                                 f"digits and _, e.g. {DEFAULT_APPLICATION_TABLE})")
        return self


class Rule(_Strict):
    name: str = Field(min_length=1, max_length=200)
    enabled: bool = True
    minimum_severity: Severity = "Warning"
    protocols: Literal["all"] | list[str] = "all"
    engines: Literal["all"] | list[Engine] = "all"
    report_alert_notifications: bool = True
    report_system_notifications: bool = False
    actions: list[Action] = Field(min_length=1)

    @field_validator("protocols", "engines", mode="before")
    @classmethod
    def _all_or_list(cls, value):
        return _all_or_list(value)

    @field_validator("protocols")
    @classmethod
    def _protocol_names(cls, value):
        if value != "all":
            if not value or any(not p.strip() for p in value):
                raise ValueError("give 'all' or a non-empty list of protocol names")
            return [p.strip() for p in value]
        return value

    @field_validator("engines")
    @classmethod
    def _engine_list(cls, value):
        if value != "all" and not value:
            raise ValueError(f"give 'all' or a non-empty list of: {', '.join(ENGINES)}")
        return value

    @property
    def needs_protocols(self) -> bool:
        return self.enabled and self.protocols != "all" and self.report_alert_notifications

    def matches(self, alert: Alert, protocols: Iterable[str] | None = None) -> bool:
        """The rule's criteria (not its first-seen time). ``protocols``: those of the alert's devices."""
        if not self.enabled or alert.severity_rank < SEVERITIES.index(self.minimum_severity):
            return False
        if is_system_notification(alert):
            return self.report_system_notifications
        if not self.report_alert_notifications:
            return False
        if self.engines != "all" and alert.engine not in self.engines:
            return False
        if self.protocols != "all":
            wanted = {p.lower() for p in self.protocols}
            if not wanted & {p.lower() for p in protocols or ()}:
                return False
        return True


class ImpactUrgency(_Strict):
    impact: int = Field(ge=1, le=3)
    urgency: int = Field(ge=1, le=3)


class _RulesFile(_Strict):
    severity_mapping: dict[Severity, ImpactUrgency] = Field(default_factory=dict)
    rules: list[Any] = Field(default_factory=list)


@dataclass(frozen=True)
class RuleSet:
    """Validated rules, with connection ids resolved (``connection_id`` defaults to SERVICENOW_CONN_ID)."""

    rules: tuple[Rule, ...]
    severity_mapping: Mapping[str, ImpactUrgency]
    default_connection_id: str
    path: str = ""
    names: tuple[str, ...] = field(default=())

    @property
    def enabled(self) -> list[Rule]:
        return [r for r in self.rules if r.enabled]

    @property
    def needs_protocols(self) -> bool:
        return any(r.needs_protocols for r in self.rules)

    def destinations_of(self, rule: Rule) -> list[Destination]:
        return [Destination(a.connection_id or self.default_connection_id, a.report_type, a.table)
                for a in rule.actions]

    def match(self, alert: Alert, *, protocols: Iterable[str] | None = None,
              first_seen: Mapping[str, datetime | None] | None = None,
              replay: bool = False) -> tuple[list[str], set[Destination]]:
        """The names of the rules that forward ``alert`` and its distinct destinations.

        A rule counts only for alerts raised at or after its first-seen time (``first_seen[name]``), unless
        ``replay``; a rule without a first-seen record applies (the trigger records it within seconds).
        """
        protocols = list(protocols or ())
        names: list[str] = []
        destinations: set[Destination] = set()
        for rule in self.enabled:
            since = (first_seen or {}).get(rule.name)
            if not replay and since is not None and alert.time < since:
                continue
            if rule.matches(alert, protocols):
                names.append(rule.name)
                destinations.update(self.destinations_of(rule))
        return names, destinations

    def impact_urgency(self, severity: str) -> ImpactUrgency:
        return self.severity_mapping[severity]


def _error_text(exc: ValidationError) -> tuple[str, str]:
    """(field path, message) of the most telling error; union branch tags (``literal['all']``) dropped."""
    errors = exc.errors()
    err = next((e for e in errors if not any("literal['all']" in str(p) for p in e.get("loc", ()))), errors[0])
    parts = [p for p in err.get("loc", ()) if isinstance(p, int) or "[" not in str(p)]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    return loc or "(rule)", msg


def parse_rules(data: Any, *, default_connection_id: str, source: str = "rules file") -> RuleSet:
    """Validate decoded YAML; raise :class:`ConfigError` naming the rule and the field."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with a 'rules:' list at the top level")
    try:
        top = _RulesFile.model_validate(data)
    except ValidationError as exc:
        loc, msg = _error_text(exc)
        raise ConfigError(f"{source}: {loc}: {msg}") from None
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(top.rules):
        label = repr(raw.get("name")) if isinstance(raw, Mapping) and raw.get("name") else f"#{index + 1}"
        try:
            rule = Rule.model_validate(raw)
        except ValidationError as exc:
            loc, msg = _error_text(exc)
            raise ConfigError(f"{source}: rule {label}, field {loc}: {msg}") from None
        if rule.name in seen:
            raise ConfigError(f"{source}: rule {label}, field name: duplicate rule name; names must be unique")
        seen.add(rule.name)
        rules.append(rule)
    mapping = {**{k: ImpactUrgency(**v) for k, v in DEFAULT_SEVERITY_MAPPING.items()}, **top.severity_mapping}
    return RuleSet(rules=tuple(rules), severity_mapping=mapping, default_connection_id=default_connection_id,
                   path=source, names=tuple(r.name for r in rules))


def load_rules(path: str | Path, *, default_connection_id: str) -> RuleSet:
    """Read and validate the rules file (``settings.rules_file()``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"DEFENDER_FORWARDING_RULES_FILE: cannot read {path} ({exc.strerror}); "
                          "set it to the path of a forwarding rules YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_rules(data if data is not None else {}, default_connection_id=default_connection_id,
                       source=str(path))
