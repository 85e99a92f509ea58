#!/usr/bin/env bash
# Adds (or updates) a Flotilla entry in the Codex CLI's MCP servers, pointing at `flotilla mcp`
# (a local stdio MCP server forwarding to a Flotilla's REST API).
#
#   mcp/scripts/configure-codex.sh [--server URL] [--token-file FILE] [--read-only]
#                                 [--name NAME] [--command PATH] [--config FILE]
#
# Config file: ${CODEX_HOME:-~/.codex}/config.toml, table [mcp_servers.<name>] with command,
# args and env. Idempotent: an unchanged entry leaves the file untouched; otherwise the previous
# file is kept as <file>.bak-<UTC timestamp>. Other tables are preserved verbatim. Needs
# python3 (>= 3.11 validates the result with tomllib).
set -euo pipefail

server="http://127.0.0.1:8080"
token_file=""
read_only=0
name="flotilla"
command=""
config=""

die() { echo "configure-codex.sh: $*" >&2; exit 2; }
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --server) server="${2:?--server needs a URL}"; shift 2 ;;
    --token-file) token_file="${2:?--token-file needs a path}"; shift 2 ;;
    --read-only) read_only=1; shift ;;
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --command) command="${2:?--command needs a path}"; shift 2 ;;
    --config) config="${2:?--config needs a path}"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown option $1" >&2; usage 2 ;;
  esac
done

command -v python3 >/dev/null 2>&1 || die "python3 is required to edit the TOML config"
[[ "$server" =~ ^https?:// ]] || die "--server must be an http:// or https:// URL, got $server"
[[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || die "--name must be letters, digits, _ or -"
if [[ -z "$command" ]]; then
  command="$(command -v flotilla || true)"
  [[ -n "$command" ]] || die "flotilla is not on PATH; pass --command /path/to/flotilla"
fi
abspath() { python3 -c 'import os,sys; print(os.path.abspath(os.path.expanduser(sys.argv[1])))' "$1"; }
command="$(abspath "$command")"
if [[ -n "$token_file" ]]; then
  token_file="$(abspath "$token_file")"
  [[ -f "$token_file" ]] || echo "configure-codex.sh: warning: $token_file does not exist (yet)" >&2
fi
[[ -n "$config" ]] || config="${CODEX_HOME:-$HOME/.codex}/config.toml"

python3 - "$config" "$name" "$command" "$server" "$token_file" "$read_only" <<'PY'
import json, os, re, shutil, sys, time
config, name, command, server, token_file, read_only = sys.argv[1:]
args = ["mcp", "--server", server]
if token_file:
    args += ["--token-file", token_file]
if read_only == "1":
    args.append("--read-only")
q = json.dumps  # a JSON string is a valid TOML basic string
block = (
    f"[mcp_servers.{name}]\n"
    f"command = {q(command)}\n"
    f"args = [{', '.join(q(a) for a in args)}]\n"
    f'env = {{ FLOTILLA_LOG = "warn" }}\n'
)
old = ""
if os.path.exists(config):
    with open(config, encoding="utf-8") as f:
        old = f.read()
# Drop our previous table (and any sub-table of it) up to the next unrelated header.
header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
ours = {f"mcp_servers.{name}", f'mcp_servers."{name}"'}
kept, skipping = [], False
for line in old.splitlines(keepends=True):
    m = header.match(line)
    if m:
        t = m.group(1).replace(" ", "")
        skipping = t in ours or any(t.startswith(o + ".") for o in ours)
    if not skipping:
        kept.append(line)
rest = "".join(kept).rstrip("\n")
new = (rest + "\n\n" if rest else "") + block
try:
    import tomllib
    doc = tomllib.loads(new)
    got = doc["mcp_servers"][name]
    assert got["command"] == command and got["args"] == args
except ModuleNotFoundError:
    pass
except Exception as e:
    sys.exit(f"configure-codex.sh: refusing to write {config}: the result would not be valid ({e})")
if new == old:
    print(f"{config}: {name} already up to date")
    sys.exit(0)
if os.path.exists(config):
    backup = f"{config}.bak-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    shutil.copy2(config, backup)
    print(f"backup: {backup}")
os.makedirs(os.path.dirname(config) or ".", exist_ok=True)
tmp = config + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    f.write(new)
os.replace(tmp, config)
print(f"{config}: [mcp_servers.{name}] -> {command} {' '.join(args)}")
PY
