"""Device vulnerabilities of the Azure simulator: ARG records of type
``microsoft.iotsecurity/locations/devicegroups/vulnerabilities`` in ``iotsecurityresources``, one per device and
CVE, for the same generated devices (and the same CVEs) as the appliance simulator's ``devicecves``.

Shape (research notes: Microsoft's Sentinel playbook CVEAutoWorkflow reads ``properties.deviceId``,
``vulnerabilityId``, ``severityScore`` and ``description`` from Resource Graph; the 2021-07-01-preview spec
example adds ``publishedDate``, ``lastModifiedDate``, ``severity``, ``source``, ``exploitType``,
``affectedVersions``): ``properties.deviceId`` is the device's ARM id -- ServiceNow's own Vulnerability Response
integration finds the CI by ``deviceid`` in ``sys_object_source``, where its Service Graph Connector stored the
device's ARM ``id`` (an inference: no document shows a literal value).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

VULNERABILITY_TYPE = "microsoft.iotsecurity/locations/devicegroups/vulnerabilities"
_SEVERITY = ((9.0, "Critical"), (7.0, "High"), (4.0, "Medium"), (0.1, "Low"), (0.0, "None"))


def severity(score: float) -> str:
    return next(name for floor, name in _SEVERITY if score >= floor)


def vulnerability_records(device: dict, cves: list[tuple[str, str, str, str]], *,
                          anchor: datetime) -> list[dict[str, Any]]:
    """The vulnerability records of one device record (``cves``: the inventory's (id, score, vector, text))."""
    device_id = device.get("id")
    if not device_id or "/devices/" not in device_id:
        return []
    group_path = device_id.rsplit("/devices/", 1)[0]
    out = []
    for k, (cve_id, score, _vector, description) in enumerate(cves):
        name = hashlib.sha1(f"{device_id.lower()}|{cve_id}".encode()).hexdigest()
        published = anchor - timedelta(days=400 + 37 * k)
        out.append({
            "id": f"{group_path}/vulnerabilities/{name}", "name": name, "type": VULNERABILITY_TYPE,
            "tenantId": device.get("tenantId"), "subscriptionId": device.get("subscriptionId"),
            "location": device.get("location"), "resourceGroup": "",
            "properties": {
                "deviceId": device_id, "vulnerabilityId": cve_id, "severityScore": float(score),
                "severity": severity(float(score)), "description": description, "source": "NVD",
                "exploitType": "Verified" if float(score) >= 10 else "Unknown",
                "publishedDate": published.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "lastModifiedDate": (published + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "affectedVersions": [],
            },
        })
    return out
