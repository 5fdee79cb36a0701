"""Defender's device CVEs -> ServiceNow: Vulnerability Response's tables when the instance has them
(``sn_vul_vulnerable_item`` detected at run time), else key values on the device CI.

* Vulnerability Response: one vulnerable item (VIT) per device and CVE, ``cmdb_ci`` = the device CI,
  ``vulnerability`` = the CVE's ``sn_vul_entry`` row (found by ``id``; created with id, summary and score
  when the instance has none, e.g. without the NVD integration), ``correlation_id`` =
  ``defender-iot-cve:<conn id>:<device id>:<CVE>`` and ``correlation_display`` "Microsoft Defender for IoT"
  (how the clean-up finds them). Open = state 1; a CVE Defender no longer reports is closed (state 3,
  close notes), never deleted; reported again, it is reopened. Before creating, items are looked up by
  correlation_id (an item an interrupted run created is recorded, not created again); the requests go one
  Batch API call at a time and the state is saved after each. A CVE whose score or description changed
  while open gets its ``sn_vul_entry`` patched (summary, cvss_score: the entry holds them), once per CVE.
* Otherwise: ``cmdb_key_value`` rows on the device CI (through the IRE's related entries), key
  ``defender.cve.<CVE>``, value JSON ``{"status": "open"|"closed", "score", "attack_vector",
  "description", "closed_on"}``.

Only CVEs scoring at least ``min_score`` count (``DEFENDER_CVE_MIN_SCORE``); a CVE below it is treated as not
reported. Change-detected: a device whose CVEs did not change is not written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone

from defender_servicenow.cmdb_depth.base import DepthEngine
from defender_servicenow.cmdb_depth.models import Cve
from defender_servicenow.cmdb_depth.state import DepthState, device_cis
from defender_servicenow.cmdb_depth.summary import DepthSummary
from defender_servicenow.exceptions import ServiceNowInvalidTableError
from defender_servicenow.hooks.servicenow_wire import BatchRequest, ire_item_errors
from defender_servicenow.models import InvalidRecord

log = logging.getLogger(__name__)
VIT, ENTRY = "sn_vul_vulnerable_item", "sn_vul_entry"
VIT_OPEN, VIT_CLOSED = "1", "3"        # INFERENCE: the VIT state choices Open / Closed
CORRELATION_PREFIX = "defender-iot-cve:"
CORRELATION_DISPLAY = "Microsoft Defender for IoT"
_DIGEST, _RECORD, _OPEN, _SCORE = range(4)   # per CVE: [digest, VIT sys_id or "", open 1/0, score]


def cve_digest(cve: Cve) -> str:
    text = json.dumps([cve.score, cve.attack_vector, cve.description], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_cves(found: dict[int, dict[str, Cve]], recorded: dict[str, dict], devices: dict[int, tuple[str, str]],
              *, full_resync: bool = False) -> dict[int, tuple[list[Cve], list[str]]]:
    """device id -> (CVEs to open or update, CVE ids to close), for devices with a CI of this source (pure)."""
    plan = {}
    for device_id in devices:
        current, known = found.get(device_id, {}), recorded.get(str(device_id)) or {}
        upsert = [c for cid, c in current.items()
                  if full_resync or cid not in known or not known[cid][_OPEN] or known[cid][_DIGEST] != cve_digest(c)]
        close = [cid for cid, entry in known.items() if entry[_OPEN] and cid not in current]
        if upsert or close:
            plan[device_id] = (upsert, close)
    return plan


def key_value(cve: Cve | None, *, score: float | None = None, closed_on: str | None = None) -> str:
    """The ``cmdb_key_value.value`` of a CVE (JSON, under 4,000 characters)."""
    if cve is None:
        return json.dumps({"status": "closed", "score": score, "closed_on": closed_on})
    return json.dumps({"status": "open", "score": cve.score, "attack_vector": cve.attack_vector,
                       "description": (cve.description or "")[:3000] or None}, ensure_ascii=False)


class CveSync(DepthEngine):
    """One source's device CVEs. ``source`` implements ``supports_cves`` and ``iter_device_cves(min_score)``."""

    def __init__(self, *, min_score: float = 0.0, **kw):
        super().__init__(**kw)
        self.min_score = min_score

    def run(self) -> DepthSummary:
        summary = DepthSummary("cves", self.source_id, dry_run=self.dry_run)
        if not getattr(self.source, "supports_cves", False):
            summary.note = f"{self.source.kind} sources: CVEs are not read"
            return summary.finish()
        devices = device_cis(self.store, self.source_id, self.max_value_bytes)
        found: dict[int, dict[str, Cve]] = {}
        for record in self.source.iter_device_cves(self.min_score):
            if isinstance(record, InvalidRecord):
                summary.add("invalid")
                log.warning("A CVE record of %s could not be used: %s", self.source_id, record.reason)
                continue
            device_id, cves = record
            kept = {c.id: c for c in cves if c.score is None or c.score >= self.min_score}
            summary.add("below_min_score", len({c.id for c in cves}) - len(kept))
            if kept:
                found.setdefault(device_id, {}).update(kept)
        summary.add("seen", sum(map(len, found.values())))
        summary.add("no_device_ci", len(set(found) - set(devices)))
        state = DepthState(self.store, self.source_id, "cves", max_value_bytes=self.max_value_bytes)
        plan = plan_cves(found, dict(state.items()), devices, full_resync=self.full_resync)
        summary.add("unchanged_devices", len(set(found) & set(devices)) - len(set(found) & set(plan)))
        if not plan:
            return summary.finish()
        vr = self._has_vulnerability_response()
        summary.note = "Vulnerability Response" if vr else "key values on the CI (no Vulnerability Response)"
        try:
            (self._write_vr if vr else self._write_key_values)(plan, found, devices, state, summary)
        finally:
            if not self.dry_run:
                state.save()
        return summary.finish()

    def _has_vulnerability_response(self) -> bool:
        try:
            self.servicenow.query(VIT, "", fields=["sys_id"], limit=1)
        except ServiceNowInvalidTableError:
            return False
        return True

    @staticmethod
    def _today() -> str:
        return datetime.now(timezone.utc).strftime("%Y-%m-%d")

    def _record(self, state: DepthState, device_id: int, cve_id: str, entry: list | None) -> None:
        known = dict(state.get(str(device_id)) or {})
        if entry is None:
            known.pop(cve_id, None)
        else:
            known[cve_id] = entry
        state.put(str(device_id), known)

    # ------------------------------------------------------------------ without Vulnerability Response
    def _write_key_values(self, plan, found, devices, state: DepthState, summary: DepthSummary) -> None:
        device_ids = list(plan)
        for start in range(0, len(device_ids), self.max_items):
            chunk = device_ids[start:start + self.max_items]
            items = []
            for device_id in chunk:
                upsert, close = plan[device_id]
                known = state.get(str(device_id)) or {}
                related = [{"className": "cmdb_key_value", "values": {"key": f"defender.cve.{c.id}",
                                                                       "value": key_value(c)}} for c in upsert]
                related += [{"className": "cmdb_key_value", "values": {
                    "key": f"defender.cve.{cid}", "value": key_value(None, score=known[cid][_SCORE],
                                                                     closed_on=self._today())}} for cid in close]
                items.append({"className": devices[device_id][1], "values": {}, "related": related,
                              "sys_object_source_info": {"source_name": self.source_name,
                                                         "source_native_key": f"{self.source_id}:{device_id}"}})
            result = self.servicenow.identify_reconcile(items, self.data_source, dry_run=self.dry_run)
            errors = ire_item_errors(result)
            for n, device_id in enumerate(chunk):
                upsert, close = plan[device_id]
                if n in errors:
                    summary.fail(f"CVEs of device {device_id}", "; ".join(
                        f"{e.get('error')}: {e.get('message')}" for e in errors[n]))
                    continue
                summary.add("opened", len(upsert))
                summary.add("closed", len(close))
                if not self.dry_run:
                    for c in upsert:
                        self._record(state, device_id, c.id, [cve_digest(c), "", 1, c.score])
                    known = state.get(str(device_id)) or {}
                    for cid in close:
                        self._record(state, device_id, cid, [known[cid][_DIGEST], "", 0, known[cid][_SCORE]])

    # ------------------------------------------------------------------ Vulnerability Response
    def _entries(self, cves: dict[str, Cve], summary: DepthSummary) -> dict[str, str]:
        """CVE id -> ``sn_vul_entry`` sys_id; missing entries are created (id, summary, score)."""
        rows = self.servicenow.query_in(ENTRY, "id", sorted(cves), fields=["sys_id", "id"])
        out = {str(r.get("id", "")).upper(): r["sys_id"] for r in rows if r.get("sys_id")}
        self._created_entries: set[str] = set()   # created with this run's score and description
        missing = [cves[c] for c in sorted(cves) if c not in out]
        if missing and not self.dry_run:
            answers = self.servicenow.batch([BatchRequest(
                id=str(i), method="POST", url=f"/api/now/table/{ENTRY}",
                body={"id": c.id, "name": c.id, "summary": (c.description or "")[:4000],
                      "cvss_score": "" if c.score is None else str(c.score)}) for i, c in enumerate(missing)])
            for c, answer in zip(missing, answers, strict=True):
                sys_id = _result(answer).get("sys_id")
                if sys_id:
                    out[c.id] = sys_id
                    self._created_entries.add(c.id)
                    summary.add("entries_created")
        return out

    def _existing_items(self, correlation_ids: list[str]) -> dict[str, tuple[str, str]]:
        """correlation_id -> (sys_id, state) of the vulnerable items that exist already (paged queries, split
        by URL length): an item an interrupted run created is found again instead of created twice."""
        if not correlation_ids:
            return {}
        rows = self.servicenow.query_in(VIT, "correlation_id", correlation_ids,
                                        fields=["sys_id", "correlation_id", "state"])
        out: dict[str, tuple[str, str]] = {}
        for row in sorted(rows, key=lambda r: str(r.get("state")) == VIT_CLOSED):   # an open one first
            if row.get("sys_id"):
                out.setdefault(str(row.get("correlation_id")), (row["sys_id"], str(row.get("state", ""))))
        return out

    def _correlation_id(self, device_id: int, cve_id: str) -> str:
        return f"{CORRELATION_PREFIX}{self.source_id}:{device_id}:{cve_id}"

    def _write_vr(self, plan, found, devices, state: DepthState, summary: DepthSummary) -> None:
        cves = {c.id: c for upsert, _ in plan.values() for c in upsert}
        entries = self._entries(cves, summary)
        unrecorded = [self._correlation_id(d, c.id) for d, (upsert, _) in plan.items()
                      for c in upsert if not ((state.get(str(d)) or {}).get(c.id) or ["", ""])[_RECORD]]
        existing = self._existing_items(unrecorded)
        requests: list[BatchRequest] = []
        targets: list[tuple] = []   # (device id, CVE id, request or None, new state entry, count as)
        changed: dict[str, BatchRequest] = {}   # CVE id -> the PATCH of its sn_vul_entry (score, description)

        def add(method: str, url: str, body: dict) -> BatchRequest:
            requests.append(BatchRequest(str(len(requests)), method, url, body))
            return requests[-1]

        for device_id, (upsert, close) in plan.items():
            known = state.get(str(device_id)) or {}
            for c in upsert:
                entry = known.get(c.id)
                record = entry[_RECORD] if entry else ""
                new = [cve_digest(c), record, 1, c.score]
                if record and entry[_OPEN]:   # open already: the score or description changed
                    if entry[_DIGEST] == new[_DIGEST] or c.id in self._created_entries:   # nothing to write
                        targets.append((device_id, c.id, None, new, "updated"))
                        continue
                    if c.id not in entries and not self.dry_run:   # kept as it was: retried next run
                        summary.fail(f"CVE {c.id} of device {device_id}",
                                     "its score or description changed, but no sn_vul_entry row could be found "
                                     "or created to write them to")
                        continue
                    if c.id not in changed:
                        changed[c.id] = add("PATCH", f"/api/now/table/{ENTRY}/{entries.get(c.id, '')}", {
                            "summary": (c.description or "")[:4000],
                            "cvss_score": "" if c.score is None else str(c.score)})
                    targets.append((device_id, c.id, changed[c.id], new, "updated"))
                    continue
                if not record and self._correlation_id(device_id, c.id) in existing:
                    record, item_state = existing[self._correlation_id(device_id, c.id)]
                    new[_RECORD] = record
                    if item_state != VIT_CLOSED:   # created by an interrupted run: only recorded
                        targets.append((device_id, c.id, None, new, "present"))
                        continue
                if record:                    # closed, reported again: reopen
                    request = add("PATCH", f"/api/now/table/{VIT}/{record}", {"state": VIT_OPEN})
                elif c.id not in entries and not self.dry_run:
                    summary.fail(f"CVE {c.id} of device {device_id}", "no sn_vul_entry row could be found or created")
                    continue
                else:
                    request = add("POST", f"/api/now/table/{VIT}", {
                        "cmdb_ci": devices[device_id][0], "vulnerability": entries.get(c.id, ""), "state": VIT_OPEN,
                        "short_description": f"{c.id} on {self.source_id} device {device_id}",
                        "correlation_id": self._correlation_id(device_id, c.id),
                        "correlation_display": CORRELATION_DISPLAY})
                targets.append((device_id, c.id, request, new, "opened"))
            for cid in close:
                entry = known[cid]
                if not entry[_RECORD]:
                    targets.append((device_id, cid, None, [entry[_DIGEST], "", 0, entry[_SCORE]], "closed"))
                    continue
                request = add("PATCH", f"/api/now/table/{VIT}/{entry[_RECORD]}", {
                    "state": VIT_CLOSED, "close_notes": f"No longer reported by Microsoft Defender for IoT "
                                                        f"({self.source_id}) on {self._today()}"})
                targets.append((device_id, cid, request, [entry[_DIGEST], entry[_RECORD], 0, entry[_SCORE]], "closed"))
        if self.dry_run:
            summary.add("would_write", len(requests))
            return
        self._send(requests, targets, state, summary)

    def _send(self, requests: list[BatchRequest], targets: list[tuple], state: DepthState,
              summary: DepthSummary) -> None:
        """One Batch API call's worth of requests at a time; after each, the answers are recorded and the state
        saved, so that a failing later call (or a kill) cannot make the next run create the items again."""
        by_request: dict[str | None, list[tuple]] = {}
        for target in targets:
            by_request.setdefault(target[2].id if target[2] is not None else None, []).append(target)
        for target in by_request.pop(None, []):
            self._done(target, None, state, summary)
        size = max(1, int(getattr(self.servicenow, "batch_size", 0) or self.max_items))
        for start in range(0, len(requests), size):
            for answer in self.servicenow.batch(requests[start:start + size]):
                for target in by_request.get(answer.id, []):
                    self._done(target, answer, state, summary)
            state.save()

    def _done(self, target: tuple, answer, state: DepthState, summary: DepthSummary) -> None:
        device_id, cve_id, request, entry, count_as = target
        if request is not None:
            if answer is None or not answer.ok:
                summary.fail(f"CVE {cve_id} of device {device_id}",
                             f"{getattr(answer, 'status_code', '?')}: {getattr(answer, 'error_message', '')}")
                return
            if request.url.endswith(f"/{VIT}"):   # a created item: its sys_id
                entry[_RECORD] = entry[_RECORD] or _result(answer).get("sys_id", "")
        summary.add(count_as)
        self._record(state, device_id, cve_id, entry)


def _result(answer) -> dict:
    body = getattr(answer, "body", None) or {}
    return body.get("result", body) if isinstance(body, dict) else {}
