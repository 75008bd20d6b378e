//! A Kubernetes Service in front of the server pod, as kube-proxy writes it on every node:
//! a virtual ClusterIP and port, DNATed to the pod with conntrack, in iptables mode
//! (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*) or nftables mode (its `ip kube-proxy` table:
//! the service-ips verdict map -> service-* -> endpoint-* chains). The rules live in the lab's
//! host namespaces, so they go with them. On the ebpf-redirect lab the datapath's own program
//! translates instead (`ebpf`, as Cilium's kube-proxy replacement: lab/redirect.rs).
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use super::spec::{netns_name, Route, Spec};
use super::Topology;

/// The Service's virtual address: outside every pod subnet of the labs (198.18.N.0/24 with N
/// below 16), in the project's own range, as a cluster's service CIDR is outside its pods'.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 10);
/// Its port, also the target port on the pod: a run's traffic keeps its port through the NAT.
pub const PORT: u16 = 8080;
/// The Service's namespace/name in the rules' comments and chain names.
const NAME: &str = "profiler/echo";

/// How the Service is implemented: kube-proxy's two modes on Linux, or an eBPF datapath's own
/// translation.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// kube-proxy's iptables mode (bridge, flannel-vxlan)
    Iptables,
    /// kube-proxy's nftables mode (bridge, flannel-vxlan)
    Nftables,
    /// the eBPF datapath's program, as Cilium's kube-proxy replacement (ebpf-redirect)
    Ebpf,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Ebpf => "ebpf",
        }
    }
}

/// A lab's Service: the client sends to `cluster_ip:port`, the NAT sends on to the server pod.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Service {
    pub mode: Mode,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub backend: Ipv4Addr,
    /// The host namespaces with the rules, where the NAT happens.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "Service ({}) {}:{} -> {}:{}",
            self.mode.name(),
            self.cluster_ip,
            self.port,
            self.backend,
            self.port
        )
    }
}

/// Why `topology` cannot have a Service of `mode`, or None.
pub fn refused(topology: Topology, mode: Mode) -> Option<&'static str> {
    let kube_proxy = mode != Mode::Ebpf;
    match topology {
        Topology::Bridge | Topology::FlannelVxlan if kube_proxy => None,
        Topology::EbpfRedirect if !kube_proxy => None,
        Topology::EbpfRedirect => Some(
            "the eBPF datapath's redirects skip the host stack, so kube-proxy's rules would \
             never see the pods' packets (Cilium's eBPF host routing needs its kube-proxy \
             replacement): use --service ebpf",
        ),
        _ if !kube_proxy => Some("--service ebpf is the ebpf-redirect lab's own translation"),
        Topology::Macvlan => Some(
            "macvlan pods cannot reach their host's stack through the parent (macvlan's \
             isolation), so kube-proxy's rules there never see them",
        ),
        _ => Some("Services are built on the bridge, flannel-vxlan and ebpf-redirect labs"),
    }
}

/// What the Service needs of the lab's spec: every pod a default route, through its host's
/// bridge (a pod of the same-host bridge lab has none: docker0's pods do), and forwarding in
/// the hosts (the DNATed packet is routed back out of the bridge). An eBPF datapath forwards
/// nothing through the host stack: its pods' route is an onlink gateway that exists only as
/// a neighbour (Cilium's cilium_host address, the subnet's .254 here; redirect.rs pins it).
pub(super) fn prepare(spec: &mut Spec, mode: Mode) {
    for &((role, ifname), host) in &spec.pods.clone() {
        let routed = spec
            .routes
            .iter()
            .any(|r| r.role == role && r.dst.is_none());
        let gateway = match mode {
            Mode::Ebpf => spec
                .addr_of((role, ifname))
                .map(|(a, _)| (Ipv4Addr::from(u32::from(a) & !0xff | 0xfe), true)),
            _ => (spec.bridges.iter())
                .find(|b| b.at.0 == host)
                .map(|b| (b.addr.0, false)),
        };
        if let (false, Some((via, onlink))) = (routed, gateway) {
            spec.routes.push(Route {
                role,
                dst: None,
                via,
                dev: ifname,
                onlink,
            });
        }
        if mode != Mode::Ebpf && !spec.forwarding.contains(&host) {
            spec.forwarding.push(host);
        }
    }
}

/// The Service of `mode` in front of the spec's server. kube-proxy's modes: its rules in every
/// host namespace of lab `lab`, as kube-proxy writes them on every node (the client's node
/// translates). `ebpf`: no rules; the lab's program translates (redirect.rs fills its table).
pub(super) fn install(lab: &str, spec: &Spec, mode: Mode) -> Result<Service> {
    let mut hosts: Vec<&str> = spec.pods.iter().map(|(_, h)| *h).collect();
    hosts.sort();
    hosts.dedup();
    let backend = (spec.addr_of(spec.server)).context("the server has no address")?;
    let mut svc = Service {
        mode,
        cluster_ip: CLUSTER_IP,
        port: PORT,
        backend: backend.0,
        namespaces: Vec::new(),
    };
    let Some((program, rules)) = kube_proxy_rules(&svc) else {
        return Ok(svc);
    };
    svc.namespaces = hosts.iter().map(|h| netns_name(lab, h)).collect();
    for ns in &svc.namespaces {
        bridged_through_netfilter(ns)?;
        load(ns, &svc, program, &rules)?;
    }
    pin_neighbours(lab, spec)?;
    Ok(svc)
}

/// The program that loads kube-proxy's rules for `svc` (from Debian's iptables or nftables
/// package), its arguments and the rules; None for the eBPF datapath's translation.
fn kube_proxy_rules(svc: &Service) -> Option<(Loader, String)> {
    match svc.mode {
        Mode::Iptables => Some((("iptables-restore", &[]), iptables_rules(svc))),
        Mode::Nftables => Some((("nft", &["-f", "-"]), nftables_rules(svc))),
        Mode::Ebpf => None,
    }
}

/// Bridged frames through netfilter's IPv4 hooks in namespace `ns` (br_netfilter's
/// bridge-nf-call-iptables), as kube-proxy requires: a reply from the pod to a client on its
/// bridge is bridged, and without them conntrack never undoes its DNAT (the client drops a
/// reply from the pod's own address). Debian builds br_netfilter as a module.
fn bridged_through_netfilter(ns: &str) -> Result<()> {
    const SYSCTL: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    if !std::path::Path::new(SYSCTL).exists() {
        let _ = Command::new("modprobe")
            .args(["-q", "br_netfilter"])
            .status();
    }
    if !std::path::Path::new(SYSCTL).exists() {
        bail!(super::Lacks::Module("br_netfilter"));
    }
    super::netns::run_in(Some(ns), || {
        std::fs::write(SYSCTL, "1").with_context(|| format!("cannot write {SYSCTL}"))
    })
    .with_context(|| format!("cannot pass bridged frames to iptables in {ns}"))
}

/// Every pod a permanent neighbour of its host's bridge. After a DNAT, br_netfilter bridges
/// the frame straight on while the host's entry for the new destination is reachable, and
/// sends it out of the bridge device through the neighbour's output once the entry goes stale
/// (every 15-45 s, since routed traffic does not confirm it): two paths, both named, that
/// would alternate from run to run. A lab keeps to the first, as a node whose entries are
/// fresh does.
fn pin_neighbours(lab: &str, spec: &Spec) -> Result<()> {
    for &(at, host) in &spec.pods {
        let Some(bridge) = spec.bridges.iter().find(|b| b.at.0 == host) else {
            continue;
        };
        let addr = spec.addr_of(at).context("a pod without an address")?.0;
        let link = ip(&["-n", &netns_name(lab, at.0), "-br", "link", "show", at.1])?;
        let mac = (link.split_whitespace().nth(2)).context("no MAC in `ip -br link`")?;
        let (ns, dev, addr) = (netns_name(lab, host), bridge.at.1, addr.to_string());
        ip(&[
            "-n",
            &ns,
            "neigh",
            "replace",
            &addr,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

/// `ip ARGS`'s output, or its error in one line.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A program that reads rules on its standard input, and its arguments.
type Loader = (&'static str, &'static [&'static str]);

fn load(ns: &str, svc: &Service, (program, args): Loader, rules: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {program} (Debian's {} package)",
                svc.mode.name()
            )
        })?;
    child
        .stdin
        .take()
        .context("the rules' pipe")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} in {ns} refused the Service's rules: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The per-protocol suffix kube-proxy's chain names carry: a hash of the service port's name;
/// here the name itself, shorter than iptables' 28-character limit.
fn chain_id(proto: &str) -> String {
    format!("PROFILER-ECHO-{}", proto.to_uppercase())
}

/// kube-proxy's iptables mode for one endpoint, UDP and TCP: the nat table's portal chains,
/// the hairpin mark and the masquerade of marked packets.
fn iptables_rules(svc: &Service) -> String {
    let (vip, port, pod) = (svc.cluster_ip, svc.port, svc.backend);
    let mut r = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for proto in ["udp", "tcp"] {
        let id = chain_id(proto);
        r += &format!(":KUBE-SVC-{id} - [0:0]\n:KUBE-SEP-{id} - [0:0]\n");
    }
    r += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
          -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
          -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
          -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
          -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
          -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
          -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n";
    for proto in ["udp", "tcp"] {
        let id = chain_id(proto);
        r += &format!(
            "-A KUBE-SERVICES -d {vip}/32 -p {proto} -m comment --comment \"{NAME}:{proto} cluster IP\" -m {proto} --dport {port} -j KUBE-SVC-{id}\n\
             -A KUBE-SVC-{id} -m comment --comment \"{NAME}:{proto} -> {pod}:{port}\" -j KUBE-SEP-{id}\n\
             -A KUBE-SEP-{id} -s {pod}/32 -m comment --comment \"{NAME}:{proto}\" -j KUBE-MARK-MASQ\n\
             -A KUBE-SEP-{id} -p {proto} -m comment --comment \"{NAME}:{proto}\" -m {proto} -j DNAT --to-destination {pod}:{port}\n"
        );
    }
    r + "COMMIT\n"
}

/// kube-proxy's nftables mode for one endpoint, UDP and TCP: its table, the service-ips map
/// from address, protocol and port to the service's chain, one endpoint chain each.
fn nftables_rules(svc: &Service) -> String {
    let (vip, port, pod) = (svc.cluster_ip, svc.port, svc.backend);
    let mut elements = Vec::new();
    let mut chains = String::new();
    for proto in ["udp", "tcp"] {
        let id = chain_id(proto).to_lowercase();
        elements.push(format!("{vip} . {proto} . {port} : goto service-{id}"));
        chains += &format!(
            "  chain service-{id} {{\n    numgen random mod 1 vmap {{ 0 : goto endpoint-{id} }}\n  }}\n\
             \x20 chain endpoint-{id} {{\n    ip saddr {pod} jump mark-for-masquerade\n    meta l4proto {proto} dnat to {pod}:{port}\n  }}\n"
        );
    }
    format!(
        "table ip kube-proxy {{\n  comment \"rules for kube-proxy\"\n\
         \x20 chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}\n\
         \x20 chain nat-output {{\n    type nat hook output priority -100; policy accept;\n    jump services\n  }}\n\
         \x20 chain nat-postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    jump masquerading\n  }}\n\
         \x20 chain mark-for-masquerade {{\n    meta mark set meta mark or 0x4000\n  }}\n\
         \x20 chain masquerading {{\n    meta mark & 0x4000 == 0 return\n    meta mark set meta mark xor 0x4000\n    masquerade fully-random\n  }}\n\
         \x20 map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"\n    elements = {{ {} }}\n  }}\n\
         \x20 chain services {{\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n\
         {chains}}}\n",
        elements.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(mode: Mode) -> Service {
        Service {
            mode,
            cluster_ip: CLUSTER_IP,
            port: PORT,
            backend: Ipv4Addr::new(198, 18, 0, 2),
            namespaces: Vec::new(),
        }
    }

    #[test]
    fn each_mode_goes_where_its_translator_sees_the_packets() {
        for (topology, mode, ok) in [
            (Topology::Bridge, Mode::Iptables, true),
            (Topology::FlannelVxlan, Mode::Nftables, true),
            (Topology::EbpfRedirect, Mode::Ebpf, true),
            (Topology::EbpfRedirect, Mode::Iptables, false),
            (Topology::Bridge, Mode::Ebpf, false),
            (Topology::Macvlan, Mode::Nftables, false),
        ] {
            assert_eq!(
                refused(topology, mode).is_none(),
                ok,
                "{topology:?} {mode:?}"
            );
        }
    }

    #[test]
    fn an_ebpf_service_routes_pods_by_a_neighbour_and_forwards_nothing() {
        use super::super::{spec::Spec, Placement};
        let mut spec = Spec::of(Topology::EbpfRedirect, Placement::SameHost, None).unwrap();
        prepare(&mut spec, Mode::Ebpf);
        let defaults: Vec<_> = (spec.routes.iter())
            .filter(|r| r.dst.is_none())
            .map(|r| (r.role, r.via, r.onlink))
            .collect();
        let gw = Ipv4Addr::new(198, 18, 0, 254);
        assert_eq!(defaults, [("pod-a", gw, true), ("pod-b", gw, true)]);
        assert!(spec.forwarding.is_empty(), "{:?}", spec.forwarding);
    }

    #[test]
    fn iptables_rules_have_kube_proxys_chains() {
        let r = iptables_rules(&svc(Mode::Iptables));
        assert!(r.starts_with("*nat\n") && r.ends_with("COMMIT\n"), "{r}");
        for line in [
            "-A KUBE-SERVICES -d 198.18.250.10/32 -p udp",
            "-j KUBE-SVC-PROFILER-ECHO-UDP",
            "-A KUBE-SVC-PROFILER-ECHO-TCP -m comment",
            "-j DNAT --to-destination 198.18.0.2:8080",
        ] {
            assert!(r.contains(line), "no {line} in\n{r}");
        }
    }

    #[test]
    fn nftables_rules_map_the_service_to_its_endpoint() {
        let r = nftables_rules(&svc(Mode::Nftables));
        for line in [
            "table ip kube-proxy {",
            "198.18.250.10 . udp . 8080 : goto service-profiler-echo-udp",
            "meta l4proto tcp dnat to 198.18.0.2:8080",
        ] {
            assert!(r.contains(line), "no {line} in\n{r}");
        }
        assert_eq!(r.matches('{').count(), r.matches('}').count(), "{r}");
    }
}
