//! Pods, not namespaces: which network namespace is which pod, from the node's container
//! runtime (CRI), else the CNI plugins' cache, else the names under /run/netns.

pub mod cni;
pub mod cri;

use std::{
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Result;

/// Where `ip netns` keeps its names (and CNI plugins their pods' namespaces).
const NETNS_DIR: &str = "/run/netns";

/// A pod sandbox with a network namespace of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// The Kubernetes namespace ("" for a pod named after its /run/netns name alone).
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The sandbox (pause container) id, or the namespace's name for /run/netns pods.
    pub sandbox: String,
    /// The network namespace's file, e.g. /var/run/netns/cni-1b2c...
    pub netns: String,
    pub ip: Option<Ipv4Addr>,
    pub source: Source,
}

impl Pod {
    /// "NAMESPACE/NAME", or the name alone when the source knows no namespace.
    pub fn qualified(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// Where the pods were read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Cri(PathBuf),
    CniCache(PathBuf),
    NetnsNames,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Source::Cri(s) => write!(f, "the CRI runtime at {}", s.display()),
            Source::CniCache(d) => write!(f, "the CNI cache {}", d.display()),
            Source::NetnsNames => write!(f, "the names under /run/netns"),
        }
    }
}

/// Where to look for pods.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// --cri-socket: this socket only; None: containerd's and CRI-O's default sockets.
    pub cri_socket: Option<PathBuf>,
    /// The CNI cache directory; None: libcni's.
    pub cni_cache: Option<PathBuf>,
}

/// The node's pods, from the first source that answers, and a line for each source that
/// could not (so a caller can say why it fell back).
pub struct Listing {
    pub pods: Vec<Pod>,
    pub source: Source,
    pub notices: Vec<String>,
}

impl Sources {
    pub async fn list(&self) -> Result<Listing> {
        let mut notices = Vec::new();
        let sockets: Vec<PathBuf> = match &self.cri_socket {
            Some(s) => vec![s.clone()],
            None => cri::DEFAULT_SOCKETS
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .collect(),
        };
        for socket in sockets {
            match cri_pods(&socket).await {
                Ok(pods) => {
                    return Ok(Listing {
                        pods,
                        source: Source::Cri(socket),
                        notices,
                    })
                }
                Err(e) => notices.push(format!("{e:#}; trying the next source")),
            }
        }
        let cache = self
            .cni_cache
            .clone()
            .unwrap_or_else(|| PathBuf::from(cni::CACHE_DIR));
        // No cache at all is no node of a CNI runtime: nothing to say.
        let cached = if cache.exists() {
            cni::pods(&cache)
        } else {
            Ok(Vec::new())
        };
        match cached {
            Ok(pods) if !pods.is_empty() => {
                return Ok(Listing {
                    pods,
                    source: Source::CniCache(cache),
                    notices,
                })
            }
            Ok(_) => {}
            Err(e) => notices.push(format!("{e:#}; using /run/netns names")),
        }
        Ok(Listing {
            pods: netns_pods()?,
            source: Source::NetnsNames,
            notices,
        })
    }
}

impl Sources {
    /// What identifies the pods `source` has now, cheaply (one CRI call, one directory
    /// read): the runtime's ready sandboxes, or the CNI cache's results. Empty if it cannot
    /// be read.
    pub async fn ids(&self, source: &Source) -> Vec<String> {
        match source {
            Source::Cri(socket) => match cri::connect(socket).await {
                Ok(mut client) => cri::ready_ids(&mut client).await.unwrap_or_default(),
                Err(_) => Vec::new(),
            },
            Source::CniCache(dir) => std::fs::read_dir(dir)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default(),
            Source::NetnsNames => Vec::new(),
        }
    }
}

async fn cri_pods(socket: &Path) -> Result<Vec<Pod>> {
    let mut client = cri::connect(socket).await?;
    cri::pods(&mut client, socket).await
}

/// The names under /run/netns, sorted (none if there is no such directory).
pub fn netns_names() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every named namespace under /run/netns as a pod of that name.
fn netns_pods() -> Result<Vec<Pod>> {
    Ok(netns_names()
        .into_iter()
        .map(|name| Pod {
            namespace: String::new(),
            uid: String::new(),
            sandbox: name.clone(),
            netns: format!("{NETNS_DIR}/{name}"),
            name,
            ip: None,
            source: Source::NetnsNames,
        })
        .collect())
}

/// A --pod argument: [NAMESPACE/]NAME, each part a glob (`*`, `?`, `[..]`); without a
/// namespace, a pod of that name in any namespace.
#[derive(Clone, Debug)]
pub struct Pattern {
    text: String,
    namespace: Option<glob::Pattern>,
    name: glob::Pattern,
}

impl std::str::FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let compile =
            |p: &str| glob::Pattern::new(p).map_err(|e| format!("bad pod pattern {s:?}: {e}"));
        let (namespace, name) = match s.split_once('/') {
            Some((ns, name)) => (Some(compile(ns)?), compile(name)?),
            None => (None, compile(s)?),
        };
        if s.is_empty() || name.as_str().is_empty() {
            return Err("an empty pod name: give [NAMESPACE/]NAME".into());
        }
        Ok(Pattern {
            text: s.to_string(),
            namespace,
            name,
        })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Pattern {
    pub fn matches(&self, pod: &Pod) -> bool {
        self.name.matches(&pod.name)
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| ns.matches(&pod.namespace))
    }

    fn is_glob(&self) -> bool {
        self.text.contains(['*', '?', '['])
    }
}

/// The pods that `patterns` select, in listing order, each once. A pattern without a glob that
/// matches nothing fails, naming the closest pods; a glob may match none (pods come later).
pub fn select<'a>(pods: &'a [Pod], patterns: &[Pattern], source: &Source) -> Result<Vec<&'a Pod>> {
    for p in patterns.iter().filter(|p| !p.is_glob()) {
        if !pods.iter().any(|pod| p.matches(pod)) {
            return Err(crate::error::bad_input(unknown(p, pods, source)));
        }
    }
    Ok(select_present(pods, patterns))
}

/// The pods that `patterns` select now, without failing on one that matches nothing (it went
/// away, or is yet to come).
pub fn select_present<'a>(pods: &'a [Pod], patterns: &[Pattern]) -> Vec<&'a Pod> {
    pods.iter()
        .filter(|pod| patterns.iter().any(|p| p.matches(pod)))
        .collect()
}

/// "unknown pod X (from SOURCE); closest: a, b, c".
fn unknown(p: &Pattern, pods: &[Pod], source: &Source) -> String {
    let mut names: Vec<(usize, String)> = pods
        .iter()
        .map(|pod| {
            let q = pod.qualified();
            let d = strsim::levenshtein(&p.text, &q).min(strsim::levenshtein(&p.text, &pod.name));
            (d, q)
        })
        .collect();
    names.sort();
    let closest: Vec<String> = names.into_iter().take(3).map(|(_, q)| q).collect();
    if closest.is_empty() {
        format!("unknown pod {p}: no pod in {source}")
    } else {
        format!(
            "unknown pod {p} (in {source}); closest: {}",
            closest.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: String::new(),
            sandbox: format!("{ns}-{name}"),
            netns: format!("/var/run/netns/cni-{name}"),
            ip: None,
            source: Source::NetnsNames,
        }
    }

    fn pats(list: &[&str]) -> Vec<Pattern> {
        list.iter()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("pattern {s}: {e}")))
            .collect()
    }

    #[test]
    fn patterns_select_by_namespace_name_and_glob() {
        let pods = [
            pod("shop", "web-1"),
            pod("shop", "web-2"),
            pod("kube-system", "dns"),
        ];
        let names = |p: &[&str]| -> Vec<String> {
            select(&pods, &pats(p), &Source::NetnsNames)
                .expect("a selection")
                .iter()
                .map(|p| p.qualified())
                .collect()
        };
        assert_eq!(names(&["shop/web-1"]), ["shop/web-1"]);
        assert_eq!(names(&["web-*"]), ["shop/web-1", "shop/web-2"]);
        assert_eq!(
            names(&["*/dns", "shop/web-2"]),
            ["shop/web-2", "kube-system/dns"]
        );
        assert_eq!(names(&["other/*"]), Vec::<String>::new());
    }

    #[test]
    fn an_unknown_pod_names_the_closest() {
        let pods = [
            pod("shop", "web-1"),
            pod("shop", "cart"),
            pod("kube-system", "dns"),
        ];
        let err = select(&pods, &pats(&["shop/web1"]), &Source::NetnsNames)
            .expect_err("no pod shop/web1");
        let text = err.to_string();
        assert!(text.starts_with("unknown pod shop/web1"), "{text}");
        assert!(text.contains("closest: shop/web-1"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!("".parse::<Pattern>().is_err());
        assert!("shop/".parse::<Pattern>().is_err());
        assert!("shop/[".parse::<Pattern>().is_err());
    }
}
