//! `eden module keygen|sign|verify|add`: signed extension modules (see `modules::ext`).
//!
//! - `keygen --out KEY` writes an ed25519 signing key (PEM, mode 0600) and `KEY.pub`, and prints
//!   the public key to add to the cluster's trusted keys.
//! - `sign FILE --key KEY` writes `FILE.sig`.
//! - `verify FILE --trust KEY...|--trusted-keys PATH` checks it as a run would; exit 1 if refused.
//! - `add FILE --tree DIR` verifies, then installs FILE and its signature as
//!   `DIR/_modules/<file>`, where `eden apply` finds it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::error::{Error, Result};
use crate::modules::ext::{self, ModuleSignature, PublicKey, TrustedKeys};

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
    /// Check a module against its signature and the trusted keys, as every run does.
    Verify {
        file: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Verify a module, then install it (and its signature) into a state tree's _modules/.
    Add {
        file: PathBuf,
        /// The state tree directory.
        #[arg(long)]
        tree: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
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

impl TrustArgs {
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
        ModuleCommand::Verify { file, trust } => match check(&file, &trust) {
            Ok((_, sig, sha)) => {
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
        },
        ModuleCommand::Add { file, tree, trust } => {
            let (bytes, sig, sha) = check(&file, &trust)?;
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    Error::InvalidInput(format!("{} has no file name", file.display()))
                })?;
            let dir = tree.join("_modules");
            std::fs::create_dir_all(&dir)?;
            let dest = dir.join(&name);
            crate::modules::file::write_atomic(&dest, &bytes, 0o755)?;
            crate::modules::file::write_atomic(
                &sig_path_of(&dest),
                (serde_json::to_string_pretty(&sig)? + "\n").as_bytes(),
                0o644,
            )?;
            println!("added {} (sha256 {sha}) to {}", name, dir.display());
            Ok(0)
        }
    }
}

fn sig_pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}
