//! What a dropped packet carried, named for people, and what the common harmless drops on a
//! node mean: the kernel frees a buffer with a reason, which alone does not say whether a
//! packet was lost.

/// The name of an EtherType (network byte order, as skb->protocol keeps it) and IP protocol:
/// "ipv4/udp", "ipv6/icmpv6", "arp".
pub fn name(ethertype_be: u16, ip_proto: u8) -> String {
    let l3 = match u16::from_be(ethertype_be) {
        0x0800 => "ipv4",
        0x86dd => "ipv6",
        0x0806 => return "arp".into(),
        0x8100 => return "vlan".into(),
        0 => return "unknown".into(),
        other => return format!("ethertype 0x{other:04x}"),
    };
    let l4 = match (l3, ip_proto) {
        (_, 6) => "tcp",
        (_, 17) => "udp",
        (_, 47) => "gre",
        (_, 132) => "sctp",
        ("ipv4", 1) => "icmp",
        ("ipv4", 2) => "igmp",
        ("ipv6", 58) => "icmpv6",
        // IPv6 has a next-header 0: hop-by-hop options, which MLD reports carry.
        ("ipv6", 0) => "hop-by-hop",
        ("ipv4", 0) => return l3.into(),
        (_, p) => return format!("{l3}/proto {p}"),
    };
    format!("{l3}/{l4}")
}

const RAW_PING: &str = "echo replies read through a raw socket (ping without ping sockets) \
     count here: the kernel gives the raw socket a copy and frees the original as no_socket";

/// Drops that are how the kernel works rather than lost packets, by (reason, protocol).
const HARMLESS: &[(&str, &str, &str)] = &[
    ("no_socket", "ipv4/icmp", RAW_PING),
    ("no_socket", "ipv6/icmpv6", RAW_PING),
];

/// What a drop of this reason and protocol usually is, where it is a known harmless one.
pub fn hint(reason: &str, protocol: &str) -> Option<&'static str> {
    HARMLESS
        .iter()
        .find(|(r, p, _)| *r == reason && *p == protocol)
        .map(|(_, _, hint)| *hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_say_the_network_and_transport_protocols() {
        assert_eq!(name(0x0800u16.to_be(), 17), "ipv4/udp");
        assert_eq!(name(0x0800u16.to_be(), 1), "ipv4/icmp");
        assert_eq!(name(0x86ddu16.to_be(), 58), "ipv6/icmpv6");
        assert_eq!(name(0x86ddu16.to_be(), 0), "ipv6/hop-by-hop");
        assert_eq!(name(0x0800u16.to_be(), 0), "ipv4");
        assert_eq!(name(0x0800u16.to_be(), 99), "ipv4/proto 99");
        assert_eq!(name(0x0806u16.to_be(), 0), "arp");
        assert_eq!(name(0x88ccu16.to_be(), 0), "ethertype 0x88cc");
        assert_eq!(name(0, 0), "unknown");
    }

    #[test]
    fn only_known_pairs_get_a_hint() {
        assert!(hint("no_socket", "ipv4/icmp").is_some());
        assert!(hint("no_socket", "ipv4/udp").is_none());
    }
}
