"""The devices an alert names, for the forwarding (a mixin of :class:`~defender_servicenow.forwarding.AlertForwarder`):
the source's inventory for protocol rules (cached in the alerts asset's ``inventory:<source>``), the alert's
source / destination references, and their CIs in ServiceNow, looked up in bulk.

Uses the forwarder's ``state``, ``inventory_ms``, ``dry_run`` and ``source_name``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from defender_servicenow.forwarding_state import inventory_key
from defender_servicenow.hooks.servicenow_wire import in_queries
from defender_servicenow.hooks.servicenow_wire import sys_id_of as _ref
from defender_servicenow.models import Device
from defender_servicenow.records import AlertContext, DeviceRef


class DeviceReferences:
    def _devices(self, source: str, dhook, now_ms: int) -> dict[str, list]:
        """``{device id: [name, address, [protocols]]}`` of the source, for protocol rules: read from Defender
        at most every DEFENDER_SYNC_FREQUENCY_MINUTES, kept in ``inventory:<source>`` meanwhile."""
        cached = self.state.get(inventory_key(source))
        if isinstance(cached, Mapping) and 0 <= now_ms - int(cached.get("at_ms", 0)) < self.inventory_ms:
            return dict(cached.get("devices") or {})
        devices = {str(d.id): [d.name, next(iter(d.ip_addresses), None), list(d.protocols)]
                   for d in dhook.iter_devices() if isinstance(d, Device)}
        if not self.dry_run:
            self.state.set(inventory_key(source), {"at_ms": now_ms, "devices": devices})
        return devices

    @staticmethod
    def _device_ref(devices: Mapping[str, list], device_id: int | None, address: str | None) -> DeviceRef | None:
        if device_id is None and not address:
            return None
        device = devices.get(str(device_id)) if device_id is not None else None
        if device is None:
            return DeviceRef(device_id, None, address)
        name, first_address, protocols = device
        return DeviceRef(device_id, name, address or first_address, protocols=tuple(protocols))

    def _lookup_cis(self, hook, contexts: Sequence[AlertContext]) -> dict[str, tuple[str, str]]:
        """``"<conn>:<device id>"`` -> (cmdb_ci sys_id, CI name), in bulk (one query per chunk and table)."""
        native = sorted({f"{c.alert.source}:{ref.id}" for c in contexts for ref in (c.source, c.destination)
                         if ref and ref.id is not None})
        if not native:
            return {}
        links: dict[str, str] = {}
        for q in in_queries("id", native, prefix=f"name={self.source_name}"):
            for row in hook.query("sys_object_source", q, fields=["id", "target_sys_id"]):
                if _ref(row.get("target_sys_id")):
                    links[row.get("id")] = _ref(row.get("target_sys_id"))
        names: dict[str, str] = {}
        for q in in_queries("sys_id", sorted(set(links.values()))):
            for row in hook.query("cmdb_ci", q, fields=["sys_id", "name"]):
                names[row.get("sys_id")] = row.get("name") or ""
        return {key: (sys_id, names.get(sys_id, "")) for key, sys_id in links.items()}

    @staticmethod
    def _enrich(ctx: AlertContext, cis: Mapping[str, tuple[str, str]]) -> AlertContext:
        def one(ref: DeviceRef | None) -> DeviceRef | None:
            if ref is None or ref.id is None:
                return ref
            ci, name = cis.get(f"{ctx.alert.source}:{ref.id}", (None, None))
            return DeviceRef(ref.id, ref.name or name or None, ref.address, ci, ref.protocols)

        return AlertContext(ctx.alert, ctx.appliance, one(ctx.source), one(ctx.destination), ctx.rules)
