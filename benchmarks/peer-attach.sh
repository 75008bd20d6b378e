#!/usr/bin/env bash
# Writes benchmarks/peer-attach.txt and .json, docs/across-nodes.md's `attach --peer` example:
# two "nodes" on this one kernel, node-a (this attach: pod-a's namespace, its eth0 as the wire)
# and node-b (a `profiler agent` on the loopback under the cluster's TLS: pod-b's namespace and
# eth0), following ICMP while pod-a pings pod-b 200 times (the workload: the attach ends when it
# does). One kernel means one clock: the offset found from the traffic should contain zero.
# Run as root from the repository root after `cargo xtask build`.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=7452
source benchmarks/two-nodes.sh
"$P" attach --node node-a --tls "$CERTS" \
  --peer node-b=127.0.0.1:$PORT,netns=prof-bridge-pod-b,wire=prof-bridge-pod-b:eth0 \
  --netns prof-bridge-pod-a --wire prof-bridge-pod-a:eth0 --filter icmp \
  --quiet --json benchmarks/peer-attach.json \
  -- ip netns exec prof-bridge-pod-a ping -q -c 200 -i 0.01 198.18.0.2 \
  > benchmarks/peer-attach.txt
