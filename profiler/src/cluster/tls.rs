//! The agents' TCP channel under mutual TLS 1.3: every node holds a certificate for its name,
//! signed by the cluster's own CA (`profiler agent --init-certs DIR --names ...`), and each end
//! refuses a peer whose certificate that CA did not sign. The client checks that the agent's
//! certificate is for the node it meant to reach; an agent takes any node of the cluster.

use std::{
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{
    crypto::{ring, CryptoProvider},
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

/// A peer that has not finished its handshake by then is dropped, so that nobody holds an
/// agent by connecting and saying nothing.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The cluster CA's file in a certificates directory.
pub const CA_FILE: &str = "ca.pem";
/// The CA's key: kept where certificates are made, never copied to the nodes.
const CA_KEY_FILE: &str = "ca.key";

/// What one node needs to speak to the others: the cluster's CA and its own certificate and
/// key (PEM). Serialized only to hand a lab's guest its identity over the serial channel.
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    pub node: String,
    ca: String,
    cert: String,
    key: String,
}

// Not derived: a key is not for logs.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "Identity({})", self.node)
    }
}

impl Identity {
    /// `node`'s identity from a certificates directory: DIR/ca.pem, DIR/NODE.pem, DIR/NODE.key.
    pub fn load(dir: &Path, node: &str) -> Result<Identity> {
        let read = |file: String| {
            let path = dir.join(&file);
            std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "cannot read {} (make the cluster's certificates with \
                     `profiler agent --init-certs {} --names {node},...`)",
                    path.display(),
                    dir.display()
                )
            })
        };
        Ok(Identity {
            node: node.to_string(),
            ca: read(CA_FILE.to_string())?,
            cert: read(format!("{node}.pem"))?,
            key: read(format!("{node}.key"))?,
        })
    }

    /// Writes this identity into `dir` as [`Identity::load`] reads it (the key readable by root
    /// only).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write(&dir.join(CA_FILE), &self.ca, 0o644)?;
        write(&dir.join(format!("{}.pem", self.node)), &self.cert, 0o644)?;
        write(&dir.join(format!("{}.key", self.node)), &self.key, 0o600)
    }

    fn parts(
        &self,
    ) -> Result<(
        RootCertStore,
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    )> {
        let node = &self.node;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.ca.as_bytes()) {
            roots
                .add(ca.with_context(|| format!("{node}'s CA certificate is not PEM"))?)
                .with_context(|| format!("{node}'s CA certificate is unusable"))?;
        }
        let chain = CertificateDer::pem_slice_iter(self.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{node}'s certificate is not PEM"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes())
            .with_context(|| format!("{node}'s key is not PEM"))?;
        if roots.is_empty() || chain.is_empty() {
            bail!("{node}'s identity lacks its CA or its certificate");
        }
        Ok((roots, chain, key))
    }

    /// An agent's side: presents this node's certificate, requires one the CA signed.
    pub fn acceptor(&self) -> Result<TlsAcceptor> {
        let (roots, chain, key) = self.parts()?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .context("cannot verify clients with this CA")?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .with_context(|| format!("{}'s certificate and key do not match", self.node))?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// The side that connects: presents this node's certificate, requires the agent's to be
    /// the CA's and for the node it names.
    pub fn connector(&self) -> Result<TlsConnector> {
        let (roots, chain, key) = self.parts()?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .with_context(|| format!("{}'s certificate and key do not match", self.node))?;
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// ring, which rustls deprecates for lacking post-quantum key exchange: aws-lc-rs has it but
/// adds minutes of C build to every fresh clone, and the agents' channel carries profiles and
/// run settings, not secrets that must stay secret for decades.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// An agent's handshake with a peer that connected, within [`HANDSHAKE_TIMEOUT`].
pub async fn accept(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
) -> Result<server::TlsStream<TcpStream>> {
    within_handshake_timeout(acceptor.accept(tcp)).await
}

/// The handshake with the agent of node `peer`, within [`HANDSHAKE_TIMEOUT`].
pub async fn connect(
    connector: &TlsConnector,
    tcp: TcpStream,
    peer: &str,
) -> Result<client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(peer.to_string())
        .with_context(|| format!("{peer} cannot be a certificate's name"))?;
    within_handshake_timeout(connector.connect(name, tcp)).await
}

/// Either side's handshake, its failure said as TLS's.
async fn within_handshake_timeout<T>(
    handshake: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| anyhow::anyhow!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("TLS: {e}"))
}

/// A new CA and an identity for each of `names` signed by it; the CA's key in PEM beside.
pub fn issue(names: &[String]) -> Result<(Vec<Identity>, String)> {
    for name in names {
        // The name the other end checks the certificate against (`connect`).
        if !matches!(
            ServerName::try_from(name.as_str()),
            Ok(ServerName::DnsName(_))
        ) {
            bail!(
                "node name {name:?} cannot name a certificate: letters, digits, '-' and '.' only"
            );
        }
    }
    let ca_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // A name of its own: a verifier looks an issuer up by name, and another cluster's CA of
    // the same name would read as a bad signature rather than an unknown issuer.
    let mut id = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(ca_key.public_key_raw(), &mut id);
    let name = format!(
        "profiler cluster CA {:016x}",
        std::hash::Hasher::finish(&id)
    );
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params);
    let ca_pem = params.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(params, &ca_key);
    let identities = names
        .iter()
        .map(|name| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(vec![name.clone()])
                .with_context(|| format!("{name} cannot be a certificate's name"))?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            // Every node is an agent to some and connects to others.
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            validity(&mut params);
            Ok(Identity {
                node: name.clone(),
                ca: ca_pem.clone(),
                cert: params.signed_by(&key, &issuer)?.pem(),
                key: key.serialize_pem(),
            })
        })
        .collect::<Result<_>>()?;
    Ok((identities, ca_key.serialize_pem()))
}

/// From a day ago (clocks differ) to two years on: certificates are renewed with the cluster.
fn validity(params: &mut CertificateParams) {
    const YEAR: u64 = 31_556_952;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let year = (1970 + now / YEAR) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
}

/// `profiler agent --init-certs DIR --names ...`: a cluster CA and each node's certificate and
/// key in DIR. Refuses to replace a CA that is there: its certificates may be on nodes.
pub fn init_dir(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>> {
    if dir.join(CA_KEY_FILE).exists() {
        bail!(
            "{} already holds a cluster CA: remove it first, or choose another directory",
            dir.display()
        );
    }
    let (identities, ca_key) = issue(names)?;
    let mut written = Vec::new();
    for id in &identities {
        id.save(dir)?;
        written.push(dir.join(format!("{}.pem", id.node)));
    }
    write(&dir.join(CA_KEY_FILE), &ca_key, 0o600)?;
    written.insert(0, dir.join(CA_FILE));
    Ok(written)
}

/// Writes `text` to `path` with `mode` from its creation (a key is never readable by others).
fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write as _;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// An agent for `server` on loopback: answers one byte with its double, once.
    async fn agent(
        server: &Identity,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<Result<()>>) {
        let acceptor = server.acceptor().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = accept(&acceptor, tcp).await?;
            let b = tls.read_u8().await?;
            tls.write_u8(b * 2).await?;
            tls.flush().await?;
            Ok(())
        });
        (addr, task)
    }

    async fn ask(client: &Identity, addr: std::net::SocketAddr, peer: &str) -> Result<u8> {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connect(&client.connector()?, tcp, peer).await?;
        tls.write_u8(21).await?;
        tls.flush().await?;
        Ok(tls.read_u8().await?)
    }

    #[tokio::test]
    async fn nodes_of_one_cluster_speak_and_others_are_refused_at_both_ends() {
        let names = ["host".to_string(), "vm1".to_string()];
        let (ids, _) = issue(&names).unwrap();
        let (addr, task) = agent(&ids[1]).await;
        assert_eq!(ask(&ids[0], addr, "vm1").await.unwrap(), 42);
        task.await.unwrap().unwrap();

        // Another cluster's host: the agent refuses its certificate, and it the agent's.
        let (other, _) = issue(&names).unwrap();
        let (addr, task) = agent(&ids[1]).await;
        let client = ask(&other[0], addr, "vm1").await.unwrap_err();
        let server = task.await.unwrap().unwrap_err();
        println!("client: {client:#}\nagent: {server:#}");
        assert!(
            format!("{client:#}").contains("UnknownIssuer"),
            "{client:#}"
        );
        assert!(format!("{server:#}").starts_with("TLS:"), "{server:#}");

        // The right cluster, but not the node the host meant to reach.
        let (addr, task) = agent(&ids[1]).await;
        let wrong = ask(&ids[0], addr, "vm2").await.unwrap_err();
        assert!(
            format!("{wrong:#}").contains("not valid for name \"vm2\""),
            "{wrong:#}"
        );
        let _ = task.await;
    }

    #[tokio::test]
    async fn a_peer_without_a_certificate_is_refused() {
        let (ids, _) = issue(&["vm1".to_string()]).unwrap();
        let (addr, task) = agent(&ids[0]).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"{\"setup\":[]}\n").await.unwrap();
        let e = task.await.unwrap().unwrap_err();
        assert!(format!("{e:#}").starts_with("TLS:"), "{e:#}");
    }

    #[test]
    fn a_directory_is_written_once_with_private_keys() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("profiler-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let names = ["host".to_string(), "node-b".to_string()];
        init_dir(&dir, &names).unwrap();
        for name in &names {
            let id = Identity::load(&dir, name).unwrap();
            id.acceptor().unwrap();
            id.connector().unwrap();
            let mode = std::fs::metadata(dir.join(format!("{name}.key")))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}.key");
        }
        let bad = init_dir(&dir.join("bad"), &["bad name!".to_string()]).unwrap_err();
        assert!(
            format!("{bad}").contains("cannot name a certificate"),
            "{bad}"
        );
        assert!(!dir.join("bad").exists());
        let again = init_dir(&dir, &names).unwrap_err();
        assert!(
            format!("{again}").contains("already holds a cluster CA"),
            "{again}"
        );
        let missing = Identity::load(&dir, "vm9").unwrap_err();
        assert!(
            format!("{missing:#}").contains("--init-certs"),
            "{missing:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
