//! State trees in the datastore: files stored once under `/eden/blobs/<sha256>`, and a run
//! names them by path in its [`Source`]. The CLI uploads ([`upload`]); each agent reads the
//! blobs a run names back into a [`BlobTree`], checking every hash, so a node runs exactly the
//! files the operator gave.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::kv::Kv;
use super::records::{blob_key, Source};
use crate::error::{Error, Result};
use crate::modules::SourceTree;

/// The largest file a state tree may hold (the store's request limit is 1.5 MiB).
pub const MAX_BLOB: usize = 1024 * 1024;
/// The most files a state tree may hold.
pub const MAX_FILES: usize = 10_000;

pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Every regular file under `root` (skipping `.git` and other dot-directories), by relative
/// `/`-separated path.
pub fn read_dir_tree(root: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    if !root.is_dir() {
        return Err(Error::NotFound(format!(
            "state tree {} is not a directory; give the directory that holds your .sls files",
            root.display()
        )));
    }
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| Error::Io(format!("reading {}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::Io(format!("reading {}: {e}", dir.display())))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = std::fs::metadata(&path)
                .map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
            if meta.is_dir() {
                if !name.starts_with('.') {
                    stack.push(path);
                }
                continue;
            }
            if !meta.is_file() {
                continue;
            }
            if meta.len() as usize > MAX_BLOB {
                return Err(Error::InvalidInput(format!(
                    "{} is {} bytes; files in a state tree may be at most {} bytes (fetch big \
                     files from a URL with file.managed source: https://...)",
                    path.display(),
                    meta.len(),
                    MAX_BLOB
                )));
            }
            let rel = path
                .strip_prefix(root)
                .map_err(|_| Error::Internal(format!("{} is outside the tree", path.display())))?
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            let bytes = std::fs::read(&path)
                .map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
            out.insert(rel, bytes);
            if out.len() > MAX_FILES {
                return Err(Error::InvalidInput(format!(
                    "state tree {} has more than {MAX_FILES} files; is it the right directory?",
                    root.display()
                )));
            }
        }
    }
    Ok(out)
}

/// Stores the files' blobs that the store does not have yet. Returns path -> sha256.
pub async fn upload(
    kv: &Kv,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<String, String>> {
    let mut index = BTreeMap::new();
    let mut by_sha: BTreeMap<String, &Vec<u8>> = BTreeMap::new();
    for (path, bytes) in files {
        if bytes.len() > MAX_BLOB {
            return Err(Error::InvalidInput(format!(
                "{path} is {} bytes; files in a state tree may be at most {MAX_BLOB} bytes",
                bytes.len()
            )));
        }
        let sha = sha256_hex(bytes);
        by_sha.insert(sha.clone(), bytes);
        index.insert(path.clone(), sha);
    }
    for (sha, bytes) in by_sha {
        // Content-addressed: a blob that exists already is the same bytes.
        kv.create(&blob_key(&sha), bytes.clone(), 0).await?;
    }
    Ok(index)
}

/// The files of one run, read from the store and checked against their hashes, and the
/// datastore keys the run's `kv://` sources name ([`BlobTree::add_key`]).
pub struct BlobTree {
    files: HashMap<String, Vec<u8>>,
    keys: std::sync::RwLock<HashMap<String, Vec<u8>>>,
}

impl BlobTree {
    pub fn from_files(files: HashMap<String, Vec<u8>>) -> BlobTree {
        BlobTree {
            files,
            keys: Default::default(),
        }
    }

    /// Makes `kv://KEY` readable with the value the caller read from the datastore.
    pub fn add_key(&self, key: &str, value: Vec<u8>) {
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), value);
    }

    pub async fn fetch(kv: &Kv, source: &Source) -> Result<BlobTree> {
        let mut cache: HashMap<&str, Vec<u8>> = HashMap::new();
        let mut files = HashMap::new();
        for (path, sha) in &source.files {
            if let Some(b) = cache.get(sha.as_str()) {
                files.insert(path.clone(), b.clone());
                continue;
            }
            let kv_ = kv.get(&blob_key(sha)).await?.ok_or_else(|| {
                Error::NotFound(format!(
                    "the run's file {path} (blob {sha}) is not in the store; apply again to \
                     upload it"
                ))
            })?;
            if sha256_hex(&kv_.value) != *sha {
                return Err(Error::InvalidData(format!(
                    "blob {sha} for {path} does not match its hash; refusing to run it"
                )));
            }
            cache.insert(sha, kv_.value.clone());
            files.insert(path.clone(), kv_.value);
        }
        Ok(BlobTree::from_files(files))
    }

    pub fn paths(&self) -> impl Iterator<Item = &String> {
        self.files.keys()
    }
}

impl SourceTree for BlobTree {
    fn read(&self, path: &str) -> Result<Vec<u8>> {
        if let Some(key) = path.strip_prefix("kv://") {
            return self
                .keys
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("no key {key:?} in the datastore")));
        }
        let p = path.trim_start_matches('/');
        self.files
            .get(p)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no file {path:?} in the run's state tree")))
    }
}
