#!/usr/bin/env bash
# Adds (or updates) a Flotilla entry in the Codex CLI's MCP servers, pointing at `flotilla mcp`
# (a local stdio MCP server forwarding to a Flotilla's REST API).
#
#   mcp/scripts/configure-codex.sh --token-file FILE [--server URL] [--read-only]
#                                 [--name NAME] [--command PATH] [--config FILE]
#
# Config file: ${CODEX_HOME:-~/.codex}/config.toml, table [mcp_servers.<name>] with command,
# args and env. Idempotent: an unchanged entry leaves the file untouched; otherwise the previous
# file is kept as <file>.bak-<UTC time to the microsecond>. Other tables are preserved verbatim.
# Needs python3 >= 3.11 (tomllib) or the tomli package: the result is validated before it is
# written, and nothing is written without validation. An entry written as dotted keys or an
# inline table (not a [mcp_servers.<name>] table) is refused rather than duplicated.
set -euo pipefail

server="http://127.0.0.1:8080"
token_file=""
read_only=0
name="flotilla"
command=""
config=""

die() { echo "configure-codex.sh: $*" >&2; exit 2; }
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

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
# Without a token the entry could only ever answer "unauthorized": refuse to write it.
[[ -n "$token_file" ]] || die "--token-file is required: the file holding a Flotilla API token (a local server writes data/admin.token; see api.tokens_file). Without one every tool call fails as unauthorized"
if [[ -z "$command" ]]; then
  command="$(command -v flotilla || true)"
  [[ -n "$command" ]] || die "flotilla is not on PATH: install it with \`cargo install --locked --path server\` from the repository (into ~/.cargo/bin), or pass --command /path/to/flotilla"
fi
abspath() { python3 -c 'import os,sys; print(os.path.abspath(os.path.expanduser(sys.argv[1])))' "$1"; }
command="$(abspath "$command")"
[[ -f "$command" && -x "$command" ]] || die "--command $command is not an executable file"
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
except ModuleNotFoundError:
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        sys.exit(
            f"configure-codex.sh: refusing to write {config}: cannot validate TOML with "
            f"{sys.executable} (Python {sys.version.split()[0]}); use Python >= 3.11 or "
            "install the tomli package"
        )
try:
    before = tomllib.loads(rest)
except Exception as e:
    sys.exit(f"configure-codex.sh: {config} is not valid TOML ({e}); fix or move it first")
servers = before.get("mcp_servers")
if isinstance(servers, dict) and name in servers:
    # Still defined once our [mcp_servers.<name>] tables are gone: dotted keys
    # (mcp_servers.<name>.command = ...) or an inline table. Rewriting those by text is how
    # duplicate keys happen; the operator decides.
    sys.exit(
        f"configure-codex.sh: {config} defines mcp_servers.{name} with dotted keys or an "
        f"inline table; this script replaces only a [mcp_servers.{name}] table. Remove that "
        "definition (or rewrite it as such a table) and run again."
    )
try:
    doc = tomllib.loads(new)
    got = doc["mcp_servers"][name]
    assert got["command"] == command and got["args"] == args, "the entry did not come out as written"
except Exception as e:
    sys.exit(f"configure-codex.sh: refusing to write {config}: the result would not be valid ({e})")
if new == old:
    print(f"{config}: {name} already up to date")
    sys.exit(0)
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
    f.write(new)
os.replace(tmp, config)
print(f"{config}: [mcp_servers.{name}] -> {command} {' '.join(args)}")
PY
