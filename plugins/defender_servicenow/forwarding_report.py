"""The forwarding run's report: per-source counts and failures, the one-line summary, the plain sentence for
the health page, and the exceptions that fail the task when anything was not forwarded (nothing is lost: the
alerts stay pending in the ledger)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from defender_servicenow.exceptions import IntegrationError
from defender_servicenow.models import ms_to_datetime
from defender_servicenow.rules import Destination


class ForwardingIncompleteError(IntegrationError):
    """Some alerts could not be forwarded; they stay pending and the next attempt resumes there."""


class ForwardingCredentialsError(ForwardingIncompleteError):
    """ServiceNow or Defender rejected the credentials: retrying at once cannot help (and repeated failed
    logins can lock the integration user out); the next run resumes from the ledger."""


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
    pending: int = 0
    dead_letter: int = 0
    flagged: int = 0
    forwarded_up_to_ms: int | None = None

    @property
    def failed(self) -> bool:
        return bool(self.error or self.failures)

    def as_dict(self) -> dict:
        return {"source": self.source, "window": self.window, "seen": self.seen, "invalid": len(self.invalid),
                "matched": dict(self.matched), "unmatched": self.unmatched, "created": self.created,
                "already_present": self.present, "would_create": self.would_create, "pending": self.pending,
                "dead_letter": self.dead_letter,
                "failed": [f"{f.alert} -> {f.destination.table}@{f.destination.connection_id}: {f.answer}"
                           for f in self.failures], "error": self.error,
                "forwarded_up_to": (ms_to_datetime(self.forwarded_up_to_ms).isoformat()
                                    if self.forwarded_up_to_ms else None)}

    def summary(self) -> str:
        matched = ", ".join(f"{name}: {n}" for name, n in sorted(self.matched.items())) or "none"
        return (f"Alert forwarding summary ({self.source}, {self.window}): to check {self.seen}, matched per "
                f"rule: {matched}, matched no rule {self.unmatched}, created {self.created}, already present "
                f"{self.present}, would create {self.would_create}, failed {len(self.failures)}, pending "
                f"{self.pending}, dead-letter {self.dead_letter}, forwarded with fallbacks {self.flagged}"
                + (f", source error: {self.error}" if self.error else ""))


def failure_sentence(report: SourceReport) -> str:
    """One plain sentence for the health page (no secret: errors and answers are the hooks' plain texts)."""
    if report.error:
        return f"Alerts of {report.source} could not be read: {report.error}"[:500]
    first = report.failures[0]
    return (f"{len({f.alert for f in report.failures})} alert(s) of {report.source} were not forwarded, e.g. "
            f"to {first.destination.table} on {first.destination.connection_id}: {first.answer}")[:500]


def raise_if_incomplete(reports: Sequence[SourceReport]) -> None:
    """Fail the task when anything was not forwarded (the alerts stay pending: nothing is lost)."""
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
                "retried, so the integration user is not locked out). Nothing is lost: the alerts stay pending "
                "and the next run forwards them without duplicates.")
        raise ForwardingIncompleteError(
            "; ".join(parts) + ". Nothing is lost: these alerts stay pending and the next attempt forwards "
            "them without duplicates. Check the ServiceNow/Defender connections if this persists.")
