#!/bin/bash
# What a kube-proxy Service adds on the bridge lab, one host: the same UDP 64 B run (2000
# exchanges at 1000/s) to pod-b's own address, then to the ClusterIP of a Service in iptables
# mode and in nftables mode (lab up bridge --service MODE). br_netfilter runs the DNAT from the
# bridge's PREROUTING: through a Service, the bridge segment is split around it by the netfilter
# programs ("nat prerouting br0 (host)", "nat postrouting veth-a (host)"). Writes
# benchmarks/service-bridge.txt. Run as root: bash benchmarks/service-bridge.sh
set -euo pipefail
P=${PROFILER:-target/release/profiler}
OUT=benchmarks/service-bridge.txt
: > "$OUT"
for mode in none iptables nftables; do
  if [ "$mode" = none ]; then "$P" lab up bridge > /dev/null
  else "$P" lab up bridge --service "$mode" > /dev/null; fi
  { echo "=== $mode: $P run --lab bridge --count 2000 --rate 1000 --quiet"
    "$P" run --lab bridge --count 2000 --rate 1000 --quiet; echo; } >> "$OUT"
  "$P" lab down bridge > /dev/null
done
