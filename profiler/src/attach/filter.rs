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
    let tokens = tokenize(expr);
    if tokens.is_empty() {
        return Ok(Filter::default());
    }
    let mut p = Parser { tokens, at: 0 };
    let ast = p.or()?;
    if let Some(t) = p.peek() {
        bail!("invalid filter {expr:?}: unexpected {t:?}");
    }
    let clauses = dnf(&ast, false);
    if clauses.len() > FILTER_CLAUSES || clauses.iter().any(|c| c.len() > FILTER_TERMS) {
        bail!(
            "filter {expr:?} is too complex for the kernel: it expands to {} alternatives of up to {} conditions (at most {FILTER_CLAUSES} of {FILTER_TERMS})",
            clauses.len(),
            clauses.iter().map(Vec::len).max().unwrap_or(0)
        );
    }
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

struct Parser {
    tokens: Vec<String>,
    at: usize,
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
                Ok(Expr::Not(Box::new(self.unary()?)))
            }
            Some("(") => {
                self.at += 1;
                let e = self.or()?;
                match self.next("')'")?.as_str() {
                    ")" => Ok(e),
                    t => bail!("invalid filter: ')' expected, found {t:?}"),
                }
            }
            _ => self.primitive(),
        }
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
    let max = if addr.is_ipv4() { 32 } else { 128 };
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
    fn protocol_and_port_become_one_clause() {
        let f = compile("tcp and dst port 443").unwrap();
        assert_eq!(
            clauses(&f),
            vec![vec![(FIELD_PROTO, 0, 6), (FIELD_DST_PORT, 0, 443)]]
        );
        assert_eq!(compile("tcp dst port 443").unwrap(), f);
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
}
