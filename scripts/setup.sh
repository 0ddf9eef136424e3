#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine (idempotent, safe to rerun):
#   1. Fashion-MNIST from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist);
#   2. a virtual environment in .venv with torch, torchvision and sslbench (plus test tools).
# Override the torch pin with TORCH_SPEC="torch==X torchvision==Y" where those wheels exist.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing dataset-fashion-mnist (Debian package)"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
  # shellcheck disable=SC2086
  .venv/bin/pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
echo "setup: installing sslbench and its dependencies"
.venv/bin/pip install -q -e ".[dev]"
echo "setup: done (python: .venv/bin/python)"
