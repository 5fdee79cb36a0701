"""What the health page shows, derived from the health document (pure): labels, ages, links."""

from __future__ import annotations

from urllib.parse import quote

from defender_servicenow.ui.health import COUNT_KEYS, parse_time

DAGS = (
    ("defender_device_sync", "Device sync", "devices into the CMDB, on its schedule"),
    ("defender_alert_forwarding", "Alert forwarding", "alerts into incidents, when new alerts arrive"),
    ("defender_servicenow_cleanup", "Clean-up", "retires or deletes what this integration wrote; by hand"),
)
STATUS_LABELS = {"ok": "OK", "failing": "Failing", "stale": "Stale", "never": "Never synced"}
KIND_LABELS = {"sensor": "OT sensor", "management_console": "Management console", "azure": "Azure"}
SERVICENOW_LABELS = {"ok": "OK", "credentials_rejected": "Credentials rejected", "unreachable": "Unreachable",
                     "unknown": "Unknown (not checked yet)"}


def age(seconds: float) -> str:
    """``45 s ago``, ``12 min ago``, ``3 h 5 min ago``, ``2 days ago``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s ago"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min ago"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min ago" if minutes else f"{hours} h ago"
    return f"{hours // 24} days ago"


def _when(value: str | None, now) -> dict | None:
    at = parse_time(value)
    if at is None:
        return None
    return {"iso": at.isoformat(), "text": at.strftime("%Y-%m-%d %H:%M UTC"), "age": age((now - at).total_seconds())}


def _count(value) -> str:
    return "–" if value is None else str(value)


def page_context(health: dict, base_path: str, *, refresh_seconds: int) -> dict:
    now = parse_time(health["generated_at"])
    rows = []
    for src in health["sources"]:
        counts = src["last_counts"]
        failure = src["last_failure"]
        alerts = src["alerts"]
        rows.append({
            "id": src["id"],
            "kind": KIND_LABELS.get(src["kind"], "unknown kind"),
            "status": src["status"],
            "status_label": STATUS_LABELS[src["status"]],
            "last_sync": _when(src["last_sync"], now),
            "counts": [(key, counts[key]) for key in COUNT_KEYS] if counts else None,
            "failure": failure and {**failure, "when": _when(failure["at"], now),
                                    "current": src["status"] == "failing"},
            "forwarded_up_to": _when(alerts["forwarded_up_to"], now),
            "pending": _count(alerts["pending"]),
            "dead_letter": _count(alerts["dead_letter"]),
        })
    servicenow = health["servicenow"]
    return {
        "generated": _when(health["generated_at"], now),
        "rows": rows,
        "servicenow": {**servicenow, "label": SERVICENOW_LABELS[servicenow["status"]]},
        "dags": [{"id": dag_id, "title": title, "does": does, "url": f"{base_path}/dags/{quote(dag_id)}"}
                 for dag_id, title, does in DAGS],
        "json_url": "api/health",
        "refresh_seconds": refresh_seconds,
        "failing": sum(r["status"] == "failing" for r in rows),
    }
