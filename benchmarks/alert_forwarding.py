"""Alert forwarding benchmark: a burst of new alerts forwarded as incidents, against a naive baseline.

Both simulators run in threads on 127.0.0.1; ServiceNow adds ``--latency-ms`` to every HTTP request.

* forwarder: ``AlertForwarder`` (bulk CI lookup, one existing-record query and one Batch API call per 100
  alerts);
* naive: per alert, one ``correlation_id=`` lookup and one Table API create.

Prints ServiceNow requests per created incident (lookups and token requests included) and wall seconds.

    .venv/bin/python benchmarks/alert_forwarding.py [--alerts 1000] [--latency-ms 20] [--naive-alerts N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-alerts-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")

from include.simulators import defender_sim, servicenow_sim  # noqa: E402
from include.simulators.runner import serve_in_thread  # noqa: E402

SOURCE = "defender_bench"


class DictState(dict):
    def get(self, key, default=None):  # noqa: D102 - the asset state accessor's sync half
        return super().get(key, default)

    def set(self, key, value):  # noqa: D102
        self[key] = value


def start_servicenow(latency_ms: float, conn_id: str):
    app = servicenow_sim.create_app(servicenow_sim.SimConfig(latency_ms=latency_ms))
    server = serve_in_thread(app)
    os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps({
        "conn_type": "servicenow", "host": server.url, "login": servicenow_sim.SIM_USER,
        "password": servicenow_sim.SIM_PASSWORD,
        "extra": {"client_id": servicenow_sim.SIM_CLIENT_ID, "client_secret": servicenow_sim.SIM_CLIENT_SECRET}})
    return server, app.state.sim


def seed_cis(sim, device_ids) -> None:
    for device_id in device_ids:
        ci = sim.insert("cmdb_ci_ot_plc", {"name": f"PLC {device_id}"})
        sim.insert("sys_object_source", {"name": "MicrosoftDefenderIoT", "id": f"{SOURCE}:{device_id}",
                                         "target_sys_id": ci["sys_id"], "target_table": "cmdb_ci_ot_plc"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--naive-alerts", type=int, default=None,
                        help="alerts for the naive baseline (default: the same burst)")
    args = parser.parse_args()

    from defender_servicenow import forwarding as fwd
    from defender_servicenow.hooks.defender import DefenderIoTHook
    from defender_servicenow.hooks.servicenow import ServiceNowHook
    from defender_servicenow.models import Alert
    from defender_servicenow.rules import parse_rules

    dapp = defender_sim.create_app(defender_sim.DefenderSimConfig(mode="sensor", devices=300, alerts=0))
    dserver = serve_in_thread(dapp)
    os.environ[f"AIRFLOW_CONN_{SOURCE.upper()}"] = json.dumps({
        "conn_type": "defender_iot", "host": dserver.url, "password": defender_sim.SIM_TOKEN,
        "extra": {"appliance": "sensor", "name": "bench-sensor"}})
    dsim = dapp.state.sim
    rules = parse_rules({"rules": [{"name": "bench", "actions": [{"type": "servicenow"}]}]},
                        default_connection_id="sn_bench")
    state = DictState({fwd.watermark_key(SOURCE): fwd.make_watermark(int(time.time() * 1000) - 1)})
    devices = dsim.device_ids()
    dsim.add_alerts(args.alerts, severity="Major", engine="Malware", title="Suspicion of Malicious Activity",
                    sourceDevice=devices[0], destinationDevice=devices[1])
    alerts = [a for a in DefenderIoTHook(SOURCE).get_alerts() if isinstance(a, Alert)]

    # ---- forwarder
    server, sim = start_servicenow(args.latency_ms, "sn_bench")
    seed_cis(sim, devices[:2])
    hooks = []

    def sn_hook(conn_id):
        hooks.append(ServiceNowHook(conn_id))
        return hooks[-1]

    before = sim.counters()["requests"]
    started = time.perf_counter()
    (report,) = fwd.AlertForwarder(rules, state, defender_hook=DefenderIoTHook, servicenow_hook=sn_hook).run([SOURCE])
    wall = time.perf_counter() - started
    requests = sim.counters()["requests"] - before
    created = len(sim.table("incident"))
    assert report.created == created == args.alerts, (report.as_dict(), created)
    server.stop()

    # ---- naive baseline: one lookup + one create per alert
    n_naive = args.naive_alerts or args.alerts
    server, sim = start_servicenow(args.latency_ms, "sn_naive")
    seed_cis(sim, devices[:2])
    hook = ServiceNowHook("sn_naive")
    before = sim.counters()["requests"]
    started = time.perf_counter()
    for alert in alerts[:n_naive]:
        ctx = fwd.AlertContext(alert, "bench-sensor", None, None, ("bench",))
        if not hook.query("incident", f"correlation_id={fwd.correlation_id(alert)}", fields=["sys_id"], limit=1):
            hook.create_record("incident", fwd.build_incident(ctx, rules))
    naive_wall = time.perf_counter() - started
    naive_requests = sim.counters()["requests"] - before
    naive_created = len(sim.table("incident"))
    server.stop()
    dserver.stop()

    print(f"Alert forwarding benchmark ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC): burst of "
          f"{args.alerts} new alerts, ServiceNow latency {args.latency_ms:g} ms per request")
    print(f"{'':12}{'incidents':>10}{'SN requests':>13}{'req/incident':>14}{'wall s':>9}{'alerts/s':>10}")
    for name, n, req, secs in (("forwarder", created, requests, wall),
                               ("naive", naive_created, naive_requests, naive_wall)):
        print(f"{name:12}{n:>10}{req:>13}{req / max(n, 1):>14.3f}{secs:>9.2f}{n / secs:>10.0f}")
    print(f"target: at most 1.1 requests per created incident -> forwarder "
          f"{'meets it' if requests / max(created, 1) <= 1.1 else 'MISSES it'}; "
          f"speed-up {naive_wall / max(naive_created, 1) * created / wall:.1f}x per incident")


if __name__ == "__main__":
    main()
