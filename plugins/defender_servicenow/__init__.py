"""Microsoft Defender for IoT -> ServiceNow integration for Apache Airflow 3.

Hooks, triggers and the pure decision code (mapping, forwarding rules, diffing) used by the
``defender_device_sync``, ``defender_alert_forwarding`` and ``defender_servicenow_cleanup`` DAGs.
"""

__version__ = "0.1.0"
