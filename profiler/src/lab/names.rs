//! How nodes, namespaces and pods are named in hops and segments: the one place the other
//! modules take these names from (it imports none of them).

/// The node of everything on this machine's own kernel.
pub const HOST_NODE: &str = "host";
/// Separates a guest's name from its namespace's in the namespace names of nested paths
/// ("vm1:pod-b"); a name without it is the host's.
pub const NODE_SEP: char = ':';

/// The kernel (node) a namespace name belongs to: "host", or the guest's name.
pub fn node_of(ns: &str) -> &str {
    ns.split_once(NODE_SEP).map_or(HOST_NODE, |(node, _)| node)
}

/// "(ns)" for a namespace name; "(root)" already is.
pub fn parenthesized(ns: &str) -> String {
    if ns.starts_with('(') && ns.ends_with(')') {
        ns.to_string()
    } else {
        format!("({ns})")
    }
}

/// A namespace's pod, as the container runtime names it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodName {
    /// The namespace's name in `namespaces` (e.g. "cni-1b2c...").
    pub netns: String,
    /// The Kubernetes namespace ("" when only the pod's name is known).
    pub namespace: String,
    pub name: String,
    /// "NAMESPACE/NAME", or NAME: how hops and segments name the pod.
    pub qualified: String,
}
