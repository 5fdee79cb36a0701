"""Building the CMDB depth engine of a kind for a DAG task, and what the report task says about them."""

from __future__ import annotations

import logging

from defender_servicenow.cmdb_depth.cves import CveSync
from defender_servicenow.cmdb_depth.relations import RelationSync
from defender_servicenow.cmdb_depth.sensors import SensorSync
from defender_servicenow.cmdb_depth.state import depth_failure_reason
from defender_servicenow.cmdb_depth.summary import DepthSummary

log = logging.getLogger(__name__)
KINDS = ("sensors", "relations", "cves")


class _Off:
    """An engine turned off by a setting: reads and writes nothing, says so."""

    def __init__(self, kind: str, source_id: str, note: str, dry_run: bool):
        self.summary = DepthSummary(kind, source_id, dry_run=dry_run, note=note)

    def run(self) -> DepthSummary:
        return self.summary.finish()


def build_engine(kind: str, *, source, servicenow, state_store, source_name: str, data_source: str,
                 full_resync: bool, dry_run: bool, max_items: int, max_value_bytes: int,
                 retire_after_missing_runs: int, sync_relations: bool, retention_days: int,
                 cve_min_score: float = 0.0):
    common = dict(source=source, servicenow=servicenow, state_store=state_store, source_name=source_name,
                  data_source=data_source, full_resync=full_resync, dry_run=dry_run, max_items=max_items,
                  max_value_bytes=max_value_bytes)
    if kind == "sensors":
        return SensorSync(retire_after_missing_runs=retire_after_missing_runs, **common)
    if kind == "relations":
        if not sync_relations:
            return _Off(kind, source.source_id, "turned off by DEFENDER_SYNC_RELATIONS=false", dry_run)
        return RelationSync(retention_days=retention_days, **common)
    if kind == "cves":
        return CveSync(min_score=cve_min_score, **common)
    raise ValueError(f"unknown CMDB depth kind {kind!r}")


def depth_problems(store, selected: list[str], depth: dict, run_id: str | None) -> list[str]:
    """One line per (kind, source) whose task gave no result in this run, with the reason it recorded."""
    problems = []
    for kind, results in depth.items():
        done = {r.get("source") for r in results or [] if r}
        for r in results or []:
            if r:
                log.info("%s of %s: %s", kind, r["source"], ", ".join(
                    f"{k} {v}" for k, v in r.items() if isinstance(v, int) and not isinstance(v, bool)))
        for source in selected:
            if source not in done:
                reason = depth_failure_reason(store, source, kind, run_id)
                log.error("%s of %s failed: %s", kind, source, reason)
                problems.append(f"{kind} of {source} ({reason})")
    return problems
