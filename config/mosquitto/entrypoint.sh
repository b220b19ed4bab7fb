#!/bin/sh
# Entry point of the mosquitto service in docker-compose.yml: build the password
# file from the environment (.env), then hand over to the image's own entry point.
# Run with `sh`, so it needs no executable bit.
set -eu

: "${MQTT_GATEWAY_PASSWORD:?is not set: copy .env.example to .env and fill it in}"
: "${MQTT_CAR_PASSWORD:?is not set: copy .env.example to .env and fill it in}"

passwd=/mosquitto/data/passwd
umask 077
rm -f "$passwd"
mosquitto_passwd -c -b "$passwd" gateway "$MQTT_GATEWAY_PASSWORD"
mosquitto_passwd -b "$passwd" car "$MQTT_CAR_PASSWORD"
chown mosquitto:mosquitto "$passwd" 2>/dev/null || true

exec /docker-entrypoint.sh "$@"
