//! `ext`: signed extension modules, executables that speak JSON.
//!
//! An extension module is any executable (a script with a `#!` line, or a binary). eden runs it
//! with a request on stdin and reads the reply from stdout:
//!
//! ```text
//! stdin:  {"function": "greet", "args": {"name": "x", ...}, "test": false}
//! stdout: {"result": true, "changes": {...}, "comment": "...", "outputs": {...}}
//! ```
//!
//! `result` may be `null` in test mode (Salt's "would change"). A non-zero exit, or stdout that is
//! not such a reply, fails the step with the module's stderr in the comment.
//!
//! **Trust.** A module runs only if its bytes are signed by a key the cluster trusts:
//! 1. the module's bytes are read fresh from its [`ModuleSource`] before **every** run;
//! 2. [`verify`] (pure: bytes, signature and trusted keys in, verdict out) hashes them with
//!    SHA-256, checks the hash is the one signed, that the signing key is trusted, and the
//!    ed25519 signature over [`signed_message`];
//! 3. only then are **the verified bytes** (not the path they came from, which could change in
//!    between) written to a private 0700 directory and executed.
//!
//! A module that fails any check is refused with an error that says which check and what to do,
//! and is never executed.
//!
//! Keys: a signing key is an ed25519 PKCS#8 document in PEM (`-----BEGIN PRIVATE KEY-----`,
//! what `eden module keygen` writes and `openssl genpkey -algorithm ed25519` makes); a public
//! key is written `ed25519:<base64 of the 32 key bytes>`. A signature file (`<module>.sig`) is
//! JSON: `{"sha256": hex, "key": "ed25519:...", "signature": base64, "outputs": [...]}`.
//! `outputs` only declares which `${{ steps.ID.x }}` names the module publishes; it is not
//! security relevant, so it is not signed.
//!
//! Sources ([`ModuleSource`]):
//! - `StateTree`: `_modules/<file>` in the state tree, signature in `_modules/<file>.sig`.
//! - `Datastore`: bytes and signature the caller read from `/eden/modules/<name>` and
//!   `/eden/blobs/<sha256>`; modules never touch the store themselves (see the layering rules).
//! - `Url`: an `https://` URL, fetched with rustls; the signature comes with the declaration.
//!
//! Not done: a per-call timeout for extension modules, resource limits, running as another user.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{Args, Call, Module, Outcome, Registry, SourceTree};
use crate::error::{Error, Result};

/// An ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses `ed25519:<base64>`.
    pub fn parse(text: &str) -> Result<PublicKey> {
        let text = text.trim();
        let bad = |why: &str| {
            Error::InvalidInput(format!(
                "{text:?} is not an eden public key ({why}); keys look like ed25519:<base64>, \
                 as `eden module keygen` prints them"
            ))
        };
        let b64 = text
            .strip_prefix("ed25519:")
            .ok_or_else(|| bad("no ed25519: prefix"))?;
        let bytes = B64.decode(b64).map_err(|_| bad("not base64"))?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| bad("not 32 bytes"))?;
        Ok(PublicKey(key))
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ed25519:{}", B64.encode(self.0))
    }
}

/// The keys a cluster trusts to sign modules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys(pub Vec<PublicKey>);

impl TrustedKeys {
    /// One key per line; blank lines and `#` comments are skipped.
    pub fn parse_lines(text: &str) -> Result<TrustedKeys> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(PublicKey::parse)
            .collect::<Result<Vec<_>>>()
            .map(TrustedKeys)
    }

    pub fn load_file(path: &Path) -> Result<TrustedKeys> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::NotFound(format!(
                "cannot read the trusted module keys {}: {e}",
                path.display()
            ))
        })?;
        Self::parse_lines(&text)
    }

    /// The `module_keys` list of the cluster config (`/eden/cluster/config`, JSON).
    pub fn from_cluster_config(config: &Value) -> Result<TrustedKeys> {
        match config.get("module_keys") {
            None | Some(Value::Null) => Ok(TrustedKeys::default()),
            Some(Value::Array(keys)) => keys
                .iter()
                .map(|k| {
                    k.as_str().map(PublicKey::parse).unwrap_or_else(|| {
                        Err(Error::InvalidData(format!(
                            "/eden/cluster/config: module_keys holds {k}, not a key string"
                        )))
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(TrustedKeys),
            Some(other) => Err(Error::InvalidData(format!(
                "/eden/cluster/config: module_keys must be a list of keys, not {other}"
            ))),
        }
    }
}

/// A module's signature, as stored in `<module>.sig` and in `/eden/modules/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSignature {
    /// SHA-256 of the module's bytes, lowercase hex.
    pub sha256: String,
    /// The signing key, `ed25519:<base64>`.
    pub key: String,
    /// ed25519 signature of [`signed_message`], base64.
    pub signature: String,
    /// Output names the module publishes (not signed; only for compile-time checks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
}

impl ModuleSignature {
    pub fn parse(bytes: &[u8], what: &str) -> Result<ModuleSignature> {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::InvalidData(format!(
                "{what} is not an eden module signature ({e}); make one with `eden module sign`"
            ))
        })
    }
}

/// Where the datastore keeps modules, their bytes and the trusted keys.
pub const MODULES_PREFIX: &str = "/eden/modules/";
pub const BLOBS_PREFIX: &str = "/eden/blobs/";
pub const CLUSTER_CONFIG: &str = "/eden/cluster/config";

/// The value of `/eden/modules/<name>`: the signature, and where the bytes are: `"blob"`
/// (`/eden/blobs/<sha256>`) or an `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    #[serde(flatten)]
    pub signature: ModuleSignature,
    pub source: String,
}

impl ModuleRecord {
    pub fn parse(bytes: &[u8], name: &str) -> Result<ModuleRecord> {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::InvalidData(format!(
                "{MODULES_PREFIX}{name} is not a module record ({e}); add modules with \
                 `eden module add`"
            ))
        })
    }

    /// The blob key this record's bytes live under, when they are in the datastore.
    pub fn blob_key(&self) -> Option<String> {
        (self.source == "blob").then(|| format!("{BLOBS_PREFIX}{}", self.signature.sha256))
    }

    /// The source to run from: the blob the caller read from [`Self::blob_key`], or the URL.
    pub fn into_source(self, blob: Option<Vec<u8>>) -> Result<ModuleSource> {
        if self.source == "blob" {
            let blob = blob.ok_or_else(|| {
                Error::NotFound(format!(
                    "module blob {BLOBS_PREFIX}{} is missing; add the module again with \
                     `eden module add`",
                    self.signature.sha256
                ))
            })?;
            Ok(ModuleSource::Datastore {
                blob: Arc::new(blob),
                signature: self.signature,
            })
        } else if self.source.starts_with("https://") {
            Ok(ModuleSource::Url {
                url: self.source,
                signature: self.signature,
                ca: None,
            })
        } else {
            Err(Error::InvalidData(format!(
                "module record source {:?} is neither \"blob\" nor an https:// URL",
                self.source
            )))
        }
    }
}

/// The bytes that are signed: a fixed prefix (so a module signature can never be mistaken for
/// any other ed25519 signature) and the hex SHA-256.
pub fn signed_message(sha256_hex: &str) -> Vec<u8> {
    format!("eden-module-v1 sha256:{sha256_hex}").into_bytes()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new signing key: (PEM of the PKCS#8 secret key, public key).
pub fn generate_key() -> Result<(String, PublicKey)> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| Error::Internal("cannot generate an ed25519 key".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| Error::Internal(format!("generated key rejected: {e}")))?;
    let public = PublicKey(pair.public_key().as_ref().try_into().expect("32 bytes"));
    let b64 = B64.encode(pkcs8.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).expect("base64 is ascii"));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok((pem, public))
}

/// Reads a PEM `PRIVATE KEY` (PKCS#8 v1 or v2, ed25519).
pub fn parse_secret_key(pem: &str) -> Result<Ed25519KeyPair> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "-----BEGIN PRIVATE KEY-----")
        .skip(1)
        .take_while(|l| *l != "-----END PRIVATE KEY-----")
        .collect();
    let der = B64.decode(body.as_bytes()).map_err(|_| {
        Error::InvalidInput(
            "the signing key is not a PEM PRIVATE KEY; make one with `eden module keygen`".into(),
        )
    })?;
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| {
        Error::InvalidInput(format!(
            "the signing key is not an ed25519 PKCS#8 key ({e}); make one with `eden module keygen`"
        ))
    })
}

/// Signs a module's bytes.
pub fn sign(bytes: &[u8], key: &Ed25519KeyPair, outputs: Vec<String>) -> ModuleSignature {
    let sha256 = sha256_hex(bytes);
    let sig = key.sign(&signed_message(&sha256));
    ModuleSignature {
        sha256,
        key: PublicKey(key.public_key().as_ref().try_into().expect("32 bytes")).to_string(),
        signature: B64.encode(sig.as_ref()),
        outputs,
    }
}

/// Checks a module before it may run. Pure. Returns the verified SHA-256. `what` names the
/// module in messages.
pub fn verify(
    what: &str,
    bytes: &[u8],
    sig: &ModuleSignature,
    trusted: &TrustedKeys,
) -> Result<String> {
    let actual = sha256_hex(bytes);
    if actual != sig.sha256 {
        return Err(Error::InvalidData(format!(
            "module {what} refused: its sha256 is {actual} but its signature is for {}; the \
             module changed after it was signed (sign it again with `eden module sign`, or \
             restore the signed file)",
            sig.sha256
        )));
    }
    let key = PublicKey::parse(&sig.key)
        .map_err(|e| Error::InvalidData(format!("module {what} refused: {e}")))?;
    if !trusted.0.contains(&key) {
        return Err(Error::InvalidData(format!(
            "module {what} refused: it is signed by {key}, which this cluster does not trust \
             (trusted: {}); add the key to module_keys in /eden/cluster/config, or sign with a \
             trusted key",
            if trusted.0.is_empty() {
                "none".to_string()
            } else {
                trusted
                    .0
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )));
    }
    let raw = B64.decode(sig.signature.trim()).map_err(|_| {
        Error::InvalidData(format!(
            "module {what} refused: its signature is not base64"
        ))
    })?;
    UnparsedPublicKey::new(&ED25519, key.0)
        .verify(&signed_message(&actual), &raw)
        .map_err(|_| {
            Error::InvalidData(format!(
                "module {what} refused: the ed25519 signature by {key} does not verify; the \
                 signature file was altered or made for other bytes (sign again with \
                 `eden module sign`)"
            ))
        })?;
    Ok(actual)
}

/// Where a module's bytes and signature come from. They are fetched again before every run.
#[derive(Debug, Clone)]
pub enum ModuleSource {
    /// `path` in the state tree (e.g. `_modules/greet.sh`); the signature is `path` + `.sig`.
    StateTree { path: String },
    /// What the caller read from the datastore: the blob and the record's signature.
    Datastore {
        blob: Arc<Vec<u8>>,
        signature: ModuleSignature,
    },
    /// An `https://` URL; `ca` adds a PEM CA bundle to the system roots.
    Url {
        url: String,
        signature: ModuleSignature,
        ca: Option<PathBuf>,
    },
}

impl ModuleSource {
    /// The module's bytes and signature, as they are now.
    pub fn fetch(&self, tree: &dyn SourceTree) -> Result<(Vec<u8>, ModuleSignature)> {
        match self {
            ModuleSource::StateTree { path } => {
                let bytes = tree.read(path)?;
                let sig_path = format!("{path}.sig");
                let sig = match tree.read(&sig_path) {
                    Ok(b) => ModuleSignature::parse(&b, &sig_path)?,
                    Err(Error::NotFound(_)) => {
                        return Err(Error::InvalidData(format!(
                            "module {path} refused: it is not signed (no {sig_path}); sign it \
                             with `eden module sign {path} --key KEY`"
                        )))
                    }
                    Err(e) => return Err(e),
                };
                Ok((bytes, sig))
            }
            ModuleSource::Datastore { blob, signature } => {
                Ok((blob.as_ref().clone(), signature.clone()))
            }
            ModuleSource::Url { url, signature, ca } => Ok((
                super::fetch::https_get(url, ca.as_deref())?,
                signature.clone(),
            )),
        }
    }

    fn describe(&self) -> String {
        match self {
            ModuleSource::StateTree { path } => path.clone(),
            ModuleSource::Datastore { signature, .. } => format!("blob {}", signature.sha256),
            ModuleSource::Url { url, .. } => url.clone(),
        }
    }
}

/// One extension module in the registry.
pub struct ExtModule {
    name: &'static str,
    source: ModuleSource,
    trusted: Arc<TrustedKeys>,
    outputs: &'static [&'static str],
}

impl ExtModule {
    /// `name` and `outputs` live as long as the process (the registry hands out `'static`
    /// names); they are interned, so an agent that registers a tree's modules for every run
    /// does not grow.
    pub fn new(
        name: &str,
        source: ModuleSource,
        trusted: Arc<TrustedKeys>,
        outputs: &[String],
    ) -> Result<ExtModule> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(Error::InvalidInput(format!(
                "extension module name {name:?}: use lowercase letters, digits and _"
            )));
        }
        let outputs: Vec<&'static str> = outputs.iter().map(|o| intern(o)).collect();
        Ok(ExtModule {
            name: intern(name),
            source,
            trusted,
            outputs: intern_list(outputs),
        })
    }
}

/// One `'static` copy of each string, made on first use.
fn intern(s: &str) -> &'static str {
    static SEEN: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = seen.get(s) {
        return found;
    }
    let leaked: &'static str = Box::leak(s.to_string().into_boxed_str());
    seen.insert(leaked);
    leaked
}

/// One `'static` copy of each list of interned strings.
fn intern_list(list: Vec<&'static str>) -> &'static [&'static str] {
    type Lists = std::collections::BTreeSet<&'static [&'static str]>;
    static SEEN: std::sync::Mutex<Lists> = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = seen.get(list.as_slice()) {
        return found;
    }
    let leaked: &'static [&'static str] = Box::leak(list.into_boxed_slice());
    seen.insert(leaked);
    leaked
}

impl Module for ExtModule {
    fn name(&self) -> &'static str {
        self.name
    }
    fn functions(&self) -> &'static [&'static str] {
        // Any function: the module itself says whether it has it.
        &[]
    }
    fn validate(&self, function: &str, _args: &Args) -> Result<()> {
        if function.is_empty()
            || !function
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(Error::InvalidInput(format!(
                "{}.{function}: a function name is letters, digits and _",
                self.name
            )));
        }
        Ok(())
    }
    fn outputs(&self, _function: &str) -> &'static [&'static str] {
        self.outputs
    }
    fn call(&self, call: &Call) -> Result<Outcome> {
        let what = format!("{} ({})", self.name, self.source.describe());
        let (bytes, sig) = self.source.fetch(call.tree)?;
        verify(&what, &bytes, &sig, &self.trusted)?;
        let request = json!({
            "function": call.function,
            "args": Value::Object(call.args.clone()),
            "test": call.test,
        });
        run_verified(&what, &bytes, &request)
    }
}

static RUN_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes verified bytes to a fresh private directory and runs them with the request.
fn run_verified(what: &str, bytes: &[u8], request: &Value) -> Result<Outcome> {
    let dir = std::env::temp_dir().join(format!(
        "eden-ext-{}-{}",
        std::process::id(),
        RUN_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let result = (|| {
        let exe = dir.join("module");
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o700)
                .open(&exe)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        spawn_with_request(what, &exe, request)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn spawn_with_request(what: &str, exe: &Path, request: &Value) -> Result<Outcome> {
    // Another thread may have forked while our write descriptor was open; the child holds it
    // until its exec, and exec of a file open for writing fails with ETXTBSY. Retry briefly.
    let mut tries = 0;
    let mut child = loop {
        let spawned = Command::new(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => {
                return Err(Error::Io(format!(
                    "module {what}: cannot execute it ({e}); a script needs a #! line"
                )))
            }
        }
    };
    let input = serde_json::to_vec(request)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Write on a thread so a module that replies before reading all input cannot deadlock us.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        return Ok(Outcome::failed(format!(
            "module {what} exited with {}: {stderr}",
            out.status
        )));
    }
    parse_reply(what, &out.stdout, &stderr)
}

/// Parses a module's reply.
pub fn parse_reply(what: &str, stdout: &[u8], stderr: &str) -> Result<Outcome> {
    let bad = |why: String| {
        Ok(Outcome::failed(format!(
            "module {what} did not reply with {{result, changes, comment, outputs}} JSON: \
             {why}{}",
            if stderr.is_empty() {
                String::new()
            } else {
                format!(" (stderr: {stderr})")
            }
        )))
    };
    let reply: Value = match serde_json::from_slice(stdout) {
        Ok(v) => v,
        Err(e) => return bad(e.to_string()),
    };
    let Value::Object(m) = reply else {
        return bad("not an object".into());
    };
    let result = match m.get("result") {
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::Null) | None => None,
        Some(other) => return bad(format!("result is {other}")),
    };
    let changes = match m.get("changes") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(other) => return bad(format!("changes is {other}, not an object")),
    };
    let comment = match m.get("comment") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let outputs = match m.get("outputs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(other) => return bad(format!("outputs is {other}, not an object")),
    };
    Ok(Outcome {
        result,
        changes,
        comment,
        outputs,
    })
}

/// Where `eden apply --local` reads the keys it trusts to sign modules, one per line: the file
/// named by `EDEN_MODULE_KEYS`, else this file if it exists.
pub const LOCAL_KEYS_FILE: &str = "/etc/eden/module-keys";

/// The trusted keys for a run without a cluster (see [`LOCAL_KEYS_FILE`]). None trusted when
/// there is no such file: every extension module is then refused, with an error that says why.
pub fn local_trusted_keys() -> Result<TrustedKeys> {
    match std::env::var_os("EDEN_MODULE_KEYS") {
        Some(path) => TrustedKeys::load_file(Path::new(&path)),
        None if Path::new(LOCAL_KEYS_FILE).exists() => {
            TrustedKeys::load_file(Path::new(LOCAL_KEYS_FILE))
        }
        None => Ok(TrustedKeys::default()),
    }
}

/// The registry for `eden apply --local TREE`: the built-in modules plus the tree's
/// `_modules/`, trusting [`local_trusted_keys`].
pub fn registry_for_local_tree(tree_root: &Path) -> Result<Registry> {
    let mut registry = Registry::builtin();
    register_tree_modules(&mut registry, tree_root, Arc::new(local_trusted_keys()?))?;
    Ok(registry)
}

/// Registers every module in a local state tree's `_modules/` directory (`<file>` with its
/// `<file>.sig`; the module is named after the file without its extension). Nothing is
/// verified or run here: that happens before every call. Returns the names registered.
pub fn register_tree_modules(
    registry: &mut Registry,
    tree_root: &Path,
    trusted: Arc<TrustedKeys>,
) -> Result<Vec<String>> {
    let dir = tree_root.join("_modules");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let files: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    register_modules(
        registry,
        files,
        &|sig| std::fs::read(dir.join(sig)).ok(),
        trusted,
    )
}

/// Registers the extension modules of a state tree that is not on the local disk (a cluster
/// run's blobs): every `_modules/<file>` among `paths`, read through `tree` when called.
pub fn register_modules_in(
    registry: &mut Registry,
    tree: &dyn crate::modules::SourceTree,
    paths: impl Iterator<Item = String>,
    trusted: Arc<TrustedKeys>,
) -> Result<Vec<String>> {
    let files: Vec<String> = paths
        .filter_map(|p| p.strip_prefix("_modules/").map(str::to_string))
        .filter(|f| !f.contains('/'))
        .collect();
    register_modules(
        registry,
        files,
        &|sig| tree.read(&format!("_modules/{sig}")).ok(),
        trusted,
    )
}

/// `files`: names in `_modules/`; `read_sig` reads one of them (for the declared outputs).
fn register_modules(
    registry: &mut Registry,
    mut files: Vec<String>,
    read_sig: &dyn Fn(&str) -> Option<Vec<u8>>,
    trusted: Arc<TrustedKeys>,
) -> Result<Vec<String>> {
    files.retain(|n| !n.ends_with(".sig") && !n.starts_with('.'));
    files.sort();
    let mut names = Vec::new();
    for file in files {
        let name = file.split('.').next().unwrap_or(&file).to_string();
        if registry.get(&name).is_some() {
            return Err(Error::InvalidInput(format!(
                "_modules/{file}: an extension module may not replace the module {name:?}; \
                 rename it"
            )));
        }
        let rel = format!("_modules/{file}");
        // Declared outputs come from the signature file when it is readable.
        let outputs = read_sig(&format!("{file}.sig"))
            .and_then(|b| ModuleSignature::parse(&b, &rel).ok())
            .map(|s| s.outputs)
            .unwrap_or_default();
        let module = ExtModule::new(
            &name,
            ModuleSource::StateTree { path: rel },
            trusted.clone(),
            &outputs,
        )?;
        registry.register(Arc::new(module));
        names.push(name);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify_and_every_refusal() {
        let (pem, public) = generate_key().unwrap();
        let key = parse_secret_key(&pem).unwrap();
        let (_, other) = generate_key().unwrap();
        let bytes = b"#!/bin/sh\necho '{}'\n";
        let sig = sign(bytes, &key, vec![]);
        let trusted = TrustedKeys(vec![public.clone()]);
        assert_eq!(
            verify("m", bytes, &sig, &trusted).unwrap(),
            sha256_hex(bytes)
        );

        let e = verify("m", b"#!/bin/sh\necho evil\n", &sig, &trusted).unwrap_err();
        assert!(e.to_string().contains("changed after it was signed"), "{e}");
        let e = verify("m", bytes, &sig, &TrustedKeys(vec![other])).unwrap_err();
        assert!(e.to_string().contains("does not trust"), "{e}");
        let e = verify("m", bytes, &sig, &TrustedKeys::default()).unwrap_err();
        assert!(e.to_string().contains("trusted: none"), "{e}");
        let mut forged = sig.clone();
        forged.signature = B64.encode([7u8; 64]);
        let e = verify("m", bytes, &forged, &trusted).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        // A signature over other bytes with the hash field edited to match.
        let mut swapped = sign(b"other", &key, vec![]);
        swapped.sha256 = sha256_hex(bytes);
        let e = verify("m", bytes, &swapped, &trusted).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
    }

    #[test]
    fn keys_parse_and_print() {
        let (_, public) = generate_key().unwrap();
        assert_eq!(PublicKey::parse(&public.to_string()).unwrap(), public);
        assert!(PublicKey::parse("ed25519:AAAA").is_err());
        assert!(PublicKey::parse("rsa:AAAA").is_err());
        let cfg = json!({"module_keys": [public.to_string()]});
        assert_eq!(
            TrustedKeys::from_cluster_config(&cfg).unwrap().0,
            vec![public]
        );
        assert!(TrustedKeys::from_cluster_config(&json!({"module_keys": "x"})).is_err());
    }

    #[test]
    fn replies_are_checked() {
        let ok = parse_reply(
            "m",
            br#"{"result": true, "changes": {"a": 1}, "comment": "c", "outputs": {"x": 2}}"#,
            "",
        )
        .unwrap();
        assert_eq!(ok.result, Some(true));
        assert_eq!(ok.outputs["x"], 2);
        let bad = parse_reply("m", b"hello", "oops").unwrap();
        assert_eq!(bad.result, Some(false));
        assert!(bad.comment.contains("oops"));
        let bad = parse_reply("m", br#"{"result": "yes"}"#, "").unwrap();
        assert_eq!(bad.result, Some(false));
    }
}
