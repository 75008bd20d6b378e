//! `--filter`: a pcap-filter-style expression, compiled into the disjunctive normal form the
//! kernel evaluates (profiler_common::Filter) on a packet's outer headers and on those inside a
//! tunnel. What the kernel cannot evaluate is refused here, before anything is attached.
//!
//! Supported: `ip`, `ip6`, `tcp`, `udp`, `icmp`, `icmp6`, `[src|dst] host ADDR`,
//! `[src|dst] net ADDR/LEN`, `[src|dst] port N`, a protocol before a port (`tcp dst port 443`),
//! `and`/`&&`, `or`/`||`, `not`/`!` and parentheses.

use std::net::IpAddr;

use anyhow::{anyhow, bail, Result};
use profiler_common::{
    Filter, FilterClause, FilterTerm, FIELD_ADDR, FIELD_DST_ADDR, FIELD_DST_PORT, FIELD_FAMILY,
    FIELD_PORT, FIELD_PROTO, FIELD_SRC_ADDR, FIELD_SRC_PORT, FILTER_CLAUSES, FILTER_TERMS,
};

#[derive(Clone, Debug, PartialEq)]
enum Expr {
    Term(FilterTerm),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// Compiles `expr`; an empty expression matches every packet.
pub fn compile(expr: &str) -> Result<Filter> {
    compile_through(expr, &[])
}

/// Compiles `expr` so that a host address also matches the addresses a NAT swaps it for on the
/// way, as `aliases` pair them (a Service's virtual address and each of its backends): `host
/// BACKEND` then takes a request before its DNAT too, and `host CLUSTER_IP` the reply before
/// its un-DNAT. Networks (`net`) are left as written.
pub fn compile_through(expr: &str, aliases: &[(IpAddr, IpAddr)]) -> Result<Filter> {
    let tokens = tokenize(expr);
    if tokens.is_empty() {
        return Ok(Filter::default());
    }
    // The parser and the expansion recurse as deep as the expression: bounded here, so that no
    // input can exhaust the stack. A filter the kernel can take is far below both bounds.
    if tokens.len() > MAX_TOKENS {
        bail!(
            "filter is too long: {} words and symbols (at most {MAX_TOKENS})",
            tokens.len()
        );
    }
    let mut p = Parser {
        tokens,
        at: 0,
        depth: 0,
    };
    let ast = p.or()?;
    if let Some(t) = p.peek() {
        bail!("invalid filter {expr:?}: unexpected {t:?}");
    }
    let ast = see_through(ast, aliases);
    // Counted before the expansion, which grows exponentially: `(port 1 or port 2) and ...`
    // repeated 25 times would make 2^25 alternatives before being refused.
    let (alternatives, conditions) = dnf_size(&ast, false);
    if alternatives > FILTER_CLAUSES || conditions > FILTER_TERMS {
        bail!(
            "filter {expr:?} is too complex for the kernel: it expands to {alternatives} alternatives of up to {conditions} conditions (at most {FILTER_CLAUSES} of {FILTER_TERMS})"
        );
    }
    let clauses = dnf(&ast, false);
    let mut filter = Filter {
        len: clauses.len() as u32,
        ..Default::default()
    };
    for (slot, clause) in filter.clauses.iter_mut().zip(&clauses) {
        *slot = FilterClause {
            len: clause.len() as u32,
            ..Default::default()
        };
        slot.terms[..clause.len()].copy_from_slice(clause);
    }
    Ok(filter)
}

fn tokenize(expr: &str) -> Vec<String> {
    let spaced = expr
        .replace('(', " ( ")
        .replace(')', " ) ")
        .replace("&&", " and ")
        .replace("||", " or ")
        .replace('!', " not ");
    spaced.split_whitespace().map(str::to_lowercase).collect()
}

/// Bounds on an expression's length and on how deep `not` and parentheses nest.
const MAX_TOKENS: usize = 512;
const MAX_NESTING: usize = 32;

struct Parser {
    tokens: Vec<String>,
    at: usize,
    /// How many `not` and `(` enclose the current position.
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&str> {
        self.tokens.get(self.at).map(String::as_str)
    }

    fn next(&mut self, what: &str) -> Result<String> {
        let t = self
            .tokens
            .get(self.at)
            .cloned()
            .ok_or_else(|| anyhow!("invalid filter: {what} expected at the end"))?;
        self.at += 1;
        Ok(t)
    }

    fn or(&mut self) -> Result<Expr> {
        let mut e = self.and()?;
        while self.peek() == Some("or") {
            self.at += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr> {
        let mut e = self.unary()?;
        while self.peek() == Some("and") {
            self.at += 1;
            e = Expr::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn unary(&mut self) -> Result<Expr> {
        match self.peek() {
            Some("not") => {
                self.at += 1;
                Ok(Expr::Not(Box::new(self.nested(Self::unary)?)))
            }
            Some("(") => {
                self.at += 1;
                let e = self.nested(Self::or)?;
                match self.next("')'")?.as_str() {
                    ")" => Ok(e),
                    t => bail!("invalid filter: ')' expected, found {t:?}"),
                }
            }
            _ => self.primitive(),
        }
    }

    /// What a `not` or a `(` encloses, one level deeper.
    fn nested(&mut self, parse: fn(&mut Self) -> Result<Expr>) -> Result<Expr> {
        if self.depth >= MAX_NESTING {
            bail!("invalid filter: 'not' and parentheses nest more than {MAX_NESTING} deep");
        }
        self.depth += 1;
        let e = parse(self);
        self.depth -= 1;
        e
    }

    fn primitive(&mut self) -> Result<Expr> {
        let word = self.next("a primitive")?;
        let proto = |n: u32| term(FIELD_PROTO, n);
        let e = match word.as_str() {
            "ip" => term(FIELD_FAMILY, 4),
            "ip6" => term(FIELD_FAMILY, 6),
            "tcp" => proto(6),
            "udp" => proto(17),
            "icmp" => proto(1),
            "icmp6" => proto(58),
            "src" | "dst" | "host" | "net" | "port" => {
                self.at -= 1;
                return self.qualified();
            }
            w => bail!(
                "unsupported filter primitive {w:?} (supported: ip, ip6, tcp, udp, icmp, icmp6, [src|dst] host|net|port, and, or, not)"
            ),
        };
        // `tcp port 80`, `udp dst port 53`: a protocol qualifying the port that follows.
        if matches!(word.as_str(), "tcp" | "udp")
            && matches!(self.peek(), Some("src" | "dst" | "port"))
        {
            let port = self.qualified()?;
            return Ok(Expr::And(Box::new(e), Box::new(port)));
        }
        Ok(e)
    }

    /// `[src|dst] host ADDR`, `[src|dst] net CIDR`, `[src|dst] port N`.
    fn qualified(&mut self) -> Result<Expr> {
        let mut kind = self.next("host, net or port")?;
        let dir = match kind.as_str() {
            "src" | "dst" => {
                let d = kind.clone();
                kind = self.next("host, net or port")?;
                Some(d)
            }
            _ => None,
        };
        let value = self.next(&format!("a value after {kind:?}"))?;
        let field = |any, src, dst| match dir.as_deref() {
            Some("src") => src,
            Some("dst") => dst,
            _ => any,
        };
        match kind.as_str() {
            "port" => {
                let port: u16 = value
                    .parse()
                    .map_err(|_| anyhow!("invalid port {value:?} in filter (0-65535)"))?;
                let f = field(FIELD_PORT, FIELD_SRC_PORT, FIELD_DST_PORT);
                Ok(term(f, port as u32))
            }
            "host" | "net" => {
                let (addr, prefix) = address(&value, kind == "host")?;
                let f = field(FIELD_ADDR, FIELD_SRC_ADDR, FIELD_DST_ADDR);
                Ok(Expr::Term(address_term(f, addr, prefix)))
            }
            k => bail!("invalid filter: host, net or port expected after {dir:?}, found {k:?}"),
        }
    }
}

fn term(field: u8, value: u32) -> Expr {
    Expr::Term(FilterTerm {
        field,
        value,
        ..Default::default()
    })
}

fn address(value: &str, host: bool) -> Result<(IpAddr, u8)> {
    let (addr, len) = match value.split_once('/') {
        Some(_) if host => bail!("invalid host {value:?} in filter: use net for a prefix"),
        Some((a, l)) => (a, Some(l)),
        None => (value, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| anyhow!("invalid address {addr:?} in filter"))?;
    let max = full_prefix(addr);
    let prefix = match len {
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|&l| l <= max)
            .ok_or_else(|| anyhow!("invalid prefix length {l:?} in filter (0-{max})"))?,
        None => max,
    };
    Ok((addr, prefix))
}

fn address_term(field: u8, addr: IpAddr, prefix: u8) -> FilterTerm {
    let mut t = FilterTerm {
        field,
        prefix,
        ..Default::default()
    };
    match addr {
        IpAddr::V4(a) => {
            t.family = 4;
            t.addr[..4].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            t.family = 6;
            t.addr = a.octets();
        }
    }
    t
}

/// `e` with each host term `T` of an address that has aliases made `T or T'` for each alias.
fn see_through(e: Expr, aliases: &[(IpAddr, IpAddr)]) -> Expr {
    let through = |e: Box<Expr>| Box::new(see_through(*e, aliases));
    match e {
        Expr::Term(t) => {
            let Some(addr) = host_of(&t) else {
                return Expr::Term(t);
            };
            let others = aliases.iter().filter_map(|&(a, b)| match addr {
                x if x == a => Some(b),
                x if x == b => Some(a),
                _ => None,
            });
            let mut seen = vec![addr];
            let mut out = Expr::Term(t);
            for other in others {
                if !seen.contains(&other) {
                    seen.push(other);
                    let alias = Expr::Term(address_term(t.field, other, full_prefix(other)));
                    out = Expr::Or(Box::new(out), Box::new(alias));
                }
            }
            out
        }
        Expr::Not(a) => Expr::Not(through(a)),
        Expr::And(a, b) => Expr::And(through(a), through(b)),
        Expr::Or(a, b) => Expr::Or(through(a), through(b)),
    }
}

/// The address of a host term (an address field with a full prefix).
fn host_of(t: &FilterTerm) -> Option<IpAddr> {
    if ![FIELD_ADDR, FIELD_SRC_ADDR, FIELD_DST_ADDR].contains(&t.field) {
        return None;
    }
    let addr = match t.family {
        4 => IpAddr::from(<[u8; 4]>::try_from(&t.addr[..4]).ok()?),
        6 => IpAddr::from(t.addr),
        _ => return None,
    };
    (t.prefix == full_prefix(addr)).then_some(addr)
}

fn full_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// How many alternatives [`dnf`] makes of `e`, and how many terms its longest has, counted
/// without making them (saturating).
fn dnf_size(e: &Expr, negated: bool) -> (usize, usize) {
    match (e, negated) {
        (Expr::Term(_), _) => (1, 1),
        (Expr::Not(inner), _) => dnf_size(inner, !negated),
        (Expr::Or(a, b), false) | (Expr::And(a, b), true) => {
            let ((ca, la), (cb, lb)) = (dnf_size(a, negated), dnf_size(b, negated));
            (ca.saturating_add(cb), la.max(lb))
        }
        (Expr::And(a, b), false) | (Expr::Or(a, b), true) => {
            let ((ca, la), (cb, lb)) = (dnf_size(a, negated), dnf_size(b, negated));
            (ca.saturating_mul(cb), la.saturating_add(lb))
        }
    }
}

/// Disjunctive normal form, with negations pushed down to the terms.
fn dnf(e: &Expr, negated: bool) -> Vec<Vec<FilterTerm>> {
    match (e, negated) {
        (Expr::Term(t), _) => vec![vec![FilterTerm {
            negate: negated as u8,
            ..*t
        }]],
        (Expr::Not(inner), _) => dnf(inner, !negated),
        (Expr::Or(a, b), false) | (Expr::And(a, b), true) => {
            let mut out = dnf(a, negated);
            out.extend(dnf(b, negated));
            out
        }
        (Expr::And(a, b), false) | (Expr::Or(a, b), true) => {
            let (left, right) = (dnf(a, negated), dnf(b, negated));
            left.iter()
                .flat_map(|l| right.iter().map(move |r| [l.clone(), r.clone()].concat()))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clauses(f: &Filter) -> Vec<Vec<(u8, u8, u32)>> {
        f.clauses[..f.len as usize]
            .iter()
            .map(|c| {
                c.terms[..c.len as usize]
                    .iter()
                    .map(|t| (t.field, t.negate, t.value))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_host_matches_what_the_nat_swaps_it_for() {
        let (vip, pod): (IpAddr, IpAddr) =
            ("10.96.0.10".parse().unwrap(), "10.244.1.5".parse().unwrap());
        let other: IpAddr = "10.244.2.9".parse().unwrap();
        let aliases = [(vip, pod), (vip, other)];
        let addrs = |f: &Filter| -> Vec<Vec<(u8, u8, Option<IpAddr>)>> {
            f.clauses[..f.len as usize]
                .iter()
                .map(|c| {
                    c.terms[..c.len as usize]
                        .iter()
                        .map(|t| (t.field, t.negate, host_of(t)))
                        .collect()
                })
                .collect()
        };
        // The backend: itself or the Service; the Service: itself or either backend.
        let f = compile_through("udp and dst host 10.244.1.5", &aliases).unwrap();
        assert_eq!(
            addrs(&f),
            vec![
                vec![(FIELD_PROTO, 0, None), (FIELD_DST_ADDR, 0, Some(pod))],
                vec![(FIELD_PROTO, 0, None), (FIELD_DST_ADDR, 0, Some(vip))],
            ]
        );
        let f = compile_through("host 10.96.0.10", &aliases).unwrap();
        let hosts: Vec<_> = addrs(&f).into_iter().map(|c| c[0].2).collect();
        assert_eq!(hosts, [Some(vip), Some(pod), Some(other)]);
        // `not host`: none of them, in one clause.
        let f = compile_through("not host 10.244.2.9", &aliases).unwrap();
        assert_eq!(
            addrs(&f),
            vec![vec![
                (FIELD_ADDR, 1, Some(other)),
                (FIELD_ADDR, 1, Some(vip))
            ]]
        );
        // Networks and addresses without aliases are left as written.
        for expr in ["net 10.244.1.0/24", "host 10.244.3.3", "port 53"] {
            assert_eq!(
                compile_through(expr, &aliases).unwrap(),
                compile(expr).unwrap(),
                "{expr}"
            );
        }
    }

    #[test]
    fn protocol_and_port_become_one_clause() {
        let f = compile("tcp and dst port 443").unwrap();
        assert_eq!(
            clauses(&f),
            vec![vec![(FIELD_PROTO, 0, 6), (FIELD_DST_PORT, 0, 443)]]
        );
        assert_eq!(compile("tcp dst port 443").unwrap(), f);
    }

    #[test]
    fn deep_or_long_expressions_are_refused_not_overflowing_the_stack() {
        let deep_not = format!("{}tcp", "! ".repeat(130_000));
        let e = compile(&deep_not).expect_err("too deep");
        assert!(format!("{e:#}").contains("too long"), "{e:#}");
        let parens = format!("{}tcp{}", "(".repeat(40), ")".repeat(40));
        let e = compile(&parens).expect_err("too deep");
        assert!(format!("{e:#}").contains("nest more than 32 deep"), "{e:#}");
        let ok = format!("{}tcp{}", "(".repeat(32), ")".repeat(32));
        compile(&ok).expect("32 levels are fine");
        let long = vec!["tcp"; 300].join(" and ");
        let e = compile(&long).expect_err("too long");
        assert!(format!("{e:#}").contains("too long"), "{e:#}");
    }

    #[test]
    fn or_and_not_expand_to_alternatives_with_negated_terms() {
        let f = compile("udp and not (port 53 or port 5353)").unwrap();
        assert_eq!(
            clauses(&f),
            vec![vec![
                (FIELD_PROTO, 0, 17),
                (FIELD_PORT, 1, 53),
                (FIELD_PORT, 1, 5353)
            ]]
        );
        let f = compile("port 80 || (udp && !port 53)").unwrap();
        assert_eq!(
            clauses(&f),
            vec![
                vec![(FIELD_PORT, 0, 80)],
                vec![(FIELD_PROTO, 0, 17), (FIELD_PORT, 1, 53)]
            ]
        );
    }

    #[test]
    fn networks_and_hosts_carry_family_and_prefix() {
        let f = compile("src net 198.18.0.0/15 and host 2001:db8::1").unwrap();
        let [net, host] = [f.clauses[0].terms[0], f.clauses[0].terms[1]];
        assert_eq!((net.field, net.family, net.prefix), (FIELD_SRC_ADDR, 4, 15));
        assert_eq!(&net.addr[..4], &[198, 18, 0, 0]);
        assert_eq!((host.field, host.family, host.prefix), (FIELD_ADDR, 6, 128));
    }

    #[test]
    fn empty_matches_everything() {
        assert_eq!(compile("  ").unwrap().len, 0);
    }

    #[test]
    fn bad_expressions_are_refused_with_the_reason() {
        let err = |e: &str| compile(e).unwrap_err().to_string();
        assert!(err("port 99999").contains("invalid port \"99999\""));
        assert!(err("tcp and").contains("expected at the end"));
        assert!(err("portrange 1-2").contains("unsupported filter primitive \"portrange\""));
        assert!(err("(tcp").contains("')' expected"));
        assert!(err("host 10.0.0.0/8").contains("use net"));
        assert!(err("net 10.0.0.0/33").contains("invalid prefix length"));
        assert!(err("tcp tcp").contains("unexpected \"tcp\""));
        let big = "(port 1 or port 2 or port 3) and (port 4 or port 5 or port 6)";
        assert!(err(big).contains("too complex"));
    }

    #[test]
    fn exponential_expansions_are_refused_without_expanding() {
        // 2^40 alternatives: counted, not made (this took 12 s and 3.4 GB at 2^22).
        let e = vec!["(port 1 or port 2)"; 40].join(" and ");
        let err = compile(&e).unwrap_err().to_string();
        assert!(err.contains("expands to 1099511627776 alternatives of up to 40 conditions"));
        let e = format!("not ({})", vec!["(port 1 and port 2)"; 40].join(" or "));
        assert!(compile(&e).unwrap_err().to_string().contains("too complex"));
    }

    // Property tests (`cargo xtask fuzz` runs them with more cases): random expressions, printed
    // in the syntax's variants, compiled, and evaluated the kernel's way on random packets
    // against a reference evaluator of the expression.

    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::collection::vec;
    use proptest::prelude::*;

    /// What the kernel evaluates a filter on: one set of IP and L4 headers (parse.rs's Flow).
    #[derive(Clone, Debug)]
    struct Headers {
        family: u8,
        proto: u8,
        saddr: [u8; 16],
        daddr: [u8; 16],
        sport: u16,
        dport: u16,
    }

    /// The kernel's evaluation of a compiled filter: profiler-ebpf/src/attach.rs's
    /// filter_matches, term_holds and addr_in, without the volatile reads.
    fn kernel_matches(filter: &Filter, h: &Headers) -> bool {
        let n = filter.len as usize;
        if n == 0 {
            return true;
        }
        (0..FILTER_CLAUSES.min(n)).any(|c| {
            let clause = &filter.clauses[c];
            let terms = clause.len as usize;
            (0..FILTER_TERMS).all(|t| t >= terms || kernel_term(h, &clause.terms[t]))
        })
    }

    fn kernel_term(f: &Headers, t: &FilterTerm) -> bool {
        let addr = |a: &[u8; 16]| f.family == t.family && kernel_addr_in(a, t);
        let port = |p: u16| p as u32 == t.value && (f.proto == 6 || f.proto == 17);
        let holds = match t.field {
            FIELD_PROTO => f.proto as u32 == t.value,
            FIELD_FAMILY => f.family as u32 == t.value,
            FIELD_SRC_ADDR => addr(&f.saddr),
            FIELD_DST_ADDR => addr(&f.daddr),
            FIELD_ADDR => addr(&f.saddr) || addr(&f.daddr),
            FIELD_SRC_PORT => port(f.sport),
            FIELD_DST_PORT => port(f.dport),
            FIELD_PORT => port(f.sport) || port(f.dport),
            _ => false,
        };
        holds != (t.negate != 0)
    }

    // The kernel's loop, as it is there.
    #[allow(clippy::needless_range_loop)]
    fn kernel_addr_in(addr: &[u8; 16], t: &FilterTerm) -> bool {
        let full = (t.prefix / 8) as usize;
        let rest = t.prefix % 8;
        for i in 0..16 {
            if i < full {
                if addr[i] != t.addr[i] {
                    return false;
                }
            } else if i == full && rest != 0 {
                let mask = 0xffu8 << (8 - rest);
                return addr[i] & mask == t.addr[i] & mask;
            }
        }
        true
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Dir {
        Any,
        Src,
        Dst,
    }

    /// A filter expression, as the reference understands it.
    #[derive(Clone, Debug)]
    enum Gen {
        Family(u8),
        Proto(u8),
        /// `[tcp|udp] [src|dst] port N`
        Port(Option<u8>, Dir, u16),
        /// `[src|dst] host ADDR` (no prefix) or `[src|dst] net ADDR/LEN`
        Addr(Dir, IpAddr, Option<u8>),
        Not(Box<Gen>),
        And(Box<Gen>, Box<Gen>),
        Or(Box<Gen>, Box<Gen>),
    }

    /// pcap-filter's meaning of the expression (ports are TCP's and UDP's).
    fn holds(g: &Gen, h: &Headers) -> bool {
        let by_dir = |dir: Dir, test: &dyn Fn(bool) -> bool| match dir {
            Dir::Any => test(true) || test(false),
            Dir::Src => test(true),
            Dir::Dst => test(false),
        };
        match g {
            Gen::Family(f) => h.family == *f,
            Gen::Proto(p) => h.proto == *p,
            Gen::Port(proto, dir, port) => {
                proto.is_none_or(|p| h.proto == p)
                    && (h.proto == 6 || h.proto == 17)
                    && by_dir(*dir, &|src| *port == if src { h.sport } else { h.dport })
            }
            Gen::Addr(dir, net, prefix) => by_dir(*dir, &|src| {
                let a = if src { &h.saddr } else { &h.daddr };
                in_net(h.family, a, net, *prefix)
            }),
            Gen::Not(x) => !holds(x, h),
            Gen::And(a, b) => holds(a, h) && holds(b, h),
            Gen::Or(a, b) => holds(a, h) || holds(b, h),
        }
    }

    /// Whether the address of a packet of `family` is in `net`/`prefix` (a host: all bits).
    fn in_net(family: u8, addr: &[u8; 16], net: &IpAddr, prefix: Option<u8>) -> bool {
        match net {
            IpAddr::V4(n) => {
                let bits = prefix.unwrap_or(32) as u32;
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                let a = u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]);
                family == 4 && a & mask == u32::from(*n) & mask
            }
            IpAddr::V6(n) => {
                let bits = prefix.unwrap_or(128) as u32;
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                family == 6 && u128::from_be_bytes(*addr) & mask == u128::from(*n) & mask
            }
        }
    }

    /// (alternatives, most conditions in one) of the expression in disjunctive normal form.
    fn expected_size(g: &Gen, negated: bool) -> (usize, usize) {
        let both = |a: &Gen, b: &Gen, product: bool| {
            let ((ca, la), (cb, lb)) = (expected_size(a, negated), expected_size(b, negated));
            if product {
                (ca.saturating_mul(cb), la + lb)
            } else {
                (ca.saturating_add(cb), la.max(lb))
            }
        };
        match g {
            Gen::Port(Some(_), ..) => {
                if negated {
                    (2, 1)
                } else {
                    (1, 2)
                }
            }
            Gen::Family(_) | Gen::Proto(_) | Gen::Port(..) | Gen::Addr(..) => (1, 1),
            Gen::Not(x) => expected_size(x, !negated),
            Gen::And(a, b) => both(a, b, !negated),
            Gen::Or(a, b) => both(a, b, negated),
        }
    }

    /// Spelling choices: keyword case, `and`/`&&`, `not`/`!`, parentheses.
    struct Style(u64);

    impl Style {
        fn pick(&mut self, n: u64) -> u64 {
            // xorshift64
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }

        fn kw(&mut self, word: &str) -> String {
            match self.pick(5) {
                0 => word.to_uppercase(),
                _ => word.to_string(),
            }
        }

        fn dir(&mut self, dir: Dir) -> String {
            match dir {
                Dir::Any => String::new(),
                Dir::Src => self.kw("src "),
                Dir::Dst => self.kw("dst "),
            }
        }
    }

    fn proto_name(p: u8) -> &'static str {
        match p {
            6 => "tcp",
            17 => "udp",
            1 => "icmp",
            _ => "icmp6",
        }
    }

    fn render(g: &Gen, s: &mut Style) -> String {
        match g {
            Gen::Family(4) => s.kw("ip"),
            Gen::Family(_) => s.kw("ip6"),
            Gen::Proto(p) => s.kw(proto_name(*p)),
            Gen::Port(proto, dir, port) => {
                let proto = proto.map(|p| s.kw(proto_name(p)) + " ").unwrap_or_default();
                format!("{proto}{}{} {port}", s.dir(*dir), s.kw("port"))
            }
            Gen::Addr(dir, addr, prefix) => {
                let dir = s.dir(*dir);
                match prefix {
                    None => format!("{dir}{} {addr}", s.kw("host")),
                    Some(len) => format!("{dir}{} {addr}/{len}", s.kw("net")),
                }
            }
            Gen::Not(x) => {
                let op = ["not ", "!", "! ", "NOT "][s.pick(4) as usize];
                let inner = render(x, s);
                let binary = matches!(**x, Gen::And(..) | Gen::Or(..));
                if binary || s.pick(4) == 0 {
                    format!("{op}({inner})")
                } else {
                    format!("{op}{inner}")
                }
            }
            Gen::And(a, b) | Gen::Or(a, b) => {
                let and = matches!(g, Gen::And(..));
                let op = match (and, s.pick(3)) {
                    (true, 0) => "&&",
                    (true, 1) => "AND",
                    (true, _) => "and",
                    (false, 0) => "||",
                    (false, 1) => "OR",
                    (false, _) => "or",
                };
                format!("({} {op} {})", render(a, s), render(b, s))
            }
        }
    }

    const V4: [Ipv4Addr; 5] = [
        Ipv4Addr::new(10, 0, 0, 1),
        Ipv4Addr::new(10, 0, 0, 2),
        Ipv4Addr::new(10, 1, 2, 3),
        Ipv4Addr::new(192, 168, 1, 1),
        Ipv4Addr::new(0, 0, 0, 0),
    ];
    const V6: [Ipv6Addr; 5] = [
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2),
        Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0),
    ];
    const PORTS: [u16; 5] = [0, 53, 80, 443, 65535];

    fn dir() -> impl Strategy<Value = Dir> {
        prop_oneof![Just(Dir::Any), Just(Dir::Src), Just(Dir::Dst)]
    }

    fn port_number() -> impl Strategy<Value = u16> {
        prop_oneof![3 => prop::sample::select(&PORTS[..]), 1 => any::<u16>()]
    }

    fn leaf() -> impl Strategy<Value = Gen> {
        let proto = prop::sample::select(&[6u8, 17, 1, 58][..]);
        let port_proto = prop::option::of(prop::sample::select(&[6u8, 17][..]));
        let v4 = (prop::sample::select(&V4[..]), prop::option::of(0u8..=32))
            .prop_map(|(a, p)| (IpAddr::V4(a), p));
        let v6 = (prop::sample::select(&V6[..]), prop::option::of(0u8..=128))
            .prop_map(|(a, p)| (IpAddr::V6(a), p));
        prop_oneof![
            prop::sample::select(&[4u8, 6][..]).prop_map(Gen::Family),
            proto.prop_map(Gen::Proto),
            (port_proto, dir(), port_number()).prop_map(|(p, d, n)| Gen::Port(p, d, n)),
            (dir(), prop_oneof![v4, v6]).prop_map(|(d, (a, p))| Gen::Addr(d, a, p)),
        ]
    }

    fn expr() -> impl Strategy<Value = Gen> {
        leaf().prop_recursive(4, 12, 2, |inner| {
            prop_oneof![
                inner.clone().prop_map(|x| Gen::Not(Box::new(x))),
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Gen::And(Box::new(a), Box::new(b))),
                (inner.clone(), inner).prop_map(|(a, b)| Gen::Or(Box::new(a), Box::new(b))),
            ]
        })
    }

    fn address(family: u8) -> impl Strategy<Value = [u8; 16]> {
        // The expressions' addresses, each with one bit flipped (in or out of a prefix), others.
        let v4 = prop_oneof![
            prop::sample::select(&V4[..]).prop_map(|a| a.octets()),
            (prop::sample::select(&V4[..]), 0..32u32)
                .prop_map(|(a, bit)| (u32::from(a) ^ 1 << bit).to_be_bytes()),
            any::<[u8; 4]>(),
        ];
        let v6 = prop_oneof![
            prop::sample::select(&V6[..]).prop_map(|a| a.octets()),
            (prop::sample::select(&V6[..]), 0..128u32)
                .prop_map(|(a, bit)| (u128::from(a) ^ 1 << bit).to_be_bytes()),
            any::<[u8; 16]>(),
        ];
        if family == 4 {
            v4.prop_map(|a| {
                let mut out = [0; 16];
                out[..4].copy_from_slice(&a);
                out
            })
            .boxed()
        } else {
            v6.boxed()
        }
    }

    fn headers() -> impl Strategy<Value = Headers> {
        prop::sample::select(&[4u8, 6][..]).prop_flat_map(|family| {
            let proto = prop::sample::select(&[6u8, 17, 1, 58, 47, 0][..]);
            (
                proto,
                address(family),
                address(family),
                port_number(),
                port_number(),
            )
                .prop_map(move |(proto, saddr, daddr, sport, dport)| Headers {
                    family,
                    proto,
                    saddr,
                    daddr,
                    sport,
                    dport,
                })
        })
    }

    proptest! {
        #![proptest_config(crate::proptest_config(2000))]

        #[test]
        fn prop_compiled_filter_accepts_what_the_expression_accepts(
            e in expr(),
            style: u64,
            packets in vec(headers(), 16),
        ) {
            let text = render(&e, &mut Style(style | 1));
            let (alternatives, conditions) = expected_size(&e, false);
            let fits = alternatives <= FILTER_CLAUSES && conditions <= FILTER_TERMS;
            match compile(&text) {
                Ok(filter) => {
                    prop_assert!(fits, "{text:?} compiled, but it expands to {alternatives} x {conditions}");
                    let longest = filter.clauses[..filter.len as usize].iter().map(|c| c.len).max();
                    prop_assert_eq!((filter.len as usize, longest.unwrap_or(0) as usize), (alternatives, conditions), "{}", text);
                    for h in &packets {
                        prop_assert_eq!(kernel_matches(&filter, h), holds(&e, h), "{:?} on {:?}", text, h);
                    }
                }
                Err(err) => {
                    let reason = err.to_string();
                    prop_assert!(!fits && reason.contains("too complex"), "{text:?} refused: {reason}");
                    let counts = format!("expands to {alternatives} alternatives of up to {conditions} conditions");
                    prop_assert!(reason.contains(&counts), "{text:?} refused: {reason}, not {counts}");
                }
            }
        }

        /// Any sequence of the syntax's words and a few others: a filter or a reason, never a
        /// panic, and never a filter the kernel's arrays cannot hold.
        #[test]
        fn prop_any_words_compile_or_are_refused(
            words in vec(prop::sample::select(&[
                "ip", "ip6", "tcp", "udp", "icmp", "icmp6", "src", "dst", "host", "net", "port",
                "and", "or", "not", "&&", "||", "!", "(", ")", "((", "))", "80", "0", "65536",
                "-1", "10.0.0.1", "10.0.0.0/8", "10.0.0.0/33", "2001:db8::/32", "::1", "fe80::1%1",
                "portrange", "ether", "tcp[0]", "", "!!", "&", "|",
            ][..]), 0..24),
        ) {
            let text = words.join(" ");
            match compile(&text) {
                Ok(f) => {
                    prop_assert!(f.len as usize <= FILTER_CLAUSES, "{text:?}");
                    for c in &f.clauses[..f.len as usize] {
                        prop_assert!((1..=FILTER_TERMS).contains(&(c.len as usize)), "{text:?}");
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty(), "{text:?}"),
            }
        }
    }
}
