#!/usr/bin/env bash
# Writes benchmarks/node-scale-{2,250}.{json,txt} and benchmarks/node-scale.{json,txt}: attach over
# every pod of the node lab (`--pod '*' --stats`) with 2 pods and with 250 (twice kubelet's
# default limit). The pods are left 20 s to settle first (a new pod's IPv6 router solicitations
# and listener reports are flooded to every pod), then attach follows pod-0 pinging pod-1 and a
# 10 s iperf3 UDP stream of 10,000 datagrams a second between them: that stream dominates the
# programs' invocations, so that their cost per invocation compares the two sizes, not two
# mixes of traffic. Per size: how long attach took to follow, its peak resident memory, events
# lost, and each program's kernel cost per invocation; then the 250-pod costs as ratios of the
# 2-pod ones, measured in the same run. Run as root from the repository root after
# `cargo xtask build` (with iperf3, as `cargo xtask test` installs it); needs jq. About 5 minutes
# (making 250 pods through CRI takes 80 s, removing them as long).
set -euo pipefail
P=${PROFILER:-target/release/profiler}
cd "$(dirname "$0")/.."
command -v jq >/dev/null || { echo "node-scale.sh needs jq (apt-get install jq)" >&2; exit 1; }
SOCK=/run/profiler/node/node/containerd.sock
PINGS=200
SETTLE=20
# `lab list`: "  pod prof-node/pod-0: netns cni-... ip 198.18.100.2 sandbox ..."
pod() { "$P" lab list | awk -v p="pod prof-node/$1:" -v f="$2" '$0 ~ p { for (i = 1; i < NF; i++) if ($i == f) print $(i + 1) }'; }
ATTACH=
cleanup() {
  [ -n "$ATTACH" ] && kill -INT "$ATTACH" 2>/dev/null && wait "$ATTACH" || true
  "$P" lab down node >/dev/null 2>&1 || true
}
trap cleanup EXIT

measure() {
  local n=$1 err start ready_ms hwm
  "$P" lab up node --pods "$n" >/dev/null
  sleep "$SETTLE"
  local ns0 ns1 ip1 server
  ns0=$(pod pod-0 netns) ns1=$(pod pod-1 netns) ip1=$(pod pod-1 ip)
  ip netns exec "$ns1" iperf3 -s -1 -p 5299 >/dev/null &
  server=$!
  err=$(mktemp)
  start=$(date +%s%N)
  "$P" attach --pod '*' --cri-socket "$SOCK" --stats --json "benchmarks/node-scale-$n.json" \
    > "benchmarks/node-scale-$n.txt" 2> "$err" &
  ATTACH=$!
  for _ in $(seq 600); do
    grep -q '^attach: following' "$err" && break
    kill -0 "$ATTACH" 2>/dev/null || { cat "$err" >&2; exit 1; }
    sleep 0.01
  done
  grep -q '^attach: following' "$err" || { echo "attach not following after 6 s" >&2; exit 1; }
  ready_ms=$(( ($(date +%s%N) - start) / 1000000 ))
  ip netns exec "$ns0" ping -q -c "$PINGS" -i 0.02 "$ip1" >/dev/null
  ip netns exec "$ns0" iperf3 -c "$ip1" -p 5299 -u -l 64 -b 5120k -t 10 >/dev/null
  wait "$server" 
  hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$ATTACH/status")
  kill -INT "$ATTACH"
  wait "$ATTACH"
  ATTACH=
  rm -f "$err"
  "$P" lab down node >/dev/null
  jq -n --argjson pods "$n" --argjson ready "$ready_ms" --argjson hwm "$hwm" \
    --slurpfile r "benchmarks/node-scale-$n.json" '{
      pods: $pods,
      ready_ms: $ready,
      peak_rss_mib: ($hwm / 1024 | . * 10 | round / 10),
      lost_events: $r[0].lost_events,
      journeys: $r[0].journeys,
      ns_per_run: ($r[0].program_costs | map(select(.run_count > 0))
        | map({key: .program, value: (.ns_per_run | round)}) | from_entries)
    }'
}

small=$(measure 2)
large=$(measure 250)
jq -n --argjson small "$small" --argjson large "$large" --arg pings "$PINGS" '{
  command: "bash benchmarks/node-scale.sh",
  load: "pod-0 pings pod-1 \($pings) times, 20 ms apart, then sends it 10,000 UDP datagrams of 64 bytes a second for 10 s (iperf3), while attach follows every pod",
  runs: [$small, $large],
  cost_ratio_250_to_2: ($large.ns_per_run | to_entries | map(select($small.ns_per_run[.key]))
    | map({key: .key, value: ((.value / $small.ns_per_run[.key]) * 100 | round / 100)})
    | from_entries)
}' > benchmarks/node-scale.json
# The same, for people (docs/kubernetes-node.md quotes it).
jq -r '
  "attach --pod \"*\" over the node lab (`bash benchmarks/node-scale.sh`); load: \(.load)",
  "",
  "pods  following after  peak RSS  events lost  journeys  multicast copies not followed",
  (.runs[] | "\(.pods | tostring | (" " * (4 - length)) + .)  \(.ready_ms | tostring | (" " * (12 - length)) + .) ms  \(.peak_rss_mib | tostring | (" " * (4 - length)) + .) MiB  \(.lost_events | tostring | (" " * (11 - length)) + .)  \(.journeys.started | tostring | (" " * (8 - length)) + .)  \(.journeys.multicast_not_followed)"),
  "",
  "kernel cost per invocation (bpf_stats), ns: 2 pods, 250 pods, ratio",
  (.runs[0].ns_per_run | keys[]) as $p
    | "  \($p | . + (" " * (24 - length)))\(.runs[0].ns_per_run[$p] | tostring | (" " * (6 - length)) + .)\(.runs[1].ns_per_run[$p] // "-" | tostring | (" " * (8 - length)) + .)\(.cost_ratio_250_to_2[$p] // "-" | tostring | (" " * (8 - length)) + .)"
' benchmarks/node-scale.json > benchmarks/node-scale.txt
cat benchmarks/node-scale.txt
