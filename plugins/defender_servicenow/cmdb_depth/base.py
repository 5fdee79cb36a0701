"""What the sensors and relations engines share: their inputs."""

from __future__ import annotations

from defender_servicenow.sync import DEFAULT_MAX_VALUE_BYTES, StateStore


class DepthEngine:
    """``source``: a :class:`~defender_servicenow.sources.Source` with the capability the engine needs;
    ``servicenow``: the ServiceNow hook; ``state_store``: the device sync's asset state store."""

    def __init__(self, *, source, servicenow, state_store: StateStore, source_name: str, data_source: str,
                 full_resync: bool = False, dry_run: bool = False, max_items: int = 100,
                 max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES):
        self.source, self.servicenow, self.store = source, servicenow, state_store
        self.source_id = source.source_id
        self.source_name, self.data_source = source_name, data_source
        self.full_resync, self.dry_run = full_resync, dry_run
        self.max_items, self.max_value_bytes = max_items, max_value_bytes
