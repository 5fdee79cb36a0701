"""Device sync benchmark: the IRE batch engine against a naive Table API baseline (figures, no assertions).

Starts both simulators as subprocesses (their memory is not counted), ServiceNow with 20 ms latency per
request and 2 ms server time per IRE item, then in one run:

* first sync of N devices (default 10,000) and a no-change resync, with the real hooks and the engine
  (in-memory state store stand-in);
* a naive baseline: per device one Table API query by name plus one create or update, on a subset
  (default 1,000 devices) and extrapolated to N, labelled so.

    .venv/bin/python benchmarks/device_sync.py [--devices 10000] [--baseline-devices 1000]
    .venv/bin/python benchmarks/device_sync.py --devices 100000 --baseline-devices 0   # peak memory

Each engine run also prints its ServiceNow requests by route (Batch API items listed as ``batch ...``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="device-sync-bench-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from include.simulators.runner import free_port  # noqa: E402


def start(module: str, *args: str, probe: str = "/sim/state") -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{module} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(url + probe, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{module} did not start within 120 s")


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def arguments(devices: int, baseline_devices: int) -> argparse.ArgumentParser:
    """The command line shared by the sync benchmarks (this one and azure_sync.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=devices)
    parser.add_argument("--baseline-devices", type=int, default=baseline_devices, help="0 = skip the baseline")
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--ire-item-ms", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rename-batch-size", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=4)
    return parser


def sim(url: str, path: str, body: dict | None = None, method: str | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read() or b"{}")


def requests_by_route(url: str) -> tuple[int, dict]:
    counters = sim(url, "/sim/counters")
    return int(counters.get("requests", 0)), dict(counters.get("by_route", {}))


def run_sync(label, source, sn_url, state, mapping, *, devices):
    from defender_servicenow import settings
    from defender_servicenow.hooks.servicenow import ServiceNowHook
    from defender_servicenow.sources import source_for
    from defender_servicenow.sync import DeviceSync

    before, routes_before = requests_by_route(sn_url)
    tracemalloc.start()
    t0 = time.perf_counter()
    summary = DeviceSync(source=source, defender=source_for(source), servicenow=ServiceNowHook("servicenow_default"),
                         state_store=state, mapping=mapping, source_name=settings.source_name(),
                         data_source=settings.data_source(), batch_size=ARGS.batch_size,
                         rename_batch_size=ARGS.rename_batch_size, parallel=ARGS.parallel).run()
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after, routes_after = requests_by_route(sn_url)
    writes = sum(v - routes_before.get(k, 0) for k, v in routes_after.items()   # token requests are no writes
                 if k.startswith(("POST /api/", "PATCH /api/", "PUT /api/", "DELETE /api/")))
    total = after - before
    print(f"{label:<34} {total:>9,} {total / devices:>9.3f} {wall:>9.1f} {devices / wall:>10,.0f} "
          f"{peak / 2**20:>9.1f}   inserted={summary.inserted} updated={summary.updated} "
          f"unchanged={summary.unchanged} failed={summary.failed} skipped={summary.skipped} writes={writes}")
    routes = {k: v - routes_before.get(k, 0) for k, v in routes_after.items() if v - routes_before.get(k, 0)}
    if routes:
        print(f"{'':<34} requests by route: " + ", ".join(f"{k} {v}" for k, v in sorted(routes.items())))
    return total, wall


def run_baseline(sn_url: str, source: str, count: int, devices: int) -> tuple[float, float]:
    """One Table API query by name plus one create or update per device (what a naive loop does)."""
    from defender_servicenow.hooks.servicenow import ServiceNowHook
    from defender_servicenow.mapping import load_class_mapping, map_device
    from defender_servicenow.sources import source_for

    mapping = load_class_mapping()
    hook = ServiceNowHook("servicenow_default")
    before, _ = requests_by_route(sn_url)
    t0, done = time.perf_counter(), 0
    for device in source_for(source).iter_devices():
        if done >= count:
            break
        if not hasattr(device, "native_key"):
            continue
        try:
            item = map_device(device, source_name="baseline", mapping=mapping)
        except ValueError:
            continue
        values = {k: v for k, v in item["values"].items() if k != "manufacturer"}
        name = values["name"].replace("^", "^^")
        found = hook.query("cmdb_ci", f"name={name}", fields=["sys_id", "sys_class_name"], limit=1)
        if found:
            hook.update_record(found[0].get("sys_class_name") or "cmdb_ci", found[0]["sys_id"], values)
        else:
            hook.create_record(item["className"], values)
        done += 1
    wall = time.perf_counter() - t0
    total = requests_by_route(sn_url)[0] - before
    factor = devices / max(done, 1)
    print(f"{'naive baseline, ' + format(done, ',') + ' devices':<34} {total:>9,} {total / max(done, 1):>9.3f} "
          f"{wall:>9.1f} {done / wall:>10,.0f}")
    print(f"{'  extrapolated to ' + format(devices, ',') + ' devices':<34} {total * factor:>9,.0f} "
          f"{total / max(done, 1):>9.3f} {wall * factor:>9.1f} {done / wall:>10,.0f}   (extrapolated, not measured)")
    return total * factor, wall * factor


def start_simulators(procs: list, devices: int, latency_ms: int, ire_item_ms: int, *defender_args: str
                     ) -> tuple[str, str]:
    """ServiceNow and an OT sensor (``bench-sensor``, ``devices`` devices) as subprocesses (appended to
    ``procs``), with connections ``servicenow_default`` and ``defender_bench`` pointing at them."""
    sn_proc, sn_url = start("include.simulators.servicenow_sim", "--latency-ms", str(latency_ms),
                            "--ire-item-ms", str(ire_item_ms))
    procs.append(sn_proc)
    def_proc, def_url = start("include.simulators.defender_sim", "--mode", "sensor", "--devices", str(devices),
                              "--name", "bench-sensor", *defender_args)
    procs.append(def_proc)
    from include.simulators.defender_sim import SIM_TOKEN
    from include.simulators.servicenow_sim import SIM_PASSWORD, SIM_USER

    os.environ["AIRFLOW_CONN_SERVICENOW_DEFAULT"] = json.dumps(
        {"conn_type": "servicenow", "host": sn_url, "login": SIM_USER, "password": SIM_PASSWORD})
    os.environ["AIRFLOW_CONN_DEFENDER_BENCH"] = json.dumps(
        {"conn_type": "defender_iot", "host": def_url, "password": SIM_TOKEN,
         "extra": {"appliance": "sensor", "name": "bench-sensor"}})
    return sn_url, def_url


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    procs = []
    try:
        sn_url, def_url = start_simulators(procs, ARGS.devices, ARGS.latency_ms, ARGS.ire_item_ms)
        from defender_servicenow.mapping import load_class_mapping
        from defender_servicenow.sync import MemoryStateStore

        n = ARGS.devices
        print(f"Device sync benchmark: {n:,} devices, ServiceNow latency {ARGS.latency_ms} ms/request, "
              f"IRE {ARGS.ire_item_ms} ms/item; engine batch {ARGS.batch_size} (renames {ARGS.rename_batch_size}), "
              f"{ARGS.parallel} batches in parallel")
        print(f"{'run':<34} {'SN reqs':>9} {'req/dev':>9} {'wall s':>9} {'dev/s':>10} {'peak MiB':>9}")
        state, mapping = MemoryStateStore(), load_class_mapping()
        first_reqs, first_wall = run_sync("engine: first sync", "defender_bench", sn_url, state, mapping, devices=n)
        run_sync("engine: no-change resync", "defender_bench", sn_url, state, mapping, devices=n)
        known = sorted({device_id for key, shard in state.data.items() if "/devices/" in key for device_id in shard},
                       key=int)
        for device_id in known[::100]:                                 # 1% of the devices change
            sim(def_url, f"/sim/devices/{device_id}", {"vendor": "Bench Vendor"}, method="PATCH")
        run_sync(f"engine: resync, {len(known[::100]):,} changed (1%)", "defender_bench", sn_url, state, mapping,
                 devices=n)
        print(f"{'':<34} peak RSS of this process so far: "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB (Airflow imports included)")
        if ARGS.baseline_devices:
            sim(sn_url, "/sim/reset", {})
            sim(sn_url, "/sim/faults", {"latency_ms": ARGS.latency_ms, "ire_item_ms": ARGS.ire_item_ms})
            base_reqs, base_wall = run_baseline(sn_url, "defender_bench", ARGS.baseline_devices, n)
            print(f"first sync vs baseline: {base_reqs / max(first_reqs, 1):,.0f}x fewer requests "
                  f"(target >= 50x), {base_wall / first_wall:,.1f}x faster (target >= 20x)")
    finally:
        stop(procs)


if __name__ == "__main__":
    ARGS = arguments(10_000, 1_000).parse_args()
    main()
