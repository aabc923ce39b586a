#!/usr/bin/env bash
# Idempotent set-up: .venv at the root, torch first, every lib and service editable, protos generated.
# Every Makefile target that runs code calls this first; a second run with nothing changed takes ~1 s.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP=$VENV/.splitstack-setup
TORCH_SPEC="torch==2.13.0"   # on these machines pip takes a local CPU wheel; a range would pull a CUDA build

pick_python() {
  for cand in "${SPLITSTACK_PYTHON:-}" python3.11 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$cand"; return 0
    fi
  done
  echo "setup: needs Python >= 3.11 (set SPLITSTACK_PYTHON)" >&2; return 1
}

# Everything whose change means "install again".
inputs_digest() {
  { echo "$TORCH_SPEC"; cat tools/setup.sh requirements-dev.txt;
    find libs services -maxdepth 2 -name pyproject.toml | sort | xargs cat; } | sha256sum | cut -d' ' -f1
}

if [ ! -x "$VENV/bin/python" ]; then
  py=$(pick_python)
  echo "setup: creating $VENV with $($py --version)"
  "$py" -m venv "$VENV"
fi
# pip, minus the warnings some machines' pip config emits for absent local index folders.
pip_install() {
  "$VENV/bin/python" -m pip --disable-pip-version-check install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

want=$(inputs_digest)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  pip_install --upgrade pip
  echo "setup: installing $TORCH_SPEC first"
  pip_install "$TORCH_SPEC"
  editables=(-e libs/contracts -e "libs/chassis[testing]" -e "libs/client[demo,kubernetes]")
  for svc in services/*/; do
    [ -f "$svc/pyproject.toml" ] && editables+=(-e "${svc%/}[test]")
  done
  echo "setup: installing ${#editables[@]} editable entries and dev tools"
  # torch stays pinned while the rest resolve, so nothing swaps it for a CUDA build.
  pip_install "$TORCH_SPEC" "${editables[@]}" -r requirements-dev.txt
  echo "$want" > "$STAMP"
fi

tools/gen_proto.sh --if-stale
