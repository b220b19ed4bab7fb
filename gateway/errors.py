"""The gateway's errors, in one small tree.

    GatewayError
     ├── ConfigError            invalid settings or fleet file; start-up stops (exit 2)
     ├── PayloadError           a car message broke the contract; carries `reason`
     ├── SinkError              InfluxDB did not take a batch
     │    ├── SinkUnavailable   connection refused, timeout, 5xx: retry later
     │    └── SinkRejected      4xx, the data itself is bad: drop and count
     ├── BrokerUnavailable      the MQTT broker is not connected right now
     └── ApiError               an HTTP request cannot be served; carries status and code

Errors from libraries below (paho, aiohttp, sqlite3) are converted at the
boundary where they are caught, with ``raise … from``.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid. The message names the key and the problem."""


class PayloadError(GatewayError):
    """A car message is invalid. ``reason`` is the label counted and stored in `rejected`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SinkError(GatewayError):
    """A write to InfluxDB failed."""


class SinkUnavailable(SinkError):
    """InfluxDB could not be reached or answered 5xx; the batch is kept and retried."""


class SinkRejected(SinkError):
    """InfluxDB refused the batch as invalid; retrying cannot help."""


class BrokerUnavailable(GatewayError):
    """The MQTT connection is down, so a command cannot be sent."""


class ApiError(GatewayError):
    """An HTTP request that is answered with an error body.

    ``code`` is the snake_case code of the contract's error body.
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
