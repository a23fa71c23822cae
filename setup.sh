#!/usr/bin/env bash
# Set up the project environment: .venv with the pinned dependencies (pip install -e '.[test,codec]'),
# NNCodec (the meta-compression baseline; built from its sdist with --no-deps, see below) and, when running
# as root with apt, Debian's Fashion-MNIST files. Idempotent: a rerun with an unchanged
# pyproject.toml skips pip (stamp file in .venv keyed by the hash of pyproject.toml and the Python version).
#   bash setup.sh            # PYTHON=python3.11 bash setup.sh to choose the interpreter
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
T0=$(date +%s)
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.nern-setup-stamp
FMNIST_DIR=/usr/share/datasets/fashion-mnist
DONE=()
# nncodec 2.1.3 pins numpy<2 but runs with ours (nern/nnc.py); its runtime imports are the `codec` extra.
NNCODEC=nncodec==2.1.3

say() { echo "[setup] $*"; }

check_python() {
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
    echo "[setup] error: $PYTHON is missing or older than 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 2
  }
}

make_venv() {
  if [ -x "$VENV/bin/python" ]; then
    say "venv $VENV exists"
    return
  fi
  check_python
  say "creating venv $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
  DONE+=("created $VENV")
}

stamp_key() {
  # Whatever changes the installed set: the pins (pyproject.toml) and the interpreter.
  { cat pyproject.toml; echo "$NNCODEC"; "$VENV/bin/python" -VV; } | sha256sum | cut -d' ' -f1
}

install_packages() {
  local key
  key=$(stamp_key)
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] \
     && "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("nern")' 2>/dev/null; then
    say "packages up to date (pyproject.toml unchanged since the last install)"
    return
  fi
  # torch/torchvision come from pip's configured index: the machine's local wheel mirror where there is
  # one (/etc/xdg/pip), plain PyPI elsewhere (a CUDA build of several GB on x86_64 Linux).
  say "pip install -e '.[test,codec]' (first time: minutes, torch is large)"
  local t=$(date +%s)
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --progress-bar off -q -e '.[test,codec]'
  DONE+=("pip install -e .[test,codec] ($(( $(date +%s) - t )) s)")
  install_nncodec
  echo "$key" > "$STAMP"
}

install_nncodec() {
  # --no-deps: its numpy<2 pin would downgrade numpy; it compiles a C++ extension (deepCABAC, ~1-2 min).
  local t=$(date +%s)
  say "pip install --no-deps $NNCODEC (builds its C++ entropy coder)"
  if PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --progress-bar off -q --no-deps "$NNCODEC" \
     && "$VENV/bin/python" -c 'from nncodec import nnc' 2>/dev/null; then
    DONE+=("installed $NNCODEC ($(( $(date +%s) - t )) s)")
  else
    say "warning: $NNCODEC did not build or import (needs a C++17 compiler); nern compress --nncodec-qps and its tests are unavailable"
  fi
}

install_fashion_mnist() {
  if [ -s "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    say "Fashion-MNIST present in $FMNIST_DIR"
    return
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "note: Fashion-MNIST not installed (needs root and apt: apt-get install dataset-fashion-mnist); its tests skip"
    return
  fi
  local t=$(date +%s)
  say "apt-get install dataset-fashion-mnist"
  if DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
     && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; then
    DONE+=("installed dataset-fashion-mnist ($(( $(date +%s) - t )) s)")
  else
    say "warning: apt-get install dataset-fashion-mnist failed; Fashion-MNIST tests will skip"
  fi
}

make_venv
install_packages
install_fashion_mnist
if [ ${#DONE[@]} -eq 0 ]; then
  say "nothing to do"
else
  for item in "${DONE[@]}"; do say "did: $item"; done
fi
say "ready after $(( $(date +%s) - T0 )) s; run tests with: .venv/bin/python -m pytest"
