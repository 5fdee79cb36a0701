"""CMDB Instance API of the ServiceNow simulator (``/api/now/cmdb/instance/<class>[/<sys_id>]``): list, read,
create and update CIs of a ``cmdb_ci`` class. A create goes through the same identification and
reconciliation as one IRE item (:mod:`include.simulators.servicenow_ire`); a read returns the CI's
attributes with its outbound and inbound relations.
"""

from __future__ import annotations

from include.simulators.servicenow_base import Reply, error
from include.simulators.servicenow_core import Simulator
from include.simulators.servicenow_ire import _Run, data_sources, parse_options


def cmdb_instance(sim: Simulator, method: str, cls: str, sys_id: str | None, params: dict, body: bytes,
                  headers: dict, user: str, base: str) -> Reply:
    if not sim.has_table(cls) or "cmdb_ci" not in sim.ancestors(cls):
        return error(400, f"Invalid table {cls}")
    with sim.lock:
        if method == "GET" and not sys_id:
            rows = sim.select(cls, params.get("sysparm_query", ""))
            offset, limit = int(params.get("sysparm_offset", 0)), int(params.get("sysparm_limit", 10000))
            return Reply(200, {"result": [{"sys_id": r["sys_id"], "name": r.get("name", "")}
                                          for r in rows[offset:offset + limit]]})
        if sys_id and sim.get(sys_id, cls) is None:
            return error(404, "No Record found", "Record doesn't exist or ACL restricts the record retrieval")
        if method == "GET":
            return Reply(200, {"result": _instance(sim, cls, sys_id, base)})
        if method not in ("POST", "PUT", "PATCH") or (method == "POST") == bool(sys_id):
            return error(405, "Method not Supported", f"HTTP method {method} is not supported by this resource")
        payload, err = sim.parse_json(body, headers)
        if err:
            return err
        if not isinstance(payload, dict) or not isinstance(payload.get("attributes"), dict):
            return error(400, "Invalid request", "The body needs an 'attributes' object.")
        if payload.get("source") not in data_sources(sim):
            return error(400, "Invalid request",
                         f"Invalid or missing source [{payload.get('source')}]: give a discovery_source choice value")
        if sys_id:
            sim.update(sys_id, payload["attributes"], user=user)
            return Reply(200, {"result": _instance(sim, cls, sys_id, base)})
        item = {"className": cls, "values": payload["attributes"]}
        run = _Run(sim, [item], payload["source"], user, False, parse_options(None))
        res = run.items(dry=False)[0]
        if res.get("errors"):
            return error(400, res["errors"][0]["error"], res["errors"][0]["message"])
        return Reply(200, {"result": _instance(sim, cls, res["sysId"], base)})


def _instance(sim: Simulator, cls: str, sys_id: str, base: str) -> dict:
    rec = sim.get(sys_id)
    rels = [(r, "outbound_relations", r.get("child")) for r in sim.lookup("cmdb_rel_ci", "parent", sys_id)]
    rels += [(r, "inbound_relations", r.get("parent")) for r in sim.lookup("cmdb_rel_ci", "child", sys_id)]
    out = {"attributes": sim.render(sim.where[sys_id], rec, None, "false", False, base),
           "outbound_relations": [], "inbound_relations": []}
    for rel, key, other in rels:
        rtype = sim.get(rel.get("type", ""))
        out[key].append({"sys_id": rel["sys_id"],
                         "type": {"display_value": rtype.get("name", "") if rtype else "",
                                  "link": f"{base}/api/now/table/cmdb_rel_type/{rel.get('type', '')}",
                                  "value": rel.get("type", "")},
                         "target": {"display_value": (sim.get(other) or {}).get("name", ""),
                                    "link": f"{base}/api/now/table/cmdb_ci/{other}", "value": other}})
    return out
