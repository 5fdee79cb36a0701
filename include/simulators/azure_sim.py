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
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from include.simulators.azure_vulns import vulnerability_records
from include.simulators.inventory import SEVERITIES as _APPLIANCE_SEVERITIES
from include.simulators.inventory import Inventory

SIM_TENANT = "11111111-2222-3333-4444-555555555555"
SIM_CLIENT_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
SIM_CLIENT_SECRET = "sim~azure~secret~value"
SIM_READER_ID = "ffffffff-0000-1111-2222-333333333333"   # a Reader without Security Admin
SIM_SUBSCRIPTION = "00000000-1111-2222-3333-444444444444"
ARG_VERSIONS = {"2019-04-01", "2021-03-01", "2022-10-01", "2024-04-01"}
ALERT_API_VERSION = "2021-07-01-preview"
ALERT_STATUSES = ("New", "InProgress", "Closed")
TABLE = "iotsecurityresources"
DEVICE_TYPE = "microsoft.iotsecurity/locations/devicegroups/devices"
ALERT_TYPE = "microsoft.iotsecurity/locations/devicegroups/alerts"
SENSOR_TYPE = "microsoft.iotsecurity/locations/sites/sensors"
SITE_TYPE = "microsoft.iotsecurity/locations/sites"
AZ_SEVERITY = dict(zip(_APPLIANCE_SEVERITIES, ("Informational", "Low", "Medium", "High"), strict=True))
SUBTYPE = {"Multicast/Broadcast": "Broadcast"}
PURDUE = {"Process Control": "ProcessControl", "Supervisory": "Supervisory", "Enterprise": "Enterprise"}


@dataclass
class AzureSimConfig:
    tenant: str = SIM_TENANT
    clients: dict = field(default_factory=lambda: {SIM_CLIENT_ID: SIM_CLIENT_SECRET,
                                                   SIM_READER_ID: SIM_CLIENT_SECRET})
    readers: set = field(default_factory=lambda: {SIM_READER_ID})
    subscriptions: tuple = (SIM_SUBSCRIPTION,)
    management_groups: dict = field(default_factory=lambda: {"mg-ot": (SIM_SUBSCRIPTION,)})
    devices: int = 100
    alerts: int = 30
    sensors: int = 2
    seed: int = 1
    removed_every: int = 37      # every n-th device is Removed / Deleted
    broken_every: int = 0        # every n-th device record has no id (0 = none)
    token_lifetime: int = 3599
    quota: int = 15
    quota_window: float = 5.0
    location: str = "westeurope"
    anchor: datetime | None = None


class _BadQuery(ValueError):
    pass


_STAGES = [
    ("where_type", re.compile(r"^where\s+type\s*(=~|==)\s*'([^']*)'$", re.I)),
    ("where_in", re.compile(r"^where\s+([\w.]+)\s+(!?in~?)\s*\(\s*('[^']*'(?:\s*,\s*'[^']*')*)\s*\)$", re.I)),
    ("where_cmp", re.compile(r"^where\s+([\w.]+)\s*(>=|<=|>|<)\s*datetime\(\s*([^)]+?)\s*\)$", re.I)),
    ("where_eq", re.compile(r"^where\s+([\w.]+)\s*(=~|==|!=|!~)\s*'([^']*)'$", re.I)),
    ("project", re.compile(r"^project\s+([\w]+(?:\s*,\s*[\w]+)*)$", re.I)),
    ("order", re.compile(r"^(?:order|sort)\s+by\s+(\w+)(?:\s+(asc|desc))?$", re.I)),
    ("take", re.compile(r"^(take|limit|sample)\s+(\d+)$", re.I)),
]


def parse_query(query: str) -> list[tuple[str, tuple]]:
    """The KQL subset: ``iotsecurityresources`` then ``|``-separated stages of ``where type =~ '…'``,
    ``where <path> in~ ('a', …)`` / ``!in~``, ``where <path> >= datetime(…)`` (``> < <=``), ``where <path>
    =~|==|!=|!~ '…'``, ``project a, b``, ``order by <col> [asc|desc]``, ``take|limit|sample N``."""
    parts = [p.strip() for p in query.strip().split("|")]
    if not parts or parts[0].lower() != TABLE:
        raise _BadQuery(f"table {parts[0][:40]!r} is not supported here (only {TABLE})")
    stages = []
    for part in parts[1:]:
        for name, pattern in _STAGES:
            match = pattern.match(part)
            if match:
                stages.append((name, match.groups()))
                break
        else:
            raise _BadQuery(f"cannot parse {part[:80]!r}")
    return stages


def _path(record: dict, path: str) -> Any:
    value: Any = record
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _when(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.strip().strip("'\"").replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _matches(record: dict, name: str, args: tuple) -> bool:
    if name == "where_type":
        op, wanted = args
        return record["type"] == wanted if op == "==" else record["type"].lower() == wanted.lower()
    if name == "where_in":
        path, op, items = args
        values = [v.strip()[1:-1] for v in items.split(",")]
        value = _path(record, path)
        if op.endswith("~"):
            found = str(value).lower() in {v.lower() for v in values} if value is not None else False
        else:
            found = value in values
        return not found if op.startswith("!") else found
    if name == "where_cmp":
        path, op, when = args
        value = _path(record, path)
        if not isinstance(value, str):
            return False
        left, right = _when(value), _when(when)
        return {">=": left >= right, "<=": left <= right, ">": left > right, "<": left < right}[op]
    path, op, wanted = args
    value = _path(record, path)
    text = "" if value is None else str(value)
    return {"==": text == wanted, "=~": text.lower() == wanted.lower(), "!=": text != wanted,
            "!~": text.lower() != wanted.lower()}[op]


def _arg_error(status: int, code: str, detail_code: str, message: str) -> JSONResponse:
    body = {"error": {"code": code, "message": "Please provide below info when asking for support: "
                      f"timestamp = {_iso(datetime.now(timezone.utc))}, correlationId = {uuid.uuid4()}.",
                      "details": [{"code": detail_code, "message": message}]}}
    return JSONResponse(body, status_code=status)


class AzureSimulator:
    """The state behind the app: records, tokens, quota windows, alert states, faults, counters."""

    def __init__(self, config: AzureSimConfig):
        self.config = config
        self.anchor = config.anchor or datetime.now(timezone.utc)
        self.inventory = Inventory(config.devices, config.seed, sensors=config.sensors,
                                   anchor_ms=int(self.anchor.timestamp() * 1000))
        self._lock = threading.Lock()
        self.tokens: dict[str, tuple[str, float]] = {}   # token -> (client id, expires at)
        self.quota_windows: dict[str, tuple[float, int]] = {}   # client -> (window start, used)
        self.counters: Counter = Counter()
        self.faults: dict[str, Any] = {"fail_next": None, "throttle_next": 0, "latency_ms": 0}
        self.sensors = [self._sensor(t) for t in self.inventory.topology]
        self.sites = [self._site(name) for name in dict.fromkeys(t["site_name"] for t in self.inventory.topology)]
        self.devices = [self._device(i) for i in range(1, config.devices + 1)]
        self.alerts = [self._alert(i) for i in range(1, config.alerts + 1)]
        self.alert_by_path = {a["id"].lower(): a for a in self.alerts}
        self.vulnerabilities = [v for i, d in enumerate(self.devices, 1)
                                for v in vulnerability_records(d, self.inventory.cves(i), anchor=self.anchor)]

    # ----------------------------------------------------------------------- records
    def _base(self, kind: str, group: str, name: str) -> str:
        return (f"/subscriptions/{self.config.subscriptions[0]}/providers/Microsoft.IoTSecurity/locations/"
                f"{self.config.location}/{kind}/{group}/{name}")

    def _site(self, name: str) -> dict:
        group = re.sub(r"\W+", "-", name.lower()).strip("-")
        return {"id": self._base("sites", group, "")[:-1].rstrip("/"), "name": group, "type": SITE_TYPE,
                "subscriptionId": self.config.subscriptions[0], "location": self.config.location,
                "properties": {"displayName": name, "tags": {"site": name}}}

    def _sensor(self, t: dict) -> dict:
        group = re.sub(r"\W+", "-", t["site_name"].lower()).strip("-")
        return {"id": self._base("sites", group, f"sensors/{t['sensor_name']}"), "name": t["sensor_name"],
                "type": SENSOR_TYPE, "subscriptionId": self.config.subscriptions[0],
                "location": self.config.location,
                "properties": {"sensorStatus": "Ok", "sensorVersion": "25.2.1", "zone": t["zone_name"],
                               "connectivityTime": _iso(self.anchor - timedelta(minutes=1)),
                               "learningMode": False, "sensorType": "Ot"}}   # its site: only in its id

    def _device(self, i: int) -> dict:
        raw = self.inventory.device(i)
        t = self.inventory.topology[(raw.get("sensorId") or 1) - 1]
        group = re.sub(r"\W+", "-", t["site_name"].lower()).strip("-")
        name = hashlib.sha1(f"{self.config.seed}:{i}".encode()).hexdigest()
        macs, ips = raw.get("macAddresses") or [], raw.get("ipAddresses") or []
        nics = [{"macAddress": macs[k] if k < len(macs) else None,
                 "ipv4Address" if ":" not in ip else "ipv6Address": ip, "macCertainty": "Certain"}
                for k, ip in enumerate(ips)]
        nics += [{"macAddress": m, "macCertainty": "Guess"} for m in macs[len(ips):]]   # a NIC per MAC too
        status = "Active"
        if self.config.removed_every and i % self.config.removed_every == 0:
            status = "Removed" if (i // self.config.removed_every) % 2 else "Deleted"
        first = datetime.fromtimestamp(raw["firstDiscovered"] / 1000, timezone.utc)
        last = datetime.fromtimestamp(raw["lastActivity"] / 1000, timezone.utc)
        firmware = raw.get("firmware") or []
        record = {
            "id": self._base("deviceGroups", group, f"devices/{name}"), "name": name, "type": DEVICE_TYPE,
            "tenantId": self.config.tenant, "subscriptionId": self.config.subscriptions[0],
            "location": self.config.location, "resourceGroup": "",
            "properties": {
                "deviceName": raw.get("name"), "deviceDataSource": "OtSensor", "deviceStatus": status,
                "deviceSubTypeDisplayName": SUBTYPE.get(raw["type"], raw["type"]),
                "firstSeen": _iso(first), "lastSeen": _iso(last), "lastUpdated": _iso(last),
                "sensor": {"name": t["sensor_name"], "type": "Ot", "site": t["site_name"], "zone": t["zone_name"]},
                "nics": nics,
                "hardware": {"vendor": raw.get("vendor"), "model": (firmware[0].get("model") if firmware else None),
                             "serialNumber": None},
                "operatingSystem": {"platform": raw.get("operatingSystem")} if raw.get("operatingSystem") else {},
                "purdueLevel": PURDUE.get(raw.get("purdueLayer") or "", None),
                "criticality": "High" if raw["type"] in ("PLC", "DCS Controller", "RTU") else "Normal",
                "authorizedState": "Authorized" if raw.get("authorized") else "Unauthorized",
                "programmingState": "ProgrammingDevice" if raw.get("engineeringStation") else "NotProgrammingDevice",
                "slots": [{"firmwareVersion": f.get("firmwareVersion"), "model": f.get("model"),
                           "rackNumber": f.get("rack"), "slotNumber": f.get("slot"),
                           "serialNumber": f.get("serial")} for f in firmware],
                "additionalFields": {},
            },
        }
        if self.config.broken_every and i % self.config.broken_every == 0:
            record.pop("id")
        return record

    def _alert(self, i: int) -> dict:
        device = self.devices[(i * 7) % len(self.devices)] if self.devices else {}
        dprops = device.get("properties", {})
        group = (device.get("id") or "/x/deviceGroups/plant/").split("/deviceGroups/")[-1].split("/")[0]
        name = str(uuid.UUID(hashlib.md5(f"alert:{self.config.seed}:{i}".encode()).hexdigest()))
        start = self.anchor - timedelta(minutes=5 * (self.config.alerts - i + 1))
        nics = dprops.get("nics") or [{}]
        return {
            "id": self._base("deviceGroups", group, f"alerts/{name}"), "name": name, "type": ALERT_TYPE,
            "subscriptionId": self.config.subscriptions[0], "location": self.config.location,
            "properties": {
                "systemAlertId": name, "displayName": f"Unauthorized PLC programming #{i}",
                "description": "An unauthorized device changed the PLC's program.",
                "severity": AZ_SEVERITY[_APPLIANCE_SEVERITIES[i % 4]], "status": "New",
                "startTimeUtc": _iso(start), "endTimeUtc": _iso(start), "productComponentName": "Policy Violation",
                "alertType": "IoT_PolicyViolation", "azureResourceId": device.get("id"),
                "remediationSteps": ["Check the PLC program.", "Handle the alert when resolved."],
                "extendedProperties": {
                    "SensorId": dprops.get("sensor", {}).get("name"), "DeviceResourceIds": device.get("id"),
                    "SourceDeviceAddress": nics[0].get("ipv4Address") or nics[0].get("macAddress"),
                    "DestinationDeviceAddress": f"10.9.0.{i % 250 + 1}"},   # the reference's four, no site
            },
        }

    def raise_alert(self, **properties) -> dict:
        """A new alert that starts now (``properties`` override the generated ones, e.g. ``severity``)."""
        now = _iso(datetime.now(timezone.utc))
        return self.add_alert(**{"startTimeUtc": now, "endTimeUtc": now, **properties})

    def update_device(self, index: int, **properties) -> dict:
        """Change device ``index`` (1-based) as a sensor's report would: its properties, ``lastUpdated`` now."""
        with self._lock:
            device = self.devices[index - 1]
            device["properties"].update(properties, lastUpdated=_iso(datetime.now(timezone.utc)))
            return device

    def drop_device(self, index: int) -> dict:
        """Device ``index`` (1-based) disappears from Resource Graph altogether (its resource was deleted)."""
        with self._lock:
            return self.devices.pop(index - 1)

    def patch_device(self, index: int) -> list[dict]:
        """Device ``index`` (1-based) is patched: its vulnerability records leave Resource Graph (returned)."""
        device_id = self.devices[index - 1].get("id")
        with self._lock:
            gone = [v for v in self.vulnerabilities if v["properties"].get("deviceId") == device_id]
            self.vulnerabilities = [v for v in self.vulnerabilities if v["properties"].get("deviceId") != device_id]
        return gone

    def add_alert(self, **properties) -> dict:
        with self._lock:
            alert = self._alert(len(self.alerts) + 1)
            alert["properties"].update(properties)
            self.alerts.append(alert)
            self.alert_by_path[alert["id"].lower()] = alert
            return alert

    # ----------------------------------------------------------------------- auth and quota
    def issue_token(self, client_id: str) -> tuple[str, int]:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self.tokens[token] = (client_id, time.time() + self.config.token_lifetime)
        return token, self.config.token_lifetime

    def principal(self, request: Request) -> str | JSONResponse:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return JSONResponse({"error": {"code": "AuthenticationFailed", "message": "Authentication failed. "
                                 "The 'Authorization' header is missing."}}, status_code=401)
        entry = self.tokens.get(auth[7:])
        if entry is None:
            return JSONResponse({"error": {"code": "InvalidAuthenticationToken",
                                           "message": "The access token is invalid."}}, status_code=401)
        if entry[1] <= time.time():
            self.counters["expired_token"] += 1
            return JSONResponse({"error": {"code": "ExpiredAuthenticationToken", "message": "The access token "
                                 "expiry UTC time is earlier than current UTC time."}}, status_code=401)
        return entry[0]

    def take_quota(self, client: str) -> tuple[bool, int, float]:
        now = time.monotonic()
        with self._lock:
            start, used = self.quota_windows.get(client, (now, 0))
            if now - start >= self.config.quota_window:
                start, used = now, 0
            allowed = used < self.config.quota
            if allowed:
                used += 1
            self.quota_windows[client] = (start, used)
            return allowed, self.config.quota - used, max(0.0, start + self.config.quota_window - now)

    # ----------------------------------------------------------------------- queries
    def run_query(self, body: dict, scope: tuple) -> dict:
        stages = parse_query(str(body.get("query") or ""))
        options = body.get("options") or {}
        top = options.get("$top")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= 1000):
            raise _BadQuery(f"$top must be an integer from 1 to 1000, got {top!r}")
        rows = [r for r in (*self.devices, *self.alerts, *self.sensors, *self.sites, *self.vulnerabilities)
                if r.get("subscriptionId") in scope]
        columns = None
        limit = None
        for name, args in stages:
            if name == "project":
                columns = [c.strip() for c in args[0].split(",")]
            elif name == "order":
                rows = sorted(rows, key=lambda r, c=args[0]: str(r.get(c) or ""),
                              reverse=(args[1] or "asc").lower() == "desc")
            elif name == "take":
                limit = int(args[1])
                rows = rows[:limit]
            else:
                rows = [r for r in rows if _matches(r, name, args)]
        if columns:
            rows = [{c: r.get(c) for c in columns} for r in rows]
        pageable = limit is None and (columns is None or "id" in columns)
        fingerprint = hashlib.sha256(json.dumps([body.get("query"), list(scope)]).encode()).hexdigest()[:16]
        offset = int(options.get("$skip") or 0)
        token = options.get("$skipToken")
        if token:
            try:
                decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
                assert decoded["q"] == fingerprint
                offset = int(decoded["o"])
            except Exception:
                raise _BadQuery("$skipToken is invalid or belongs to another query or scope") from None
        size = top or 1000
        page = rows[offset:offset + size]
        result = {"totalRecords": len(rows), "count": len(page), "facets": []}
        more = offset + len(page) < len(rows)
        if more and pageable:
            result["$skipToken"] = base64.urlsafe_b64encode(
                json.dumps({"q": fingerprint, "o": offset + len(page)}).encode()).decode()
        result["resultTruncated"] = "true" if more and not pageable else "false"
        if options.get("resultFormat", "table") == "objectArray":
            result["data"] = page
        else:
            names = columns or ["id", "name", "type", "subscriptionId", "location", "properties"]
            result["data"] = {"columns": [{"name": c, "type": "string"} for c in names],
                              "rows": [[r.get(c) for c in names] for r in page]}
        return result


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
