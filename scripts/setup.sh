#!/usr/bin/env bash
# Installs what the project needs and is missing: Debian's mosquitto,
# influxdb, nginx (nginx only as test scaffolding) and openssl (the tests'
# throwaway TLS certificates), and a Python venv in
# .venv with the project and its dev tools. Safe to run again: it only does
# what is not done yet.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in mosquitto:/usr/sbin/mosquitto mosquitto-clients:/usr/bin/mosquitto_pub \
            influxdb:/usr/bin/influxd influxdb-client:/usr/bin/influx nginx:/usr/sbin/nginx \
            openssl:/usr/bin/openssl; do
  pkg=${pair%%:*}; bin=${pair#*:}
  [ -x "$bin" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # policy-rc.d keeps the packages from starting system-wide services: we
  # start our own instances on loopback, with our own configs.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
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
