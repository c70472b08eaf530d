#!/usr/bin/env bash
# Keel's node beside etcd 3.4 on this machine, in one run: committed writes per second and
# latency for 1 and 3 nodes at 1, 16 and 128 concurrent writers (100-byte values, fsync on every
# commit in both), then leader failover (SIGKILL of the leader until the next write commits,
# median of 5).
#
# usage: bench/node-vs-etcd.sh [SECONDS] [RUNS]        (build first: swift build -c release)
# needs: etcd-server etcd-client wrk (apt-get install), ../shared/bench/etcd-cluster.sh
#
# Keel is measured in-process (`keel bench node`: proposals from Swift tasks to the leader over
# its API, peers over loopback TCP); etcd through its v3 JSON gateway with wrk (etcd-put.lua), so
# etcd also pays for HTTP and JSON per request. The server-to-server comparison (Redis protocol
# against etcd) comes with `keel serve`.
set -euo pipefail
SECONDS_EACH=${1:-5}
RUNS=${2:-5}
HERE=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$HERE/../shared/bench}
KEEL=$HERE/.build/release/keel
WORK=${WORK:-/tmp/keel-bench}
mkdir -p "$WORK"

echo "== keel bench node (seconds $SECONDS_EACH)"
"$KEEL" bench node --directory "$WORK" --seconds "$SECONDS_EACH" --nodes 1,3 --proposers 1,16,128

echo "== etcd 3.4 (wrk -> v3 JSON gateway)"
echo "nodes  writers  puts/s  p50 ms  p99 ms"
to_ms() { # wrk latency like 1.23ms, 456.00us, 1.02s
  awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v); print v + 0 } else { sub(/s$/, "", v); print v * 1000 } }'
}
for n in 1 3; do
  "$SHARED/etcd-cluster.sh" start "$n" 17100 "$WORK/etcd-" > /dev/null
  endpoint=$("$SHARED/etcd-cluster.sh" leader "$n" 17100 "$WORK/etcd-" | awk '{print $3}')
  for c in 1 16 128; do
    threads=$(( c < 2 ? 1 : 2 ))
    out=$(wrk -t"$threads" -c"$c" -d"${SECONDS_EACH}s" --latency -s "$SHARED/etcd-put.lua" "$endpoint")
    rate=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(to_ms "$(echo "$out" | awk '$1 == "50%" {print $2}')")
    p99=$(to_ms "$(echo "$out" | awk '$1 == "99%" {print $2}')")
    printf "%5d  %7d  %6.0f  %6.2f  %6.2f\n" "$n" "$c" "$rate" "$p50" "$p99"
  done
  "$SHARED/etcd-cluster.sh" stop "$n" 17100 "$WORK/etcd-"
done

echo "== keel bench failover (runs $RUNS)"
"$KEEL" bench failover --directory "$WORK" --runs "$RUNS"

echo "== etcd failover (runs $RUNS): SIGKILL of the leader until the next put commits"
"$SHARED/etcd-cluster.sh" start 3 17100 "$WORK/etcd-" > /dev/null
endpoints=http://127.0.0.1:17110,http://127.0.0.1:17120,http://127.0.0.1:17130
samples=()
for run in $(seq 1 "$RUNS"); do
  ETCDCTL_API=3 etcdctl --endpoints "$endpoints" put warm "$run" > /dev/null
  sleep 0.5
  read -r index pid _ < <("$SHARED/etcd-cluster.sh" leader 3 17100 "$WORK/etcd-")
  began=$(date +%s%N)
  kill -9 "$pid"
  until ETCDCTL_API=3 etcdctl --endpoints "$endpoints" --dial-timeout=200ms --command-timeout=300ms put after "$run" > /dev/null 2>&1; do :; done
  ms=$(( ($(date +%s%N) - began) / 1000000 ))
  samples+=("$ms")
  echo "run $run: leader $index, $ms ms"
  "$SHARED/etcd-cluster.sh" restart-node "$index" 3 17100 "$WORK/etcd-" > /dev/null
done
"$SHARED/etcd-cluster.sh" stop 3 17100 "$WORK/etcd-"
printf "%s\n" "${samples[@]}" | sort -n | awk '{a[NR]=$1} END {print "etcd median " a[int((NR+1)/2)] " ms over " NR " runs (election timeout 1000 ms)"}'
