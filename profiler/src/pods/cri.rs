//! The node's container runtime through its CRI v1 API (containerd, CRI-O): which pod sandbox
//! owns which network namespace, exactly as kubelet sees them.

use std::{path::Path, time::Duration};

use anyhow::{anyhow, Context as _, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ListPodSandboxRequest, PodSandbox,
    PodSandboxFilter, PodSandboxState, PodSandboxStateValue, PodSandboxStatusRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use super::{Pod, Source};

/// Where containerd and CRI-O listen by default, tried in this order.
pub const DEFAULT_SOCKETS: [&str; 2] =
    ["/run/containerd/containerd.sock", "/var/run/crio/crio.sock"];
/// A runtime that does not answer in this time is taken as unreachable.
const TIMEOUT: Duration = Duration::from_secs(2);

pub type Client = RuntimeServiceClient<Channel>;

/// A client of the CRI runtime listening on the unix socket `socket`.
pub async fn connect(socket: &Path) -> Result<Client> {
    Ok(RuntimeServiceClient::new(channel(socket, TIMEOUT).await?))
}

/// A channel to the unix socket `socket` whose requests time out after `timeout` (for
/// clients of other CRI services, or calls slower than a query).
pub async fn channel(socket: &Path, timeout: Duration) -> Result<Channel> {
    let path = socket.to_path_buf();
    // The URI is unused: every connection goes to the socket.
    Endpoint::from_static("http://[::1]")
        .connect_timeout(TIMEOUT)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| format!("cannot connect to the CRI socket {}", socket.display()))
}

/// The ready pod sandboxes.
async fn ready(client: &mut Client) -> Result<Vec<PodSandbox>> {
    let ready = PodSandboxFilter {
        state: Some(PodSandboxStateValue {
            state: PodSandboxState::SandboxReady as i32,
        }),
        ..Default::default()
    };
    Ok(client
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(ready),
        })
        .await
        .map_err(|s| anyhow!("CRI ListPodSandbox: {}", s.message()))?
        .into_inner()
        .items)
}

/// The ids of the ready pod sandboxes: what changes when pods come or go.
pub async fn ready_ids(client: &mut Client) -> Result<Vec<String>> {
    Ok(ready(client).await?.into_iter().map(|s| s.id).collect())
}

/// The ready pod sandboxes and their network namespaces.
pub async fn pods(client: &mut Client, socket: &Path) -> Result<Vec<Pod>> {
    let items = ready(client)
        .await
        .with_context(|| format!("the CRI runtime at {}", socket.display()))?;
    let mut pods = Vec::with_capacity(items.len());
    for sandbox in items {
        let status = client
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.id.clone(),
                verbose: true,
            })
            .await;
        // A sandbox removed since the listing is skipped, not fatal.
        let Ok(status) = status else { continue };
        let status = status.into_inner();
        let Some(netns) = status.info.get("info").and_then(|i| netns_of_info(i)) else {
            // Host-network pods have no namespace of their own.
            continue;
        };
        let meta = sandbox.metadata.unwrap_or_default();
        let ip = status
            .status
            .and_then(|s| s.network)
            .and_then(|n| n.ip.parse().ok());
        pods.push(Pod {
            namespace: meta.namespace,
            name: meta.name,
            uid: meta.uid,
            sandbox: sandbox.id,
            netns,
            ip,
            source: Source::Cri(socket.to_path_buf()),
        });
    }
    Ok(pods)
}

/// The network namespace's path in a verbose PodSandboxStatus' "info" JSON (containerd: the
/// sandbox's OCI spec, runtimeSpec.linux.namespaces; CRI-O: the same spec under runtimeSpec).
fn netns_of_info(info: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(info).ok()?;
    v.pointer("/runtimeSpec/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")?
        .get("path")?
        .as_str()
        .filter(|p| !p.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_netns_path_is_read_from_containerds_verbose_info() {
        let info = r#"{"pid":42,"runtimeSpec":{"linux":{"namespaces":[
            {"type":"pid"},{"type":"ipc"},{"type":"uts"},
            {"type":"network","path":"/var/run/netns/cni-1b2c9e"}]}}}"#;
        assert_eq!(
            netns_of_info(info).as_deref(),
            Some("/var/run/netns/cni-1b2c9e")
        );
        let host_network = r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"}]}}}"#;
        assert_eq!(netns_of_info(host_network), None);
        assert_eq!(netns_of_info("not json"), None);
    }
}
