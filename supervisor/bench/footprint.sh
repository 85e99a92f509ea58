#!/usr/bin/env bash
# Footprint of flotilla-supervisor next to the fake Fluent Bit, against a real Flotilla server:
# binary size, VmRSS / RssAnon, and CPU per hour, at the server-offered heartbeat interval(s).
#
#   supervisor/bench/footprint.sh [--seconds N] [--heartbeats "30 1"] [--profile supervisor|release]
#
# A benchmark, not a test: it prints one table row per heartbeat interval (and a JSON line each).
# CPU per hour = (utime + stime over the window) × 3600 / window; RSS is sampled at the end.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
seconds=300
heartbeats="30 1"
profile=supervisor
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --heartbeats) heartbeats="$2"; shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    *) echo "footprint.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
die() { echo "footprint.sh: ERROR: $*" >&2; exit 1; }

echo "building (release server and fake agents, $profile supervisor)..." >&2
cargo build -q --release -p flotilla-server --bin flotilla
cargo build -q --release -p flotilla-fake-agents --bin fake-fluent-bit
cargo build -q --profile "$profile" -p flotilla-supervisor
target="${CARGO_TARGET_DIR:-$repo/target}"
server_bin="$target/release/flotilla"
fake_bin="$target/release/fake-fluent-bit"
sup_bin="$target/$profile/flotilla-supervisor"
for b in "$server_bin" "$fake_bin" "$sup_bin"; do [[ -x "$b" ]] || die "$b was not built"; done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
ticks=$(getconf CLK_TCK)
cpu_s() { awk -v t="$ticks" '{print ($14 + $15) / t}' "/proc/$1/stat"; }
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
# Messages the server handled (all kinds): proves the offered interval is the one in use.
messages() { curl -sf "http://127.0.0.1:$1/metrics" | awk '/^flotilla_opamp_messages_total/ {n += $2} END {print n + 0}'; }

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

printf '%-10s %-8s %-10s %-12s %-18s %-10s %-14s\n' "heartbeat" "window" "messages" "binary" "VmRSS (RssAnon)" "CPU" "CPU per hour"
for hb in $heartbeats; do
  run="$work/hb-$hb"
  mkdir -p "$run/server" "$run/sup" "$run/agent"
  opamp=$(free_port); api=$(free_port); http=$(free_port); chat=$(free_port)
  cat > "$run/server/flotilla.toml" <<TOML
data_dir = "$run/server/data"
[opamp]
listen = "127.0.0.1:$opamp"
heartbeat_interval_s = $hb
[api]
listen = "127.0.0.1:$api"
[log]
level = "warn"
TOML
  "$server_bin" serve --config "$run/server/flotilla.toml" 2>"$run/server/log" &
  pids+=($!)
  cat > "$run/agent/fluent-bit.conf" <<CONF
[SERVICE]
    Flush        1
    HTTP_Server  On
    Hot_Reload   On
[INPUT]
    Name   http
    Listen 127.0.0.1
    Port   $chat
[INPUT]
    Name   cpu
    Tag    cpu
[OUTPUT]
    Name   stdout
    Match  *
CONF
  cat > "$run/sup/supervisor.toml" <<TOML
data_dir = "$run/sup/data"
[server]
url = "ws://127.0.0.1:$opamp/v1/opamp"
[agent]
kind = "fluentbit"
executable = "$fake_bin"
config_path = "$run/agent/fluent-bit.conf"
http_port = $http
chat_ops_port = $chat
[log]
level = "warn"
TOML
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$api/healthz" >/dev/null && break; sleep 0.1; done
  "$sup_bin" --config "$run/sup/supervisor.toml" 2>"$run/sup/log" &
  sup=$!
  pids+=($sup)
  # Let it register, start the agent and settle before the window.
  sleep 10
  kill -0 "$sup" 2>/dev/null || die "supervisor exited early: $(tail -5 "$run/sup/log")"
  c0=$(cpu_s "$sup"); m0=$(messages "$api")
  sleep "$seconds"
  c1=$(cpu_s "$sup"); m1=$(messages "$api")
  rss=$(status_kib "$sup" VmRSS); anon=$(status_kib "$sup" RssAnon)
  size=$(stat -c %s "$sup_bin")
  cpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f", b - a}')
  per_h=$(awk -v a="$c0" -v b="$c1" -v w="$seconds" 'BEGIN {printf "%.1f", (b - a) * 3600 / w}')
  printf '%-10s %-8s %-10s %-12s %-18s %-10s %-14s\n' "${hb} s" "${seconds} s" "$((m1 - m0))" \
    "$(awk -v s="$size" 'BEGIN {printf "%.1f MB", s / 1e6}')" \
    "$(awk -v r="$rss" -v a="$anon" 'BEGIN {printf "%.1f (%.1f) MiB", r / 1024, a / 1024}')" \
    "${cpu} s" "${per_h} s"
  echo "{\"heartbeat_s\":$hb,\"window_s\":$seconds,\"messages\":$((m1 - m0)),\"profile\":\"$profile\",\"binary_bytes\":$size,\"vmrss_kib\":$rss,\"rss_anon_kib\":$anon,\"cpu_s\":$cpu,\"cpu_s_per_hour\":$per_h}"
  kill "$sup"; wait "$sup" 2>/dev/null || true
done
