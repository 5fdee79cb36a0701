"""Provider metadata: registers the ``servicenow``, ``defender_iot`` and ``defender_iot_azure`` connection types."""

from __future__ import annotations

from defender_servicenow import __version__

_VERIFY = {
    "label": "Verify TLS",
    "description": "true (default), false, or the path of a CA bundle file",
    "schema": {"type": ["string", "null"], "default": "true"},
}
_PROXY = {
    "label": "Proxy URL",
    "description": "optional proxy for every call, e.g. http://proxy.example:3128",
    "schema": {"type": ["string", "null"]},
}
_TIMEOUT = {
    "label": "Timeout (seconds)",
    "description": "seconds per request (default 30)",
    "schema": {"type": ["integer", "null"], "default": 30},
}


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-defender-servicenow",
        "name": "Microsoft Defender for IoT to ServiceNow",
        "description": "Defender for IoT (OT sensor / on-premises management console) to ServiceNow "
        "CMDB and incident integration.",
        "versions": [__version__],
        "connection-types": [
            {
                "connection-type": "servicenow",
                "hook-class-name": "defender_servicenow.hooks.servicenow.ServiceNowHook",
                "hook-name": "ServiceNow",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port"],
                    "relabeling": {"host": "Instance URL", "login": "Username", "password": "Password"},
                    "placeholders": {"host": "https://dev12345.service-now.com", "login": "integration.user"},
                },
                "conn-fields": {
                    "client_id": {
                        "label": "OAuth client ID",
                        "description": "from the instance's Application Registry (System OAuth)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "client_secret": {
                        "label": "OAuth client secret",
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    "auth_type": {
                        "label": "Auth type",
                        "description": "oauth_password (default with a client id), oauth_client_credentials, "
                        "or basic (default otherwise)",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["oauth_password", "oauth_client_credentials", "basic"],
                        },
                    },
                    "verify": _VERIFY,
                    "proxy": _PROXY,
                    "timeout": _TIMEOUT,
                    "requests_per_hour": {
                        "label": "Requests per hour (client-side pace)",
                        "description": "optional: never exceed this many requests per hour "
                        "(set it to the instance's inbound REST rate limit)",
                        "schema": {"type": ["integer", "null"]},
                    },
                },
            },
            {
                "connection-type": "defender_iot",
                "hook-class-name": "defender_servicenow.hooks.defender.DefenderIoTHook",
                "hook-name": "Microsoft Defender for IoT",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"host": "Appliance URL", "password": "API access token"},
                    "placeholders": {"host": "https://10.1.0.2"},
                },
                "conn-fields": {
                    "appliance": {
                        "label": "Appliance",
                        "description": "sensor (OT sensor API, /api/...) or management_console "
                        "(on-premises management console API, /external/...)",
                        "schema": {"type": ["string", "null"], "enum": ["sensor", "management_console"],
                                   "default": "sensor"},
                    },
                    "name": {
                        "label": "Display name",
                        "description": "name of the appliance in ServiceNow (default: the host)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "verify": _VERIFY,
                    "proxy": _PROXY,
                    "timeout": _TIMEOUT,
                },
            },
            {
                "connection-type": "defender_iot_azure",
                "hook-class-name": "defender_servicenow.hooks.azure.DefenderIoTAzureHook",
                "hook-name": "Microsoft Defender for IoT (Azure)",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "host"],
                    "relabeling": {"login": "Application (client) ID", "password": "Client secret"},
                    "placeholders": {"login": "00000000-0000-0000-0000-000000000000"},
                },
                "conn-fields": {
                    "tenant_id": {
                        "label": "Tenant ID",
                        "description": "the Entra ID tenant (directory) id (required)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "subscriptions": {
                        "label": "Subscriptions",
                        "description": "subscription ids, comma-separated or a JSON list (or set a management group)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "management_group": {
                        "label": "Management group",
                        "description": "optional: read every subscription under this management group instead",
                        "schema": {"type": ["string", "null"]},
                    },
                    "authority": {
                        "label": "Authority",
                        "description": "default https://login.microsoftonline.com (sovereign clouds differ)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "resource_manager": {
                        "label": "Resource Manager endpoint",
                        "description": "default https://management.azure.com (sovereign clouds differ)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "name": {
                        "label": "Display name",
                        "description": "name of this source in ServiceNow (default Microsoft Defender for IoT (Azure))",
                        "schema": {"type": ["string", "null"]},
                    },
                    "sites": {
                        "label": "Sites",
                        "description": "optional: only these site names (comma-separated)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "sensors": {
                        "label": "Sensors",
                        "description": "optional: only these sensor names (comma-separated)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "verify": _VERIFY,
                    "proxy": _PROXY,
                    "timeout": _TIMEOUT,
                },
            },
        ],
        "triggers": [
            {
                "integration-name": "Microsoft Defender for IoT",
                "python-modules": ["defender_servicenow.triggers.alerts"],
            }
        ],
    }
