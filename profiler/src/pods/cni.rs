//! The CNI plugins' result cache (libcni's /var/lib/cni/results): where a CRI runtime ran the
//! plugins, each result keeps the pod's name in its cniArgs and its namespace in the result.

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};
use serde::Deserialize;

use super::{Pod, Source};

/// libcni's cache directory.
pub const CACHE_DIR: &str = "/var/lib/cni/results";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Cached {
    #[serde(default)]
    container_id: String,
    #[serde(default)]
    cni_args: Vec<(String, String)>,
    #[serde(default)]
    result: Option<CniResult>,
}

#[derive(Deserialize)]
struct CniResult {
    #[serde(default)]
    interfaces: Vec<CniInterface>,
    #[serde(default)]
    ips: Vec<CniIp>,
}

#[derive(Deserialize)]
struct CniInterface {
    #[serde(default)]
    sandbox: String,
}

#[derive(Deserialize)]
struct CniIp {
    address: String,
}

/// The pods of the results under `dir` that name their pod (K8S_POD_NAME) and namespace.
pub fn pods(dir: &Path) -> Result<Vec<Pod>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the CNI cache {}", dir.display()))?;
    let mut pods: Vec<Pod> = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        // A result removed since the listing, or unreadable, is skipped.
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Some(pod) = parse(&text, dir) else {
            continue;
        };
        // One result per network and interface (containerd's loopback one has no address):
        // one pod per sandbox, with its address where a result has one.
        match pods.iter_mut().find(|p| p.sandbox == pod.sandbox) {
            Some(known) => known.ip = known.ip.or(pod.ip),
            None => pods.push(pod),
        }
    }
    Ok(pods)
}

fn parse(text: &str, dir: &Path) -> Option<Pod> {
    let cached: Cached = serde_json::from_str(text).ok()?;
    let arg = |k: &str| {
        cached
            .cni_args
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let result = cached.result?;
    let netns = result
        .interfaces
        .iter()
        .map(|i| i.sandbox.clone())
        .find(|s| !s.is_empty())?;
    let ip = result
        .ips
        .iter()
        .filter_map(|i| i.address.split('/').next()?.parse::<Ipv4Addr>().ok())
        .next();
    Some(Pod {
        namespace: arg("K8S_POD_NAMESPACE")?,
        name: arg("K8S_POD_NAME")?,
        uid: arg("K8S_POD_UID").unwrap_or_default(),
        sandbox: cached.container_id,
        netns,
        ip,
        source: Source::CniCache(dir.to_path_buf()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESULT: &str = r#"{"kind":"cniCacheV1","containerId":"8f1c","config":"e30=",
        "ifName":"eth0","networkName":"prof-node",
        "cniArgs":[["IgnoreUnknown","1"],["K8S_POD_NAMESPACE","shop"],["K8S_POD_NAME","web-1"],
                   ["K8S_POD_INFRA_CONTAINER_ID","8f1c"],["K8S_POD_UID","u-1"]],
        "result":{"cniVersion":"1.0.0","interfaces":[{"name":"cni0","mac":"aa:bb:cc:dd:ee:ff"},
            {"name":"veth1","mac":"aa:bb:cc:dd:ee:01"},
            {"name":"eth0","mac":"aa:bb:cc:dd:ee:02","sandbox":"/var/run/netns/cni-77"}],
            "ips":[{"interface":2,"address":"198.18.0.5/24","gateway":"198.18.0.1"}]}}"#;

    #[test]
    fn a_cached_result_names_its_pod_and_namespace() {
        let pod = parse(RESULT, Path::new(CACHE_DIR)).expect("a pod from the cached result");
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("shop", "web-1")
        );
        assert_eq!(pod.netns, "/var/run/netns/cni-77");
        assert_eq!(pod.ip, Some(Ipv4Addr::new(198, 18, 0, 5)));
        assert_eq!(pod.uid, "u-1");
    }

    #[test]
    fn a_result_without_kubernetes_args_names_no_pod() {
        let plain = RESULT.replace("K8S_POD_NAME", "OTHER");
        assert!(parse(&plain, Path::new(CACHE_DIR)).is_none());
        assert!(parse("{", Path::new(CACHE_DIR)).is_none());
    }
}
