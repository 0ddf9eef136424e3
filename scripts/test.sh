#!/usr/bin/env bash
# The test command (README): set-up, then a local single-node SLURM for the SLURM tests where this machine can
# run one (root + apt: scripts/slurm-local.sh), then pytest. Extra arguments go to pytest.
#   SSLBENCH_SLURM=auto (default): try SLURM, skip its tests if it cannot start; on: it must start (CI); off: never.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mode=${SSLBENCH_SLURM:-auto}
if [ "$mode" != off ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "test: starting a local SLURM (scripts/slurm-local.sh up; log /tmp/sslbench-slurm-up.log)"
  if SLURM_LOCAL_CPUS=${SLURM_LOCAL_CPUS:-8} bash scripts/slurm-local.sh up >/tmp/sslbench-slurm-up.log 2>&1 && sinfo >/dev/null; then
    trap 'bash scripts/slurm-local.sh down >/dev/null 2>&1 || true' EXIT
    export SSLBENCH_REQUIRE_SLURM=1
  elif [ "$mode" = on ]; then
    tail -20 /tmp/sslbench-slurm-up.log >&2; echo "test: SLURM did not start" >&2; exit 1
  else
    echo "test: no local SLURM (see /tmp/sslbench-slurm-up.log): the SLURM tests will skip"
  fi
elif [ "$mode" = on ]; then
  echo "test: SSLBENCH_SLURM=on needs root and apt-get to start a local SLURM" >&2; exit 1
fi
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "test: installing Debian's chromium (the report's browser test; log /tmp/sslbench-chromium.log)"
  apt-get install -y -q chromium >/tmp/sslbench-chromium.log 2>&1 \
    || { apt-get update -q >>/tmp/sslbench-chromium.log 2>&1 && apt-get install -y -q chromium >>/tmp/sslbench-chromium.log 2>&1; } \
    || echo "test: chromium did not install: its test will skip"
fi
echo "test: ruff (benchmark methods protocols tests) and mypy --strict (benchmark)"
.venv/bin/ruff check benchmark methods protocols tests
.venv/bin/python -m mypy benchmark
.venv/bin/python -m pytest -q "$@"
