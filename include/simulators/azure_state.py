"""The state of the Azure simulator: its configuration and credentials, the ARG records generated from the
inventory (sites, sensors, devices, alerts, vulnerabilities), tokens, quota windows, alert states, faults
and counters, and the Resource Graph query run over them. The HTTP routes are in ``azure_sim``."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from include.simulators.azure_kql import BadQuery as _BadQuery
from include.simulators.azure_kql import matches as _matches
from include.simulators.azure_kql import parse_query
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


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


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
