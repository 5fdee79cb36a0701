"""Microsoft Defender for IoT simulator: an OT sensor (``/api/...``) or an on-premises management console
(``/external/...``), built from Microsoft's published sensor and management console API documentation.

Run: ``python -m include.simulators.defender_sim --port 8443 --mode management_console --devices 1000``.
Control routes (no auth) live under ``/sim``; see :func:`create_app`.

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
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from include.simulators import inventory as inv

log = logging.getLogger(__name__)

SIM_TOKEN = "1234b734a9244d54ab8d40aedddcabcd"
MODES = ("sensor", "management_console")

SENSOR_DEVICE_KEYS = ["vendor", "name", "firmware", "id", "macAddresses", "authorized", "ipAddresses",
                      "engineeringStation", "type", "operatingSystem", "protocols", "scanner", "hasDynamicAddress"]
CM_DEVICE_KEYS = ["sensorId", "zoneId", "siteId", *SENSOR_DEVICE_KEYS]
INTERNAL_DEVICE_KEYS = {"firstDiscovered", "lastActivity", "lastUpdate", "purdueLayer", "vlans", "groups"}
DEVICE_FIELDS = set(CM_DEVICE_KEYS) | INTERNAL_DEVICE_KEYS
ALERT_V1_KEYS = ["id", "time", "title", "message", "severity", "engine", "sourceDevice", "destinationDevice",
                 "additionalInformation"]
ALERT_V2_EXTRA = ["sourceDeviceAddress", "destinationDeviceAddress", "remediationSteps"]
CM_ALERT_V1_KEYS = ["id", "sensorId", "zoneId", "siteId", *ALERT_V1_KEYS[1:], "handled"]
CM_ALERT_V2_EXTRA = [*ALERT_V2_EXTRA, "sensorName", "zoneName", "siteName"]
ALERT_FIELDS = set(CM_ALERT_V1_KEYS) | set(CM_ALERT_V2_EXTRA) | {"uuid", "state", "kind"}

HANDLE_MESSAGES = {  # (current state, action) -> (new state, message); [M-ALERT] §4.3
    ("unhandled", "handle"): ("handled", "Alert update request finished successfully"),
    ("unhandled", "handleAndLearn"): ("handledAndLearned", "Alert update request finished successfully"),
    ("handled", "handle"): ("handled", "Alert was already handled (handle)."),
    ("handled", "handleAndLearn"): ("handledAndLearned", "Alert was already handled (handled). Handle and learn "
                                                         "(handleAndLearn) was performed on the alert."),
    ("handledAndLearned", "handleAndLearn"): ("handledAndLearned",
                                              "Alert was already handled and learned (handleAndLearn)."),
    ("handledAndLearned", "handle"): ("handledAndLearned", "Alert was already handled and learned "
                                                           "(handleAndLearn). Ignored handle request."),
}
LOGIN_PAGE = ("<!DOCTYPE html><html><head><title>Microsoft Defender for IoT</title></head><body>"
              "<form action=\"/login\" method=\"post\"><input name=\"username\"><input name=\"password\" "
              "type=\"password\"></form></body></html>")
CHUNK = 1000  # devices per streamed chunk


@dataclass
class DefenderSimConfig:
    mode: str = "sensor"                 # "sensor" | "management_console"
    token: str = SIM_TOKEN
    devices: int = 100                   # inventory size
    seed: int = 1
    sensors: int = 2                     # management console: sensors (one zone each; two zones per site)
    alerts: int = 20                     # initial alerts
    alert_interval_s: float = 0          # > 0: add one alert every N seconds while the server runs
    latency_ms: int = 0
    name: str = "sensor-1"
    anchor_ms: int | None = None         # generated times lie before this (default: when the simulator starts)
    version: str = "22.2.5.7-r-2121448"
    links_per_device: float = 0          # extra device-to-device connections per device (on top of chain + hubs)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def now_ms() -> int:
    return int(time.time() * 1000)


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


# --------------------------------------------------------------------------- the simulator state

class DeviceView(Mapping):
    """Read-only mapping id -> internal device record (built on demand; deleted devices are absent)."""

    def __init__(self, sim: DefenderSimulator):
        self._sim = sim

    def __getitem__(self, device_id: int) -> dict:
        record = self._sim.device(device_id)
        if record is None:
            raise KeyError(device_id)
        return record

    def __iter__(self) -> Iterator[int]:
        return iter(self._sim.device_ids())

    def __len__(self) -> int:
        return self._sim.device_count()


class DefenderSimulator:
    def __init__(self, config: DefenderSimConfig):
        if config.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {config.mode!r}")
        self.config = config
        self.mode = config.mode
        self.anchor_ms = config.anchor_ms if config.anchor_ms is not None else now_ms() // 1000 * 1000
        sensors = config.sensors if self.mode == "management_console" else 1
        self.inventory = inv.Inventory(config.devices, config.seed, sensors=sensors, anchor_ms=self.anchor_ms,
                                       links_per_device=config.links_per_device)
        self.topology = self.inventory.topology
        self._lock = threading.RLock()
        self._updated: dict[int, dict] = {}
        self._added: dict[int, dict] = {}
        self._deleted: dict[int, int] = {}
        self._next_device_id = config.devices + 1
        self._last_tick = 0
        self._rng = random.Random(f"{config.seed}:live")
        start = self.anchor_ms - config.alerts * 150_000
        self.alerts: list[dict] = inv.generate_alerts(config.alerts, config.seed, inventory=self.inventory,
                                                      device_lookup=self.device, start_ms=start)
        self._faults = {"latency_ms": config.latency_ms, "fail_next": None, "html_next": 0,
                        "invalid_json_next": 0, "reject_token": False}
        self._counters: Counter = Counter()
        self._generator_task: asyncio.Task | None = None

    # ----------------------------------------------------------------------- time
    def tick(self) -> int:
        """Now in epoch ms, strictly increasing across calls (changes always sort after earlier ones)."""
        with self._lock:
            self._last_tick = max(now_ms(), self._last_tick + 1)
            return self._last_tick

    # ----------------------------------------------------------------------- devices
    @property
    def devices(self) -> DeviceView:
        return DeviceView(self)

    def device(self, device_id: int) -> dict | None:
        if device_id in self._deleted:
            return None
        if device_id in self._added:
            return self._added[device_id]
        if not 1 <= device_id <= self.inventory.n:
            return None
        record = self.inventory.device(device_id)
        patch = self._updated.get(device_id)
        if patch:
            record.update(copy.deepcopy(patch))
        return record

    def device_ids(self) -> list[int]:
        with self._lock:
            deleted, added = set(self._deleted), sorted(self._added)
        return [i for i in range(1, self.inventory.n + 1) if i not in deleted] + added

    def device_count(self) -> int:
        with self._lock:
            return self.inventory.n - sum(1 for i in self._deleted if i <= self.inventory.n) + len(self._added)

    def _place(self, sensor_id: int) -> dict:
        if 1 <= sensor_id <= len(self.topology):
            return self.topology[sensor_id - 1]
        return {"sensor_id": sensor_id, "sensor_name": f"OT-Sensor-{sensor_id:02d}", "zone_id": sensor_id,
                "zone_name": f"Zone {sensor_id}", "site_id": sensor_id, "site_name": f"Site {sensor_id}"}

    def _check_fields(self, fields: dict, allowed: set[str], what: str) -> None:
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(f"unknown {what} field(s) {unknown}; allowed: {sorted(allowed)}")

    def update_device(self, device_id: int, **changes) -> dict:
        """Change fields of a device (API key names); bumps its last-update time (seen by the v3 delta)."""
        self._check_fields(changes, DEVICE_FIELDS - {"id", "lastUpdate"}, "device")
        with self._lock:
            if self.device(device_id) is None:
                raise KeyError(f"no device {device_id}")
            stamp = self.tick()
            if "sensorId" in changes:
                place = self._place(changes["sensorId"])
                changes.setdefault("zoneId", place["zone_id"])
                changes.setdefault("siteId", place["site_id"])
            if device_id in self._added:
                self._added[device_id].update(copy.deepcopy(changes), lastUpdate=stamp)
            else:
                self._updated.setdefault(device_id, {}).update(copy.deepcopy(changes))
                self.inventory.last_update[device_id] = stamp
                if "authorized" in changes:
                    self.inventory.authorized[device_id] = int(bool(changes["authorized"]))
                if "sensorId" in changes:
                    self.inventory.sensor_id[device_id] = int(changes["sensorId"])
            return self.device(device_id)

    def add_device(self, **fields) -> dict:
        """A new device (next id), discovered now; unspecified fields get plausible defaults."""
        self._check_fields(fields, DEVICE_FIELDS - {"id"}, "device")
        with self._lock:
            device_id = self._next_device_id
            self._next_device_id += 1
            stamp = self.tick()
            sensor_id = int(fields.get("sensorId", 1))
            place = self._place(sensor_id)
            ip = f"172.16.{device_id // 250 % 250}.{device_id % 250 + 1}"
            record = {
                "id": device_id, "name": f"New-Device-{device_id}", "type": "PLC", "vendor": "Siemens AG",
                "operatingSystem": None, "ipAddresses": [ip],
                "macAddresses": [f"02:5e:00:{device_id >> 16 & 255:02x}:{device_id >> 8 & 255:02x}:"
                                 f"{device_id & 255:02x}"],
                "protocols": [{"addresses": [], "id": inv.PROTOCOL_IDS["MODBUS"], "name": "MODBUS"}],
                "firmware": [], "authorized": False, "engineeringStation": False, "scanner": False,
                "hasDynamicAddress": False, "sensorId": sensor_id, "zoneId": place["zone_id"],
                "siteId": place["site_id"], "firstDiscovered": stamp, "lastUpdate": stamp, "lastActivity": stamp,
                "purdueLayer": "N/A", "vlans": ["1"], "groups": [place["site_name"]],
            }
            record.update(copy.deepcopy(fields))
            record["lastUpdate"] = max(record["lastUpdate"], stamp)
            self._added[device_id] = record
            return copy.deepcopy(record)

    def delete_device(self, device_id: int) -> None:
        """Delete a device; the deletion time is recorded for ``deleteddevices/<timestamp>``."""
        with self._lock:
            if self.device(device_id) is None:
                raise KeyError(f"no device {device_id}")
            self._deleted[device_id] = self.tick()
            self._added.pop(device_id, None)
            self._updated.pop(device_id, None)

    def deleted_since(self, ts: int) -> list[int]:
        with self._lock:
            return [i for i, at in sorted(self._deleted.items(), key=lambda kv: (kv[1], kv[0])) if at > ts]

    def _filter_ids(self, *, authorized=None, sensors=None, zones=None, sites=None, updated_after=None,
                    notification_type=0) -> list[int]:
        """Device ids matching the filters, using the compact columns for untouched generated devices."""
        with self._lock:
            special = set(self._updated) | set(self._added)
        inventory = self.inventory
        out = []
        for device_id in self.device_ids():
            if device_id in special:
                record = self.device(device_id)
                if record is None:
                    continue
                auth, sensor_id = record["authorized"], record["sensorId"]
                zone_id, site_id = record["zoneId"], record["siteId"]
                first, last = record["firstDiscovered"], record["lastUpdate"]
            else:
                auth, sensor_id = bool(inventory.authorized[device_id]), inventory.sensor_id[device_id]
                place = self.topology[sensor_id - 1]
                zone_id, site_id = place["zone_id"], place["site_id"]
                first, last = inventory.first_seen[device_id], inventory.last_update[device_id]
            if authorized is not None and auth != authorized:
                continue
            if sensors is not None and sensor_id not in sensors:
                continue
            if zones is not None and zone_id not in zones:
                continue
            if sites is not None and site_id not in sites:
                continue
            if updated_after is not None:
                if last <= updated_after:
                    continue
                is_new = first > updated_after
                if (notification_type == 1 and not is_new) or (notification_type == 2 and is_new):
                    continue
            out.append(device_id)
        return out

    # ----------------------------------------------------------------------- alerts
    def add_alerts(self, n: int = 1, **fields) -> list[dict]:
        """Raise ``n`` new alerts now (fields override generated values, API key names)."""
        self._check_fields(fields, ALERT_FIELDS - {"id", "uuid"}, "alert")
        created = []
        with self._lock:
            for _ in range(n):
                alert_id = (self.alerts[-1]["id"] + 1) if self.alerts else 1
                stamp = int(fields.get("time") or self.tick())
                forced = {key: fields[field_name] for key, field_name in
                          (("source_id", "sourceDevice"), ("destination_id", "destinationDevice"))
                          if field_name in fields}
                alert = inv.make_alert(self._rng, alert_id, stamp, inventory=self.inventory,
                                       device_lookup=self.device, sensor=self._rng.choice(self.topology), **forced)
                alert.update(copy.deepcopy(fields))
                if "sensorId" in fields:
                    place = self._place(fields["sensorId"])
                    for key, name in (("sensorName", "sensor_name"), ("zoneId", "zone_id"),
                                      ("zoneName", "zone_name"), ("siteId", "site_id"), ("siteName", "site_name")):
                        if key not in fields:
                            alert[key] = place[name]
                if "handled" in fields and "state" not in fields:
                    alert["state"] = "handled" if fields["handled"] else "unhandled"
                alert["uuid"] = f"{alert_id}-{alert['time']}"
                self.alerts.append(alert)
                created.append(copy.deepcopy(alert))
        return created

    def alert_by_uuid(self, uuid: str) -> dict | None:
        with self._lock:
            return next((a for a in self.alerts if a["uuid"] == uuid), None)

    def handle_alert(self, uuid: str, action) -> tuple[int, dict]:
        """PUT /external/v1/alerts/<UUID>: the documented state machine; returns (status, body)."""
        with self._lock:
            if action not in ("handle", "handleAndLearn"):
                return 500, {"error": "Invalid action"}
            alert = self.alert_by_uuid(uuid)
            if alert is None:
                return 500, {"error": "Couldn't execute request because no alert was found for this UUID."}
            alert["state"], message = HANDLE_MESSAGES[(alert["state"], action)]
            alert["handled"] = True
            self._counters["alerts_handled"] += 1
            return 200, {"content": message}

    def select_alerts(self, *, state=None, from_time=None, to_time=None, alert_type=None, sensors=None,
                      zones=None, sites=None) -> list[dict]:
        with self._lock:
            alerts = list(self.alerts)
        out = []
        for alert in alerts:
            if state is not None and alert["handled"] != (state == "handled"):
                continue
            if from_time is not None and alert["time"] < from_time:
                continue
            if to_time is not None and alert["time"] >= to_time:
                continue
            if alert_type is not None and inv.ALERT_TYPE_FILTERS.get(alert["kind"]) != alert_type:
                continue
            if sensors is not None and alert["sensorId"] not in sensors:
                continue
            if zones is not None and alert["zoneId"] not in zones:
                continue
            if sites is not None and alert["siteId"] not in sites:
                continue
            out.append(alert)
        return sorted(out, key=lambda a: a["id"])

    async def generate_alerts_forever(self) -> None:
        interval = self.config.alert_interval_s
        try:
            while True:
                await asyncio.sleep(interval)
                alert = self.add_alerts(1)[0]
                log.info("simulator raised alert %s (%s, %s)", alert["id"], alert["severity"], alert["title"])
        except asyncio.CancelledError:
            log.info("alert generator stopped")
            raise

    def ensure_generator(self) -> None:
        """Start the alert generator in the serving event loop (once); it ends with the server's loop."""
        if self.config.alert_interval_s > 0 and self._generator_task is None:
            self._generator_task = asyncio.get_running_loop().create_task(self.generate_alerts_forever())

    # ----------------------------------------------------------------------- faults and counters
    def set_faults(self, **kw) -> dict:
        self._check_fields(kw, set(self._faults), "fault")
        with self._lock:
            if "fail_next" in kw and kw["fail_next"] is not None:
                spec = kw["fail_next"]
                kw["fail_next"] = {"count": int(spec.get("count", 1)), "status": int(spec.get("status", 500)),
                                   "path_prefix": spec.get("path_prefix", "")}
            self._faults.update(kw)
            return dict(self._faults)

    def take_fault(self, path: str) -> str | None:
        """Consume one pending fault for ``path``: 'fail', 'html', 'invalid_json' or None."""
        with self._lock:
            fail = self._faults["fail_next"]
            if fail and fail["count"] > 0 and path.startswith(fail["path_prefix"]):
                fail["count"] -= 1
                return "fail"
            for kind in ("html", "invalid_json"):
                if self._faults[f"{kind}_next"] > 0:
                    self._faults[f"{kind}_next"] -= 1
                    return kind
        return None

    def counters(self) -> dict:
        with self._lock:
            counts = dict(self._counters)
        by_route = {k[6:]: v for k, v in counts.items() if k.startswith("route:")}
        return {"requests": counts.get("requests", 0), "unauthorized": counts.get("unauthorized", 0),
                "faults_served": counts.get("faults_served", 0), "alerts_handled": counts.get("alerts_handled", 0),
                "by_route": by_route}

    def count(self, key: str) -> None:
        with self._lock:
            self._counters[key] += 1

    def state(self) -> dict:
        with self._lock:
            return {"mode": self.mode, "name": self.config.name, "seed": self.config.seed,
                    "anchor_ms": self.anchor_ms, "devices": self.device_count(),
                    "deleted_devices": len(self._deleted), "updated_devices": len(self._updated),
                    "added_devices": len(self._added), "alerts": len(self.alerts),
                    "handled_alerts": sum(1 for a in self.alerts if a["handled"]),
                    "last_alert_id": self.alerts[-1]["id"] if self.alerts else 0,
                    "sensors": [p["sensor_id"] for p in self.topology], "faults": copy.deepcopy(self._faults),
                    "alert_generator": self._generator_task is not None and not self._generator_task.done()}

    # ----------------------------------------------------------------------- views (what the API emits)
    def sensor_device_view(self, record: dict) -> dict:
        return {k: record[k] for k in SENSOR_DEVICE_KEYS if k in record}

    def cm_device_view(self, record: dict) -> dict:
        return {k: record[k] for k in CM_DEVICE_KEYS if k in record}

    def v3_device_view(self, record: dict, base_url: str) -> dict:
        place = self._place(record["sensorId"])
        macs = [m for m in (record.get("macAddresses") or [])]
        mac_objects = [{"u_mac_address": m} for m in macs]
        device_type = record["type"]
        return {
            "u_id": record["id"], "u_name": record["name"], "u_vendor": record["vendor"],
            "u_appliance": "Management console (CM)", "u_operating_system": record["operatingSystem"] or "",
            "u_ip_address_objects": [{"u_ip_address": ip, "u_guessed_mac_addresses": mac_objects[:1]}
                                     for ip in (record.get("ipAddresses") or [])],
            "u_mac_address_objects": mac_objects, "u_groups": list(record.get("groups") or []),
            "u_site": place["site_name"], "u_zone": place["zone_name"],
            "u_last_activity": record["lastActivity"], "u_first_discovered": record["firstDiscovered"],
            "u_last_update": record["lastUpdate"],
            "u_device_type": {"u_category": inv.device_category(device_type),
                              "u_purdue_layer": inv.default_purdue_layer(device_type), "u_name": device_type},
            "u_purdue_layer": record.get("purdueLayer") or "N/A",
            "u_protocol_objects": [{"u_protocol": p["name"]} for p in (record.get("protocols") or [])],
            "u_vlans": [{"u_vlan": v} for v in (record.get("vlans") or [])],
            "u_sensor_ids": [{"u_sensor_id": record["sensorId"]}],
            "u_cm_device_url": f"{base_url}/#/sites/{place['site_id']}/zones/{place['zone_id']}"
                               f"/devices-maps?devices={record['id']}",
            "u_device_urls": [{"u_device_url": f"{self._sensor_address(place['sensor_id'])}/#/assets/highlight/"
                                               f"{record['id']}"}],
            "u_firmwares": [
                {"u_appliance": place["sensor_name"], "u_id": index, "u_asset": record["name"],
                 "u_address": fw.get("address"), "u_module_address": fw.get("moduleAddress"),
                 "u_serial": fw.get("serial"), "u_model": fw.get("model"), "u_version": fw.get("firmwareVersion"),
                 "u_additional_data": fw.get("additionalData")}
                for index, fw in enumerate(record.get("firmware") or [], start=1)],
        }

    def alert_view(self, alert: dict, version: int) -> dict:
        if self.mode == "sensor":
            keys = ALERT_V1_KEYS + (ALERT_V2_EXTRA if version == 2 else [])
            return {k: copy.deepcopy(alert[k]) for k in keys}
        keys = CM_ALERT_V1_KEYS + (CM_ALERT_V2_EXTRA if version == 2 else [])
        view = {k: copy.deepcopy(alert[k]) for k in keys}
        view["sourceDevice"] = view["sourceDevice"] or 0   # the console uses 0 for "no device"
        view["destinationDevice"] = view["destinationDevice"] or 0
        return view

    @staticmethod
    def _sensor_address(sensor_id: int) -> str:
        return f"https://192.0.2.{sensor_id % 250 + 1}"

    def sensor_counts(self) -> dict[int, tuple[int, int, int]]:
        """sensor id -> (devices, alerts, unhandled alerts)."""
        devices = Counter()
        for device_id in self._filter_ids():
            if device_id in self._added or device_id in self._updated:
                devices[self.device(device_id)["sensorId"]] += 1
            else:
                devices[self.inventory.sensor_id[device_id]] += 1
        with self._lock:
            alerts = Counter(a["sensorId"] for a in self.alerts)
            unhandled = Counter(a["sensorId"] for a in self.alerts if not a["handled"])
        return {p["sensor_id"]: (devices[p["sensor_id"]], alerts[p["sensor_id"]], unhandled[p["sensor_id"]])
                for p in self.topology}

    def appliances(self) -> list[dict]:
        stamp = now_ms()
        counts = self.sensor_counts()
        out = []
        for place in self.topology:
            device_count, alert_count, unhandled = counts[place["sensor_id"]]
            sid = place["sensor_id"]
            out.append({
                "dataIntelligenceVersion": "May 26, 2022", "name": place["sensor_name"], "isActivated": True,
                "hasLog": False, "zoneId": place["zone_id"], "upgradeStatus": None, "deviceCount": device_count,
                "state": {"sensorLastMessage": stamp - 6000, "xsenseId": sid, "sensorSyncedUntil": stamp - 90000,
                          "connectionState": {"isConsideredConnected": True, "id": 1,
                                              "description": "Connection is successful"},
                          "cmSyncedUntil": stamp - 6000, "id": sid},
                "version": self.config.version, "alertCount": alert_count, "upgradeFinishTime": None,
                "uid": f"{self.config.seed:08x}-8ebf-4bb3-8613-{sid:012x}",
                "interfaceAddress": self._sensor_address(sid), "id": sid, "unhandledAlertsCount": unhandled,
                "isInLearningMode": False,
            })
        return out

    def v3_sensors(self) -> list[dict]:
        return [{"u_connection_state": "SYNCED", "u_uid": a["uid"], "u_name": a["name"], "u_is_activated": True,
                 "u_alert_count": a["alertCount"], "u_device_count": a["deviceCount"],
                 "u_interface_address": a["interfaceAddress"], "u_zone_id": a["zoneId"],
                 "u_data_intelligence_version": a["dataIntelligenceVersion"], "u_is_in_learning_mode": False,
                 "u_unhandled_alert_count": a["unhandledAlertsCount"], "u_remote_upgrade_stage": "",
                 "u_id": a["id"], "u_version": a["version"]} for a in self.appliances()]

    def stream_json_array(self, ids: list[int], view) -> Iterator[bytes]:
        """Yield a JSON array of ``view(record)`` for ``ids`` in chunks (never the whole body at once)."""
        yield b"["
        first = True
        for start in range(0, len(ids), CHUNK):
            parts = []
            for device_id in ids[start:start + CHUNK]:
                record = self.device(device_id)
                if record is not None:
                    parts.append(json.dumps(view(record), ensure_ascii=False))
            if parts:
                yield (("" if first else ",") + ",".join(parts)).encode()
                first = False
        yield b"]"


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
