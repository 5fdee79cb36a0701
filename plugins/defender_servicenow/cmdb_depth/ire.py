"""Relations between existing CIs through the IRE's ``relations`` (servicenow-api.md §5.1), and their removal.

A relation's two ends are sent as IRE items that carry only their class and ``sys_object_source_info``
(``source_name`` + the native key the device sync recorded), so the IRE identifies each end through
``sys_object_source`` and changes none of its attributes. Ends are shared within a request: a request
holds up to ``max_items`` distinct CIs and every relation among them, so a dense network costs far
less than one request per relation (benchmarks/relations.py measures it).

The IRE has no relation removal: a relation is removed by deleting its ``cmdb_rel_ci`` row (Table API,
through the Batch API), found by parent, child and type.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from defender_servicenow.hooks.servicenow_wire import BatchRequest, sys_id_of

log = logging.getLogger(__name__)

DETECTS = "Detects::Detected by"        # NIDS (parent) detects the CI (child); ships with cmdb_ci_nids
CONNECTS = "Connects to::Connected by"  # base system type; ServiceNow's OT device network connections use it
_INSERT_OPS = {"INSERT", "INSERT_AS_PARTIAL", "INSERT_AS_INCOMPLETE"}


@dataclass(frozen=True)
class End:
    """A CI at one end of a relation: its class and its ``sys_object_source`` native key."""

    native_key: str
    class_name: str


@dataclass(frozen=True)
class Link:
    key: str       # the state key of this relation
    parent: End
    child: End
    type: str


@dataclass
class LinkResult:
    link: Link
    created: bool = False          # the IRE inserted it (it is ours); False: it existed already
    error: str | None = None


def batches(links: Iterable[Link], max_items: int = 100) -> Iterator[list[Link]]:
    """Group links so that a request names at most ``max_items`` distinct CIs (greedy, in order)."""
    batch: list[Link] = []
    ends: set[End] = set()
    for link in links:
        new = {link.parent, link.child} - ends
        if batch and len(ends) + len(new) > max_items:
            yield batch
            batch, ends = [], set()
            new = {link.parent, link.child}
        batch.append(link)
        ends |= new
    if batch:
        yield batch


def payload(batch: list[Link], source_name: str) -> tuple[list[dict], list[dict]]:
    """(items, relations) of one IRE request."""
    index: dict[End, int] = {}
    items: list[dict] = []
    relations: list[dict] = []
    for link in batch:
        for end in (link.parent, link.child):
            if end not in index:
                index[end] = len(items)
                items.append({"className": end.class_name, "values": {},
                              "sys_object_source_info": {"source_name": source_name,
                                                         "source_native_key": end.native_key}})
        relations.append({"parent": index[link.parent], "child": index[link.child], "type": link.type,
                          "sys_rel_source_info": {"source_name": source_name}})
    return items, relations


def _messages(entry: dict) -> str:
    return "; ".join(f"{e.get('error', '?')}: {e.get('message', '')}" for e in entry.get("errors") or [])


def relate(servicenow, links: list[Link], *, source_name: str, data_source: str, dry_run: bool = False,
           max_items: int = 100) -> Iterator[LinkResult]:
    """Send ``links`` through the IRE, a request per batch; yields one result per link."""
    for batch in batches(links, max_items):
        items, relations = payload(batch, source_name)
        result = servicenow.identify_reconcile(items, data_source, relations=relations, dry_run=dry_run)
        answers = result.get("relations") or []
        by_input: dict[int, dict] = {}
        for position, answer in enumerate(answers):
            for index in answer.get("inputIndices") or [position]:
                by_input[index] = answer
        item_errors = {i: _messages(x) for i, x in enumerate(result.get("items") or []) if x.get("errors")}
        for n, link in enumerate(batch):
            answer = by_input.get(n)
            if answer is None:
                yield LinkResult(link, error="the IRE answered without this relation")
            elif answer.get("errors"):
                ends = [relations[n]["parent"], relations[n]["child"]]
                detail = "; ".join(item_errors[e] for e in ends if e in item_errors)
                yield LinkResult(link, error=_messages(answer) + (f" ({detail})" if detail else ""))
            else:
                yield LinkResult(link, created=answer.get("operation") in _INSERT_OPS)


def relation_type_id(servicenow, name: str) -> str | None:
    rows = servicenow.query("cmdb_rel_type", f"name={name}", fields=["sys_id", "name"], limit=1)
    return rows[0]["sys_id"] if rows else None


def remove_relations(servicenow, pairs: list[tuple[str, str]], type_name: str, *, dry_run: bool = False) -> int:
    """Delete the ``cmdb_rel_ci`` rows of type ``type_name`` between these (parent sys_id, child sys_id)
    pairs; rows already gone count as removed. Returns how many rows were deleted (or would be)."""
    if not pairs:
        return 0
    type_id = relation_type_id(servicenow, type_name)
    if type_id is None:
        return 0
    wanted = set(pairs)
    rows = servicenow.query_in("cmdb_rel_ci", "parent", sorted({p for p, _ in wanted}), query=f"type={type_id}",
                               fields=["sys_id", "parent", "child", "type"])
    doomed = [r["sys_id"] for r in rows if (sys_id_of(r.get("parent")), sys_id_of(r.get("child"))) in wanted
              and sys_id_of(r.get("type")) == type_id]
    if dry_run or not doomed:
        return len(doomed)
    requests = [BatchRequest(id=str(i), method="DELETE", url=f"/api/now/table/cmdb_rel_ci/{sys_id}")
                for i, sys_id in enumerate(doomed)]
    failed = [r for r in servicenow.batch(requests) if not r.ok and r.status_code != 404]
    if failed:
        from defender_servicenow.exceptions import ServiceNowError

        raise ServiceNowError(f"ServiceNow refused to delete {len(failed)} of {len(doomed)} cmdb_rel_ci rows "
                              f"({failed[0].status_code}: {failed[0].error_message}); they are tried again next run",
                              status=failed[0].status_code)
    return len(doomed)
