#!/usr/bin/env bash
# Sets up what is missing, then runs the linters, the type checker and the
# whole test suite (unit and integration: the suite starts its own
# Mosquitto, InfluxDB and nginx on free loopback ports).
# Extra arguments go to pytest, e.g. scripts/test.sh -k ingest
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
echo "== ruff"; ruff check . && ruff format --check .
echo "== import layering"; lint-imports --no-cache | tail -n 8
echo "== mypy"; mypy
echo "== pytest"; pytest -q -p no:cacheprovider "$@"
