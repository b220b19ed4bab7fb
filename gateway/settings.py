"""One typed, frozen settings tree: every setting, its default and its checks.

``gateway/settings_source.py`` reads it once at start-up from the YAML file
and the environment; a problem becomes one :class:`ConfigError` whose
message names the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.ids import API_KEY_NAME, INSTANCE
from gateway.rules.events import EVENT_TYPES
from gateway.rules.trips import CHECKS, Check
from gateway.rules.webhooks import decode_secret

DEFAULT_INSTANCE = "gw1"


class _Section(BaseModel):
    # No inf or nan: a duration or a rate of `inf` would pass here and break far from its key.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class MqttSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    # A fixed id plus a persistent session lets the broker keep QoS 1
    # messages for us while the gateway is down. Unset, it is
    # fleet-gateway-<instance> (fleet-gateway for the default instance gw1, the
    # id of earlier versions, whose session an upgrade keeps): two instances
    # never take each other's session. 60 characters at most: the command
    # connection's id is <client_id>-cmd, and brokers may refuse over 64.
    client_id: str | None = Field(None, min_length=1, max_length=60, pattern=r"^[^\x00]+$")
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0)
    topic_prefix: str = Field("fleet", pattern=r"^[^#+/]+(/[^#+/]+)*$")
    # With a group name, subscriptions go through `$share/<group>/...`, so
    # several gateways split one fleet's traffic.
    shared_group: str | None = Field(None, pattern=r"^[^#+/]+$")
    keepalive_s: int = Field(30, ge=5, le=3600)
    # How many unacknowledged QoS 1 messages the broker may have in flight to us.
    receive_maximum: int = Field(20000, ge=1, le=65535)
    tls: bool = False
    ca_file: Path | None = None
    # A client certificate (AWS IoT Core, brokers with mutual TLS); either both or neither.
    cert_file: Path | None = None
    key_file: Path | None = None
    # ALPN protocols offered in the TLS handshake, e.g. ["mqtt"] for AWS IoT Core on port 443.
    alpn: tuple[str, ...] = ()
    # The name the broker's certificate is checked against (and sent as SNI), when it is not `host`.
    server_name: str | None = Field(None, min_length=1)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)

    @field_validator("alpn", mode="before")
    @classmethod
    def _alpn_list(cls, v: Any) -> Any:
        # From the environment: GATEWAY__MQTT__ALPN=mqtt or "mqtt,x-amzn-mqtt-ca"
        return tuple(p.strip() for p in v.split(",") if p.strip()) if isinstance(v, str) else v


def _digits_to_int(v: Any) -> Any:
    """Environment values are strings; let "2" meet a Literal[1, 2]."""
    return int(v) if isinstance(v, str) and v.strip().isdigit() else v


class InfluxSettings(_Section):
    url: str = Field("http://127.0.0.1:8086", pattern=r"^https?://")
    api_version: Literal[1, 2] = 1
    database: str = Field("fleet", min_length=1)
    bucket: str = Field("fleet", min_length=1)
    org: str = "fleet"
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    timeout_s: float = Field(10.0, gt=0)
    create_database: bool = True
    # At start, how long to wait for InfluxDB to answer before giving up (exit 2): long enough
    # for a container started beside it, short enough that a wrong URL is reported at once.
    start_timeout_s: float = Field(10.0, ge=0)

    _api_version = field_validator("api_version", mode="before")(_digits_to_int)


class IngestSettings(_Section):
    max_payload_bytes: int = Field(16 * 1024, ge=64)
    max_age_s: float = Field(7 * 24 * 3600, gt=0)
    max_future_s: float = Field(300, ge=0)


class JournalSettings(_Section):
    # A batch is sealed (written to disk, acknowledged to the broker, queued
    # for InfluxDB) when it holds this many points or is this old.
    batch_size: int = Field(5000, ge=1)
    flush_interval_s: float = Field(0.2, gt=0)
    # The on-disk buffer that rides out InfluxDB outages. When it is full the
    # gateway stops acknowledging, so the broker keeps the rest.
    max_bytes: int = Field(1024 * 1024 * 1024, ge=1024 * 1024)
    # Batches kept in memory for the writer; beyond this they are read back from disk.
    memory_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    fsync: bool = True


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(64 * 1024, ge=1024)


class ApiKey(_Section):
    """One API key: ``name`` is the caller in the audit and logs; the secret is never shown."""

    name: str
    secret: SecretStr

    @classmethod
    def parse(cls, entry: str) -> ApiKey:
        """``name:secret``, or a bare secret named by its first 4 characters and a hash."""
        name, sep, secret = entry.partition(":")
        if sep and API_KEY_NAME.matches(name) and secret:
            return cls(name=name, secret=SecretStr(secret))
        digest = hashlib.sha256(entry.encode()).hexdigest()[:8]
        return cls(name=f"{entry[:4]}-{digest}", secret=SecretStr(entry))


class ApiSettings(_Section):
    keys: tuple[ApiKey, ...] = ()
    # Unlock/lock calls allowed per API key per minute.
    rate_limit_per_min: int = Field(600, ge=1)

    @field_validator("keys", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [k.strip() for k in v.split(",") if k.strip()]
        if isinstance(v, list | tuple):
            return tuple(ApiKey.parse(k) if isinstance(k, str) else k for k in v)
        return v

    @field_validator("keys")
    @classmethod
    def _unique(cls, v: tuple[ApiKey, ...]) -> tuple[ApiKey, ...]:
        names = [k.name for k in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two keys share the name {dupes[0]!r}; names must be unique")
        secrets = [k.secret.get_secret_value() for k in v]
        if len(set(secrets)) != len(secrets):
            raise ValueError("one secret is given under two names; each key needs its own secret")
        return v


class CommandsSettings(_Section):
    master_key: SecretStr | None = None
    ack_timeout_s: float = Field(10.0, gt=0, le=300)
    early_grace_s: float = Field(15 * 60, ge=0)
    qos: Literal[0, 1] = 1

    _qos = field_validator("qos", mode="before")(_digits_to_int)


class BookingSettings(_Section):
    # A public booking may be cancelled for a staff one only if it starts more than this from now.
    preempt_notice_s: float = Field(86400, ge=0)


class TripsSettings(_Section):
    # What the car must show before a rental may end (all five by default).
    end_checks: tuple[Check, ...] = CHECKS
    # The latest location and doors readings must be at most this old for `fresh`.
    max_state_age_s: float = Field(120, gt=0)
    # This long after `ends_at`, a trip whose car passes every check and is locked is ended by the gateway.
    auto_end_after_s: float = Field(1800, ge=0)

    @field_validator("end_checks", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return tuple(c.strip() for c in v.split(",") if c.strip()) if isinstance(v, str) else v


class BillingSettings(_Section):
    hourly_rate_eur: float = Field(1.50, ge=0)
    monthly_fee_eur: float = Field(4.00, ge=0)
    increment_min: int = Field(15, ge=1, le=1440)
    timezone: str = "Europe/Paris"
    staff_billed: bool = False

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not a time zone name (e.g. Europe/Paris)") from None
        return v


class AlertsSettings(_Section):
    # Off: no alert rules at all (the benchmark's baseline; a fleet with its own monitoring).
    enabled: bool = True
    silent_after_s: float = Field(900, gt=0)
    battery_horizon_s: float = Field(7200, gt=0)
    min_soc_at_start_pct: float = Field(30, ge=0, le=100)
    return_grace_s: float = Field(900, ge=0)
    unattended_after_s: float = Field(600, ge=0)
    charging_fault_after_s: float = Field(1800, ge=0)
    # A reading older than this when it arrives was buffered by the car: stored, but it opens and
    # resolves no alert (it tells what was, not what is).
    replay_after_s: float = Field(120, gt=0)
    # How often the conditions that need time to pass are looked at; None: a tenth of the shortest threshold,
    # between 1 and 15 s.
    check_every_s: float | None = Field(None, gt=0)


class EventsSettings(_Section):
    retention_days: float = Field(30, gt=0)


class WebhookEndpoint(_Section):
    url: str = Field(pattern=r"^https?://[^\s]+$")
    secret: SecretStr
    types: tuple[str, ...] = ("*",)

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: SecretStr) -> SecretStr:
        decode_secret(v.get_secret_value())  # ValueError says what is wrong
        return v

    @field_validator("types")
    @classmethod
    def _types(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError('give the event types to send, or ["*"] for all')
        for t in v:
            if t != "*" and t not in EVENT_TYPES:
                raise ValueError(f"{t!r} is not an event type ({', '.join(EVENT_TYPES)})")
        return v


class WebhooksSettings(_Section):
    endpoints: tuple[WebhookEndpoint, ...] = ()
    first_retry_s: float = Field(5, gt=0)
    max_age_s: float = Field(86400, gt=0)
    # No answer within this is a failed attempt (and retried).
    timeout_s: float = Field(15, gt=0, le=300)
    # Attempts under way at once to one endpoint: a slow endpoint holds only its own.
    per_endpoint: int = Field(4, ge=1, le=100)

    @field_validator("endpoints", mode="before")
    @classmethod
    def _json(cls, v: Any) -> Any:
        if isinstance(v, str):  # from GATEWAY__WEBHOOKS__ENDPOINTS
            try:
                return json.loads(v) if v.strip() else ()
            except json.JSONDecodeError as e:
                raise ValueError(f"must be a JSON list of {{url, secret, types}} ({e.msg})") from None
        return v

    @field_validator("endpoints")
    @classmethod
    def _unique(cls, v: tuple[WebhookEndpoint, ...]) -> tuple[WebhookEndpoint, ...]:
        urls = [e.url for e in v]
        dupes = sorted({u for u in urls if urls.count(u) > 1})
        if dupes:
            raise ValueError(f"{dupes[0]} is given twice; give each URL once, with every type it wants")
        return v


class HaSettings(_Section):
    # Several gateways on one store (PostgreSQL): the once-only work (start-time unlocks, automatic
    # ends, scheduled alert checks, webhook delivery, pruning) is done by the holder of a lease in the
    # store, and another instance takes it over within this long after the holder dies.
    lease_s: float = Field(10.0, ge=1.0, le=3600.0)
    # How often each instance shares the cars' latest state through the store, and reads the others'. A
    # reading reaches the others within about two periods: the contract promises at most 1 s behind.
    state_sync_s: float = Field(0.4, gt=0, le=60.0)


SQLITE_URL = "sqlite:///"
SQLITE_FILE = "gateway.sqlite3"  # in state.dir, when store.url is unset


class StoreSettings(_Section):
    # Unset: the embedded SQLite file gateway.sqlite3 in state.dir. sqlite:///<path>: that SQLite file
    # instead, a relative path within state.dir (sqlite:///gateway.sqlite3 is the default), sqlite:////abs
    # an absolute one. postgresql://user:password@host:5432/db (any libpq URL): PostgreSQL, which several
    # gateways of one fleet can share.
    url: SecretStr | None = None
    # Connections each gateway keeps to PostgreSQL (one per store call under way).
    pool_size: int = Field(10, ge=1, le=1000)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return v
        url = v.get_secret_value()
        if url.startswith(SQLITE_URL):
            path = url.removeprefix(SQLITE_URL)
            # A file and nothing else: a "?" kept as part of the file's name would surprise whoever wrote it
            # as an option, and an in-memory database would not survive a restart.
            # A relative path stays within state.dir: no ".." out of it.
            if not Path(path).name or ".." in Path(path).parts or path.endswith("/") or "?" in path or "#" in path:
                raise ValueError(
                    "sqlite:/// takes the path of a file, with no options (sqlite:///gateway.sqlite3 in "
                    "state.dir, sqlite:////var/lib/fleet/gateway.sqlite3)"
                )
            if ":memory:" in path or path.startswith("file:"):
                raise ValueError("sqlite:/// takes a file, not an in-memory database: the store outlives the process")
            return v
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///<path> or a postgresql:// URL (unset: the SQLite file in state.dir)")
        try:
            _ = urlsplit(url).port  # parses the host and port: "[::1" or "host:x" fail here
        except ValueError as e:
            raise ValueError(f"not a valid URL ({e})") from None
        return v

    @property
    def shared(self) -> bool:
        """Several gateways may share this store (PostgreSQL): the lease, the state sync and polling matter."""
        return self.postgres_url is not None

    @property
    def postgres_url(self) -> str | None:
        """The PostgreSQL URL, if the store is one: a store several gateways can share."""
        url = self.url.get_secret_value() if self.url is not None else None
        return None if url is None or url.startswith(SQLITE_URL) else url

    def sqlite_file(self, state_dir: Path) -> Path:
        """The SQLite file, when the store is not PostgreSQL: named by the URL (within `state_dir` unless
        absolute), else gateway.sqlite3 in `state_dir`."""
        if self.url is None:
            return state_dir / SQLITE_FILE
        url = self.url.get_secret_value()
        if not url.startswith(SQLITE_URL):
            raise ValueError("store.url names a PostgreSQL database, not a SQLite file")
        return state_dir / url.removeprefix(SQLITE_URL)  # an absolute path replaces state_dir


class StateSettings(_Section):
    dir: Path = Path("state")


class FleetSettings(_Section):
    file: Path = Path("config/fleet.yaml")


class Settings(_Section):
    instance: str = Field(DEFAULT_INSTANCE, pattern=INSTANCE.anchored)
    # Development mode allows empty or example secrets; production refuses them.
    dev_mode: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    mqtt: MqttSettings = MqttSettings()
    influx: InfluxSettings = InfluxSettings()
    ingest: IngestSettings = IngestSettings()
    journal: JournalSettings = JournalSettings()
    http: HttpSettings = HttpSettings()
    api: ApiSettings = ApiSettings()
    commands: CommandsSettings = CommandsSettings()
    state: StateSettings = StateSettings()
    store: StoreSettings = StoreSettings()
    ha: HaSettings = HaSettings()
    trips: TripsSettings = TripsSettings()
    booking: BookingSettings = BookingSettings()
    billing: BillingSettings = BillingSettings()
    alerts: AlertsSettings = AlertsSettings()
    events: EventsSettings = EventsSettings()
    webhooks: WebhooksSettings = WebhooksSettings()

    @model_validator(mode="before")
    @classmethod
    def _client_id_from_instance(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        mqtt = data.get("mqtt")
        if not isinstance(mqtt, dict | MqttSettings | None):
            return data  # not a section: the field's own validation says so
        given = mqtt.client_id if isinstance(mqtt, MqttSettings) else (mqtt or {}).get("client_id")
        if given:
            return data
        instance = data.get("instance", DEFAULT_INSTANCE)
        client_id = "fleet-gateway" if instance == DEFAULT_INSTANCE else f"fleet-gateway-{instance}"
        if len(client_id) > 60:
            raise ValueError(
                f"instance: too long to name the MQTT client after it ({client_id!r} is over 60 characters); "
                "set mqtt.client_id"
            )
        if isinstance(mqtt, MqttSettings):
            return {**data, "mqtt": mqtt.model_copy(update={"client_id": client_id})}
        return {**data, "mqtt": {**(mqtt or {}), "client_id": client_id}}

    @model_validator(mode="after")
    def _mqtt_tls_parts(self) -> Settings:
        m = self.mqtt
        if (m.cert_file is None) != (m.key_file is None):
            raise ValueError("mqtt.cert_file and mqtt.key_file: give both, or neither")
        if not m.tls and (m.cert_file or m.ca_file or m.alpn or m.server_name):
            raise ValueError("mqtt.tls: must be true for ca_file, cert_file, key_file, alpn or server_name to apply")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(m, name)
            if path is not None and not path.is_file():
                raise ValueError(f"mqtt.{name}: {path} is not a readable file")
        if m.reconnect_min_s > m.reconnect_max_s:
            raise ValueError("mqtt.reconnect_min_s: larger than mqtt.reconnect_max_s")
        return self

    @model_validator(mode="after")
    def _webhooks_within_retention(self) -> Settings:
        # An event is pruned with its pending deliveries: it must have been given up on by then.
        if self.webhooks.max_age_s > self.events.retention_days * 86400:
            raise ValueError(
                "webhooks.max_age_s: longer than events.retention_days; events would be pruned before "
                "their deliveries are given up"
            )
        return self

    fleet: FleetSettings = FleetSettings()
