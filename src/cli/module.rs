//! `eden module keygen|sign|verify|add`: signed extension modules (see `modules::ext`).
//!
//! - `keygen --out KEY` writes an ed25519 signing key (PEM, mode 0600) and `KEY.pub`, and prints
//!   the public key to add to the cluster's trusted keys.
//! - `sign FILE --key KEY` writes `FILE.sig`.
//! - `verify FILE --trust KEY...|--trusted-keys PATH` checks it as a run would; exit 1 if refused.
//! - `add FILE --tree DIR` verifies, then installs FILE and its signature as
//!   `DIR/_modules/<file>`, where `eden apply` finds it.
//! - With `--endpoints`, `add` stores the module in the datastore instead (one txn: the bytes
//!   at `/eden/blobs/<sha256>`, the record at `/eden/modules/<name>`), and `verify NAME` checks
//!   the stored module. Trusted keys then default to `module_keys` in `/eden/cluster/config`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use tonic::transport::Channel;

use crate::error::{Error, Result};
use crate::etcd::pb::etcdserverpb as pb;
use crate::modules::ext::{self, ModuleRecord, ModuleSignature, PublicKey, TrustedKeys};

#[derive(Args, Debug)]
pub struct ModuleArgs {
    #[command(subcommand)]
    pub command: ModuleCommand,
}

#[derive(Subcommand, Debug)]
pub enum ModuleCommand {
    /// Make a new ed25519 signing key: KEY (secret, 0600) and KEY.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a module file: writes FILE.sig (or --out).
    Sign {
        file: PathBuf,
        /// The signing key (PEM PKCS#8 ed25519, from `eden module keygen`).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Output names the module publishes (for `${{ steps.ID.NAME }}`); repeatable.
        #[arg(long = "publishes")]
        outputs: Vec<String>,
    },
    /// Check a module against its signature and the trusted keys, as every run does: FILE, or
    /// with --endpoints the module NAME in the datastore.
    Verify {
        file: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Verify a module, then install it (and its signature) into a state tree's _modules/
    /// (--tree), or store it in the datastore (--endpoints).
    Add {
        file: PathBuf,
        /// The state tree directory.
        #[arg(long, required_unless_present = "endpoints")]
        tree: Option<PathBuf>,
        /// The module name in the datastore (default: the file name without extension).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args, Debug)]
pub struct TrustArgs {
    /// The signature file (default FILE.sig).
    #[arg(long)]
    sig: Option<PathBuf>,
    /// A trusted public key (ed25519:BASE64); repeatable.
    #[arg(long = "trust")]
    keys: Vec<String>,
    /// A file of trusted public keys, one per line.
    #[arg(long)]
    trusted_keys: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct StoreArgs {
    /// An etcd v3 endpoint of the cluster (eden or etcd), e.g. https://127.0.0.1:2379.
    #[arg(long)]
    endpoints: Option<String>,
    /// Directory with ca.crt, admin.crt, admin.key for https endpoints.
    #[arg(long, env = "EDEN_CREDS")]
    creds: Option<PathBuf>,
}

impl TrustArgs {
    fn given(&self) -> bool {
        !self.keys.is_empty() || self.trusted_keys.is_some()
    }

    fn trusted(&self) -> Result<TrustedKeys> {
        let mut keys = match &self.trusted_keys {
            Some(p) => TrustedKeys::load_file(p)?,
            None => TrustedKeys::default(),
        };
        for k in &self.keys {
            keys.0.push(PublicKey::parse(k)?);
        }
        if keys.0.is_empty() {
            return Err(Error::InvalidInput(
                "no trusted keys: give --trust ed25519:... or --trusted-keys FILE".into(),
            ));
        }
        Ok(keys)
    }

    fn sig_path(&self, file: &Path) -> PathBuf {
        self.sig.clone().unwrap_or_else(|| sig_path_of(file))
    }
}

fn sig_path_of(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::NotFound(format!("cannot read {what} {}: {e}", path.display())))
}

/// Checks FILE; Ok(sha256) or the refusal.
fn check(file: &Path, trust: &TrustArgs) -> Result<(Vec<u8>, ModuleSignature, String)> {
    let bytes = read(file, "module")?;
    let sig_path = trust.sig_path(file);
    let sig_bytes = std::fs::read(&sig_path).map_err(|_| {
        Error::InvalidData(format!(
            "module {} refused: it is not signed (no {}); sign it with `eden module sign`",
            file.display(),
            sig_path.display()
        ))
    })?;
    let sig = ModuleSignature::parse(&sig_bytes, &sig_path.display().to_string())?;
    let sha = ext::verify(&file.display().to_string(), &bytes, &sig, &trust.trusted()?)?;
    Ok((bytes, sig, sha))
}

pub fn run(args: ModuleArgs) -> Result<i32> {
    match args.command {
        ModuleCommand::Keygen { out } => {
            let (pem, public) = ext::generate_key()?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .map_err(|e| {
                    Error::Io(format!(
                        "cannot create {} ({e}); choose a path that does not exist yet",
                        out.display()
                    ))
                })?;
            f.write_all(pem.as_bytes())?;
            f.sync_all()?;
            std::fs::write(sig_pub_path(&out), format!("{public}\n"))?;
            println!("{public}");
            Ok(0)
        }
        ModuleCommand::Sign {
            file,
            key,
            out,
            outputs,
        } => {
            let bytes = read(&file, "module")?;
            let pem = String::from_utf8_lossy(&read(&key, "signing key")?).into_owned();
            let pair = ext::parse_secret_key(&pem)?;
            let sig = ext::sign(&bytes, &pair, outputs);
            let out = out.unwrap_or_else(|| sig_path_of(&file));
            std::fs::write(&out, serde_json::to_string_pretty(&sig)? + "\n")?;
            println!(
                "signed {} (sha256 {}) with {}: {}",
                file.display(),
                sig.sha256,
                sig.key,
                out.display()
            );
            Ok(0)
        }
        ModuleCommand::Verify { file, trust, store } => {
            let checked = match &store.endpoints {
                Some(_) => block_on(verify_stored(&file.to_string_lossy(), &trust, &store)),
                None => check(&file, &trust).map(|(_, sig, sha)| (sig, sha)),
            };
            match checked {
                Ok((sig, sha)) => {
                    println!(
                        "{}: OK, sha256 {sha}, signed by {}",
                        file.display(),
                        sig.key
                    );
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("eden: {e}");
                    Ok(1)
                }
            }
        }
        ModuleCommand::Add {
            file,
            tree,
            name,
            trust,
            store,
        } => {
            let file_name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    Error::InvalidInput(format!("{} has no file name", file.display()))
                })?;
            if store.endpoints.is_some() {
                let name = name.unwrap_or_else(|| {
                    file_name
                        .split('.')
                        .next()
                        .unwrap_or(&file_name)
                        .to_string()
                });
                return block_on(add_stored(&file, &name, &trust, &store));
            }
            let tree = tree.expect("clap requires --tree without --endpoints");
            let (bytes, sig, sha) = check(&file, &trust)?;
            let dir = tree.join("_modules");
            std::fs::create_dir_all(&dir)?;
            let dest = dir.join(&file_name);
            crate::modules::file::write_atomic(&dest, &bytes, 0o755)?;
            crate::modules::file::write_atomic(
                &sig_path_of(&dest),
                (serde_json::to_string_pretty(&sig)? + "\n").as_bytes(),
                0o644,
            )?;
            println!("added {file_name} (sha256 {sha}) to {}", dir.display());
            Ok(0)
        }
    }
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

type Kv = pb::kv_client::KvClient<Channel>;

async fn connect(store: &StoreArgs) -> Result<Kv> {
    let raw = store
        .endpoints
        .as_deref()
        .unwrap_or("https://127.0.0.1:2379");
    let raw = raw.split(',').next().unwrap_or(raw);
    let url = super::client::url(raw, store.creds.is_some());
    let tls = if url.starts_with("https://") {
        let dir = store.creds.as_ref().ok_or_else(|| {
            Error::InvalidInput(format!(
                "{url} needs client credentials: give --creds DIR (with ca.crt, admin.crt, \
                 admin.key) or set EDEN_CREDS"
            ))
        })?;
        Some(super::client::tls(
            &dir.join("ca.crt"),
            Some((&dir.join("admin.crt"), &dir.join("admin.key"))),
        )?)
    } else {
        None
    };
    let ch = super::client::connect(
        &url,
        tls.as_ref(),
        Duration::from_secs(5),
        Duration::from_secs(30),
    )
    .await?;
    Ok(pb::kv_client::KvClient::new(ch))
}

async fn get(kv: &mut Kv, key: &str) -> Result<Option<Vec<u8>>> {
    let resp = kv
        .range(pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Unavailable(format!("reading {key}: {}", e.message())))?;
    Ok(resp.into_inner().kvs.into_iter().next().map(|kv| kv.value))
}

/// Trusted keys from the flags, else from `module_keys` in the cluster config.
async fn stored_trust(kv: &mut Kv, trust: &TrustArgs) -> Result<TrustedKeys> {
    if trust.given() {
        return trust.trusted();
    }
    let config = get(kv, ext::CLUSTER_CONFIG).await?.ok_or_else(|| {
        Error::NotFound(format!(
            "{} does not exist, so no module key is trusted; give --trust KEY",
            ext::CLUSTER_CONFIG
        ))
    })?;
    let config: serde_json::Value = serde_json::from_slice(&config)
        .map_err(|e| Error::InvalidData(format!("{} is not JSON: {e}", ext::CLUSTER_CONFIG)))?;
    let keys = TrustedKeys::from_cluster_config(&config)?;
    if keys.0.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{} trusts no module key (module_keys is empty); add one, or give --trust KEY",
            ext::CLUSTER_CONFIG
        )));
    }
    Ok(keys)
}

async fn verify_stored(
    name: &str,
    trust: &TrustArgs,
    store: &StoreArgs,
) -> Result<(ModuleSignature, String)> {
    let mut kv = connect(store).await?;
    let key = format!("{}{name}", ext::MODULES_PREFIX);
    let record = get(&mut kv, &key)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no module {name:?} ({key} does not exist)")))?;
    let record = ModuleRecord::parse(&record, name)?;
    let blob = match record.blob_key() {
        Some(k) => get(&mut kv, &k).await?,
        None => None,
    };
    let trusted = stored_trust(&mut kv, trust).await?;
    let sig = record.signature.clone();
    let source = record.into_source(blob)?;
    // A URL fetch runs on its own thread with its own runtime; blocking this single-threaded
    // runtime meanwhile is fine, nothing else runs on it.
    let (bytes, _) = source.fetch(&crate::modules::EmptyTree)?;
    let sha = ext::verify(name, &bytes, &sig, &trusted)?;
    Ok((sig, sha))
}

async fn add_stored(file: &Path, name: &str, trust: &TrustArgs, store: &StoreArgs) -> Result<i32> {
    let bytes = read(file, "module")?;
    let sig_path = trust.sig_path(file);
    let sig = ModuleSignature::parse(
        &read(&sig_path, "signature")?,
        &sig_path.display().to_string(),
    )?;
    let mut kv = connect(store).await?;
    let trusted = stored_trust(&mut kv, trust).await?;
    // Refuse here too, so a module that could never run is not stored.
    let sha = ext::verify(&file.display().to_string(), &bytes, &sig, &trusted)?;
    let record = ModuleRecord {
        signature: sig.clone(),
        source: "blob".into(),
    };
    let put = |key: String, value: Vec<u8>| pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.into_bytes(),
            value,
            ..Default::default()
        })),
    };
    let module_key = format!("{}{name}", ext::MODULES_PREFIX);
    kv.txn(pb::TxnRequest {
        compare: vec![],
        success: vec![
            put(format!("{}{sha}", ext::BLOBS_PREFIX), bytes),
            put(module_key.clone(), serde_json::to_vec(&record)?),
        ],
        failure: vec![],
    })
    .await
    .map_err(|e| Error::Unavailable(format!("storing {module_key}: {}", e.message())))?;
    println!(
        "added {name} (sha256 {sha}, signed by {}) as {module_key}",
        sig.key
    );
    Ok(0)
}

fn sig_pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}
