//! Reading a kernel `struct sk_buff` from a tracepoint, at offsets the loader found in BTF.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use profiler_common::KernelOffsets;

use crate::parse::Packet;

/// mac_header value meaning "not set".
const MAC_UNSET: u16 = 0xffff;

#[inline(always)]
fn read<T>(addr: *const u8) -> Option<T> {
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

pub struct KernelSkb<'a> {
    skb: *const u8,
    off: &'a KernelOffsets,
    /// Start of the Ethernet header: head + mac_header where set (receive side, after
    /// eth_type_trans pulled it), data otherwise (transmit side, where data is at L2).
    l2: *const u8,
}

impl<'a> KernelSkb<'a> {
    #[inline(always)]
    pub fn new(skb: *const u8, off: &'a KernelOffsets) -> Self {
        let at = |o: u32| unsafe { skb.add(o as usize) };
        let head: u64 = read(at(off.skb_head)).unwrap_or(0);
        let mac: u16 = read(at(off.skb_mac_header)).unwrap_or(MAC_UNSET);
        let l2 = if mac != MAC_UNSET {
            (head + mac as u64) as *const u8
        } else {
            read::<u64>(at(off.skb_data)).unwrap_or(0) as *const u8
        };
        KernelSkb { skb, off, l2 }
    }

    #[inline(always)]
    fn field<T>(&self, offset: u32) -> Option<T> {
        read(unsafe { self.skb.add(offset as usize) })
    }

    pub fn len(&self) -> u32 {
        self.field(self.off.skb_len).unwrap_or(0)
    }

    pub fn dev(&self) -> *const u8 {
        self.field::<u64>(self.off.skb_dev).unwrap_or(0) as *const u8
    }

    /// Bytes from the Ethernet header to the end of the linear area.
    #[inline(always)]
    fn linear_from_l2(&self) -> Option<usize> {
        let data: u64 = self.field(self.off.skb_data)?;
        let len: u32 = self.field(self.off.skb_len)?;
        let data_len: u32 = self.field(self.off.skb_data_len)?;
        let headroom = data.checked_sub(self.l2 as u64)? as usize;
        Some(headroom + (len - data_len) as usize)
    }
}

impl Packet for KernelSkb<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if self.l2.is_null() {
            return None;
        }
        // Headers are always linear; only a read that may reach the payload checks the bound.
        if offset + N <= 64 {
            return read(unsafe { self.l2.add(offset) });
        }
        if offset + N <= self.linear_from_l2()? {
            read(unsafe { self.l2.add(offset) })
        } else {
            None
        }
    }

    fn reaches_paged(&self) -> bool {
        false
    }

    fn has_paged_payload(&self, offset: usize) -> bool {
        let data_len: u32 = self.field(self.off.skb_data_len).unwrap_or(0);
        data_len > 0 && self.linear_from_l2().is_some_and(|linear| offset >= linear)
    }
}

/// The device's ifindex and the inode number of its network namespace.
#[inline(always)]
pub fn dev_identity(dev: *const u8, off: &KernelOffsets) -> (u32, u32) {
    if dev.is_null() {
        return (0, 0);
    }
    let ifindex: u32 = read(unsafe { dev.add(off.dev_ifindex as usize) }).unwrap_or(0);
    let net: u64 = read(unsafe { dev.add(off.dev_nd_net as usize) }).unwrap_or(0);
    let netns: u32 = if net == 0 {
        0
    } else {
        read(unsafe { (net as *const u8).add(off.net_ns_inum as usize) }).unwrap_or(0)
    };
    (ifindex, netns)
}
