"""Benchmark: extract a 100,000-device inventory from the Defender simulator with DefenderIoTHook, beside a
naive baseline, for both appliance kinds.

    .venv/bin/python benchmarks/defender_extract.py [--devices 100000] [--page-size 1000]

The simulator runs in its own process (``python -m include.simulators.defender_sim``) so its memory does not
count. Each measurement runs in a fresh worker process; memory is that process's **peak resident set size**
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), reported beside the RSS after imports (Python, Airflow
SDK, pydantic: the fixed cost) so the extraction's own share is visible.

* hook: ``DefenderIoTHook.iter_devices()`` consumed one record at a time (as the sync does).
  sensor = streamed ``/api/v1/devices``; management console = streamed ``/external/v1/devices`` into a compact
  side table, then v3 pages merged.
* naive: ``response.json()`` of the whole answer, then a list of all models (sensor: ``/api/v1/devices``;
  management console: ``/external/v1/devices`` plus every v3 page held in memory, merged at the end).
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
TARGET_MB = 400


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def worker(method: str, mode: str, url: str, token: str, page_size: int) -> dict:
    os.environ["AIRFLOW_CONN_DEFENDER_BENCH"] = json.dumps(
        {"conn_type": "defender_iot", "host": url, "password": token, "extra": {"appliance": mode, "name": "bench"}})
    import requests
    from defender_servicenow.hooks.defender import DefenderIoTHook
    from defender_servicenow.models import Device, merge_v1_extras, parse_device, parse_v3_device, v1_extras

    hook = DefenderIoTHook("defender_bench", page_size=page_size)
    hook.log.disabled = True
    assert hook.appliance == mode  # reads the connection before measuring
    baseline = _rss_mb()
    start = time.perf_counter()
    devices = invalid = 0
    if method == "hook":
        for record in hook.iter_devices():
            if isinstance(record, Device):
                devices += 1
            else:
                invalid += 1
    else:
        headers = {"Authorization": token}
        if mode == "sensor":
            raw = requests.get(f"{url}/api/v1/devices", headers=headers, timeout=300).json()
            records = [parse_device(r, source="bench", appliance_name="bench", sensor_name="bench") for r in raw]
        else:
            v1 = requests.get(f"{url}/external/v1/devices", headers=headers, timeout=300).json()
            v3, page = [], 0
            while True:
                body = requests.get(f"{url}/external/v3/integration/devices/0", headers=headers, timeout=300,
                                    params={"page": page, "size": page_size}).json()
                v3.extend(body["u_devices"])
                page += 1
                if len(body["u_devices"]) < page_size:
                    break
            v1_models = {d.id: d for d in (parse_device(r, source="bench", appliance_name="bench") for r in v1)
                         if isinstance(d, Device)}
            records = []
            for raw in v3:
                d = parse_v3_device(raw, source="bench", appliance_name="bench")
                if isinstance(d, Device) and d.id in v1_models:
                    d = merge_v1_extras(d, v1_extras(v1_models[d.id]))
                records.append(d)
        devices = sum(isinstance(r, Device) for r in records)
        invalid = len(records) - devices
    elapsed = time.perf_counter() - start
    return {"method": method, "mode": mode, "devices": devices, "invalid": invalid, "seconds": elapsed,
            "per_second": (devices + invalid) / elapsed, "baseline_mb": baseline, "peak_mb": _rss_mb(),
            "requests": hook.request_count if method == "hook" else None}


def start_simulator(mode: str, devices: int) -> tuple[subprocess.Popen, str, str]:
    from include.simulators.defender_sim import SIM_TOKEN
    from include.simulators.runner import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "include.simulators.defender_sim", "--port", str(port), "--mode", mode,
         "--devices", str(devices), "--sensors", "4", "--name", f"bench-{mode}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"simulator exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            requests.get(f"{url}/sim/state", timeout=2)
            return proc, url, SIM_TOKEN
        except requests.RequestException:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("simulator did not start within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--modes", default="sensor,management_console")
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "MODE", "URL", "TOKEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, page_size=args.page_size)))
        return
    rows = []
    for mode in args.modes.split(","):
        proc, url, token = start_simulator(mode, args.devices)
        try:
            for method in ("hook", "naive"):
                out = subprocess.run([sys.executable, __file__, "--page-size", str(args.page_size), "--worker",
                                      method, mode, url, token], capture_output=True, text=True, check=False)
                if out.returncode:
                    raise SystemExit(f"{method}/{mode} worker failed:\n{out.stderr[-3000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\nDefender inventory extraction, {args.devices:,} devices (simulator in a separate process)")
    print("memory = peak RSS of the extracting process (getrusage ru_maxrss); 'after imports' = its fixed cost\n")
    print(f"{'appliance':<20}{'method':<8}{'devices':>9}{'invalid':>9}{'seconds':>9}{'dev/s':>9}"
          f"{'after imports MB':>18}{'peak MB':>9}{'requests':>10}")
    for r in rows:
        print(f"{r['mode']:<20}{r['method']:<8}{r['devices']:>9,}{r['invalid']:>9,}{r['seconds']:>9.1f}"
              f"{r['per_second']:>9,.0f}{r['baseline_mb']:>18.0f}{r['peak_mb']:>9.0f}"
              f"{(r['requests'] if r['requests'] is not None else '-'):>10}")
    worst = max(r["peak_mb"] for r in rows if r["method"] == "hook")
    print(f"\nhook peak {worst:.0f} MB (target < {TARGET_MB} MB): {'OK' if worst < TARGET_MB else 'OVER TARGET'}")


if __name__ == "__main__":
    main()
