"""Device connections -> ``cmdb_rel_ci`` relations (``Connects to::Connected by``) between two device CIs
of the same source, through the IRE's relations.

* created once: a relation the state already holds for the same two CIs is not sent again;
* kept in step: a connection whose CIs changed is re-created (the old relation removed when it was ours);
  a connection not seen for ``retention_days`` (Defender's ``lastSeen`` where the API gives it, else the
  last run that listed it) is removed -- but only if this integration created it (the IRE answered INSERT);
* never between CIs of other sources: both ends must be device CIs this source's device sync confirmed
  (its own state); connections to anything else are counted as ``unknown_end`` and sent once both ends exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from defender_servicenow.cmdb_depth.base import DepthEngine
from defender_servicenow.cmdb_depth.ire import CONNECTS, End, Link, relate, remove_relations
from defender_servicenow.cmdb_depth.state import DepthState, day_of, device_cis, today
from defender_servicenow.cmdb_depth.summary import DepthSummary
from defender_servicenow.models import InvalidRecord

log = logging.getLogger(__name__)
_PARENT, _CHILD, _DAY, _OURS = range(4)   # relation entry: [parent sys_id, child sys_id, last seen day, ours]


def relation_key(first: int, second: int) -> str:
    return f"{first}>{second}"


@dataclass
class RelationPlan:
    create: list[tuple[str, int, int, int]] = field(default_factory=list)   # (key, first, second, last day)
    remove: list[tuple[str, list]] = field(default_factory=list)           # (key, entry) to delete and forget
    touch: dict[str, int] = field(default_factory=dict)                    # key -> newer last-seen day
    unchanged: int = 0
    unknown_end: int = 0
    stale: int = 0


def plan_relations(listed: dict[str, tuple[int, int, int]], recorded: dict[str, list],
                   devices: dict[int, tuple[str, str]], *, now_day: int, retention_days: int,
                   full_resync: bool = False) -> RelationPlan:
    """Decide what to create, remove and re-date (pure). ``listed``: key -> (first, second, last-seen day)
    of the connections the source reports; ``recorded``: the state; ``devices``: this source's device CIs."""
    plan = RelationPlan()
    oldest = now_day - retention_days
    for key, (first, second, day) in listed.items():
        entry = recorded.get(key)
        if day < oldest:
            plan.stale += 1
            if entry is not None:
                plan.remove.append((key, entry))
            continue
        ends = devices.get(first), devices.get(second)
        if ends[0] is None or ends[1] is None:
            plan.unknown_end += 1
            if entry is not None and day > entry[_DAY]:
                plan.touch[key] = day
            continue
        if entry is not None and [entry[_PARENT], entry[_CHILD]] == [ends[0][0], ends[1][0]] and not full_resync:
            plan.unchanged += 1
            if day > entry[_DAY]:
                plan.touch[key] = day
            continue
        if entry is not None and [entry[_PARENT], entry[_CHILD]] != [ends[0][0], ends[1][0]]:
            plan.remove.append((key, entry))   # a CI was replaced: the old relation goes, a new one is made
        plan.create.append((key, first, second, day))
    for key, entry in recorded.items():
        if key not in listed and entry[_DAY] < oldest:
            plan.remove.append((key, entry))
    return plan


class RelationSync(DepthEngine):
    """One source's connections -> relations. ``source`` implements ``iter_connections()``."""

    def __init__(self, *, retention_days: int = 90, **kw):
        super().__init__(**kw)
        self.retention_days = retention_days

    def run(self) -> DepthSummary:
        summary = DepthSummary("relations", self.source_id, dry_run=self.dry_run)
        if not getattr(self.source, "supports_connections", False):
            summary.note = f"{self.source.kind} sources report no device connections"
            return summary.finish()
        devices = device_cis(self.store, self.source_id, self.max_value_bytes)
        state = DepthState(self.store, self.source_id, "relations", max_value_bytes=self.max_value_bytes)
        now_day = today()
        listed: dict[str, tuple[int, int, int]] = {}
        for record in self.source.iter_connections():
            if isinstance(record, InvalidRecord):
                summary.add("invalid")
                log.warning("A connection of %s could not be used: %s", self.source_id, record.reason)
                continue
            key = relation_key(record.first, record.second)
            day = day_of(record.last_seen) if record.last_seen else now_day
            if key in listed:   # listed twice (both directions of a console's Two Way): keep the newest
                day = max(day, listed[key][2])
            listed[key] = (record.first, record.second, day)
        summary.add("seen", len(listed))
        plan = plan_relations(listed, dict(state.items()), devices, now_day=now_day,
                              retention_days=self.retention_days, full_resync=self.full_resync)
        for name in ("unchanged", "unknown_end", "stale"):
            summary.add(name, getattr(plan, name))
        if plan.unknown_end:
            log.info("%d connection(s) of %s join a device that has no confirmed CI of this source yet (or a retired "
                     "one); they are related once both devices are synced", plan.unknown_end, self.source_id)
        try:
            self._remove(plan, state, summary)
            self._create(plan, devices, state, summary)
            for key, day in plan.touch.items():
                entry = state.get(key)
                if entry is not None and not self.dry_run:
                    state.put(key, [*entry[:_DAY], day, entry[_OURS]])
        finally:
            if not self.dry_run:
                state.save()
                state.save_meta(last_run_day=now_day, count=len(state))
        return summary.finish()

    def _create(self, plan: RelationPlan, devices, state: DepthState, summary: DepthSummary) -> None:
        def end(device_id: int) -> End:
            return End(f"{self.source_id}:{device_id}", devices[device_id][1])

        links = [Link(key, end(first), end(second), CONNECTS) for key, first, second, _ in plan.create]
        days = {key: day for key, _, _, day in plan.create}
        for result in relate(self.servicenow, links, source_name=self.source_name, data_source=self.data_source,
                             dry_run=self.dry_run, max_items=self.max_items):
            link = result.link
            if result.error:
                summary.fail(f"relation {link.key} ({link.parent.native_key} -> {link.child.native_key})",
                             result.error)
                continue
            summary.add("created" if result.created else "existing")
            if not self.dry_run:
                first, second = (int(x) for x in link.key.split(">"))
                ends = [devices[first][0], devices[second][0]]
                before = state.get(link.key)   # a full resync re-sends ours: NO_CHANGE keeps them ours
                ours = result.created or bool(before and before[:_DAY] == ends and before[_OURS])
                state.put(link.key, [*ends, days[link.key], int(ours)])

    def _remove(self, plan: RelationPlan, state: DepthState, summary: DepthSummary) -> None:
        ours = [(key, entry) for key, entry in plan.remove if entry[_OURS]]
        removed = remove_relations(self.servicenow, [(e[_PARENT], e[_CHILD]) for _, e in ours], CONNECTS,
                                   dry_run=self.dry_run)
        summary.add("removed", removed)
        if plan.remove:
            log.info("%s: %d relation(s) removed (not seen for %d days, or a CI was replaced); %d more forgotten "
                     "that another tool had created", self.source_id, removed, self.retention_days,
                     len(plan.remove) - len(ours))
        if not self.dry_run:
            for key, _ in plan.remove:
                state.remove(key)
