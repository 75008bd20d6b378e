//! Reading a kernel `struct sk_buff` from a tracepoint, at offsets the loader found in BTF.
//!
//! Helper calls dominate a program's cost, so reads are arranged to need few of them:
//! tp_btf programs load sk_buff and net_device fields directly (their pointers are BTF-typed, so
//! the verifier turns the loads into inline fault-safe loads), and the packet's first 128 bytes,
//! enough for Ethernet, VLAN, IP and L4 ports (outer and inner), come in one
//! `bpf_probe_read_kernel`.

use core::marker::PhantomData;

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::map, maps::PerCpuArray};

use crate::{parse::Packet, OFFSETS};

/// mac_header value meaning "not set".
const MAC_UNSET: u16 = 0xffff;
/// Bytes of the packet read at once: every header the parser needs, through a VXLAN or Geneve
/// encapsulation too, and a UDP tag of a plain IPv4 packet.
const HEAD: usize = 128;

/// The header bytes, per CPU: too large for the 512-byte BPF stack beside two parse contexts.
/// Larger than HEAD so that a read at a masked offset below HEAD is provably inside the value.
#[map]
static HEADERS: PerCpuArray<[u8; HEAD + 64]> = PerCpuArray::with_max_entries(1, 0);

/// Reads a member of `OFFSETS` as the verifier sees it: a constant of the frozen .rodata map.
macro_rules! offset {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&OFFSETS.$field) as usize }
    };
}

#[inline(always)]
fn probe<T>(addr: *const u8) -> Option<T> {
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// How kernel struct members are read.
pub trait KernelMem {
    fn load<T: Copy>(base: *const u8, offset: usize) -> Option<T>;
    /// A pointer member as a number that can be hashed (attach mode's table slots).
    fn number(pointer: u64) -> u64;
}

/// Per CPU, where a pointer becomes a number: the verifier allows no arithmetic on a pointer
/// loaded through a BTF type, but what is loaded from a map value is a plain number. (The
/// lookup of a per-CPU array is inlined on 6.10 and later.)
#[map]
static NUMBER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// tp_btf: BTF-typed pointers, loaded from directly.
pub struct Direct;
/// raw_tp: plain addresses, read through bpf_probe_read_kernel.
pub struct Probed;

impl KernelMem for Direct {
    #[inline(always)]
    fn load<T: Copy>(base: *const u8, offset: usize) -> Option<T> {
        if base.is_null() {
            return None;
        }
        Some(unsafe { core::ptr::read_volatile(base.add(offset) as *const T) })
    }

    #[inline(always)]
    fn number(pointer: u64) -> u64 {
        // Only an interrupt between the two accesses whose handler runs one of these programs
        // could change the value in between: the packet would then miss its journey's slot.
        NUMBER.get_ptr_mut(0).map_or(0, |n| unsafe {
            core::ptr::write_volatile(n, pointer);
            core::ptr::read_volatile(n)
        })
    }
}

impl KernelMem for Probed {
    #[inline(always)]
    fn load<T: Copy>(base: *const u8, offset: usize) -> Option<T> {
        probe(unsafe { base.add(offset) })
    }

    #[inline(always)]
    fn number(pointer: u64) -> u64 {
        // Read through bpf_probe_read_kernel, it is a number already.
        pointer
    }
}

pub struct KernelSkb<M> {
    skb: *const u8,
    /// Start of the Ethernet header: head + mac_header where set (receive side, after
    /// eth_type_trans pulled it), data otherwise (transmit side, where data is at L2).
    l2: *const u8,
    /// The first HEAD bytes from l2, in HEADERS; None where the read failed.
    head: Option<*const [u8; HEAD + 64]>,
    mem: PhantomData<M>,
}

impl<M: KernelMem> KernelSkb<M> {
    #[inline(always)]
    pub fn new(skb: *const u8) -> Self {
        let head: u64 = M::load(skb, offset!(skb_head)).unwrap_or(0);
        let mac: u16 = M::load(skb, offset!(skb_mac_header)).unwrap_or(MAC_UNSET);
        let l2 = if mac != MAC_UNSET {
            (head + mac as u64) as *const u8
        } else {
            M::load::<u64>(skb, offset!(skb_data)).unwrap_or(0) as *const u8
        };
        let head = HEADERS.get_ptr_mut(0).filter(|buf| {
            let buf: &mut [u8; HEAD + 64] = unsafe { &mut **buf };
            let buf = &mut buf[..HEAD];
            !l2.is_null()
                && unsafe { aya_ebpf::helpers::bpf_probe_read_kernel_buf(l2, buf) }.is_ok()
        });
        KernelSkb {
            skb,
            l2,
            head: head.map(|b| b as *const _),
            mem: PhantomData,
        }
    }

    pub fn len(&self) -> u32 {
        len::<M>(self.skb)
    }

    /// Whether the headers could be read (nothing can be parsed otherwise).
    #[inline(always)]
    pub fn readable(&self) -> bool {
        self.head.is_some()
    }

    pub fn dev(&self) -> *const u8 {
        dev::<M>(self.skb)
    }

    /// Bytes from the Ethernet header to the end of the linear area.
    #[inline(always)]
    fn linear_from_l2(&self) -> Option<usize> {
        let data: u64 = M::load(self.skb, offset!(skb_data))?;
        let len: u32 = M::load(self.skb, offset!(skb_len))?;
        let data_len: u32 = M::load(self.skb, offset!(skb_data_len))?;
        let headroom = data.checked_sub(self.l2 as u64)? as usize;
        Some(headroom + (len - data_len) as usize)
    }
}

impl<M: KernelMem> Packet for KernelSkb<M> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if offset + N <= HEAD {
            let head = self.head? as *const u8;
            // offset < HEAD is already known, but LLVM would drop a plain mask as redundant and
            // the verifier would not see the bound: the volatile read keeps the mask in.
            let at = unsafe { core::ptr::read_volatile(&offset) } & (HEAD - 1);
            // A byte copy: a by-value load of [u8; 20] or [u8; 40] becomes a wide integer load
            // that the BPF backend lowers into arithmetic on the pointer, which the verifier refuses.
            let mut out = [0u8; N];
            unsafe { core::ptr::copy_nonoverlapping(head.add(at), out.as_mut_ptr(), N) };
            return Some(out);
        }
        // Past the headers: the payload may end the linear area, so check before reading.
        if offset + N <= self.linear_from_l2()? {
            probe(unsafe { self.l2.add(offset) })
        } else {
            None
        }
    }

    fn reaches_paged(&self) -> bool {
        false
    }

    fn has_paged_payload(&self, offset: usize) -> bool {
        let data_len: u32 = M::load(self.skb, offset!(skb_data_len)).unwrap_or(0);
        data_len > 0 && self.linear_from_l2().is_some_and(|linear| offset >= linear)
    }
}

/// The skb's data buffer: the packet's identity in attach mode.
#[inline(always)]
pub fn head<M: KernelMem>(skb: *const u8) -> u64 {
    M::number(M::load(skb, offset!(skb_head)).unwrap_or(0))
}

/// skb->len, without reading the packet.
#[inline(always)]
pub fn len<M: KernelMem>(skb: *const u8) -> u32 {
    M::load(skb, offset!(skb_len)).unwrap_or(0)
}

/// What the skb carries: its EtherType (network byte order) and, for IPv4 and IPv6, the
/// protocol byte of the network header (0 where there is none or it cannot be read). Read only
/// for dropped packets, so through bpf_probe_read_kernel alike for both program kinds.
#[inline(always)]
pub fn protocols<M: KernelMem>(skb: *const u8) -> (u16, u8) {
    let ethertype: u16 = M::load(skb, offset!(skb_protocol)).unwrap_or(0);
    let at = match u16::from_be(ethertype) {
        0x0800 => 9,
        0x86dd => 6,
        _ => return (ethertype, 0),
    };
    let head = head::<M>(skb);
    let network: u16 = M::load(skb, offset!(skb_network_header)).unwrap_or(0);
    let proto = probe::<u8>((head + network as u64 + at) as *const u8).unwrap_or(0);
    (ethertype, proto)
}

/// The device the skb is on.
#[inline(always)]
pub fn dev<M: KernelMem>(skb: *const u8) -> *const u8 {
    M::load::<u64>(skb, offset!(skb_dev)).unwrap_or(0) as *const u8
}

/// The cgroup (v2) id of the socket that sent the skb, 0 without a socket.
#[inline(always)]
pub fn cgroup_id<M: KernelMem>(skb: *const u8) -> u64 {
    let sk = M::load::<u64>(skb, offset!(skb_sk)).unwrap_or(0) as *const u8;
    let cgroup = M::load::<u64>(sk, offset!(sk_cgroup)).unwrap_or(0) as *const u8;
    let kn = M::load::<u64>(cgroup, offset!(cgroup_kn)).unwrap_or(0) as *const u8;
    M::load(kn, offset!(kn_id)).unwrap_or(0)
}

/// The device's ifindex and the inode number of its network namespace.
#[inline(always)]
pub fn dev_identity<M: KernelMem>(dev: *const u8) -> (u32, u32) {
    let ifindex: u32 = M::load(dev, offset!(dev_ifindex)).unwrap_or(0);
    let net = M::load::<u64>(dev, offset!(dev_nd_net)).unwrap_or(0) as *const u8;
    let netns: u32 = M::load(net, offset!(net_ns_inum)).unwrap_or(0);
    (ifindex, netns)
}
