#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv) with everything fedfusion needs.
# Picks the CPU build of PyTorch on a machine without an NVIDIA GPU (the CUDA build is several GB).
# Re-running is cheap: it skips the install when pyproject.toml has not changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${FEDFUSION_VENV:-.venv}
EXTRAS=${1:-}            # e.g. "dev" for the test tools
TORCH_VERSION=${FEDFUSION_TORCH:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

stamp="$VENV/.fedfusion-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) extras=$EXTRAS torch=$TORCH_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] NVIDIA GPU found: installing the CUDA build of torch==$TORCH_VERSION"
    "${PIP[@]}" "torch==$TORCH_VERSION"
  else
    # No GPU: ask PyTorch's CPU index when it answers; otherwise a local wheel (pip's find-links) or PyPI.
    cpu_index=https://download.pytorch.org/whl/cpu
    if "$VENV/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('$cpu_index/torch/', timeout=5)" 2>/dev/null; then
      echo "[install] no GPU: installing the CPU build of torch==$TORCH_VERSION from $cpu_index"
      "${PIP[@]}" "torch==$TORCH_VERSION" --extra-index-url "$cpu_index"
    else
      echo "[install] no GPU and $cpu_index unreachable: installing torch==$TORCH_VERSION from the configured indexes"
      "${PIP[@]}" "torch==$TORCH_VERSION"
    fi
  fi
fi

target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
echo "[install] installing fedfusion ($target) into $VENV"
"${PIP[@]}" -e "$target" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "$want" > "$stamp"
