"""Run the production broker configuration (``config/mosquitto/``) in a real Mosquitto, for tests.

The configuration is used as written; only the container paths are mapped onto
a temporary directory and the four listeners (the cars' 1883 and 8883, the
gateway's 1884) onto free loopback ports. The password file is written by
``gateway.provision`` (the same code as ``python -m gateway provision
--passwd-file``), or by that command itself (:func:`provision_passwd_file`),
and the TLS certificate by ``config/mosquitto/make-certs.sh``, so both are
tested as shipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.provision import passwd_line, write_passwd_file
from scripts.services import MOSQUITTO, Service, _spawn, _wait_port, free_port
from tests.helpers import REPO

# The production listeners, as mosquitto.conf opens them.
LISTENERS = ("1883", "8883", "1884", "8884")

CONF_DIR = REPO / "config" / "mosquitto"


@dataclass
class SecureBroker:
    service: Service
    port: int  # the cars' plain MQTT (listener 1883 in production)
    tls_port: int  # the cars' MQTT over TLS (listener 8883)
    gateway_port: int  # the gateway's plain MQTT (listener 1884): client ids are not forced to the user name
    gateway_tls_port: int  # the gateway's MQTT over TLS (listener 8884), for a gateway on another host
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


def provision_passwd_file(path: Path, master_key: str, gateway_user: str, gateway_password: str) -> Path:
    """Write the password file with ``python -m gateway provision --all --passwd-file``, as Compose does."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GATEWAY__DEV_MODE": "false",
        "GATEWAY__FLEET__FILE": str(REPO / "config" / "fleet.yaml"),
        "GATEWAY__COMMANDS__MASTER_KEY": master_key,
        "GATEWAY__MQTT__USERNAME": gateway_user,
        "GATEWAY__MQTT__PASSWORD": gateway_password,
    }
    argv = [sys.executable, "-m", "gateway", "--config", str(REPO / "config" / "gateway.yaml"),
            "provision", "--all", "--passwd-file", str(path)]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=REPO, env=env)
    assert r.returncode == 0, f"python -m gateway provision failed:\n{r.stderr}"
    return path


def start_secure_broker(
    workdir: Path, accounts: Mapping[str, str] | None = None, *, passwd_file: Path | None = None
) -> SecureBroker:
    """Mosquitto with config/mosquitto/mosquitto.conf and acl.

    The accounts are either `accounts` (user name to password) or an existing
    `passwd_file` (e.g. from :func:`provision_passwd_file`), copied as is.
    """
    if not Path(MOSQUITTO).exists():
        pytest.skip("Debian's mosquitto is not installed (scripts/setup.sh installs it)")
    if (accounts is None) == (passwd_file is None):
        raise ValueError("give the accounts or a password file")
    workdir.mkdir(parents=True, exist_ok=True)
    certs = make_certs(workdir / "certs")
    passwd = workdir / "passwd"
    if passwd_file is not None:
        shutil.copyfile(passwd_file, passwd)
    else:
        assert accounts is not None
        write_passwd_file(passwd, [passwd_line(u, p) for u, p in accounts.items()])
    ports = {listener: free_port() for listener in LISTENERS}
    conf = (CONF_DIR / "mosquitto.conf").read_text()
    listeners = re.findall(r"^listener\s+(\S+)\s*$", conf, re.MULTILINE)
    assert sorted(listeners) == sorted(LISTENERS), f"mosquitto.conf listens on {listeners}, the test maps {LISTENERS}"
    for listener, free in ports.items():
        conf = re.sub(rf"^listener {listener}$", f"listener {free} 127.0.0.1", conf, flags=re.MULTILINE)
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
    port, tls_port, gateway_port, gateway_tls_port = (ports[listener] for listener in LISTENERS)
    service = Service("mosquitto", port, workdir, _spawn(argv, workdir, "mosquitto"), argv)
    try:
        for p in ports.values():
            _wait_port(p, service.proc, workdir, "mosquitto")
    except BaseException:
        service.stop()
        raise
    return SecureBroker(service, port, tls_port, gateway_port, gateway_tls_port, certs)
