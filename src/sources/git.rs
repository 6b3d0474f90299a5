//! Git state sources: `eden apply --repo NAME@REF` turned into files at one commit.
//!
//! [`fetch`] keeps one bare cache repository per URL under a cache directory, fetches every
//! branch and tag of the remote into it (an update when the cache already exists), resolves the
//! asked ref to one commit and reads that commit's whole tree into memory. The caller records
//! [`Checkout::commit`] in the run and, from then on, asks for that full commit id: a full id
//! already in the cache is read without touching the network, so every node of a run sees the
//! same files even if the branch moves while the run is going.
//!
//! # Ref resolution, in this order
//!
//! 1. `HEAD`: the remote's default branch (what `git clone` would check out).
//! 2. A full ref name (`refs/heads/main`, `refs/tags/v1`), as the remote advertises it.
//! 3. A branch name, then a tag name (annotated tags are peeled to their commit). A branch wins
//!    over a tag of the same name, as with `git clone --branch`.
//! 4. A commit id, full or abbreviated (at least 4 hex digits), among the objects fetched: any
//!    commit reachable from a branch or tag, or kept in the cache from an earlier fetch.
//!
//! Branches and tags are looked up in the list the remote advertised during this fetch, not in
//! the cache's own refs, so a branch deleted upstream is not found from a stale copy.
//!
//! # The tree
//!
//! Regular and executable files are read as bytes (the executable bit is not kept: states set
//! modes themselves). Paths are relative and `/`-separated; a tree entry whose name is empty,
//! `.`, `..`, `.git` or not UTF-8 is skipped. A symbolic link is resolved inside the tree: a link
//! to a file becomes a copy of that file's bytes and a link to a directory a copy of its regular
//! files. A link that is absolute, leaves the tree, dangles or loops is skipped: it could only
//! be followed on the machine that made it. Submodules are skipped too: their commits live in
//! another repository. Every skipped entry is listed in [`Checkout::skipped`] and logged.
//!
//! # What this build does not do
//!
//! libgit2 is built from its vendored sources without OpenSSL or libssh2, so that eden builds
//! with cargo alone. `https://`, `http://` and `ssh://` (or `user@host:path`) URLs are therefore
//! refused with an error saying so; serve the repository over `git://` (`git daemon`) or give a
//! local path or `file://` URL of a clone. There are no credentials, no shallow fetches, and the
//! cache is never garbage-collected (delete the cache directory to reclaim space).
//!
//! The whole tree is held in memory: state trees are small. Fetches are blocking; call this
//! from `spawn_blocking` in async code.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use git2::{AutotagOption, FetchOptions, FetchPrune, Oid, RemoteCallbacks, Repository};

use crate::error::{Error, Result};

/// One commit of a git repository, read in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    /// The URL as given.
    pub url: String,
    /// The ref as given (`main`, `v1.2`, `HEAD`, `3f2a9c1`).
    pub refname: String,
    /// What the ref resolved to: the full commit id in hex. Record this in the run.
    pub commit: String,
    /// Every file of the commit's tree: relative `/`-separated path to contents, sorted.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Tree entries not in `files`, sorted by path: submodules, links that cannot be resolved
    /// inside the tree, unsafe names.
    pub skipped: Vec<Skipped>,
}

/// A tree entry [`fetch`] left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Fetches `url` into its cache repository under `cache_dir`, resolves `refname` to a commit and
/// reads that commit's tree. See the module docs for the resolution order and what is skipped.
///
/// `url` may be a local path (relative paths are taken from the current directory), a `file://`
/// URL or a `git://` URL. Concurrent calls for one URL, from threads or processes, take turns
/// through a lock file next to the cache repository.
pub fn fetch(url: &str, refname: &str, cache_dir: &Path) -> Result<Checkout> {
    let remote_url = remote_url(url)?;
    if refname.is_empty() {
        return Err(Error::InvalidInput(format!(
            "git source {url}: the ref is empty; give a branch, tag, commit id or HEAD"
        )));
    }
    fs::create_dir_all(cache_dir).map_err(|e| {
        Error::Io(format!(
            "git cache directory {}: cannot create it: {e}",
            cache_dir.display()
        ))
    })?;
    let repo_dir = cache_dir.join(format!("{}.git", cache_name(url)));
    let lock_path = repo_dir.with_extension("lock");
    let lock = File::create(&lock_path)
        .map_err(|e| Error::Io(format!("git cache lock {}: {e}", lock_path.display())))?;
    // Held until the end of this function: libgit2 itself does not serialise two fetches into
    // one repository, and a second fetch of the same URL would gain nothing from running at once.
    lock.lock()
        .map_err(|e| Error::Io(format!("git cache lock {}: {e}", lock_path.display())))?;

    let repo = open_cache(&repo_dir)?;

    // A full commit id already in the cache needs no network: commits never change.
    if is_full_id(refname) {
        if let Ok(commit) = Oid::from_str(refname).and_then(|oid| repo.find_commit(oid)) {
            tracing::debug!(
                url,
                commit = refname,
                "git source: commit already in the cache"
            );
            return read_commit(&repo, url, refname, &commit);
        }
    }

    let advertised = fetch_into(&repo, url, &remote_url)?;
    let oid = resolve(&repo, url, refname, &advertised)?;
    let commit = repo
        .find_object(oid, None)
        .and_then(|o| o.peel_to_commit())
        .map_err(|e| {
            Error::InvalidData(format!(
                "git source {url}: ref {refname} names object {oid}, which is not a commit: {}",
                e.message()
            ))
        })?;
    read_commit(&repo, url, refname, &commit)
}

/// What the remote advertised while we fetched: ref name to object id, and its default branch.
struct Advertised {
    refs: BTreeMap<String, Oid>,
    default_branch: Option<String>,
}

/// Checks the URL's scheme against what this build supports and makes local paths absolute
/// (libgit2 would resolve them against its own idea of the current directory otherwise).
fn remote_url(url: &str) -> Result<String> {
    let unsupported = |scheme: &str| {
        Error::InvalidInput(format!(
            "git source {url}: {scheme} URLs are not supported by this eden build (libgit2 is \
             built without TLS and SSH); serve the repository over git:// (git daemon) or give \
             the path or file:// URL of a local clone"
        ))
    };
    let lower = url.to_ascii_lowercase();
    if url.is_empty() {
        return Err(Error::InvalidInput(
            "git source: the URL is empty; give a git:// or file:// URL or a path".into(),
        ));
    }
    for scheme in ["https://", "http://", "ssh://", "git+ssh://", "ssh+git://"] {
        if lower.starts_with(scheme) {
            return Err(unsupported(scheme.trim_end_matches("://")));
        }
    }
    if lower.starts_with("git://") || lower.starts_with("file://") {
        return Ok(url.to_string());
    }
    if let Some((scheme, _)) = url.split_once("://") {
        return Err(Error::InvalidInput(format!(
            "git source {url}: unknown URL scheme {scheme}://; use git://, file:// or a path"
        )));
    }
    // scp-like `user@host:path` or `host:path`, as git reads it: a ':' before any '/'.
    if let Some(colon) = url.find(':') {
        if !url[..colon].contains('/') && colon > 1 {
            return Err(unsupported("ssh (host:path)"));
        }
    }
    let path = Path::new(url);
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::Io(format!("git source {url}: no current directory: {e}")))?
            .join(path)
    };
    if !abs.exists() {
        // libgit2 would take a missing path for a URL of an unknown kind.
        return Err(Error::NotFound(format!(
            "git source {url}: no such file or directory ({}); give the path of a git \
             repository or a git:// or file:// URL",
            abs.display()
        )));
    }
    Ok(abs.to_string_lossy().into_owned())
}

/// `<last path part>-<16 hex of sha256(url)>`: readable in `ls`, and one per distinct URL.
fn cache_name(url: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, url.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let tail = url
        .trim_end_matches('/')
        .trim_end_matches(".git")
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("");
    let slug: String = tail
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(40)
        .collect();
    let slug = slug.trim_start_matches('.');
    if slug.is_empty() {
        hex
    } else {
        format!("{slug}-{hex}")
    }
}

fn open_cache(dir: &Path) -> Result<Repository> {
    if dir.exists() {
        match Repository::open_bare(dir) {
            Ok(repo) => return Ok(repo),
            Err(e) => {
                // Only a cache: start over rather than make the operator clean up.
                tracing::warn!(
                    "git cache {} is unreadable ({}); recreating it",
                    dir.display(),
                    e.message()
                );
                fs::remove_dir_all(dir).map_err(|e| {
                    Error::Io(format!(
                        "git cache {}: unreadable and cannot be removed: {e}; remove it by hand",
                        dir.display()
                    ))
                })?;
            }
        }
    }
    Repository::init_bare(dir).map_err(|e| {
        Error::Io(format!(
            "git cache {}: cannot create it: {}",
            dir.display(),
            e.message()
        ))
    })
}

fn fetch_into(repo: &Repository, url: &str, remote_url: &str) -> Result<Advertised> {
    let mut remote = repo
        .remote_anonymous(remote_url)
        .map_err(|e| Error::InvalidInput(format!("git source {url}: {}", e.message())))?;

    let mut callbacks = RemoteCallbacks::new();
    let mut next_report = 0usize;
    callbacks.transfer_progress(move |p| {
        // A line every ~10% of objects, so a large first fetch shows it is alive.
        let total = p.total_objects();
        let received = p.received_objects();
        if total > 0 && received >= next_report {
            tracing::debug!(
                "git fetch: {received}/{total} objects, {} KiB",
                p.received_bytes() / 1024
            );
            next_report = received + total.div_ceil(10).max(1);
        }
        true
    });
    callbacks.sideband_progress(|line| {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if !text.is_empty() {
            tracing::debug!("git remote: {text}");
        }
        true
    });
    let mut options = FetchOptions::new();
    options
        .remote_callbacks(callbacks)
        .prune(FetchPrune::On)
        .download_tags(AutotagOption::All)
        .update_fetchhead(false);

    tracing::info!(url, "git source: fetching");
    let refspecs = [
        "+refs/heads/*:refs/remotes/origin/*",
        "+refs/tags/*:refs/tags/*",
    ];
    remote
        .fetch(&refspecs, Some(&mut options), None)
        .map_err(|e| fetch_error(url, &e))?;
    let stats = remote.stats();
    tracing::info!(
        url,
        objects = stats.received_objects(),
        bytes = stats.received_bytes(),
        "git source: fetched"
    );

    let refs = remote
        .list()
        .map_err(|e| Error::Internal(format!("git source {url}: ref list: {}", e.message())))?
        .iter()
        .map(|head| (head.name().to_string(), head.oid()))
        .collect();
    let default_branch = remote
        .default_branch()
        .ok()
        .and_then(|b| b.as_str().ok().map(str::to_string));
    Ok(Advertised {
        refs,
        default_branch,
    })
}

/// A libgit2 fetch failure, told in operator terms.
fn fetch_error(url: &str, e: &git2::Error) -> Error {
    let msg = e.message();
    let lower = msg.to_ascii_lowercase();
    if lower.contains("could not find repository")
        || lower.contains("not a git repository")
        || lower.contains("failed to resolve path")
        || lower.contains("repository not found")
        || lower.contains("does not appear to be a git repository")
        || lower.contains("not exported")
        || lower.contains("no such repository")
    {
        return Error::NotFound(format!(
            "git source {url}: not a git repository ({msg}); check the URL or path, and that \
             git daemon exports it"
        ));
    }
    if lower.contains("unsupported url protocol") {
        return Error::InvalidInput(format!(
            "git source {url}: this eden build cannot fetch this kind of URL ({msg}); use \
             git://, file:// or a path"
        ));
    }
    match e.class() {
        git2::ErrorClass::Net | git2::ErrorClass::Os | git2::ErrorClass::Ssl => {
            Error::Unavailable(format!(
                "git source {url}: cannot reach it ({msg}); check the URL and that the server \
                 is running, then try again"
            ))
        }
        _ => Error::Unavailable(format!("git source {url}: fetch failed: {msg}")),
    }
}

fn is_full_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_abbreviated_id(s: &str) -> bool {
    (4..=40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn resolve(repo: &Repository, url: &str, refname: &str, adv: &Advertised) -> Result<Oid> {
    let branches_and_tags = adv
        .refs
        .keys()
        .any(|r| r.starts_with("refs/heads/") || r.starts_with("refs/tags/"));
    if !branches_and_tags {
        return Err(Error::NotFound(format!(
            "git source {url}: the repository is empty (no branches or tags); push a commit \
             to it first"
        )));
    }
    if refname == "HEAD" {
        let head = adv
            .default_branch
            .as_deref()
            .and_then(|b| adv.refs.get(b).map(|oid| (b, *oid)))
            .or_else(|| adv.refs.get("HEAD").map(|oid| ("HEAD", *oid)));
        return match head {
            Some((branch, oid)) => {
                tracing::debug!(url, branch, "git source: HEAD is the default branch");
                Ok(oid)
            }
            None => Err(Error::NotFound(format!(
                "git source {url}: the remote has no default branch (HEAD); name a ref, for \
                 example {}",
                available(adv)
            ))),
        };
    }
    let candidates = if refname.starts_with("refs/") {
        vec![refname.to_string()]
    } else {
        vec![
            format!("refs/heads/{refname}"),
            format!("refs/tags/{refname}"),
        ]
    };
    for name in &candidates {
        if let Some(oid) = adv.refs.get(name) {
            return Ok(*oid);
        }
    }
    if is_abbreviated_id(refname) {
        match repo.find_object_by_prefix(refname, None) {
            Ok(obj) => return Ok(obj.id()),
            Err(e) if e.code() == git2::ErrorCode::Ambiguous => {
                return Err(Error::InvalidInput(format!(
                    "git source {url}: commit id {refname} is ambiguous; give more digits"
                )))
            }
            Err(_) => {}
        }
    }
    Err(Error::NotFound(format!(
        "git source {url}: no branch, tag or commit named {refname}; available: {}",
        available(adv)
    )))
}

/// A short list of branches and tags for error messages.
fn available(adv: &Advertised) -> String {
    const SHOWN: usize = 8;
    let mut names: Vec<String> = Vec::new();
    for (prefix, kind) in [("refs/heads/", "branch"), ("refs/tags/", "tag")] {
        for r in adv.refs.keys() {
            if let Some(name) = r.strip_prefix(prefix) {
                if !name.ends_with("^{}") {
                    names.push(format!("{kind} {name}"));
                }
            }
        }
    }
    let more = names.len().saturating_sub(SHOWN);
    names.truncate(SHOWN);
    let mut out = names.join(", ");
    if more > 0 {
        out.push_str(&format!(" and {more} more"));
    }
    out
}

/// What the first pass over the tree found.
#[derive(Default)]
struct TreeScan {
    files: BTreeMap<String, Vec<u8>>,
    /// Link path to its target text.
    links: BTreeMap<String, String>,
    skipped: Vec<Skipped>,
}

fn read_commit(
    repo: &Repository,
    url: &str,
    refname: &str,
    commit: &git2::Commit<'_>,
) -> Result<Checkout> {
    let tree = commit.tree().map_err(|e| {
        Error::InvalidData(format!(
            "git source {url}: commit {} has no readable tree: {}",
            commit.id(),
            e.message()
        ))
    })?;
    let mut scan = TreeScan::default();
    scan_tree(repo, &tree, "", &mut scan).map_err(|e| {
        Error::InvalidData(format!(
            "git source {url}: reading commit {}: {}",
            commit.id(),
            e.message()
        ))
    })?;
    resolve_links(&mut scan);
    scan.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    for s in &scan.skipped {
        tracing::warn!(url, commit = %commit.id(), "git source: skipped {}: {}", s.path, s.reason);
    }
    Ok(Checkout {
        url: url.to_string(),
        refname: refname.to_string(),
        commit: commit.id().to_string(),
        files: scan.files,
        skipped: scan.skipped,
    })
}

fn scan_tree(
    repo: &Repository,
    tree: &git2::Tree<'_>,
    prefix: &str,
    scan: &mut TreeScan,
) -> std::result::Result<(), git2::Error> {
    for entry in tree.iter() {
        let raw_name = entry.name_bytes();
        let shown = format!("{prefix}{}", String::from_utf8_lossy(raw_name));
        let name = match std::str::from_utf8(raw_name) {
            Ok(n) if !matches!(n, "" | "." | ".." | ".git") && !n.contains(['/', '\0']) => n,
            _ => {
                scan.skipped.push(Skipped {
                    path: shown,
                    reason: "unsafe or non-UTF-8 name".into(),
                });
                continue;
            }
        };
        let path = format!("{prefix}{name}");
        match entry.filemode() {
            0o040000 => {
                let sub = repo.find_tree(entry.id())?;
                scan_tree(repo, &sub, &format!("{path}/"), scan)?;
            }
            0o100644 | 0o100755 | 0o100664 => {
                let blob = repo.find_blob(entry.id())?;
                scan.files.insert(path, blob.content().to_vec());
            }
            0o120000 => {
                let blob = repo.find_blob(entry.id())?;
                scan.links
                    .insert(path, String::from_utf8_lossy(blob.content()).into_owned());
            }
            0o160000 => scan.skipped.push(Skipped {
                path,
                reason: format!(
                    "submodule at commit {}: its files are in another repository",
                    entry.id()
                ),
            }),
            mode => scan.skipped.push(Skipped {
                path,
                reason: format!("unknown tree entry mode {mode:o}"),
            }),
        }
    }
    Ok(())
}

/// Where a link's target lies inside the tree, as a normalised relative path; `None` when it
/// is absolute or climbs out of the tree.
fn link_target(link: &str, target: &str) -> Option<String> {
    if target.starts_with('/') || target.is_empty() {
        return None;
    }
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Second pass: each link becomes a copy of the file (or directory of files) it points at.
/// Links to links are followed up to a bound, which also ends loops.
fn resolve_links(scan: &mut TreeScan) {
    const MAX_HOPS: usize = 40;
    let links = std::mem::take(&mut scan.links);
    let mut copies: Vec<(String, Vec<u8>)> = Vec::new();
    for (link, first_target) in &links {
        let mut at = link.clone();
        let mut target = first_target.clone();
        let mut outcome = Err("it loops or chains too deep".to_string());
        for _ in 0..MAX_HOPS {
            let Some(resolved) = link_target(&at, &target) else {
                outcome = Err(format!("its target {first_target} is outside the tree"));
                break;
            };
            if let Some(next) = links.get(&resolved) {
                at = resolved;
                target = next.clone();
                continue;
            }
            if let Some(bytes) = scan.files.get(&resolved) {
                outcome = Ok(vec![(link.clone(), bytes.clone())]);
                break;
            }
            let dir = format!("{resolved}/");
            let under: Vec<(String, Vec<u8>)> = scan
                .files
                .range(dir.clone()..)
                .take_while(|(p, _)| p.starts_with(&dir))
                .map(|(p, b)| (format!("{link}/{}", &p[dir.len()..]), b.clone()))
                .collect();
            outcome = if under.is_empty() && !resolved.is_empty() {
                Err(format!(
                    "its target {first_target} does not exist in the tree"
                ))
            } else if resolved.is_empty() || link.starts_with(&dir) {
                Err(format!(
                    "its target {first_target} contains the link itself"
                ))
            } else {
                Ok(under)
            };
            break;
        }
        match outcome {
            Ok(files) => copies.extend(files),
            Err(reason) => scan.skipped.push(Skipped {
                path: link.clone(),
                reason: format!("symbolic link not followed: {reason}"),
            }),
        }
    }
    for (path, bytes) in copies {
        scan.files.entry(path).or_insert(bytes);
    }
}

/// The cache directory eden uses by default: `$XDG_CACHE_HOME/eden/git`, else
/// `$HOME/.cache/eden/git`, else a directory under the system temp dir.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("eden/git");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache/eden/git");
    }
    std::env::temp_dir().join("eden-git-cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_targets_stay_inside_the_tree() {
        assert_eq!(link_target("a/b", "c").as_deref(), Some("a/c"));
        assert_eq!(link_target("a/b", "../c").as_deref(), Some("c"));
        assert_eq!(link_target("a/b", "./x/../y").as_deref(), Some("a/y"));
        assert_eq!(link_target("a/b", "../../c"), None);
        assert_eq!(link_target("b", "/etc/passwd"), None);
        assert_eq!(link_target("b", ""), None);
    }

    #[test]
    fn links_become_copies_or_are_skipped() {
        let mut scan = TreeScan::default();
        scan.files.insert("top.sls".into(), b"top".to_vec());
        scan.files.insert("dir/a".into(), b"A".to_vec());
        scan.files.insert("dir/sub/b".into(), b"B".to_vec());
        for (link, target) in [
            ("alias.sls", "top.sls"),
            ("chain", "alias.sls"),
            ("dirlink", "dir"),
            ("out", "../etc/passwd"),
            ("abs", "/etc/passwd"),
            ("dangling", "nope"),
            ("loop1", "loop2"),
            ("loop2", "loop1"),
            ("dir/self", ".."),
        ] {
            scan.links.insert(link.into(), target.into());
        }
        resolve_links(&mut scan);
        let files: Vec<(&str, &[u8])> = scan
            .files
            .iter()
            .map(|(p, b)| (p.as_str(), b.as_slice()))
            .collect();
        assert_eq!(
            files,
            [
                ("alias.sls", &b"top"[..]),
                ("chain", b"top"),
                ("dir/a", b"A"),
                ("dir/sub/b", b"B"),
                ("dirlink/a", b"A"),
                ("dirlink/sub/b", b"B"),
                ("top.sls", b"top"),
            ]
        );
        let mut skipped: Vec<&str> = scan.skipped.iter().map(|s| s.path.as_str()).collect();
        skipped.sort();
        assert_eq!(
            skipped,
            ["abs", "dangling", "dir/self", "loop1", "loop2", "out"]
        );
    }

    #[test]
    fn urls_this_build_cannot_fetch_are_refused_by_name() {
        for url in [
            "https://example.com/states.git",
            "http://example.com/x",
            "ssh://git@example.com/x.git",
            "git@example.com:ops/states.git",
        ] {
            let e = remote_url(url).unwrap_err().to_string();
            assert!(e.contains(url), "{e}");
            assert!(e.contains("git://") && e.contains("local clone"), "{e}");
        }
        let e = remote_url("ftp://x/y").unwrap_err().to_string();
        assert!(e.contains("unknown URL scheme ftp://"), "{e}");
        assert_eq!(
            remote_url("git://127.0.0.1:9418/x").unwrap(),
            "git://127.0.0.1:9418/x"
        );
        // Relative paths are made absolute from the current directory (the crate root here).
        let src = remote_url("src").unwrap();
        assert!(
            Path::new(&src).is_absolute() && src.ends_with("/src"),
            "{src}"
        );
        let e = remote_url("no/such/repo").unwrap_err();
        assert!(
            matches!(e, Error::NotFound(_)) && e.to_string().contains("no/such/repo"),
            "{e}"
        );
    }

    #[test]
    fn cache_names_are_readable_and_distinct() {
        let a = cache_name("git://127.0.0.1:9418/states.git");
        let b = cache_name("git://127.0.0.1:9419/states.git");
        assert!(a.starts_with("states-"), "{a}");
        assert_ne!(a, b);
        assert_eq!(a, cache_name("git://127.0.0.1:9418/states.git"));
        assert!(!cache_name("/").is_empty());
    }
}
