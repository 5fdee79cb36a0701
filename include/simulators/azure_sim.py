"""Simulator of the Azure side of Defender for IoT (cloud-connected sensors): Entra ID, Azure Resource Graph
and the ARM alert PATCH, on one loopback FastAPI app.

* ``POST /{tenant}/oauth2/v2.0/token`` -- client credentials (form ``grant_type``, ``client_id``,
  ``client_secret``, ``scope=<resource manager>/.default``). Wrong secret -> 401 ``invalid_client``
  (AADSTS7000215), unknown client -> 400 ``unauthorized_client`` (AADSTS700016), unknown tenant -> 400
  (AADSTS90002). ``token_lifetime`` seconds (short on demand).
* ``POST /providers/Microsoft.ResourceGraph/resources?api-version=…`` over ``iotsecurityresources``. The
  query language understood is a small KQL subset (see :func:`parse_query`); anything else is a 400 with
  ARG's error envelope. Paging: at most 1000 rows per page (``$top`` 1-1000, else 400); a ``$skipToken``
  only when ``id`` is projected and there is no ``take``/``limit``/``sample`` -- otherwise
  ``resultTruncated: "true"`` and no token; the token is bound to the query and scope. ``resultFormat``
  ``objectArray`` or ``table``; when not sent, ``table`` (what older documentation states -- a client that
  forgets to send it notices). Per-principal quota (``quota`` queries per ``quota_window`` seconds) with
  ``x-ms-user-quota-remaining`` / ``x-ms-user-quota-resets-after`` on every answer and 429
  ``RateLimiting`` when it is spent.
* ``PATCH /subscriptions/{sub}/providers/Microsoft.IoTSecurity/locations/{loc}/deviceGroups/{group}/alerts/{id}
  ?api-version=2021-07-01-preview`` with ``{"properties": {"status": "New|InProgress|Closed"}}``: 200 with
  the alert; 403 ``AuthorizationFailed`` for a principal in ``readers`` (no Security Admin); 404 unknown.

Inventories are generated from :class:`include.simulators.inventory.Inventory` (same hard cases as the
appliance simulator: invalid MAC / IP, no NIC, non-ASCII and very long names, several IPs, IPv6), converted
to the ARG record shape, with their CVEs as ``…/devicegroups/vulnerabilities`` records
(:mod:`include.simulators.azure_vulns`), plus Removed/Deleted devices every ``removed_every`` ids and one record without an
``id`` per ``broken_every`` ids. Fault injection: ``POST /_sim/faults`` (``fail_next`` = ``{"status",
"count"}``, ``throttle_next`` count of 429s, ``latency_ms``); ``GET /_sim/counters``, ``GET /_sim/state``; ``POST /_sim/alerts``
(``{"count": n, <alert properties>}``: n alerts starting now).

Run: ``python -m include.simulators.azure_sim --port 8443 [--devices N] [--alert-interval S]``.

The state behind the routes is :class:`~include.simulators.azure_state.AzureSimulator`; the KQL subset is
:mod:`include.simulators.azure_kql`.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
import uuid
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from include.simulators.azure_kql import TABLE, parse_query  # noqa: F401  (re-exported)
from include.simulators.azure_kql import BadQuery as _BadQuery
from include.simulators.azure_state import (  # noqa: F401  (re-exported contract names)
    ALERT_API_VERSION,
    ALERT_STATUSES,
    ALERT_TYPE,
    ARG_VERSIONS,
    AZ_SEVERITY,
    DEVICE_TYPE,
    PURDUE,
    SENSOR_TYPE,
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    SIM_READER_ID,
    SIM_SUBSCRIPTION,
    SIM_TENANT,
    SITE_TYPE,
    SUBTYPE,
    AzureSimConfig,
    AzureSimulator,
    _iso,
)


def _arg_error(status: int, code: str, detail_code: str, message: str) -> JSONResponse:
    body = {"error": {"code": code, "message": "Please provide below info when asking for support: "
                      f"timestamp = {_iso(datetime.now(timezone.utc))}, correlationId = {uuid.uuid4()}.",
                      "details": [{"code": detail_code, "message": message}]}}
    return JSONResponse(body, status_code=status)


def create_app(config: AzureSimConfig | None = None) -> FastAPI:
    sim = AzureSimulator(config or AzureSimConfig())
    app = FastAPI(title="Azure (Entra ID, Resource Graph, Defender for IoT ARM) simulator")
    app.state.sim = sim

    def fault() -> JSONResponse | None:
        if sim.faults["latency_ms"]:
            time.sleep(sim.faults["latency_ms"] / 1000)
        spec = sim.faults["fail_next"]
        if spec and spec.get("count", 1) > 0:
            spec["count"] = spec.get("count", 1) - 1
            return JSONResponse({"error": {"code": "InternalServerError", "message": "simulated fault"}},
                                status_code=int(spec.get("status", 500)))
        return None

    @app.post("/{tenant}/oauth2/v2.0/token")
    async def token(tenant: str, request: Request):
        sim.counters["token"] += 1
        form = await request.form()

        def aad(status: int, error: str, code: int, text: str) -> JSONResponse:
            return JSONResponse({"error": error, "error_description": f"AADSTS{code}: {text} Trace ID: "
                                 f"{uuid.uuid4()} Correlation ID: {uuid.uuid4()} Timestamp: "
                                 f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%SZ}", "error_codes": [code],
                                 "timestamp": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%SZ}",
                                 "trace_id": str(uuid.uuid4()), "correlation_id": str(uuid.uuid4())},
                                status_code=status)
        if tenant != sim.config.tenant:
            return aad(400, "invalid_request", 90002, f"Tenant '{tenant[:40]}' not found.")
        if form.get("grant_type") != "client_credentials":
            return aad(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        client = str(form.get("client_id") or "")
        if client not in sim.config.clients:
            return aad(400, "unauthorized_client", 700016, f"Application with identifier '{client[:40]}' was "
                       "not found in the directory.")
        if form.get("client_secret") != sim.config.clients[client]:
            sim.counters["token_rejected"] += 1
            return aad(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret "
                       "being sent in the request is the client secret value, not the client secret ID.")
        scope = str(form.get("scope") or "")
        if not scope.endswith("/.default"):
            return aad(400, "invalid_scope", 1002012, "The provided value for scope is not valid. Client "
                       "credential flows must have a scope value with /.default suffixed to the resource "
                       "identifier.")
        access, lifetime = sim.issue_token(client)
        return {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": access}

    @app.post("/providers/Microsoft.ResourceGraph/resources")
    async def resources(request: Request):
        sim.counters["arg"] += 1
        if request.query_params.get("api-version") not in ARG_VERSIONS:
            return _arg_error(400, "InvalidApiVersionParameter", "InvalidApiVersionParameter",
                              f"The api-version '{request.query_params.get('api-version')}' is invalid.")
        who = sim.principal(request)
        if isinstance(who, JSONResponse):
            return who
        allowed, remaining, resets = sim.take_quota(who)
        if sim.faults["throttle_next"] > 0:
            sim.faults["throttle_next"] -= 1
            allowed = False
        hh, rest = divmod(math.ceil(resets), 3600)
        headers = {"x-ms-user-quota-remaining": str(max(0, remaining)),
                   "x-ms-user-quota-resets-after": f"{hh:02d}:{rest // 60:02d}:{rest % 60:02d}"}
        if not allowed:
            sim.counters["throttled"] += 1
            response = _arg_error(429, "RateLimiting", "RateLimiting", "Client application has been throttled "
                                  "and should not attempt to repeat the request until an amount of time has "
                                  "elapsed. Please see https://aka.ms/resourcegraph-throttling for help.")
            response.headers.update(headers)
            return response
        if (failed := fault()) is not None:
            failed.headers.update(headers)
            return failed
        try:
            body = await request.json()
        except ValueError:
            return _arg_error(400, "BadRequest", "InvalidRequestContent", "The request content is not JSON.")
        subs, groups = body.get("subscriptions"), body.get("managementGroups")
        if subs and groups:
            return _arg_error(400, "BadRequest", "InvalidRequestContent",
                              "subscriptions and managementGroups are mutually exclusive.")
        scope = tuple(subs or ()) or tuple(s for g in groups or () for s in sim.config.management_groups.get(g, ()))
        try:
            result = sim.run_query(body, tuple(s for s in scope if s in sim.config.subscriptions))
        except _BadQuery as exc:
            response = _arg_error(400, "BadRequest", "InvalidQuery", f"Query is invalid. Please refer to the "
                                  f"documentation for the Azure Resource Graph service and fix the error before "
                                  f"retrying. ({exc})")
            response.headers.update(headers)
            return response
        return JSONResponse(result, headers=headers)

    @app.patch("/subscriptions/{sub}/providers/{ns}/locations/{loc}/deviceGroups/{group}/alerts/{alert_id}")
    async def patch_alert(request: Request, sub: str, ns: str, loc: str, group: str, alert_id: str):
        sim.counters["patch"] += 1
        if request.query_params.get("api-version") != ALERT_API_VERSION:
            return JSONResponse({"error": {"code": "InvalidApiVersionParameter", "message": "The api-version "
                                 f"'{request.query_params.get('api-version')}' is invalid."}}, status_code=400)
        who = sim.principal(request)
        if isinstance(who, JSONResponse):
            return who
        if (failed := fault()) is not None:
            return failed
        if who in sim.config.readers:
            return JSONResponse({"error": {"code": "AuthorizationFailed", "message": f"The client '{who}' does "
                                 "not have authorization to perform action 'Microsoft.IoTSecurity/locations/"
                                 "deviceGroups/alerts/write' over scope "
                                 f"'{request.url.path}' or the scope is invalid."}}, status_code=403)
        alert = sim.alert_by_path.get(request.url.path.lower())
        if alert is None:
            return JSONResponse({"error": {"code": "ResourceNotFound", "message": "The alert was not found."}},
                                status_code=404)
        try:
            status = (await request.json())["properties"]["status"]
        except (ValueError, KeyError, TypeError):
            status = None
        if status not in ALERT_STATUSES:
            return JSONResponse({"error": {"code": "InvalidRequestContent", "message": "properties.status must "
                                 "be one of New, InProgress, Closed."}}, status_code=400)
        with sim._lock:
            alert["properties"]["status"] = status
        return alert

    @app.post("/_sim/faults")
    async def set_faults(request: Request):
        body = await request.json()
        unknown = set(body) - set(sim.faults)
        if unknown:
            return JSONResponse({"error": f"unknown faults {sorted(unknown)}"}, status_code=400)
        sim.faults.update(body)
        return sim.faults

    @app.get("/_sim/counters")
    async def counters():
        return dict(sim.counters)

    @app.get("/_sim/state")
    async def state():
        return {"devices": len(sim.devices), "alerts": len(sim.alerts), "sensors": len(sim.sensors),
                "vulnerabilities": len(sim.vulnerabilities)}

    @app.post("/_sim/alerts")
    async def raise_alerts(request: Request):
        """``{"count": n, <alert properties>...}``: n new alerts starting now (as a sensor reports them)."""
        body = await request.json()
        count = int(body.pop("count", 1))
        return [sim.raise_alert(**body) for _ in range(max(0, min(count, 1000)))]

    return app


def main() -> None:
    from include.simulators.runner import serve_forever

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--alerts", type=int, default=30)
    parser.add_argument("--token-lifetime", type=int, default=3599)
    parser.add_argument("--quota", type=int, default=15, help="queries per 5 s per principal")
    parser.add_argument("--sensors", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--alert-interval", type=float, default=0, help="> 0: raise an alert every N s")
    args = parser.parse_args()
    app = create_app(AzureSimConfig(devices=args.devices, alerts=args.alerts, quota=args.quota,
                                    token_lifetime=args.token_lifetime, sensors=args.sensors, seed=args.seed))
    if args.alert_interval > 0:
        def generate() -> None:
            while True:
                time.sleep(args.alert_interval)
                app.state.sim.raise_alert()

        threading.Thread(target=generate, name="alert-generator", daemon=True).start()
    serve_forever(app, args.port)


if __name__ == "__main__":
    main()
