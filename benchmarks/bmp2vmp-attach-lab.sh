#!/usr/bin/env bash
# Writes benchmarks/bmp2vmp-attach-lab.txt and .json, docs/across-nodes.md's example: attach
# --lab on the bmp2vmp lab (host pod-a, vm1's pod-b in a TCG guest on the VM lab's 6.1 kernel),
# following ICMP while vm1's pod-b pings pod-a 100 times through `lab exec` (the workload: the
# attach ends when it does). Run as root from the repository root after `cargo xtask build`
# and `cargo xtask test` (which provisions the guest kernel).
set -euo pipefail
P=${PROFILER:-target/release/profiler}
cd "$(dirname "$0")/.."
"$P" lab up bmp2vmp --inner bridge --guest-kernel 6.1 >/dev/null
trap '"$P" lab down bmp2vmp >/dev/null' EXIT
"$P" attach --lab bmp2vmp --filter icmp --quiet --json benchmarks/bmp2vmp-attach-lab.json \
  -- "$P" lab exec bmp2vmp vm1:pod-b -- ping -q -c 100 -i 0.05 198.18.0.2 \
  > benchmarks/bmp2vmp-attach-lab.txt
