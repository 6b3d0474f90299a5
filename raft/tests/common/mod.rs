//! Test support: a throwaway CA (rcgen) and in-process nodes serving peers over real mutual TLS
//! on loopback.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use eden_raft::{NodeConfig, NodeId, NodeInfo, PeerServer, RaftNode};
use eden_storage::{Command, PutRequest, RangeRequest};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

pub struct NodeTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestCa { issuer }
    }

    pub fn cert(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert()).unwrap();
        Arc::new(roots)
    }

    /// A node certificate for `name` with 127.0.0.1 as SAN, and its key.
    pub fn issue(&self, name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.der().clone(), key)
    }

    /// Server config with optional client certificates (like the cluster's, so `/join` works
    /// without one) and a client config presenting this CA's certificate for `name`.
    pub fn node_tls(&self, name: &str) -> NodeTls {
        let (cert, key) = self.issue(name);
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
        let client = client_config(self.roots(), Some((cert, key)));
        NodeTls {
            server: Arc::new(server),
            client: Arc::new(client),
        }
    }
}

/// A client config trusting `roots`, presenting `identity` if given.
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> rustls::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    }
}

pub fn info(id: NodeId, addr: &str) -> NodeInfo {
    NodeInfo {
        name: format!("node{id}"),
        peer_addr: addr.to_string(),
        client_addr: "127.0.0.1:0".to_string(),
    }
}

/// One in-process node: Raft plus its peer server.
pub struct TestNode {
    pub id: NodeId,
    pub addr: String,
    pub dir: PathBuf,
    pub node: Arc<RaftNode>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

pub type Tune = fn(&mut NodeConfig);

impl TestNode {
    /// Starts node `id` with data in `dir`, listening on `addr` (use "127.0.0.1:0" for a new
    /// port). Retries briefly while a previous incarnation is still releasing the data dir.
    pub async fn start(ca: &TestCa, id: NodeId, dir: &Path, addr: &str, tune: Tune) -> TestNode {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let tls = ca.node_tls(&format!("node{id}"));
        let mut config = NodeConfig::new(id, info(id, &addr), dir.to_path_buf(), tls.client);
        tune(&mut config);
        let mut attempts = 0;
        let node = loop {
            match RaftNode::start(config.clone()).await {
                Ok(n) => break n,
                Err(e) if attempts < 100 => {
                    attempts += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("node {id} did not start: {e}"),
            }
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let server_node = node.clone();
        let server = tokio::spawn(async move {
            PeerServer::serve(listener, tls.server, server_node, None, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        TestNode {
            id,
            addr,
            dir: dir.to_path_buf(),
            node,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops the node and returns its id, data dir and address, to start it again there with
    /// [`TestNode::start`].
    pub async fn stop_keeping_place(self) -> (NodeId, PathBuf, String) {
        let place = (self.id, self.dir.clone(), self.addr.clone());
        self.stop().await;
        place
    }

    /// Stops Raft and the peer server; the data dir stays.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            h.await.unwrap();
        }
        self.node.shutdown().await.unwrap();
    }
}

pub fn no_tuning(_: &mut NodeConfig) {}

/// Starts `n` nodes (ids 1..=n), initializes node 1 and adds the others as voters.
pub async fn cluster(ca: &TestCa, root: &Path, n: u64, tune: Tune) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for id in 1..=n {
        nodes
            .push(TestNode::start(ca, id, &root.join(format!("n{id}")), "127.0.0.1:0", tune).await);
    }
    let first = &nodes[0];
    first
        .node
        .initialize(BTreeMap::from([(1, first.node.info().clone())]))
        .await
        .unwrap();
    wait_for(|| first.node.is_leader(), "node 1 to lead").await;
    for other in &nodes[1..] {
        first
            .node
            .add_learner(other.id, other.node.info().clone())
            .await
            .unwrap();
        first.node.promote(other.id).await.unwrap();
    }
    nodes
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

pub fn put(key: &str, value: &str) -> Command {
    Command::Put(PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    })
}

/// The value of `key` in `node`'s local store.
pub fn local_get(node: &RaftNode, key: &str) -> Option<Vec<u8>> {
    let resp = node
        .store()
        .range(&RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })
        .unwrap();
    resp.kvs.into_iter().next().map(|kv| kv.value)
}
