"""Static ServiceNow knowledge the simulator needs: the table hierarchy, base columns, reference fields,
choice labels, seed rows and the fixed texts (hibernation page, cancelled transaction)."""

from __future__ import annotations

# child -> parent. Tables not listed here have no parent.
_OT_CONTROL = ("plc", "dcs", "dpu", "cnc", "ied", "rtu", "qics", "scada_server", "opc_server", "control_module",
               "industrial_3d_printer")
_OT_SUPERVISORY = ("hmi", "ews", "historian", "opc_client", "scada_client")
_OT_FIELD = ("industrial_actuator", "industrial_drive", "industrial_robot", "industrial_sensor")
_HARDWARE_CHILDREN = ("computer", "netgear", "iot", "ot", "printer", "ip_phone", "ip_camera", "ups", "hvac",
                      "game_console", "stv", "handheld_computing", "incomplete_ip", "plc", "hmi",
                      "manufacturing", "unclassed_hardware")
PARENTS: dict[str, str] = {
    "incident": "task", "sn_si_incident": "task", "sn_si_task": "task",
    "cmdb_ci_hardware": "cmdb_ci", "cmdb_ci_network_adapter": "cmdb_ci", "cmdb_ci_ip_address": "cmdb_ci",
    **{f"cmdb_ci_{c}": "cmdb_ci_hardware" for c in _HARDWARE_CHILDREN},
    "cmdb_ci_server": "cmdb_ci_computer", "cmdb_ci_pc_hardware": "cmdb_ci_computer",
    **{f"cmdb_ci_{c}_server": "cmdb_ci_server" for c in ("linux", "win", "unix", "esx", "hyper_v", "osx")},
    **{f"cmdb_ci_{c}_server": "cmdb_ci_unix_server" for c in ("aix", "hpux", "solaris")},
    **{f"cmdb_ci_{c}": "cmdb_ci_netgear" for c in ("ip_switch", "ip_router", "ip_firewall", "wap_network",
                                                   "protocol_converter", "ids_network")},
    **{f"cmdb_ci_ot_{c}": "cmdb_ci_ot" for c in ("control", "supervisory", "field_device", "system")},
    **{f"cmdb_ci_ot_{c}": "cmdb_ci_ot_control" for c in _OT_CONTROL},
    **{f"cmdb_ci_ot_{c}": "cmdb_ci_ot_supervisory" for c in _OT_SUPERVISORY},
    **{f"cmdb_ci_ot_{c}": "cmdb_ci_ot_field_device" for c in _OT_FIELD},
    "cmdb_ci_ot_system_service": "cmdb_ci_ot_system",
    "cmdb_ci_nids": "cmdb_ci_ids_network",   # defender-api.md §8.3: NIDS extends cmdb_ci_ids_network
}
STANDARD_TABLES = sorted({*PARENTS, *PARENTS.values(), "cmdb_serial_number", "sys_object_source", "sys_choice",
                          "u_defender_iot_alert", "task_ci", "sys_user", "sys_user_group", "cmdb_rel_ci",
                          "cmdb_rel_type", "sys_journal_field", "core_company", "cmn_location",
                          "sys_import_set_row", "cmdb_key_value", "cmdb_ot_entity", "sys_dictionary"})

_SYS = ("sys_id", "sys_created_on", "sys_created_by", "sys_updated_on", "sys_updated_by", "sys_mod_count",
        "sys_tags")
_TASK = ("number", "short_description", "description", "state", "impact", "urgency", "priority", "severity",
         "active", "opened_at", "opened_by", "caller_id", "assignment_group", "assigned_to", "cmdb_ci",
         "correlation_id", "correlation_display", "work_notes", "comments", "close_code", "close_notes",
         "closed_at", "closed_by", "category", "subcategory", "contact_type", "company", "location",
         "business_service", "escalation", "hold_reason", "parent", "reassignment_count", "sys_class_name",
         "sys_domain", "upon_approval", "made_sla", "watch_list", "work_notes_list", "due_date")
_CI = ("name", "sys_class_name", "asset_tag", "serial_number", "ip_address", "mac_address", "fqdn", "host_name",
       "dns_domain", "manufacturer", "model_id", "model_number", "vendor", "discovery_source",
       "first_discovered", "last_discovered", "operational_status", "install_status", "category",
       "subcategory", "short_description", "comments", "company", "location", "department", "assigned_to",
       "owned_by", "managed_by", "support_group", "assignment_group", "correlation_id", "duplicate_of",
       "unverified", "virtual", "attributes", "firmware_version", "sys_domain")
OWN_COLUMNS: dict[str, tuple[str, ...]] = {
    "task": _SYS + _TASK,
    "incident": ("incident_state", "resolved_at", "resolved_by", "problem_id", "parent_incident", "child_incidents",
                 "caused_by", "origin_id", "origin_table"),
    "sn_si_incident": ("substate", "risk_score", "risk_score_override", "business_criticality", "attack_vector",
                       "affected_user", "alert_sensor", "alert_rule", "source", "incident", "change_request",
                       "parent_security_incident", "requested_by", "resolved_at", "resolved_by"),
    "cmdb_ci": _SYS + _CI,
    "cmdb_ci_hardware": ("hardware_status", "hardware_substatus", "default_gateway"),
    "cmdb_ci_computer": ("os", "os_version", "os_service_pack", "os_domain", "os_address_width", "cpu_count",
                         "ram"),
    "cmdb_ci_network_adapter": ("cmdb_ci", "netmask", "ip_default_gateway", "dhcp_enabled"),
    "cmdb_ci_ip_address": ("nic", "cmdb_ci", "ip_version", "netmask"),
    "cmdb_serial_number": _SYS + ("cmdb_ci", "serial_number", "serial_number_type", "valid", "absent"),
    "sys_object_source": _SYS + ("name", "id", "target_sys_id", "target_table", "last_scan", "source_feed",
                                 "source_recency_timestamp"),
    "sys_choice": _SYS + ("name", "element", "value", "label", "inactive", "language", "sequence"),
    "u_defender_iot_alert": _SYS + ("u_alert_key",),
    # IRE related entries of the OT identification rule (defender-api.md §8.3)
    "cmdb_key_value": _SYS + ("configuration_item", "key", "value"),
    "cmdb_ot_entity": _SYS + ("ot_device", "ot_asset_type", "purdue_level", "zone", "business_criticality",
                              "ot_correlation_id", "ire_criterion"),
    "task_ci": _SYS + ("task", "ci_item"),
    "sys_user": _SYS + ("user_name", "name", "first_name", "last_name", "email", "active", "locked_out"),
    "sys_user_group": _SYS + ("name", "description", "active"),
    "core_company": _SYS + ("name", "manufacturer", "vendor"),
    "cmn_location": _SYS + ("name",),
    "cmdb_rel_ci": _SYS + ("parent", "child", "type", "connection_strength"),
    "cmdb_ci_nids": ("nids_source_name", "network_type_assignment", "isa_entity_site", "zone", "connection_state",
                     "validated", "life_cycle_stage", "life_cycle_stage_status", "source_name"),
    "cmdb_rel_type": _SYS + ("name", "parent_descriptor", "child_descriptor"),
    "sys_journal_field": _SYS + ("name", "element", "element_id", "value"),
    "sys_dictionary": _SYS + ("name", "element", "column_label", "internal_type", "max_length", "active"),
    "sys_import_set_row": _SYS + ("sys_import_set", "sys_target_table", "sys_target_sys_id",
                                  "sys_import_state", "sys_import_state_comment", "sys_transform_map"),
}

# field -> referenced table (the value is a sys_id; rendered as {"link", "value"}).
REFERENCES = {
    "cmdb_ci": "cmdb_ci", "ci_item": "cmdb_ci", "task": "task", "opened_by": "sys_user", "caller_id": "sys_user",
    "assigned_to": "sys_user", "assignment_group": "sys_user_group", "closed_by": "sys_user",
    "resolved_by": "sys_user", "affected_user": "sys_user", "requested_by": "sys_user",
    "manufacturer": "core_company", "company": "core_company", "location": "cmn_location",
    "model_id": "cmdb_model", "support_group": "sys_user_group", "owned_by": "sys_user", "managed_by": "sys_user",
    "department": "cmn_department", "duplicate_of": "cmdb_ci", "nic": "cmdb_ci_network_adapter",
    "parent_incident": "incident", "problem_id": "problem", "incident": "incident",
    "sys_domain": "sys_user_group", "business_service": "cmdb_ci_service", "child": "cmdb_ci",
    "type": "cmdb_rel_type", "parent_security_incident": "sn_si_incident", "change_request": "change_request",
    "configuration_item": "cmdb_ci", "ot_device": "cmdb_ci",
}
# Reference fields that the IRE insists hold sys_ids (CI attributes).
CI_REFERENCE_FIELDS = frozenset({"manufacturer", "company", "location", "model_id", "support_group", "owned_by",
                                 "managed_by", "department", "duplicate_of", "assigned_to", "assignment_group"})
JOURNAL_FIELDS = frozenset({"work_notes", "comments"})
JOURNAL_LABELS = {"work_notes": "Work notes", "comments": "Additional comments"}

_LEVEL = {"1": "1 - High", "2": "2 - Medium", "3": "3 - Low"}
CHOICES: dict[str, dict[str, dict[str, str]]] = {
    "*": {
        "impact": _LEVEL, "urgency": _LEVEL, "severity": _LEVEL,
        "priority": {"1": "1 - Critical", "2": "2 - High", "3": "3 - Moderate", "4": "4 - Low", "5": "5 - Planning"},
        "install_status": {"1": "Installed", "2": "On Order", "3": "In Maintenance", "4": "Pending Install",
                           "5": "Pending Repair", "6": "In Stock", "7": "Retired", "8": "Stolen", "100": "Absent"},
        "operational_status": {"1": "Operational", "2": "Non-Operational", "3": "Repair in Progress",
                               "4": "DR Standby", "5": "Ready", "6": "Retired"},
    },
    "incident": {"state": {"1": "New", "2": "In Progress", "3": "On Hold", "4": "Awaiting Caller",
                           "5": "Awaiting Evidence", "6": "Resolved", "7": "Closed", "8": "Canceled"}},
    "sn_si_incident": {"state": {"10": "Draft", "16": "Analysis", "18": "Contain", "19": "Eradicate",
                                 "3": "Closed", "7": "Cancelled"},
                       "business_criticality": {"1": "1 - Critical", "2": "2 - High", "3": "3 - Non-Critical"}},
}
CHOICES["incident"]["incident_state"] = CHOICES["incident"]["state"]

# impact x urgency -> priority (the base-system priority data lookup).
PRIORITY = {(i, u): str(min(5, i + u - 1)) for i in (1, 2, 3) for u in (1, 2, 3)}

NUMBER_PREFIX = {"incident": "INC", "sn_si_incident": "SIR", "sn_si_task": "SIT", "task": "TASK"}

DISCOVERY_SOURCES = ("Other Automated", "ServiceNow", "SCCM", "Manual via IRE", "Manual Entry", "Service Watch",
                     "ImportSet", "ServiceNowCloud")
REL_TYPES = ("IP Connection::IP Connection", "Runs on::Runs", "Connects to::Connected by",
             "Contains::Contained by", "Depends on::Used by", "Members::Member of", "Managed by::Manages",
             "Sends data to::Receives data from",
             "Detects::Detected by")   # ships with the NIDS class (CMDB CI Class Models): NIDS parent, CI child

HIBERNATION_PAGE = """<html><head><title>Instance Hibernating page</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><div class="container"><h1>Your instance is hibernating</h1>
<p>Sign in to the site to wake your instance.</p>
<a class="button" href="https://developer.servicenow.com/dev.do#!/home?wu=true">Wake up instance</a>
</div></body></html>
"""
BAD_GATEWAY_PAGE = ("<html>\r\n<head><title>{status} Bad Gateway</title></head>\r\n<body>\r\n"
                    "<center><h1>{status} Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
                    "</body>\r\n</html>\r\n")
CANCELLED = "Transaction cancelled: maximum execution time exceeded"
CANCELLED_DETAIL = (CANCELLED + " Check logs for error trace or enable glide.rest.debug property to verify "
                    "REST request processing")
RATE_LIMIT_RULE = "5c7b1e0bdb2a2010a5b1f8a5d39619d2"
HARDWARE_RULE_ID = "556eb250c3400200d8d4bea192d3ae92"
SYS_COLUMNS = ("sys_id", "sys_created_on", "sys_created_by", "sys_updated_on", "sys_updated_by", "sys_mod_count",
               "sys_tags")

# sys_dictionary: the string lengths the simulator knows (and enforces by truncating longer values, as
# ServiceNow does silently). Task columns are defined on task, as on an instance; the application table's
# are what the README asks an admin to create (a custom string column defaults to 40 characters).
DICTIONARY_LENGTHS: dict[tuple[str, str], int] = {
    ("task", "correlation_id"): 100, ("task", "correlation_display"): 100, ("task", "short_description"): 160,
    **{("u_defender_iot_alert", column): length for column, length in (
        ("u_alert_key", 255), ("u_alert_id", 40), ("u_alert_uuid", 100), ("u_source_connection", 100),
        ("u_appliance", 255), ("u_title", 255), ("u_message", 4000), ("u_severity", 40), ("u_engine", 100),
        ("u_notification_type", 40), ("u_source_device_id", 40), ("u_source_name", 255),
        ("u_source_address", 100), ("u_source_ci", 40), ("u_destination_device_id", 40),
        ("u_destination_name", 255), ("u_destination_address", 100), ("u_destination_ci", 40),
        ("u_protocols", 1000), ("u_remediation_steps", 4000), ("u_additional_information", 4000),
        ("u_handled", 40), ("u_sensor_id", 40), ("u_sensor_name", 255), ("u_zone_id", 40),
        ("u_zone_name", 255), ("u_site_id", 40), ("u_site_name", 255), ("u_rules", 1000))},
}
