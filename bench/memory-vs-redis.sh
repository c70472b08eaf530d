#!/usr/bin/env bash
# Resident memory per million 100-byte keys: Keel against Redis 7, loaded the same way in the same run.
#
# usage: bench/memory-vs-redis.sh [KEYS]          (default 1000000; build first: swift build -c release)
# Both servers are loaded with KEYS `SET key:<i> <100 bytes>` through redis-cli --pipe; the figure is the
# process's resident set (/proc/PID/status VmRSS) after the load, minus the resident set when empty.
set -euo pipefail
KEYS=${1:-1000000}
HERE=$(cd "$(dirname "$0")/.." && pwd)
KEEL=$HERE/.build/release/keel
work=$(mktemp -d); pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1]);s.close()'; }
rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$1/status"; }
wait_ping() { for _ in $(seq 1 200); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }
python3 - "$KEYS" > "$work/load.txt" <<'PY'
import sys
value = "v" * 100
out = sys.stdout
for i in range(int(sys.argv[1])):
    key = "key:%d" % i
    out.write("*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$100\r\n%s\r\n" % (len(key), key, value))
PY
kp=$(port); rp=$(port)
"$KEEL" serve --port "$kp" --data-dir "$work/keel" --fsync never --checkpoint-entries 100000000 >"$work/keel.log" 2>&1 & kpid=$!; pids+=($kpid)
redis-server --port "$rp" --bind 127.0.0.1 --dir "$work" --save '' --appendonly no --daemonize no >"$work/redis.log" 2>&1 & rpid=$!; pids+=($rpid)
wait_ping "$kp"; wait_ping "$rp"
k0=$(rss "$kpid"); r0=$(rss "$rpid")
redis-cli -p "$kp" --pipe < "$work/load.txt" | tail -1
redis-cli -p "$rp" --pipe < "$work/load.txt" | tail -1
sleep 1
k1=$(rss "$kpid"); r1=$(rss "$rpid")
echo "keys $(redis-cli -p "$kp" dbsize) in Keel, $(redis-cli -p "$rp" dbsize) in Redis"
python3 - "$KEYS" "$k0" "$k1" "$r0" "$r1" <<'PY'
import sys
n, k0, k1, r0, r1 = map(int, sys.argv[1:])
kb, rb = (k1 - k0) / n, (r1 - r0) / n
print("resident bytes per key: Keel %.0f, Redis %.0f (ratio %.2fx); per million keys: Keel %.0f MB, Redis %.0f MB"
      % (kb, rb, kb / rb, kb, rb))
PY
