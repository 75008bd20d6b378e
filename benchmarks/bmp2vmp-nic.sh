#!/bin/bash
# The guest's NIC served two ways on bmp2vmp (--inner bridge, 6.1 guest under TCG): QEMU's own
# virtio-net backend on a tap (`--nic tap`, the default), and a vhost-user port of dpdk-testpmd
# (`--nic vhost-user`, as OVS-DPDK and VPP serve VMs). UDP 64 B, 200 exchanges at 20/s each;
# each run brings its lab up and down. Writes benchmarks/bmp2vmp-nic-{tap,vhost-user}.{json,txt}
# and, from the JSON, the way across each NIC in benchmarks/bmp2vmp-nic.txt.
# Run as root, after `cargo xtask vm --kernel 6.1` provisioned the guest:
#   bash benchmarks/bmp2vmp-nic.sh
set -euo pipefail
P=${PROFILER:-target/release/profiler}
for nic in tap vhost-user; do
  "$P" run --lab bmp2vmp --inner bridge --nic "$nic" --guest-kernel 6.1 --hooks stable \
    --count 200 --rate 20 --timeout 2s --json "benchmarks/bmp2vmp-nic-$nic.json" \
    > "benchmarks/bmp2vmp-nic-$nic.txt"
done
python3 benchmarks/bmp2vmp-nic.py > benchmarks/bmp2vmp-nic.txt
cat benchmarks/bmp2vmp-nic.txt
