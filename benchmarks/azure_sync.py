"""Benchmark: device sync from Defender for IoT in Azure into ServiceNow (figures, no assertions).

Starts the Azure simulator (quota raised so that waits do not hide the client's cost; the time ARG's
documented quota of 15 queries / 5 s would impose is printed beside) and the ServiceNow simulator (20 ms per
request, 2 ms per IRE item) as subprocesses, then in one run, for N cloud devices (default 50,000):

* engine: first sync and no-change resync through ``source_for`` (AzureSource: ARG pages of 1000, streamed)
  and the IRE batch engine: ARG requests, ServiceNow requests per device, wall time, peak traced memory;
* a naive per-device baseline on a subset (default 500 devices), extrapolated to N and labelled so: ARG read
  100 records per request, per device one Table API query by name plus one create or update.

    .venv/bin/python benchmarks/azure_sync.py [--devices 50000] [--baseline-devices 500]
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins"), str(ROOT / "benchmarks")]

import device_sync as common  # noqa: E402  (start, sim, requests_by_route, run_sync, run_baseline)

SOURCE = "defender_azure_bench"
QUOTA, WINDOW = 15, 5.0


def arg_requests(url: str) -> int:
    return int(common.sim(url, "/_sim/counters").get("arg", 0))


def quota_bound(requests: int) -> float:
    return max(0.0, (requests - QUOTA) / QUOTA * WINDOW)


def main(args) -> None:
    logging.basicConfig(level=logging.WARNING)
    common.ARGS = args   # run_sync reads batch size and parallelism from here
    procs = []
    try:
        sn_proc, sn_url = common.start("include.simulators.servicenow_sim", "--latency-ms", str(args.latency_ms),
                                       "--ire-item-ms", str(args.ire_item_ms))
        procs.append(sn_proc)
        az_proc, az_url = common.start("include.simulators.azure_sim", "--devices", str(args.devices),
                                       "--alerts", "10", "--quota", "100000", probe="/_sim/state")
        procs.append(az_proc)
        from include.simulators.servicenow_sim import SIM_PASSWORD, SIM_USER
        from scripts.stack import azure_connection

        os.environ["AIRFLOW_CONN_SERVICENOW_DEFAULT"] = json.dumps(
            {"conn_type": "servicenow", "host": sn_url, "login": SIM_USER, "password": SIM_PASSWORD})
        os.environ[f"AIRFLOW_CONN_{SOURCE.upper()}"] = json.dumps(azure_connection(az_url, "bench-azure"))
        from defender_servicenow.mapping import load_class_mapping
        from defender_servicenow.sync import MemoryStateStore

        n = args.devices
        print(f"Azure device sync benchmark: {n:,} cloud devices (every 37th Removed/Deleted), ServiceNow latency "
              f"{args.latency_ms} ms/request, IRE {args.ire_item_ms} ms/item; engine batch {args.batch_size}, "
              f"{args.parallel} batches in parallel")
        print(f"{'run':<34} {'SN reqs':>9} {'req/dev':>9} {'wall s':>9} {'dev/s':>10} {'peak MiB':>9}")
        state, mapping = MemoryStateStore(), load_class_mapping()
        arg_figures = []
        for label in ("engine: first sync", "engine: no-change resync"):
            before = arg_requests(az_url)
            common.run_sync(label, SOURCE, sn_url, state, mapping, devices=n)
            arg_figures.append((label, arg_requests(az_url) - before))
        for label, count in arg_figures:
            print(f"{label:<34} ARG requests {count:,} (quota-bound at {QUOTA}/{WINDOW:g} s: "
                  f"{quota_bound(count):.0f} s)")
        print(f"{'':<34} peak RSS of this process so far: "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB (Airflow imports included)")
        if args.baseline_devices:
            common.sim(sn_url, "/sim/reset", {})
            common.sim(sn_url, "/sim/faults", {"latency_ms": args.latency_ms, "ire_item_ms": args.ire_item_ms})
            from defender_servicenow.hooks.azure import DefenderIoTAzureHook

            before = arg_requests(az_url)
            defaults = DefenderIoTAzureHook.__init__.__kwdefaults__
            page, defaults["page_size"] = defaults["page_size"], 100   # the naive read: small pages
            try:
                common.run_baseline(sn_url, SOURCE, args.baseline_devices, n)
            finally:
                defaults["page_size"] = page
            read = arg_requests(az_url) - before
            print(f"{'  naive ARG requests':<34} {read:,} for {args.baseline_devices:,} devices at $top=100; "
                  f"{-(-n // 100):,} for {n:,} (computed, not measured)")
    finally:
        common.stop(procs)


if __name__ == "__main__":
    parser = common.arguments(50_000, 500)
    parser.description = __doc__
    main(parser.parse_args())
