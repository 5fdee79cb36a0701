"""The state of the Defender for IoT simulator: its configuration, the generated inventory with the
changes made since (updated, added, deleted devices), alerts and their handling, faults and counters, and
the views of records the appliance's API emits. The HTTP routes are in ``defender_sim``."""

from __future__ import annotations

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


def now_ms() -> int:
    return int(time.time() * 1000)


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
