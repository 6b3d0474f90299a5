//! The cluster's public-key infrastructure: one CA per cluster, a certificate per node, admin
//! client credentials, and the join token.
//!
//! ## What it owns
//! - [`ClusterCa`]: the CA certificate and key, made by `eden serve --init` (rcgen, ECDSA P-256).
//!   Every peer link and every client connection is verified against this one root.
//! - [`Identity`]: a certificate and its key, as PEM. Node certificates carry both the
//!   server-auth and client-auth usages (a node is a TLS server to its peers and a TLS client of
//!   them) and the hosts of the node's peer and client addresses as SANs, because the transport
//!   uses the host part of an address as the TLS server name.
//! - [`JoinToken`]: `eden1:<sha256 of the CA certificate (DER), hex>:<secret>`. The hash lets a
//!   joining node pin the CA before it trusts anything the cluster says; the secret proves the
//!   joiner was given the token. Only the secret's SHA-256 is kept by the cluster.
//! - The rustls configs built from these (`server_config`, `client_config`,
//!   [`pinned_client_config`]).
//!
//! ## What it does not do
//! No file I/O (the data dir does that, see `datadir.rs`) and no network.
//!
//! A node's key never leaves it: a joining node sends a certificate signing request
//! ([`new_key_and_csr`]) and the CA signs the public key in it with names the CA side chooses
//! ([`ClusterCa::sign_node_csr`]), so a joiner cannot ask for someone else's names.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};

/// The prefix of every join token; the version of its format.
pub const TOKEN_PREFIX: &str = "eden1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pki_err(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::Internal(format!("{what}: {e}"))
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` random bytes from the operating system's generator.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| Error::Internal("the system random generator failed".into()))?;
    Ok(buf)
}

/// A random non-zero u64 (node ids, cluster ids: never reused, as etcd's member ids).
pub fn random_id() -> Result<u64> {
    loop {
        let b = random_bytes(8)?;
        let id = u64::from_be_bytes(b.try_into().expect("8 bytes")) >> 1;
        if id != 0 {
            return Ok(id);
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Identity {
    pub fn cert_der(&self) -> Result<CertificateDer<'static>> {
        cert_der_from_pem(&self.cert_pem, "certificate")
    }

    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| Error::InvalidData(format!("private key PEM: {e}")))
    }
}

/// The first certificate in `pem`, as DER.
pub fn cert_der_from_pem(pem: &str, what: &str) -> Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Error::InvalidData(format!("{what} PEM: {e}")))
}

/// The cluster CA: its certificate and signing key.
pub struct ClusterCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
}

impl ClusterCa {
    /// A new CA for the cluster named `cluster`, valid for about 10 years.
    pub fn create(cluster: &str) -> Result<ClusterCa> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err("CA"))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("eden cluster CA ({cluster})"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (not_before, not_after) = validity(3650);
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(pki_err("CA key"))?;
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(pki_err("CA cert"))?;
        let cert_pem = issuer.pem();
        ClusterCa::from_pem(&cert_pem, &key_pem)
    }

    /// The CA from its certificate and key PEM (as stored in `DATA/tls/`).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| Error::InvalidData(format!("CA key PEM: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| Error::InvalidData(format!("CA certificate PEM: {e}")))?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_string(),
            cert_der: cert_der_from_pem(cert_pem, "CA certificate")?,
            issuer,
            key_pem: key_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// SHA-256 of the CA certificate's DER, hex: what a join token pins.
    pub fn fingerprint(&self) -> String {
        sha256_hex(&self.cert_der)
    }

    /// A node certificate for `name`, with `hosts` (IPs or DNS names) as SANs, and a new key.
    /// Used for the node that creates the cluster; joining nodes use [`Self::sign_node_csr`].
    pub fn issue_node(&self, name: &str, hosts: &[String]) -> Result<Identity> {
        let key = KeyPair::generate().map_err(pki_err("node key"))?;
        let cert = node_params(name, hosts)?
            .signed_by(&key, &self.issuer)
            .map_err(pki_err("node certificate"))?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs the public key of a joining node's CSR. The names come from the CA side (`name`,
    /// `hosts`), never from the request. A CSR whose signature does not verify is refused.
    pub fn sign_node_csr(&self, csr_pem: &str, name: &str, hosts: &[String]) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::InvalidInput(format!("the join request's CSR: {e}")))?;
        let cert = node_params(name, hosts)?
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(pki_err("node certificate"))?;
        Ok(cert.pem())
    }

    /// Client credentials for an operator (etcdctl `--cert/--key`), CN `user`.
    pub fn issue_client(&self, user: &str) -> Result<Identity> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err("client"))?;
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let (not_before, not_after) = validity(3650);
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(pki_err("client key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(pki_err("client certificate"))?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that disagree by a few minutes.
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(days),
    )
}

fn node_params(name: &str, hosts: &[String]) -> Result<CertificateParams> {
    let mut sans: Vec<String> = hosts.to_vec();
    sans.push(name.to_string());
    sans.push("localhost".into());
    sans.sort();
    sans.dedup();
    let mut params = CertificateParams::new(sans)
        .map_err(|e| Error::InvalidInput(format!("node names {hosts:?}: {e}")))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let (not_before, not_after) = validity(3650);
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// A new key pair and a CSR for it (PEM), made by a joining node. The key stays with the node.
pub fn new_key_and_csr(name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(pki_err("node key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err("CSR"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key).map_err(pki_err("CSR"))?;
    let csr_pem = csr.pem().map_err(pki_err("CSR PEM"))?;
    Ok((key.serialize_pem(), csr_pem))
}

/// `eden1:<CA sha256 hex>:<secret hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_sha256: String,
    pub secret: String,
}

impl JoinToken {
    /// A token for the CA with `fingerprint`, with a new 256-bit secret.
    pub fn generate(fingerprint: &str) -> Result<JoinToken> {
        Ok(JoinToken {
            ca_sha256: fingerprint.to_string(),
            secret: hex(&random_bytes(32)?),
        })
    }

    pub fn parse(s: &str) -> Result<JoinToken> {
        let bad = |why: &str| {
            Error::InvalidInput(format!(
                "bad join token: {why}; a token looks like {TOKEN_PREFIX}:<64 hex digits>:<secret> \
                 and is printed by `eden serve --init` (also in DATA/admin/join-token)"
            ))
        };
        let mut parts = s.trim().splitn(3, ':');
        let (Some(prefix), Some(hash), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("it does not have three ':'-separated parts"));
        };
        if prefix != TOKEN_PREFIX {
            return Err(bad(&format!(
                "it starts with {prefix:?}, not {TOKEN_PREFIX:?}"
            )));
        }
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("the CA hash is not 64 hex digits"));
        }
        if secret.len() < 16 {
            return Err(bad("the secret is too short"));
        }
        Ok(JoinToken {
            ca_sha256: hash.to_ascii_lowercase(),
            secret: secret.to_string(),
        })
    }

    /// What the cluster keeps to check the secret.
    pub fn secret_sha256(&self) -> String {
        sha256_hex(self.secret.as_bytes())
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{TOKEN_PREFIX}:{}:{}", self.ca_sha256, self.secret)
    }
}

/// True when `secret`'s SHA-256 is `expected_sha256`, compared in constant time.
pub fn secret_matches(secret: &str, expected_sha256: &str) -> bool {
    let got = sha256_hex(secret.as_bytes());
    // Every byte is looked at whatever the first difference, so timing does not tell where
    // a guess went wrong.
    got.len() == expected_sha256.len()
        && got
            .bytes()
            .zip(expected_sha256.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots
        .add(cert_der_from_pem(ca_pem, "CA certificate")?)
        .map_err(|e| Error::InvalidData(format!("CA certificate: {e}")))?;
    Ok(Arc::new(roots))
}

/// A TLS server config presenting `identity` (with the CA appended to the chain, so a joining
/// node can pin it) and verifying client certificates against the CA. With `client_optional`,
/// clients without a certificate are let in (the peer port's join routes need that; its Raft
/// routes still demand one).
pub fn server_config(
    ca_pem: &str,
    identity: &Identity,
    client_optional: bool,
) -> Result<Arc<rustls::ServerConfig>> {
    let builder = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider());
    let verifier = if client_optional {
        builder.allow_unauthenticated().build()
    } else {
        builder.build()
    }
    .map_err(|e| Error::Internal(format!("client verifier: {e}")))?;
    let chain = vec![
        identity.cert_der()?,
        cert_der_from_pem(ca_pem, "CA certificate")?,
    ];
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, identity.key_der()?)
        .map_err(|e| Error::InvalidData(format!("node certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

/// A TLS client config trusting only the cluster CA and presenting `identity`.
pub fn client_config(ca_pem: &str, identity: &Identity) -> Result<Arc<rustls::ClientConfig>> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(vec![identity.cert_der()?], identity.key_der()?)
        .map_err(|e| Error::InvalidData(format!("certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

/// A TLS client config for a node that has only a join token: it accepts the server only if
/// the chain it sends holds a CA whose SHA-256 is `ca_sha256`, and the server's certificate
/// verifies against that CA. No client certificate is presented.
pub fn pinned_client_config(ca_sha256: &str) -> Result<Arc<rustls::ClientConfig>> {
    let verifier = Arc::new(PinnedCa {
        ca_sha256: ca_sha256.to_string(),
        provider: provider(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts a server whose chain carries the pinned CA and whose leaf that CA signed.
#[derive(Debug)]
struct PinnedCa {
    ca_sha256: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| sha256_hex(c) == self.ca_sha256)
        else {
            return Err(rustls::Error::General(format!(
                "the server's CA does not have the SHA-256 {} that the join token pins; \
                 this is not the cluster the token was made for",
                self.ca_sha256
            )));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("pinned CA verifier: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_bad_tokens_name_the_problem() {
        let t = JoinToken::generate(&"ab".repeat(32)).unwrap();
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
        for (bad, why) in [
            ("eden2:00:secretsecretsecret", "not \"eden1\""),
            ("eden1:abc:secretsecretsecret", "64 hex digits"),
            ("eden1", "three"),
            (&format!("eden1:{}:short", "a".repeat(64)), "too short"),
        ] {
            let e = JoinToken::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(secret_matches(&t.secret, &t.secret_sha256()));
        assert!(!secret_matches("other", &t.secret_sha256()));
    }

    #[test]
    fn csr_is_signed_with_the_ca_names_and_verifies() {
        let ca = ClusterCa::create("test").unwrap();
        let again = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        let (key_pem, csr) = new_key_and_csr("n2").unwrap();
        let cert_pem = again
            .sign_node_csr(&csr, "n2", &["127.0.0.1".into()])
            .unwrap();
        let id = Identity { cert_pem, key_pem };
        // The issued certificate works as a server certificate under the CA.
        server_config(ca.cert_pem(), &id, false).unwrap();
        client_config(ca.cert_pem(), &id).unwrap();
        assert!(ca.sign_node_csr("not a csr", "n2", &[]).is_err());
    }
}
