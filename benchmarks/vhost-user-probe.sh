#!/bin/bash
# Issue 31 item 3: can a guest's NIC be a vhost-user port here, served by dpdk-testpmd's vhost
# PMD on the host (OVS-DPDK/VPP style), without hugepages? Run on the host as root, after
# `cargo xtask vm --kernel 6.1` has provisioned the guest:
#   bash benchmarks/vhost-user-probe.sh
# It makes namespaces prof-vhu-host (testpmd: net_vhost0 <-> net_af_packet0 on veth vhu-a) and
# prof-vhu-pod (vhu-b, 198.18.210.1/24), boots the 6.1 guest under TCG with its memory a shared
# memfd and its NIC virtio-net on testpmd's socket, pings 198.18.210.1 from the guest
# (198.18.210.2), and writes what QEMU, testpmd and the guest said to
# benchmarks/vhost-user-probe.txt. It removes what it made, also on failure.
set -u
OUT=benchmarks/vhost-user-probe.txt
CACHE=/root/.cache/profiler/vm
DIR=$(mktemp -d /tmp/profiler-vhu.XXXXXX)
HOST=prof-vhu-host
POD=prof-vhu-pod
TESTPMD_PID=
cleanup() {
  [ -n "$TESTPMD_PID" ] && kill "$TESTPMD_PID" 2>/dev/null && wait "$TESTPMD_PID" 2>/dev/null
  ip netns del "$HOST" 2>/dev/null
  ip netns del "$POD" 2>/dev/null
  rm -rf "$DIR" /var/run/dpdk/prof-vhu
}
trap cleanup EXIT INT TERM

exec > >(tee "$OUT") 2>&1
echo "# vhost-user probe, written by benchmarks/vhost-user-probe.sh on $(date -u +%F)"
echo "host kernel $(uname -r); $(qemu-system-x86_64 --version | head -1)"
echo "dpdk-dev $(dpkg-query -W -f '${Version}' dpdk-dev 2>/dev/null || echo unknown)"

ip netns add "$HOST"
ip netns add "$POD"
ip link add vhu-a netns "$HOST" type veth peer name vhu-b netns "$POD"
ip -n "$HOST" link set vhu-a up
ip -n "$POD" addr add 198.18.210.1/24 dev vhu-b
ip -n "$POD" link set vhu-b up

echo
echo "## testpmd: the vhost-user port and an af_packet port on vhu-a, io forwarding"
# testpmd waits for Enter while it forwards: its stdin is a pipe held open until cleanup.
mkfifo "$DIR/stdin"
ip netns exec "$HOST" dpdk-testpmd --no-huge -m 512 --no-pci --file-prefix prof-vhu \
  --vdev "net_vhost0,iface=$DIR/vhu.sock,queues=1" --vdev net_af_packet0,iface=vhu-a \
  -l 0-1 -- --forward-mode=io --auto-start --total-num-mbufs=8192 --stats-period 0 \
  < "$DIR/stdin" > "$DIR/testpmd.log" 2>&1 &
TESTPMD_PID=$!
exec 9> "$DIR/stdin"
for _ in $(seq 50); do [ -S "$DIR/vhu.sock" ] && break; sleep 0.2; done
sed 's/^/  /' "$DIR/testpmd.log"
[ -S "$DIR/vhu.sock" ] || { echo "no vhost-user socket: testpmd did not serve one"; exit 1; }

echo
echo "## the guest: memory a shared memfd, NIC virtio-net on the vhost-user socket"
cat > "$DIR/guest.sh" <<'EOF'
modprobe -q virtio_net
nic=$(for d in /sys/class/net/*; do [ "$(basename "$(readlink -f $d/device/driver)")" = virtio_net ] && basename $d; done | head -1)
echo "guest NIC: ${nic:-none} ($(cat /sys/class/net/$nic/address 2>/dev/null))"
ip addr add 198.18.210.2/24 dev "$nic" && ip link set "$nic" up
sleep 1
ping -c 5 -W 2 198.18.210.1
echo "guest ping exit $?"
ip -s link show "$nic"
EOF
PATH=$CACHE/virtme-ng/bin:$PATH timeout 300 "$CACHE/virtme-ng/bin/vng" --disable-kvm \
  --memory 1G --cpus 1 --run "$CACHE/kernel-6.1/vmlinuz" --cwd / \
  --qemu-opts="-object memory-backend-memfd,id=vhumem,size=1G,share=on -numa node,memdev=vhumem \
-chardev socket,id=vhu,path=$DIR/vhu.sock -netdev vhost-user,id=n0,chardev=vhu \
-device virtio-net-pci,netdev=n0,mac=02:c6:12:d2:00:02" \
  --exec "sh $DIR/guest.sh" 2>&1 | grep -v '^\s*$' | sed 's/^/  /'
echo "  (vng exit ${PIPESTATUS[0]})"

echo
echo "## testpmd's side afterwards"
sed 's/^/  /' "$DIR/testpmd.log" | grep -iv "^  *$" | tail -40
ip -n "$POD" -s link show vhu-b | sed 's/^/  /'
