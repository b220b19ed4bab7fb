"""Unit tests for gateway.settings: YAML + GATEWAY__SECTION__KEY overrides, one ConfigError naming the key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import MqttSettings, Settings
from gateway.settings_source import env_overrides, load_settings

REPO = Path(__file__).resolve().parent.parent
GATEWAY_YAML = REPO / "config" / "gateway.yaml"
GOOD_MASTER = "m" * 32
GOOD_KEY = "k" * 24
PROD = {"GATEWAY__COMMANDS__MASTER_KEY": GOOD_MASTER, "GATEWAY__API__KEYS": GOOD_KEY}
DEV = {"GATEWAY__DEV_MODE": "true"}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def config_error(path: Path | None, environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as ei:
        load_settings(path, environ)
    return str(ei.value)


def test_shipped_config_loads_in_dev_mode() -> None:
    s = load_settings(GATEWAY_YAML, {})
    assert s.dev_mode is True
    assert s.mqtt.host == "127.0.0.1" and s.mqtt.port == 1883 and s.mqtt.topic_prefix == "fleet"
    assert s.influx.api_version == 1 and s.influx.database == "fleet"
    assert s.ingest.max_payload_bytes == 16384
    assert s.commands.ack_timeout_s == 10 and s.commands.early_grace_s == 900
    assert s.commands.master_key is not None
    assert s.commands.master_key.get_secret_value() == "dev-master-key"
    assert [k.secret.get_secret_value() for k in s.api.keys] == ["dev-api-key"]
    assert s.fleet.file == Path("config/fleet.yaml")


def test_defaults_without_file() -> None:
    s = load_settings(None, DEV)
    assert s == Settings(dev_mode=True)
    assert s.instance == "gw1" and s.http.port == 8080 and s.journal.batch_size == 5000
    assert s.state.dir == Path("state")
    assert s.api.keys == () and s.commands.master_key is None


def test_defaults_are_the_contracts() -> None:
    # Each default the contract names in parentheses: an operator who sets nothing gets what it promises.
    s = Settings()
    assert (s.trips.max_state_age_s, s.trips.auto_end_after_s, s.booking.preempt_notice_s) == (120, 1800, 86400)
    assert s.events.retention_days == 30
    a = s.alerts
    assert (a.silent_after_s, a.battery_horizon_s, a.min_soc_at_start_pct, a.return_grace_s) == (900, 7200, 30, 900)
    assert (a.unattended_after_s, a.charging_fault_after_s) == (600, 1800)
    assert (s.webhooks.first_retry_s, s.webhooks.max_age_s) == (5, 86400)
    assert s.ha.lease_s == 10


def test_defaults_are_production_mode() -> None:
    assert Settings().dev_mode is False


def test_settings_are_frozen() -> None:
    s = load_settings(None, DEV)
    with pytest.raises(Exception, match="frozen"):
        s.mqtt.port = 1  # type: ignore[misc]


def test_env_overrides_tree() -> None:
    env = {"GATEWAY__MQTT__PORT": "1884", "GATEWAY__DEV_MODE": "1", "PATH": "/bin", "GATEWAYX__A": "b"}
    assert env_overrides(env) == {"mqtt": {"port": "1884"}, "dev_mode": "1"}


@pytest.mark.parametrize("name", ["GATEWAY__", "GATEWAY__MQTT__", "GATEWAY____PORT", "GATEWAY__MQTT____PORT"])
def test_env_malformed_name_is_named(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        env_overrides({name: "x"})


def test_env_override_types() -> None:
    s = load_settings(
        GATEWAY_YAML,
        {
            "GATEWAY__MQTT__PORT": "1884",
            "GATEWAY__MQTT__HOST": "broker.example",
            "GATEWAY__MQTT__TLS": "true",
            "GATEWAY__INFLUX__URL": "http://influx:8086",
            "GATEWAY__INFLUX__TIMEOUT_S": "2.5",
            "GATEWAY__INFLUX__TOKEN": "tok",
            "GATEWAY__HTTP__PORT": "9000",
            "GATEWAY__STATE__DIR": "/var/lib/gw",
            "GATEWAY__INSTANCE": "gw2",
        },
    )
    assert s.mqtt.port == 1884 and type(s.mqtt.port) is int
    assert s.mqtt.host == "broker.example"
    assert s.mqtt.tls is True
    assert s.influx.url == "http://influx:8086"
    assert s.influx.timeout_s == 2.5
    assert s.influx.token is not None and s.influx.token.get_secret_value() == "tok"
    assert s.http.port == 9000
    assert s.state.dir == Path("/var/lib/gw")
    assert s.instance == "gw2"
    # the rest of the file is kept
    assert s.mqtt.client_id == "fleet-gateway-gw2"  # derived from the instance
    assert s.influx.database == "fleet"


def test_env_wins_over_yaml(tmp_path: Path) -> None:
    p = write(tmp_path, "dev_mode: true\nmqtt: {host: from-yaml, port: 1999}\n")
    s = load_settings(p, {"GATEWAY__MQTT__HOST": "from-env"})
    assert s.mqtt.host == "from-env"
    assert s.mqtt.port == 1999


def test_env_override_is_case_insensitive_on_names() -> None:
    s = load_settings(None, {"GATEWAY__DEV_MODE": "true", "gateway__mqtt__port": "1"} | {"GATEWAY__Mqtt__Port": "1885"})
    assert s.mqtt.port == 1885


def test_api_keys_comma_split() -> None:
    s = load_settings(None, {**DEV, "GATEWAY__API__KEYS": " key-one-aaaaaaaaaaaa, key-two-bbbbbbbbbbbb ,,"})
    assert [k.secret.get_secret_value() for k in s.api.keys] == ["key-one-aaaaaaaaaaaa", "key-two-bbbbbbbbbbbb"]


def test_api_keys_from_yaml_list_or_string(tmp_path: Path) -> None:
    p = write(tmp_path, "dev_mode: true\napi: {keys: [a, b]}\n")
    assert [k.secret.get_secret_value() for k in load_settings(p, {}).api.keys] == ["a", "b"]
    p = write(tmp_path, "dev_mode: true\napi: {keys: 'a,b'}\n")
    assert [k.secret.get_secret_value() for k in load_settings(p, {}).api.keys] == ["a", "b"]


def test_secrets_do_not_leak_in_repr() -> None:
    s = load_settings(None, {**DEV, "GATEWAY__COMMANDS__MASTER_KEY": "super-secret-value-123"})
    assert "super-secret-value-123" not in repr(s)
    assert "super-secret-value-123" not in str(s.model_dump())


def test_env_influx_api_version_2() -> None:
    s = load_settings(GATEWAY_YAML, {"GATEWAY__INFLUX__API_VERSION": "2"})
    assert s.influx.api_version == 2


def test_env_commands_qos_0() -> None:
    s = load_settings(GATEWAY_YAML, {"GATEWAY__COMMANDS__QOS": "0"})
    assert s.commands.qos == 0


def test_yaml_influx_api_version_2(tmp_path: Path) -> None:
    p = write(tmp_path, "dev_mode: true\ninflux: {api_version: 2}\n")
    assert load_settings(p, {}).influx.api_version == 2


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"GATEWAY__MQTT__PROT": "1"}, "mqtt.prot"),
        ({"GATEWAY__NOPE__X": "1"}, "nope"),
        ({"GATEWAY__MQTT__PORT__X": "1"}, "mqtt.port"),
    ],
)
def test_unknown_key_is_named(env: dict[str, str], key: str) -> None:
    msg = config_error(None, {**DEV, **env})
    assert msg.startswith(key)


def test_unknown_key_message_says_unknown() -> None:
    assert config_error(None, {**DEV, "GATEWAY__MQTT__PROT": "1"}) == "mqtt.prot: unknown setting"


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    p = write(tmp_path, "dev_mode: true\ninflux:\n  urll: http://x\n")
    assert config_error(p, {}).startswith("influx.urll: unknown setting")


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"GATEWAY__MQTT__PORT": "abc"}, "mqtt.port"),
        ({"GATEWAY__MQTT__PORT": "0"}, "mqtt.port"),
        ({"GATEWAY__MQTT__PORT": "70000"}, "mqtt.port"),
        ({"GATEWAY__MQTT__TOPIC_PREFIX": "fleet/#"}, "mqtt.topic_prefix"),
        ({"GATEWAY__INFLUX__URL": "influx:8086"}, "influx.url"),
        ({"GATEWAY__INFLUX__API_VERSION": "3"}, "influx.api_version"),
        ({"GATEWAY__COMMANDS__ACK_TIMEOUT_S": "0"}, "commands.ack_timeout_s"),
        ({"GATEWAY__JOURNAL__MAX_BYTES": "1"}, "journal.max_bytes"),
        ({"GATEWAY__LOG_LEVEL": "LOUD"}, "log_level"),
        ({"GATEWAY__INSTANCE": "gw 1"}, "instance"),
        ({"GATEWAY__DEV_MODE": "perhaps"}, "dev_mode"),
        ({"GATEWAY__MQTT": "x"}, "mqtt"),
    ],
)
def test_bad_value_names_the_key(env: dict[str, str], key: str) -> None:
    msg = config_error(None, {**DEV, **env})
    assert msg.startswith(f"{key}: "), msg


def test_several_problems_are_summed_up() -> None:
    msg = config_error(None, {**DEV, "GATEWAY__MQTT__PORT": "x", "GATEWAY__HTTP__PORT": "y"})
    assert "(and 1 more problem)" in msg


def test_invalid_yaml(tmp_path: Path) -> None:
    p = write(tmp_path, "mqtt: {host: [unclosed\n")
    msg = config_error(p, DEV)
    assert str(p) in msg and "not valid YAML" in msg


def test_yaml_top_level_not_a_mapping(tmp_path: Path) -> None:
    p = write(tmp_path, "- a\n- b\n")
    assert "top level must be a mapping" in config_error(p, DEV)


def test_empty_yaml_means_defaults(tmp_path: Path) -> None:
    p = write(tmp_path, "# nothing\n")
    assert load_settings(p, DEV) == Settings(dev_mode=True)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "absent.yaml"
    msg = config_error(p, DEV)
    assert str(p) in msg and "not found" in msg


# --- production mode refuses example secrets --------------------------------------------------------


def test_production_with_real_secrets_loads() -> None:
    s = load_settings(None, PROD)
    assert s.dev_mode is False
    assert s.commands.master_key is not None and s.commands.master_key.get_secret_value() == GOOD_MASTER


def test_production_with_shipped_file_and_real_secrets() -> None:
    s = load_settings(GATEWAY_YAML, {**PROD, "GATEWAY__DEV_MODE": "false"})
    assert s.dev_mode is False


def test_shipped_file_in_production_refuses_example_secrets() -> None:
    assert config_error(GATEWAY_YAML, {"GATEWAY__DEV_MODE": "false"}).startswith("commands.master_key:")


@pytest.mark.parametrize("master", [None, "", "short-key", "x" * 15, "dev-master-key", "change-me"])
def test_production_refuses_bad_master_key(master: str | None) -> None:
    env = {"GATEWAY__API__KEYS": GOOD_KEY}
    if master is not None:
        env["GATEWAY__COMMANDS__MASTER_KEY"] = master
    assert config_error(None, env).startswith("commands.master_key:")


def test_production_refuses_the_example_postgresql_password() -> None:
    url = "postgresql://gateway:change-me@postgres:5432/fleet"
    msg = config_error(None, {**PROD, "GATEWAY__STORE__URL": url})
    assert msg.startswith("store.url:") and "change-me" not in msg
    real = load_settings(None, {**PROD, "GATEWAY__STORE__URL": url.replace("change-me", "Xk3_9vQ2pLm7")})
    assert real.store.url is not None


def test_a_store_url_that_does_not_parse_is_one_line_naming_it() -> None:
    msg = config_error(None, {**PROD, "GATEWAY__STORE__URL": "postgresql://u:p@[::1/fleet"})
    assert msg.startswith("store.url:") and "not a valid URL" in msg, msg


@pytest.mark.parametrize(
    ("url", "file"),
    [
        (None, Path("state/gateway.sqlite3")),
        ("sqlite:///gateway.sqlite3", Path("state/gateway.sqlite3")),  # relative: within state.dir
        ("sqlite:///db/fleet.db", Path("state/db/fleet.db")),
        ("sqlite:////var/lib/fleet/gateway.sqlite3", Path("/var/lib/fleet/gateway.sqlite3")),
    ],
)
def test_store_url_names_the_sqlite_file_or_defaults_to_state_dir(url: str | None, file: Path) -> None:
    env = {**DEV, "GATEWAY__STORE__URL": url} if url else DEV
    s = load_settings(None, env)
    assert s.store.postgres_url is None and s.store.sqlite_file(s.state.dir) == file


def test_store_url_postgresql_is_the_shared_store() -> None:
    url = "postgresql://gateway:pw@db.example:5432/fleet?sslmode=require"
    s = load_settings(None, {**DEV, "GATEWAY__STORE__URL": url})
    assert s.store.postgres_url == url
    with pytest.raises(ValueError, match="not a SQLite file"):
        s.store.sqlite_file(s.state.dir)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///",
        "sqlite:////",
        "sqlite:///.",
        "sqlite:///db/",
        "sqlite:///../elsewhere.db",
        "sqlite:///db/..",
        "sqlite:///x.db#a",
        "sqlite:///file:fleet.db",
        "sqlite:///:memory:",
        "sqlite:///file::memory:?cache=shared",
        "sqlite:///x.db?timeout=5",
        "sqlite://relative.db",
        "mysql://h/db",
        "fleet.db",
    ],
)
def test_a_store_url_of_no_known_kind_is_one_line_naming_it(url: str) -> None:
    msg = config_error(None, {**DEV, "GATEWAY__STORE__URL": url})
    assert msg.startswith("store.url:") and "\n" not in msg and "sqlite:///" in msg, msg


def test_production_accepts_16_char_master_key() -> None:
    s = load_settings(None, {**PROD, "GATEWAY__COMMANDS__MASTER_KEY": "x" * 16})  # raises if refused
    assert s.commands.master_key is not None and s.commands.master_key.get_secret_value() == "x" * 16


@pytest.mark.parametrize("keys", [None, "", " , ", "dev-api-key", "tiny-key", f"{GOOD_KEY},dev-api-key"])
def test_production_refuses_bad_api_keys(keys: str | None) -> None:
    env = {"GATEWAY__COMMANDS__MASTER_KEY": GOOD_MASTER}
    if keys is not None:
        env["GATEWAY__API__KEYS"] = keys
    msg = config_error(None, env)
    assert msg.startswith("api.keys:")
    if keys and keys.strip(" ,"):
        assert keys.split(",")[-1].strip() not in msg  # never echo a secret


def test_production_refusal_does_not_echo_the_secret() -> None:
    msg = config_error(None, {"GATEWAY__COMMANDS__MASTER_KEY": "tiny-secret", "GATEWAY__API__KEYS": GOOD_KEY})
    assert "tiny-secret" not in msg


def test_dev_mode_accepts_missing_secrets() -> None:
    s = load_settings(None, DEV)
    assert s.commands.master_key is None and s.api.keys == ()


@pytest.mark.parametrize(
    ("entry", "name", "secret"),
    [
        ("front-desk:s3cret-value-0123456789", "front-desk", "s3cret-value-0123456789"),
        ("ops.night_2:abc:def", "ops.night_2", "abc:def"),  # only the first colon names
        ("plain-secret-0123456789", "plai-" + hashlib.sha256(b"plain-secret-0123456789").hexdigest()[:8], None),
        ("-bad name:xyz", "-bad-" + hashlib.sha256(b"-bad name:xyz").hexdigest()[:8], None),  # not a name: bare
        ("name:", "name-" + hashlib.sha256(b"name:").hexdigest()[:8], None),  # nothing after the colon: bare
    ],
)
def test_an_api_key_entry_is_named_or_bare(entry: str, name: str, secret: str | None) -> None:
    from gateway.settings import ApiKey

    k = ApiKey.parse(entry)
    assert k.name == name
    assert k.secret.get_secret_value() == (secret if secret is not None else entry)
    assert entry not in repr(k) and (secret or entry) not in str(k)


def test_two_keys_with_one_name_are_refused() -> None:
    with pytest.raises(ConfigError, match="share the name 'ops'"):
        load_settings(
            None, {"GATEWAY__DEV_MODE": "true", "GATEWAY__API__KEYS": "ops:aaaaaaaaaaaaaaaa,ops:bbbbbbbbbbbbbbbb"}
        )


def test_each_instance_gets_its_own_client_ids_unless_one_is_given() -> None:
    a = Settings.model_validate({})  # the default instance keeps the id of earlier versions, and their session
    b = Settings.model_validate({"instance": "gw2", "mqtt": {"port": 1884}})
    assert (a.mqtt.client_id, b.mqtt.client_id) == ("fleet-gateway", "fleet-gateway-gw2")
    assert b.mqtt.port == 1884  # the rest of the section is kept
    c = Settings(instance="gw3", mqtt=MqttSettings(port=1884))  # built in code, not from a mapping
    assert c.mqtt.client_id == "fleet-gateway-gw3" and c.mqtt.port == 1884
    fixed = Settings.model_validate({"instance": "gw2", "mqtt": {"client_id": "mine"}})
    assert fixed.mqtt.client_id == "mine"
    with pytest.raises(ConfigError, match=r"^instance: too long to name the MQTT client"):
        load_settings(None, environ={"GATEWAY__DEV_MODE": "true", "GATEWAY__INSTANCE": "g" * 50})
