#!/usr/bin/env bash
# Creates (or reuses) the project's Python environment and installs janusflow into it.
# - CPU machine: torch 2.14.1 + torchvision 0.29.1, a pair that imports cleanly with timm/diffusers/
#   transformers and installs from the local wheel cache when present (no multi-GB download).
# - GPU machine: a CUDA torch already visible (system site-packages or an active env) is left alone.
# --no-compile: Python byte-compiles the modules it imports on first use instead of pip compiling every file
# of torch & co. up front (install 110 s + 21 s first import vs 204 s on a 2-core CPU).
# EXTRAS (2nd argument): the setup.cfg extras to add, "dev" by default (tests, lint, demo); "none" installs what
# training and sampling need only (`make pretrain`: 23 fewer packages).
# Installer: uv when it can be had (it unpacks torch's CUDA wheels in parallel: the `none` install into a fresh
# venv, empty uv cache, took 74 s with the import check against 144 s with pip on a 2-core machine), with the
# indexes, find-links, constraints and certificate of the machine's pip configuration; pip when uv cannot be
# installed or JANUSFLOW_INSTALLER=pip.
# Idempotent: a stamp with the hash of setup.cfg and the extras makes the second run a no-op.
set -euo pipefail
VENV=${1:-.venv}
EXTRAS=${2:-dev}
PYTHON=${PYTHON:-python3}
CPU_TORCH="torch==2.14.1 torchvision==0.29.1"

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [ -n "${JANUSFLOW_USE_ACTIVE_ENV:-}" ] && [ -n "${VIRTUAL_ENV:-${CONDA_PREFIX:-}}" ]; then
  PY=$(command -v python)            # install into the user's own active environment
else
  if [ ! -x "$VENV/bin/python" ]; then
    flags=""
    # Let a GPU machine's system CUDA torch be seen from the venv instead of reinstalling it.
    if has_gpu && "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
      flags="--system-site-packages"
    fi
    echo "[setup] creating $VENV ($PYTHON $flags)"
    "$PYTHON" -m venv $flags "$VENV"
  fi
  PY="$VENV/bin/python"
fi

stamp="$($PY -c 'import sys; print(sys.prefix)')/.janusflow-installed"
want=$(cat setup.cfg pyproject.toml | sha1sum | cut -d' ' -f1)
# The stamp's first line is the hash, the second the extras installed; "dev" covers "none".
if [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$want" ] && $PY -c "import janusflow" 2>/dev/null; then
  have=$(sed -n 2p "$stamp")
  if [ "$EXTRAS" = none ] || [ "$have" = "$EXTRAS" ]; then exit 0; fi
fi

# uv reads no pip.conf: hand it what pip would use (pip config list shows the files' and PIP_* settings).
USE_UV=""
UV_ARGS=()
setup_uv() {
  [ "${JANUSFLOW_INSTALLER:-uv}" = uv ] || return 0
  # Only into our own isolated venv: where a user's env or the system site (a GPU machine's CUDA torch) is in
  # play, pip's view of what is installed is the one to trust.
  [ -z "${JANUSFLOW_USE_ACTIVE_ENV:-}" ] && grep -q "include-system-site-packages = false" "$VENV/pyvenv.cfg" \
    2>/dev/null || return 0
  if ! "$PY" -m uv --version >/dev/null 2>&1; then
    "$PY" -m pip install -q uv 2>&1 | grep -v "^WARNING: Location" || true
    "$PY" -m uv --version >/dev/null 2>&1 || { echo "[setup] uv unavailable: installing with pip"; return 0; }
  fi
  USE_UV=1
  local line key val item seen=" "
  while IFS= read -r line; do
    key=${line%%=*}; key=${key#*.}; val=${line#*=}; val=${val#\'}; val=${val%\'}
    for item in $val; do
      case "$seen" in *" $key=$item "*) continue ;; esac
      seen="$seen$key=$item "
      case "$key" in
        index-url) UV_ARGS+=(--index-url "$item") ;;
        extra-index-url) UV_ARGS+=(--extra-index-url "$item") ;;
        find-links) UV_ARGS+=(--find-links "$item") ;;
        constraint) UV_ARGS+=(--constraint "$item") ;;
        cert) export SSL_CERT_FILE="$item" ;;
      esac
    done
  done < <("$PY" -m pip config list 2>/dev/null)
}
install() {
  # unsafe-best-match: the newest version across all indexes, as pip picks (uv's default stops at the first
  # index that has the package, and a local index with one old tomlkit made gradio unresolvable).
  if [ -n "$USE_UV" ]; then
    "$PY" -m uv pip install --quiet --python "$PY" --index-strategy unsafe-best-match "${UV_ARGS[@]}" "$@"
  else
    "$PY" -m pip install -q --no-compile "$@" 2>&1 | grep -v "^WARNING: Location" || true
  fi
}
setup_uv

torch_ok() { $PY -c "import torch, torchvision, torchvision.ops" >/dev/null 2>&1; }
if torch_ok && $PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "[setup] keeping the installed CUDA torch $($PY -c 'import torch; print(torch.__version__)')"
elif torch_ok && [ "$($PY -c 'import torch; print(torch.__version__.split("+")[0])')" = "2.14.1" ]; then
  echo "[setup] torch 2.14.1 already installed"
elif has_gpu; then
  echo "[setup] GPU machine without torch: installing the default CUDA build of torch + torchvision"
  install torch torchvision
else
  echo "[setup] CPU machine: installing $CPU_TORCH"
  install $CPU_TORCH
fi

echo "[setup] installing janusflow and its dependencies"
target="."; [ "$EXTRAS" = none ] || target=".[$EXTRAS]"
install -e "$target"
$PY -c "import janusflow, timm, diffusers, transformers, torchdiffeq" \
  || { echo "[setup] the environment does not import; see the messages above" >&2; exit 1; }
printf '%s\n%s\n' "$want" "$EXTRAS" > "$stamp"
echo "[setup] ready: $PY"
