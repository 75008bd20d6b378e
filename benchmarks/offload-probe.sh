#!/bin/bash
# Issue 31 item 4: does any NIC this machine can give a guest take TC flower rules in hardware
# (skip_sw, in_hw) and forward by them? Run on the host as root:
#   bash benchmarks/offload-probe.sh
# It boots the VM lab's 6.1 guest with its two emulated igb NICs (cargo xtask vm --nic igb),
# asks each kind of NIC there, and writes what the kernel answered to
# benchmarks/offload-probe.txt. Everything it makes lives and dies with the guest.
set -u
if [ "${1:-}" != --in-guest ]; then
  set -o pipefail
  cargo xtask vm --kernel 6.1 --nic igb -- bash benchmarks/offload-probe.sh --in-guest \
    | sed -n '/^# offload probe/,$p' > benchmarks/offload-probe.txt
  exit $?
fi

echo "# offload probe: kernel $(uname -r), written by benchmarks/offload-probe.sh"
run() {
  echo "\$ $*"
  "$@" 2>&1 | sed 's/^/  /'
  echo "  (exit ${PIPESTATUS[0]})"
}
driver() { basename "$(readlink -f "/sys/class/net/$1/device/driver" 2>/dev/null)" 2>/dev/null; }

echo
echo "## The guest's NICs (devices with a driver)"
for d in /sys/class/net/*; do
  n=$(basename "$d")
  [ -n "$(driver "$n")" ] && echo "$n: $(driver "$n")"
done
run modprobe netdevsim
run modprobe cls_flower
run modprobe act_mirred

pfs=()
for d in /sys/class/net/*; do
  n=$(basename "$d")
  [ "$(driver "$n")" = igb ] && pfs+=("$n")
done
virtio=
for d in /sys/class/net/*; do
  n=$(basename "$d")
  [ "$(driver "$n")" = virtio_net ] && virtio=$n && break
done

# A NIC's answer to the features and rules an offloading datapath needs.
probe() {
  local dev=$1 other=$2
  echo
  echo "## $dev ($(driver "$dev"))"
  run ip link set "$dev" up
  run sh -c "ethtool -k $dev | grep -E 'hw-tc-offload|udp_tnl|l2-fwd-offload'"
  run ethtool -K "$dev" hw-tc-offload on
  run tc qdisc add dev "$dev" clsact
  echo "# a forwarding rule, in hardware only"
  run tc filter add dev "$dev" ingress protocol ip pref 10 flower skip_sw \
    dst_ip 198.18.9.9 action mirred egress redirect dev "$other"
  echo "# a drop, in hardware only"
  run tc filter add dev "$dev" ingress protocol ip pref 20 flower skip_sw \
    dst_ip 198.18.9.9 action drop
  echo "# steering to a receive queue (traffic class 1), in hardware only"
  run tc filter add dev "$dev" ingress protocol 802.1Q pref 30 flower skip_sw \
    vlan_prio 3 hw_tc 1
  run tc filter show dev "$dev" ingress
  run tc qdisc del dev "$dev" clsact
}

if [ ${#pfs[@]} -ge 2 ]; then
  probe "${pfs[0]}" "${pfs[1]}"
fi
if [ -n "$virtio" ]; then probe "$virtio" "${pfs[0]:-lo}"; fi

echo
echo "## SR-IOV switchdev"
run devlink dev show
if [ ${#pfs[@]} -ge 1 ]; then
  pci=$(basename "$(readlink -f "/sys/class/net/${pfs[0]}/device")")
  run devlink dev eswitch show "pci/$pci"
  run sh -c "echo 2 > /sys/class/net/${pfs[0]}/device/sriov_numvfs"
  run devlink dev eswitch set "pci/$pci" mode switchdev
  run sh -c "echo 0 > /sys/class/net/${pfs[0]}/device/sriov_numvfs"
fi
