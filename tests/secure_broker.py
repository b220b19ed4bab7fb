"""Run the production broker configuration (``config/mosquitto/``) in a real Mosquitto, for tests.

The configuration is used as written; only the container paths are mapped onto
a temporary directory and the two listeners onto free loopback ports. The
password file is written by ``gateway.provision`` (the same code as
``python -m gateway provision --passwd-file``) and the TLS certificate by
``config/mosquitto/make-certs.sh``, so both are tested as shipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.provision import passwd_line, write_passwd_file
from scripts.services import MOSQUITTO, Service, _spawn, _wait_port, free_port
from tests.helpers import REPO

CONF_DIR = REPO / "config" / "mosquitto"


@dataclass
class SecureBroker:
    service: Service
    port: int  # plain MQTT (listener 1883 in production)
    tls_port: int  # MQTT over TLS (listener 8883)
    certs: Path  # ca.crt, server.crt, server.key

    def stop(self) -> None:
        self.service.stop()


def make_certs(directory: Path) -> Path:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed (scripts/setup.sh installs it)")
    subprocess.run(
        ["sh", str(CONF_DIR / "make-certs.sh"), str(directory), "localhost", "127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return directory


def start_secure_broker(workdir: Path, accounts: Mapping[str, str]) -> SecureBroker:
    """Mosquitto with config/mosquitto/mosquitto.conf and acl; `accounts` maps user name to password."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("Debian's mosquitto is not installed (scripts/setup.sh installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    certs = make_certs(workdir / "certs")
    passwd = workdir / "passwd"
    write_passwd_file(passwd, [passwd_line(u, p) for u, p in accounts.items()])
    port, tls_port = free_port(), free_port()
    conf = (CONF_DIR / "mosquitto.conf").read_text()
    conf = conf.replace("listener 1883", f"listener {port} 127.0.0.1")
    conf = conf.replace("listener 8883", f"listener {tls_port} 127.0.0.1")
    conf = conf.replace("/mosquitto/data/passwd", str(passwd))
    conf = conf.replace("/mosquitto/config/acl", str(CONF_DIR / "acl"))
    conf = conf.replace("/mosquitto/certs/", f"{certs}/")
    conf = conf.replace("/mosquitto/data/", f"{workdir}/")
    unmapped = [ln for ln in conf.splitlines() if re.search(r"\s/mosquitto/", ln) and not ln.startswith("#")]
    assert not unmapped, f"container paths the test did not map: {unmapped}"
    if os.geteuid() == 0:  # mosquitto would drop to its own user, who cannot enter pytest's private tmp dir
        conf += "user root\n"
    (workdir / "mosquitto.conf").write_text(conf)
    argv = [MOSQUITTO, "-c", str(workdir / "mosquitto.conf")]
    service = Service("mosquitto", port, workdir, _spawn(argv, workdir, "mosquitto"), argv)
    try:
        _wait_port(port, service.proc, workdir, "mosquitto")
        _wait_port(tls_port, service.proc, workdir, "mosquitto")
    except BaseException:
        service.stop()
        raise
    return SecureBroker(service, port, tls_port, certs)
