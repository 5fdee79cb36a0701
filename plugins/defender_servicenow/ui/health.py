"""Sync health: what the DAGs recorded, turned into the page's JSON (pure: no I/O, no clock).

:func:`compute_health` takes a :class:`RecordedState` (read by ``ui/reader.py`` from the asset state store
and the task instances) and ``now``, and returns the document served at
``/defender-servicenow/api/health``::

    {"generated_at", "sources": [{"id", "kind", "status", "last_sync", "last_counts", "last_failure",
                                  "alerts": {"forwarded_up_to", "pending", "dead_letter"}}],
     "servicenow": {"id", "status"}}

Status of a source: ``failing`` when its latest device sync or alert forwarding attempt failed,
``never`` when it has never synced successfully, ``stale`` when its last successful sync is older than
twice the sync frequency, else ``ok``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

COUNT_KEYS = ("seen", "inserted", "updated", "unchanged", "retired", "skipped", "failed")
KINDS = ("sensor", "management_console", "azure")
SERVICENOW_STATUSES = ("ok", "credentials_rejected", "unreachable")
SERVICENOW_UNKNOWN = "unknown"

# A failure object as the DAGs record it (contracts): {"at", "message", "dag_id", "run_id", "task_id",
# "map_index", "try_number"}. ``LogUrl`` builds the Airflow UI link to that task instance's log.
LogUrl = Callable[[dict], "str | None"]


@dataclass
class SourceRecord:
    """What is recorded about one Defender source (each part None when nothing was recorded)."""

    id: str
    sync_meta: dict | None = None          # defender_device_sync_state  <source>/meta
    alert_status: dict | None = None       # defender_iot_alerts  status:<source>
    watermark: dict | None = None          # defender_iot_alerts  forwarded_up_to:<source> {"time_ms", "ids"}
    failed_task: dict | None = None        # latest failed sync_source task instance, as a failure object
    connection_kind: str | None = None     # from the connection's type, when the DAGs recorded no kind


@dataclass
class RecordedState:
    sources: list[SourceRecord]
    servicenow_id: str
    servicenow_auth: dict | None = None    # defender_servicenow_auth  servicenow:<conn id>
    sync_frequency_minutes: int = 60


def parse_time(value) -> datetime | None:
    """An ISO-8601 string (naive = UTC) or epoch milliseconds, as an aware UTC datetime; else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value / 1000, tz=timezone.utc)
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if value else None


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _failure(raw, log_url: LogUrl) -> dict | None:
    """A recorded failure object as the page shows it: ``{"at", "message", "log_url"}``."""
    raw = _dict(raw)
    at = parse_time(raw.get("at"))
    if at is None:
        return None
    message = " ".join(str(raw.get("message") or "").split()) or "The task failed; its log says why."
    url = log_url(raw) if raw.get("dag_id") and raw.get("run_id") and raw.get("task_id") else None
    return {"at": iso(at), "message": message, "log_url": url}


def _same_attempt(recorded, task: dict | None) -> bool:
    """Did the DAG record its own failure for this failed task instance (same run, task, map index, try)?"""
    recorded = _dict(recorded)
    return bool(task) and all(recorded.get(k) == task.get(k) for k in ("dag_id", "run_id", "task_id", "map_index")) \
        and recorded.get("try_number", task.get("try_number")) == task.get("try_number")


def _latest(*failures: dict | None) -> dict | None:
    present = [f for f in failures if f]
    return max(present, key=lambda f: parse_time(f["at"])) if present else None


def _counts(meta: dict) -> dict | None:
    counts = meta.get("counts")
    if not isinstance(counts, dict):
        return None
    return {key: _count(counts.get(key)) or 0 for key in COUNT_KEYS}


def _alerts(status: dict, watermark: dict) -> dict:
    if status:
        up_to = parse_time(status.get("forwarded_up_to"))
        return {"forwarded_up_to": iso(up_to), "pending": _count(status.get("pending")),
                "dead_letter": _count(status.get("dead_letter"))}
    return {"forwarded_up_to": iso(parse_time(watermark.get("time_ms"))), "pending": None, "dead_letter": None}


def _sync_failed(meta: dict, sync_failure: dict | None, last_success: datetime | None) -> bool:
    """Did the latest device sync attempt of this source fail?"""
    outcome = meta.get("last_outcome")
    if outcome in ("ok", "failed"):
        failed_at = parse_time(sync_failure["at"]) if sync_failure else None
        # A failure recorded after the outcome (e.g. a task that died before writing it) still counts.
        return outcome == "failed" or bool(failed_at and (last_success is None or failed_at > last_success))
    if sync_failure is None:
        return False
    return last_success is None or parse_time(sync_failure["at"]) > last_success


def source_health(record: SourceRecord, *, now: datetime, stale_after: timedelta, log_url: LogUrl) -> dict:
    meta, status = _dict(record.sync_meta), _dict(record.alert_status)
    last_success = parse_time(meta.get("last_success"))
    # The failed task instance is only the fallback: when the task recorded why it failed (it does so just
    # before it ends, so the instance's end date is later), the DAG's own sentence is shown.
    fallback = None if _same_attempt(meta.get("last_failure"), record.failed_task) else record.failed_task
    sync_failure = _latest(_failure(meta.get("last_failure"), log_url), _failure(fallback, log_url))
    alert_failure = _failure(status.get("last_failure"), log_url)
    kind = next((k for k in (meta.get("kind"), status.get("kind"), record.connection_kind) if k in KINDS), None)

    if _sync_failed(meta, sync_failure, last_success) or status.get("last_outcome") == "failed":
        state = "failing"
    elif last_success is None:
        state = "never"
    elif now - last_success > stale_after:
        state = "stale"
    else:
        state = "ok"
    return {
        "id": record.id,
        "kind": kind,
        "status": state,
        "last_sync": iso(last_success),
        "last_counts": _counts(meta),
        "last_failure": _latest(sync_failure, alert_failure),
        "alerts": _alerts(status, _dict(record.watermark)),
    }


def compute_health(state: RecordedState, now: datetime, log_url: LogUrl) -> dict:
    """The health document for ``state`` at ``now`` (an aware datetime)."""
    stale_after = timedelta(minutes=2 * state.sync_frequency_minutes)
    servicenow = _dict(state.servicenow_auth).get("status")
    return {
        "generated_at": iso(now),
        "sources": [source_health(r, now=now, stale_after=stale_after, log_url=log_url) for r in state.sources],
        "servicenow": {"id": state.servicenow_id,
                       "status": servicenow if servicenow in SERVICENOW_STATUSES else SERVICENOW_UNKNOWN},
    }
