#!/usr/bin/env bash
# Writes benchmarks/agent-stream.txt and agent-stream-PPS.json, docs/across-nodes.md's "what
# an agent sends": what a peer's agent streams to the host while `attach --peer` follows, at
# UDP packet rates asked of iperf3 (64-byte datagrams from pod-a to pod-b for 10 s each).
# Two "nodes" on this one kernel as in peer-attach.sh: node-a (this attach: pod-a, its eth0 as
# the wire) and node-b (a `profiler agent` on the loopback under the cluster's TLS: pod-b and
# its eth0), each following the datagrams. node-b sees each one enter its wire: one sighting a
# packet. The rate reached is what node-b saw, not what was asked (iperf3 on these 2 shared
# cores is the limit well before 1 M packets/s).
# Run as root from the repository root after `cargo xtask build`.
set -euo pipefail
RATES=${RATES:-10000 100000 1000000}
SECONDS_EACH=10
cd "$(dirname "$0")/.."
# The checkout as it was before this run rewrote its figures.
COMMIT=$(git describe --always --dirty)
PORT=7454
source benchmarks/two-nodes.sh
ip netns exec prof-bridge-pod-b iperf3 -s -p 5299 >/dev/null 2>&1 &
SERVER=$!
sleep 1
for pps in $RATES; do
  echo "==> $pps packets/s asked" >&2
  "$P" attach --node node-a --tls "$CERTS" \
    --peer node-b=127.0.0.1:$PORT,netns=prof-bridge-pod-b,wire=prof-bridge-pod-b:eth0 \
    --netns prof-bridge-pod-a --wire prof-bridge-pod-a:eth0 --filter "udp and dst port 5299" \
    --quiet --json "benchmarks/agent-stream-$pps.json" \
    -- ip netns exec prof-bridge-pod-a iperf3 -c 198.18.0.2 -p 5299 -u -l 64 \
    -b $((pps * 64 * 8)) -t $SECONDS_EACH >/dev/null
done
{
  echo "# bash benchmarks/agent-stream.sh ($COMMIT, $(uname -r), $(nproc) CPUs)"
  echo "# per second of traffic ($SECONDS_EACH s each); seconds: node-b following, from its start to its report"
  printf '%-10s %10s %10s %10s %12s %10s %9s %10s %9s %9s\n' asked_pps seen_pps sightings seconds sent_kB_per_s B_each not_sent not_kept_b lost_b lost_a
  for pps in $RATES; do
    jq -r --arg asked "$pps" --argjson each $SECONDS_EACH '
      (.links[0].streamed) as $s | (.peers[0]) as $b |
      [$asked,
       (($b.wire.entering / $each) | floor),
       $s.lines, ($s.seconds * 10 | round / 10),
       (($s.bytes / 1000 / $each) | round),
       (($s.bytes / ([$s.lines, 1] | max)) | round),
       $b.wire.not_sent // 0, $b.wire.not_kept, $b.lost_events, .lost_events]
      | @tsv' "benchmarks/agent-stream-$pps.json" |
      awk -F'\t' '{ printf "%-10s %10s %10s %10s %12s %10s %9s %10s %9s %9s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 }'
  done
} > benchmarks/agent-stream.txt
cat benchmarks/agent-stream.txt
