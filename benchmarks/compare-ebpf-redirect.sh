#!/bin/bash
# What Cilium-style eBPF redirection saves against bridge + veth: `profiler compare` of the
# bridge lab (the baseline) and the ebpf-redirect lab, UDP, 64 and 1400 B, 2000 exchanges each
# at 1000/s, on one host (bpf_redirect_peer against the bridge) and across two (host-gw's
# routing through cni0 against bpf_redirect_neigh out of wire0 and bpf_redirect_peer in).
# Writes benchmarks/compare-ebpf-redirect{,-xhost}.{txt,json} and their -segments.txt;
# the labs are brought up and down by compare itself.
# Run as root: bash benchmarks/compare-ebpf-redirect.sh
set -euo pipefail
P=${PROFILER:-target/release/profiler}
"$P" compare --lab bridge,ebpf-redirect --placement same-host --sizes 64,1400 \
  --count 2000 --rate 1000 --quiet --json benchmarks/compare-ebpf-redirect.json \
  > benchmarks/compare-ebpf-redirect.txt
"$P" compare --lab bridge,ebpf-redirect --placement cross-host --sizes 64,1400 \
  --count 2000 --rate 1000 --quiet --json benchmarks/compare-ebpf-redirect-xhost.json \
  > benchmarks/compare-ebpf-redirect-xhost.txt
# The request's segments between the two applications' stacks, and their sum (segments.py).
for f in benchmarks/compare-ebpf-redirect benchmarks/compare-ebpf-redirect-xhost; do
  python3 benchmarks/segments.py "$f.json" > "$f-segments.txt"
done
