"""Real Postgres and Redis servers on loopback, for the distributed test (tests/test_distributed.py).

Both come from the Debian packages ``postgresql`` and ``redis-server`` (``.ci/run`` installs them)::

    with Postgres() as pg, Redis() as redis:
        pg.sqlalchemy_url("psycopg2")     # postgresql+psycopg2://airflow:<password>@127.0.0.1:<port>/airflow
        redis.url                         # redis://127.0.0.1:<port>/0

Postgres: ``initdb`` in a fresh temporary folder, ``pg_ctl start`` on a free loopback port (Unix socket in
the same folder, no fsync: the data is thrown away), password authentication for the ``airflow`` role,
database ``airflow``. Postgres refuses to run as root, so as root the folder is handed to the ``postgres``
user the Debian package creates and every server command runs through ``runuser -u postgres``.
Redis: ``redis-server`` on a free loopback port without persistence. ``stop()`` ends each server and
removes its folder. ``missing()`` names what is not installed (the test skips with that reason).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_USER = "airflow"
PG_DATABASE = "airflow"
RUN_AS = "postgres"  # the system user of Debian's postgresql package


class ServiceError(RuntimeError):
    """A server could not be started."""


def _free_port() -> int:
    from include.simulators.runner import free_port

    return free_port()


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin folder (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def missing() -> list[str]:
    """What the distributed test needs and this machine lacks (empty when everything is there)."""
    gaps = []
    if postgres_bin() is None:
        gaps.append("PostgreSQL server (apt-get install postgresql)")
    elif os.geteuid() == 0 and shutil.which("runuser") is None:
        gaps.append("runuser (util-linux), to run Postgres as a non-root user")
    if shutil.which("redis-server") is None:
        gaps.append("redis-server (apt-get install redis-server)")
    return gaps


class Managed:
    """``with X() as x``: ``start()`` (``stop()`` on failure, then re-raised), and ``stop()`` at the end."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Postgres(Managed):
    def __init__(self, startup_timeout: float = 60.0):
        self.startup_timeout = startup_timeout
        self.port = 0
        self.password = secrets.token_urlsafe(16)
        self.folder: Path | None = None
        self._bin = postgres_bin()
        self._started = False

    def _run(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", RUN_AS, "--"] if os.geteuid() == 0 else []
        proc = subprocess.run([*prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, check=False, cwd=self.folder)
        if proc.returncode:
            raise ServiceError(f"{Path(argv[0]).name} failed (exit {proc.returncode}): {proc.stdout[-1500:]}")
        return proc

    def start(self) -> None:
        if self._bin is None:
            raise ServiceError("no PostgreSQL server installed (apt-get install postgresql)")
        self.folder = Path(tempfile.mkdtemp(prefix="pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.folder, RUN_AS, RUN_AS)
        data, pwfile = self.folder / "data", self.folder / "pwfile"
        pwfile.write_text(self.password)
        if os.geteuid() == 0:
            shutil.chown(pwfile, RUN_AS, RUN_AS)
        pwfile.chmod(0o600)
        self._run(str(self._bin / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}",
                  "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync")
        pwfile.unlink()
        self.port = _free_port()
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(self._bin / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "postgres.log"),
                  "-o", options, "-w", "-t", str(int(self.startup_timeout)), "start",
                  timeout=self.startup_timeout + 10)
        self._started = True
        env = {**os.environ, "PGPASSWORD": self.password}
        created = subprocess.run([str(self._bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                                  "-U", PG_USER, PG_DATABASE], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=30, check=False)
        if created.returncode:
            raise ServiceError(f"createdb failed: {created.stdout[-500:]}")

    @property
    def address(self) -> str:
        """``user:password@127.0.0.1:port/dbname`` (the part of a URL after the scheme)."""
        return f"{PG_USER}:{self.password}@127.0.0.1:{self.port}/{PG_DATABASE}"

    def sqlalchemy_url(self, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{self.address}"

    def stop(self) -> None:
        if self._started:
            try:
                self._run(str(self._bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate",
                          "-w", "stop", timeout=30)
            except (ServiceError, subprocess.TimeoutExpired):
                pass
            self._started = False
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class Redis(Managed):
    def __init__(self, startup_timeout: float = 30.0):
        self.startup_timeout = startup_timeout
        self.port = 0
        self.folder: Path | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}/0"

    @property
    def url(self) -> str:
        return f"redis://{self.address}"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise ServiceError("redis-server is not installed (apt-get install redis-server)")
        self.folder = Path(tempfile.mkdtemp(prefix="redis-"))
        self.port = _free_port()
        with open(self.folder / "redis.log", "ab") as log:
            self._proc = subprocess.Popen(
                [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.folder), "--protected-mode", "yes"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while not self._ping():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log_text = (self.folder / "redis.log").read_text(errors="replace")[-1000:]
                raise ServiceError(f"redis-server did not answer PING: {log_text}")
            time.sleep(0.1)

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            self._proc = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def celery_engine_env(database: str, broker: str) -> dict[str, str]:
    """The executor, metadata DB, broker and result-backend settings of the distributed engine.

    ``database``: ``user:password@host[:port]/dbname``; ``broker``: ``[:password@]host:port/db``. One
    definition for the live test and docker-compose.yaml (tests/test_docker_compose.py compares them).
    Every Postgres URL names its driver: with SQLAlchemy 2.1 a bare ``postgresql://`` selects psycopg 3,
    which is not installed; the API server derives ``postgresql+asyncpg://`` from the same URL.
    """
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{database}",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{database}",
        "AIRFLOW__CELERY__BROKER_URL": f"redis://{broker}",
    }
