"""Microsoft Defender for IoT simulator: an OT sensor (``/api/...``) or an on-premises management console
(``/external/...``), built from Microsoft's published sensor and management console API documentation.

Run: ``python -m include.simulators.defender_sim --port 8443 --mode management_console --devices 1000``.
Control routes (no auth) live under ``/sim``; see :func:`create_app`. The simulator's state (inventory, alerts,
faults, the record views) is :class:`~include.simulators.defender_state.DefenderSimulator`.

Choices where the docs are silent (each marked INFERENCE in the reference):
- missing/wrong ``Authorization`` token -> 401 ``{"error": "Unauthorized: missing or invalid access token"}``;
- a malformed query value (``fromTime=abc``, ``authorized=maybe``, ``page=-1``) -> 400 ``{"error": ...}``;
- sensor alerts: an invalid ``state`` is an error (draft sensor docs), the management console ignores it;
- alert UUID (for ``PUT /external/v1/alerts/<UUID>``) is ``"<alert id>-<alert time ms>"`` (the documented
  ``<n>-<epoch ms>`` pattern); list responses do not carry it, as documented;
- the route of the other kind of appliance answers 404 ``{"error": "Not Found"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from include.simulators import inventory as inv
from include.simulators.defender_state import (  # noqa: F401  (re-exported contract names)
    ALERT_FIELDS,
    ALERT_V1_KEYS,
    ALERT_V2_EXTRA,
    CHUNK,
    CM_ALERT_V1_KEYS,
    CM_ALERT_V2_EXTRA,
    CM_DEVICE_KEYS,
    DEVICE_FIELDS,
    HANDLE_MESSAGES,
    INTERNAL_DEVICE_KEYS,
    MODES,
    SENSOR_DEVICE_KEYS,
    SIM_TOKEN,
    DefenderSimConfig,
    DefenderSimulator,
    DeviceView,
    now_ms,
)

log = logging.getLogger(__name__)

LOGIN_PAGE = ("<!DOCTYPE html><html><head><title>Microsoft Defender for IoT</title></head><body>"
              "<form action=\"/login\" method=\"post\"><input name=\"username\"><input name=\"password\" "
              "type=\"password\"></form></body></html>")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --------------------------------------------------------------------------- query parsing (errors like an appliance)

def _int(value: str | None, name: str, *, minimum: int | None = None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ApiError(400, f"Invalid value for {name}: {value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ApiError(400, f"Invalid value for {name}: must be >= {minimum}")
    return number


def _ids(value: str | None, name: str) -> set[int] | None:
    if value is None:
        return None
    return {_int(part.strip(), name) for part in value.split(",") if part.strip()}


def _bool(value: str | None, name: str) -> bool | None:
    if value is None:
        return None
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ApiError(400, f"Invalid value for {name}: {value!r} (use true or false)")


# --------------------------------------------------------------------------- the app

def create_app(config: DefenderSimConfig | None = None) -> FastAPI:
    config = config or DefenderSimConfig()
    sim = DefenderSimulator(config)
    app = FastAPI(title=f"Defender for IoT simulator ({config.mode})", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.sim = sim

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": "Not Found" if exc.status_code == 404 else str(exc.detail)},
                            status_code=exc.status_code)

    @app.middleware("http")
    async def appliance_behaviour(request: Request, call_next):
        sim.ensure_generator()
        path = request.url.path
        if path.startswith("/sim"):
            return await call_next(request)
        sim.count("requests")
        latency = sim._faults["latency_ms"]
        if latency:
            await asyncio.sleep(latency / 1000)
        fault = sim.take_fault(path)
        if fault:
            sim.count("faults_served")
        if fault == "fail":
            status = sim._faults["fail_next"]["status"]
            return JSONResponse({"error": "Unexpected error occurred."}, status_code=status)
        if fault == "html":
            return HTMLResponse(LOGIN_PAGE, status_code=200)
        if fault == "invalid_json":
            return Response(b'[{"id": 1, "name": "trunc', media_type="application/json")
        response = await call_next(request)
        route = request.scope.get("route")
        sim.count(f"route:{request.method} {getattr(route, 'path', path)}")
        return response

    def require_token(request: Request) -> None:
        # The docs leave the unauthorized answer open (defender-api.md §1, §10.13): we answer 401 with a JSON
        # error body. The token is compared exactly: "Bearer <token>" is rejected, like the raw-token appliances.
        if sim._faults["reject_token"] or request.headers.get("Authorization") != config.token:
            sim.count("unauthorized")
            raise ApiError(401, "Unauthorized: missing or invalid access token")

    api = APIRouter(dependencies=[Depends(require_token)])
    q = lambda request, name: request.query_params.get(name)  # noqa: E731

    def alerts_response(request: Request, version: int) -> list[dict]:
        state = q(request, "state")
        if state is not None and state not in ("handled", "unhandled"):
            if sim.mode == "sensor":   # draft sensor docs: other values return an error; the console ignores them
                raise ApiError(400, f"Invalid value for state: {state!r} (use handled or unhandled)")
            state = None
        kw = {"state": state, "from_time": _int(q(request, "fromTime"), "fromTime"),
              "to_time": _int(q(request, "toTime"), "toTime")}
        if sim.mode == "sensor":
            alert_type = q(request, "type")
            alert_type = alert_type.replace("_", " ") if alert_type else None
            kw["alert_type"] = alert_type if alert_type in inv.ALERT_TYPE_FILTERS.values() else None
        else:
            kw["sensors"] = _ids(q(request, "sensorId") or q(request, "sensor"), "sensorId")
            kw["zones"] = _ids(q(request, "zoneId"), "zoneId")
            kw["sites"] = _ids(q(request, "siteId"), "siteId")
        return [sim.alert_view(a, version) for a in sim.select_alerts(**kw)]

    if config.mode == "sensor":
        @api.get("/api/v1/devices")
        @api.get("/api/v1/devices/")
        def sensor_devices(request: Request):
            ids = sim._filter_ids(authorized=_bool(q(request, "authorized"), "authorized"))
            return StreamingResponse(sim.stream_json_array(ids, sim.sensor_device_view),
                                     media_type="application/json")

        def _connections(request: Request, device_id: int | None) -> list[dict]:
            before = _int(q(request, "discoveredBefore"), "discoveredBefore")
            after = _int(q(request, "discoveredAfter"), "discoveredAfter")
            minutes = _int(q(request, "lastActiveInMinutes"), "lastActiveInMinutes", minimum=0)
            ids = [device_id] if device_id is not None else sim.device_ids()
            out, alive = [], sim.device
            for first in ids:
                if alive(first) is None:
                    continue
                for second in sim.inventory.neighbours(first) if first <= sim.inventory.n else []:
                    if (device_id is None and second < first) or alive(second) is None:
                        continue
                    conn = sim.inventory.connection(first, second)
                    if before is not None and conn["discovered"] >= before:
                        continue
                    if after is not None and conn["discovered"] <= after:
                        continue
                    if minutes is not None and conn["lastSeen"] < now_ms() - minutes * 60_000:
                        continue
                    out.append(conn)
            return out

        @api.get("/api/v1/devices/connections")
        def all_connections(request: Request):
            return _connections(request, None)

        @api.get("/api/v1/devices/cves")
        def all_cves(request: Request):
            return _cves(request, None)

        @api.get("/api/v1/devices/{device_id}/connections")
        def device_connections(device_id: str, request: Request):
            number = _int(device_id, "deviceId")
            if sim.device(number) is None:
                raise ApiError(500, "Operation failed")
            return _connections(request, number)

        @api.get("/api/v1/devices/{ip_address}/cves")
        def device_cves(ip_address: str, request: Request):
            return _cves(request, ip_address)

        def _cves(request: Request, ip_filter: str | None) -> list[dict]:
            top = _int(q(request, "top"), "top", minimum=1) or 100
            by_ip: dict[str, list[dict]] = {}
            for device_id in sim.device_ids():
                if device_id > sim.inventory.n:
                    continue
                found = sim.inventory.cves(device_id)
                record = sim.device(device_id) if found else None
                ip = (record.get("ipAddresses") or [None])[0] if record else None
                if not ip or (ip_filter is not None and ip != ip_filter):
                    continue
                by_ip[ip] = [{"cveId": c, "score": s, "ipAddress": ip, "attackVector": v, "description": d}
                             for c, s, v, d in found]
            out = [c for cves in by_ip.values()
                   for c in sorted(cves, key=lambda c: -float(c["score"]))[:top]]
            return sorted(out, key=lambda c: -float(c["score"]))

        @api.get("/api/v1/alerts")
        @api.get("/api/v1/alerts/")
        def sensor_alerts_v1(request: Request):
            return alerts_response(request, 1)

        @api.get("/api/v2/alerts")
        @api.get("/api/v2/alerts/")
        def sensor_alerts_v2(request: Request):
            return alerts_response(request, 2)

    else:
        @api.get("/external/v1/devices")
        @api.get("/external/v1/devices/")
        def cm_devices(request: Request):
            ids = sim._filter_ids(authorized=_bool(q(request, "authorized"), "authorized"),
                                  sensors=_ids(q(request, "sensorId"), "sensorId"),
                                  zones=_ids(q(request, "zoneId"), "zoneId"),
                                  sites=_ids(q(request, "siteId"), "siteId"))
            return StreamingResponse(sim.stream_json_array(ids, sim.cm_device_view), media_type="application/json")

        @api.get("/external/v1/alerts")
        @api.get("/external/v1/alerts/")
        def cm_alerts_v1(request: Request):
            return alerts_response(request, 1)

        @api.get("/external/v2/alerts")
        @api.get("/external/v2/alerts/")
        def cm_alerts_v2(request: Request):
            return alerts_response(request, 2)

        @api.put("/external/v1/alerts/{uuid}")
        async def cm_handle_alert(uuid: str, request: Request):
            try:
                action = json.loads(await request.body() or b"null").get("action")
            except (ValueError, AttributeError):
                return JSONResponse({"error": "Unexpected error occurred."}, status_code=500)
            status, body = sim.handle_alert(uuid, action)
            return JSONResponse(body, status_code=status)

        @api.get("/external/v1/appliances")
        @api.get("/external/v2/appliances")
        def cm_appliances():
            return sim.appliances()

        @api.get("/external/v3/integration/devices/{timestamp}")
        def v3_devices(timestamp: str, request: Request):
            ts = _int(timestamp, "timestamp", minimum=0)
            page = _int(q(request, "page"), "page", minimum=0) or 0
            size = _int(q(request, "size"), "size", minimum=1) or 50
            notification = _int(q(request, "notificationType"), "notificationType") or 0
            if notification not in (0, 1, 2):
                raise ApiError(400, "Invalid value for notificationType: use 0, 1 or 2")
            ids = sim._filter_ids(updated_after=ts, notification_type=notification,
                                  sensors=_ids(q(request, "sensorId"), "sensorId"))
            base = str(request.base_url).rstrip("/")
            records = [sim.device(i) for i in ids[page * size:(page + 1) * size]]
            return {"u_count": len(ids),
                    "u_devices": [sim.v3_device_view(r, base) for r in records if r is not None]}

        @api.get("/external/v3/integration/device/{device_id}")
        def v3_device(device_id: str, request: Request):
            record = sim.device(_int(device_id, "deviceId"))
            if record is None:
                raise ApiError(500, "Device not found")
            return [sim.v3_device_view(record, str(request.base_url).rstrip("/"))]

        @api.get("/external/v3/integration/connections/{timestamp}")
        def v3_connections(timestamp: str, request: Request):
            ts = _int(timestamp, "timestamp", minimum=0)
            page = _int(q(request, "page"), "page", minimum=0) or 0
            size = _int(q(request, "size"), "size", minimum=1) or 50
            found = []
            for first in sim.device_ids():
                for second in sim.inventory.neighbours(first) if first <= sim.inventory.n else []:
                    if second > first and sim.device(second) is not None:
                        conn = sim.inventory.connection(first, second)
                        if conn["discovered"] > ts:
                            found.append(conn)
            out = []
            for conn in found[page * size:(page + 1) * size]:
                src, dst = sim.device(conn["firstDeviceId"]), sim.device(conn["secondDeviceId"])
                out.append({"u_src_device_id": src["id"], "u_dest_device_name": dst["name"],
                            "u_src_device_name": src["name"], "u_appliance": "Management console (CM)",
                            "u_connection_type": "Two Way" if conn["protocols"][0]["name"] == "http" else "One Way",
                            "u_dest_device_id": dst["id"]})
            return {"u_count": len(found), "u_connections": out}

        @api.get("/external/v3/integration/devicecves/{timestamp}")
        def v3_device_cves(timestamp: str, request: Request):
            ts = _int(timestamp, "timestamp", minimum=0)
            page = _int(q(request, "page"), "page", minimum=0) or 0
            size = _int(q(request, "size"), "size", minimum=1) or 50
            raw_score = q(request, "score")
            try:
                score = float(raw_score) if raw_score not in (None, "") else 0.0
            except ValueError:
                raise ApiError(400, f"Invalid value for score: {raw_score}") from None
            wanted = _ids(q(request, "deviceIds"), "deviceIds")
            ids = sim._filter_ids(updated_after=ts, sensors=_ids(q(request, "sensorId"), "sensorId"))
            found = []
            for device_id in ids:
                if device_id > sim.inventory.n or (wanted is not None and device_id not in wanted):
                    continue
                cves = [c for c in sim.inventory.cves(device_id) if float(c[1]) >= score]
                record = sim.device(device_id) if cves else None
                if record is not None:
                    found.append((record, cves))
            out = []
            for record, cves in found[page * size:(page + 1) * size]:
                ip = (record.get("ipAddresses") or [None])[0]
                macs = [{"u_mac_address": m} for m in record.get("macAddresses") or []]
                out.append({"u_id": record["id"], "u_name": record["name"],
                            "u_ip_address_objects": [{"u_ip_address": i, "u_guessed_mac_addresses": macs[:1]}
                                                     for i in record.get("ipAddresses") or []],
                            "u_mac_address_objects": macs, "u_last_activity": record["lastActivity"],
                            "u_last_update": record["lastUpdate"],
                            "u_cves": [{"u_cve_id": c, "u_score": sc, "u_ip_address": ip, "u_description": d,
                                        "u_attack_vector": v} for c, sc, v, d in cves]})
            return {"u_count": len(found), "u_device_cves": out}

        @api.get("/external/v3/integration/deleteddevices/{timestamp}")
        def v3_deleted(timestamp: str):
            return [{"u_id": i} for i in sim.deleted_since(_int(timestamp, "timestamp", minimum=0))]

        @api.get("/external/v3/integration/sensors")
        @api.get("/external/v3/integration/sensors/")
        def v3_sensors():
            return sim.v3_sensors()

    app.include_router(api)

    # ----------------------------------------------------------------------- control routes (no auth)
    ctl = APIRouter(prefix="/sim")

    async def body(request: Request) -> dict:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError:
            raise ApiError(400, "body is not JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "body must be a JSON object")
        return data

    def control(fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except KeyError as exc:
            raise ApiError(404, str(exc.args[0] if exc.args else exc)) from None
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc)) from None

    @ctl.get("/state")
    def sim_state():
        return sim.state()

    @ctl.get("/counters")
    def sim_counters():
        return sim.counters()

    @ctl.get("/alerts")
    def sim_alerts():
        with sim._lock:
            return copy.deepcopy(sim.alerts)

    @ctl.post("/alerts")
    async def sim_add_alerts(request: Request):
        data = await body(request)
        count = data.pop("count", 1)
        if not isinstance(count, int) or count < 0:
            raise ApiError(400, "count must be a non-negative integer")
        return {"alerts": control(sim.add_alerts, count, **data)}

    @ctl.post("/devices")
    async def sim_add_device(request: Request):
        return control(sim.add_device, **(await body(request)))

    @ctl.patch("/devices/{device_id}")
    async def sim_update_device(device_id: int, request: Request):
        return control(sim.update_device, device_id, **(await body(request)))

    @ctl.delete("/devices/{device_id}")
    def sim_delete_device(device_id: int):
        control(sim.delete_device, device_id)
        return {"deleted": device_id}

    @ctl.post("/faults")
    async def sim_faults(request: Request):
        return control(sim.set_faults, **(await body(request)))

    app.include_router(ctl)
    return app


def main(argv: list[str] | None = None) -> None:
    from include.simulators.runner import serve_forever

    parser = argparse.ArgumentParser(description="Microsoft Defender for IoT simulator (127.0.0.1 only)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, default="sensor")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sensors", type=int, default=2)
    parser.add_argument("--alerts", type=int, default=20)
    parser.add_argument("--alert-interval", type=float, default=0)
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--name", default="sensor-1")
    parser.add_argument("--token", default=SIM_TOKEN)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--links-per-device", type=float, default=0,
                        help="extra device-to-device connections per device (on top of the chain and hubs)")
    args = parser.parse_args(argv)
    config = DefenderSimConfig(mode=args.mode, token=args.token, devices=args.devices, seed=args.seed,
                               sensors=args.sensors, alerts=args.alerts, alert_interval_s=args.alert_interval,
                               latency_ms=args.latency_ms, name=args.name, links_per_device=args.links_per_device)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    scheme = "https" if args.tls_cert else "http"
    log.info("Defender for IoT simulator (%s, %d devices) on %s://127.0.0.1:%d", args.mode, args.devices, scheme,
             args.port)
    serve_forever(create_app(config), args.port, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)


if __name__ == "__main__":
    main()
