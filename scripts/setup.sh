#!/usr/bin/env bash
# Installs what the project needs and is missing: Debian's mosquitto,
# influxdb, nginx (nginx only as test scaffolding), ejabberd (its mod_mqtt is
# the tests' second MQTT 5 broker) and openssl (the tests'
# throwaway TLS certificates), and a Python venv in
# .venv with the project and its dev tools. Safe to run again: it only does
# what is not done yet.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in mosquitto:/usr/sbin/mosquitto mosquitto-clients:/usr/bin/mosquitto_pub \
            influxdb:/usr/bin/influxd influxdb-client:/usr/bin/influx nginx:/usr/sbin/nginx \
            ejabberd:/usr/sbin/ejabberdctl openssl:/usr/bin/openssl; do
  pkg=${pair%%:*}; bin=${pair#*:}
  [ -x "$bin" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # policy-rc.d keeps the packages from starting system-wide services: we
  # start our own instances on loopback, with our own configs. Where the
  # machine has none, one that denies every start is in place for the install.
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    own_policy=1
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
  fi
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || { [ -z "$own_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d; exit 1; }
  [ -z "$own_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
  # Should the system's ejabberd have started all the same, stop it: it would
  # hold 5222/5269/5280/1883 and an epmd. (Only if it runs: `ejabberdctl stop`
  # against no node would itself leave an epmd behind.)
  if pgrep -u ejabberd -x beam.smp >/dev/null 2>&1; then
    $SUDO service ejabberd stop >/dev/null 2>&1 || true
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".[dev]"
  rm -f .venv/.installed-*; touch "$stamp"
fi
echo "setup: ready"
