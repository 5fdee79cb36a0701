"""CMDB depth benchmark: device connections -> relations through the IRE, beside a naive baseline of one
Table API request per relation, in the same run (figures, no assertions).

Starts both simulators as subprocesses (their memory is not counted): an OT sensor with N devices (default
10,000) and about 5 connections per device (default 50,000 connections), ServiceNow with 20 ms latency per
request and 2 ms server time per IRE item. The device CIs are synced first (not measured), then:

* relations engine: first sync, no-change resync (requests, requests per relation, wall time, peak memory
  of the engine's Python allocations);
* sensors engine: the sensor CI and its N device links (``Detected by``);
* naive baseline: one ``POST /api/now/table/cmdb_rel_ci`` per relation (parent and child sys_ids known), on a
  subset (default 2,000) and extrapolated to all relations, labelled so.

    .venv/bin/python benchmarks/relations.py [--devices 10000] [--links-per-device 3.44] [--baseline 2000]
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_sync import requests_by_route, sim, start_simulators  # noqa: E402  (puts plugins/ on sys.path)


def measure(label: str, make_engine, sn_url: str, per: str, count_of) -> tuple[int, float]:
    before, routes_before = requests_by_route(sn_url)
    tracemalloc.start()
    t0 = time.perf_counter()
    summary = make_engine().run()
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after, routes_after = requests_by_route(sn_url)
    writes = sum(v - routes_before.get(k, 0) for k, v in routes_after.items()
                 if k.startswith(("POST /api/", "PATCH /api/", "PUT /api/", "DELETE /api/")))
    total, n = after - before, max(count_of(summary), 1)
    print(f"{label:<40} {total:>8,} {total / n:>10.4f} {wall:>8.1f} {peak / 2**20:>9.1f}   "
          f"{', '.join(f'{k}={v}' for k, v in summary.counts.items())}; writes={writes} ({per})")
    return total, wall


def baseline(sn_url: str, pairs: list[tuple[str, str]], count: int, total_relations: int) -> tuple[float, float]:
    """One Table API create per relation: what a loop over the connections does."""
    from defender_servicenow.hooks.servicenow import ServiceNowHook

    hook = ServiceNowHook("servicenow_default")
    type_id = hook.query("cmdb_rel_type", "name=Connects to::Connected by", fields=["sys_id"], limit=1)[0]["sys_id"]
    before, _ = requests_by_route(sn_url)
    t0 = time.perf_counter()
    for parent, child in pairs[:count]:
        hook.create_record("cmdb_rel_ci", {"parent": parent, "child": child, "type": type_id})
    wall = time.perf_counter() - t0
    done = min(count, len(pairs))
    total = requests_by_route(sn_url)[0] - before
    factor = total_relations / max(done, 1)
    print(f"{'naive baseline, ' + format(done, ',') + ' relations':<40} {total:>8,} {total / max(done, 1):>10.4f} "
          f"{wall:>8.1f}")
    print(f"{'  extrapolated to ' + format(total_relations, ',') + ' relations':<40} {total * factor:>8,.0f} "
          f"{total / max(done, 1):>10.4f} {wall * factor:>8.1f}   (extrapolated, not measured)")
    return total * factor, wall * factor


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    procs = []
    try:
        sn_url, _ = start_simulators(procs, ARGS.devices, ARGS.latency_ms, ARGS.ire_item_ms,
                                     "--links-per-device", str(ARGS.links_per_device))
        from defender_servicenow import settings
        from defender_servicenow.cmdb_depth.relations import RelationSync
        from defender_servicenow.cmdb_depth.sensors import SensorSync
        from defender_servicenow.cmdb_depth.state import device_cis
        from defender_servicenow.hooks.defender import DefenderIoTHook
        from defender_servicenow.hooks.servicenow import ServiceNowHook
        from defender_servicenow.mapping import load_class_mapping
        from defender_servicenow.sources import ApplianceSource
        from defender_servicenow.sync import DeviceSync, MemoryStateStore

        state = MemoryStateStore()
        t0 = time.perf_counter()
        DeviceSync(source="defender_bench", defender=ApplianceSource(DefenderIoTHook("defender_bench")),
                   servicenow=ServiceNowHook("servicenow_default"), state_store=state, mapping=load_class_mapping(),
                   source_name=settings.source_name(), data_source=settings.data_source(), batch_size=100,
                   parallel=4).run()
        devices = device_cis(state, "defender_bench")
        print(f"CMDB depth benchmark: {ARGS.devices:,} devices ({len(devices):,} device CIs synced first, "
              f"{time.perf_counter() - t0:.0f} s, not measured), ServiceNow latency {ARGS.latency_ms} ms/request, "
              f"IRE {ARGS.ire_item_ms} ms/item, {ARGS.max_items} CIs per IRE request")

        def engine(cls, **kw):
            return lambda: cls(source=ApplianceSource(DefenderIoTHook("defender_bench")),
                               servicenow=ServiceNowHook("servicenow_default"), state_store=state,
                               source_name=settings.source_name(), data_source=settings.data_source(),
                               max_items=ARGS.max_items, **kw)

        print(f"{'run':<40} {'SN reqs':>8} {'req/unit':>10} {'wall s':>8} {'peak MiB':>9}")
        created = lambda s: s.counts.get("created", 0) + s.counts.get("existing", 0)  # noqa: E731
        seen = lambda s: s.counts.get("seen", 0)  # noqa: E731
        first, first_wall = measure("relations: first sync", engine(RelationSync), sn_url, "per relation", created)
        measure("relations: no-change resync", engine(RelationSync), sn_url, "per connection seen", seen)
        measure("sensors: first sync (1 sensor + links)", engine(SensorSync), sn_url, "per device link",
                lambda s: s.counts.get("links_created", 0))
        measure("sensors: no-change resync", engine(SensorSync), sn_url, "per device link",
                lambda s: s.counts.get("links_unchanged", 0))
        print(f"{'':<40} peak RSS of this process: "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB (Airflow imports included)")
        relations = [(e[0], e[1]) for k, shard in state.data.items() if "/relations/" in k and not k.endswith("meta")
                     for e in shard.values()]
        if ARGS.baseline:
            sim(sn_url, "/sim/faults", {"latency_ms": ARGS.latency_ms, "ire_item_ms": ARGS.ire_item_ms})
            base_reqs, base_wall = baseline(sn_url, relations, ARGS.baseline, len(relations))
            print(f"relations first sync vs baseline: {base_reqs / max(first, 1):,.0f}x fewer requests, "
                  f"{base_wall / first_wall:,.1f}x faster")
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except Exception:
                proc.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--links-per-device", type=float, default=3.44, help="3.44: 50,057 connections for 10,000")
    parser.add_argument("--baseline", type=int, default=2_000, help="relations in the naive baseline; 0 = skip")
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--ire-item-ms", type=int, default=2)
    parser.add_argument("--max-items", type=int, default=100)
    ARGS = parser.parse_args()
    main()
