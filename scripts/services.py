"""Start Debian's Mosquitto, InfluxDB 1.6, nginx and PostgreSQL on loopback, for demos and tests.

Each service runs from a private directory (config, data, logs) on a port of
our choosing, so a test run never touches the system services or a demo
that is already running. ``python -m scripts.services up`` starts the demo
stack on the default ports; the test suite calls the functions directly.

The nginx proxy is test scaffolding only: Debian's InfluxDB 1.6 has no
``/api/v2/write``, so nginx maps ``/api/v2/write?bucket=B`` onto
``/write?db=B`` to let the v2 sink be exercised against a real server.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = "/usr/sbin/mosquitto"
INFLUXD = "/usr/bin/influxd"
NGINX = "/usr/sbin/nginx"


class ServiceError(RuntimeError):
    """A service binary is missing or did not come up."""


@dataclass
class Service:
    name: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        """Start the same binary with the same config and data again."""
        self.stop()
        ready = self.workdir / "ejabberd.ready"  # ejabberd's start command writes it once it accepts
        if self.name == "ejabberd":
            ready.unlink(missing_ok=True)
        self.proc = _spawn(self.argv, self.workdir, self.name)
        _wait_port(self.port, self.proc, self.workdir, self.name)
        if self.name == "influxd":
            _wait_influx_ready(self.port, self.proc, self.workdir)
        if self.name == "ejabberd":  # it binds its port before it accepts
            deadline = time.monotonic() + 30.0
            while not ready.exists() and self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def _need(binary: str, package: str) -> None:
    if not Path(binary).exists():
        raise ServiceError(f"{binary} not found: install it with `apt-get install {package}` (scripts/setup.sh does)")


def _spawn(argv: list[str], workdir: Path, name: str) -> subprocess.Popen[bytes]:
    with open(workdir / f"{name}.out", "ab") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)


def _wait_port(port: int, proc: subprocess.Popen[bytes], workdir: Path, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (workdir / f"{name}.out").read_text(errors="replace")[-2000:]
            raise ServiceError(f"{name} exited with {proc.returncode}:\n{tail}")
        if port_open(port):
            return
        time.sleep(0.05)
    raise ServiceError(f"{name} did not open port {port} within {timeout:.0f} s")


def _wait_influx_ready(port: int, proc: subprocess.Popen[bytes], workdir: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"influxd exited with {proc.returncode}; see {workdir}/influxd.out")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as r:
                if r.status == 204:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise ServiceError(f"influxd on port {port} did not answer /ping within {timeout:.0f} s")


def raise_fd_limit() -> None:
    """Let the broker (a child of ours) hold 10,000+ car connections."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(target, 1_048_576)), hard))


MOSQUITTO_CONF = """\
# Generated by scripts/services.py for local runs and tests.
listener {port} 127.0.0.1
allow_anonymous true
# Run as whoever started us: as root, Mosquitto would otherwise switch to the
# `mosquitto` user, which cannot write its persistence file into our directory.
user {user}
persistence true
persistence_location {workdir}/
autosave_interval 1
log_dest file {workdir}/mosquitto.log
log_type error
log_type warning
log_type notice
# Keep every QoS 1 message for the gateway's persistent session instead of
# dropping past the default of 1000 (see docs/operations.md).
max_queued_messages 2000000
max_inflight_messages 0
max_packet_size 1048576
# Commands and acks are tiny: without this, Nagle + delayed ACK add ~40 ms per hop.
set_tcp_nodelay true
"""


def start_mosquitto(workdir: Path, port: int | None = None, extra_conf: str = "") -> Service:
    _need(MOSQUITTO, "mosquitto")
    raise_fd_limit()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(MOSQUITTO_CONF.format(port=port, workdir=workdir, user=getpass.getuser()) + extra_conf)
    argv = [MOSQUITTO, "-c", str(conf)]
    proc = _spawn(argv, workdir, "mosquitto")
    _wait_port(port, proc, workdir, "mosquitto")
    return Service("mosquitto", port, workdir, proc, argv)


INFLUX_CONF = """\
reporting-enabled = false
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{workdir}/meta"
  logging-enabled = false
[data]
  dir = "{workdir}/data"
  wal-dir = "{workdir}/wal"
  query-log-enabled = false
  cache-snapshot-write-cold-duration = "10s"
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{port}"
  auth-enabled = false
  log-enabled = false
  max-body-size = 0
[logging]
  level = "warn"
[continuous_queries]
  enabled = false
"""


def start_influxd(workdir: Path, port: int | None = None) -> Service:
    _need(INFLUXD, "influxdb")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = workdir / "influxdb.conf"
    conf.write_text(INFLUX_CONF.format(port=port, rpc_port=free_port(), workdir=workdir))
    argv = [INFLUXD, "-config", str(conf)]
    proc = _spawn(argv, workdir, "influxd")
    _wait_port(port, proc, workdir, "influxd")
    _wait_influx_ready(port, proc, workdir)
    return Service("influxd", port, workdir, proc, argv)


NGINX_CONF = """\
# Test scaffolding: lets the InfluxDB v2 sink write to Debian's InfluxDB 1.6.
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fastcgi;
  uwsgi_temp_path {workdir}/uwsgi;
  scgi_temp_path {workdir}/scgi;
  client_max_body_size 0;
  # Keep bodies in memory: workers may not write to our temp dirs.
  client_body_buffer_size 64m;
  proxy_request_buffering off;
  server {{
    listen 127.0.0.1:{port};
    location = /api/v2/write {{
      proxy_pass http://127.0.0.1:{influx_port}/write?db=$arg_bucket&precision=$arg_precision;
    }}
    location / {{
      proxy_pass http://127.0.0.1:{influx_port};
    }}
  }}
}}
"""


def start_nginx_v2_proxy(workdir: Path, influx_port: int, port: int | None = None) -> Service:
    _need(NGINX, "nginx")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(port=port, influx_port=influx_port, workdir=workdir))
    argv = [NGINX, "-c", str(conf), "-e", str(workdir / "nginx-error.log")]
    proc = _spawn(argv, workdir, "nginx")
    _wait_port(port, proc, workdir, "nginx")
    return Service("nginx", port, workdir, proc, argv)


EJABBERD_ERL = "/usr/bin/erl"
# Debian installs ejabberd's own application outside the Erlang root, in the
# multiarch library directory; its dependencies (erlang-p1-*) are under
# /usr/lib/erlang/lib. ERL_LIBS points the code server at the former.
EJABBERD_LIB_GLOB = "/usr/lib/*/ejabberd-*/ebin/ejabberd.app"
EJABBERD_DOMAIN = "localhost"

EJABBERD_CONF = """\
# Generated by scripts/services.py for tests: a second MQTT 5 broker besides
# Mosquitto, ejabberd's mod_mqtt, and nothing of XMPP listening.
hosts:
  - {domain}
loglevel: info
log_rotate_count: 0
acme:
  auto: false
{auth}
listen:
  -
    port: {port}
    ip: "127.0.0.1"
    module: mod_mqtt
{listen_options}
modules:
  mod_mqtt:
{mqtt_options}
"""

# Our defaults where ejabberd's would surprise a suite written against Mosquitto:
# ejabberd caps every session's expiry at 5 minutes, and on a queue of 5000
# messages for an offline or slow client it disconnects it (0x97 quota exceeded)
# and throws the session away. 4294967 s (49.7 days) is the most it can hold:
# the value ends up as an Erlang receive timeout in milliseconds (< 2^32).
EJABBERD_MQTT_DEFAULTS: dict[str, object] = {
    "session_expiry": 4294967,
    "max_queue": "unlimited",
}


def _yaml_value(value: object) -> str:
    """A YAML scalar or flow collection; plain words stay plain (ejabberd reads them as atoms)."""
    if isinstance(value, str) and value.replace("_", "").isalnum() and not value.isdigit():
        return value
    return json.dumps(value)


def _yaml_block(options: Mapping[str, object], indent: int) -> str:
    pad = " " * indent
    return "\n".join(f"{pad}{k}: {_yaml_value(v)}" for k, v in options.items()) or f"{pad}{{}}"


def _erl_binary(text: str) -> str:
    return "<<" + ",".join(str(b) for b in text.encode()) + ">>"


def ejabberd_lib_dir() -> Path | None:
    """Where Debian's ejabberd application is (the ERL_LIBS entry), or None if it is not installed."""
    apps = sorted(glob.glob(EJABBERD_LIB_GLOB))
    if not Path(EJABBERD_ERL).exists() or not apps:
        return None
    return Path(apps[-1]).parent.parent.parent


def start_ejabberd(
    workdir: Path,
    port: int | None = None,
    *,
    users: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
    listen_options: Mapping[str, object] | None = None,
    extra_conf: str = "",
) -> Service:
    """Start Debian's ejabberd as an MQTT 3.1.1/5 broker (mod_mqtt only) on 127.0.0.1:``port``.

    Everything lives in ``workdir``: ``ejabberd.yml``, the Mnesia spool
    (``spool/``), the logs (``ejabberd.log``, ``error.log``) and the console
    output (``ejabberd.out``). The Erlang VM runs *undistributed*
    (no ``-sname``/``-name``): no node name, no cookie, no epmd, no
    distribution port, so two runs, or the system's ejabberd, cannot collide;
    the one price is that ``ejabberdctl`` cannot attach to it. We run ``erl``
    directly rather than ``ejabberdctl foreground``, which as root would
    ``su`` to the ``ejabberd`` user (who cannot write to ``workdir``);
    ejabberd itself runs as root without complaint. Starting takes 1-2 s:
    we wait for a file that an ``-eval`` after ``-s ejabberd`` writes, as
    ejabberd binds its port some 0.5 s before it accepts on it.
    ``Service.restart()`` waits for the port only (connections made in
    between are served once it accepts); retained messages and ``users``
    survive it (Mnesia on disk), sessions do not. ``stop()`` (SIGTERM) shuts
    the VM down cleanly in about 1 s; nothing keeps running after it (its
    ``erl_child_setup`` helper exits with it, and is reaped by init).

    Authentication, as mod_mqtt does it: an MQTT user name ``u`` (or
    ``u@localhost``) is the account ``u@localhost``, and the client id becomes
    the resource, so a session is (user name, client id), not client id alone:
    a takeover needs both the same. A CONNECT *without a password* is always
    refused (0x87 not authorized; mod_mqtt would only accept a TLS client
    certificate then), and so is one without a user name, so clients must
    send both:

    * ``users=None``: anonymous login; any user name with any non-empty
      password is let in.
    * ``users={"alice": "secret"}``: only these accounts (internal auth in the
      Mnesia spool, registered at start); a wrong password gets 0x87.

    ``extra`` adds to or overrides mod_mqtt's options (``session_expiry``,
    ``max_queue``, ``max_topic_depth``, ``access_publish``, ...; see
    ``EJABBERD_MQTT_DEFAULTS`` for ours), ``listen_options`` the listener's
    (``max_payload_size``, ...). Values are written as YAML: a plain word
    stays a plain scalar, anything else is JSON (a YAML flow value).
    ``extra_conf`` is YAML appended at the top level, for keys the generated
    file does not have (``acl``, ``access_rules``, ...).
    """
    lib_dir = ejabberd_lib_dir()
    if lib_dir is None:
        raise ServiceError("ejabberd not found: install it with `apt-get install ejabberd` (scripts/setup.sh does)")
    raise_fd_limit()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spool").mkdir(exist_ok=True)
    port = port or free_port()
    if users is None:
        auth = "auth_method: [anonymous]\nanonymous_protocol: login_anon\nallow_multiple_connections: true"
    else:
        auth = "auth_method: [internal]\nauth_password_format: plain"
    conf = workdir / "ejabberd.yml"
    conf.write_text(
        EJABBERD_CONF.format(
            domain=EJABBERD_DOMAIN,
            auth=auth,
            port=port,
            listen_options=_yaml_block(listen_options or {}, 4) if listen_options else "",
            mqtt_options=_yaml_block({**EJABBERD_MQTT_DEFAULTS, **(extra or {})}, 4),
        )
        + extra_conf
    )
    # Name lookups from the hosts file only: the default "native" lookup runs
    # inet_gethost helper processes, which outlive the VM for a moment as zombies.
    inetrc = workdir / "inetrc"
    inetrc.write_text('{lookup, [file]}.\n{host, {127,0,0,1}, ["localhost"]}.\n')
    ready = workdir / "ejabberd.ready"
    ready.unlink(missing_ok=True)
    host = _erl_binary(EJABBERD_DOMAIN)
    pairs = ",".join(f"{{{_erl_binary(u.split('@')[0])},{_erl_binary(pw)}}}" for u, pw in (users or {}).items())
    argv = [
        EJABBERD_ERL,
        "-noinput",
        "-env", "ERL_LIBS", str(lib_dir),
        "-env", "EJABBERD_CONFIG_PATH", str(conf),
        "-env", "EJABBERD_LOG_PATH", str(workdir / "ejabberd.log"),
        "-env", "ERL_CRASH_DUMP", str(workdir / "erl_crash.dump"),
        "-env", "ERL_CRASH_DUMP_BYTES", "0",
        "-env", "ERL_INETRC", str(inetrc),
        "-mnesia", "dir", json.dumps(str(workdir / "spool")),
        "-s", "ejabberd",
        # Runs once ejabberd has started: ejabberd binds its port early and
        # accepts only then, so the port alone does not tell us it is up. Bytes
        # lists keep any user name or password printable here.
        "-eval",
        f"[case ejabberd_auth:try_register(U,{host},P) of ok -> ok;"
        f" {{error,exists}} -> ok = ejabberd_auth:set_password(U,{host},P) end || {{U,P}} <- [{pairs}]],"
        f" ok = file:write_file({_erl_binary(str(ready))}, <<>>).",
    ]  # fmt: skip
    proc = _spawn(argv, workdir, "ejabberd")
    _wait_port(port, proc, workdir, "ejabberd")
    deadline = time.monotonic() + 30.0
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            tail = (workdir / "ejabberd.out").read_text(errors="replace")[-2000:]
            raise ServiceError(f"ejabberd did not finish starting (see {workdir}/ejabberd.log):\n{tail}")
        time.sleep(0.02)
    return Service("ejabberd", port, workdir, proc, argv)


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
        _wait_port(self.port, self.proc, self.workdir, self.name)
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
    proc = _spawn_as(argv, workdir, "postgres", run_as)
    try:
        _wait_port(port, proc, workdir, "postgres")
        _wait_postgres_ready(bindir, port, proc)
    except BaseException:  # a Ctrl-C while it starts too: nobody else knows of it yet
        proc.kill()
        proc.wait()
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    url = f"postgresql://{POSTGRES_USER}:{POSTGRES_PASSWORD}@127.0.0.1:{port}/postgres"
    return PostgresService("postgres", port, workdir, proc, argv, url=url, data_dir=data_dir, run_as=run_as)


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


def create_database(influx_port: int, name: str) -> None:
    influxql(influx_port, f'CREATE DATABASE "{name}"', post=True)


def influxql(influx_port: int, q: str, post: bool = False, db: str | None = None) -> bytes:
    params = {"q": q}
    if db:
        params["db"] = db
    query = urllib.parse.urlencode(params)
    url = f"http://127.0.0.1:{influx_port}/query"
    req = urllib.request.Request(url, data=query.encode()) if post else urllib.request.Request(f"{url}?{query}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return bytes(r.read())


def _up(args: argparse.Namespace) -> int:
    """Start the demo stack on fixed ports unless something already listens there."""
    base = Path(args.dir).resolve()
    pids: dict[str, int] = {}
    if port_open(args.mqtt_port):
        print(f"mosquitto: something already listens on {args.mqtt_port}, using it")
    else:
        s = start_mosquitto(base / "mosquitto", args.mqtt_port)
        pids["mosquitto"] = s.pid
        print(f"mosquitto: started on 127.0.0.1:{s.port} (pid {s.pid}, files in {s.workdir})")
    if port_open(args.influx_port):
        print(f"influxd: something already listens on {args.influx_port}, using it")
    else:
        s = start_influxd(base / "influxdb", args.influx_port)
        pids["influxd"] = s.pid
        print(f"influxd: started on 127.0.0.1:{s.port} (pid {s.pid}, files in {s.workdir})")
    (base / "pids").write_text("".join(f"{k} {v}\n" for k, v in pids.items()))
    return 0


def _down(args: argparse.Namespace) -> int:
    """Stop what `up` started (and only that)."""
    pidfile = Path(args.dir).resolve() / "pids"
    if not pidfile.exists():
        print("nothing to stop")
        return 0
    for line in pidfile.read_text().splitlines():
        name, pid = line.split()
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
            print(f"{name}: stopped (pid {pid})")
    pidfile.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.services", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down"], help="start the local broker and database, or stop them")
    p.add_argument("--dir", default=".run", help="where configs, data and logs go (default .run)")
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--influx-port", type=int, default=8086)
    args = p.parse_args(argv)
    try:
        return _up(args) if args.action == "up" else _down(args)
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
