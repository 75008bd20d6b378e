//! A route-netlink connection bound to one network namespace, with the few link and address
//! operations the labs need.
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;

use anyhow::{anyhow, bail, Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    BridgeStpState, IpVlanMode, LinkAttribute, LinkInfo, LinkMessage, LinkVfInfo, MacVlanMode,
    VfInfo, VfInfoMac,
};
use rtnetlink::packet_route::neighbour::NeighbourFlags;
use rtnetlink::packet_route::nsid::{NsidAttribute, NsidMessage};
use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcOption};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{
    Handle, LinkBridge, LinkGeneve, LinkIpVlan, LinkMacVlan, LinkUnspec, LinkVeth, LinkVlan,
    LinkVxlan, RouteMessageBuilder,
};

use super::netns;
use super::spec::ChildKind;

/// Runs `f` with a connection in `ns` on a thread of its own, with a runtime of its own: for
/// callers that cannot await (Drop), possibly on a thread of another runtime.
pub(super) fn blocking<T, F, Fut>(ns: Option<String>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Nl) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async { f(Nl::open(ns.as_deref())?).await })
    })
    .join()
    .map_err(|_| anyhow!("a netlink thread panicked"))?
}

pub(super) struct Nl {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
    /// For error messages.
    ns: String,
}

impl Drop for Nl {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Nl {
    /// Connects inside netns `ns` (None: the caller's). The socket is opened on a thread that
    /// joined the namespace, so every request on it acts there; the connection itself is then
    /// driven by the current tokio runtime like any other.
    pub fn open(ns: Option<&str>) -> Result<Nl> {
        let label = ns.map_or_else(
            || "the current network namespace".into(),
            |n| format!("network namespace {n}"),
        );
        let rt =
            tokio::runtime::Handle::try_current().context("lab netlink needs a tokio runtime")?;
        let (conn, handle, _) = netns::run_in(ns, || {
            // TokioSocket registers with the reactor of the runtime entered here.
            let _rt = rt.enter();
            rtnetlink::new_connection().context("cannot open a route netlink socket")
        })
        .with_context(|| format!("cannot connect to netlink in {label}"))?;
        Ok(Nl {
            handle,
            conn: rt.spawn(conn),
            ns: label,
        })
    }

    pub async fn index(&self, name: &str) -> Result<u32> {
        Ok(self.index_mtu(name).await?.0)
    }

    /// The link of that name.
    async fn link(&self, name: &str) -> Result<LinkMessage> {
        self.handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await
            .with_context(|| format!("cannot find interface {name} in {}", self.ns))?
            .ok_or_else(|| anyhow!("no interface {name} in {}", self.ns))
    }

    /// The link's ifindex and MAC address.
    pub async fn index_mac(&self, name: &str) -> Result<(u32, [u8; 6])> {
        let link = self.link(name).await?;
        let mac = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
            _ => None,
        });
        let mac = mac.ok_or_else(|| anyhow!("{name} in {} has no MAC address", self.ns))?;
        Ok((link.header.index, mac))
    }

    /// The link's ifindex and MTU.
    pub async fn index_mtu(&self, name: &str) -> Result<(u32, u32)> {
        let link = self.link(name).await?;
        let mtu = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        Ok((link.header.index, mtu.unwrap_or(0)))
    }

    /// The id the namespace of file `other` (/run/netns/NAME, /proc/thread-self/ns/net) has in
    /// this one (RTM_GETNSID), as a device's IFLA_LINK_NETNSID names it; None: it has none.
    pub async fn nsid_of(&self, other: &std::fs::File) -> Result<Option<i32>> {
        let mut msg = NsidMessage::default();
        msg.attributes
            .push(NsidAttribute::Fd(other.as_raw_fd() as u32));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut replies = (self.handle.clone().request(req))
            .map_err(|e| anyhow!("RTM_GETNSID in {}: {e}", self.ns))?;
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                    return Ok(m.attributes.iter().find_map(|a| match a {
                        NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                        _ => None,
                    }))
                }
                NetlinkPayload::Error(e) => bail!("RTM_GETNSID in {}: {e}", self.ns),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Every link of the namespace, with what the profiler names hops by.
    pub async fn links(&self) -> Result<Vec<LinkRow>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .with_context(|| format!("cannot list the interfaces of {}", self.ns))?;
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .with_context(|| format!("cannot list the addresses of {}", self.ns))?;
        Ok(msgs.iter().map(|m| LinkRow::of(m, &addrs)).collect())
    }

    /// Creates a link from a full RTM_NEWLINK message; `what` names it for errors.
    async fn add(&self, msg: LinkMessage, what: &str) -> Result<()> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("cannot create {what} in {}", self.ns))
    }

    /// A macvlan (mode bridge), 802.1Q or ipvlan device on `parent`, with ifindex `index`.
    pub async fn add_child(
        &self,
        name: &str,
        parent: u32,
        kind: ChildKind,
        index: u32,
        mtu: Option<u32>,
    ) -> Result<u32> {
        let ipvlan = |mode| with_mtu(LinkIpVlan::new(name, parent, mode).index(index), mtu).build();
        let msg = match kind {
            ChildKind::Macvlan => with_mtu(
                LinkMacVlan::new(name, parent, MacVlanMode::Bridge).index(index),
                mtu,
            )
            .build(),
            ChildKind::Vlan(id) => {
                with_mtu(LinkVlan::new(name, parent, id).index(index), mtu).build()
            }
            ChildKind::IpvlanL2 => ipvlan(IpVlanMode::L2),
            ChildKind::IpvlanL3 => ipvlan(IpVlanMode::L3),
        };
        let what = match kind {
            ChildKind::Vlan(id) => format!("vlan {name} (id {id}) on interface {parent}"),
            kind => format!("{} {name} on interface {parent}", kind.name()),
        };
        self.add(msg, &what).await?;
        self.index(name).await
    }

    /// A Geneve device with a fixed MAC, point to point to `remote`.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_geneve(
        &self,
        name: &str,
        vni: u32,
        port: u16,
        remote: Ipv4Addr,
        mac: [u8; 6],
        mtu: u32,
        index: u32,
    ) -> Result<u32> {
        let msg = LinkGeneve::new(name, vni)
            .remote(remote)
            .port(port)
            .address(mac.to_vec())
            .mtu(mtu)
            .index(index)
            .build();
        self.add(msg, &format!("geneve {name} (vni {vni})")).await?;
        self.index(name).await
    }

    /// A VXLAN device as flannel makes it: fixed MAC, no learning, local VTEP address on `dev`.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_vxlan(
        &self,
        name: &str,
        vni: u32,
        port: u16,
        local: Ipv4Addr,
        dev: Option<u32>,
        mac: [u8; 6],
        mtu: u32,
        index: u32,
    ) -> Result<u32> {
        let mut vxlan = LinkVxlan::new(name, vni).port(port).local(local);
        if let Some(dev) = dev {
            vxlan = vxlan.dev(dev);
        }
        let msg = vxlan
            .learning(false)
            .address(mac.to_vec())
            .mtu(mtu)
            .index(index)
            .build();
        self.add(msg, &format!("vxlan {name} (vni {vni})")).await?;
        self.index(name).await
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.change(msg, || format!("set the MTU of interface {index} to {mtu}"))
            .await
    }

    /// `dst` None: the default route.
    pub async fn add_route(
        &self,
        dst: Option<(Ipv4Addr, u8)>,
        via: Ipv4Addr,
        dev: u32,
        onlink: bool,
    ) -> Result<()> {
        let (net, len) = dst.unwrap_or((Ipv4Addr::UNSPECIFIED, 0));
        let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net, len)
            .gateway(via)
            .output_interface(dev);
        if onlink {
            route = route.onlink();
        }
        self.handle
            .route()
            .add(route.build())
            .execute()
            .await
            .with_context(|| {
                format!(
                    "cannot add route {net}/{len} via {via} dev {dev} in {}",
                    self.ns
                )
            })
    }

    /// A permanent neighbour (ARP) entry.
    pub async fn add_neigh(&self, dev: u32, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        self.handle
            .neighbours()
            .add(dev, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .execute()
            .await
            .with_context(|| {
                format!(
                    "cannot add neighbour {ip} on interface {dev} in {}",
                    self.ns
                )
            })
    }

    /// A permanent FDB entry of the device itself (NTF_SELF), like `bridge fdb append MAC
    /// dst DST dev DEV self permanent`.
    pub async fn add_fdb(&self, dev: u32, mac: [u8; 6], dst: Ipv4Addr) -> Result<()> {
        self.handle
            .neighbours()
            .add_bridge(dev, &mac)
            .flags(NeighbourFlags::Own)
            .destination(IpAddr::V4(dst))
            .execute()
            .await
            .with_context(|| {
                format!(
                    "cannot add fdb entry dst {dst} on interface {dev} in {}",
                    self.ns
                )
            })
    }

    pub async fn add_veth(&self, name: &str, peer: &str) -> Result<()> {
        let msg = LinkVeth::new(name, peer).build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("cannot create veth pair {name}/{peer} in {}", self.ns))
    }

    /// A bridge without STP and with forward delay 0, so ports forward as soon as they are up.
    /// `index` 0 lets the kernel choose the ifindex.
    pub async fn add_bridge(&self, name: &str, index: u32, mtu: Option<u32>) -> Result<u32> {
        let bridge = LinkBridge::new(name)
            .index(index)
            .stp_state(BridgeStpState::Disabled)
            .forward_delay(0);
        let msg = with_mtu(bridge, mtu).build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("cannot create bridge {name} in {}", self.ns))?;
        self.index(name).await
    }

    /// Applies one RTM_NEWLINK change to an existing link; `what` says what failed.
    async fn change(&self, msg: LinkMessage, what: impl FnOnce() -> String) -> Result<()> {
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .with_context(|| format!("cannot {} in {}", what(), self.ns))
    }

    pub async fn move_to(&self, index: u32, ns: &str) -> Result<()> {
        let target = netns::open(ns)?;
        let msg = LinkUnspec::new_with_index(index)
            .setns_by_fd(target.as_raw_fd())
            .build();
        // `target` must stay open until the kernel has resolved the fd, i.e. until the ack.
        self.change(msg, || {
            format!("move interface {index} to network namespace {ns}")
        })
        .await
    }

    /// Whether the link has carrier.
    pub async fn carrier(&self, index: u32) -> Result<bool> {
        let link = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .with_context(|| format!("cannot read interface {index} in {}", self.ns))?
            .ok_or_else(|| anyhow!("no interface {index} in {}", self.ns))?;
        Ok(link
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Carrier(1))))
    }

    /// Has SR-IOV PF `pf` give its VF `vf` the MAC `mac` (`ip link set PF vf N mac M`).
    pub async fn set_vf_mac(&self, pf: u32, vf: u32, mac: [u8; 6]) -> Result<()> {
        let info = LinkVfInfo(vec![VfInfo::Mac(VfInfoMac::new(vf, &mac))]);
        let msg = LinkUnspec::new_with_index(pf)
            .append_extra_attribute(LinkAttribute::VfInfoList(vec![info]))
            .build();
        self.change(msg, || format!("set the MAC of VF {vf} of interface {pf}"))
            .await
    }

    pub async fn rename(&self, index: u32, name: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).name(name).build();
        self.change(msg, || format!("rename interface {index} to {name}"))
            .await
    }

    pub async fn set_master(&self, index: u32, master: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).controller(master).build();
        self.change(msg, || format!("enslave interface {index} to {master}"))
            .await
    }

    pub async fn up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.change(msg, || format!("bring interface {index} up"))
            .await
    }

    pub async fn add_addr(&self, index: u32, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), prefix_len)
            .execute()
            .await
            .with_context(|| {
                format!(
                    "cannot add {addr}/{prefix_len} to interface {index} in {}",
                    self.ns
                )
            })
    }

    /// The names of the BPF programs in the tc filters on the device's ingress (a clsact
    /// qdisc's; tcx programs are not filters).
    pub async fn ingress_bpf_filters(&self, index: u32) -> Result<Vec<String>> {
        let filters: Vec<_> = (self.handle.traffic_filter(index as i32).get().ingress())
            .execute()
            .try_collect()
            .await
            .with_context(|| {
                format!(
                    "cannot list the ingress filters of interface {index} in {}",
                    self.ns
                )
            })?;
        let names = filters.iter().flat_map(|f| &f.attributes).filter_map(|a| {
            let TcAttribute::Options(options) = a else {
                return None;
            };
            options.iter().find_map(|o| match o {
                TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => Some(name.clone()),
                _ => None,
            })
        });
        Ok(names.collect())
    }

    /// Deletes the device's clsact qdisc, and with it every tc filter hanging off it.
    pub async fn del_clsact(&self, index: u32) -> Result<()> {
        let mut req = self.handle.qdisc().del(index as i32);
        let header = &mut req.message_mut().header;
        header.parent = TcHandle::CLSACT;
        header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        req.execute().await.with_context(|| {
            format!(
                "cannot delete the clsact qdisc of interface {index} in {}",
                self.ns
            )
        })
    }

    pub async fn delete(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .with_context(|| format!("cannot delete interface {index} in {}", self.ns))
    }
}

fn with_mtu<T>(
    b: rtnetlink::LinkMessageBuilder<T>,
    mtu: Option<u32>,
) -> rtnetlink::LinkMessageBuilder<T> {
    match mtu {
        Some(m) => b.mtu(m),
        None => b,
    }
}

/// One link as netlink describes it.
pub(super) struct LinkRow {
    pub index: u32,
    pub name: String,
    pub kind: String,
    pub mtu: u32,
    /// IFLA_LINK: a veth's peer or a stacked device's lower device (an ifindex, in another
    /// namespace when `link_nsid` says which: its id in this one, IFLA_LINK_NETNSID).
    pub link: Option<u32>,
    pub link_nsid: Option<i32>,
    pub master: Option<u32>,
    pub addrs: Vec<String>,
}

impl LinkRow {
    fn of(m: &LinkMessage, addrs: &[AddressMessage]) -> LinkRow {
        let mut row = LinkRow {
            index: m.header.index,
            name: String::new(),
            kind: "nic".into(),
            mtu: 0,
            link: None,
            link_nsid: None,
            master: None,
            addrs: Vec::new(),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => row.name = n.clone(),
                LinkAttribute::Mtu(v) => row.mtu = *v,
                LinkAttribute::Link(l) if *l != 0 => row.link = Some(*l),
                LinkAttribute::LinkNetNsId(id) => row.link_nsid = Some(*id),
                LinkAttribute::Controller(c) => row.master = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            row.kind = k.to_string();
                        }
                    }
                }
                _ => {}
            }
        }
        // A device's link to itself is none; a veth whose peer in another namespace happens
        // to have its own ifindex (two namespaces built alike: vmp2vmp's wire0) keeps it.
        if row.link == Some(row.index) && row.link_nsid.is_none() {
            row.link = None;
        }
        row.addrs = addrs
            .iter()
            .filter(|a| a.header.index == m.header.index)
            .filter_map(|a| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(format!("{ip}/{}", a.header.prefix_len)),
                    _ => None,
                })
            })
            .collect();
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(index: u32, attributes: Vec<LinkAttribute>) -> LinkRow {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes = attributes;
        LinkRow::of(&m, &[])
    }

    /// vmp2vmp's wire0: a veth whose peer in the other host namespace has the same ifindex.
    #[test]
    fn a_peer_elsewhere_with_the_same_index_is_kept() {
        let elsewhere = row(
            3,
            vec![LinkAttribute::Link(3), LinkAttribute::LinkNetNsId(0)],
        );
        assert_eq!((elsewhere.link, elsewhere.link_nsid), (Some(3), Some(0)));
        assert_eq!(row(3, vec![LinkAttribute::Link(3)]).link, None);
        assert_eq!(row(3, vec![LinkAttribute::Link(5)]).link, Some(5));
    }
}
