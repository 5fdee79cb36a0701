"""Alert records with safe fallbacks: an alert Defender sends with a value we do not know is forwarded,
flagged, rather than skipped (pure).

* an unknown severity (``High``, empty, a typo) is treated as the highest, ``Critical``, so that a rule's
  ``minimum_severity`` never hides it; the record's message starts with a note saying so.

A record that still cannot be read (no id or time) is returned as :class:`InvalidRecord`; the forwarding
engine keeps it in its dead-letter set (see :mod:`defender_servicenow.ledger`).
"""

from __future__ import annotations

from typing import Any

from defender_servicenow.models import SEVERITIES, Alert, InvalidRecord, parse_alert

FALLBACK_SEVERITY = SEVERITIES[-1]


def parse_alert_safely(record: Any, **kw: Any) -> Alert | InvalidRecord:
    """:func:`models.parse_alert`, then, for a record it rejects, the same with safe fallbacks."""
    parsed = parse_alert(record, **kw)
    if isinstance(parsed, Alert) or not isinstance(record, dict):
        return parsed
    fixed, notes = dict(record), []
    raw = str(record.get("severity") or "").strip()
    if raw.lower() not in {s.lower() for s in SEVERITIES}:
        fixed["severity"] = FALLBACK_SEVERITY
        notes.append(f"Defender sent severity {raw[:30]!r}, which is not one of {', '.join(SEVERITIES)}: "
                     f"forwarded as {FALLBACK_SEVERITY}.")
    if not notes:
        return parsed
    second = parse_alert(fixed, **kw)
    if not isinstance(second, Alert):
        return parsed
    note = "[Forwarding note: " + " ".join(notes) + "]"
    return second.model_copy(update={"message": f"{note}\n{second.message}".strip()})
