#!/usr/bin/env bash
# Adds (or updates) a Flotilla entry in Claude Desktop's MCP server list, pointing at
# `flotilla mcp` (a local stdio MCP server forwarding to a Flotilla's REST API).
#
#   mcp/scripts/configure-claude-desktop.sh --token-file FILE [--server URL] [--read-only]
#                                          [--name NAME] [--command PATH] [--config FILE]
#
# Config file: macOS ~/Library/Application Support/Claude/claude_desktop_config.json,
#              Linux ${XDG_CONFIG_HOME:-~/.config}/Claude/claude_desktop_config.json
#              (Windows: use configure-claude-desktop.ps1).
# Idempotent: an unchanged entry leaves the file untouched; otherwise the previous file is kept
# as <file>.bak-<UTC time to the microsecond>. Other servers and settings are preserved. Needs python3.
# Restart Claude Desktop afterwards.
set -euo pipefail

server="http://127.0.0.1:8080"
token_file=""
read_only=0
name="flotilla"
command=""
config=""

die() { echo "configure-claude-desktop.sh: $*" >&2; exit 2; }
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

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

command -v python3 >/dev/null 2>&1 || die "python3 is required to edit the JSON config"
[[ "$server" =~ ^https?:// ]] || die "--server must be an http:// or https:// URL, got $server"
[[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || die "--name must be letters, digits, _ or -"
# Without a token the entry could only ever answer "unauthorized": refuse to write it.
[[ -n "$token_file" ]] || die "--token-file is required: the file holding a Flotilla API token (a local server writes data/admin.token; see api.tokens_file). Without one every tool call fails as unauthorized"
if [[ -z "$command" ]]; then
  command="$(command -v flotilla || true)"
  [[ -n "$command" ]] || die "flotilla is not on PATH: install it with \`cargo install --locked --path server\` from the repository (into ~/.cargo/bin), or pass --command /path/to/flotilla"
fi
# Desktop apps do not inherit the shell's PATH or working directory: use absolute paths.
abspath() { python3 -c 'import os,sys; print(os.path.abspath(os.path.expanduser(sys.argv[1])))' "$1"; }
command="$(abspath "$command")"
[[ -f "$command" && -x "$command" ]] || die "--command $command is not an executable file"
if [[ -n "$token_file" ]]; then
  token_file="$(abspath "$token_file")"
  [[ -f "$token_file" ]] || echo "configure-claude-desktop.sh: warning: $token_file does not exist (yet)" >&2
fi

if [[ -z "$config" ]]; then
  case "$(uname -s)" in
    Darwin) config="$HOME/Library/Application Support/Claude/claude_desktop_config.json" ;;
    *) config="${XDG_CONFIG_HOME:-$HOME/.config}/Claude/claude_desktop_config.json" ;;
  esac
fi

python3 - "$config" "$name" "$command" "$server" "$token_file" "$read_only" <<'PY'
import json, os, shutil, sys, time
config, name, command, server, token_file, read_only = sys.argv[1:]
args = ["mcp", "--server", server]
if token_file:
    args += ["--token-file", token_file]
if read_only == "1":
    args.append("--read-only")
# As in the Codex entry: the client shows a stdio server's stderr as errors, so only warnings.
entry = {"command": command, "args": args, "env": {"FLOTILLA_LOG": "warn"}}
doc = {}
if os.path.exists(config):
    with open(config, encoding="utf-8") as f:
        text = f.read()
    if text.strip():
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            sys.exit(f"configure-claude-desktop.sh: {config} is not valid JSON ({e}); fix or move it first")
    if not isinstance(doc, dict):
        sys.exit(f"configure-claude-desktop.sh: {config} does not hold a JSON object")
servers = doc.setdefault("mcpServers", {})
if not isinstance(servers, dict):
    sys.exit(f"configure-claude-desktop.sh: mcpServers in {config} is not an object")
if servers.get(name) == entry:
    print(f"{config}: {name} already up to date")
    sys.exit(0)
servers[name] = entry
if os.path.exists(config):
    # Microseconds, and a counter on a clash: two runs in one second keep two backups.
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1e6) % 1000000:06d}Z"
    backup, n = f"{config}.bak-{stamp}", 1
    while os.path.exists(backup):
        backup, n = f"{config}.bak-{stamp}-{n}", n + 1
    shutil.copy2(config, backup)
    print(f"backup: {backup}")
os.makedirs(os.path.dirname(config) or ".", exist_ok=True)
tmp = config + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
os.replace(tmp, config)
print(f"{config}: {name} -> {command} {' '.join(args)}")
PY
