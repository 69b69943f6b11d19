#!/usr/bin/env bash
# Create a virtual environment with the exact versions in requirements-lock.txt and install fuselabel into it.
# The lock's torch is the PyPI build: CUDA on Linux, CPU on macOS and Windows. On Linux without a GPU this script
# installs a CPU build of torch + torchvision instead (the CUDA libraries are about 6 GB the machine cannot use),
# if it finds a pair that imports with timm; otherwise it installs the locked build and says why.
#   VENV=DIR                    where (default .venv); it is created if missing and updated if present
#   PYTHON=python3.11           the interpreter to create it with (default python3)
#   FUSELABEL_TORCH_INDEX=URL   where to look for CPU wheels besides the ones pip already finds (its find-links);
#                               default PyTorch's CPU index, https://download.pytorch.org/whl/cpu; empty: don't look
#   FUSELABEL_TORCH_BUILD=cuda  the locked CUDA build even without a GPU (say, on a cluster's login node);
#                               =cpu: a CPU build even with a GPU; default auto
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
INDEX=${FUSELABEL_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
BUILD=${FUSELABEL_TORCH_BUILD:-auto}

[ -e "$VENV/bin/python" ] || [ -e "$VENV/Scripts/python.exe" ] || "$PY" -m venv "$VENV"
vpy=$VENV/bin/python
[ -e "$vpy" ] || vpy=$VENV/Scripts/python.exe
pip() { "$vpy" -m pip --disable-pip-version-check "$@"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

locked() { sed -n "s/^$1==\([^ ;]*\).*/\1/p" requirements-lock.txt; }
# Everything but torch, torchvision and the CUDA libraries of the locked torch build.
grep -vE '^(torch|torchvision|triton|nvidia-[^=]*|cuda-[^=]*)==' requirements-lock.txt >"$tmp/rest.txt"
installed_torch() { "$vpy" -c 'import torch, torchvision; print(torch.__version__)' 2>/dev/null || true; }
has_gpu() { { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; } || [ -e /proc/driver/nvidia/version ]; }

want_cpu=no
case $BUILD in
  auto) [ "$(uname -s)" = Linux ] && ! has_gpu && want_cpu=yes ;;
  cpu) [ "$(uname -s)" = Linux ] && want_cpu=yes ;;   # elsewhere the locked build is the CPU build
  cuda) ;;
  *) echo "FUSELABEL_TORCH_BUILD must be auto, cpu or cuda, not '$BUILD'" >&2; exit 2 ;;
esac

# Installs a CPU torch and its torchvision without dependencies, best source first; echoes what it installed.
install_cpu_pair() {
  local t v
  t=$(locked torch) v=$(locked torchvision)
  # The locked versions from the CPU index; an unreachable index must fail in seconds, not after pip's retries.
  # -vv: pip names a connection error only at that level.
  if [ -n "$INDEX" ] && pip install -vv --no-deps --index-url "$INDEX" --timeout 5 --retries 0 \
      "torch==$t+cpu" "torchvision==$v+cpu" >"$tmp/index.log" 2>&1; then
    echo "torch $t+cpu, torchvision $v+cpu from $INDEX"; return
  fi
  [ -n "$INDEX" ] && echo "no torch $t+cpu from $INDEX: $(grep -m1 -oE 'Could not fetch URL [^ ]+ [a-z ]+' "$tmp/index.log" ||
    grep -m1 ERROR "$tmp/index.log" || tail -1 "$tmp/index.log")" >&2
  # Else the newest CPU torch among the wheels pip finds without an index, with the torchvision of its release
  # (torch 2.N goes with torchvision 0.(N+15)) from wherever pip finds one.
  t=$(pip index versions --no-index torch 2>/dev/null |
    awk -F': ' '/^Available versions:/ { n = split($2, v, ", "); for (i = 1; i <= n; i++) if (!t && v[i] ~ /[+]cpu$/) t = v[i] }
                END { print t }')
  [ -n "$t" ] || { echo "no CPU build of torch among the wheels pip finds without an index" >&2; return 1; }
  v="0.$(( $(cut -d. -f2 <<<"$t") + 15 )).*"
  pip install -q --no-deps "torch==$t" "torchvision==$v" >"$tmp/local.log" 2>&1 || {
    echo "torch $t found, but no torchvision==$v: $(grep -m1 ERROR "$tmp/local.log")" >&2; return 1; }
  echo "torch $t (a local wheel), torchvision $(pip show torchvision | sed -n 's/^Version: //p')"
}

have=$(installed_torch)
if [ "$want_cpu" = yes ] && [[ $have == *+cpu ]]; then
  echo "Keeping the CPU build of torch already in $VENV ($have)"
  pip install -q -r "$tmp/rest.txt"
elif [ "$want_cpu" = yes ] && [ -n "$have" ]; then
  echo "Keeping torch $have already in $VENV (remove $VENV and run again for a CPU build)"
  pip install -q -r requirements-lock.txt
elif [ "$want_cpu" = yes ]; then
  echo "No GPU: looking for a CPU build of torch (FUSELABEL_TORCH_INDEX=${INDEX:-<empty: no index>})"
  if pair=$(install_cpu_pair); then
    # The constraint keeps the pair: a pin elsewhere in the lock must fail here, not swap in the CUDA build.
    pip list --format=freeze | grep -E '^(torch|torchvision)==' >"$tmp/pair.txt"
    if ! pip install -q -r "$tmp/rest.txt" -c "$tmp/pair.txt" 2>"$tmp/rest.log"; then
      why="the lock does not install beside them: $(grep -m1 ERROR "$tmp/rest.log" || tail -1 "$tmp/rest.log")"
    elif ! "$vpy" -c 'import torch, torchvision, timm' 2>"$tmp/import.log"; then
      why="import torch, torchvision, timm fails: $(tail -1 "$tmp/import.log")"
    else
      why=""
      echo "Installed $pair"
    fi
    if [ -n "$why" ]; then
      echo "Not using $pair ($why); installing the locked build instead" >&2
      pip uninstall -q -y torch torchvision
      pip install -q -r requirements-lock.txt
    fi
  else
    echo "No CPU build found; installing the locked build" >&2
    pip install -q -r requirements-lock.txt
  fi
else
  # A CPU build of the locked version would satisfy the lock's pin, so it goes first.
  if [[ $have == *+cpu ]]; then pip uninstall -q -y torch torchvision; fi
  pip install -q -r requirements-lock.txt
fi

pip install -q --no-deps -e .
"$vpy" -c 'import torch; print("torch", torch.__version__, "(CUDA build)" if torch.version.cuda else "(CPU build)")'
echo "fuselabel installed in $VENV"
