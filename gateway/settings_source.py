"""Where the settings come from, later sources winning: the defaults of ``gateway/settings.py``, the YAML
file (``config/gateway.yaml`` by default), then environment variables ``GATEWAY__<SECTION>__<KEY>`` (for
example ``GATEWAY__MQTT__PORT=1884``); and, outside development mode, the refusal of example secrets.
Any problem becomes one :class:`ConfigError` whose message names the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import ValidationError

from gateway.errors import ConfigError
from gateway.settings import Settings

ENV_PREFIX = "GATEWAY__"


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``GATEWAY__MQTT__PORT=1884`` into ``{"mqtt": {"port": "1884"}}``."""
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            raise ConfigError(f"{name}: malformed variable name (use GATEWAY__SECTION__KEY)")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:  # a check across sections names its keys itself
        return msg
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        msg = "unknown setting"
    more = len(err.errors()) - 1
    return f"{key}: {msg}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def load_settings(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read YAML (if any) and environment overrides into a validated :class:`Settings`."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: configuration file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = raw or {}
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None
    check_secrets(settings)
    return settings


EXAMPLE_SECRETS = {"", "change-me", "changeme", "dev-master-key", "dev-api-key", "secret", "password"}


def check_secrets(s: Settings) -> None:
    """Outside development mode, refuse to run with missing or example secrets."""
    if s.dev_mode:
        return
    master = s.commands.master_key.get_secret_value() if s.commands.master_key else ""
    if master in EXAMPLE_SECRETS or len(master) < 16:
        raise ConfigError(
            "commands.master_key: missing, an example value or shorter than 16 characters "
            "(set GATEWAY__COMMANDS__MASTER_KEY, or dev_mode: true for local runs)"
        )
    if (url := s.store.postgres_url) is not None:
        # Not a URL check (libpq's own refusal names it at start): only the example password of .env.example.
        password = urlsplit(url).password
        if password is not None and unquote(password) in EXAMPLE_SECRETS:
            raise ConfigError("store.url: its password is an example value (set POSTGRES_PASSWORD in .env)")
    if not s.api.keys:
        raise ConfigError("api.keys: no API key configured (set GATEWAY__API__KEYS)")
    for k in s.api.keys:
        if k.secret.get_secret_value() in EXAMPLE_SECRETS or len(k.secret.get_secret_value()) < 16:
            raise ConfigError(f"api.keys: key {k.name!r} is an example value or shorter than 16 characters")
