#!/bin/bash
# What Cilium-style eBPF redirection saves against bridge + veth, on one host: `profiler
# compare` of the bridge lab (the baseline) and the ebpf-redirect lab, UDP, 64 and 1400 B,
# 2000 exchanges each at 1000/s. Writes benchmarks/compare-ebpf-redirect.{txt,json}; the labs
# are brought up and down by compare itself. Run as root: bash benchmarks/compare-ebpf-redirect.sh
set -euo pipefail
P=${PROFILER:-target/release/profiler}
"$P" compare --lab bridge,ebpf-redirect --placement same-host --sizes 64,1400 \
  --count 2000 --rate 1000 --quiet --json benchmarks/compare-ebpf-redirect.json \
  > benchmarks/compare-ebpf-redirect.txt
