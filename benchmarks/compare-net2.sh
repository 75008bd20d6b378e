#!/bin/bash
# One pair of pods over two networks, as Multus gives pods a second interface: the
# flannel-vxlan lab across two hosts with each pod's net1 on macvlan (`--net2 macvlan`),
# profiled over eth0 (the baseline: cni0, flannel.1, VXLAN on the wire) and over net1 (macvlan
# children of each host's wire0), UDP, 64 and 1400 B, 2000 exchanges each at 1000/s.
# Writes benchmarks/compare-net2.{txt,json} and compare-net2-segments.txt; the lab is
# brought up and down by compare itself.
# Run as root: bash benchmarks/compare-net2.sh
set -euo pipefail
P=${PROFILER:-target/release/profiler}
"$P" compare --lab flannel-vxlan --placement cross-host --net2 macvlan --iface eth0,net1 \
  --sizes 64,1400 --count 2000 --rate 1000 --quiet --json benchmarks/compare-net2.json \
  > benchmarks/compare-net2.txt
# The request's segments between the two applications' stacks, and their sum (segments.py).
python3 benchmarks/segments.py benchmarks/compare-net2.json > benchmarks/compare-net2-segments.txt
