"""The clean-up's conventions (what is "ours", how it is retired, in which order it goes) and its params:
:func:`validate_params` / :func:`check_confirmation`, plain-message checks before any request that writes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from defender_servicenow.exceptions import ConfigError, ServiceNowError

SCOPES = ("devices", "alerts", "both")
MODES = ("retire", "delete")
CORRELATION_PREFIX = "defender-iot:"
CORRELATION_DISPLAY = "Microsoft Defender for IoT"
APPLICATION_TABLE = "u_defender_iot_alert"
INCIDENT_TABLES = ("incident", "sn_si_incident")

RETIRED = {"install_status": "7", "operational_status": "6"}
INCIDENT_DONE_STATES = {"6", "7", "8"}  # Resolved, Closed, Canceled: nothing left to close
SIR_DONE_STATES = {"3", "7"}  # Closed, Cancelled
CLOSE_NOTES = ("Closed by the defender_servicenow_cleanup DAG: the Microsoft Defender for IoT integration "
               "was removed, so this record will receive no further updates from it.")
# close_code is a choice list that differs per release and instance (servicenow-api.md §6.1): the first of
# these the instance offers (sys_choice), else the legacy value most integrations send.
CLOSE_CODE_PREFERENCE = ("No resolution provided", "Closed/Resolved by Caller", "Resolved by caller",
                         "Solved (Permanently)")
DEFAULT_CLOSE_CODE = "Closed/Resolved by Caller"
INCIDENT_CLOSE = {"state": "7", "close_code": DEFAULT_CLOSE_CODE, "close_notes": CLOSE_NOTES}
SIR_CLOSE = {"state": "3", "close_notes": CLOSE_NOTES}

# Records this integration's writes hang off: table -> ((reference field, parent), ...), where parent is
# "ci" (our CIs), "task" (our incidents) or an earlier table of this list. Searched in this order.
DEPENDENTS = (
    ("cmdb_ci_network_adapter", (("cmdb_ci", "ci"),)),  # IRE lookup items
    ("cmdb_ci_ip_address", (("nic", "cmdb_ci_network_adapter"), ("cmdb_ci", "ci"))),  # IRE related items
    ("cmdb_serial_number", (("cmdb_ci", "ci"),)),
    ("cmdb_ot_entity", (("ot_device", "ci"),)),
    ("cmdb_key_value", (("configuration_item", "ci"),)),
    ("task_ci", (("task", "task"),)),  # affected CIs of our incidents
    ("cmdb_rel_ci", (("parent", "ci"), ("child", "ci"))),  # relations of our CIs (cmdb_depth): sensor, connections
)
# Delete order: children first, then parents, our sys_object_source marker rows last, so whatever a failed
# run leaves behind is still found by the next one.
ALERT_ORDER = ("task_ci", "incident", "sn_si_incident")  # then the application table(s)
VIT_TABLE = "sn_vul_vulnerable_item"   # Vulnerability Response items of our CVEs (cmdb_depth.cves), when present
VIT_PREFIX = "defender-iot-cve:"
VIT_CLOSE = {"state": "3", "close_notes": CLOSE_NOTES}
DEVICE_ORDER = (VIT_TABLE, "cmdb_rel_ci", "cmdb_ci_ip_address", "cmdb_ci_network_adapter", "cmdb_serial_number",
                "cmdb_ot_entity", "cmdb_key_value", "cmdb_ci", "sys_object_source")
DEPENDENT_FIELDS = {"cmdb_ci_network_adapter": "name", "cmdb_ci_ip_address": "ip_address",
                    "cmdb_serial_number": "serial_number", "cmdb_ot_entity": "ot_correlation_id",
                    "cmdb_key_value": "key", "task_ci": "ci_item", "cmdb_rel_ci": "type"}

IN_CHUNK = 50  # sys_ids per ...IN query (keeps URLs well under 2048 characters)
BATCH_SIZE = 100  # requests per Batch API call (30 s quota per batch)
SAMPLE_SIZE = 20  # record names listed per table in the log
_CONN_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


class CleanupRefusedError(ConfigError):
    """A run that would write was refused (missing or wrong confirmation)."""


class CleanupIncompleteError(ServiceNowError):
    """Some writes failed; the run stopped before the steps that depend on them. Run it again."""


# --------------------------------------------------------------------------- params


@dataclass(frozen=True)
class CleanupParams:
    scope: Literal["devices", "alerts", "both"] = "both"
    mode: Literal["retire", "delete"] = "retire"
    sources: tuple[str, ...] = ()
    older_than_days: int | None = None
    dry_run: bool = True
    confirm: str = ""

    @property
    def devices(self) -> bool:
        return self.scope in ("devices", "both")

    @property
    def alerts(self) -> bool:
        return self.scope in ("alerts", "both")


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"param {name}={value!r}: give true or false")


def validate_params(raw: Mapping[str, Any]) -> CleanupParams:
    """Check the trigger params; each problem is a :class:`ConfigError` naming the param and the rule."""
    known = {"scope", "mode", "sources", "older_than_days", "dry_run", "confirm"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown param(s) {', '.join(unknown)}; the clean-up takes {', '.join(sorted(known))}")
    scope = raw.get("scope") or "both"
    if scope not in SCOPES:
        raise ConfigError(f"param scope={scope!r}: choose one of {', '.join(SCOPES)}")
    mode = raw.get("mode") or "retire"
    if mode not in MODES:
        raise ConfigError(f"param mode={mode!r}: choose retire (CIs retired, incidents closed) or delete")
    sources = raw.get("sources") or []
    if isinstance(sources, str):
        sources = [part.strip() for part in sources.split(",") if part.strip()]
    if not isinstance(sources, (list, tuple)) or not all(isinstance(s, str) and _CONN_ID.match(s) for s in sources):
        raise ConfigError(f"param sources={sources!r}: give a list of Defender connection ids (letters, digits, "
                          "_ . - only), or an empty list for everything this integration wrote")
    days = raw.get("older_than_days")
    if days in ("", None):
        days = None
    else:
        try:
            days = int(days) if not isinstance(days, bool) and float(days) == int(float(days)) else None
        except (TypeError, ValueError):
            days = None
        if days is None or days < 1:
            raise ConfigError(f"param older_than_days={raw.get('older_than_days')!r}: give a whole number of "
                              "days of at least 1, or leave it empty for all records")
    dry_run = _as_bool("dry_run", raw.get("dry_run", True))
    confirm = raw.get("confirm") or ""
    if not isinstance(confirm, str):
        raise ConfigError("param confirm: give the ServiceNow instance host name as text")
    return CleanupParams(scope, mode, tuple(dict.fromkeys(sources)), days, dry_run, confirm.strip())


def check_confirmation(params: CleanupParams, instance_host: str) -> None:
    """Refuse a run that writes unless ``confirm`` is the instance host name (case-insensitive)."""
    if params.dry_run:
        return
    if params.confirm.lower() == instance_host.lower():
        return
    got = f"you typed {params.confirm!r}" if params.confirm else "it is empty"
    raise CleanupRefusedError(
        f"Refusing to {params.mode} anything: this is not a dry run, so the param confirm must be the "
        f"ServiceNow instance host name {instance_host!r}, and {got}. Nothing was changed. Type the host name "
        "exactly to go ahead, or set dry_run to true to only list what would change."
    )
