"""ServiceNowHook throughput against the ServiceNow simulator with 20 ms latency per request.

Prints, side by side: rows read per second through paging (1000-row pages, and 100-row pages as the
naive baseline), and records written per second by single Table API calls (the baseline), Batch API
calls and IRE batches.

    .venv/bin/python benchmarks/servicenow_hook.py [--latency-ms 20] [--rows 20000] [--writes 1000]

Runs in well under two minutes with the defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from defender_servicenow.hooks.servicenow import BatchRequest, ServiceNowHook, ire_item_errors  # noqa: E402

from include.simulators import servicenow_sim as sn  # noqa: E402
from include.simulators.runner import serve_in_thread  # noqa: E402

CONN_ID = "servicenow_bench"


def _hook() -> ServiceNowHook:
    return ServiceNowHook(CONN_ID, batch_size=100)


def _measure(label: str, count_done, fn) -> tuple[str, int, float, int]:
    hook = _hook()
    started = time.perf_counter()
    done = count_done(fn(hook))
    seconds = time.perf_counter() - started
    return label, done, seconds, hook.request_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--rows", type=int, default=20_000, help="rows to read through paging")
    parser.add_argument("--writes", type=int, default=1000, help="records to write per bulk method")
    parser.add_argument("--single-writes", type=int, default=200, help="records written one call each")
    parser.add_argument("--ire-item-ms", type=float, default=0, help="simulated server time per IRE item")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    app = sn.create_app(sn.SimConfig(latency_ms=args.latency_ms, ire_item_ms=args.ire_item_ms))
    sim = app.state.sim
    for i in range(args.rows):
        sim.insert("u_defender_iot_alert", {"u_alert_key": f"bench:{i}", "short_description": f"row {i}"})
    with serve_in_thread(app) as server:
        os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps({
            "conn_type": "servicenow", "host": server.url, "login": sn.SIM_USER, "password": sn.SIM_PASSWORD,
            "extra": {"client_id": sn.SIM_CLIENT_ID, "client_secret": sn.SIM_CLIENT_SECRET}})
        _hook().test_connection()  # warm up: token, pool
        n = args.writes
        rows = [
            _measure("read: paging, 1000-row pages", lambda it: sum(1 for _ in it),
                     lambda h: h.iter_records("u_defender_iot_alert", fields=["sys_id", "u_alert_key"])),
            _measure("read: paging, 100-row pages (baseline)", lambda it: sum(1 for _ in it),
                     lambda h: h.iter_records("u_defender_iot_alert", fields=["sys_id", "u_alert_key"],
                                              page_size=100)),
            _measure("write: single Table API calls (baseline)", len,
                     lambda h: [h.create_record("incident", {"short_description": f"single {i}"})
                                for i in range(args.single_writes)]),
            _measure("write: Batch API, 100 per call", lambda res: sum(r.ok for r in res),
                     lambda h: h.batch([BatchRequest(str(i), "POST", "/api/now/table/incident",
                                                     {"short_description": f"batch {i}"}) for i in range(n)])),
            _measure("write: IRE, 100 items per call", lambda res: res,
                     lambda h: _ire(h, n)),
        ]
    print(f"\nServiceNowHook against the simulator, {args.latency_ms} ms latency per request, "
          f"{args.ire_item_ms:g} ms per IRE item\n")
    print(f"{'operation':44} {'records':>8} {'seconds':>8} {'records/s':>10} {'requests':>9}")
    for label, done, seconds, requests in rows:
        print(f"{label:44} {done:8d} {seconds:8.2f} {done / seconds:10.0f} {requests:9d}")


def _ire(hook: ServiceNowHook, n: int) -> int:
    ok = 0
    for start in range(0, n, 100):
        items = [{"className": "cmdb_ci_ot_plc",
                  "values": {"name": f"plc-{i}", "serial_number": f"SN-BENCH-{i:06d}", "mac_address":
                             f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"},
                  "sys_object_source_info": {"source_name": "MicrosoftDefenderIoT",
                                             "source_native_key": f"bench:{i}"}}
                 for i in range(start, min(n, start + 100))]
        result = hook.identify_reconcile(items, "Other Automated")
        ok += len(items) - len(ire_item_errors(result))
    return ok


if __name__ == "__main__":
    main()
