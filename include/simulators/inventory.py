"""Deterministic, messy-but-realistic Defender for IoT inventories and alerts (simulators, tests, benchmarks).

Everything is derived from ``(seed, id)`` so a 100,000-device inventory needs no storage: a device is built
when it is asked for (:meth:`Inventory.device`), and only a few compact arrays (sensor, authorized flag,
first-seen and last-update times) are kept for filtering. Times are offsets back from ``anchor_ms``; with the
same seed and anchor the output is identical.

Data shapes follow Microsoft's published Defender for IoT API documentation. The documented sample records are
kept verbatim (as valid JSON) in the ``SAMPLE_*`` constants; inventory device 79 carries the documented
sample device body. On purpose, some records are messy (no MAC/IP, several IPs, IPv6, odd MAC formats,
non-ASCII and very long names, ``N/A`` firmware values) and a few are invalid (a malformed IP, a malformed
MAC) — see :data:`QUIRKS`. That fixed data (enumerations, catalogs, samples) lives in :mod:`.inventory_catalog`;
this module generates from it.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import random
from array import array
from collections.abc import Iterator

from include.simulators.inventory_catalog import (  # noqa: F401  (re-exported)
    _OUI,
    _SAMPLE_FIRMWARE,
    CONNECTION_PROTOCOLS,
    CVE_CATALOG,
    DEVICE_TYPES,
    ENGINES,
    FIRMWARE_MODELS,
    FIRMWARE_MODULES,
    ICS_TYPES,
    IT_TYPES,
    LONG_NAME,
    NAME_STEMS,
    NETWORK_TYPES,
    NON_ASCII_NAMES,
    OPERATING_SYSTEMS,
    PROTOCOL_IDS,
    PROTOCOL_NAMES,
    QUIRKS,
    SAMPLE_APPLIANCE,
    SAMPLE_CM_ALERTS,
    SAMPLE_CM_DEVICE,
    SAMPLE_DELETED_DEVICES,
    SAMPLE_HANDLE_INVALID,
    SAMPLE_HANDLE_OK,
    SAMPLE_SENSOR_ALERTS,
    SAMPLE_SENSOR_DEVICE,
    SAMPLE_V3_DEVICE,
    SAMPLE_V3_SENSOR,
    SEVERITIES,
    SUPERVISORY_TYPES,
    TYPE_STEMS,
    VENDORS,
    WITH_FIRMWARE,
    WITH_OS,
    WITH_OS_ORDER,
    default_purdue_layer,
    device_category,
    samples,
)

# --------------------------------------------------------------------------- sensors, sites, zones

SITE_NAMES = ["Plant Nord", "Usine Île-de-France", "Water Works East", "Refinery 7", "Substation Süd"]


def topology(sensors: int) -> list[dict]:
    """Sensors of a management console: sensor i sits in zone i; two zones share a site."""
    out = []
    for i in range(1, sensors + 1):
        site_id = (i + 1) // 2
        out.append({"sensor_id": i, "sensor_name": f"OT-Sensor-{i:02d}", "zone_id": i,
                    "zone_name": f"Zone {chr(64 + (i - 1) % 26 + 1)}{'' if i <= 26 else i}",
                    "site_id": site_id, "site_name": SITE_NAMES[(site_id - 1) % len(SITE_NAMES)]
                    + ("" if site_id <= len(SITE_NAMES) else f" {site_id}")})
    return out


# --------------------------------------------------------------------------- devices

DAY_MS = 86_400_000


def _format_mac(value: int, style: str) -> str:
    raw = f"{value:012x}"
    pairs = [raw[i:i + 2] for i in range(0, 12, 2)]
    if style == "mac_bare":
        return raw.upper()
    if style == "mac_dashes":
        return "-".join(pairs)
    if style == "mac_upper":
        return ":".join(pairs).upper()
    if style == "mac_dotted":
        return ".".join(raw[i:i + 4] for i in range(0, 12, 4))
    return ":".join(pairs)


# Extra device-to-device links (``Inventory(links_per_device=)``, e.g. for the relations benchmark).
LINK_OFFSETS = (7, 13, 29, 61, 113, 227, 449, 887)


class Inventory:
    """A device inventory of ``n`` generated devices (ids 1..n), built on demand from ``(seed, id)``."""

    def __init__(self, n: int, seed: int = 1, *, sensors: int = 1, anchor_ms: int = 1_735_689_600_000,
                 with_sample: bool = True, links_per_device: float = 0):
        self.n, self.seed, self.sensors, self.anchor_ms = n, seed, max(1, sensors), anchor_ms
        self.links_per_device = max(0.0, min(float(links_per_device), len(LINK_OFFSETS)))
        self.with_sample = with_sample
        self.topology = topology(self.sensors)
        # Compact per-device columns (index 0 unused) used for filtering without building devices.
        self.sensor_id = array("H", [0]) * (n + 1)
        self.authorized = bytearray(n + 1)
        self.first_seen = array("q", [0]) * (n + 1)
        self.last_update = array("q", [0]) * (n + 1)
        for device_id in range(1, n + 1):
            core = self._core(random.Random(f"{seed}:{device_id}"), device_id)
            self.sensor_id[device_id], self.authorized[device_id] = core[0], core[1]
            self.first_seen[device_id], self.last_update[device_id] = core[2], core[3]
        if with_sample and n >= 79:
            self.authorized[79] = 1   # device 79 carries the documented sample body (authorized)

    def quirk(self, device_id: int) -> str | None:
        position = (7 * device_id + self.seed) % 50
        return QUIRKS[position] if position < len(QUIRKS) else None

    def _core(self, rng: random.Random, device_id: int) -> tuple[int, int, int, int]:
        sensor_id = rng.randint(1, self.sensors)
        authorized = int(rng.random() < 0.85 and self.quirk(device_id) != "unauthorized")
        first_seen = self.anchor_ms - rng.randint(8 * DAY_MS, 400 * DAY_MS) // 1000 * 1000
        last_update = self.anchor_ms - rng.randint(60_000, 7 * DAY_MS) // 1000 * 1000
        return sensor_id, authorized, first_seen, last_update

    def device(self, device_id: int) -> dict:
        """The full internal record of generated device ``device_id`` (API keys plus internal extras).

        Ids 1..70 cover every documented device type, ids 71..105 every documented operating system.
        """
        if not 1 <= device_id <= self.n:
            raise KeyError(device_id)
        rng = random.Random(f"{self.seed}:{device_id}")
        sensor_id, authorized, first_seen, _ = self._core(rng, device_id)
        last_update = self.last_update[device_id]
        place = self.topology[sensor_id - 1]
        quirk = self.quirk(device_id)
        os_slot = device_id - len(DEVICE_TYPES) - 1   # the next ids cover every documented OS
        if device_id <= len(DEVICE_TYPES):   # the first ids cover every documented type
            device_type = DEVICE_TYPES[(device_id - 1 + self.seed) % len(DEVICE_TYPES)]
        elif 0 <= os_slot < len(OPERATING_SYSTEMS):
            device_type = WITH_OS_ORDER[os_slot % len(WITH_OS_ORDER)]
        else:
            device_type = rng.choice(["PLC"] * 6 + ["HMI"] * 2 + ["Workstation"] * 3 + ["Switch"] * 2 + ["IED"] * 2
                                     + ["RTU", "Server", "IP Camera", "Engineering Station"] + DEVICE_TYPES)
        category = device_category(device_type)
        vendor = None if quirk == "vendor_null" or rng.random() < 0.08 else rng.choice(VENDORS[category])
        ip = str(ipaddress.IPv4Address(0x0A000000 + (sensor_id << 18) + device_id))
        ips: list[str] | None = [ip]
        if quirk == "several_ips" or rng.random() < 0.05:
            ips.append(f"192.168.{device_id % 250}.{(device_id // 250) % 250 + 1}")
        if quirk == "ipv6":
            ips.append(f"fe80::{device_id:x}:1")
        elif rng.random() < 0.02:
            ips = [f"2001:db8:{sensor_id:x}::{device_id:x}"]
        if quirk == "malformed_ip":
            ips = [f"10.{sensor_id}.300.{device_id % 250}"]
        elif quirk == "ip_empty_list":
            ips = []
        mac_value = (_OUI[category] << 24) + (device_id * 2654435761 + self.seed) % (1 << 24)
        mac_style = quirk if quirk in ("mac_bare", "mac_dashes", "mac_upper", "mac_dotted") else "colon"
        macs: list[str] | None = [_format_mac(mac_value, mac_style)]
        if quirk == "two_macs":
            macs.append(_format_mac(mac_value ^ 0x800000, "colon"))
        elif quirk == "malformed_mac":
            macs = [_format_mac(mac_value, "colon")[:-3] + ":zz:9"]
        elif rng.random() < 0.08:   # routed traffic: the sensor does not see the MAC
            macs = None
        if quirk == "no_mac_no_ip":
            ips, macs = None, None
        name = self._name(rng, device_id, quirk, category, device_type, ips)
        protocols = None if quirk == "protocols_null" else self._protocols(rng, device_type, category)
        operating_system = (OPERATING_SYSTEMS[(device_id + self.seed) % len(OPERATING_SYSTEMS)]
                            if device_type in WITH_OS and rng.random() < 0.9 else None)
        if 0 <= os_slot < len(OPERATING_SYSTEMS):
            operating_system = OPERATING_SYSTEMS[os_slot]
        firmware = self._firmware(rng, ips) if device_type in WITH_FIRMWARE else []
        record = {
            "id": device_id, "name": name, "type": device_type, "vendor": vendor,
            "operatingSystem": operating_system, "ipAddresses": ips, "macAddresses": macs,
            "protocols": protocols, "firmware": firmware, "authorized": bool(authorized),
            "engineeringStation": device_type == "Engineering Station" or rng.random() < 0.01,
            "scanner": quirk == "scanner" or rng.random() < 0.01,
            "hasDynamicAddress": rng.random() < 0.1,
            "sensorId": sensor_id, "zoneId": place["zone_id"], "siteId": place["site_id"],
            "firstDiscovered": first_seen, "lastUpdate": last_update,
            "lastActivity": max(last_update, self.anchor_ms - rng.randint(0, 2 * DAY_MS) // 1000 * 1000),
            "purdueLayer": rng.choice(["N/A"] * 8 + ["Process Control", "Supervisory"]),
            "vlans": [str(rng.choice([1, 1, 10, 20, 100]))], "groups": [place["site_name"]],
        }
        if quirk == "no_dynamic_flag":
            del record["hasDynamicAddress"]
        if device_id == 79 and self.with_sample:   # the documented sample device body
            record.update(copy.deepcopy({k: v for k, v in SAMPLE_SENSOR_DEVICE.items() if k != "id"}))
            record.pop("hasDynamicAddress", None)
        return record

    def _name(self, rng, device_id, quirk, category, device_type, ips) -> str:
        if quirk == "long_name":
            return f"{LONG_NAME}{device_id}"
        if quirk == "non_ascii_name":
            return rng.choice(NON_ASCII_NAMES).format(n=device_id)
        if ips and rng.random() < 0.3:   # the sensor names devices it cannot resolve by their address
            return ips[0]
        stem = TYPE_STEMS.get(device_type) or rng.choice(NAME_STEMS[category])
        return f"{stem}-{device_id:05d}"

    def _protocols(self, rng, device_type, category) -> list[dict]:
        if category == "ICS":
            pool = ["MODBUS", "DNP3", "Siemens S7", "EtherNet/IP", "OPC UA", "IEC-60870", "GOOSE", "MMS",
                    "Omron FINS", "Profinet Real-Time", "BACNet", "CodeSys"]
        elif category == "IT":
            pool = ["HTTP", "SSH", "SMB", "RPC", "DNS", "Netbios Name Service", "Database", "TDS", "FTP"]
        elif category == "Network":
            pool = ["SNMP", "CDP", "LLDP", "STP", "SSH", "Telnet", "CAPWAP", "ICMP"]
        else:
            pool = PROTOCOL_NAMES   # IoT devices: anything, so every documented protocol appears
        names = rng.sample(pool, rng.randint(1, 3))
        out = []
        for name in names:
            addresses = rng.choice([[], [], ["Master"], [str(rng.randint(1, 247))], ["N/A"]])
            out.append({"addresses": addresses, "id": PROTOCOL_IDS[name], "name": name})
        return out

    def _firmware(self, rng, ips) -> list[dict]:
        address = ips[0] if ips else "N/A"
        modules = []
        for _ in range(rng.randint(1, 3)):
            known = rng.random() < 0.6
            modules.append({
                "slot": str(rng.randint(0, 12)) if known else "N/A",
                "additionalData": "N/A", "moduleAddress": rng.choice(FIRMWARE_MODULES),
                "rack": str(rng.randint(0, 3)) if known else "N/A", "address": address,
                "model": rng.choice(FIRMWARE_MODELS),
                "serial": f"S C-{rng.randint(10**7, 10**8 - 1)}" if known else "N/A",
                "firmwareVersion": rng.choice(["20.55", "V4.2.3", "3.12", "N/A", "32.011"]),
            })
        return modules

    # ----------------------------------------------------------------------- connections and CVEs

    def neighbours(self, device_id: int) -> list[int]:
        """Connected device ids: a chain (i, i+1) unless i % 3 == 0, and a hub per block of 50 devices."""
        out = []
        if device_id > 1 and (device_id - 1) % 3 != 0:
            out.append(device_id - 1)
        if device_id < self.n and device_id % 3 != 0:
            out.append(device_id + 1)
        hub = (device_id - 1) // 50 * 50 + 1
        if device_id != hub:
            out.append(hub)
        else:
            out.extend(range(device_id + 1, min(device_id + 50, self.n + 1)))
        for j, offset in enumerate(LINK_OFFSETS[:math.ceil(self.links_per_device)]):
            if device_id + offset <= self.n and self._extra_link(device_id, j):
                out.append(device_id + offset)
            if device_id - offset >= 1 and self._extra_link(device_id - offset, j):
                out.append(device_id - offset)
        return sorted(set(out))

    def _extra_link(self, lower: int, j: int) -> bool:
        """Whether the extra link ``lower`` -- ``lower + LINK_OFFSETS[j]`` exists (``links_per_device``
        extra links per device on average; a property of the link, so both ends agree)."""
        whole = int(self.links_per_device)
        return j < whole or (lower * 2654435761 + j * 97) % 1000 < (self.links_per_device - whole) * 1000

    def connection(self, first: int, second: int) -> dict:
        rng = random.Random(f"{self.seed}:conn:{min(first, second)}:{max(first, second)}")
        name, commands = rng.choice(CONNECTION_PROTOCOLS)
        discovered = self.anchor_ms - rng.randint(DAY_MS, 300 * DAY_MS) // 1000 * 1000
        port = {"modbus": 502, "s7comm": 102, "ams": 48898, "http": 80, "dnp3": 20000, "cip": 44818}[name]
        return {"firstDeviceId": min(first, second), "secondDeviceId": max(first, second),
                "lastSeen": self.anchor_ms - rng.randint(0, DAY_MS) // 1000 * 1000, "discovered": discovered,
                "ports": [port], "protocols": [{"name": name, "commands": list(commands)}]}

    def cves(self, device_id: int) -> list[tuple[str, str, str, str]]:
        """CVEs found on a device (about one device in twenty has some)."""
        if device_id % 20 != 7:
            return []
        rng = random.Random(f"{self.seed}:cve:{device_id}")
        return rng.sample(CVE_CATALOG, rng.randint(1, 3))


def generate_devices(n: int, seed: int = 1, *, sensors: int = 1, anchor_ms: int = 1_735_689_600_000
                     ) -> Iterator[dict]:
    """Yield ``n`` generated internal device records (see :class:`Inventory`)."""
    inventory = Inventory(n, seed, sensors=sensors, anchor_ms=anchor_ms)
    for device_id in range(1, n + 1):
        yield inventory.device(device_id)


# --------------------------------------------------------------------------- alerts

# (title, engine, severity, kind, message template, remediation steps); kind: "device" alerts name a source
# (and often a destination) device; "system" notifications concern the appliance and name no device.
ALERT_TEMPLATES = [
    ("Internet Access Detected", "Policy Violation", "Major", "device",
     "Device {src} tried to access an external IP address which is an address in the Internet and is not allowed "
     "by policy. It is recommended to notify the security officer of the incident.",
     ["Check the device for unexpected software.", "Block the external address at the firewall if not needed."]),
    ("Illegal MODBUS Operation (Exception Raised by Master)", "Protocol Violation", "Major", "device",
     "A MODBUS master {src} attempted to initiate an illegal operation.\nThe operation is considered to be illegal "
     "since it incorporated function code #129 which should not be used by a master.\nIt is recommended to notify "
     "the security officer of the incident.", ["Verify the master's configuration."]),
    ("Illegal DNP3 Operation", "Protocol Violation", "Minor", "device",
     "A DNP3 Master {src} attempted to initiate a request which is not allowed by policy.",
     ["Review the DNP3 policy for the outstation {dst}."]),
    ("Firmware Version Changed", "Policy Violation", "Major", "device",
     "Firmware version of {dst} was changed by {src}.", ["Confirm the change was planned.",
                                                         "Compare the firmware with the approved baseline."]),
    ("Field Device Discovered Unexpectedly", "Policy Violation", "Major", "new_device",
     "A new field device {src} was detected in the network.", ["Authorize the device if it is expected."]),
    ("New Activity Detected - CIP Class", "Policy Violation", "Minor", "device",
     "New CIP traffic was detected between {src} and {dst}.", ["Learn the traffic if it is expected."]),
    ("New Port Discovery", "Policy Violation", "Warning", "device",
     "New port 4840 was discovered on device {dst}, accessed by {src}.", []),
    ("Suspicion of Malicious Activity (Regin)", "Malware", "Critical", "device",
     "Suspicious network activity was detected. Such behavior might be attributed to the Regin malware.",
     ["Isolate device {src}.", "Contact your incident response team."]),
    ("Suspicion of Conficker Malware", "Malware", "Critical", "device",
     "Device {src} is suspected to be infected by the Conficker malware.", ["Run an antivirus scan on {src}."]),
    ("Address Scan Detected", "Anomaly", "Critical", "device",
     "Address scan detected.\nScanning address: {src}\nScanned subnet: 10.11.0.0/16\nIt is recommended to notify "
     "the security officer of the incident.", ["Check whether {src} is an authorized scanner."]),
    ("Abnormal HTTP Communication Behavior", "Anomaly", "Minor", "device",
     "Device {src} sent abnormal HTTP requests to {dst}.", ["Review the web server logs of {dst}."]),
    ("Device is Suspected to be Disconnected (Unresponsive)", "Operational", "Major", "disconnection",
     "Device {src} is suspected to be disconnected (unresponsive).", ["Check the device's power and cabling."]),
    ("Suspicion of Unresponsive MODBUS Device", "Operational", "Minor", "device",
     "Outstation device {src} (Protocol Address 53) seems to be unresponsive to MODBUS requests.", []),
    ("PLC Stop Command Was Sent", "Operational", "Warning", "device",
     "A stop command was sent from {src} to PLC {dst}.", ["Confirm the stop was planned."]),
    ("No Traffic Detected on Sensor Interface", "Operational", "Major", "system",
     "The sensor stopped detecting network traffic on ens224.", ["Check the SPAN port and the cable."]),
    ("Traffic Detected on sensor Interface", "Operational", "Warning", "system",
     "The sensor resumed detecting network traffic on ens224.", []),
    ("Sensor Disconnected", "Operational", "Critical", "system",
     "The sensor {sensor} is not communicating with the management console.",
     ["Check the network path between the sensor and the management console."]),
]
ALERT_TYPE_FILTERS = {"disconnection": "disconnections", "new_device": "unexpected new devices"}


def device_address(device: dict | None) -> str | None:
    """The address an alert shows for a device: its first IP, else its first MAC."""
    if not device:
        return None
    return (device.get("ipAddresses") or [None])[0] or (device.get("macAddresses") or [None])[0]


def make_alert(rng: random.Random, alert_id: int, time_ms: int, *, inventory: Inventory | None, device_lookup,
               sensor: dict, template_index: int | None = None, source_id=..., destination_id=...) -> dict:
    """One internal alert record (all v1/v2 and management-console keys; views pick theirs).

    ``source_id`` / ``destination_id`` force the devices (None: no device); by default they are picked.
    """
    index = rng.randrange(len(ALERT_TEMPLATES)) if template_index is None else template_index
    forced = source_id is not ...
    if forced and template_index is None:   # a forced device (or none): use a template that fits
        while (ALERT_TEMPLATES[index][3] == "system") != (not source_id):
            index = rng.randrange(len(ALERT_TEMPLATES))
    title, engine, severity, kind, message, steps = ALERT_TEMPLATES[index % len(ALERT_TEMPLATES)]
    src = dst = None
    if forced:
        src = device_lookup(source_id) if source_id else None
    elif kind != "system" and inventory is not None and inventory.n:
        for _ in range(20):  # pick an existing device of this sensor's inventory, with a protocol
            candidate = device_lookup(rng.randint(1, inventory.n))
            if candidate and candidate.get("protocols"):
                src = candidate
                break
    if destination_id is not ...:
        dst = device_lookup(destination_id) if destination_id else None
    elif src is not None and kind == "device" and inventory is not None and rng.random() < 0.8:
        neighbours = inventory.neighbours(src["id"]) if src["id"] <= inventory.n else []
        dst = device_lookup(rng.choice(neighbours)) if neighbours else None
    if src is not None and inventory is not None and 1 <= src.get("sensorId", 0) <= inventory.sensors:
        sensor = inventory.topology[src["sensorId"] - 1]   # the sensor that saw the device raised it
    fmt = {"src": device_address(src) or "N/A", "dst": device_address(dst) or "N/A", "sensor": sensor["sensor_name"]}
    info = None
    if title == "Internet Access Detected":
        info = {"description": "External Addresses", "information": ["170.60.50.201 over port BACnet (47808)"]}
    return {
        "id": alert_id, "uuid": f"{alert_id}-{time_ms}", "time": time_ms, "title": title,
        "message": message.format(**fmt), "severity": severity, "engine": engine,
        "sourceDevice": src["id"] if src else None, "destinationDevice": dst["id"] if dst else None,
        "sourceDeviceAddress": device_address(src), "destinationDeviceAddress": device_address(dst),
        "remediationSteps": [step.format(**fmt) for step in steps], "additionalInformation": info,
        "handled": False, "state": "unhandled", "kind": kind,
        "sensorId": sensor["sensor_id"], "sensorName": sensor["sensor_name"], "zoneId": sensor["zone_id"],
        "zoneName": sensor["zone_name"], "siteId": sensor["site_id"], "siteName": sensor["site_name"],
    }


def generate_alerts(count: int, seed: int = 1, *, inventory: Inventory | None = None, device_lookup=None,
                    start_ms: int = 1_735_689_600_000, first_id: int = 1, spacing_ms: int = 150_000) -> list[dict]:
    """``count`` alerts with increasing ids and times from ``start_ms``; the first ones cycle through every
    template, so every engine, every severity, system notifications and device alerts are present."""
    rng = random.Random(f"{seed}:alerts:{first_id}")
    lookup = device_lookup or (inventory.device if inventory else (lambda _id: None))
    sensors = inventory.topology if inventory else topology(1)
    out = []
    for offset in range(count):
        alert_id = first_id + offset
        template = (alert_id - 1) if alert_id <= len(ALERT_TEMPLATES) else None
        out.append(make_alert(rng, alert_id, start_ms + offset * spacing_ms, inventory=inventory,
                              device_lookup=lookup, sensor=rng.choice(sensors), template_index=template))
    return out
