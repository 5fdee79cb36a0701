"""Identification and Reconciliation (IRE) API of the ServiceNow simulator (the CMDB Instance API, which
reuses its item processing, is in ``servicenow_cmdb_instance``).

Identification of an item (hardware classes), in order: ``sys_object_source`` (source_name + native key),
then ServiceNow's Hardware Rule in its documented priority order: the ``cmdb_serial_number`` lookup, the
``serial_number`` attribute, ``name``, then ``mac_address`` + ``name`` of the ``cmdb_ci_network_adapter``
lookups (an adapter matches when both its MAC and its name are those of the lookup entry; the entry's name
defaults to its MAC). Lookup rows are kept in their own tables linked through
``cmdb_ci``: serial numbers in ``cmdb_serial_number``, MACs in ``cmdb_ci_network_adapter``, IPs in
``cmdb_ci_ip_address``. Every response is HTTP 200; failures are per-item ``errors``.
"""

from __future__ import annotations

import json
from collections import defaultdict

from include.simulators.servicenow_base import SYS_ID, Reply, error, now_str, to_str
from include.simulators.servicenow_core import Simulator
from include.simulators.servicenow_schema import CI_REFERENCE_FIELDS, HARDWARE_RULE_ID

# Related entries (not used for identification): table -> (reference to the CI, field that keys a row per CI;
# None = one row per CI).
RELATED_KEYS = {"cmdb_key_value": ("configuration_item", "key"), "cmdb_ot_entity": ("ot_device", None)}
LOOKUP_KEYS = {"cmdb_serial_number": "serial_number", "cmdb_ci_network_adapter": "mac_address",
               "cmdb_ci_ip_address": "ip_address"}
OPTION_NAMES = ("partial_payloads", "partial_commits", "deduplicate_payloads", "generate_summary")
HW = "cmdb_ci_hardware"


class ItemError(Exception):
    def __init__(self, code: str, message: str, attempt: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.attempt = code, message, attempt


def parse_options(raw: str | None) -> dict[str, bool]:
    opts = {"partial_payloads": True, "partial_commits": True, "deduplicate_payloads": True,
            "generate_summary": False}
    for chunk in (raw or "").split(","):
        if not chunk.strip():
            continue
        name, sep, value = chunk.strip().partition(":")
        if not sep or name not in OPTION_NAMES or value.lower() not in ("true", "false"):
            raise ValueError(f"Chunk [{chunk.strip()}] is not a valid entry")
        opts[name] = value.lower() == "true"
    if opts["partial_payloads"]:
        opts["partial_commits"] = opts["deduplicate_payloads"] = True
    return opts


def data_sources(sim: Simulator) -> set[str]:
    return {r["value"] for r in sim.lookup("sys_choice", "name", "cmdb_ci")
            if r.get("element") == "discovery_source" and r.get("inactive") != "true"}


def handle(sim: Simulator, variant: str, params: dict, body: bytes, headers: dict, user: str) -> Reply:
    enhanced = variant in ("enhanced", "queryEnhanced")
    dry = variant in ("query", "queryEnhanced")
    try:
        opts = parse_options(params.get("options") if enhanced else None)
    except ValueError as exc:
        return error(500, str(exc), str(exc))
    payload, err = sim.parse_json(body, headers)
    if err:
        return err
    if not isinstance(payload, dict) or not isinstance(payload.get("items"), list):
        return error(400, "Exception while reading request", "The payload needs an 'items' array.")
    items = payload["items"]
    with sim.lock:
        source = params.get("sysparm_data_source")
        run = _Run(sim, items, source, user, enhanced, opts)
        if source not in data_sources(sim):
            message = (f"In payload invalid data source [{source if source else 'null'}] exist. You need to provide "
                       "a valid choice value from field [discovery_source] in table [cmdb_ci]")
            results = [run.failed(i, "INVALID_INPUT_DATA", message) for i in range(len(items))]
        elif not opts["partial_commits"]:
            results = run.items(dry=True)
            if not dry and not any(r.get("errors") for r in results):
                results = run.items(dry=False)
            elif any(r.get("errors") for r in results):
                results = [r if r.get("errors") else run.failed(
                    i, "ABANDONED", "Payload processing abandoned: another item has errors and "
                    "partial_commits is false") for i, r in enumerate(results)]
        else:
            results = run.items(dry=dry)
        relations = run.relations(payload.get("relations") or [], results, dry)
        result = {"items": results, "additionalCommittedItems": [], "relations": relations,
                  "additionalCommittedRelations": [],
                  "hasError": any(r.get("errors") for r in results + relations)}
        if enhanced:
            result["hasWarning"] = False
            if opts["generate_summary"]:
                result["summary"] = _summary(results)
        for r in results:
            op = "errors" if r.get("errors") else r["operation"].lower()
            sim.count(f"ire_{op}")
        sim.count("ire_items", len(items))
        return Reply(200, {"result": result}, delay=len(items) * float(sim.faults.ire_item_ms or 0) / 1000)


def _summary(results: list[dict]) -> dict:
    out: dict = defaultdict(lambda: dict.fromkeys(("inserted", "updated", "unchanged", "skipped", "partial",
                                                   "incomplete", "errors", "warnings", "mergedPartialPayloads",
                                                   "additionalInserted"), 0))
    for r in results:
        bucket = out[r.get("className") or "unknown"]
        if r.get("errors"):
            bucket["errors"] += 1
        elif r["operation"] == "INSERT":
            bucket["inserted"] += 1
        elif r["operation"] == "NO_CHANGE":
            bucket["unchanged"] += 1
        else:
            bucket["updated"] += 1
    return dict(out)


class _Run:
    def __init__(self, sim: Simulator, items: list, source: str | None, user: str, enhanced: bool, opts: dict):
        self.sim, self.raw, self.source, self.user, self.enhanced = sim, items, source, user, enhanced
        self.dedup = enhanced and opts["deduplicate_payloads"]

    # ------------------------------------------------------------ results
    def base(self, index: int) -> dict:
        item = self.raw[index] if isinstance(self.raw[index], dict) else {}
        out = {"className": item.get("className", ""), "operation": "NO_CHANGE", "sysId": "Unknown",
               "relatedSysIds": [], "relatedItems": [], "additionalRelatedItems": [],
               "identifierEntrySysId": "Unknown", "identificationAttempts": [], "markers": [],
               "inputIndices": [index], "mergedPayloadIds": [], "errorCount": 0}
        if self.enhanced:
            out.update(warningCount=0, partialSysIds=[])
        return out

    def failed(self, index: int, code: str, message: str, out: dict | None = None) -> dict:
        out = out or self.base(index)
        out.update(operation="NO_CHANGE", sysId="Unknown", identifierEntrySysId="Unknown")
        out.setdefault("errors", []).append({"error": code, "message": message})
        out["errorCount"] = len(out["errors"])
        return out

    def items(self, dry: bool) -> list[dict]:
        dupes = {} if self.dedup else self._duplicates()
        results = []
        for i in range(len(self.raw)):
            out = self.base(i)
            try:
                if i in dupes:
                    raise ItemError("DUPLICATE_PAYLOAD_RECORDS", dupes[i])
                self._process(i, out, dry)
            except ItemError as exc:
                if exc.attempt:
                    out["identificationAttempts"].append(exc.attempt)
                self.failed(i, exc.code, exc.message, out)
            results.append(out)
        return results

    def _ident_key(self, item) -> tuple | None:
        if not isinstance(item, dict) or not isinstance(item.get("values"), dict):
            return None
        src = item.get("sys_object_source_info")
        if isinstance(src, dict) and src.get("source_name") and src.get("source_native_key"):
            return ("source_name,source_native_key", src["source_name"], str(src["source_native_key"]))
        values, lookups = item["values"], [x for x in item.get("lookup") or [] if isinstance(x, dict)]
        serials = sorted(to_str((x.get("values") or {}).get("serial_number")) for x in lookups
                         if x.get("className") == "cmdb_serial_number")
        macs = sorted(to_str((x.get("values") or {}).get("mac_address")).lower() for x in lookups
                      if x.get("className") == "cmdb_ci_network_adapter")
        for name, value in (("serial_number", ",".join(filter(None, serials)) or values.get("serial_number")),
                            ("name", values.get("name")), ("mac_address", ",".join(filter(None, macs)))):
            if value:
                return (name, to_str(value))
        return None

    def _duplicates(self) -> dict[int, str]:
        first: dict[tuple, int] = {}
        out = {}
        for i, item in enumerate(self.raw):
            key = self._ident_key(item)
            if key is None:
                continue
            full = (item.get("className"), *key)
            if full in first:
                j = first[full]
                message = (f"Found duplicate items in the payload (index {j} and {i}), using className "
                           f"[{item.get('className')}] and fields [{key[0]}]. Remove the duplicate items.")
                out[j] = out.get(j, message)
                out[i] = message
            else:
                first[full] = i
        return out

    # ---------------------------------------------------------- validation
    def _validate_related(self, index: int, item: dict, cls: str) -> list:
        raw = item.get("related") or []
        allowed = self.sim.config.related_rule_classes
        has_rule = allowed is None or any(a in allowed for a in self.sim.ancestors(cls))
        if not isinstance(raw, list):
            raise ItemError("INVALID_INPUT_DATA", f"In payload item [{index}] 'related' must be an array")
        related, seen = [], set()
        for rel in raw:
            rcls = rel.get("className") if isinstance(rel, dict) else None
            if rcls not in RELATED_KEYS or not has_rule:
                raise ItemError("IDENTIFICATION_RULE_FOR_RELATED_ITEM_MISSING",
                                f"Identification rule for related table [{rcls}] is missing for item [{index}]")
            rvalues = rel.get("values")
            rvalues = {k: to_str(v) for k, v in rvalues.items()} if isinstance(rvalues, dict) else {}
            key_field = RELATED_KEYS[rcls][1]
            if key_field and not rvalues.get(key_field):
                raise ItemError("MISSING_MATCHING_ATTRIBUTES",
                                f"In payload missing minimum set of input values for criterion (matching) attributes "
                                f"from identify rule for table [{rcls}]. Add these input values in payload item "
                                f"'{json.dumps(rvalues)}' ({key_field})")
            ident = (rcls, rvalues.get(key_field) if key_field else None)
            if ident in seen:
                raise ItemError("DUPLICATE_RELATED_PAYLOAD",
                                f"Found duplicate related items for [{rcls}] in item [{index}]")
            seen.add(ident)
            related.append((rcls, rvalues))
        return related

    def _related(self, ci: str, related: list, dry: bool) -> bool:
        """Insert or update the related entries of ``ci``; True when anything differs."""
        sim, changed = self.sim, False
        for table, values in related:
            ref, key_field = RELATED_KEYS[table]
            rows = sim.lookup(table, ref, ci)
            row = next((r for r in rows if not key_field or r.get(key_field) == values[key_field]), None)
            if row is None:
                changed = True
                if not dry:
                    sim.insert(table, {ref: ci, **values}, user=self.user)
                continue
            diff = {k: v for k, v in values.items() if row.get(k, "") != v}
            if diff:
                changed = True
                if not dry:
                    sim.update(row["sys_id"], diff, user=self.user)
        return changed

    def _validate(self, index: int, item) -> tuple[str, dict, list, dict | None]:
        sim = self.sim
        if not isinstance(item, dict):
            raise ItemError("INVALID_INPUT_DATA", f"In payload item [{index}] is not a JSON object")
        cls = item.get("className")
        if not cls:
            raise ItemError("NO_CLASS_NAME_FOR_INDEPENDENT_CI",
                            f"In payload no className specified for independent item [{index}]")
        if not isinstance(cls, str) or not sim.has_table(cls) or "cmdb_ci" not in sim.ancestors(cls):
            raise ItemError("INVALID_INPUT_DATA", f"In payload invalid className [{cls}] exist. You need to provide "
                            "a valid class name that extends [cmdb_ci]")
        if HW not in sim.ancestors(cls):
            raise ItemError("IDENTIFICATION_RULE_MISSING",
                            f"Identification rule missing for table [{cls}] and its parent tables")
        values = item.get("values")
        if not isinstance(values, dict):
            raise ItemError("INVALID_INPUT_DATA", f"In payload item [{index}] 'values' must be a JSON object")
        values = {k: to_str(v) for k, v in values.items() if not k.startswith("sys_")}
        for name in CI_REFERENCE_FIELDS & values.keys():
            if values[name] and not SYS_ID.match(values[name]):
                raise ItemError("INVALID_INPUT_DATA", f"In payload invalid sys_id [{values[name]}] for reference "
                                f"field [{name}] in item [{index}]. Reference values must be sys_ids")
        lookups, seen = [], set()
        raw_lookups = item.get("lookup") or []
        if not isinstance(raw_lookups, list):
            raise ItemError("INVALID_INPUT_DATA", f"In payload item [{index}] 'lookup' must be an array")
        for sub, lk in enumerate(raw_lookups):
            lcls = lk.get("className") if isinstance(lk, dict) else None
            if lcls not in LOOKUP_KEYS or lcls not in self.sim.config.lookup_rule_tables:
                raise ItemError("IDENTIFICATION_RULE_FOR_LOOKUP_MISSING",
                                f"Identification rule for lookup table [{lcls}] is missing for item [{index}]")
            lvalues = lk.get("values")
            lvalues = {k: to_str(v) for k, v in lvalues.items()} if isinstance(lvalues, dict) else {}
            key = LOOKUP_KEYS[lcls]
            if not lvalues.get(key):
                raise ItemError("MISSING_MATCHING_ATTRIBUTES",
                                "In payload missing minimum set of input values for criterion (matching) attributes "
                                f"from identify rule for table [{lcls}]. Add these input values in payload item "
                                f"'{json.dumps(lvalues)}' ({key})")
            ident = (lcls, lvalues[key].lower())
            if ident in seen:
                raise ItemError("DUPLICATE_LOOKUP_PAYLOAD",
                                f"Found duplicate lookup items for [{lcls}] with [{key}={lvalues[key]}] in item [{index}]")
            seen.add(ident)
            lookups.append((sub, lcls, lvalues))
        src = item.get("sys_object_source_info")
        if src is not None:
            if not (isinstance(src, dict) and src.get("source_name") and src.get("source_native_key")):
                raise ItemError("INVALID_INPUT_DATA", f"In payload item [{index}] sys_object_source_info needs "
                                "source_name and source_native_key")
            src = {k: to_str(v) for k, v in src.items()}
        return cls, values, lookups, src

    # ------------------------------------------------------ identification
    def _attempt(self, result: str, attrs: list[str], table: str) -> dict:
        return {"identifierName": "Hardware Rule", "attemptResult": result, "attributes": attrs,
                "searchOnTable": table, "hybridEntryCiAttributes": []}

    def _hardware(self, ids) -> set[str]:
        hw = self.sim.subclasses(HW)
        return {i for i in ids if self.sim.where.get(i) in hw}

    def _identify(self, values: dict, lookups: list, src: dict | None, attempts: list) -> str | None:
        sim = self.sim
        if src:
            rows = [r for r in sim.lookup("sys_object_source", "id", src["source_native_key"])
                    if r.get("name") == src["source_name"] and sim.get(r.get("target_sys_id", ""))]
            if self.enhanced:
                attempts.append({"info": f"sys_object_source {'MATCHED' if rows else 'NO_MATCH'}",
                                 "identifierName": "", "attemptResult": "MATCHED" if rows else "NO_MATCH",
                                 "attributes": [], "searchOnTable": "sys_object_source",
                                 "hybridEntryCiAttributes": []})
            if rows:
                return rows[0]["target_sys_id"]
        serials = [v for _, c, v in lookups if c == "cmdb_serial_number"]
        adapters = [(v["mac_address"].lower(), (v.get("name") or v["mac_address"]).lower())
                    for _, c, v in lookups if c == "cmdb_ci_network_adapter"]
        macs = [mac for mac, _ in adapters]
        if not (serials or values.get("serial_number") or macs or values.get("name")):
            raise ItemError("MISSING_MATCHING_ATTRIBUTES",
                            "In payload missing minimum set of input values for criterion (matching) attributes from "
                            f"identify rule for table [{HW}]. Add these input values in payload item "
                            f"'{json.dumps(values)}' (serial_number, mac_address or name)")
        steps = [
            (["serial_number", "serial_number_type"], "cmdb_serial_number",
             lambda: {r.get("cmdb_ci") for s in serials for r in sim.lookup("cmdb_serial_number", "serial_number",
                                                                             s["serial_number"])} if serials else None),
            (["serial_number"], HW, lambda: {r["sys_id"] for r in sim.lookup(HW, "serial_number", values["serial_number"])}
             if values.get("serial_number") else None),
            (["name"], HW, lambda: {r["sys_id"] for r in sim.lookup(HW, "name", values["name"])}
             if values.get("name") else None),
            (["mac_address", "name"], "cmdb_ci_network_adapter",
             lambda: {r.get("cmdb_ci") for mac, name in adapters
                      for r in sim.lookup("cmdb_ci_network_adapter", "mac_address", mac)
                      if (r.get("name") or mac).lower() == name} if adapters else None),
        ]
        for attrs, table, search in steps:
            found = search()
            if found is None:
                attempts.append(self._attempt("SKIPPED", attrs, table))
                continue
            found = self._hardware(found)
            if len(found) > 1:
                raise ItemError("MULTI_MATCH", f"Identification found multiple matching CIs {sorted(found)} in "
                                f"table [{table}] using attributes [{','.join(attrs)}]",
                                self._attempt("MULTI_MATCH", attrs, table))
            if found:
                attempts.append(self._attempt("MATCHED", attrs, table))
                return found.pop()
            attempts.append(self._attempt("NO_MATCH", attrs, table))
        return None

    # ------------------------------------------------------------- commit
    def _process(self, index: int, out: dict, dry: bool) -> None:
        sim, now, ds = self.sim, now_str(), self.source
        item = self.raw[index]
        cls, values, lookups, src = self._validate(index, item)
        related = self._validate_related(index, item, cls)
        out["identifierEntrySysId"] = HARDWARE_RULE_ID
        match = self._identify(values, lookups, src, out["identificationAttempts"])
        out["relatedItems"] = [{"markers": [], "inputIndices": [{"mainIndex": index, "subIndex": sub}],
                                "mergedPayloadIds": [], "className": lcls} for sub, lcls, _ in lookups]
        explicit_ld = values.pop("last_discovered", "")
        values.pop("first_discovered", None)
        if match is None:
            if not values.get("name") and not values.get("serial_number"):
                macs = [v["mac_address"] for _, c, v in lookups if c == "cmdb_ci_network_adapter"]
                if macs:
                    values["name"] = macs[0]
            out["operation"] = "INSERT"
            if dry:
                out["relatedSysIds"] = [None] * len(lookups)
                return
            rec = sim.insert(cls, {**values, "discovery_source": ds, "first_discovered": now,
                                   "last_discovered": explicit_ld or now}, user=self.user)
            sys_id, changed = rec["sys_id"], True
        else:
            sys_id = match
            rec = sim.get(sys_id)
            current = sim.where[sys_id]
            op = "UPDATE"
            settings = item.get("settings") if isinstance(item.get("settings"), dict) else {}
            if cls != current:
                if cls in sim.descendants(current):
                    op = "UPDATE" if settings.get("updateWithoutUpgrade") else "UPDATE_WITH_UPGRADE"
                elif current in sim.descendants(cls):
                    op = "UPDATE" if settings.get("updateWithoutDowngrade") else "UPDATE_WITH_DOWNGRADE"
                else:
                    op = "UPDATE" if settings.get("updateWithoutSwitch") else "UPDATE_WITH_SWITCH"
            diff = {k: v for k, v in values.items() if rec.get(k, "") != v}
            lookup_changes = self._lookups(sys_id, lookups, dry=True, now=now)
            related_changed = self._related(sys_id, related, dry=True)
            changed = bool(diff or lookup_changes[1] or related_changed or op != "UPDATE")
            out["operation"] = op if changed else "NO_CHANGE"
            out["sysId"] = sys_id
            if dry:
                out["relatedSysIds"] = lookup_changes[0]
                return
            if op != "UPDATE":
                sim.reclassify(sys_id, cls)
            ld = explicit_ld if explicit_ld > rec.get("last_discovered", "") else now
            sim.update(sys_id, {**diff, "last_discovered": ld, "discovery_source": ds}, user=self.user)
        out["sysId"] = sys_id
        out["relatedSysIds"] = self._lookups(sys_id, lookups, dry=False, now=now)[0]
        self._related(sys_id, related, dry=False)
        if src:
            self._source_row(src, sys_id, sim.where[sys_id], now)

    def _lookups(self, ci: str, lookups: list, dry: bool, now: str) -> tuple[list, bool]:
        sim, ids, changed = self.sim, [], False
        existing = defaultdict(dict)
        for table in LOOKUP_KEYS:
            for row in sim.lookup(table, "cmdb_ci", ci):
                existing[table][row.get(LOOKUP_KEYS[table], "").lower()] = row
        for _, table, values in lookups:
            key = LOOKUP_KEYS[table]
            row = existing[table].get(values[key].lower())
            if row is None:
                changed = True
                if dry:
                    ids.append(None)
                    continue
                extra = {"cmdb_ci": ci}
                if table == "cmdb_ci_network_adapter":
                    extra.update(name=values.get("name") or values[key], discovery_source=self.source,
                                 first_discovered=now, last_discovered=now, install_status="1")
                elif table == "cmdb_ci_ip_address":
                    extra.update(name=values[key], ip_version="6" if ":" in values[key] else "4",
                                 discovery_source=self.source, first_discovered=now, last_discovered=now)
                    nic = next((r for r in existing["cmdb_ci_network_adapter"].values()
                                if r.get("mac_address", "").lower() == values.get("mac_address", "").lower()), None)
                    if nic:
                        extra["nic"] = nic["sys_id"]
                elif table == "cmdb_serial_number":
                    extra.update(valid="true", absent="false")
                row = sim.insert(table, {**extra, **values}, user=self.user)
            else:
                diff = {k: v for k, v in values.items() if row.get(k, "") != v}
                if diff:
                    changed = True
                    if not dry:
                        sim.update(row["sys_id"], diff, user=self.user)
            ids.append(row["sys_id"])
        return ids, changed

    def _source_row(self, src: dict, sys_id: str, table: str, now: str) -> None:
        sim = self.sim
        rows = [r for r in sim.lookup("sys_object_source", "id", src["source_native_key"])
                if r.get("name") == src["source_name"]]
        values = {"target_sys_id": sys_id, "target_table": table, "last_scan": now,
                  **{k: src[k] for k in ("source_feed", "source_recency_timestamp") if src.get(k)}}
        if rows:
            if any(rows[0].get(k, "") != v for k, v in values.items()):
                sim.update(rows[0]["sys_id"], values, user=self.user)
        else:
            sim.insert("sys_object_source", {"name": src["source_name"], "id": src["source_native_key"], **values},
                       user=self.user)

    # ----------------------------------------------------------- relations
    def relations(self, raw: list, results: list[dict], dry: bool) -> list[dict]:
        sim, out = self.sim, []
        by_internal = {it.get("internal_id"): i for i, it in enumerate(self.raw)
                       if isinstance(it, dict) and it.get("internal_id") is not None}
        types = {r["name"]: r["sys_id"] for r in sim.table("cmdb_rel_type")}
        for n, rel in enumerate(raw if isinstance(raw, list) else []):
            res = {"className": "cmdb_rel_ci", "operation": "NO_CHANGE", "markers": [], "inputIndices": [n],
                   "mergedPayloadIds": [], "errorCount": 0}
            rel = rel if isinstance(rel, dict) else {}
            ends = [rel.get(k) if k in rel else by_internal.get(rel.get(f"{k}_id"), -1) for k in ("parent", "child")]
            problem = None
            if not all(isinstance(e, int) and 0 <= e < len(results) for e in ends):
                problem = f"In payload invalid relation index {ends} for relation [{n}]"
            elif rel.get("type") not in types:
                problem = (f"No such relationship with name [{rel.get('type')}] exist in table [cmdb_rel_type]. "
                           "Provide a valid relationship type")
            elif any(results[e].get("errors") for e in ends):
                res.setdefault("errors", []).append({"error": "ABANDONED",
                                                     "message": "Relation skipped: one of its items has errors"})
            if problem:
                res.setdefault("errors", []).append({"error": "INVALID_INPUT_DATA", "message": problem})
            if res.get("errors"):
                res["errorCount"] = len(res["errors"])
                out.append(res)
                continue
            parent, child = (results[e]["sysId"] for e in ends)
            type_id = types[rel["type"]]
            exists = any(r.get("child") == child and r.get("type") == type_id
                         for r in sim.lookup("cmdb_rel_ci", "parent", parent)) if parent != "Unknown" else False
            if not exists:
                res["operation"] = "INSERT"
                if not dry:
                    sim.insert("cmdb_rel_ci", {"parent": parent, "child": child, "type": type_id}, user=self.user)
            out.append(res)
        return out
