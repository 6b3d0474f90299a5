//! Test support for the etcd API tests: a throwaway CA (rcgen) with admin credentials on disk
//! for etcdctl, in-process eden nodes (Raft over mutual TLS plus the etcd client port), and a
//! real etcd 3.4 (`/usr/bin/etcd`) started on loopback in a temp dir.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use eden::etcd::pb::etcdserverpb as pb;
use eden::etcd::Backend;
use eden_raft::{NodeConfig, NodeId, NodeInfo, PeerServer, RaftNode};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub type KvClient = pb::kv_client::KvClient<tonic::transport::Channel>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "eden test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestCa { issuer }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        Arc::new(roots)
    }

    /// A certificate for `name` (SANs 127.0.0.1 and `name`), as DER pair and PEM pair.
    pub fn issue(
        &self,
        name: &str,
    ) -> (
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
        String,
        String,
    ) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let der_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.der().clone(), der_key, cert.pem(), key.serialize_pem())
    }

    /// Client-port TLS: a certificate from this CA is required.
    pub fn client_port_tls(&self, name: &str) -> Arc<rustls::ServerConfig> {
        let (cert, key, _, _) = self.issue(name);
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
            .build()
            .unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(vec![cert], key)
                .unwrap(),
        )
    }

    /// Peer TLS (server accepting optional client certs, client presenting one).
    pub fn peer_tls(&self, name: &str) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let (cert, key, _, _) = self.issue(name);
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
            .allow_unauthenticated()
            .build()
            .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.clone()], key.clone_key())
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots())
            .with_client_auth_cert(vec![cert], key)
            .unwrap();
        (Arc::new(server), Arc::new(client))
    }

    /// Writes `ca.crt`, `admin.crt`, `admin.key` into `dir` (the layout of `DATA/admin/`).
    pub fn write_admin(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let (_, _, cert, key) = self.issue("admin");
        std::fs::write(dir.join("ca.crt"), self.issuer.pem()).unwrap();
        std::fs::write(dir.join("admin.crt"), cert).unwrap();
        std::fs::write(dir.join("admin.key"), key).unwrap();
    }
}

/// One in-process eden node: Raft, its peer server, and the etcd client port.
pub struct EdenNode {
    pub id: NodeId,
    pub client_addr: String,
    pub node: Arc<RaftNode>,
    pub backend: Arc<Backend>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl EdenNode {
    pub async fn stop(mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.node.shutdown().await.unwrap();
    }
}

pub struct EdenCluster {
    pub nodes: Vec<EdenNode>,
    pub creds: PathBuf,
    pub tls: bool,
    _dir: tempfile::TempDir,
}

impl EdenCluster {
    /// Starts `n` nodes (ids 1..=n) as voters. With `tls`, the client port needs a certificate
    /// from the CA (admin credentials in `creds`); without, it serves plaintext on loopback.
    pub async fn start(n: u64, tls: bool) -> EdenCluster {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let creds = dir.path().join("admin");
        ca.write_admin(&creds);
        let mut nodes = Vec::new();
        for id in 1..=n {
            let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let info = NodeInfo {
                name: format!("node{id}"),
                peer_addr: peer.local_addr().unwrap().to_string(),
                client_addr: client.local_addr().unwrap().to_string(),
            };
            let (peer_server, peer_client) = ca.peer_tls(&info.name);
            let config = NodeConfig::new(
                id,
                info.clone(),
                dir.path().join(format!("n{id}")),
                peer_client,
            );
            let node = RaftNode::start(config).await.unwrap();
            let (stop_peer, peer_stopped) = oneshot::channel::<()>();
            let (stop_client, client_stopped) = oneshot::channel::<()>();
            let peer_node = node.clone();
            let backend = Backend::new(node.clone(), 0xeded);
            let fallback = Some(backend.clone().peer_fallback());
            let node_backend = backend.clone();
            let peer_task = tokio::spawn(async move {
                PeerServer::serve(peer, peer_server, peer_node, fallback, async {
                    let _ = peer_stopped.await;
                })
                .await
                .unwrap();
            });
            let client_tls = tls.then(|| ca.client_port_tls(&info.name));
            let client_task = tokio::spawn(async move {
                eden::etcd::serve(client, client_tls, backend, async {
                    let _ = client_stopped.await;
                })
                .await
                .unwrap();
            });
            nodes.push(EdenNode {
                id,
                client_addr: info.client_addr,
                node,
                backend: node_backend,
                stops: vec![stop_client, stop_peer],
                tasks: vec![client_task, peer_task],
            });
        }
        let first = nodes[0].node.clone();
        first
            .initialize(BTreeMap::from([(1, first.info().clone())]))
            .await
            .unwrap();
        wait_for(|| first.is_leader(), "node 1 to lead").await;
        for other in &nodes[1..] {
            first
                .add_learner(other.id, other.node.info().clone())
                .await
                .unwrap();
            first.promote(other.id).await.unwrap();
        }
        EdenCluster {
            nodes,
            creds,
            tls,
            _dir: dir,
        }
    }

    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.nodes[i].client_addr)
    }

    pub fn endpoints(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.endpoint(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs etcdctl (API v3) against `endpoints` with the admin credentials when TLS is on.
    pub fn etcdctl(&self, endpoints: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("/usr/bin/etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .arg("--dial-timeout=10s")
            .arg("--command-timeout=20s");
        if self.tls {
            cmd.arg(format!("--cacert={}", self.creds.join("ca.crt").display()))
                .arg(format!("--cert={}", self.creds.join("admin.crt").display()))
                .arg(format!("--key={}", self.creds.join("admin.key").display()));
        }
        cmd.args(args).output().unwrap()
    }

    pub async fn stop(self) {
        for n in self.nodes {
            n.stop().await;
        }
    }
}

/// Polls `cond` every 20 ms, for at most 30 s, then panics naming `what`.
pub async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    for _ in 0..1500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real etcd 3.4 on loopback (plaintext), killed on drop.
pub struct RealEtcd {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl RealEtcd {
    pub async fn start() -> RealEtcd {
        Self::start_with(&[]).await
    }

    /// Starts etcd with `extra` flags added.
    pub async fn start_with(extra: &[&str]) -> RealEtcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("/usr/bin/etcd")
            .arg("--name=ref")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=ref={peer_url}"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("/usr/bin/etcd must be installed (scripts/test installs etcd-server)");
        let etcd = RealEtcd {
            child,
            endpoint,
            _dir: dir,
        };
        for _ in 0..500 {
            if let Ok(mut c) = KvClient::connect(etcd.endpoint.clone()).await {
                if c.range(pb::RangeRequest {
                    key: b"probe".to_vec(),
                    ..Default::default()
                })
                .await
                .is_ok()
                {
                    return etcd;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("etcd did not come up on {}", etcd.endpoint);
    }
}

impl Drop for RealEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
