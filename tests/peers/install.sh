#!/usr/bin/env bash
# Installs the third-party OpAMP client peers (Python venv + Node modules) into <repo>/.peers; idempotent.
# The venv also holds the official MCP Python SDK used by the MCP transport tests and the
# OpenAPI client generator; the Node modules also hold the official MCP TypeScript SDK.
#
#   bash tests/peers/install.sh        # or PEERS_DIR=/elsewhere bash tests/peers/install.sh
#
# Result: $PEERS_DIR/venv (pip -r tests/peers/python/requirements.txt) and
#         $PEERS_DIR/node/node_modules (npm ci from tests/peers/node/package-lock.json).
# Each part carries a stamp (hash of its pins + tool version) and is skipped when the stamp matches.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
peers="${PEERS_DIR:-${FLOTILLA_PEERS_DIR:-$repo/.peers}}"
python="${PYTHON:-python3}"
node="${NODE:-node}"
npm="${NPM:-npm}"

die() { echo "tests/peers/install.sh: ERROR: $*" >&2; exit 1; }
log() { echo "tests/peers/install.sh: $*" >&2; }

command -v "$python" >/dev/null 2>&1 || die "'$python' not found: Python >= 3.10 with venv/pip is required for the Python OpAMP peer"
command -v "$node" >/dev/null 2>&1 || die "'$node' not found: Node.js >= 20.6 is required for the Node OpAMP peer"
command -v "$npm" >/dev/null 2>&1 || die "'$npm' not found: npm is required to install the Node OpAMP peer"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die "$("$python" --version 2>&1) is too old: opentelemetry-opamp-client 0.5b0 needs Python >= 3.10"
"$node" -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=6)||(a===18&&b>=19)?0:1)' \
  || die "node $("$node" --version) is too old: @elastic/opamp-client-node 0.5.0 needs ^18.19.0 || >=20.6.0"

mkdir -p "$peers"
# Serialise concurrent installs (e.g. two test runs) when flock is available.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$peers/.install.lock"
  flock 9
fi

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# ---- Python peer ---------------------------------------------------------------------------
req="$here/python/requirements.txt"
py_stamp="$(hash_of "$req")-$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
venv="$peers/venv"
if [[ -f "$venv/.flotilla-stamp" && "$(cat "$venv/.flotilla-stamp")" == "$py_stamp" && -x "$venv/bin/python" ]]; then
  log "python peer up to date ($venv)"
else
  log "installing python peer into $venv"
  start=$SECONDS
  rm -rf "$venv"
  "$python" -m venv "$venv" || die "python3 -m venv failed (install the python3-venv package?)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req" \
    || die "pip install -r $req failed"
  "$venv/bin/python" -c 'import opentelemetry._opamp.agent' \
    || die "opentelemetry-opamp-client does not import after install"
  "$venv/bin/python" -c 'import mcp.client.session, mcp.client.sse, mcp.client.streamable_http' \
    || die "the MCP Python SDK (mcp) does not import after install"
  "$venv/bin/openapi-python-client" --version >/dev/null \
    || die "openapi-python-client does not run after install"
  echo "$py_stamp" > "$venv/.flotilla-stamp"
  log "python peer installed in $((SECONDS - start)) s"
fi

# ---- Node peer -----------------------------------------------------------------------------
nodedir="$peers/node"
node_stamp="$(hash_of "$here/node/package.json" "$here/node/package-lock.json")-$("$node" --version)"
if [[ -f "$nodedir/.flotilla-stamp" && "$(cat "$nodedir/.flotilla-stamp")" == "$node_stamp" \
      && -d "$nodedir/node_modules/@elastic/opamp-client-node" ]]; then
  log "node peer up to date ($nodedir)"
else
  log "installing node peer into $nodedir"
  start=$SECONDS
  rm -rf "$nodedir"
  mkdir -p "$nodedir"
  cp "$here/node/package.json" "$here/node/package-lock.json" "$nodedir/"
  "$npm" ci --prefix "$nodedir" --ignore-scripts --no-audit --no-fund --loglevel=error >&2 \
    || die "npm ci for the node peer failed"
  NODE_PATH="$nodedir/node_modules" "$node" -e 'require("@elastic/opamp-client-node")' \
    || die "@elastic/opamp-client-node does not load after install"
  NODE_PATH="$nodedir/node_modules" "$node" -e 'require("@modelcontextprotocol/sdk/client/streamableHttp.js")' \
    || die "the MCP TypeScript SDK (@modelcontextprotocol/sdk) does not load after install"
  echo "$node_stamp" > "$nodedir/.flotilla-stamp"
  log "node peer installed in $((SECONDS - start)) s"
fi
