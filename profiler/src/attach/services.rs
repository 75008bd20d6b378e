//! The Services a node translates, read from kube-proxy's rules where the scope's packets meet
//! them (the root namespace, the targets', and those of their veths' other ends): each virtual
//! address and port, and the backends its DNAT sends to. attach uses them so that a filter on
//! either side of the NAT matches the packet on both, and links its netfilter programs around
//! the NAT where there are Services.
//!
//! iptables mode: `-A CHAIN -d VIP/32 ... --dport PORT -j KUBE-SVC-*`, followed through the
//! chains it jumps to down to `-j DNAT --to-destination ADDR:PORT`. nftables mode (kube-proxy's
//! `ip kube-proxy` table): the service-ips map's `VIP . PROTO . PORT : goto CHAIN` elements,
//! followed through `goto`/`jump` down to `dnat to ADDR:PORT`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::lab::{discover::ns_arg, netns};

/// One Service port as a node's NAT translates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Translation {
    pub vip: IpAddr,
    pub proto: String,
    pub port: u16,
    pub backends: Vec<SocketAddr>,
}

impl std::fmt::Display for Translation {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let backends: Vec<String> = self.backends.iter().map(|b| b.to_string()).collect();
        write!(
            f,
            "{}:{}/{} -> {}",
            self.vip,
            self.port,
            self.proto,
            backends.join(", ")
        )
    }
}

/// The Services translated in one namespace, by one of kube-proxy's modes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Services {
    pub netns: String,
    pub mode: &'static str,
    pub translations: Vec<Translation>,
}

impl Services {
    /// A line per translation, for the report: "VIP:PORT/PROTO -> BACKENDS (MODE in NETNS)".
    pub fn lines(found: &[Services]) -> Vec<String> {
        (found.iter())
            .flat_map(|s| {
                (s.translations.iter()).map(|t| format!("{t} ({} in {})", s.mode, s.netns))
            })
            .collect()
    }

    /// The namespaces with Services, each once.
    pub fn namespaces(found: &[Services]) -> Vec<&str> {
        let mut all: Vec<&str> = found.iter().map(|s| s.netns.as_str()).collect();
        all.sort();
        all.dedup();
        all
    }

    /// Each virtual address with each of its backends' addresses.
    pub fn aliases(found: &[Services]) -> Vec<(IpAddr, IpAddr)> {
        let mut pairs: Vec<(IpAddr, IpAddr)> = (found.iter())
            .flat_map(|s| &s.translations)
            .flat_map(|t| t.backends.iter().map(|b| (t.vip, b.ip())))
            .collect();
        pairs.sort();
        pairs.dedup();
        pairs
    }
}

/// The Services of each of `namespaces` that has some, and why a mode could not be read
/// (its program missing), once each.
pub fn read(namespaces: &[String]) -> (Vec<Services>, Vec<String>) {
    let mut found = Vec::new();
    let mut notices = Vec::new();
    for (mode, program, args, parse) in MODES {
        for ns in namespaces {
            match rules(ns, program, args) {
                Ok(Some(text)) => {
                    let translations = parse(&text);
                    if !translations.is_empty() {
                        found.push(Services {
                            netns: ns.clone(),
                            mode,
                            translations,
                        });
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    notices.push(format!("{mode} Services not read: {e:#}"));
                    break;
                }
            }
        }
    }
    (found, notices)
}

type Parse = fn(&str) -> Vec<Translation>;

const MODES: [(&str, &str, &[&str], Parse); 2] = [
    ("iptables", "iptables-save", &["-t", "nat"], iptables),
    (
        "nftables",
        "nft",
        &["list", "table", "ip", "kube-proxy"],
        nftables,
    ),
];

/// `program args` in namespace `ns`: its output, None when it fails (no such table), an error
/// when it cannot run.
fn rules(ns: &str, program: &str, args: &[&str]) -> Result<Option<String>> {
    let out = netns::run_in(ns_arg(ns), || {
        Command::new(program)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {program}"))
    })?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Chains and where their rules go: the chains they jump to and the DNAT targets.
#[derive(Default)]
struct Graph {
    jumps: HashMap<String, Vec<String>>,
    dnat: HashMap<String, Vec<SocketAddr>>,
    /// Virtual address, protocol, port and the chain that translates them.
    entries: Vec<(IpAddr, String, u16, String)>,
}

impl Graph {
    /// The DNAT targets reachable from `chain` (each chain visited once: rules may loop).
    fn backends(&self, chain: &str) -> Vec<SocketAddr> {
        let mut seen = vec![chain.to_string()];
        let mut todo = vec![chain.to_string()];
        let mut out = Vec::new();
        while let Some(c) = todo.pop() {
            out.extend(self.dnat.get(&c).into_iter().flatten());
            for next in self.jumps.get(&c).into_iter().flatten() {
                if !seen.contains(next) {
                    seen.push(next.clone());
                    todo.push(next.clone());
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Each entry that reaches a DNAT (kube-proxy's masquerade marks reach none), once.
    fn translations(&self) -> Vec<Translation> {
        let mut all: Vec<Translation> = (self.entries.iter())
            .filter_map(|(vip, proto, port, chain)| {
                let backends = self.backends(chain);
                (!backends.is_empty()).then(|| Translation {
                    vip: *vip,
                    proto: proto.clone(),
                    port: *port,
                    backends,
                })
            })
            .collect();
        all.sort_by(|a, b| (a.vip, &a.proto, a.port).cmp(&(b.vip, &b.proto, b.port)));
        all.dedup();
        all
    }
}

/// The words of a line, a double-quoted string (a comment) as one.
fn words(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let end = if let Some(quoted) = rest.strip_prefix('"') {
            quoted.find('"').map_or(rest.len(), |i| i + 2)
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        out.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    out
}

/// `iptables-save -t nat`'s Services.
fn iptables(text: &str) -> Vec<Translation> {
    let mut g = Graph::default();
    for line in text.lines() {
        let w = words(line);
        let (Some(&"-A"), Some(&chain)) = (w.first(), w.get(1)) else {
            continue;
        };
        let after = |flag: &str| (w.windows(2)).find(|p| p[0] == flag).map(|p| p[1]);
        // `! -d` is every address but this one: no Service.
        let negated_dst = w.windows(2).any(|p| p == ["!", "-d"]);
        if let Some(target) = after("-j") {
            g.jumps
                .entry(chain.to_string())
                .or_default()
                .push(target.to_string());
        }
        if let Some(to) = after("--to-destination").and_then(|t| t.parse().ok()) {
            g.dnat.entry(chain.to_string()).or_default().push(to);
        }
        let vip = after("-d")
            .and_then(|d| d.strip_suffix("/32"))
            .and_then(|a| a.parse().ok());
        let port = after("--dport").and_then(|p| p.parse().ok());
        if let (false, Some(vip), Some(proto), Some(port), Some(target)) =
            (negated_dst, vip, after("-p"), port, after("-j"))
        {
            g.entries
                .push((vip, proto.to_string(), port, target.to_string()));
        }
    }
    g.translations()
}

/// `nft list table ip kube-proxy`'s Services.
fn nftables(text: &str) -> Vec<Translation> {
    let mut g = Graph::default();
    let mut chain: Option<String> = None;
    for line in text.lines() {
        let w = words(line);
        match w.as_slice() {
            ["chain", name, "{"] => chain = Some(name.to_string()),
            ["}"] => chain = None,
            _ => {}
        }
        if let Some(c) = &chain {
            for p in w.windows(2) {
                if matches!(p[0], "goto" | "jump") {
                    let to = p[1].trim_end_matches([',', '}']);
                    g.jumps.entry(c.clone()).or_default().push(to.to_string());
                }
            }
            let dnat = (w.windows(3))
                .find(|p| p[0] == "dnat" && p[1] == "to")
                .and_then(|p| p[2].parse().ok());
            if let Some(to) = dnat {
                g.dnat.entry(c.clone()).or_default().push(to);
            }
        }
    }
    // The map's elements, wherever their lines break: VIP . PROTO . PORT : goto CHAIN.
    let flat: Vec<&str> = (text.split(|c: char| c.is_whitespace() || matches!(c, ',' | '{' | '}')))
        .filter(|w| !w.is_empty())
        .collect();
    for e in flat.windows(8) {
        if let [vip, ".", proto, ".", port, ":", "goto" | "jump", to] = e {
            if let (Ok(vip), Ok(port)) = (vip.parse(), port.parse()) {
                g.entries
                    .push((vip, proto.to_string(), port, to.to_string()));
            }
        }
    }
    g.translations()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kube-proxy's iptables mode for a DNS Service with two endpoints, as iptables-save
    /// prints it.
    const IPTABLES: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
:KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]
:KUBE-SEP-YIL6JZP7A3QYXJU2 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-TCOU7JCQXEZGVUNU ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-MARK-MASQ
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "kube-system/kube-dns:dns -> 10.244.0.2:53" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-IT2ZTR26TO4XFPTO
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "kube-system/kube-dns:dns -> 10.244.0.3:53" -j KUBE-SEP-YIL6JZP7A3QYXJU2
-A KUBE-SEP-IT2ZTR26TO4XFPTO -s 10.244.0.2/32 -m comment --comment "kube-system/kube-dns:dns" -j KUBE-MARK-MASQ
-A KUBE-SEP-IT2ZTR26TO4XFPTO -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp -j DNAT --to-destination 10.244.0.2:53
-A KUBE-SEP-YIL6JZP7A3QYXJU2 -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp -j DNAT --to-destination 10.244.0.3:53
-A KUBE-SERVICES ! -d 10.96.0.99/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-TCOU7JCQXEZGVUNU
COMMIT
"#;

    /// The same in kube-proxy's nftables mode, the map's elements over several lines.
    const NFTABLES: &str = "table ip kube-proxy {
	comment \"rules for kube-proxy\"
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.96.0.10 . udp . 53 : goto service-FY5PMXPG-kube-system/kube-dns/udp/dns,
			     10.96.0.1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https }
	}
	chain services {
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
	chain service-FY5PMXPG-kube-system/kube-dns/udp/dns {
		ip daddr 10.96.0.10 udp dport 53 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
		numgen random mod 2 vmap { 0 : goto endpoint-RKNUZ7QQ-kube-system/kube-dns/udp/dns__10.244.0.2/53, 1 : goto endpoint-ZX2TLNVR-kube-system/kube-dns/udp/dns__10.244.0.3/53 }
	}
	chain endpoint-RKNUZ7QQ-kube-system/kube-dns/udp/dns__10.244.0.2/53 {
		ip saddr 10.244.0.2 jump mark-for-masquerade
		meta l4proto udp dnat to 10.244.0.2:53
	}
	chain endpoint-ZX2TLNVR-kube-system/kube-dns/udp/dns__10.244.0.3/53 {
		ip saddr 10.244.0.3 jump mark-for-masquerade
		meta l4proto udp dnat to 10.244.0.3:53
	}
	chain service-2QRHZV4L-default/kubernetes/tcp/https {
		numgen random mod 1 vmap { 0 : goto endpoint-A/https__192.168.8.2/6443 }
	}
	chain endpoint-A/https__192.168.8.2/6443 {
		meta l4proto tcp dnat to 192.168.8.2:6443
	}
}
";

    fn dns() -> Translation {
        Translation {
            vip: "10.96.0.10".parse().unwrap(),
            proto: "udp".into(),
            port: 53,
            backends: vec![
                "10.244.0.2:53".parse().unwrap(),
                "10.244.0.3:53".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn iptables_services_are_followed_to_their_dnat() {
        // The masquerade mark reaches no DNAT, and `! -d` is no Service.
        assert_eq!(iptables(IPTABLES), vec![dns()]);
    }

    #[test]
    fn nftables_services_are_followed_to_their_dnat() {
        let api = Translation {
            vip: "10.96.0.1".parse().unwrap(),
            proto: "tcp".into(),
            port: 443,
            backends: vec!["192.168.8.2:6443".parse().unwrap()],
        };
        assert_eq!(nftables(NFTABLES), vec![api, dns()]);
    }

    #[test]
    fn aliases_pair_each_service_with_its_backends() {
        let found = [Services {
            netns: "(root)".into(),
            mode: "iptables",
            translations: vec![dns()],
        }];
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        assert_eq!(
            Services::aliases(&found),
            [
                (vip, "10.244.0.2".parse().unwrap()),
                (vip, "10.244.0.3".parse().unwrap())
            ]
        );
        assert_eq!(
            Services::lines(&found),
            ["10.96.0.10:53/udp -> 10.244.0.2:53, 10.244.0.3:53 (iptables in (root))"]
        );
    }

    #[test]
    fn nothing_translated_is_no_service() {
        for text in [
            "",
            "*nat\nCOMMIT\n",
            "table ip kube-proxy {\n}\n",
            "-A X -j DNAT --to-destination nonsense",
        ] {
            assert!(
                iptables(text).is_empty() && nftables(text).is_empty(),
                "{text}"
            );
        }
    }
}
