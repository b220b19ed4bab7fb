"""Start Debian's Mosquitto, InfluxDB 1.6 and nginx on loopback, for demos and tests.

Each service runs from a private directory (config, data, logs) on a port of
our choosing, so a test run never touches the system services or a demo
that is already running. ``python -m scripts.services up`` starts the demo
stack on the default ports; the test suite calls the functions directly.

ejabberd (``scripts/ejabberd.py``) and PostgreSQL (``scripts/postgresql.py``)
build on the same ``Service``.

The nginx proxy is test scaffolding only: Debian's InfluxDB 1.6 has no
``/api/v2/write``, so nginx maps ``/api/v2/write?bucket=B`` onto
``/write?db=B`` to let the v2 sink be exercised against a real server.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

MOSQUITTO = "/usr/sbin/mosquitto"
INFLUXD = "/usr/bin/influxd"
NGINX = "/usr/sbin/nginx"


class ServiceError(RuntimeError):
    """A service binary is missing or did not come up."""


class Main(Protocol):
    def __call__(self, argv: list[str] | None = None) -> int: ...


def service_errors_exit_2(main: Main) -> Main:
    """A command's ``main`` whose services fail to start (one missing, a port taken) ends with one line and
    status 2, not a traceback: the scripts' and the benchmarks' mains."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except ServiceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped


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
        self.proc = _spawn(self.argv, self.workdir, self.name)
        self.wait_ready()

    def wait_ready(self) -> None:
        """Until it serves: its port opens (a service that answers later says so in its own subclass)."""
        _wait_port(self.port, self.proc, self.workdir, self.name)


S = TypeVar("S", bound=Service)


@dataclass
class InfluxService(Service):
    def wait_ready(self) -> None:
        super().wait_ready()
        _wait_influx_ready(self.port, self.proc, self.workdir)


def _started(svc: S) -> S:
    """`svc` once it serves; killed if it never does (or a Ctrl-C comes first: nobody else knows of it yet)."""
    try:
        svc.wait_ready()
    except BaseException:
        svc.proc.kill()
        svc.proc.wait()
        raise
    return svc


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
    return _started(Service("mosquitto", port, workdir, _spawn(argv, workdir, "mosquitto"), argv))


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
    return _started(InfluxService("influxd", port, workdir, _spawn(argv, workdir, "influxd"), argv))


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
    return _started(Service("nginx", port, workdir, _spawn(argv, workdir, "nginx"), argv))


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


@service_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.services", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down"], help="start the local broker and database, or stop them")
    p.add_argument("--dir", default=".run", help="where configs, data and logs go (default .run)")
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--influx-port", type=int, default=8086)
    args = p.parse_args(argv)
    return _up(args) if args.action == "up" else _down(args)


if __name__ == "__main__":
    sys.exit(main())
