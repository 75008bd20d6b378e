#!/bin/bash
# What an eBPF datapath saves and what a kube-proxy Service costs, per segment: `profiler
# compare` on one host of the bridge lab (the baseline), the same with a Service in front of
# pod-b in iptables and in nftables mode (bridge+iptables, bridge+nftables), and the
# ebpf-redirect lab without and with its own Service translation (ebpf-redirect+ebpf); then across two hosts of flannel-vxlan with and without a Service. UDP, 64
# and 1400 B, 2000 exchanges each at 1000/s. Writes benchmarks/compare-services{,-xhost}.{txt,json};
# compare brings the labs up and down itself. Run as root: bash benchmarks/compare-services.sh
set -euo pipefail
P=${PROFILER:-target/release/profiler}
"$P" compare --lab bridge,bridge+iptables,bridge+nftables,ebpf-redirect,ebpf-redirect+ebpf --placement same-host \
  --sizes 64,1400 --count 2000 --rate 1000 --quiet --json benchmarks/compare-services.json \
  > benchmarks/compare-services.txt
"$P" compare --lab flannel-vxlan,flannel-vxlan+iptables,flannel-vxlan+nftables \
  --placement cross-host --sizes 64,1400 --count 2000 --rate 1000 --quiet \
  --json benchmarks/compare-services-xhost.json > benchmarks/compare-services-xhost.txt
# The request's segments between the two applications' stacks, and their sum (segments.py).
for f in benchmarks/compare-services benchmarks/compare-services-xhost; do
  python3 benchmarks/segments.py "$f.json" > "$f-segments.txt"
done
