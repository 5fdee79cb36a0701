"""The device sync's run summary and what makes a completed sync count as failed (moved from :mod:`.sync`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SyncSummary:
    source: str
    seen: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    retired: int = 0
    skipped: int = 0
    failed: int = 0
    duration: float = 0.0
    dry_run: bool = False
    full_resync: bool = False
    would_send: int = 0
    would_retire: int = 0
    ire_requests: int = 0
    shared_identifiers: int = 0                                   # devices whose serial/MAC another reported
    released: int = 0                                             # gone here, CI kept: another source has it
    errors: dict[str, int] = field(default_factory=dict)          # IRE error code -> devices
    skip_reasons: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # code -> first device ids

    COUNTS = ("seen", "inserted", "updated", "unchanged", "retired", "skipped", "failed")

    def line(self) -> str:
        """The final log line: source, the counts, duration."""
        counts = " ".join(f"{name}={getattr(self, name)}" for name in self.COUNTS)
        preview = (f"the IRE preview above is for {self.would_send} devices" if self.would_send
                   else "no device would be sent to the IRE")
        extra = f" (dry run, nothing written: {preview}; would retire {self.would_retire})" if self.dry_run else ""
        return f"Last sync of {self.source}: {counts} duration={self.duration:.1f}s{extra}"

    def as_dict(self) -> dict:
        return asdict(self)

    def _example(self, code: str, device_id: str) -> None:
        ids = self.examples.setdefault(code, [])
        if len(ids) < 20:
            ids.append(device_id)


def item_failures(summary: SyncSummary) -> str | None:
    """Why a sync whose IRE refused some devices counts as failed (None when none were refused).

    The run completes first (every confirmed device recorded, retirement done); the refused devices are not
    recorded, so the next run sends them again. A retry of the task would only repeat the same answers."""
    if not summary.failed:
        return None
    codes = ", ".join(f"{code} {count}" for code, count in sorted(summary.errors.items()))
    examples = "; ".join(f"{code}: device ids {', '.join(ids[:5])}" for code, ids in sorted(summary.examples.items()))
    verb = "would refuse" if summary.dry_run else "refused"
    return (f"ServiceNow {verb} {summary.failed} device(s) of {summary.source} ({codes}; e.g. {examples}). "
            "The other devices are synced; these are sent again next run. The task log lists each device with "
            "ServiceNow's message: fix the CMDB (e.g. merge the duplicate CIs behind a MULTI_MATCH) or the "
            "device on the source")
