"""What a broker's reason code means for us, and how long to wait before connecting again.

One table serves both a refused CONNACK and a DISCONNECT from the broker
(MQTT 5 shares the code space). The waits are floors under the link's
exponential back-off: a broker that kicks us for a reason that reconnecting
cannot fix (a client id taken over, a refused account, a broker that moved)
is not asked again every half second, while a broker that restarts is
rejoined as fast as the back-off allows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

INFO, WARNING, ERROR = logging.INFO, logging.WARNING, logging.ERROR


@dataclass(frozen=True, slots=True)
class Advice:
    label: str  # short, for metrics: gateway_mqtt_disconnects_total{reason=...}
    text: str  # for the log: what happened and what to do
    level: int
    floor_s: float  # wait at least this long (capped at mqtt.reconnect_max_s)


# A configuration problem on one side or the other: asking again soon cannot help.
CONFIG_FLOOR_S = 30.0

_TABLE: dict[int, Advice] = {
    0x00: Advice("normal", "the broker closed the connection", WARNING, 0.0),
    0x80: Advice("unspecified", "the broker gave no reason", WARNING, 0.0),
    0x81: Advice("malformed", "the broker found a packet of ours malformed (a bug: please report it)", ERROR, 5.0),
    0x82: Advice("protocol_error", "the broker saw a protocol error of ours (a bug: please report it)", ERROR, 5.0),
    0x83: Advice("implementation_specific", "the broker refused us for a reason of its own", WARNING, 5.0),
    0x84: Advice(
        "unsupported_protocol", "the broker does not speak MQTT 5: enable it on the broker", ERROR, CONFIG_FLOOR_S
    ),
    0x85: Advice("client_id_invalid", "the broker refuses our client id (mqtt.client_id)", ERROR, CONFIG_FLOOR_S),
    0x86: Advice("bad_credentials", "bad user name or password (mqtt.username, mqtt.password)", ERROR, CONFIG_FLOOR_S),
    0x87: Advice(
        "not_authorized",
        "not authorized: check the gateway account's rights in the broker's ACL or policy",
        ERROR,
        CONFIG_FLOOR_S,
    ),
    0x88: Advice("server_unavailable", "the broker is unavailable", WARNING, 2.0),
    0x89: Advice("server_busy", "the broker is busy", WARNING, 5.0),
    0x8A: Advice("banned", "the broker has banned this client", ERROR, CONFIG_FLOOR_S),
    0x8B: Advice("server_shutting_down", "the broker is shutting down", WARNING, 1.0),
    0x8C: Advice("bad_auth_method", "the broker refuses our authentication method", ERROR, CONFIG_FLOOR_S),
    0x8D: Advice(
        "keepalive_timeout",
        "the broker heard nothing from us within the keepalive (a stalled process or network)",
        WARNING,
        0.0,
    ),
    0x8E: Advice(
        "session_taken_over",
        "another client connected with our client id and took our session: give every gateway instance its "
        "own `instance` (or mqtt.client_id); two of them sharing one knock each other off",
        ERROR,
        CONFIG_FLOOR_S,
    ),
    0x8F: Advice("topic_filter_invalid", "the broker refuses our topic filter (mqtt.topic_prefix)", ERROR, 30.0),
    0x90: Advice("topic_name_invalid", "the broker refuses a topic we used (mqtt.topic_prefix)", ERROR, 30.0),
    0x93: Advice(
        "receive_maximum_exceeded", "we exceeded the broker's receive maximum (a bug: please report it)", ERROR, 5.0
    ),
    0x94: Advice("topic_alias_invalid", "the broker refused a topic alias of ours (a bug)", ERROR, 5.0),
    0x95: Advice("packet_too_large", "a packet of ours was larger than the broker's maximum packet size", ERROR, 5.0),
    0x96: Advice("message_rate_too_high", "the broker says we publish too fast", WARNING, 5.0),
    0x97: Advice("quota_exceeded", "a quota of the broker's was exceeded", WARNING, 10.0),
    0x98: Advice("administrative_action", "an administrator of the broker disconnected us", WARNING, 5.0),
    0x99: Advice("payload_format_invalid", "the broker refused a payload of ours as invalid", ERROR, 5.0),
    0x9A: Advice("retain_not_supported", "the broker does not support retained messages", ERROR, CONFIG_FLOOR_S),
    0x9B: Advice("qos_not_supported", "the broker does not support our QoS (commands.qos)", ERROR, CONFIG_FLOOR_S),
    0x9C: Advice("use_another_server", "the broker asks us to use another server", ERROR, CONFIG_FLOOR_S),
    0x9D: Advice("server_moved", "the broker has moved", ERROR, CONFIG_FLOOR_S),
    0x9E: Advice(
        "shared_subscriptions_not_supported",
        "the broker does not support shared subscriptions: unset mqtt.shared_group, or use a broker that does",
        ERROR,
        CONFIG_FLOOR_S,
    ),
    0x9F: Advice("connection_rate_exceeded", "the broker says we connect too often", WARNING, 10.0),
    0xA0: Advice("maximum_connect_time", "the broker's maximum connection time was reached", WARNING, 0.0),
    0xA1: Advice("subscription_ids_not_supported", "the broker does not support subscription identifiers", ERROR, 30.0),
    0xA2: Advice(
        "wildcards_not_supported",
        "the broker does not support wildcard subscriptions, which the gateway needs",
        ERROR,
        CONFIG_FLOOR_S,
    ),
}

LOST = Advice("lost", "the connection was lost without a DISCONNECT (network, or the broker stopped)", WARNING, 0.0)
UNANSWERED = Advice("no_answer", "the broker stopped answering (keepalive)", WARNING, 0.0)


def advice(reason: int | None, server_reference: str = "") -> Advice:
    """How to take the broker's `reason` (None: the connection dropped with no DISCONNECT)."""
    if reason is None:
        return LOST
    found = _TABLE.get(reason) or Advice(f"0x{reason:02x}", f"the broker gave reason 0x{reason:02x}", WARNING, 5.0)
    if server_reference:
        # We do not follow redirections on our own: the operator decides which broker to trust.
        found = Advice(
            found.label, f"{found.text} (it names {server_reference!r}: point mqtt.host there)", found.level,
            found.floor_s,
        )  # fmt: skip
    return found


def wait_s(reason: Advice, backoff_s: float, max_s: float) -> float:
    """The wait before the next attempt: the back-off, but never under the reason's floor (itself capped)."""
    return max(backoff_s, min(reason.floor_s, max_s))
