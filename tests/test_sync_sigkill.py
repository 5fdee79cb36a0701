"""A worker killed mid-sync (SIGKILL of a real ``airflow dags test defender_device_sync`` process) costs at
most the unconfirmed work plus the batches since the last checkpoint.

The ServiceNow simulator runs in this process and logs every IRE request it commits (device keys, full item
or rename). The sync runs in a subprocess and is killed once the simulator has committed enough batches that
a sync without checkpoints would re-send more than the bound; the next run (``dag.test()`` here) is then
compared with what ServiceNow had committed before the kill.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from include.simulators import servicenow_ire

pytestmark = [pytest.mark.live, pytest.mark.airflow_db]

SOURCE = "killtest_sensor_1"
KILL_AFTER_BATCHES = 26   # committed IRE requests before the kill: > the bound below, so it discriminates


def _kind(item: dict) -> str:
    return "rename" if set(item) == {"className", "values", "sys_object_source_info"} and list(
        item["values"]) == ["name"] else "full"


@pytest.fixture
def ire_log(monkeypatch):
    """Every committed IRE request: [(device key, "full" | "rename"), ...], in commit order."""
    log: list[list[tuple[str, str]]] = []
    lock = threading.Lock()
    real = servicenow_ire.handle

    def handle(sim, variant, params, body, headers, user):
        reply = real(sim, variant, params, body, headers, user)
        payload = json.loads(body)
        # the device task's requests only: the CMDB depth tasks (sensor CIs, relations, CVE key values) send
        # device items too, as bare references (empty values) or with relations, after the devices
        if variant in ("", "enhanced") and not payload.get("relations"):
            items = [i for i in payload["items"] if i.get("values")
                     and i["sys_object_source_info"]["source_native_key"].startswith(f"{SOURCE}:")]
            if items:
                with lock:
                    log.append([(i["sys_object_source_info"]["source_native_key"], _kind(i)) for i in items])
        return reply

    monkeypatch.setattr(servicenow_ire, "handle", handle)
    return log


def test_sigkill_mid_sync_resends_at_most_the_unconfirmed_work_and_ten_batches(
        airflow_db, monkeypatch, tmp_path, defender_sim_factory, servicenow_conn, ire_log):
    from defender_servicenow.mapping import NAME_MAX, clean_text
    from defender_servicenow.sync import DeviceSync

    from tests.test_device_sync_dag import DAG_FILE, cis, run_dag, task_states

    sensor = defender_sim_factory(mode="sensor", devices=4000, seed=7, conn_id=SOURCE)
    monkeypatch.setenv("DEFENDER_SOURCES", SOURCE)
    sn = servicenow_conn.sim
    sn.set_faults(ire_item_ms=4)      # 0.4 s per batch of 100: the kill lands mid-sync
    parallel = int(re.search(r"^IRE_PARALLEL = (\d+)", DAG_FILE.read_text(), re.M).group(1))
    checkpoint = DeviceSync.__init__.__kwdefaults__["checkpoint_batches"]

    out = open(tmp_path / "dags-test.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "dags", "test", "defender_device_sync"],
                            env=os.environ.copy(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(ire_log) < KILL_AFTER_BATCHES:
            assert proc.poll() is None, (tmp_path / "dags-test.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the sync did not reach the kill point in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        out.close()
    time.sleep(2)                      # requests the dead worker had in flight finish on the instance
    killed_run = [list(batch) for batch in ire_log]
    assert len(killed_run) >= KILL_AFTER_BATCHES

    # what ServiceNow had committed when the worker died: per device, its full item and/or its rename
    committed: dict[str, set[str]] = {}
    batch_of: dict[tuple[str, str], int] = {}
    for n, batch in enumerate(killed_run):
        for key, kind in batch:
            committed.setdefault(key, set()).add(kind)
            batch_of[(key, kind)] = n

    next_run = run_dag()               # the next run, in this process
    assert task_states(next_run)["sync_source[0]"] == "success"
    sent: dict[str, list[str]] = {}
    for batch in ire_log[len(killed_run):]:
        for key, kind in batch:
            sent.setdefault(key, []).append(kind)

    # A device the next run sends twice (first contact + rename) lost every stage ServiceNow had committed for
    # it; one it sends once (a full item, matched through its recorded sys_id) lost at most its rename. A
    # device whose first contact was committed but not its rename needs that one item: no re-send.
    resent_batches, resent_items = set(), 0
    for key, kinds in sent.items():
        done = committed.get(key, set())
        lost = done if len(kinds) > 1 else done & {"rename"}
        resent_items += len(lost)
        resent_batches |= {batch_of[(key, kind)] for kind in lost}
    # Answers since the last checkpoint + requests in flight at the kill (the engine keeps at most twice
    # ``parallel`` requests outstanding, so this holds however far a loaded worker lags behind the instance).
    bound = checkpoint + 2 * parallel
    print(f"killed after {len(killed_run)} committed IRE requests; the next run sent "
          f"{sum(map(len, sent.values()))} items, "
          f"{resent_items} of them re-sends from {len(resent_batches)} committed requests (bound {bound})")
    assert len(resent_batches) <= bound < len(killed_run)

    # and the end state is right: one CI per device, each with its real name
    written = cis(sn, SOURCE)
    devices = [c for c in sn.select("cmdb_ci_hardware") if c.get("sys_class_name") != "cmdb_ci_nids"]  # not sensors
    assert len({ci["sys_id"] for ci in written.values()}) == len(written) == len(devices)
    for key, ci in written.items():
        name = clean_text(sensor.sim.device(int(key.split(":")[1]))["name"], NAME_MAX, keep_end=True)
        assert ci["name"] == name or not name, (key, ci["name"], name)
