"""defender_servicenow_cleanup: retire or delete what the Defender for IoT integration wrote to ServiceNow.

Triggered by hand only (UI form or REST ``conf``). It is a dry run unless ``dry_run`` is false, and a run
that writes needs ``confirm`` = the ServiceNow instance host name (e.g. ``dev12345.service-now.com``).

* ``mode=retire``: CIs retired (install_status 7, operational_status 6), open incidents closed with a close
  code and a note; application-table rows kept. ``mode=delete``: CIs with their adapters, IP addresses,
  serial numbers and ``sys_object_source`` rows, incidents and application rows deleted.
* Only what this integration wrote is touched; a CI another discovery source also reports is left alone.
* Pause ``defender_device_sync`` and ``defender_alert_forwarding`` first, or they write the records again.
* Safe to run again after a failure: what is already retired, closed or deleted is skipped.
* To bring the devices back later, trigger ``defender_device_sync`` with ``full_resync=true`` (its change
  detection still remembers the devices it sent).

The work is in ``defender_servicenow.cleanup``; this file only wires params, the connection and the task.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from defender_servicenow import settings

SERVICENOW_CONN_ID = settings.servicenow_conn_id()


@dag(
    dag_id="defender_servicenow_cleanup",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["defender-iot", "servicenow", "cleanup"],
    doc_md=__doc__,
    params={
        "scope": Param("both", enum=["devices", "alerts", "both"], title="Scope",
                       description="devices (CMDB CIs), alerts (incidents, application rows), or both"),
        "mode": Param("retire", enum=["retire", "delete"], title="Mode",
                      description="retire: CIs retired, open incidents closed; delete: records deleted"),
        "sources": Param([], type=["null", "array"], items={"type": "string"}, title="Sources",
                         description="Defender connection ids; empty = everything this integration wrote, "
                                     "also from sources no longer configured"),
        "older_than_days": Param(None, type=["null", "integer"], minimum=1, title="Older than (days)",
                                 description="only records last updated more than this many days ago"),
        "dry_run": Param(True, type="boolean", title="Dry run", description="only list what would change"),
        "confirm": Param("", type=["null", "string"], title="Confirm (instance host name)",
                         description="for a run that writes: the ServiceNow instance host name"),
    },
)
def defender_servicenow_cleanup():
    @task(retries=0)  # a failed run is rerun by hand, after a look at what failed
    def clean_up() -> dict:
        from defender_servicenow.cleanup import application_tables, run_cleanup
        from defender_servicenow.hooks.servicenow import ServiceNowHook

        params = get_current_context()["params"]
        raw = {name: params.get(name) for name in
               ("scope", "mode", "sources", "older_than_days", "dry_run", "confirm")}
        return run_cleanup(ServiceNowHook(servicenow_conn_id=SERVICENOW_CONN_ID), raw,
                           application_tables=application_tables(SERVICENOW_CONN_ID))

    clean_up()


defender_servicenow_cleanup()
