"""IRE items the device sync derives from a mapped item: first contact, rename, entries dropped for
instances without a rule (moved from :mod:`.sync`)."""

from __future__ import annotations

import re

# IRE item errors for entries the instance has no identification rule for: resend without those entries.
_MISSING_RULE = {"IDENTIFICATION_RULE_FOR_RELATED_ITEM_MISSING": "related",
                 "IDENTIFICATION_RULE_FOR_LOOKUP_MISSING": "lookup"}
_TABLE_IN_MESSAGE = re.compile(r"\[([A-Za-z0-9_]+)\]")


def without_entries(item: dict, part: str, table: str) -> dict:
    """``item`` without its ``part`` (``related`` or ``lookup``) entries of ``table``."""
    return {**item, part: [e for e in item.get(part) or [] if e.get("className") != table]}


def first_contact_item(item: dict, *, match_by_name: bool = False) -> dict | None:
    """The item to send for a device ServiceNow has not confirmed yet.

    ServiceNow's Hardware Rule tries the serial, then ``name``, and only then the MAC (with the adapter's
    name), and Defender names are often an IP or a label shared by devices at other sites: a name match
    would merge two devices. So the first
    contact carries the MAC (else the serial) as the name -- ServiceNow's own advice for CIs known by MAC --
    and the real name follows in a second item, matched through ``sys_object_source``. A device with no
    serial or MAC of its own gets its source key (``<conn id>:<device id>``) as first name, so it gets a CI
    of its own. ``match_by_name`` (opt-in, ``DEFENDER_SYNC_MATCH_BY_NAME``): such a device is sent as it
    is and may join an existing CI of the same name. None: the item is sent as it is.
    """
    values = item["values"]
    macs = [x["values"]["mac_address"] for x in item["lookup"] if x["className"] == "cmdb_ci_network_adapter"]
    identifier = macs[0] if macs else values.get("serial_number")
    if not identifier and not match_by_name:
        identifier = item["sys_object_source_info"]["source_native_key"]
    if not identifier or values.get("name") == identifier:
        return None
    return {**item, "values": {**values, "name": identifier}}


def rename_item(item: dict, class_name: str | None = None) -> dict:
    """The follow-up of a first contact: only the real name, matched to the CI through ``sys_object_source``
    (the first contact already wrote every other value, lookup and related entry). A few hundred bytes, so
    these go in larger batches (``DeviceSync(rename_batch_size=)``)."""
    return {"className": class_name or item["className"], "values": {"name": item["values"]["name"]},
            "sys_object_source_info": dict(item["sys_object_source_info"])}
