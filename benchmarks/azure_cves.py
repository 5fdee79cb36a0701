"""Benchmark: read the CVEs of a 10,000-device cloud inventory from the Azure simulator (Resource Graph
``…/devicegroups/vulnerabilities``) the way ``AzureSource.iter_device_cves`` does, beside a naive baseline, in
the same run.

    .venv/bin/python benchmarks/azure_cves.py [--devices 10000] [--naive-devices 500]

* source: one ARG query for every vulnerability of the scope ($top=1000 pages, $skipToken), grouped by device.
* naive: one ARG query per device (``where properties.deviceId =~ '<its ARM id>'``), measured on the first
  ``--naive-devices`` devices and extrapolated to all.

The simulator runs in a thread of this process (quota raised so waits do not hide the client's cost; the
quota-bound time at ARG's documented 15 queries / 5 s is printed beside). Memory: tracemalloc peak of the read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]
QUOTA, WINDOW = 15, 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--naive-devices", type=int, default=500)
    args = parser.parse_args()
    from include.simulators.azure_sim import (
        SIM_CLIENT_ID,
        SIM_CLIENT_SECRET,
        SIM_SUBSCRIPTION,
        SIM_TENANT,
        AzureSimConfig,
        create_app,
    )
    from include.simulators.runner import serve_in_thread

    app = create_app(AzureSimConfig(devices=args.devices, alerts=0, quota=10**9))
    server = serve_in_thread(app)
    os.environ["AIRFLOW_CONN_AZ_CVE_BENCH"] = json.dumps({
        "conn_type": "defender_iot_azure", "login": SIM_CLIENT_ID, "password": SIM_CLIENT_SECRET,
        "extra": {"tenant_id": SIM_TENANT, "subscriptions": [SIM_SUBSCRIPTION], "authority": server.url,
                  "resource_manager": server.url}})
    from defender_servicenow.azure_models import VULNERABILITY_TYPE
    from defender_servicenow.hooks.azure import DefenderIoTAzureHook, build_query
    from defender_servicenow.sources import AzureSource

    rows = []
    try:
        hook = DefenderIoTAzureHook("az_cve_bench")
        hook.log.disabled = True
        tracemalloc.start()
        start = time.perf_counter()
        found = dict(AzureSource(hook).iter_device_cves())
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        cves = sum(map(len, found.values()))
        rows.append(("source", args.devices, cves, hook.request_count, seconds, peak,
                     f"({len(found):,} devices have CVEs)"))

        naive = DefenderIoTAzureHook("az_cve_bench")
        naive.log.disabled = True
        devices = [d["id"] for d in app.state.sim.devices if d.get("id")][:args.naive_devices]
        start = time.perf_counter()
        naive_cves = sum(len(list(naive.iter_resources(build_query(VULNERABILITY_TYPE, where=(
            f"where properties.deviceId =~ '{d}'",))))) for d in devices)
        seconds = time.perf_counter() - start
        scale = args.devices / max(1, len(devices))
        rows.append(("naive", len(devices), naive_cves, naive.request_count, seconds, None,
                     f"all {args.devices:,}: ~{naive.request_count * scale:,.0f} requests, ~{seconds * scale:,.0f} s, "
                     f"quota-bound ~{max(0.0, (naive.request_count * scale - QUOTA) / QUOTA * WINDOW):,.0f} s"))
    finally:
        server.stop()
    print(f"\nAzure CVEs (Resource Graph vulnerabilities), {args.devices:,} generated devices\n")
    print(f"{'method':<8}{'devices':>9}{'CVEs':>7}{'ARG requests':>14}{'seconds':>9}{'quota-bound s':>15}"
          f"{'peak MiB':>10}  extrapolated")
    for method, n, c, requests, seconds, peak, note in rows:
        bound = max(0.0, (requests - QUOTA) / QUOTA * WINDOW)
        print(f"{method:<8}{n:>9,}{c:>7,}{requests:>14,}{seconds:>9.1f}{bound:>15.0f}"
              f"{'' if peak is None else f'{peak:.1f}':>10}  {note}")


if __name__ == "__main__":
    main()
