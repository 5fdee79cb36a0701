"""Counts of one sensors / relations task, its log lines and the failure it ends with."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from defender_servicenow.exceptions import IntegrationError

log = logging.getLogger(__name__)
MAX_EXAMPLES = 20


class DepthIncompleteError(IntegrationError):
    """Some records could not be written; what was confirmed is recorded, the rest is tried next run."""


@dataclass
class DepthSummary:
    kind: str
    source: str
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    dry_run: bool = False
    note: str | None = None          # e.g. "turned off by DEFENDER_SYNC_RELATIONS=false"
    started: float = field(default_factory=time.monotonic)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def fail(self, what: str, reason: str) -> None:
        self.add("failed")
        if len(self.errors) < MAX_EXAMPLES:
            self.errors.append(f"{what}: {reason}")
            log.error("%s of %s: %s failed: %s", self.kind, self.source, what, reason)

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    def line(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items()) or "nothing to do"
        extra = f" ({self.note})" if self.note else ""
        dry = " (dry run: nothing written)" if self.dry_run else ""
        return (f"{self.kind} of {self.source}{dry}{extra}: {counts}, "
                f"duration {time.monotonic() - self.started:.1f}s")

    def as_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, **self.counts, "note": self.note,
                "dry_run": self.dry_run, "errors": self.errors[:5],
                "duration_s": round(time.monotonic() - self.started, 1)}

    def finish(self) -> DepthSummary:
        """Log the summary line; raise when anything failed (the run ends failed, the log says what)."""
        if self.failed:
            more = f" (first {len(self.errors)} listed above)" if self.failed > len(self.errors) else ""
            message = (f"{self.line()}. {self.failed} record(s) could not be written{more}, first: "
                       f"{self.errors[0] if self.errors else 'unknown'}; what ServiceNow confirmed is recorded and "
                       "the rest is sent again next run")
            log.error(message)
            raise DepthIncompleteError(message)
        log.info(self.line())
        return self
