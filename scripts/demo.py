"""The README's main command (``make demo``): the whole integration, live, on simulators.

Starts a ServiceNow simulator, a Defender for IoT management console simulator (two sensors' worth of
devices, a new alert every few seconds) and Airflow (api-server, scheduler, dag-processor, triggerer;
LocalExecutor, SQLite in .demo/airflow_home), all on free loopback ports, then prints where to look.
Ctrl-C stops everything it started. Each run starts from a clean state.

    python scripts/demo.py                  # run until Ctrl-C
    python scripts/demo.py --duration 300   # run five minutes, then stop
    python scripts/demo.py --check          # wait for CIs and incidents, print counts, exit 0 or 1
    python scripts/demo.py --source azure   # Defender for IoT in Azure (the Azure simulator) as the source
                                            # (also DEMO_SOURCE=azure, e.g. make demo DEMO_SOURCE=azure)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.stack import (  # noqa: E402
    AZURE,
    DAG_IDS,
    ROOT,
    SourceSpec,
    Stack,
    StackError,
    StackOptions,
    wait_until,
)

AZURE_CONN_ID = "defender_iot_azure_default"
SOURCES = ("console", AZURE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=ROOT / ".demo" / "airflow_home",
                        help="AIRFLOW_HOME of the demo (wiped at start; default .demo/airflow_home)")
    parser.add_argument("--duration", type=float, metavar="SECONDS", help="stop by itself after this long")
    parser.add_argument("--check", action="store_true",
                        help="wait until CIs and incidents appear in the ServiceNow simulator, print counts "
                             "and the alert-to-incident latency, then stop; exit 0 on success, 1 otherwise")
    parser.add_argument("--check-timeout", type=float, default=600, metavar="SECONDS")
    parser.add_argument("--samples", type=int, default=3,
                        help="--check: alerts raised (7 s apart) to measure the alert-to-incident latency")
    parser.add_argument("--devices", type=int, default=150, help="devices on the management console")
    parser.add_argument("--source", choices=SOURCES, default=os.environ.get("DEMO_SOURCE") or "console",
                        help="the Defender source: a management console (default) or Defender for IoT in Azure "
                             "(cloud-connected sensors; default from DEMO_SOURCE)")
    parser.add_argument("--alert-interval", type=float, default=5, metavar="SECONDS",
                        help="the Defender simulator raises a new alert this often (0: never)")
    parser.add_argument("--poll-seconds", type=float, metavar="SECONDS",
                        help="DEFENDER_ALERT_POLL_SECONDS for the alert watcher (default: the trigger's own)")
    args = parser.parse_args(argv)

    if args.source not in SOURCES:
        parser.error(f"DEMO_SOURCE / --source is {args.source!r}; give one of {', '.join(SOURCES)}")
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM (e.g. from CI) stops the stack like Ctrl-C does
    sources = ((SourceSpec(AZURE_CONN_ID, AZURE, args.devices, 2, name="Defender for IoT (Azure demo)"),)
               if args.source == AZURE else None)
    options = StackOptions(home=args.home, devices=args.devices, sensors=2, sources=sources,
                           alert_interval_s=args.alert_interval,
                           alert_poll_seconds=args.poll_seconds)
    stack = Stack(options)
    print("Starting the simulators and Airflow (about a minute on a small machine)...", flush=True)
    try:
        stack.start()
        stack.wait_for_dags()
        if not stack.runs("defender_device_sync"):
            stack.trigger("defender_device_sync")
        print_banner(stack, args)
        if args.check:
            return check(stack, args.check_timeout, args.samples)
        deadline = time.monotonic() + args.duration if args.duration else None
        reported = ""
        while deadline is None or time.monotonic() < deadline:
            time.sleep(5)
            dead = [p.name for p in stack.procs if p.popen.poll() is not None]
            if dead:
                print(f"{', '.join(dead)} stopped unexpectedly; see {stack.logs_dir}", file=sys.stderr)
                return 1
            try:
                stack.raise_on_import_errors()
                reported = ""
            except StackError as exc:
                if str(exc) != reported:
                    print(f"warning: {exc}", file=sys.stderr, flush=True)
                    reported = str(exc)
        return 0
    except KeyboardInterrupt:
        return 1 if args.check else 0
    except StackError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        print("Stopping everything the demo started...", flush=True)
        stack.stop()
        print("Stopped.", flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def print_banner(stack: Stack, args) -> None:
    home = stack.home
    print(f"""
Everything is running.

  Airflow UI          {stack.api_url}
  Sync health page    {stack.api_url}/plugin/defender-servicenow   (nav: Defender ⇄ ServiceNow; JSON at
                      {stack.api_url}/defender-servicenow/api/health)
  Login               admin / {stack.password}   (also in {home / 'passwords.json'})
  ServiceNow (sim)    {stack.sn_url}/sim/   the CMDB CIs and the incidents the DAGs wrote
  Defender (sim)      {stack.defender_url}{'/_sim/state   Defender for IoT in Azure (Entra ID, Resource Graph, ARM)'
                       if args.source == AZURE else '/sim/state   management console'}, {args.devices} devices on 2 sensors{
      f', a new alert every {args.alert_interval:g} s' if args.alert_interval else ''}

Where to look in Airflow:
  DAG runs      Dags > {' / '.join(DAG_IDS)} > Runs
                (the device sync runs now and on its schedule; alert forwarding runs on its own when
                the alert watcher sees new alerts; the clean-up runs only when you trigger it)
  Task logs     a run > a task > Logs   (files under {home / 'logs'})
  Last Sync     Assets > defender_device_sync/{stack.sources[0].conn_id} > events: one per successful sync
  Alerts        Assets > defender_iot_alerts > events: one per batch of new alerts the watcher saw
  Processes     {stack.logs_dir}/*.log
""", flush=True)
    if not args.check:
        print("Press Ctrl-C to stop." + (f" Stopping by itself in {args.duration:g} s." if args.duration else ""),
              flush=True)


def check(stack: Stack, timeout: float, samples: int) -> int:
    """Wait for CIs and incidents in the ServiceNow simulator, measure alert-to-incident latency."""
    def ready():
        stack.raise_on_import_errors()
        return stack.cmdb_source_rows(stack.sources[0].conn_id) and stack.incidents_by_alert()

    try:
        wait_until(ready, timeout, "CIs and incidents in the ServiceNow simulator", interval=2)
        latencies = measure_latency(stack, samples=samples, spacing=7, timeout=timeout)
    except StackError as exc:
        print(f"CHECK FAILED: {exc}", file=sys.stderr)
        print_counts(stack)
        return 1
    print_counts(stack)
    if latencies:
        print(f"alert-to-incident latency: median {statistics.median(latencies):.1f} s over {len(latencies)} "
              f"alerts ({', '.join(f'{x:.1f}' for x in latencies)} s)")
    duplicates = {k: len(v) for k, v in stack.incidents_by_alert().items() if len(v) > 1}
    if duplicates or len(latencies) < samples:
        print(f"CHECK FAILED: duplicate incidents {duplicates}; {len(latencies)}/{samples} new alerts forwarded",
              file=sys.stderr)
        return 1
    print("CHECK OK")
    return 0


def measure_latency(stack: Stack, samples: int, spacing: float, timeout: float) -> list[float]:
    """Raise ``samples`` alerts ``spacing`` seconds apart; seconds until each one's incident appears."""
    raised: dict[str, float] = {}
    seen: dict[str, float] = {}
    start = checked = time.monotonic()
    while len(seen) < samples and time.monotonic() - start < timeout:
        if len(raised) < samples and time.monotonic() - start >= spacing * len(raised):
            for key in stack.raise_alert_keys(1):
                raised[key] = time.monotonic()
        present = stack.incidents_by_alert()
        now = time.monotonic()
        seen.update({k: now - t for k, t in raised.items() if k in present and k not in seen})
        if now - checked > 5:
            stack.raise_on_import_errors()
            checked = now
        time.sleep(0.25)
    return [seen[k] for k in raised if k in seen]


def print_counts(stack: Stack) -> None:
    incidents = stack.incidents_by_alert()
    print(f"CIs written by the sync (sys_object_source rows): "
          f"{len(stack.cmdb_source_rows(stack.sources[0].conn_id))} for {stack.source_device_count()} Defender devices")
    print(f"incidents from Defender alerts: {sum(len(v) for v in incidents.values())} "
          f"for {len(incidents)} distinct alerts")
    for dag_id in DAG_IDS:
        states: dict[str, int] = {}
        for run in stack.runs(dag_id):
            states[run["state"]] = states.get(run["state"], 0) + 1
        print(f"{dag_id} runs: {states or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
