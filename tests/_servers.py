"""Real servers for the tests: a private PostgreSQL instance and a two-node Ray cluster.

Every process is started in a session of its own and ended by session id, so nothing
outlives the tests (not even when one fails) and no other process of the machine is touched.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

RAY_HEAD, RAY_WORKER = "127.0.0.2", "127.0.0.3"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(stat.split("/")[2]))
    return found


def end_session(sid: int, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process of session ``sid``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_processes(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_processes(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_processes(sid):
            return


def start_in_session(argv: list[str], **kwargs) -> subprocess.Popen:
    """A process leading a new session (its id is the process id)."""
    return subprocess.Popen(argv, start_new_session=True, **kwargs)


# --- PostgreSQL ----------------------------------------------------------------------------

class PostgresUnavailable(RuntimeError):
    pass


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def ensure_postgres_installed() -> Path:
    """The PostgreSQL server binaries, installing Debian's ``postgresql`` as root if missing."""
    found = _pg_bin()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PostgresUnavailable("PostgreSQL is not installed and cannot be installed here "
                                  "(needs root and apt-get): apt-get install postgresql")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    found = _pg_bin()
    if not found:
        raise PostgresUnavailable("apt-get installed postgresql but no initdb was found")
    return found


class PostgresServer:
    """A throwaway PostgreSQL instance on 127.0.0.1 in a temporary directory (trust auth)."""

    def __init__(self) -> None:
        self.bin = ensure_postgres_installed()
        self.dir = Path(tempfile.mkdtemp(prefix="paretoslim-pg-"))
        self.port = free_port()
        self.sid: int | None = None
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            user = "postgres"
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise PostgresUnavailable("no 'postgres' user to run the server as") from None
            shutil.chown(self.dir, user)
            self.run_as = ["runuser", "-u", user, "--"]

    def start(self) -> None:
        data = self.dir / "data"
        done = subprocess.run([*self.run_as, str(self.bin / "initdb"), "-D", str(data),
                               "-A", "trust", "-U", "postgres", "--no-sync"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {done.stderr.strip()[-500:]}")
        server = start_in_session(
            [*self.run_as, str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
             "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "server.log", "wb"))
        self.sid = server.pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise PostgresUnavailable("the PostgreSQL server exited: "
                                          + (self.dir / "server.log").read_text()[-500:])
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                time.sleep(0.5)
                return
            except OSError:
                time.sleep(0.3)
        raise PostgresUnavailable("the PostgreSQL server did not accept connections in 60 s")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        # as a user writes it: paretoslim picks the driver the postgres extra installs
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.sid is not None:
            end_session(self.sid)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- Ray -----------------------------------------------------------------------------------

class RayCluster:
    """A head (with the ``target:cpu-x86`` resource) and a worker node, one CPU each."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="psray-", dir="/tmp"))
        self.port = free_port(RAY_HEAD)
        self.sids: list[int] = []
        self.env = {**os.environ, **RAY_ENV}

    @property
    def address(self) -> str:
        return f"{RAY_HEAD}:{self.port}"

    def _ray_start(self, *args: str) -> None:
        log = open(self.dir / f"start-{len(self.sids)}.log", "wb")
        process = start_in_session(["ray", "start", "--num-cpus=1", "--disable-usage-stats",
                                    *args], env=self.env, stdout=log, stderr=log)
        self.sids.append(process.pid)
        if process.wait(timeout=180) != 0:
            raise RuntimeError("ray start failed: "
                               + (self.dir / f"start-{len(self.sids) - 1}.log").read_text())

    def start(self) -> None:
        self._ray_start("--head", f"--node-ip-address={RAY_HEAD}", f"--port={self.port}",
                        f"--temp-dir={self.dir}", "--include-dashboard=false",
                        "--resources", json.dumps({"target:cpu-x86": 1}))
        self._ray_start(f"--address={self.address}", f"--node-ip-address={RAY_WORKER}")

    def stop(self) -> None:
        for sid in self.sids:
            end_session(sid)
        # worker processes the raylets started, should any have left their session
        for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                if str(self.dir).encode() in Path(cmdline).read_bytes():
                    os.kill(int(cmdline.split("/")[2]), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[int]:
        return [pid for sid in self.sids for pid in session_processes(sid)]
