#!/bin/bash
# What an eBPF datapath saves and what a kube-proxy Service costs, per segment: `profiler
# compare` on one host of the bridge lab (the baseline), the same with a Service in front of
# pod-b in iptables and in nftables mode (bridge+iptables, bridge+nftables), and the
# ebpf-redirect lab; then across two hosts of flannel-vxlan with and without a Service. UDP, 64
# and 1400 B, 2000 exchanges each at 1000/s. Writes benchmarks/compare-services{,-xhost}.{txt,json};
# compare brings the labs up and down itself. Run as root: bash benchmarks/compare-services.sh
set -euo pipefail
P=${PROFILER:-target/release/profiler}
"$P" compare --lab bridge,bridge+iptables,bridge+nftables,ebpf-redirect --placement same-host \
  --sizes 64,1400 --count 2000 --rate 1000 --quiet --json benchmarks/compare-services.json \
  > benchmarks/compare-services.txt
"$P" compare --lab flannel-vxlan,flannel-vxlan+iptables,flannel-vxlan+nftables \
  --placement cross-host --sizes 64,1400 --count 2000 --rate 1000 --quiet \
  --json benchmarks/compare-services-xhost.json > benchmarks/compare-services-xhost.txt
# The request's segments between the two applications' stacks, per network and size (means and
# p50s from the JSON the runs wrote), and their sum: the datapath without the wake-ups, which
# move by microseconds from run to run on a shared machine.
for f in benchmarks/compare-services benchmarks/compare-services-xhost; do
  python3 - "$f.json" > "$f-segments.txt" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
sums = []
for r in c["runs"]:
    d = next(d for d in r["directions"] if d["direction"] == "request")
    inner = d["segments"][1:-1]
    what = f"{r['topology']} at {r['traffic']['size']} B"
    print(f"{what}, request (mean / p50, us):")
    for s in inner:
        print(f"  {s['name']:<52} {s['mean_ns'] / 1e3:6.1f} {s['p50_ns'] / 1e3:6.1f}")
    total = sum(s["mean_ns"] for s in inner) / 1e3
    print(f"  {'between the stacks, sum of the means':<52} {total:6.1f}")
    sums.append(f"{what:<40} {total:6.1f} us")
print("\nbetween the stacks, request, sum of the segments' means:")
print("\n".join(sums))
PY
done
