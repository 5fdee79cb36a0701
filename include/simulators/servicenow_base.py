"""Values shared by the modules of the ServiceNow simulator: its credentials, configuration and fault
switches, the :class:`Reply` every API function returns with its error helpers, and record value helpers."""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

SIM_USER = "admin"
SIM_PASSWORD = "sim-Password-1"
SIM_CLIENT_ID = "sim-client-id"
SIM_CLIENT_SECRET = "sim-client-secret-0123456789"

JSON_TYPE = "application/json;charset=UTF-8"
SYS_ID = re.compile(r"^[0-9a-f]{32}$")
INDEXED = frozenset({"name", "serial_number", "mac_address", "correlation_id", "u_alert_key", "number", "cmdb_ci",
                     "id", "ip_address", "target_sys_id", "element_id", "task", "ci_item", "parent", "child",
                     "user_name", "configuration_item", "ot_device"})
_DEFAULT_IMPORT_SETS = {
    "u_defender_iot_alert_import": {"target": "u_defender_iot_alert", "coalesce": "u_alert_key"},
    "sn_si_incident_import": {"target": "sn_si_incident", "coalesce": "correlation_id"},
}


@dataclass
class SimConfig:
    token_lifetime: int = 1800
    refresh_token_lifetime: int = 8_640_000
    latency_ms: float = 0
    ire_item_ms: float = 0
    rate_limit_per_hour: int | None = None
    client_credentials_enabled: bool = True
    users: dict[str, str] = field(default_factory=lambda: {SIM_USER: SIM_PASSWORD})
    clients: dict[str, str] = field(default_factory=lambda: {SIM_CLIENT_ID: SIM_CLIENT_SECRET})
    # extra tables: a list of names, or {name: parent table or None}
    extra_tables: Any = ()
    # standard tables to leave out, e.g. ("sn_si_incident",) for an instance without the SIR plugin
    absent_tables: tuple[str, ...] = ()
    max_url_length: int = 8192          # longer request lines get 414 URI Too Long
    max_body_bytes: int = 10 * 1024 * 1024  # glide.rest.max_content_length
    enforce_data_policy: bool = True    # resolving/closing an incident needs close_code and close_notes
    batch_max_items: int | None = None  # items beyond this go to unserviced_requests
    import_sets: dict[str, dict] = field(default_factory=lambda: copy.deepcopy(_DEFAULT_IMPORT_SETS))
    # IRE rules an instance may lack: classes (and their subclasses) whose identification rule has related
    # entries for cmdb_key_value / cmdb_ot_entity (None = every hardware class), and the lookup tables
    # the hardware rule accepts.
    related_rule_classes: tuple[str, ...] | None = None
    lookup_rule_tables: tuple[str, ...] = ("cmdb_serial_number", "cmdb_ci_network_adapter", "cmdb_ci_ip_address")
    # sys_dictionary max_length overrides {"<table>.<column>": length}, e.g. a custom column left at 40
    column_lengths: dict[str, int] = field(default_factory=dict)


@dataclass
class Faults:
    latency_ms: float = 0
    ire_item_ms: float = 0
    rate_limit_per_hour: int | None = None
    fail_next: list[dict] = field(default_factory=list)
    hibernate: bool = False
    truncate_next: int = 0
    reject_credentials: bool = False
    deny_writes: list[str] = field(default_factory=list)  # tables ("*" = all) whose writes fail with 403 ACL
    deny_reads: list[str] = field(default_factory=list)   # tables whose list queries fail with 403 (read ACL)
    import_error_next: int = 0


@dataclass
class Reply:
    status: int
    body: Any = None                 # dict/list -> JSON; str -> text as is; None -> empty
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON_TYPE
    delay: float = 0.0               # seconds of simulated server time (IRE items)

    def content(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, (bytes, bytearray)):
            return bytes(self.body)
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body, separators=(",", ":")).encode()


def error(status: int, message: str, detail: str | None = None, headers: dict | None = None) -> Reply:
    return Reply(status, {"error": {"message": message, "detail": detail}, "status": "failure"}, headers or {})


def no_resource() -> Reply:
    return error(400, "Requested URI does not represent any resource")


def now_str() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def new_sys_id() -> str:
    return uuid.uuid4().hex


def to_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict) and "value" in value:
        return to_str(value["value"])
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
