"""Sensors -> ``cmdb_ci_nids`` CIs, each device CI related to the sensor that sees it
(``Detects::Detected by``, NIDS parent, device child: the type ServiceNow ships with the NIDS class).

Sensor identity: ``sys_object_source`` native key ``sensor:<conn id>:<sensor key>`` (a device's is
``<conn id>:<device id>``, which stays the form that means a device); the clean-up looks for both. Change-detected like devices
(the same payload digest); sensors a source stops listing are retired (``install_status`` 7,
``operational_status`` 6) after ``retire_after_missing_runs`` successful runs, never while another source
(another of our connections, another discovery tool) still claims the CI.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from defender_servicenow.cmdb_depth.base import DepthEngine
from defender_servicenow.cmdb_depth.ire import DETECTS, End, Link, relate, remove_relations
from defender_servicenow.cmdb_depth.models import Sensor
from defender_servicenow.cmdb_depth.state import DepthState, device_cis
from defender_servicenow.cmdb_depth.summary import DepthSummary
from defender_servicenow.exceptions import ServiceNowError
from defender_servicenow.hooks.servicenow_wire import ire_item_errors
from defender_servicenow.mapping import clean_text, payload_digest
from defender_servicenow.models import Device, InvalidRecord
from defender_servicenow.sync import RETIRED

log = logging.getLogger(__name__)
NIDS = "cmdb_ci_nids"
_D, _SYS_ID, _CLASS, _MISSING, _RETIRED = range(5)   # sensor entry: the device entry's layout
_SKEY, _SSYS, _DSYS, _OURS = range(4)                # link entry: [sensor key, sensor sys_id, device sys_id, ours]


def sensor_native_key(source: str, sensor_key: str) -> str:
    return f"sensor:{source}:{sensor_key}"


def map_sensor(sensor: Sensor, *, source: str, source_name: str) -> dict:
    """One IRE item for a sensor (pure)."""
    values = {
        "name": clean_text(sensor.name, keep_end=True),
        "correlation_id": sensor_native_key(source, sensor.key),
        "firmware_version": clean_text(sensor.version, 40),
        "fqdn": clean_text(sensor.fqdn),
        "zone": clean_text(sensor.zone),
        "connection_state": clean_text(sensor.status, 40),
        "nids_source_name": "Microsoft Defender for IoT",
        "network_type_assignment": "OT",
        "install_status": "1",
        "operational_status": "1" if sensor.connected else "2",
    }
    lookup = []
    if sensor.mac:
        lookup.append({"className": "cmdb_ci_network_adapter", "values": {"name": sensor.mac,
                                                                          "mac_address": sensor.mac}})
    if sensor.ip:
        ip_values = {"ip_address": sensor.ip, "ip_version": "6" if ":" in sensor.ip else "4"}
        if sensor.mac:
            ip_values["mac_address"] = sensor.mac
        lookup.append({"className": "cmdb_ci_ip_address", "values": ip_values})
    keys = {"defender.source": source, "defender.sensor_id": sensor.key, "defender.site": sensor.site,
            "defender.learning_mode": None if sensor.learning_mode is None else str(sensor.learning_mode).lower()}
    related = [{"className": "cmdb_key_value", "values": {"key": k, "value": clean_text(v)}}
               for k, v in keys.items() if v is not None]
    item = {"className": NIDS, "values": {k: v for k, v in values.items() if v is not None},
            "sys_object_source_info": {"source_name": source_name,
                                       "source_native_key": sensor_native_key(source, sensor.key)}}
    if lookup:
        item["lookup"] = lookup
    if related:
        item["related"] = related
    return item


class SensorSync(DepthEngine):
    """One source's sensors -> NIDS CIs and device links. ``source`` implements ``iter_sensors()``,
    ``device_sensor_key(device)`` and ``iter_devices()``."""

    def __init__(self, *, retire_after_missing_runs: int = 3, **kw):
        super().__init__(**kw)
        self.retire_after = retire_after_missing_runs

    def run(self) -> DepthSummary:
        summary = DepthSummary("sensors", self.source_id, dry_run=self.dry_run)
        sensors = self._read_sensors(summary)
        device_sensor = self._device_sensors(sensors)
        state = DepthState(self.store, self.source_id, "sensors", shards=1, max_value_bytes=self.max_value_bytes)
        links = DepthState(self.store, self.source_id, "sensor_links", max_value_bytes=self.max_value_bytes)
        try:
            self._send_sensors(sensors, state, summary)
            self._retire_missing(sensors, state, summary)
            self._link_devices(device_sensor, state, links, summary)
        finally:
            if not self.dry_run:
                state.save()
                links.save()
        return summary.finish()

    # ------------------------------------------------------------------ reading
    def _read_sensors(self, summary: DepthSummary) -> dict[str, Sensor]:
        sensors: dict[str, Sensor] = {}
        for record in self.source.iter_sensors():
            if isinstance(record, InvalidRecord):
                summary.add("invalid")
                log.warning("A sensor record of %s could not be used (%s): %s", self.source_id,
                            record.record_id or "no id", record.reason)
                continue
            sensors[record.key] = record
        summary.add("seen", len(sensors))
        return sensors

    def _device_sensors(self, sensors: dict[str, Sensor]) -> dict[int, str]:
        """Device id -> sensor key; fills in each sensor's zone and site from its devices where the sensor
        list does not give them (the console lists zone ids only)."""
        out: dict[int, str] = {}
        places: dict[str, tuple[str | None, str | None]] = {}
        for device in self.source.iter_devices():
            if not isinstance(device, Device):
                continue
            key = self.source.device_sensor_key(device)
            if key is None or key not in sensors:
                continue
            out[device.id] = key
            if key not in places and (device.zone_name or device.site_name):
                places[key] = (device.zone_name, device.site_name)
        for key, (zone, site) in places.items():
            sensor = sensors[key]
            sensors[key] = replace(sensor, zone=sensor.zone or zone, site=sensor.site or site)
        return out

    # ------------------------------------------------------------------ sensor CIs
    def _send_sensors(self, sensors: dict[str, Sensor], state: DepthState, summary: DepthSummary) -> None:
        pending = []
        for key, sensor in sensors.items():
            item = map_sensor(sensor, source=self.source_id, source_name=self.source_name)
            digest = payload_digest(item)
            entry = state.get(key)
            if entry and entry[_SYS_ID] and entry[_D] == digest and not entry[_RETIRED] and not self.full_resync:
                summary.add("unchanged")
                if entry[_MISSING] and not self.dry_run:
                    state.put(key, [*entry[:_MISSING], 0, 0])
                continue
            pending.append((key, item, digest, entry))
        for start in range(0, len(pending), self.max_items):
            chunk = pending[start:start + self.max_items]
            result = self.servicenow.identify_reconcile([item for _, item, _, _ in chunk], self.data_source,
                                                        dry_run=self.dry_run)
            errors = ire_item_errors(result)
            answers = result.get("items") or []
            for n, (key, item, digest, entry) in enumerate(chunk):
                answer = answers[n] if n < len(answers) else {}
                if self.dry_run and n not in errors:   # /query: an INSERT has no sys_id yet
                    summary.add(f"would_{str(answer.get('operation', 'send')).lower()}")
                    continue
                if n in errors or not answer.get("sysId") or answer.get("sysId") == "Unknown":
                    reason = "; ".join(f"{e.get('error')}: {e.get('message')}" for e in errors.get(n, [])) \
                        or "the IRE returned no sys_id"
                    summary.fail(f"sensor {key} ({item['values'].get('name')})", reason)
                    continue
                summary.add("inserted" if entry is None or not entry[_SYS_ID] else "updated")
                if not self.dry_run:
                    state.put(key, [digest, answer["sysId"], answer.get("className") or NIDS, 0, 0])

    def _retire_missing(self, sensors: dict[str, Sensor], state: DepthState, summary: DepthSummary) -> None:
        for key, entry in state.items():
            if key in sensors or entry[_RETIRED] or not entry[_SYS_ID]:
                continue
            missing = entry[_MISSING] + 1
            if missing < self.retire_after:
                if not self.dry_run:
                    state.put(key, [*entry[:_MISSING], missing, 0])
                log.info("Sensor %s of %s is no longer listed (%d of %d runs before its CI is retired)", key,
                         self.source_id, missing, self.retire_after)
                continue
            if self.dry_run:
                summary.add("would_retire")
                continue
            if self._claimed_elsewhere(key, entry):
                state.remove(key)
                summary.add("released")
                continue
            try:
                self.servicenow.update_record(entry[_CLASS], entry[_SYS_ID], dict(RETIRED))
            except ServiceNowError as exc:
                if exc.status != 404:
                    raise
                log.info("The CI of sensor %s of %s (%s) no longer exists; forgetting it", key, self.source_id,
                         entry[_SYS_ID])
                state.remove(key)
                continue
            summary.add("retired")
            log.info("Retired sensor %s of %s: %s %s", key, self.source_id, entry[_CLASS], entry[_SYS_ID])
            state.put(key, [entry[_D], entry[_SYS_ID], entry[_CLASS], 0, 1])

    def _claimed_elsewhere(self, key: str, entry: list) -> bool:
        """True when another ``sys_object_source`` row points at the sensor's CI: then only this source's own
        row is deleted (the last source to lose the sensor retires it)."""
        rows = self.servicenow.query_in("sys_object_source", "target_sys_id", [entry[_SYS_ID]],
                                        fields=["sys_id", "name", "id", "target_sys_id"])
        own = sensor_native_key(self.source_id, key)
        mine = [r for r in rows if r.get("name") == self.source_name and r.get("id") == own]
        if len(mine) == len(rows):
            return False
        for row in mine:
            self.servicenow.delete_record("sys_object_source", row["sys_id"])
        log.info("Sensor %s of %s is gone from this source, but its CI %s is still reported by another source: "
                 "the CI stays, this source's claim is released", key, self.source_id, entry[_SYS_ID])
        return True

    # ------------------------------------------------------------------ device -> sensor relations
    def _link_devices(self, device_sensor: dict[int, str], state: DepthState, links: DepthState,
                      summary: DepthSummary) -> None:
        devices = device_cis(self.store, self.source_id, self.max_value_bytes)
        wanted, stale = [], []
        for device_id, (device_sys, device_class) in devices.items():
            key = device_sensor.get(device_id)
            sensor = state.get(key) if key is not None else None
            if sensor is None or not sensor[_SYS_ID] or sensor[_RETIRED]:
                continue
            entry = links.get(str(device_id))
            if entry and entry[_SSYS] == sensor[_SYS_ID] and entry[_DSYS] == device_sys and not self.full_resync:
                summary.add("links_unchanged")
                continue
            if entry and entry[_OURS] and (entry[_SSYS], entry[_DSYS]) != (sensor[_SYS_ID], device_sys):
                stale.append((entry[_SSYS], entry[_DSYS]))   # the device moved to another sensor
            wanted.append((Link(str(device_id), End(sensor_native_key(self.source_id, key), NIDS),
                                End(f"{self.source_id}:{device_id}", device_class), DETECTS),
                           [key, sensor[_SYS_ID], device_sys]))
        for device_id, _ in list(links.items()):
            if int(device_id) not in devices and not self.dry_run:
                links.remove(device_id)   # the device CI was retired or released: its relation stays as history
        summary.add("links_removed", remove_relations(self.servicenow, stale, DETECTS, dry_run=self.dry_run))
        targets = {link.key: values for link, values in wanted}
        for result in relate(self.servicenow, [link for link, _ in wanted], source_name=self.source_name,
                             data_source=self.data_source, dry_run=self.dry_run, max_items=self.max_items):
            if result.error:
                summary.fail(f"relation of device {result.link.key} to sensor {targets[result.link.key][0]}",
                             result.error)
                continue
            summary.add("links_created" if result.created else "links_existing")
            if not self.dry_run:
                values, before = targets[result.link.key], links.get(result.link.key)
                ours = result.created or bool(before and before[:_OURS] == values and before[_OURS])
                links.put(result.link.key, [*values, int(ours)])
