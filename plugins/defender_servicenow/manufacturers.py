"""Vendor names -> ``core_company`` sys_ids for the device sync (moved from :mod:`.sync`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from defender_servicenow.exceptions import (
    ServiceNowError,
    ServiceNowForbiddenError,
    ServiceNowInvalidTableError,
)
from defender_servicenow.hooks.servicenow_wire import BatchRequest

log = logging.getLogger("defender_servicenow.sync")


class ManufacturerResolver:
    """Vendor name -> ``core_company`` sys_id (the IRE takes references as sys_ids only).

    Looks names up in bulk, creates the missing companies (``manufacturer=true``) unless ``create`` is
    false (dry run), and caches the answers for the run.
    """

    def __init__(self, servicenow, *, create: bool = True, chunk: int = 50):
        self.servicenow, self.create, self.chunk = servicenow, create, chunk
        self.cache: dict[str, str | None] = {}
        self.created = 0
        self.unavailable = False   # core_company cannot be read or written: devices go without manufacturer

    def resolve(self, names: Iterable[str]) -> dict[str, str | None]:
        missing = sorted({n for n in names if n and n not in self.cache})
        if self.unavailable:
            self.cache.update(dict.fromkeys(missing))
            return self.cache
        try:
            self._resolve(missing)
        except (ServiceNowForbiddenError, ServiceNowInvalidTableError) as exc:
            self.unavailable = True
            self.cache.update({n: self.cache.get(n) for n in missing})
            log.warning("ServiceNow refused the table core_company (HTTP %s: %s): devices are synced without "
                        "their manufacturer this run. Give the integration user read and create access to "
                        "core_company to sync manufacturers.", exc.status, exc)
        return self.cache

    def _resolve(self, missing: list[str]) -> None:
        for part in self._parts(missing):
            query = "^OR".join("name=" + n.replace("^", "^^") for n in part)
            found: dict[str, str] = {}
            for row in self.servicenow.query("core_company", query, fields=["sys_id", "name"]):
                found.setdefault(str(row.get("name", "")).lower(), row["sys_id"])
            absent = [n for n in part if n.lower() not in found]
            if absent and self.create:   # one Batch API call creates the chunk's missing companies
                found.update((n.lower(), sys_id) for n, sys_id in self._create(absent).items())
            for name in part:
                self.cache[name] = found.get(name.lower())

    def _create(self, names: list[str]) -> dict[str, str]:
        """Create ``names`` in ``core_company`` (``manufacturer=true``) through the Batch API; name -> sys_id.
        A refused create (403 ACL, 400 invalid table) makes the table unavailable for the run; any other
        failed item fails the sync, naming the company and what ServiceNow answered."""
        answers = self.servicenow.batch([
            BatchRequest(id=str(i), method="POST", url="/api/now/table/core_company?sysparm_fields=sys_id,name",
                         body={"name": name, "manufacturer": "true"}) for i, name in enumerate(names)])
        out = {}
        for name, answer in zip(names, answers, strict=True):
            sys_id = ((answer.body or {}).get("result") or {}).get("sys_id") if answer.ok else None
            if sys_id:
                out[name] = sys_id
                self.created += 1
                log.info("Created the manufacturer %r in core_company (%s)", name, sys_id)
                continue
            message = (f"Creating the manufacturer {name!r} in core_company failed: HTTP {answer.status_code}: "
                       f"{answer.error_message}")
            if answer.status_code == 403:
                raise ServiceNowForbiddenError(message, status=403, answer=answer.error_message)
            if answer.status_code == 400 and "Invalid table" in str(answer.error_message):
                raise ServiceNowInvalidTableError(message, status=400, answer=answer.error_message)
            raise ServiceNowError(message + ". Run the sync again; if it persists, create the company by hand",
                                  status=answer.status_code, answer=answer.error_message)
        return out

    def _parts(self, names: list[str], max_chars: int = 3000) -> Iterable[list[str]]:
        """Chunks of at most ``chunk`` names whose encoded query stays short (URL limits: 414)."""
        part: list[str] = []
        size = 0
        for name in names:
            cost = len(name.encode("utf-8")) * 3 + 8   # worst case once percent-encoded, plus "^ORname="
            if part and (len(part) >= self.chunk or size + cost > max_chars):
                yield part
                part, size = [], 0
            part.append(name)
            size += cost
        if part:
            yield part

    def apply(self, items: list[dict]) -> list[dict]:
        """The items with each ``manufacturer`` name replaced by its sys_id (dropped when unknown in a dry
        run). New dicts: the caller's items keep the vendor name (a resent item is resolved again)."""
        cache = self.resolve(i["values"].get("manufacturer") for i in items)
        out = []
        for item in items:
            name = item["values"].get("manufacturer")
            if name is not None:
                values = {k: v for k, v in item["values"].items() if k != "manufacturer"}
                if cache.get(name):
                    values["manufacturer"] = cache[name]
                item = {**item, "values": values}
            out.append(item)
        return out
