"""Provider metadata: registers the ``servicenow`` and ``defender_iot`` connection types."""

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
                        "schema": {"type": ["string", "null"], "enum": ["sensor", "management_console", None],
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
        ],
        "triggers": [
            {
                "integration-name": "Microsoft Defender for IoT",
                "python-modules": ["defender_servicenow.triggers.alerts"],
            }
        ],
    }
