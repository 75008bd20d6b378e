#!/usr/bin/env bash
# Writes benchmarks/attach-bridge.txt, the README's attach example: attach on the bridge lab's
# pod-a, following ICMP while pod-a pings pod-b 200 times; its JSON, and the same report's drops
# view (docs/kubernetes-node.md's example). Run as root from the repository root
# after `cargo xtask build`.
set -euo pipefail
P=${PROFILER:-target/release/profiler}
cd "$(dirname "$0")/.."
"$P" lab up bridge >/dev/null
trap '"$P" lab down bridge >/dev/null' EXIT
"$P" attach --netns prof-bridge-pod-a --filter icmp --quiet --json benchmarks/attach-bridge.json \
  -- ip netns exec prof-bridge-pod-a ping -q -c 200 -i 0.01 198.18.0.2 \
  > benchmarks/attach-bridge.txt
"$P" report benchmarks/attach-bridge.json --format drops > benchmarks/attach-bridge-drops.txt
