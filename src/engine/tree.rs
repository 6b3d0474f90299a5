//! A state tree on the local disk, for `eden apply --local PATH`.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::modules::SourceTree;

/// The files under one directory. Paths may not climb out of it.
pub struct LocalTree {
    root: PathBuf,
}

impl LocalTree {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        if !root.is_dir() {
            return Err(Error::NotFound(format!(
                "state tree {} is not a directory; give the directory that holds your .sls files",
                root.display()
            )));
        }
        Ok(LocalTree { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl SourceTree for LocalTree {
    fn read(&self, path: &str) -> Result<Vec<u8>> {
        let rel = Path::new(path.trim_start_matches('/'));
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(Error::InvalidInput(format!(
                "state tree path {path:?} leaves the tree; use a path inside it"
            )));
        }
        let full = self.root.join(rel);
        std::fs::read(&full).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(format!(
                "no file {path:?} in the state tree {}",
                self.root.display()
            )),
            _ => Error::Io(format!("reading {}: {e}", full.display())),
        })
    }
}
