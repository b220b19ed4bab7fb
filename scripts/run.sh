#!/usr/bin/env bash
# The main job: sets up what is missing, then runs Mosquitto, InfluxDB, the
# gateway and the simulated fleet with a live summary until Ctrl-C.
# Options go to scripts/demo.py (see scripts/run.sh --help); --instances 2 runs
# two gateways sharing the fleet through PostgreSQL and an MQTT shared group.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m scripts.demo "$@"
