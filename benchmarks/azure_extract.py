"""Benchmark: read a 50,000-device cloud inventory from the Azure simulator with DefenderIoTAzureHook, beside a
naive baseline, in the same run.

    .venv/bin/python benchmarks/azure_extract.py [--devices 50000]

The simulator runs in its own process (``python -m include.simulators.azure_sim``, quota raised so that waits
do not hide the client's cost; the quota-bound time at ARG's documented 15 queries / 5 s is printed beside).
Each method runs in a fresh worker process; memory is its peak RSS (``getrusage`` ``ru_maxrss``) beside the
RSS after imports.

* hook: ``iter_devices()`` consumed one record at a time ($top=1000 pages, $skipToken, streamed).
* naive: $top=100 pages, every raw record kept in a list, then all models built (no streaming).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]
QUOTA, WINDOW = 15, 5.0   # ARG's documented example quota


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(method: str, url: str) -> dict:
    from include.simulators.azure_sim import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_SUBSCRIPTION, SIM_TENANT

    os.environ["AIRFLOW_CONN_AZ_BENCH"] = json.dumps({
        "conn_type": "defender_iot_azure", "login": SIM_CLIENT_ID, "password": SIM_CLIENT_SECRET,
        "extra": {"tenant_id": SIM_TENANT, "subscriptions": [SIM_SUBSCRIPTION], "authority": url,
                  "resource_manager": url}})
    from defender_servicenow.azure_models import parse_azure_device
    from defender_servicenow.hooks.azure import DefenderIoTAzureHook
    from defender_servicenow.models import Device

    hook = DefenderIoTAzureHook("az_bench", page_size=1000 if method == "hook" else 100)
    hook.log.disabled = True
    hook.settings  # noqa: B018 -- read the connection before measuring
    after_imports = _peak_mb()
    start = time.perf_counter()
    if method == "hook":
        devices = sum(isinstance(r, Device) for r in hook.iter_devices())
    else:
        from defender_servicenow.hooks.azure import DEVICE_TYPE, REMOVED, build_query

        raw = list(hook.iter_resources(build_query(DEVICE_TYPE, where=(
            f"where properties.deviceStatus !in~ {REMOVED}",))))
        records = [parse_azure_device(r, source="az_bench", source_name="bench") for r in raw]
        devices = sum(isinstance(r, Device) for r in records)
    seconds = time.perf_counter() - start
    return {"method": method, "devices": devices, "seconds": seconds, "requests": hook.request_count,
            "after_imports_mb": after_imports, "peak_mb": _peak_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=50_000)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    import requests

    from include.simulators.runner import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sim = subprocess.Popen([sys.executable, "-m", "include.simulators.azure_sim", "--port", str(port),
                            "--devices", str(args.devices), "--alerts", "10", "--quota", "100000"],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    rows = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                requests.get(f"{url}/_sim/counters", timeout=2)
                break
            except requests.RequestException:
                if sim.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the Azure simulator did not start") from None
                time.sleep(0.5)
        for method in ("hook", "naive"):
            out = subprocess.run([sys.executable, __file__, "--worker", method, url], capture_output=True,
                                 text=True, check=False)
            if out.returncode:
                raise SystemExit(f"{method} worker failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    print(f"\nAzure Resource Graph device extraction, {args.devices:,} generated devices "
          "(simulator in a separate process)\n")
    print(f"{'method':<8}{'devices':>9}{'ARG requests':>14}{'seconds':>9}{'quota-bound s':>15}"
          f"{'after imports MB':>18}{'peak MB':>9}")
    for r in rows:
        bound = max(0.0, (r["requests"] - QUOTA) / QUOTA * WINDOW)
        print(f"{r['method']:<8}{r['devices']:>9,}{r['requests']:>14}{r['seconds']:>9.1f}{bound:>15.0f}"
              f"{r['after_imports_mb']:>18.0f}{r['peak_mb']:>9.0f}")
    print(f"\nquota-bound s = time the ARG quota alone imposes at {QUOTA} queries / {WINDOW:g} s (the hook waits "
          "x-ms-user-quota-resets-after when the quota is spent)")


if __name__ == "__main__":
    main()
