//! A node's data dir: what is in it, who may use it, and how it is written.
//!
//! ```text
//! DATA/lock            flock'ed while a process serves from this dir (one process per dir)
//! DATA/node.json       who this node is: name, raft id, cluster id, addresses, role eligibility
//! DATA/tls/ca.crt      the cluster CA certificate
//! DATA/tls/ca.key      the CA key (datastore-eligible nodes only: they sign joining nodes)
//! DATA/tls/node.crt    this node's certificate (peer and client port), and node.key
//! DATA/tls/join.sha256 SHA-256 of the join secret (to check joining nodes)
//! DATA/admin/          ca.crt, admin.crt, admin.key, join-token (on the node made by --init)
//! DATA/raft/           the Raft log, the keyspace and snapshots (eden-raft)
//! ```
//!
//! ## Invariants
//! - `node.json` is written last, atomically (temp file, fsync, rename, fsync of the dir). A dir
//!   without it holds no node: a crash or a refusal while setting up leaves nothing that a
//!   restart would mistake for a node, and [`DataDir::discard_setup`] removes the rest.
//! - Every file is written through [`write_atomic`]; keys get mode 0600.
//! - The lock is held for the life of the [`DataDir`] value; a second `eden serve` on the same
//!   dir is refused before it touches anything.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What `DATA/node.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFile {
    pub name: String,
    pub raft_id: u64,
    pub cluster_id: u64,
    pub cluster_name: String,
    pub peer_addr: String,
    pub client_addr: String,
    /// Serve the etcd API without TLS (loopback only).
    #[serde(default)]
    pub client_plaintext: bool,
    /// `auto` (may hold the datastore) or `never` (agent only).
    pub datastore: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// For an agent-only node: the datastore nodes' client addresses it uses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
}

/// An open, locked data dir.
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates `path` if needed and takes its lock. Refused when another process holds it.
    pub fn lock(path: &Path) -> Result<DataDir> {
        fs::create_dir_all(path).map_err(|e| {
            Error::Io(format!(
                "cannot create the data dir {}: {e}",
                path.display()
            ))
        })?;
        let lock_path = path.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::Io(format!("cannot open {}: {e}", lock_path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::InvalidInput(format!(
                    "the data dir {} is in use by another eden process; stop it first, or give \
                     this node its own --data-dir",
                    path.display()
                )))
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(Error::Io(format!(
                    "cannot lock {}: {e}",
                    lock_path.display()
                )))
            }
        }
        Ok(DataDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tls(&self) -> PathBuf {
        self.path.join("tls")
    }

    pub fn admin(&self) -> PathBuf {
        self.path.join("admin")
    }

    pub fn raft(&self) -> PathBuf {
        self.path.join("raft")
    }

    fn node_file(&self) -> PathBuf {
        self.path.join("node.json")
    }

    /// The node this dir holds, if any.
    pub fn node(&self) -> Result<Option<NodeFile>> {
        let p = self.node_file();
        match fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::InvalidData(format!(
                    "{} is damaged ({e}); restore it from a backup or start this node afresh \
                     in an empty data dir",
                    p.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io(format!("cannot read {}: {e}", p.display()))),
        }
    }

    /// True when the dir holds nothing but (possibly) its lock file.
    pub fn is_empty(&self) -> Result<bool> {
        for entry in fs::read_dir(&self.path)? {
            if entry?.file_name() != "lock" {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Records the node: the last step of setting up a data dir.
    pub fn commit_node(&self, node: &NodeFile) -> Result<()> {
        let json = serde_json::to_vec_pretty(node)?;
        write_atomic(&self.node_file(), &json, false)
    }

    /// Removes everything a refused or failed setup wrote (all but the lock).
    pub fn discard_setup(&self) {
        if let Ok(entries) = fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                if entry.file_name() == "lock" {
                    continue;
                }
                let p = entry.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
    }

    /// Reads `rel` (relative to the dir) as UTF-8.
    pub fn read(&self, rel: &str) -> Result<String> {
        let p = self.path.join(rel);
        fs::read_to_string(&p).map_err(|e| Error::Io(format!("cannot read {}: {e}", p.display())))
    }

    /// True when `rel` exists.
    pub fn has(&self, rel: &str) -> bool {
        self.path.join(rel).exists()
    }

    /// Writes `rel` atomically; `secret` files get mode 0600.
    pub fn write(&self, rel: &str, bytes: &[u8], secret: bool) -> Result<()> {
        write_atomic(&self.path.join(rel), bytes, secret)
    }
}

/// Writes `path` so that a reader sees the old content or the new, never a mix: a temp file in
/// the same dir, fsync, rename, fsync of the dir.
pub fn write_atomic(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no parent dir", path.display())))?;
    fs::create_dir_all(dir)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut opts = OpenOptions::new();
    opts.create(true).truncate(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let io = |e: std::io::Error| Error::Io(format!("cannot write {}: {e}", path.display()));
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::lock(dir.path()).unwrap();
        let second = DataDir::lock(dir.path())
            .err()
            .expect("second lock refused");
        assert!(second.to_string().contains("in use"), "{second}");
        drop(first);
        DataDir::lock(dir.path()).unwrap();
    }

    #[test]
    fn discard_setup_leaves_an_empty_dir() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::lock(dir.path()).unwrap();
        assert!(d.is_empty().unwrap());
        d.write("tls/node.key", b"k", true).unwrap();
        assert!(!d.is_empty().unwrap());
        d.discard_setup();
        assert!(d.is_empty().unwrap());
        assert_eq!(d.node().unwrap(), None);
    }
}
