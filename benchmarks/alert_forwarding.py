"""Alert forwarding benchmark: a burst of new alerts forwarded as incidents, against a naive baseline.

Scenario (issue #10, "one sensor unreachable"): ``--alerts`` (default 10,000) alerts over ``--sensors``
(default 50) sensors behind one management console; one sensor is unreachable (disconnected from the console)
during the first run and delivers its alerts late before the second run, stamped ``--late-minutes`` (default
30) before the first run: older than the previous engine's 10-minute look-back behind its watermark. A third
run finds nothing new: its cost is printed per source.

Both simulators run in threads on 127.0.0.1; ServiceNow adds ``--latency-ms`` to every HTTP request.

* forwarder: ``AlertForwarder`` (bulk CI lookup, one existing-record query and one Batch API call per 100
  alerts);
* naive: per alert, one ``correlation_id=`` lookup and one Table API create.

Prints ServiceNow requests per created incident (lookups and token requests included) and wall seconds,
per run, and how many of the late alerts a time watermark with the previous 10-minute look-back would have
skipped (computed from the alert times, as that engine decided).

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
        if key.startswith("ledger:"):
            self.ledger_sizes.append(len(json.dumps(value)))
        self[key] = value

    def delete(self, key):  # noqa: D102
        self.pop(key, None)

    ledger_sizes: list[int]


def single_value_sizes() -> list[int]:
    """Baseline, measured in the same runs: the size of the previous single-value ledger (everything in
    ``ledger:<conn id>``, rewritten at every save) at each save the engine makes."""
    from defender_servicenow import ledger_state

    sizes: list[int] = []
    save = ledger_state.LedgerState.save

    def recording(self, ledger):
        sizes.append(len(json.dumps(ledger.as_state())))
        return save(self, ledger)

    ledger_state.LedgerState.save = recording
    return sizes


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
    parser.add_argument("--alerts", type=int, default=10_000)
    parser.add_argument("--sensors", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--naive-alerts", type=int, default=None,
                        help="alerts for the naive baseline (default: 500)")
    parser.add_argument("--late-minutes", type=float, default=30.0,
                        help="how long before the first run the unreachable sensor's alerts were raised")
    args = parser.parse_args()

    from defender_servicenow import forwarding as fwd
    from defender_servicenow.hooks.defender import DefenderIoTHook
    from defender_servicenow.hooks.servicenow import ServiceNowHook
    from defender_servicenow.models import Alert
    from defender_servicenow.rules import parse_rules
    from defender_servicenow.sources import source_for

    dapp = defender_sim.create_app(defender_sim.DefenderSimConfig(mode="management_console", devices=300, alerts=0,
                                                                  sensors=args.sensors))
    dserver = serve_in_thread(dapp)
    os.environ[f"AIRFLOW_CONN_{SOURCE.upper()}"] = json.dumps({
        "conn_type": "defender_iot", "host": dserver.url, "password": defender_sim.SIM_TOKEN,
        "extra": {"appliance": "management_console", "name": "bench-console"}})
    dsim = dapp.state.sim
    rules = parse_rules({"rules": [{"name": "bench", "actions": [{"type": "servicenow"}]}]},
                        default_connection_id="sn_bench")
    start_ms = int(time.time() * 1000) - 1
    state = DictState({"ledger:" + SOURCE: {"floor_ms": start_ms - 3_600_000, "keys_since_ms": start_ms},
                       "rule_first_seen:bench": "2000-01-01T00:00:00+00:00"})
    state.ledger_sizes = []
    baseline_sizes = single_value_sizes()
    devices = dsim.device_ids()
    per_sensor = args.alerts // args.sensors
    for sensor in range(1, args.sensors):      # sensor <args.sensors> is unreachable for now
        dsim.add_alerts(per_sensor, severity="Major", engine="Malware", title="Suspicion of Malicious Activity",
                        sourceDevice=devices[0], destinationDevice=devices[1], sensorId=sensor)
    alerts = [a for a in DefenderIoTHook(SOURCE).get_alerts() if isinstance(a, Alert)]

    # ---- forwarder
    server, sim = start_servicenow(args.latency_ms, "sn_bench")
    seed_cis(sim, devices[:2])
    hooks = []

    def sn_hook(conn_id):
        hooks.append(ServiceNowHook(conn_id))
        return hooks[-1]

    def engine():
        return fwd.AlertForwarder(rules, state, defender_hook=source_for, servicenow_hook=sn_hook)

    before = sim.counters()["requests"]
    started = time.perf_counter()
    (report,) = engine().run([SOURCE])
    first_requests, first_wall = sim.counters()["requests"] - before, time.perf_counter() - started
    # the unreachable sensor reconnects: its alerts arrive with old times (raised before the first run)
    late_ms = start_ms - int(args.late_minutes * 60_000)
    late_alerts = dsim.add_alerts(per_sensor, severity="Major", engine="Malware",
                                  title="Suspicion of Malicious Activity", sourceDevice=devices[0],
                                  destinationDevice=devices[1], sensorId=args.sensors, time=late_ms)
    (late,) = engine().run([SOURCE])
    wall = time.perf_counter() - started
    requests = sim.counters()["requests"] - before
    # the previous engine read from its watermark (the newest alert forwarded) less a 10-minute look-back
    watermark = max(a.time for a in alerts)
    skipped = sum(1 for a in late_alerts
                  if a["time"] < int(watermark.timestamp() * 1000) - 10 * 60_000)
    created = len(sim.table("incident"))
    expected = per_sensor * args.sensors
    assert report.created + late.created == created == expected, (report.as_dict(), late.as_dict(), created)
    d_before, s_before = dsim.counters()["requests"], sim.counters()["requests"]
    (idle,) = engine().run([SOURCE])
    idle_defender, idle_sn = dsim.counters()["requests"] - d_before, sim.counters()["requests"] - s_before
    assert idle.created == 0
    server.stop()

    # ---- naive baseline: one lookup + one create per alert
    n_naive = args.naive_alerts or 500
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
          f"{expected} new alerts over {args.sensors} sensors behind one console (one sensor unreachable, "
          f"then delivering its {per_sensor} alerts {args.late_minutes:g} min late), ServiceNow latency "
          f"{args.latency_ms:g} ms per request")
    print(f"{'':12}{'incidents':>10}{'SN requests':>13}{'req/incident':>14}{'wall s':>9}{'alerts/s':>10}")
    for name, n, req, secs in (("forwarder", created, requests, wall),
                               ("naive", naive_created, naive_requests, naive_wall)):
        print(f"{name:12}{n:>10}{req:>13}{req / max(n, 1):>14.3f}{secs:>9.2f}{n / secs:>10.0f}")
    per_alert = requests / max(created, 1)
    print(f"  run 1 (49 sensors' alerts): {report.created} created, {first_requests} SN requests, "
          f"{first_wall:.2f} s; run 2 (the reconnected sensor's {per_sensor} late alerts): {late.created} "
          f"created, {requests - first_requests} SN requests, {wall - first_wall:.2f} s")
    print(f"  late alerts a time watermark with a 10-minute look-back would have skipped for good: {skipped} "
          f"of {per_sensor}; the reconciling forwarder forwarded {late.created}")
    print(f"target: at most 0.05 ServiceNow requests per forwarded alert -> forwarder "
          f"{'meets it' if per_alert <= 0.05 else 'MISSES it'} ({per_alert:.3f}); "
          f"speed-up {naive_wall / max(naive_created, 1) * created / wall:.1f}x per incident")
    from defender_servicenow.sync_state import max_value_bytes

    print(f"ledger in the state store over the 3 runs: {len(state.ledger_sizes)} writes, largest value "
          f"{max(state.ledger_sizes)} bytes, {sum(state.ledger_sizes)} bytes written (limit "
          f"{max_value_bytes()}); previous single-value ledger: {len(baseline_sizes)} writes, largest "
          f"{max(baseline_sizes)} bytes, {sum(baseline_sizes)} bytes written")
    print(f"run with nothing new: {idle_defender} Defender request(s), {idle_sn} ServiceNow request(s) for 1 source "
          f"(target at most 3 + 1) -> {'meets it' if idle_defender <= 3 and idle_sn <= 1 else 'MISSES it'}")


if __name__ == "__main__":
    main()
