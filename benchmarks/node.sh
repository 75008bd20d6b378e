#!/usr/bin/env bash
# Writes benchmarks/node-*.{json,txt}: the node lab (containerd, runc, CNI bridge; pods made
# through CRI), attach following two pods by name while pod-0 pings pod-1, and a tagged run
# between them. Run as root from the repository root after `cargo xtask build`.
set -euo pipefail
P=${PROFILER:-target/release/profiler}
cd "$(dirname "$0")/.."
"$P" lab up node --pods 3 >/dev/null
trap '"$P" lab down node >/dev/null' EXIT
# `lab list`: "  pod prof-node/pod-0: netns cni-... ip 198.18.100.2 sandbox ..."
pod() { "$P" lab list | awk -v p="pod prof-node/$1:" -v f="$2" '$0 ~ p { for (i = 1; i < NF; i++) if ($i == f) print $(i + 1) }'; }
SOCK=/run/profiler/node/node/containerd.sock
NS0=$(pod pod-0 netns)
IP1=$(pod pod-1 ip)
"$P" attach --pod 'prof-node/*' --cri-socket "$SOCK" --filter icmp --quiet \
  --json benchmarks/node-attach.json -- ip netns exec "$NS0" ping -q -c 500 -i 0.01 "$IP1" \
  > benchmarks/node-attach.txt
"$P" run --from prof-node/pod-0 --to prof-node/pod-1 --cri-socket "$SOCK" --count 500 \
  --rate 100 --quiet --json benchmarks/node-run.json > benchmarks/node-run.txt
