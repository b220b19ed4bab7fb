"""A private PostgreSQL cluster from Debian's packages on loopback, for tests, benchmarks and the demo."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.services import Service, ServiceError, _started, free_port

__all__ = ["POSTGRES_PASSWORD", "POSTGRES_USER", "PostgresService", "postgres_bin_dir", "start_postgres"]

POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin/postgres"
# The cluster's superuser and the password its TCP logins need (scram): tests then use a URL with a
# password, as production does, and a wrong one is refused for real.
POSTGRES_USER = "gateway"
POSTGRES_PASSWORD = "test-password-0123"
# initdb and postgres refuse to run as root; as root we run them as the account the package creates.
POSTGRES_ACCOUNT = "postgres"


def postgres_bin_dir() -> Path | None:
    """The newest of Debian's PostgreSQL server versions installed, or None."""
    found = sorted(glob.glob(POSTGRES_BIN_GLOB), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


@dataclass
class PostgresService(Service):
    """A private cluster: ``url`` reaches its ``postgres`` database as its superuser, over TCP."""

    url: str = ""
    data_dir: Path = Path()
    run_as: str | None = None

    def url_for(self, database: str) -> str:
        return self.url.rsplit("/", 1)[0] + "/" + database

    def restart(self) -> None:
        # Not self.stop(): that deletes the data directory, which a restart is meant to find again.
        Service.stop(self, signal.SIGINT)
        self.proc = _spawn_as(self.argv, self.workdir, self.name, self.run_as)
        self.wait_ready()

    def wait_ready(self) -> None:
        # The port opens before the server takes logins: pg_isready says when it does.
        super().wait_ready()
        _wait_postgres_ready(Path(self.argv[0]).parent, self.port, self.proc)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> None:
        # SIGINT is PostgreSQL's fast shutdown; SIGTERM (smart) would wait for every client to leave.
        super().stop(signal.SIGINT if sig == signal.SIGTERM else sig, timeout)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _spawn_as(argv: list[str], workdir: Path, name: str, user: str | None) -> subprocess.Popen[bytes]:
    # Popen's user= switches in the child before exec: no runuser/su in between to forward signals.
    with open(workdir / f"{name}.out", "ab") as log:
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True,
            user=user, group=user, extra_groups=[] if user else None,
        )  # fmt: skip


def start_postgres(workdir: Path, port: int | None = None, crash_safe: bool = False) -> PostgresService:
    """Start a private PostgreSQL cluster on 127.0.0.1:``port`` (free if None), its socket in ``workdir``.

    Test scaffolding: ``fsync`` is off, so a crash of the machine may lose it; ``stop()`` removes it.
    ``synchronous_commit`` is off too, so a crash of the server may lose the last commits it confirmed,
    unless `crash_safe`: a test that kills the server and counts what survived needs it on (without
    fsync, what was written is still in the kernel's cache when the server dies).
    Run as root, the server runs as the ``postgres`` account, and its data directory (which it must
    own, and reach through every parent) is a private temporary directory of that account: pytest's
    and most work trees' parents are closed to other users, and opening them up is not ours to do.
    """
    bindir = postgres_bin_dir()
    if bindir is None:
        raise ServiceError("PostgreSQL not found: install it with `apt-get install postgresql` (scripts/setup.sh does)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(POSTGRES_ACCOUNT)
        except KeyError:
            raise ServiceError(
                f"as root, PostgreSQL needs the {POSTGRES_ACCOUNT!r} account (the package makes it)"
            ) from None
        run_as = POSTGRES_ACCOUNT
        data_dir = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        os.chown(data_dir, account.pw_uid, account.pw_gid)
    else:
        data_dir = workdir / "data"
        shutil.rmtree(data_dir, ignore_errors=True)  # left by a run that did not end cleanly: scaffolding
        data_dir.mkdir(mode=0o700)
    pwfile = data_dir.parent / f".{data_dir.name}.pw" if run_as is None else data_dir / "pw"
    pwfile.write_text(POSTGRES_PASSWORD + "\n")
    if run_as is not None:
        os.chown(pwfile, pwd.getpwnam(run_as).pw_uid, -1)
    pgdata = data_dir / "pgdata"
    initdb = [
        str(bindir / "initdb"), "-D", str(pgdata), "-U", POSTGRES_USER, f"--pwfile={pwfile}",
        "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync",
    ]  # fmt: skip
    done = subprocess.run(
        initdb, capture_output=True, cwd=data_dir, user=run_as, group=run_as, extra_groups=[] if run_as else None
    )
    pwfile.unlink()
    if done.returncode != 0:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise ServiceError(f"initdb failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}")
    # The socket beside the data: as root, workdir itself may be closed to the server's account.
    sockets = data_dir / "sockets"
    sockets.mkdir()
    if run_as is not None:
        os.chown(sockets, pwd.getpwnam(run_as).pw_uid, -1)
    argv = [
        str(bindir / "postgres"), "-D", str(pgdata), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
        "-c", f"unix_socket_directories={sockets}", "-c", "fsync=off",
        "-c", f"synchronous_commit={'on' if crash_safe else 'off'}",
        "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "log_min_messages=warning",
    ]  # fmt: skip
    url = f"postgresql://{POSTGRES_USER}:{POSTGRES_PASSWORD}@127.0.0.1:{port}/postgres"
    proc = _spawn_as(argv, workdir, "postgres", run_as)
    svc = PostgresService("postgres", port, workdir, proc, argv, url=url, data_dir=data_dir, run_as=run_as)
    try:
        return _started(svc)
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise


def _wait_postgres_ready(bindir: Path, port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    # The port opens before the server takes logins ("the database system is starting up"), longer so on a
    # loaded machine: pg_isready says when it accepts.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"postgres exited with {proc.returncode}")
        ready = subprocess.run(
            [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "1"], check=False
        )
        if ready.returncode == 0:
            return
        time.sleep(0.05)
    raise ServiceError(f"postgres on port {port} did not accept connections within {timeout:.0f} s")
