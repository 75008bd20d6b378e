//! A route-netlink connection bound to one network namespace, with the few link and address
//! operations the labs need.
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;

use anyhow::{anyhow, Context as _, Result};
use futures::TryStreamExt as _;
use rtnetlink::packet_route::link::{BridgeStpState, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth};

use crate::netns;

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
        let link = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await
            .with_context(|| format!("cannot find interface {name} in {}", self.ns))?;
        link.map(|msg| msg.header.index)
            .ok_or_else(|| anyhow!("no interface {name} in {}", self.ns))
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
    pub async fn add_bridge(&self, name: &str, index: u32) -> Result<u32> {
        let msg = LinkBridge::new(name)
            .index(index)
            .stp_state(BridgeStpState::Disabled)
            .forward_delay(0)
            .build();
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

    pub async fn delete(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .with_context(|| format!("cannot delete interface {index} in {}", self.ns))
    }
}
