"""The REST APIs of the ServiceNow simulator as plain methods that return a
:class:`~include.simulators.servicenow_base.Reply`: request routing, the Table API (with its record
rendering and paging links), the Batch API and the Import Set API. A mixin of
:class:`~include.simulators.servicenow_core.Simulator` (it uses the instance's store, query and faults);
the IRE API is in ``servicenow_ire``, the CMDB Instance API in ``servicenow_cmdb_instance``."""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from include.simulators import servicenow_query as q
from include.simulators.servicenow_base import Reply, error, new_sys_id, no_resource, to_str
from include.simulators.servicenow_schema import (
    CANCELLED,
    CANCELLED_DETAIL,
    CHOICES,
    JOURNAL_FIELDS,
    JOURNAL_LABELS,
)


def _bool(params: dict, name: str) -> bool:
    return str(params.get(name, "false")).lower() == "true"


class ApiMixin:
    """Routing, rendering and the Table, Batch and Import Set APIs of one simulated instance."""

    # -------------------------------------------------------------- render
    def _display(self, table: str, name: str, raw: str, ref: str | None) -> str:
        if ref:
            target = self.get(raw)
            if target is None:
                return raw
            return (target.get("name") or target.get("number") or target.get("user_name") or raw)
        for t in self.ancestors(table):
            labels = CHOICES.get(t, {}).get(name)
            if labels:
                return labels.get(raw, raw)
        labels = CHOICES["*"].get(name)
        return labels.get(raw, raw) if labels else raw

    def _journal_text(self, sys_id: str, name: str) -> str:
        entries = [r for r in self.lookup("sys_journal_field", "element_id", sys_id) if r["element"] == name]
        return "".join(f"{r['sys_created_on']} - {r['sys_created_by']} ({JOURNAL_LABELS[name]})\n{r['value']}\n\n"
                       for r in reversed(entries))

    def _plan(self, table: str, fields: list[str] | None) -> list[tuple]:
        key = ("plan", table, tuple(fields) if fields else None)
        plan = self._cache.get(key)
        if plan is None:
            names = [f for f in fields if self._valid_field(table, f)] if fields else self.columns(table)
            plan = [(n, "." in n, None if "." in n else self.ref_target(table, n), n in JOURNAL_FIELDS)
                    for n in names]
            self._cache[key] = plan
        return plan

    def render(self, table: str, rec: dict, fields: list[str] | None, dv: str, exclude_links: bool,
               base: str) -> dict:
        """A record as the Table API shows it (strings; references as {link, value}; display values)."""
        out = {}
        get = None
        for name, dotted, ref, journal in self._plan(table, fields):
            owner, leaf = table, name
            if dotted:  # dot-walked: format by the table of the last hop
                get = get or self._getter()
                head, leaf = name.rsplit(".", 1)
                target = self.get(get(rec, head))
                owner = self.where[target["sys_id"]] if target else table
                raw = target.get(leaf, "") if target else ""
                ref = self.ref_target(owner, leaf)
            else:
                raw = rec.get(name, "")
            if journal:
                out[name] = self._journal_text(rec["sys_id"], leaf) if dv == "true" else (
                    {"display_value": self._journal_text(rec["sys_id"], leaf), "value": ""} if dv == "all" else "")
                continue
            link = f"{base}/api/now/table/{ref}/{raw}" if ref and raw and not exclude_links else None
            if dv == "false":
                out[name] = {"link": link, "value": raw} if link else raw
                continue
            disp = self._display(owner, leaf, raw, ref)
            if dv == "true":
                out[name] = {"display_value": disp, "link": link} if link else disp
            else:
                out[name] = {"display_value": disp, "value": raw, **({"link": link} if link else {})}
        return out

    # ------------------------------------------------------------ dispatch
    def dispatch(self, method: str, path: str, params: list[tuple[str, str]], body: bytes, headers: dict,
                 user: str, base: str) -> Reply:
        """Route one authenticated /api/now request (also used for Batch API items)."""
        from include.simulators import servicenow_cmdb_instance as cmdb_instance
        from include.simulators import servicenow_ire as ire

        method = headers.get("x-http-method-override", method).upper()
        m = re.match(r"^/api/now(?:/(v1|v2))?/table/([^/]+)(?:/([^/]+))?/?$", path)
        if m:
            return self.table_api(method, m.group(1), m.group(2), m.group(3), params, body, headers, user, base)
        m = re.match(r"^/api/now(?:/v1)?/identifyreconcile(?:/(enhanced|query|queryEnhanced))?/?$", path)
        if m:
            if method != "POST":
                return error(405, "Method not Supported", f"HTTP method {method} is not supported by this resource")
            return ire.handle(self, m.group(1) or "", dict(params), body, headers, user)
        m = re.match(r"^/api/now(?:/v1)?/import/([^/]+)(?:/([^/]+))?/?$", path)
        if m:
            return self.import_api(method, m.group(1), m.group(2), body, headers, user, base)
        m = re.match(r"^/api/now(?:/v1)?/cmdb/instance/([^/]+)(?:/([^/]+))?/?$", path)
        if m:
            return cmdb_instance.cmdb_instance(self, method, m.group(1), m.group(2), dict(params), body, headers, user, base)
        return no_resource()

    @staticmethod
    def parse_json(body: bytes, headers: dict) -> tuple[Any, Reply | None]:
        ctype = headers.get("content-type", "")
        if not ctype.lower().startswith("application/json"):
            return None, error(415, "Unsupported Media Type",
                               f"Content-Type '{ctype or 'none'}' is not supported; send application/json")
        try:
            return json.loads(body or b"null"), None
        except (ValueError, UnicodeDecodeError):
            return None, error(400, "Exception while reading request", "The payload is not valid JSON.")

    @classmethod
    def _json_object(cls, body: bytes, headers: dict) -> tuple[dict | None, Reply | None]:
        """A Table API write's JSON object (the first item when a list is sent), or the error reply."""
        values, err = cls.parse_json(body, headers)
        if err:
            return None, err
        values = values[0] if isinstance(values, list) and values else values
        if not isinstance(values, dict):
            return None, error(400, "Exception while reading request", "The payload must be a JSON object.")
        return values, None

    def write_denied(self, table: str, op: str) -> Reply | None:
        deny = self.faults.deny_writes
        if "*" in deny or table in deny:
            return error(403, "Operation Failed", f"ACL Exception {op} Failed due to security constraints")
        return None

    def _data_policy(self, table: str, rec: dict) -> Reply | None:
        if (self.config.enforce_data_policy and table == "incident" and rec.get("state") in ("6", "7")):
            missing = [label for f, label in (("close_code", "Resolution code"), ("close_notes", "Resolution notes"))
                       if not rec.get(f)]
            if missing:
                return error(403, "Operation Failed",
                             "Data Policy Exception: \n\tThe following fields are mandatory: " + ", ".join(missing))
        return None

    # ------------------------------------------------------------ Table API
    def table_api(self, method: str, version: str | None, table: str, sys_id: str | None,
                  params: list[tuple[str, str]], body: bytes, headers: dict, user: str, base: str) -> Reply:
        if table not in self.data:
            return error(400, f"Invalid table {table}")
        p = dict(params)
        dv = str(p.get("sysparm_display_value", "false")).lower()
        dv = dv if dv in ("true", "false", "all") else "false"
        excl = _bool(p, "sysparm_exclude_reference_link")
        fields = [f.strip() for f in p.get("sysparm_fields", "").split(",") if f.strip()] or None
        not_found = error(404, "No Record found", "Record doesn't exist or ACL restricts the record retrieval")
        with self.lock:
            if method in ("GET", "HEAD") and not sys_id:
                if table in self.faults.deny_reads:
                    return error(403, "Insufficient rights to query records",
                                 "Field(s) present in the query do not have permission to be read")
                return self._list(version, table, params, fields, dv, excl, base)
            if method == "POST" and not sys_id:
                values, err = self._json_object(body, headers)
                if err:
                    return err
                denied = self.write_denied(table, "Insert")
                if denied:
                    return denied
                policy = self._data_policy(table, {k: to_str(v) for k, v in values.items()})
                if policy:
                    return policy
                rec = self.insert(table, values, user=user)
                return self._record_reply(201, table, rec, fields, dv, excl, base, headers,
                                          {"Location": f"{base}/api/now/table/{table}/{rec['sys_id']}"})
            if not sys_id:
                return error(405, "Method not Supported", f"HTTP method {method} is not supported for a table")
            rec = self.get(sys_id, table)
            if rec is None:
                return not_found
            if method in ("GET", "HEAD"):
                return self._record_reply(200, table, rec, fields, dv, excl, base, headers)
            if method in ("PUT", "PATCH"):
                values, err = self._json_object(body, headers)
                if err:
                    return err
                denied = self.write_denied(self.where[sys_id], "Update")
                if denied:
                    return denied
                merged = {**rec, **{k: to_str(v) for k, v in values.items()}}
                policy = self._data_policy(self.where[sys_id], merged)
                if policy:
                    return policy
                rec = self.update(sys_id, values, user=user)
                return self._record_reply(200, table, rec, fields, dv, excl, base, headers)
            if method == "DELETE":
                denied = self.write_denied(self.where[sys_id], "Delete")
                if denied:
                    return denied
                self.delete(sys_id)
                return Reply(204, None, content_type="")
            return error(405, "Method not Supported", f"HTTP method {method} is not supported")

    def _record_reply(self, status, table, rec, fields, dv, excl, base, headers, extra=None) -> Reply:
        if headers.get("x-no-response-body", "").lower() == "true":
            return Reply(status, None, extra or {})
        return Reply(status, {"result": self.render(table, rec, fields, dv, excl, base)}, extra or {})

    def _list(self, version, table, params, fields, dv, excl, base) -> Reply:
        p = dict(params)
        query = p.get("sysparm_query")
        if not query:  # name=value pairs are the alternative to sysparm_query
            query = "^".join(f"{k}={v}" for k, v in params if not k.startswith("sysparm_"))
        try:
            limit = int(p.get("sysparm_limit", 10000))
            offset = max(int(p.get("sysparm_offset", 0)), 0)
        except ValueError:
            return error(400, "Invalid query parameter", "sysparm_limit and sysparm_offset must be integers")
        limit = limit if limit > 0 else 10000
        try:
            rows = self.select(table, query)
        except q.QueryError as exc:
            return error(400, "Invalid query", str(exc))
        total = len(rows)
        page = rows[offset:offset + limit]
        if version == "v1" and not page:
            return error(404, "No Record found", "Records matching query not found")
        headers = {"X-Total-Count": str(total)}
        if total > limit and not _bool(p, "sysparm_suppress_pagination_header"):
            headers["Link"] = self._links(base, table, version, params, limit, offset, total,
                                          "sysparm_offset" in p)
        result = [self.render(table, r, fields, dv, excl, base) for r in page]
        if self.faults.truncate_next > 0:
            self.faults.truncate_next -= 1
            self.count("truncated")
            return Reply(200, _truncated(result), headers)
        return Reply(200, {"result": result}, headers)

    @staticmethod
    def _links(base, table, version, params, limit, offset, total, offset_given) -> str:
        others = [(k, v) for k, v in params if k not in ("sysparm_limit", "sysparm_offset")]
        path = f"{base}/api/now/{version + '/' if version else ''}table/{table}"

        def url(off: int) -> str:
            return f"{path}?{urlencode(others + [('sysparm_limit', limit), ('sysparm_offset', off)])}"
        links = [(url(0), "first")]
        if offset > 0 or not offset_given:
            links.append((url(max(offset - limit, 0) if offset > 0 else -1), "prev"))
        if offset + limit < total:
            links.append((url(offset + limit), "next"))
        links.append((url((total - 1) // limit * limit), "last"))
        return ",".join(f'<{u}>;rel="{rel}"' for u, rel in links)

    # ------------------------------------------------------------ Batch API
    def batch(self, body: bytes, headers: dict, user: str, base: str) -> Reply:
        payload, err = self.parse_json(body, headers)
        if err:
            return err
        if not isinstance(payload, dict) or not isinstance(payload.get("rest_requests"), list):
            return error(400, "Exception while reading request", "The batch needs a 'rest_requests' array.")
        out = {"batch_request_id": to_str(payload.get("batch_request_id")), "serviced_requests": [],
               "unserviced_requests": []}
        delay = 0.0
        limit = self.config.batch_max_items
        for pos, item in enumerate(payload["rest_requests"]):
            item = item if isinstance(item, dict) else {}
            if limit is not None and pos >= limit:
                out["unserviced_requests"].append(to_str(item.get("id")))
                continue
            started = time.perf_counter()
            reply = self._batch_item(item, user, base)
            delay += reply.delay
            self.count("batch_items")
            self._counters["by_route"][f"batch {item.get('method', '?')} {_route_label(str(item.get('url', '')))}"] += 1
            hdrs = [] if item.get("exclude_response_headers") else [
                {"name": k, "value": v} for k, v in {"Content-Type": reply.content_type, **reply.headers}.items() if v]
            served = {"id": to_str(item.get("id")), "body": base64.b64encode(reply.content()).decode(),
                      "status_code": reply.status, "status_text": HTTPStatus(reply.status).phrase,
                      "headers": hdrs, "execution_time": int((time.perf_counter() - started) * 1000 + reply.delay * 1000)}
            if reply.status >= 400 and isinstance(reply.body, dict) and "error" in reply.body:
                served["error_message"] = reply.body["error"].get("message")
            out["serviced_requests"].append(served)
        return Reply(200, out, delay=delay)

    def _batch_item(self, item: dict, user: str, base: str) -> Reply:
        if not all(item.get(k) for k in ("id", "method", "url")):
            return error(400, "Exception while reading request", "Each rest_request needs id, method and url.")
        parts = urlsplit(str(item["url"]))
        if "/batch" in parts.path:
            return no_resource()
        hdrs = {str(h.get("name", "")).lower(): str(h.get("value", "")) for h in item.get("headers") or []
                if isinstance(h, dict)}
        hdrs.setdefault("content-type", "application/json")
        raw = b""
        if item.get("body"):
            try:
                raw = base64.b64decode(item["body"], validate=True)
            except (binascii.Error, ValueError):
                return error(400, "Exception while reading request", "The item body is not valid base64.")
        return self.dispatch(str(item["method"]).upper(), parts.path, parse_qsl(parts.query, keep_blank_values=True),
                             raw, hdrs, user, base)

    # ------------------------------------------------------- Import Set API
    def import_api(self, method, staging, extra, body, headers, user, base) -> Reply:
        spec = self.config.import_sets.get(staging)
        if spec is None:
            return error(400, f"Invalid table {staging}")
        if method != "POST" or (extra and extra != "insertMultiple"):
            return error(405, "Method not Supported", f"HTTP method {method} is not supported by this resource")
        payload, err = self.parse_json(body, headers)
        if err:
            return err
        rows = payload.get("records") if extra and isinstance(payload, dict) else [payload]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return error(400, "Exception while reading request", "Send a JSON object (or {'records': [...]}).")
        with self.lock:
            self._import_sets += 1
            iset = f"ISET{10000 + self._import_sets:07d}"
            results = [self._import_row(spec, staging, row, iset, user, base) for row in rows]
        if extra:
            return Reply(201, {"import_set_id": new_sys_id(), "multi_import_set_id": new_sys_id()})
        return Reply(201, {"import_set": iset, "staging_table": staging, "result": results})

    def _import_row(self, spec, staging, row, iset, user, base) -> dict:
        target, key = spec["target"], spec.get("coalesce")
        values = {k: to_str(v) for k, v in row.items()}  # the import set API stringifies everything
        res = {"transform_map": f"{staging} to {target}", "table": target}
        if self.faults.import_error_next > 0:
            self.faults.import_error_next -= 1
            return {**res, "status": "error", "error_message": "Target record not found",
                    "sys_id": self.insert("sys_import_set_row", {"sys_import_set": iset})["sys_id"]}
        existing = self.lookup(target, key, values[key]) if key and values.get(key) else []
        merged = {**(existing[0] if existing else {}), **values}
        problem = self.write_denied(target, "Update" if existing else "Insert") or self._data_policy(target, merged)
        if problem:
            return {**res, "status": "error", "error_message": problem.body["error"]["detail"],
                    "sys_id": self.insert("sys_import_set_row", {"sys_import_set": iset})["sys_id"]}
        rec = self.update(existing[0]["sys_id"], values, user=user) if existing else self.insert(target, values, user=user)
        display = "number" if rec.get("number") else "sys_id"
        return {**res, "display_name": display, "display_value": rec[display],
                "record_link": f"{base}/api/now/table/{target}/{rec['sys_id']}",
                "status": "updated" if existing else "inserted", "sys_id": rec["sys_id"]}


def _truncated(result: list[dict]) -> str:
    """A Table API body cut off by the transaction quota: part of the result, then the error, invalid JSON."""
    head = ",".join(json.dumps(r, separators=(",", ":")) for r in result[: len(result) // 2])
    tail = json.dumps({"message": CANCELLED, "detail": CANCELLED_DETAIL}, separators=(",", ":"))
    return '{"result":[' + head + ',],"error":' + tail + ',"status":"failure"}'


def _route_label(path: str) -> str:
    path = urlsplit(path).path
    path = re.sub(r"/[0-9a-f]{32}(?=/|$)", "/{sys_id}", path)
    return path
