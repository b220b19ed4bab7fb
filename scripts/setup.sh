#!/usr/bin/env bash
# Installs what the project needs and is missing: Debian's mosquitto,
# influxdb, nginx (nginx only as test scaffolding), ejabberd (its mod_mqtt is
# the tests' second MQTT 5 broker), postgresql (the store.url backend; the
# tests run a private cluster of their own) and openssl (the tests'
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
# The server's binaries are under its major version: /usr/lib/postgresql/15/bin on Debian 12.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # The system's PostgreSQL clusters before the install: the one it makes is told apart below.
  clusters_before=$(pg_lsclusters -h 2>/dev/null | awk '{print $1 "/" $2}' || true)
  # policy-rc.d keeps the packages from starting system-wide services: we
  # start our own instances on loopback, with our own configs. Where the
  # machine has none, one that denies every start is in place for the install.
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    own_policy=1
    # Removed however the script ends (an interrupted install too): left behind, it would deny every
    # service start on this machine for good, security upgrades' restarts included.
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
  fi
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ -n "$own_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  # policy-rc.d stops services from starting now, not at the next boot: the system's ejabberd would then
  # take 1883 and 5222 beside our own brokers. (Where systemd runs; containers have none.)
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --quiet ejabberd.service epmd.socket 2>/dev/null || true
  fi
  # Should the system's ejabberd have started all the same, stop it: it would
  # hold 5222/5269/5280/1883 and an epmd. (Only if it runs: `ejabberdctl stop`
  # against no node would itself leave an epmd behind.)
  if pgrep -u ejabberd -x beam.smp >/dev/null 2>&1; then
    $SUDO service ejabberd stop >/dev/null 2>&1 || true
  fi
  # postgresql-NN's postinst creates the system's cluster "main" on 5432 (its start is what
  # policy-rc.d denies). Nothing here uses it: drop the one this install made, stopping it
  # should it run all the same. Clusters that were there before are left as they are.
  { pg_lsclusters -h 2>/dev/null || true; } | while read -r ver name _; do
    if ! grep -qxF "$ver/$name" <<<"$clusters_before"; then
      $SUDO pg_dropcluster --stop "$ver" "$name"
    fi
  done
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
