"""The fixed data behind the generated Defender for IoT inventories (:mod:`.inventory`): Defender's
enumerations (severities, engines, device types, operating systems, protocols) and how device types are
classified, the vendor / name / firmware / CVE catalogs the generator draws from, the quirks it injects,
and Microsoft's documented sample records, kept verbatim as valid JSON.
"""

from __future__ import annotations

import copy

# --------------------------------------------------------------------------- enumerations (defender-api.md §5)

SEVERITIES = ["Warning", "Minor", "Major", "Critical"]
ENGINES = ["Protocol Violation", "Policy Violation", "Malware", "Anomaly", "Operational"]

DEVICE_TYPES = [
    "Engineering Station", "PLC", "Historian", "HMI", "Domain Controller", "DB Server", "Wireless Access Point",
    "Router", "Switch", "Workstation", "Server", "IP Camera", "Printer", "Multicast/Broadcast", "Internet",
    "Firewall", "Terminal Station", "VPN Gateway", "Group", "IED", "DCS Controller", "RTU", "NTP Server", "Storage",
    "Industrial Packaging System", "Industrial Scale", "Industrial Robot", "Slot", "Punch Clock", "ATM", "Smart TV",
    "Game console", "DVR", "Door Control Panel", "HVAC", "Thermostat", "Fire Alarm", "Smart Light", "Smart Switch",
    "Fire Detector", "IP Telephone", "Alarm System", "Alarm Siren", "Smart Phone", "Tablet", "Wifi Pineapple",
    "Motion Detector", "Elevator", "Humidity Sensor", "Physical Location", "Backup Server", "Meter",
    "Barcode Scanner", "Uninterruptable Power Supply", "Variable Frequency Drive", "Robot Controller",
    "Servo Drive", "Pneumatic Device", "Marquee", "People Counter System", "Intercom", "Turnstile", "I/O Adapter",
    "Protocol Converter", "KVM", "Web Guiding System", "Turbine", "External Management", "Embedded Device",
    "Unknown",
]

OPERATING_SYSTEMS = [
    "Windows 10", "Windows 10 32", "Windows 10 64", "Windows 2000", "Windows 7", "Windows 7 32", "Windows 7 64",
    "Windows 8", "Windows 8 32", "Windows 8 64", "Windows 8.1", "Windows 8.1 32", "Windows 8.1 64", "Windows NT",
    "Windows Server 2003", "Windows Server 2003 R2", "Windows Server 2008", "Windows Server 2008 32",
    "Windows Server 2008 64", "Windows Server 2008 R2", "Windows Server 2012", "Windows Server 2012 R2",
    "Windows Server 2016", "Windows Vista", "Windows Vista 32", "Windows Vista 64", "Windows XP", "Mac OS",
    "Mac OS X", "Linux", "Windows Server 2019", "HP UX", "Windows 11", "Windows 11 32", "Windows 11 64",
]

PROTOCOL_NAMES = [
    "Unknown", "DNP3", "MODBUS", "C37.118", "SSH", "HTTP", "SYSLOG", "GENERIC", "ICMP", "DNS", "GOOSE", "MMS",
    "MALFORMED", "IEC-60870", "OPC UA", "Siemens S7", "ARP", "Sampled Values", "EtherNet/IP", "Siemens S7 Plus",
    "Motorola MDLC", "Netbios Name Service", "Netbios Datagram Service", "Lightweight Access Point", "CAPWAP",
    "SNMP", "DTLS", "TNS", "Database", "SRTP", "RPC", "OPC", "DF-1", "DH-485", "TDS", "SMB", "Suitelink",
    "ControlNet", "FTP", "CDP", "Profinet DCP", "Profinet Real-Time", "LLDP", "Telnet", "DeltaV", "BACNet", "AMS",
    "TwinCAT", "Ovation ADMD", "Ovation SSRPC", "Ovation DPUSTAT", "Port Map", "STP", "Telvent OASyS Tags",
    "Mitsubishi MELSEC", "Honeywell Control Data Access", "Yokogawa HIS Equalize", "Emerson OpenBSI",
    "Siemens SICAM", "Omron FINS", "Toshiba Computer Link", "Foxboro I/A", "Yokogawa VNet/IP", "Emerson ROC",
    "ABB Totalflow", "Siemens Process Historian Discovery", "Siemens WinCC Agent", "LonTalk",
    "Common ASCII Message", "CodeSys", "SAIA S-Bus", "MDNS", "Bently Nevada",
]
# Internal protocol ids: sequential, with "Omron FINS" = 62 as in the documented sample.
PROTOCOL_IDS = {name: (i + 1 if i < 59 else i + 3) for i, name in enumerate(PROTOCOL_NAMES)}

ICS_TYPES = {"PLC", "HMI", "Historian", "Engineering Station", "IED", "DCS Controller", "RTU", "Industrial Robot",
             "Industrial Packaging System", "Industrial Scale", "Slot", "Meter", "Variable Frequency Drive",
             "Robot Controller", "Servo Drive", "Pneumatic Device", "I/O Adapter", "Protocol Converter",
             "Web Guiding System", "Turbine", "Uninterruptable Power Supply"}
NETWORK_TYPES = {"Wireless Access Point", "Router", "Switch", "Firewall", "VPN Gateway", "Multicast/Broadcast",
                 "Internet", "Group", "Wifi Pineapple", "KVM", "External Management"}
IT_TYPES = {"Domain Controller", "DB Server", "Workstation", "Server", "Printer", "Terminal Station", "NTP Server",
            "Storage", "Backup Server", "Smart Phone", "Tablet", "Physical Location", "Unknown"}
SUPERVISORY_TYPES = {"HMI", "Historian", "Engineering Station"}
WITH_OS = {"Engineering Station", "HMI", "Historian", "Domain Controller", "DB Server", "Workstation", "Server",
           "Terminal Station", "Backup Server", "NTP Server", "Storage"}
WITH_OS_ORDER = sorted(WITH_OS)
WITH_FIRMWARE = {"PLC", "IED", "DCS Controller", "RTU", "Slot", "Robot Controller", "Variable Frequency Drive",
                 "Servo Drive", "Industrial Robot", "I/O Adapter", "Protocol Converter", "Meter"}


def device_category(device_type: str) -> str:
    """v3 ``u_device_type.u_category``: IT, ICS, IoT or Network."""
    if device_type in ICS_TYPES:
        return "ICS"
    if device_type in NETWORK_TYPES:
        return "Network"
    if device_type in IT_TYPES:
        return "IT"
    return "IoT"


def default_purdue_layer(device_type: str) -> str:
    """v3 ``u_device_type.u_purdue_layer``: the default layer of the device type."""
    category = device_category(device_type)
    if category == "ICS":
        return "Supervisory" if device_type in SUPERVISORY_TYPES else "Process Control"
    return "Enterprise"


VENDORS = {
    "ICS": ["Siemens AG", "Rockwell Automation", "Schneider Electric", "HILSCHER GMBH", "OMRON Corporation",
            "ABB Switzerland Ltd, Power Systems", "Phoenix Contact", "Beckhoff Automation", "Yokogawa Electric",
            "Honeywell", "Emerson Process Management", "Mitsubishi Electric", "Moxa Technologies",
            "Schweitzer Engineering Laboratories", "Wago Kontakttechnik"],
    "IT": ["Dell Inc.", "Hewlett Packard", "Lenovo", "Microsoft Corporation", "VMware, Inc.", "Fujitsu"],
    "Network": ["Cisco Systems", "Juniper Networks", "Fortinet", "TP-LINK TECHNOLOGIES", "Hirschmann", "Aruba"],
    "IoT": ["Axis Communications AB", "Hikvision", "Bosch Security Systems", "Johnson Controls", "Honeywell",
            "Samsung Electronics"],
}
# Made-up OUIs (locally administered bit set) so generated MACs never collide with real vendors' blocks.
_OUI = {"ICS": 0x020A21, "IT": 0x02D0B8, "Network": 0x02C0FF, "IoT": 0x02AC34}

NAME_STEMS = {"ICS": ["PLC-Line", "RTU-Feeder", "IED-Bay", "HMI-Ctrl", "DCS-Unit", "Drive-Pump"],
              "IT": ["WS-ENG", "SRV-APP", "DC", "DB", "PRN-Office", "TAB"],
              "Network": ["SW-Core", "RTR-Edge", "FW-DMZ", "AP-Floor"],
              "IoT": ["CAM-Gate", "HVAC-Hall", "Badge-Door", "Meter-Room"]}
TYPE_STEMS = {"PLC": "PLC-Line", "HMI": "HMI-Ctrl", "RTU": "RTU-Feeder", "IED": "IED-Bay", "DCS Controller": "DCS-Unit",
              "Engineering Station": "EWS", "Historian": "HIST", "Workstation": "WS-ENG", "Server": "SRV-APP",
              "Domain Controller": "DC", "DB Server": "DB", "Switch": "SW-Core", "Router": "RTR-Edge",
              "Firewall": "FW-DMZ", "IP Camera": "CAM-Gate", "Printer": "PRN-Office"}
NON_ASCII_NAMES = ["Pumpe-Süd-{n}", "Contrôleur-Four-{n}", "水处理-PLC-{n}", "Насос-{n}", "Válvula-Ñandú-{n}",
                   "Kühlturm Nord #{n}"]
LONG_NAME = "Very-Long-Device-Name-Imported-From-Asset-Register-" + "Segment-" * 40

# Every 50 consecutive ids carry each of these once (position = (7 * id + seed) % 50), so any inventory of at
# least 50 devices has all of them. The first two make the record invalid on purpose.
QUIRKS = ["malformed_ip", "malformed_mac", "long_name", "non_ascii_name", "ipv6", "no_mac_no_ip", "several_ips",
          "mac_bare", "mac_dashes", "mac_upper", "mac_dotted", "two_macs", "ip_empty_list", "protocols_null",
          "no_dynamic_flag", "vendor_null", "unauthorized", "scanner"]

FIRMWARE_MODULES = ["Network: Local network (0), Node: 0, Unit: CPU (0x0)",
                    "Network: Local network (0), Node: 0, Unit: Unknown (0x3)",
                    "Network: 3, Node: 0, Unit: CPU (0x0)", "Rack 0, Slot 2", "Backplane 1, Slot 4"]
FIRMWARE_MODELS = ["6ES7 315-2EH14-0AB0", "1756-L73", "CJ2M-CPU33", "TM241CE24R", "SEL-751", "AAAAAAAAAA"]

CONNECTION_PROTOCOLS = [("modbus", ["Read Coils", "Read Holding Registers", "Write Single Register"]),
                        ("s7comm", ["Download block", "Upload"]), ("ams", ["AMS Write"]), ("http", []),
                        ("dnp3", ["Read", "Direct Operate"]), ("cip", ["Get Attribute Single"])]

CVE_CATALOG = [
    ("CVE-2015-6490", "10.0", "NETWORK", "Frosty URL - Stack-based buffer overflow on Allen-Bradley MicroLogix 1100 "
     "devices before B FRN 15.000 and 1400 devices through B FRN 15.003 allows remote attackers to execute "
     "arbitrary code via unspecified vectors"),
    ("CVE-2012-6437", "10.0", "NETWORK", "MicroLogix 1100 and 1400 do not properly perform authentication for "
     "Ethernet firmware updates, which allows remote attackers to execute arbitrary code via a Trojan horse update "
     "image"),
    ("CVE-2015-2373", "10.0", "NETWORK", "The Remote Desktop Protocol (RDP) server service in Microsoft Windows 7 "
     "SP1, Windows 8, and Windows Server 2012 allows remote attackers to execute arbitrary code via a series of "
     "crafted packets, aka \"Remote Desktop Protocol (RDP) Remote Code Execution Vulnerability.\""),
    ("CVE-2007-0099", "9.3", "NETWORK", "Race condition in the msxml3 module in Microsoft XML Core Services 3.0 "
     "allows remote attackers to execute arbitrary code or cause a denial of service."),
    ("CVE-2012-6440", "9.3", "ADJACENT_NETWORK", "MicroLogix 1100 and 1400 allows man-in-the-middle attackers to "
     "conduct replay attacks via HTTP traffic."),
    ("CVE-2019-10915", "7.5", "LOCAL", "A vulnerability has been identified in TIA Administrator; the integrated "
     "configuration web application allows to execute certain application commands without proper authentication."),
]

# --------------------------------------------------------------------------- documented samples (valid JSON)

_SAMPLE_FIRMWARE = [
    {"slot": "N/A", "additionalData": "N/A", "moduleAddress": module, "rack": "N/A", "address": "10.4.14.102",
     "model": model, "serial": "N/A", "firmwareVersion": "20.55"}
    for module, model in [
        ("Network: Local network (0), Node: 0, Unit: CPU (0x0)", "AAAAAAAAAA"),
        ("Network: Local network (0), Node: 0, Unit: Unknown (0x3)", "AAAAAAAAAAAAAAAAAAAA"),
        ("Network: Local network (0), Node: 3, Unit: CPU (0x0)", "AAAAAAAAAAAAAAAAAAAA"),
        ("Network: 3, Node: 0, Unit: CPU (0x0)", "AAAAAAAAAAAAAAAAAAAA"),
    ]
]
SAMPLE_SENSOR_DEVICE = {
    "vendor": None, "name": "10.4.14.102", "firmware": _SAMPLE_FIRMWARE, "id": 79, "macAddresses": None,
    "authorized": True, "ipAddresses": ["10.4.14.102"], "engineeringStation": False, "type": "PLC",
    "operatingSystem": None, "protocols": [{"addresses": [], "id": 62, "name": "Omron FINS"}], "scanner": False,
}
SAMPLE_CM_DEVICE = {"sensorId": 7, "zoneId": 1, "siteId": 1, **SAMPLE_SENSOR_DEVICE}

SAMPLE_SENSOR_ALERTS = [  # [S-ALERT], with the docs' key typo and trailing comma fixed
    {"engine": "Policy Violation", "severity": "Major", "title": "Internet Access Detected",
     "additionalInformation": {"information": ["170.60.50.201 over port BACnet (47808)"],
                               "description": "External Addresses"},
     "sourceDevice": None, "destinationDevice": None, "time": 1509881077000,
     "message": "Device 192.168.0.13 tried to access an external IP address which is an address in the Internet "
                "and is not allowed by policy. It is recommended to notify the security officer of the incident.",
     "id": 1},
    {"engine": "Protocol Violation", "severity": "Major",
     "title": "Illegal MODBUS Operation (Exception Raised by Master)", "sourceDevice": 3, "destinationDevice": 4,
     "time": 1505651605000,
     "message": "A MODBUS master 192.168.110.131 attempted to initiate an illegal operation.\nThe operation is "
                "considered to be illegal since it incorporated function code #129 which should not be used by a "
                "master.\nIt is recommended to notify the security officer of the incident.",
     "id": 2, "additionalInformation": None},
]
SAMPLE_CM_ALERTS = [  # [M-ALERT] v1
    {"engine": "Operational", "handled": False, "title": "Traffic Detected on sensor Interface",
     "additionalInformation": None, "sourceDevice": 0, "zoneId": 1, "siteId": 1, "time": 1594808245000,
     "sensorId": 1, "message": "The sensor resumed detecting network traffic on ens224.", "destinationDevice": 0,
     "id": 1, "severity": "Warning"},
    {"engine": "Anomaly", "handled": False, "title": "Address Scan Detected", "additionalInformation": None,
     "sourceDevice": 4, "zoneId": 1, "siteId": 1, "time": 1594808260000, "sensorId": 1,
     "message": "Address scan detected.\nScanning address: 10.10.10.22\nScanned subnet: 10.11.0.0/16\nScanned "
                "addresses: 10.11.1.1, 10.11.20.1, 10.11.20.10, 10.11.20.100, 10.11.20.2, 10.11.20.3, 10.11.20.4, "
                "10.11.20.5, 10.11.20.6, 10.11.20.7...\nIt is recommended to notify the security officer of the "
                "incident.",
     "destinationDevice": 0, "id": 2, "severity": "Critical"},
    {"engine": "Operational", "handled": False, "title": "Suspicion of Unresponsive MODBUS Device",
     "additionalInformation": None, "sourceDevice": 194, "zoneId": 1, "siteId": 1, "time": 1594808285000,
     "sensorId": 1, "message": "Outstation device 10.13.10.1 (Protocol Address 53) seems to be unresponsive to "
                               "MODBUS requests.",
     "destinationDevice": 0, "id": 3, "severity": "Minor"},
]
SAMPLE_V3_DEVICE = {
    "u_operating_system": "",
    "u_ip_address_objects": [{"u_ip_address": "10.10.50.5",
                              "u_guessed_mac_addresses": [{"u_mac_address": "00:02:a2:1f:1c:59"}]}],
    "u_zone": "asd", "u_name": "10.10.50.5", "u_mac_address_objects": [{"u_mac_address": "00:02:a2:1f:1c:59"}],
    "u_last_update": 1664782919000, "u_vendor": "HILSCHER GMBH",
    "u_cm_device_url": "https://<IP address>/#/sites/1/zones/1/devices-maps?devices=1",
    "u_sensor_ids": [{"u_sensor_id": 1}], "u_appliance": "Management console (CM)", "u_site": "asd",
    "u_device_type": {"u_category": "ICS", "u_purdue_layer": "Process Control", "u_name": "PLC"},
    "u_firmwares": [], "u_last_activity": 1664782791000, "u_purdue_layer": "N/A",
    "u_device_urls": [{"u_device_url": "https://<IP address>9/#/assets/highlight/1"}],
    "u_vlans": [{"u_vlan": "1"}], "u_groups": ["asd"], "u_first_discovered": 1664781051000, "u_id": 1,
    "u_protocol_objects": [{"u_protocol": "MODBUS"}],
}
SAMPLE_APPLIANCE = {
    "dataIntelligenceVersion": "Dec 22, 2021", "name": "Microsoft Defender for IoT", "isActivated": True,
    "hasLog": False, "zoneId": None, "upgradeStatus": None, "deviceCount": 22,
    "state": {"sensorLastMessage": 1660217831000, "xsenseId": 1, "sensorSyncedUntil": 1660217741000,
              "connectionState": {"isConsideredConnected": True, "id": 1,
                                  "description": "Connection is successful"},
              "cmSyncedUntil": 1660217825000, "id": 1},
    "version": "22.1.4.8-r-6372aad", "alertCount": 9, "upgradeFinishTime": None,
    "uid": "a6218f1a-8ebf-4bb3-8613-c859b17eef01", "interfaceAddress": "https://173.70.549.76", "id": 1,
    "unhandledAlertsCount": 9,
}
SAMPLE_V3_SENSOR = {
    "u_connection_state": "SYNCED", "u_uid": "fab58081-1fde-4d3f-8eea-9aa723abbd55",
    "u_name": "Microsoft Defender for IoT", "u_is_activated": True, "u_alert_count": 6, "u_device_count": 202,
    "u_interface_address": "https://<IP address>9", "u_zone_id": 1, "u_data_intelligence_version": "May 26, 2022",
    "u_is_in_learning_mode": False, "u_unhandled_alert_count": 6, "u_remote_upgrade_stage": "", "u_id": 1,
    "u_version": "22.2.5.7-r-2121448",
}
SAMPLE_DELETED_DEVICES = [{"u_id": 192}, {"u_id": 66}, {"u_id": 4}, {"u_id": 22}, {"u_id": 24}]
SAMPLE_HANDLE_OK = {"content": "Alert update request finished successfully"}
SAMPLE_HANDLE_INVALID = {"error": "Invalid action"}


def samples() -> dict:
    """Deep copies of the documented sample records, for fixtures."""
    return copy.deepcopy({
        "sensor_device": SAMPLE_SENSOR_DEVICE, "cm_device": SAMPLE_CM_DEVICE, "sensor_alerts": SAMPLE_SENSOR_ALERTS,
        "cm_alerts": SAMPLE_CM_ALERTS, "v3_device": SAMPLE_V3_DEVICE, "appliance": SAMPLE_APPLIANCE,
        "v3_sensor": SAMPLE_V3_SENSOR, "deleted_devices": SAMPLE_DELETED_DEVICES,
        "handle_ok": SAMPLE_HANDLE_OK, "handle_invalid": SAMPLE_HANDLE_INVALID,
    })
