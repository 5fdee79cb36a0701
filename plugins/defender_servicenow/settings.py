"""Settings read from environment variables when DAG files are parsed, validated with clear errors.

Each invalid value raises :class:`ConfigError` naming the variable and the rule, which Airflow shows as
the DAG's import error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from defender_servicenow.exceptions import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_SOURCES = "defender_iot_default"
DEFAULT_SYNC_FREQUENCY_MINUTES = 60
MIN_SYNC_FREQUENCY_MINUTES = 5
DEFAULT_SERVICENOW_CONN_ID = "servicenow_default"
DEFAULT_RULES_FILE = "include/config/forwarding_rules.yaml"
# What identifies this integration's writes in ServiceNow (cleanup relies on these).
DEFAULT_SOURCE_NAME = "MicrosoftDefenderIoT"
DEFAULT_DATA_SOURCE = "Other Automated"
DEFAULT_RETIRE_AFTER_MISSING_RUNS = 3
DEFAULT_ALERT_POLL_SECONDS = 15.0
MIN_ALERT_POLL_SECONDS = 1.0
DEFAULT_ALERT_LOOKBACK_MINUTES = 10.0
DEFAULT_ALERT_SAFETY_RUN_MINUTES = 30

_CONN_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _env(name: str, environ: dict | None) -> str | None:
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def parse_conn_ids(raw: str, variable: str) -> list[str]:
    """Split a comma-separated list of connection ids, rejecting empty or malformed entries."""
    ids = [part.strip() for part in raw.split(",")]
    if any(not part for part in ids):
        raise ConfigError(f"{variable}={raw!r}: empty entry; give comma-separated connection ids, e.g. "
                          "'defender_sensor_1,defender_sensor_2'")
    for part in ids:
        if not _CONN_ID.match(part):
            raise ConfigError(f"{variable}: {part!r} is not a valid connection id (letters, digits, _ . - only)")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{variable}={raw!r}: a connection id is listed twice")
    return ids


def defender_sources(environ: dict | None = None) -> list[str]:
    """``DEFENDER_SOURCES``: the Defender connection ids (one management console, or sensors)."""
    return parse_conn_ids(_env("DEFENDER_SOURCES", environ) or DEFAULT_SOURCES, "DEFENDER_SOURCES")


def _number(name: str, environ: dict | None, *, default, minimum, maximum=None, integer: bool, unit: str):
    """A numeric setting: ``default`` when unset; otherwise a whole number (``integer``) or a finite number
    within ``minimum``..``maximum``, else a ConfigError naming the variable and the rule."""
    raw = _env(name, environ)
    if raw is None:
        return default
    kind = "a whole number" if integer else "a number"
    rule = (f"{kind} of {unit} from {minimum:g} to {maximum:g}" if maximum is not None
            else f"{kind} of {unit}, at least {minimum:g}")
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {kind}; it must be {rule} (default {default:g})") from None
    if not (value >= minimum and (value <= maximum if maximum is not None else value != float("inf"))):
        raise ConfigError(f"{name}={raw!r} is out of range; it must be {rule} (default {default:g})")
    return value


def sync_frequency_minutes(environ: dict | None = None) -> int:
    """``DEFENDER_SYNC_FREQUENCY_MINUTES``: integer, minimum 5, default 60."""
    return _number("DEFENDER_SYNC_FREQUENCY_MINUTES", environ, default=DEFAULT_SYNC_FREQUENCY_MINUTES,
                   minimum=MIN_SYNC_FREQUENCY_MINUTES, integer=True, unit="minutes")


DEFAULT_HEALTH_REFRESH_SECONDS = 30


def health_refresh_seconds(environ: dict | None = None) -> int:
    """``DEFENDER_HEALTH_REFRESH_SECONDS``: how often the sync health page refreshes itself in the browser.
    Integer, 2 to 3600, default 30 (read by the API server when it serves the page)."""
    return _number("DEFENDER_HEALTH_REFRESH_SECONDS", environ, default=DEFAULT_HEALTH_REFRESH_SECONDS,
                   minimum=2, maximum=3600, integer=True, unit="seconds")


def retire_after_missing_runs(environ: dict | None = None) -> int:
    """``DEFENDER_RETIRE_AFTER_MISSING_RUNS``: consecutive successful syncs a device must be missing from a
    sensor's inventory before its CI is retired; integer, minimum 1, default 3."""
    return _number("DEFENDER_RETIRE_AFTER_MISSING_RUNS", environ, default=DEFAULT_RETIRE_AFTER_MISSING_RUNS,
                   minimum=1, integer=True, unit="runs")


def alert_poll_seconds(environ: dict | None = None) -> float:
    """``DEFENDER_ALERT_POLL_SECONDS``: how often the alert trigger polls each source (default 15, minimum 1)."""
    return _number("DEFENDER_ALERT_POLL_SECONDS", environ, default=DEFAULT_ALERT_POLL_SECONDS,
                   minimum=MIN_ALERT_POLL_SECONDS, integer=False, unit="seconds")


def alert_lookback_minutes(environ: dict | None = None) -> float:
    """``DEFENDER_ALERT_LOOKBACK_MINUTES``: how far behind the newest alert it has seen the alert watcher
    polls, so late alerts wake the DAG sooner; the forwarding task itself reconciles
    ``DEFENDER_ALERT_RECONCILE_HOURS``. 0 turns it off. Default 10."""
    return _number("DEFENDER_ALERT_LOOKBACK_MINUTES", environ, default=DEFAULT_ALERT_LOOKBACK_MINUTES,
                   minimum=0, maximum=7 * 24 * 60, integer=False, unit="minutes")


def alert_safety_run_minutes(environ: dict | None = None) -> int:
    """``DEFENDER_ALERT_SAFETY_RUN_MINUTES``: the forwarding DAG also runs on this schedule, besides the
    alert watcher's events, so that a lost event or a stopped triggerer delays alerts instead of losing
    them; 0 turns it off. Default 30, minimum 5 when on."""
    value = _number("DEFENDER_ALERT_SAFETY_RUN_MINUTES", environ, default=DEFAULT_ALERT_SAFETY_RUN_MINUTES,
                    minimum=0, integer=True, unit="minutes")
    if 0 < value < 5:
        raise ConfigError(f"DEFENDER_ALERT_SAFETY_RUN_MINUTES={value}: give 0 (off) or at least 5 minutes "
                          f"(default {DEFAULT_ALERT_SAFETY_RUN_MINUTES})")
    return value


def airflow_api_conn_id(environ: dict | None = None) -> str | None:
    """``AIRFLOW_API_CONN_ID`` (optional): an Airflow connection to Airflow's own REST API (host = the API
    server's base URL, login/password of a user who may edit DAG runs). When set, the device sync writes
    its summary as the run's note."""
    value = _env("AIRFLOW_API_CONN_ID", environ)
    if value is None:
        return None
    ids = parse_conn_ids(value, "AIRFLOW_API_CONN_ID")
    if len(ids) != 1:
        raise ConfigError(f"AIRFLOW_API_CONN_ID={value!r}: give exactly one connection id")
    return ids[0]


HANDLE_ON_CLOSE_CHOICES = ("off", "handle", "handleAndLearn")


def handle_alerts_on_close(environ: dict | None = None) -> str | None:
    """``DEFENDER_HANDLE_ALERTS_ON_CLOSE``: ``off`` (default), ``handle`` or ``handleAndLearn``: what to do
    on the management console with the alert of an incident closed in ServiceNow. None when off."""
    raw = _env("DEFENDER_HANDLE_ALERTS_ON_CLOSE", environ) or "off"
    match = {c.lower(): c for c in HANDLE_ON_CLOSE_CHOICES}.get(raw.lower())
    if match is None:
        raise ConfigError(f"DEFENDER_HANDLE_ALERTS_ON_CLOSE={raw!r}: give one of {', '.join(HANDLE_ON_CLOSE_CHOICES)}")
    return None if match == "off" else match


def servicenow_conn_id(environ: dict | None = None) -> str:
    """``SERVICENOW_CONN_ID``: the ServiceNow connection the DAGs use unless a rule names another."""
    value = _env("SERVICENOW_CONN_ID", environ) or DEFAULT_SERVICENOW_CONN_ID
    ids = parse_conn_ids(value, "SERVICENOW_CONN_ID")
    if len(ids) != 1:
        raise ConfigError(f"SERVICENOW_CONN_ID={value!r}: give exactly one connection id")
    return ids[0]


def rules_file(environ: dict | None = None) -> Path:
    """``DEFENDER_FORWARDING_RULES_FILE``: path of the forwarding rules file (relative to the project root)."""
    raw = _env("DEFENDER_FORWARDING_RULES_FILE", environ) or DEFAULT_RULES_FILE
    path = Path(raw)
    return path if path.is_absolute() else PROJECT_ROOT / path


def source_name(environ: dict | None = None) -> str:
    """``SERVICENOW_SOURCE_NAME``: ``sys_object_source`` name that marks the CIs this integration wrote."""
    return _env("SERVICENOW_SOURCE_NAME", environ) or DEFAULT_SOURCE_NAME


def data_source(environ: dict | None = None) -> str:
    """``SERVICENOW_DATA_SOURCE``: IRE ``sysparm_data_source`` (a ``cmdb_ci.discovery_source`` choice)."""
    return _env("SERVICENOW_DATA_SOURCE", environ) or DEFAULT_DATA_SOURCE


def sync_match_by_name(environ: dict | None = None) -> bool:
    """``DEFENDER_SYNC_MATCH_BY_NAME`` (default false): a device without serial/MAC of its own may join an
    existing CI of the same name (e.g. one another discovery source created). Off: it gets a CI of its own."""
    raw = (_env("DEFENDER_SYNC_MATCH_BY_NAME", environ) or "false").strip().lower()
    if raw not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"DEFENDER_SYNC_MATCH_BY_NAME must be true or false, not {raw!r}")
    return raw in ("true", "1", "yes")


DEFAULT_ALERT_RECONCILE_HOURS = 24.0
DEFAULT_AUTH_COOLDOWN_MINUTES = 30.0


def alert_reconcile_hours(environ: dict | None = None) -> float:
    """``DEFENDER_ALERT_RECONCILE_HOURS``: how far back every forwarding run compares the alerts a source holds
    with what ServiceNow confirmed, forwarding every gap (late alerts, a sensor whose clock is behind, alerts
    raised while the watcher was down). Default 24, from 0.5 to 720 (30 days)."""
    return _number("DEFENDER_ALERT_RECONCILE_HOURS", environ, default=DEFAULT_ALERT_RECONCILE_HOURS,
                   minimum=0.5, maximum=720, integer=False, unit="hours")


def servicenow_auth_cooldown_minutes(environ: dict | None = None) -> float:
    """``SERVICENOW_AUTH_COOLDOWN_MINUTES``: after ServiceNow rejects a connection's credentials, no login is
    tried with them again until the connection changes or this many minutes pass. Default 30, 1 to 1440."""
    return _number("SERVICENOW_AUTH_COOLDOWN_MINUTES", environ, default=DEFAULT_AUTH_COOLDOWN_MINUTES,
                   minimum=1, maximum=1440, integer=False, unit="minutes")


def defender_auth_cooldown_minutes(environ: dict | None = None) -> float:
    """``DEFENDER_AUTH_COOLDOWN_MINUTES``: the same for a Defender connection's API token. Default 30."""
    return _number("DEFENDER_AUTH_COOLDOWN_MINUTES", environ, default=DEFAULT_AUTH_COOLDOWN_MINUTES,
                   minimum=1, maximum=1440, integer=False, unit="minutes")


# --- CMDB depth (issue 15): sensors, relations
DEFAULT_RELATION_RETENTION_DAYS = 90


def _flag(name: str, environ: dict | None, default: bool) -> bool:
    raw = _env(name, environ)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{name} must be true or false, not {raw!r} (default {str(default).lower()})")
    return value in ("true", "1", "yes")


def sync_relations(environ: dict | None = None) -> bool:
    """``DEFENDER_SYNC_RELATIONS`` (default true): device connections become ``cmdb_rel_ci`` relations.
    Turn it off for very large networks; existing relations are then left as they are."""
    return _flag("DEFENDER_SYNC_RELATIONS", environ, True)


def relation_retention_days(environ: dict | None = None) -> int:
    """``DEFENDER_RELATION_RETENTION_DAYS``: a relation whose connection was not seen for this many days is
    removed; integer 1 to 3650, default 90."""
    return _number("DEFENDER_RELATION_RETENTION_DAYS", environ, default=DEFAULT_RELATION_RETENTION_DAYS,
                   minimum=1, maximum=3650, integer=True, unit="days")


def cve_min_score(environ: dict | None = None) -> float:
    """``DEFENDER_CVE_MIN_SCORE``: CVEs scoring below this (CVSS 0 to 10) are not recorded; default 0."""
    return _number("DEFENDER_CVE_MIN_SCORE", environ, default=0.0, minimum=0, maximum=10, integer=False,
                   unit="CVSS points")
