#!/bin/sh
# Entry point of the mosquitto service in docker-compose.yml: install the
# password file written by the broker-credentials service (the gateway's
# account and one per car, see docs/security.md), check that the TLS
# certificate is there, then hand over to the image's own entry point.
# Run with `sh`, so it needs no executable bit.
set -eu

src=/credentials/mosquitto-passwd
if [ ! -s "$src" ]; then
  echo "entrypoint: $src is missing: the broker-credentials service writes it (docker compose up runs it first)" >&2
  exit 1
fi
for f in ca.crt server.crt server.key; do
  if [ ! -s "/mosquitto/certs/$f" ]; then
    echo "entrypoint: /mosquitto/certs/$f is missing: run sh config/mosquitto/make-certs.sh (see config/mosquitto/certs/README.md)" >&2
    exit 1
  fi
done

passwd=/mosquitto/data/passwd
umask 077
cp "$src" "$passwd.new"
chown mosquitto:mosquitto "$passwd.new" 2>/dev/null || true
mv "$passwd.new" "$passwd"

exec /docker-entrypoint.sh "$@"
