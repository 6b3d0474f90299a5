//! How client commands reach the etcd API: endpoint URLs, TLS from the cluster's admin
//! credentials, and one connect with clear errors. Shared by `bench`, `cluster`, `module` and
//! `demo`.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, Result};

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", path.display())))
}

/// TLS trusting the CA in `cacert`, presenting the client certificate `(cert, key)` if given
/// (for example DATA/admin/{ca.crt,admin.crt,admin.key}).
pub fn tls(cacert: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientTlsConfig> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(cacert)?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

/// `raw` as a URL: kept if it has a scheme, else https:// with TLS and http:// without.
pub fn url(raw: &str, tls: bool) -> String {
    if raw.contains("://") {
        raw.to_string()
    } else if tls {
        format!("https://{raw}")
    } else {
        format!("http://{raw}")
    }
}

/// Connects to `url`; `timeout` bounds every request on the channel.
pub async fn connect(
    url: &str,
    tls: Option<&ClientTlsConfig>,
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::InvalidInput(format!("bad endpoint {url:?}: {e}")))?
        .connect_timeout(connect_timeout)
        .timeout(timeout);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| Error::InvalidInput(format!("TLS for {url}: {e}")))?;
    }
    endpoint.connect().await.map_err(|e| {
        Error::Unavailable(format!(
            "cannot connect to {url}: {e}; is an eden (or etcd) node listening there?"
        ))
    })
}
