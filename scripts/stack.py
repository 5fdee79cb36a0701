"""A live stack on loopback: both simulators and real Airflow 3 processes, as subprocesses.

Used by ``scripts/demo.py`` (the README's main command) and ``tests/test_live_stack.py``::

    with Stack(StackOptions(home=Path(".demo/airflow_home"))) as stack:
        run_id = stack.trigger("defender_device_sync")
        stack.wait_for_run("defender_device_sync", run_id)

What it starts, each in its own session (process group) with its output in ``<home>/stack-logs/``:
the ServiceNow simulator, the Defender for IoT simulator (a management console), then ``airflow
db migrate`` and ``api-server``, ``scheduler --skip-serve-logs``, ``dag-processor`` and ``triggerer
--skip-serve-logs`` (LocalExecutor, SQLite in ``home``). Connections are ``AIRFLOW_CONN_*`` JSON
variables pointing at the simulators; the admin password (SimpleAuthManager) is generated and written
to ``<home>/passwords.json``. ``stop()`` ends every process group it started (SIGTERM, bounded wait,
then SIGKILL), including task processes that moved to their own group.

The distributed engine (tests/test_distributed.py) uses the same class with other options: ``executor=
"CeleryExecutor"``, ``sql_alchemy_conn`` (Postgres), ``celery_broker_url`` (Redis) and
``celery_result_backend``, ``triggerers=2``, ``celery_workers=("worker-a", "worker-b")`` (each ``airflow
celery worker -H <name>``; its task instances report ``<name>`` as their hostname through ``[core]
hostname_callable``, since every process here shares one machine's hostname) and ``sources`` (one
Defender simulator per source, e.g. two sensors and a console).

The Airflow REST API helpers (token, ``trigger``, ``wait_for_run``, ...) are in ``scripts/stack_api.py``
(a mixin of :class:`Stack`; ``StackError``, ``wait_until`` and ``DAG_IDS`` are importable from here too),
the process-group handling (``stop_stale``) in ``scripts/stack_procs.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from scripts.services import Managed
from scripts.stack_api import (  # noqa: F401  (DAG_IDS, StackError, wait_until re-exported for callers)
    DAG_IDS,
    USERNAME,
    AirflowApi,
    StackError,
    wait_until,
)
from scripts.stack_procs import PIDS_FILE, _descendants, _pgid_or_none, _signal_group, stop_stale

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVICENOW_CONN_ID = "servicenow_default"
DEFENDER_CONN_ID = "defender_iot_default"
AZURE = "azure"   # SourceSpec.mode of a Defender for IoT in Azure source (the Azure simulator)

# Forward every alert as an incident, and Major and above also to the Defender for IoT application table.
DEMO_RULES = {
    "rules": [
        {"name": "all-alerts-to-incidents", "minimum_severity": "Warning", "protocols": "all", "engines": "all",
         "report_alert_notifications": True, "report_system_notifications": True,
         "actions": [{"type": "servicenow", "report_type": "incidents", "table": "incident"}]},
        {"name": "major-to-application", "minimum_severity": "Major", "protocols": "all", "engines": "all",
         "report_alert_notifications": True, "report_system_notifications": False,
         "actions": [{"type": "servicenow", "report_type": "defender_for_iot_application"}]},
    ]
}


@dataclass(frozen=True)
class SourceSpec:
    """One Defender simulator and the connection pointing at it."""
    conn_id: str
    mode: str = "management_console"          # "sensor" | "management_console" | "azure" (the Azure simulator)
    devices: int = 150
    sensors: int = 2                          # management console only: sensors behind it
    seed: int = 1
    name: str = "demo-management-console"


@dataclass
class StackOptions:
    home: Path                                # AIRFLOW_HOME (wiped at start unless reuse=True)
    devices: int = 150                        # management console inventory (spread over `sensors`)
    sensors: int = 2
    seed: int = 1
    alert_interval_s: float = 0               # > 0: the Defender simulator adds an alert every N s
    alert_poll_seconds: float | None = None   # DEFENDER_ALERT_POLL_SECONDS (None: the trigger's default)
    fast: bool = False                        # short DAG-processing intervals, 1 s scheduler heartbeat
    reuse: bool = False                       # keep the metadata DB of an earlier run
    extra_env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 300.0
    # Distributed engine (defaults: the embedded LocalExecutor on SQLite, one triggerer, one console).
    executor: str = "LocalExecutor"
    sql_alchemy_conn: str | None = None       # None: SQLite in home
    celery_broker_url: str | None = None
    celery_result_backend: str | None = None
    celery_workers: tuple[str, ...] = ()      # worker names, one `airflow celery worker -H <name>` each
    worker_concurrency: int = 1
    triggerers: int = 1
    sources: tuple[SourceSpec, ...] | None = None  # None: one console (devices, sensors, seed above)
    servicenow_args: tuple[str, ...] = ()     # extra servicenow_sim arguments, e.g. ("--ire-item-ms", "300")
    local_settings: str = ""                  # text of <home>/config/airflow_local_settings.py (cluster policies)


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    marker: str  # a word in its command line (checked before killing a stale process from an earlier run)


class Stack(AirflowApi, Managed):
    def __init__(self, options: StackOptions):
        self.options = options
        self.home = options.home.resolve()
        self.logs_dir = self.home / "stack-logs"
        self.procs: list[_Proc] = []
        self.password = ""
        self.api_url = self.sn_url = self.defender_url = ""
        self.defender_urls: dict[str, str] = {}
        o = options
        self.sources = o.sources or (SourceSpec(DEFENDER_CONN_ID, "management_console", o.devices, o.sensors,
                                                o.seed),)
        self.env: dict[str, str] = {}
        self._http = requests.Session()
        self._token: str | None = None

    # ------------------------------------------------------------------ lifecycle (with Stack(...) as stack)

    def start(self) -> None:
        from include.simulators.runner import free_port

        stop_stale(self.home)
        if self.home.exists() and not self.options.reuse:
            shutil.rmtree(self.home)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        sn_port, api_port = free_port(), free_port()
        def_ports = [free_port() for _ in self.sources]
        self.sn_url = f"http://127.0.0.1:{sn_port}"
        self.defender_urls = {s.conn_id: f"http://127.0.0.1:{p}" for s, p in zip(self.sources, def_ports, strict=True)}
        self.defender_url = self.defender_urls[self.sources[0].conn_id]
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.env = self._environment(api_port)

        py = sys.executable
        self._spawn("servicenow-sim", [py, "-m", "include.simulators.servicenow_sim", "--port", str(sn_port),
                                       *self.options.servicenow_args], "servicenow_sim")
        o = self.options
        for i, (source, port) in enumerate(zip(self.sources, def_ports, strict=True)):
            defender = [py, "-m", "include.simulators.defender_sim", "--port", str(port), "--mode", source.mode,
                        "--devices", str(source.devices), "--seed", str(source.seed),
                        "--sensors", str(source.sensors), "--name", source.name]
            if source.mode == AZURE:   # Entra ID, Resource Graph and ARM on one loopback app
                defender = [py, "-m", "include.simulators.azure_sim", "--port", str(port), "--devices",
                            str(source.devices), "--seed", str(source.seed), "--sensors", str(source.sensors),
                            "--alerts", "5", "--quota", "100"]
            if o.alert_interval_s:
                defender += ["--alert-interval", str(o.alert_interval_s)]
            self._spawn("defender-sim" if i == 0 else f"defender-sim-{source.conn_id}", defender,
                        "azure_sim" if source.mode == AZURE else "defender_sim")

        migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"], cwd=ROOT, env=self.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 timeout=o.startup_timeout, check=False)
        (self.logs_dir / "db-migrate.log").write_bytes(migrate.stdout)
        if migrate.returncode:
            raise StackError(f"'airflow db migrate' failed (exit {migrate.returncode}); "
                             f"see {self.logs_dir / 'db-migrate.log'}")
        components = [("api-server", ["api-server"]), ("scheduler", ["scheduler", "--skip-serve-logs"]),
                      ("dag-processor", ["dag-processor"])]
        components += [("triggerer" if i == 0 else f"triggerer-{i + 1}", ["triggerer", "--skip-serve-logs"])
                       for i in range(o.triggerers)]
        for name, args in components:
            self._spawn(name, [str(BIN / "airflow"), *args], "airflow")
        for worker in o.celery_workers:
            self._spawn(worker, [str(BIN / "airflow"), "celery", "worker", "-H", worker, "--skip-serve-logs",
                                 "--concurrency", str(o.worker_concurrency), "--without-gossip"],
                        "airflow", {"STACK_WORKER_NAME": worker})

        deadline = time.monotonic() + o.startup_timeout
        self._wait_http(f"{self.sn_url}/sim/state", deadline, "ServiceNow simulator")
        for source in self.sources:
            probe = "/_sim/counters" if source.mode == AZURE else "/sim/state"
            self._wait_http(self.defender_urls[source.conn_id] + probe, deadline,
                            f"Defender simulator of {source.conn_id}")
        self._wait_http(f"{self.api_url}/api/v2/version", deadline, "Airflow api-server", auth=True)

    def stop(self, timeout: float = 20.0) -> None:
        """End every process group this stack started: SIGTERM, wait up to ``timeout``, then SIGKILL."""
        if not self.procs:
            return
        groups = {p.popen.pid for p in self.procs if p.popen.poll() is None}
        groups |= {pgid for pid in _descendants(groups) if (pgid := _pgid_or_none(pid)) is not None}
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pgid in groups:  # stragglers (leaders that ignored SIGTERM, task runners in their own group)
            _signal_group(pgid, signal.SIGKILL)
        for p in self.procs:
            try:
                p.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        (self.home / PIDS_FILE).unlink(missing_ok=True)
        self._http.close()

    def _environment(self, api_port: int) -> dict[str, str]:
        from cryptography.fernet import Fernet

        from include.simulators.defender_sim import SIM_TOKEN
        from include.simulators.servicenow_sim import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_USER

        o = self.options
        passwords = self.home / "passwords.json"
        if o.reuse and passwords.exists():
            self.password = json.loads(passwords.read_text())[USERNAME]
        else:
            self.password = secrets.token_urlsafe(12)
            passwords.write_text(json.dumps({USERNAME: self.password}))
            passwords.chmod(0o600)
        rules = self.home / "forwarding_rules.yaml"
        rules.write_text(yaml.safe_dump(DEMO_RULES, sort_keys=False))
        # Start from this environment minus anything that configures Airflow or the integration
        # (pytest's conftest sets AIRFLOW_HOME and friends; a developer's shell may set connections).
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AIRFLOW", "DEFENDER_", "SERVICENOW_", "_AIRFLOW"))}
        api = f"http://127.0.0.1:{api_port}"
        env.update({
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": self.env_pythonpath(),
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTOR": o.executor,
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": o.sql_alchemy_conn or f"sqlite:///{self.home / 'airflow.db'}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__BASE_URL": api,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(48),  # 96 bytes, shared by every component
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            f"AIRFLOW_CONN_{SERVICENOW_CONN_ID.upper()}": json.dumps({
                "conn_type": "servicenow", "host": self.sn_url, "login": SIM_USER, "password": SIM_PASSWORD,
                "extra": {"client_id": SIM_CLIENT_ID, "client_secret": SIM_CLIENT_SECRET}}),
            # Lets the device sync write its summary as the run's note (through Airflow's REST API).
            "AIRFLOW_CONN_AIRFLOW_API": json.dumps({"conn_type": "http", "host": api, "login": USERNAME,
                                                    "password": self.password}),
            "AIRFLOW_API_CONN_ID": "airflow_api",
            "DEFENDER_SOURCES": ",".join(source.conn_id for source in self.sources),
            "SERVICENOW_CONN_ID": SERVICENOW_CONN_ID,
            "DEFENDER_FORWARDING_RULES_FILE": str(rules),
        })
        for source in self.sources:
            env[f"AIRFLOW_CONN_{source.conn_id.upper()}"] = json.dumps(
                azure_connection(self.defender_urls[source.conn_id], source.name) if source.mode == AZURE else {
                    "conn_type": "defender_iot", "host": self.defender_urls[source.conn_id], "password": SIM_TOKEN,
                    "extra": {"appliance": source.mode, "name": source.name}})
        env.update(self._sqlite_environment())
        env.update(self._celery_environment())
        if o.fast:
            env.update({"AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
                        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1"})
        if o.alert_poll_seconds is not None:
            env["DEFENDER_ALERT_POLL_SECONDS"] = str(o.alert_poll_seconds)
        env.update(o.extra_env)
        return env

    def _sqlite_environment(self) -> dict[str, str]:
        """On SQLite, let a writer wait up to 60 s for the database lock (pysqlite's default is 5 s): with the
        scheduler, dag-processor, triggerer and API server writing on 2 busy cores, 5 s was too short once in
        CI (POST /dagRuns answered 500 "Database error")."""
        if self.options.sql_alchemy_conn:
            return {}
        config = self.home / "config"  # on every component's sys.path (see _celery_environment)
        config.mkdir(exist_ok=True)
        (config / "stack_sqlite.py").write_text('CONNECT_ARGS = {"timeout": 60}\n')
        return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "stack_sqlite.CONNECT_ARGS",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "stack_sqlite.CONNECT_ARGS"}

    def _celery_environment(self) -> dict[str, str]:
        """CeleryExecutor settings, and the hostname each worker's task instances report."""
        o = self.options
        env = {}
        if o.celery_broker_url:
            env["AIRFLOW__CELERY__BROKER_URL"] = o.celery_broker_url
        if o.celery_result_backend:
            env["AIRFLOW__CELERY__RESULT_BACKEND"] = o.celery_result_backend
        config = self.home / "config"  # on every component's sys.path
        if o.local_settings:
            config.mkdir(exist_ok=True)
            (config / "airflow_local_settings.py").write_text(o.local_settings)
        if o.celery_workers:
            # One machine, one hostname: [core] hostname_callable lets each worker report its own name
            # (STACK_WORKER_NAME, set per worker; every other process keeps the machine's name).
            config.mkdir(exist_ok=True)
            (config / "stack_hostname.py").write_text(
                "import os\nimport socket\n\n\ndef hostname():\n"
                "    return os.environ.get('STACK_WORKER_NAME') or socket.getfqdn()\n")
            env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] = "stack_hostname.hostname"
        if config.exists():
            env["PYTHONPATH"] = os.pathsep.join([str(config), self.env_pythonpath()])
        return env

    @staticmethod
    def env_pythonpath() -> str:
        return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    def process(self, name: str) -> subprocess.Popen:
        return next(p.popen for p in self.procs if p.name == name)

    def kill(self, name: str) -> None:
        """SIGKILL the process ``name`` with every process it started (as when its machine dies)."""
        leader = self.process(name).pid
        pids = {leader} | _descendants({leader})
        for pgid in {pgid for pid in pids if (pgid := _pgid_or_none(pid)) is not None}:
            _signal_group(pgid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.process(name).wait(10)

    def _spawn(self, name: str, argv: list[str], marker: str, env: dict[str, str] | None = None) -> None:
        with open(self.logs_dir / f"{name}.log", "ab") as log:
            popen = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL,
                                     stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(_Proc(name, popen, marker))
        (self.home / PIDS_FILE).write_text(json.dumps({p.name: [p.popen.pid, p.marker] for p in self.procs}))

    def _wait_http(self, url: str, deadline: float, what: str, auth: bool = False) -> None:
        while True:
            dead = [p.name for p in self.procs if p.popen.poll() is not None]
            if dead:
                raise StackError(f"{', '.join(dead)} exited while waiting for the {what}; "
                                 f"see the logs in {self.logs_dir}")
            try:
                if (self._http.get(url, timeout=5, headers=self._headers() if auth else None).status_code
                        == 200):
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise StackError(f"the {what} did not answer {url} in time; see the logs in {self.logs_dir}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ simulators

    @property
    def defender_token(self) -> str:
        from include.simulators.defender_sim import SIM_TOKEN

        return SIM_TOKEN

    def secrets(self) -> list[str]:
        """Every secret this stack handed to Airflow (for "no secret in any log" checks)."""
        from include.simulators.azure_sim import SIM_CLIENT_SECRET as AZURE_SECRET
        from include.simulators.servicenow_sim import SIM_CLIENT_SECRET, SIM_PASSWORD

        return [SIM_PASSWORD, SIM_CLIENT_SECRET, AZURE_SECRET, self.defender_token, self.password,
                self.env["AIRFLOW__API_AUTH__JWT_SECRET"], self.env["AIRFLOW__CORE__FERNET_KEY"]]

    def sn_records(self, table: str) -> list[dict]:
        resp = self._http.get(f"{self.sn_url}/sim/tables/{table}", timeout=30)
        resp.raise_for_status()
        return resp.json()["records"]

    def sn_state(self) -> dict:
        return self._http.get(f"{self.sn_url}/sim/state", timeout=30).json()

    def sn_faults(self, **faults) -> None:
        self._http.post(f"{self.sn_url}/sim/faults", json=faults, timeout=30).raise_for_status()

    def defender_state(self) -> dict:
        return self._http.get(f"{self.defender_url}/sim/state", timeout=30).json()

    def add_alerts(self, count: int = 1, **fields) -> list[dict]:
        """Raise ``count`` new alerts on the Defender simulator; returns them (each with its ``id``)."""
        resp = self._http.post(f"{self.defender_url}/sim/alerts", json={"count": count, **fields}, timeout=30)
        resp.raise_for_status()
        body = resp.json()
        return body if isinstance(body, list) else body.get("alerts", [])

    def raise_alert_keys(self, count: int = 1) -> list[str]:
        """Raise ``count`` alerts on the first source (appliance or Azure); their keys ``<conn id>:<alert id>``
        as :meth:`incidents_by_alert` groups them."""
        source = self.sources[0]
        if source.mode != AZURE:
            return [f"{source.conn_id}:{a['id']}" for a in self.add_alerts(count)]
        from defender_servicenow.azure_models import stable_id

        return [f"{source.conn_id}:{stable_id(a['id'])}" for a in self.add_azure_alerts(source.conn_id, count)]

    def source_device_count(self) -> int | None:
        """How many devices the first source's simulator holds."""
        source = self.sources[0]
        url = self.defender_urls[source.conn_id] + ("/_sim/state" if source.mode == AZURE else "/sim/state")
        return self._http.get(url, timeout=30).json().get("devices")

    def add_azure_alerts(self, conn_id: str, count: int = 1, **properties) -> list[dict]:
        """Raise ``count`` alerts starting now on the Azure simulator of ``conn_id`` (ARG records)."""
        resp = self._http.post(f"{self.defender_urls[conn_id]}/_sim/alerts", json={"count": count, **properties},
                               timeout=30)
        resp.raise_for_status()
        return resp.json()

    def cmdb_source_rows(self, conn_id: str = DEFENDER_CONN_ID) -> list[dict]:
        """``sys_object_source`` rows written by this integration for the Defender connection."""
        return [r for r in self.sn_records("sys_object_source")
                if str(r.get("id", "")).startswith(f"{conn_id}:")]

    def incidents_by_alert(self) -> dict[str, list[dict]]:
        """Incidents grouped by alert key (``<conn id>:<alert id>``), from ``correlation_id``."""
        grouped: dict[str, list[dict]] = {}
        for rec in self.sn_records("incident"):
            corr = str(rec.get("correlation_id") or "")
            if corr.startswith("defender-iot:"):
                # keys are <conn id>:<alert id>@<alert time ms>; group by <conn id>:<alert id>
                grouped.setdefault(corr.removeprefix("defender-iot:").split("@", 1)[0], []).append(rec)
        return grouped


def azure_connection(url: str, name: str) -> dict:
    """A ``defender_iot_azure`` connection whose authority and resource manager are the Azure simulator."""
    from include.simulators.azure_sim import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_SUBSCRIPTION, SIM_TENANT

    return {"conn_type": "defender_iot_azure", "login": SIM_CLIENT_ID, "password": SIM_CLIENT_SECRET,
            "extra": {"tenant_id": SIM_TENANT, "subscriptions": [SIM_SUBSCRIPTION], "authority": url,
                      "resource_manager": url, "name": name}}


def alert_key(alert: dict) -> str:
    return f"{DEFENDER_CONN_ID}:{alert['id']}"
