#!/usr/bin/env bash
# A three-node Keel (keel serve, fsync always, driven by redis-benchmark SET) against a three-node
# etcd 3.4 (driven by wrk through its JSON gateway, ../shared/bench/etcd-put.lua), the same number of
# concurrent clients and 100-byte values, in the same run; writes go to the leader in both.
#
# usage: bench/cluster-vs-etcd.sh [SECONDS] [CLIENTS]      (defaults 10 and 50; build first)
set -euo pipefail
SECONDS_EACH=${1:-10}; CLIENTS=${2:-50}
HERE=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$HERE/../shared/bench}
KEEL=$HERE/.build/release/keel
work=$(mktemp -d); pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; "$SHARED/etcd-cluster.sh" stop 3 17200 "$work/etcd-" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1]);s.close()'; }
ports=(); peerports=()
for i in 1 2 3; do ports+=("$(port)"); peerports+=("$(port)"); done
peers="1=127.0.0.1:${peerports[0]},2=127.0.0.1:${peerports[1]},3=127.0.0.1:${peerports[2]}"
for i in 0 1 2; do
  "$KEEL" serve --port "${ports[$i]}" --node-id $((i + 1)) --peer-port "${peerports[$i]}" --peers "$peers" --data-dir "$work/keel$i" >"$work/keel$i.log" 2>&1 &
  pids+=($!)
done
leader=""
for _ in $(seq 1 200); do
  for p in "${ports[@]}"; do
    if redis-cli -p "$p" info keel 2>/dev/null | grep -q "keel_role:leader"; then leader=$p; break 2; fi
  done
  sleep 0.1
done
[ -n "$leader" ] || { echo "no Keel leader" >&2; exit 1; }
requests=$((SECONDS_EACH * 30000))
keel_out=$(redis-benchmark -p "$leader" -t set -n "$requests" -c "$CLIENTS" -d 100 -r 100000 -q 2>&1 | tr '\r' '\n' | grep "requests per second" | tail -1)
keel_rps=$(echo "$keel_out" | awk '{print $2}')
"$SHARED/etcd-cluster.sh" start 3 17200 "$work/etcd-" >/dev/null
endpoint=$("$SHARED/etcd-cluster.sh" leader 3 17200 "$work/etcd-" | awk '{print $3}')
etcd_out=$(wrk -t2 -c"$CLIENTS" -d"${SECONDS_EACH}s" --latency -s "$SHARED/etcd-put.lua" "$endpoint")
etcd_rps=$(echo "$etcd_out" | awk '/Requests\/sec/ {print $2}')
echo "three nodes, $CLIENTS clients, 100-byte values, fsync on every commit"
echo "keel serve (redis-benchmark SET): $keel_out"
echo "etcd 3.4 (wrk put):               $etcd_rps requests per second, p50 $(echo "$etcd_out" | awk '$1 == "50%" {print $2}')"
python3 -c "import sys; print('ratio keel/etcd: %.2fx' % (float(sys.argv[1]) / float(sys.argv[2])))" "$keel_rps" "$etcd_rps"
