//! `fetch`: one HTTPS GET, for extension modules declared by URL.
//!
//! This is the one place a module reaches the network, and only to read a module's bytes, which
//! are then checked against their ed25519 signature before anything runs them; TLS here gives
//! privacy and early failure, not trust. The server is checked against the system roots
//! (`/etc/ssl/certs/ca-certificates.crt`) plus an optional PEM bundle. Only `https://` is
//! accepted; redirects are not followed; bodies over [`MAX_BYTES`] are refused; the whole fetch
//! has a [`TIMEOUT`].
//!
//! The fetch runs on its own thread with its own small tokio runtime, so it can be called from
//! plain threads and from inside an async runtime alike.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::error::{Error, Result};

pub const MAX_BYTES: usize = 64 << 20;
pub const TIMEOUT: Duration = Duration::from_secs(60);
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// GETs `url` (https only) and returns the body.
pub fn https_get(url: &str, extra_ca: Option<&Path>) -> Result<Vec<u8>> {
    let url = url.to_string();
    let extra_ca = extra_ca.map(Path::to_path_buf);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            tokio::time::timeout(TIMEOUT, get(&url, extra_ca.as_deref()))
                .await
                .map_err(|_| {
                    Error::Unavailable(format!("fetching {url}: no answer within {TIMEOUT:?}"))
                })?
        })
    })
    .join()
    .map_err(|_| Error::Internal("the https fetch thread panicked".into()))?
}

fn roots(extra_ca: Option<&Path>) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    let mut add = |pem: &[u8], what: &str| -> Result<()> {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::InvalidData(format!("{what}: {e}")))?;
            // One bad system certificate should not disable the others.
            let _ = store.add(cert);
        }
        Ok(())
    };
    if let Ok(pem) = std::fs::read(SYSTEM_ROOTS) {
        add(&pem, SYSTEM_ROOTS)?;
    }
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path).map_err(|e| {
            Error::NotFound(format!("cannot read the CA bundle {}: {e}", path.display()))
        })?;
        add(&pem, &path.display().to_string())?;
    }
    Ok(store)
}

async fn get(url: &str, extra_ca: Option<&Path>) -> Result<Vec<u8>> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| Error::InvalidInput(format!("{url:?} is not a URL: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(Error::InvalidInput(format!(
            "{url}: extension modules are fetched over https only"
        )));
    }
    let host = uri
        .host()
        .ok_or_else(|| Error::InvalidInput(format!("{url}: no host")))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Internal(format!("TLS setup: {e}")))?
    .with_root_certificates(roots(extra_ca)?)
    .with_no_client_auth();
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| Error::InvalidInput(format!("{url}: bad host name: {e}")))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| Error::Unavailable(format!("fetching {url}: cannot connect: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| Error::Unavailable(format!("fetching {url}: TLS: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| Error::Unavailable(format!("fetching {url}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let authority = uri
        .authority()
        .map(|a| a.as_str())
        .unwrap_or(&host)
        .to_string();
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, "eden")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| Error::Internal(format!("building the request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Error::Unavailable(format!("fetching {url}: {e}")))?;
    if !resp.status().is_success() {
        return Err(Error::NotFound(format!(
            "fetching {url}: the server answered {}",
            resp.status()
        )));
    }
    let body = Limited::new(resp.into_body(), MAX_BYTES)
        .collect()
        .await
        .map_err(|e| Error::Unavailable(format!("fetching {url}: {e}")))?;
    Ok(body.to_bytes().to_vec())
}
