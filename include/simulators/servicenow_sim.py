"""ServiceNow simulator (FastAPI): OAuth token endpoint, Table API, Batch API, IRE, Import Set and CMDB
Instance APIs, with the documented envelopes, headers and failure modes of a real instance
(as documented by ServiceNow).

Run: ``python -m include.simulators.servicenow_sim --port 8080 [--token-lifetime S] [--latency-ms MS]
[--ire-item-ms MS] [--rate-limit-per-hour N]`` (binds 127.0.0.1).

Control routes (no auth): GET /sim/ (HTML overview), GET /sim/state, GET /sim/counters,
GET /sim/tables/{table}, POST /sim/reset, POST /sim/faults with any of
``latency_ms, ire_item_ms, rate_limit_per_hour, fail_next {count, status, path_prefix[, body, content_type, after]},
hibernate, truncate_next, token_lifetime, revoke_tokens, revoke_refresh_tokens, reject_credentials,
deny_writes (true or [tables]), deny_reads ([tables]: list queries get 403), import_error_next``.
String values longer than their column's ``sys_dictionary`` max_length are cut silently, as ServiceNow stores
them (``SimConfig.column_lengths`` overrides a length, e.g. ``{"u_defender_iot_alert.u_alert_key": 40}``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
from urllib.parse import parse_qsl, unquote

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from include.simulators.servicenow_api import _route_label
from include.simulators.servicenow_base import (  # noqa: F401  (re-exported contract names)
    JSON_TYPE,
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    SIM_PASSWORD,
    SIM_USER,
    Reply,
    SimConfig,
    error,
)
from include.simulators.servicenow_core import Simulator
from include.simulators.servicenow_schema import BAD_GATEWAY_PAGE, HIBERNATION_PAGE

__all__ = ["SIM_USER", "SIM_PASSWORD", "SIM_CLIENT_ID", "SIM_CLIENT_SECRET", "SimConfig", "Simulator", "create_app"]

_NO_CACHE = {"X-Content-Type-Options": "nosniff", "Pragma": "no-store,no-cache",
             "Cache-Control": "no-cache,no-store,must-revalidate,max-age=-1", "Expires": "0"}
_API_NAMES = (("/api/now/identifyreconcile", "Identify and Reconcile API"), ("/api/now/v1/batch", "Batch API"),
              ("/api/now/import", "Import Set API"), ("/api/now/cmdb", "CMDB Instance API"))

_OVERVIEW = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html><head><title>ServiceNow simulator</title><style>
body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1.5em}
td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}h2{margin-top:1.2em}</style></head>
<body><h1>ServiceNow simulator</h1>
<p>{{ counters.requests }} API requests, {{ counters.token_requests }} token requests,
{{ counters.rate_limited }} rate-limited, {{ counters.ire_items }} IRE items.</p>
<h2>Tables</h2><table><tr><th>table</th><th>rows</th></tr>
{% for name, n in tables %}<tr><td>{{ name }}</td><td>{{ n }}</td></tr>{% endfor %}</table>
<h2>Configuration items ({{ cis|length }}{% if more_cis %} of {{ total_cis }}{% endif %})</h2>
<table><tr><th>name</th><th>class</th><th>serial</th><th>install status</th><th>last discovered</th><th>sys_id</th></tr>
{% for r in cis %}<tr><td>{{ r.name }}</td><td>{{ r.sys_class_name }}</td><td>{{ r.serial_number }}</td>
<td>{{ r.install_status }}</td><td>{{ r.last_discovered }}</td><td>{{ r.sys_id }}</td></tr>{% endfor %}</table>
{% for title, rows in tasks %}<h2>{{ title }} ({{ rows|length }})</h2>
<table><tr><th>number</th><th>priority</th><th>state</th><th>short description</th><th>correlation id</th>
<th>CI</th><th>created</th></tr>
{% for r in rows %}<tr><td>{{ r.number }}</td><td>{{ r.priority }}</td><td>{{ r.state }}</td>
<td>{{ r.short_description }}</td><td>{{ r.correlation_id }}</td><td>{{ r.cmdb_ci }}</td>
<td>{{ r.sys_created_on }}</td></tr>{% endfor %}</table>{% endfor %}
</body></html>""")


def basic_client(header: str, form: dict) -> dict:
    """OAuth client credentials sent as ``Authorization: Basic base64(client_id:client_secret)`` (RFC 6749
    2.3.1, the form ServiceNow and PySNC use), as form fields; {} when absent or when the form has them."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or form.get("client_id"):
        return {}
    try:
        cid, sep, secret = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return {}
    return {"client_id": unquote(cid), "client_secret": unquote(secret)} if sep else {}


def _to_response(reply: Reply, head: bool = False) -> Response:
    body = b"" if head or reply.status == 204 else reply.content()
    media = reply.content_type or None
    return Response(body, status_code=reply.status, headers=reply.headers, media_type=media if body else None)


def _api_name(path: str) -> str:
    return next((name for prefix, name in _API_NAMES if path.startswith(prefix)), "Table API")


def create_app(config: SimConfig | None = None) -> FastAPI:
    sim = Simulator(config or SimConfig())
    app = FastAPI(title="ServiceNow simulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sim = sim

    def gate(request: Request) -> Reply | None:
        """Counting and the instance-wide failure modes that answer before authentication."""
        path = request.url.path
        with sim.lock:
            sim.count("requests")
            sim._counters["by_route"][f"{request.method} {_route_label(path)}"] += 1
        if sim.faults.hibernate:
            sim.count("hibernated")
            return Reply(200, HIBERNATION_PAGE, content_type="text/html;charset=UTF-8")
        url_len = len(path) + len(request.url.query or "") + 1
        if url_len > sim.config.max_url_length:
            return error(414, "URI Too Long", f"The request URI is {url_len} characters; the limit is "
                         f"{sim.config.max_url_length}. Send fewer values per query.")
        length = request.headers.get("content-length", "0")
        if length.isdigit() and int(length) > sim.config.max_body_bytes:
            return error(400, "Exception while reading request",
                         f"Rejected large REST payload with content-length = {length} bytes. "
                         f"Max allowed: {sim.config.max_body_bytes} bytes.")
        fault = sim.take_fault(path)
        if fault:
            status = int(fault["status"])
            if "body" in fault:
                return Reply(status, str(fault["body"]), content_type=fault.get("content_type", "text/html"))
            if status in (502, 503, 504):
                return Reply(status, BAD_GATEWAY_PAGE.format(status=status), content_type="text/html")
            if status == 429:
                return error(429, "Rate limit exceeded", "Rate limit exceeded (injected fault)", {"Retry-After": "1"})
            return error(status, "Simulated failure", f"fail_next fault injected (HTTP {status})")
        return None

    def finish(reply: Reply, head: bool = False) -> Response:
        with sim.lock:
            sim._counters["by_status"][str(reply.status)] += 1
        return _to_response(reply, head)

    @app.post("/oauth_token.do")
    async def oauth_token(request: Request):
        early = gate(request)
        if early:
            return finish(early)
        if sim.faults.latency_ms:
            await asyncio.sleep(sim.faults.latency_ms / 1000)
        body = await request.body()
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        form.update(basic_client(request.headers.get("authorization", ""), form))
        return finish(sim.oauth_token(request.headers.get("content-type", ""), form))

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
    async def api(request: Request, rest: str):
        early = gate(request)
        if early:
            return finish(early)
        if sim.faults.latency_ms:
            await asyncio.sleep(sim.faults.latency_ms / 1000)
        headers = {k.lower(): v for k, v in request.headers.items()}
        user = sim.authenticate(headers.get("authorization"))
        if user is None:
            sim.count("auth_failures")
            return finish(error(401, "User Not Authenticated", "Required to provide Auth information",
                                {"WWW-Authenticate": 'Basic realm="Service-now"', **_NO_CACHE}))
        accept = headers.get("accept", "*/*").lower()
        if not any(t in accept for t in ("application/json", "*/*", "application/*")):
            return finish(error(406, "Not Acceptable",
                                f"Accept '{accept}' is not supported by the simulator; use application/json"))
        limited, rl_headers = sim.rate_check(user, _api_name(request.url.path))
        if limited:
            return finish(limited)
        body = await request.body()
        base = str(request.base_url).rstrip("/")
        path = request.url.path
        if path.rstrip("/") == "/api/now/v1/batch":
            reply = sim.batch(body, headers, user, base) if request.method == "POST" else error(
                405, "Method not Supported", "The Batch API accepts POST only")
        elif path.rstrip("/") in ("/api/now/batch", "/api/now/v2/batch"):
            reply = error(400, "Requested URI does not represent any resource")
        else:
            params = parse_qsl(request.url.query, keep_blank_values=True)
            reply = sim.dispatch(request.method, path, params, body, headers, user, base)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        reply.headers.update(rl_headers)
        return finish(reply, head=request.method == "HEAD")

    # ------------------------------------------------------------ control
    @app.get("/sim/state")
    def sim_state():
        return sim.state()

    @app.get("/sim/counters")
    def sim_counters():
        return sim.counters()

    @app.get("/sim/tables/{table}")
    def sim_table(table: str):
        if not sim.has_table(table):
            return JSONResponse({"error": f"unknown table {table}"}, status_code=404)
        return {"records": sim.table(table)}

    @app.post("/sim/reset")
    def sim_reset():
        sim.reset()
        return {"reset": True}

    @app.post("/sim/faults")
    async def sim_faults(request: Request):
        try:
            return {"faults": sim.set_faults(**(await request.json()))}
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/sim/", response_class=HTMLResponse)
    @app.get("/sim", response_class=HTMLResponse, include_in_schema=False)
    def sim_overview():
        with sim.lock:
            cis = sim.table("cmdb_ci_hardware")
            tasks = [(t, sim.table(t)[-200:]) for t in ("incident", "sn_si_incident") if sim.has_table(t)]
            return _OVERVIEW.render(counters=sim.counters(), cis=cis[-500:], more_cis=len(cis) > 500,
                                    total_cis=len(cis), tasks=tasks,
                                    tables=[(t, n) for t, n in sim.state()["tables"].items() if n])

    return app


def main(argv: list[str] | None = None) -> None:
    from include.simulators.runner import serve_forever

    parser = argparse.ArgumentParser(description="ServiceNow simulator on 127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-lifetime", type=int, default=1800, help="access token lifespan, seconds")
    parser.add_argument("--latency-ms", type=float, default=0, help="added to every request")
    parser.add_argument("--ire-item-ms", type=float, default=0, help="server time per IRE item")
    parser.add_argument("--rate-limit-per-hour", type=int, default=None, help="requests per user per hour")
    args = parser.parse_args(argv)
    config = SimConfig(token_lifetime=args.token_lifetime, latency_ms=args.latency_ms,
                       ire_item_ms=args.ire_item_ms, rate_limit_per_hour=args.rate_limit_per_hour)
    print(f"ServiceNow simulator on http://127.0.0.1:{args.port} (user {SIM_USER}); overview at /sim/", flush=True)
    serve_forever(create_app(config), args.port)


if __name__ == "__main__":
    main()
