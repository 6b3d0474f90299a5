//! Git state sources against real repositories made with the `git` CLI: a bare clone over
//! file:// and a path, and `git daemon` over git:// on loopback.
//!
//! Needs `git` (with `git daemon`, in Debian's `git` package) on PATH.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eden::error::Error;
use eden::sources::git::{fetch, Checkout};

/// Runs git with a clean identity and no user or system config; panics on failure.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "eden test")
        .env("GIT_AUTHOR_EMAIL", "test@eden.invalid")
        .env("GIT_COMMITTER_NAME", "eden test")
        .env("GIT_COMMITTER_EMAIL", "test@eden.invalid")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

fn write(dir: &Path, path: &str, text: &str) {
    let p = dir.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A working repository with two commits on `main`, an annotated tag `v1` on the first, and a
/// bare clone of it, which is what the tests fetch from.
struct Fixture {
    _tmp: tempfile::TempDir,
    work: PathBuf,
    /// Directory holding `states.git`, the git daemon's base path.
    served: PathBuf,
    bare: PathBuf,
    cache: PathBuf,
    first: String,
    second: String,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let served = tmp.path().join("served");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&served).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);

    write(&work, "top.sls", "base:\n  '*':\n    - web\n");
    write(&work, "web/init.sls", "nginx:\n  pkg.installed: []\n");
    write(&work, "version.txt", "one\n");
    write(&work, "bin/run.sh", "#!/bin/sh\necho hi\n");
    git(
        &work,
        &["update-index", "--add", "--chmod=+x", "bin/run.sh"],
    );
    std::os::unix::fs::symlink("version.txt", work.join("current")).unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "first"]);
    let first = git(&work, &["rev-parse", "HEAD"]);
    git(&work, &["tag", "-a", "v1", "-m", "release one"]);

    write(&work, "version.txt", "two\n");
    write(&work, "web/extra.sls", "extra: {}\n");
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "second"]);
    let second = git(&work, &["rev-parse", "HEAD"]);

    let bare = served.join("states.git");
    git(
        tmp.path(),
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    let cache = tmp.path().join("cache");
    Fixture {
        _tmp: tmp,
        work,
        served,
        bare,
        cache,
        first,
        second,
    }
}

fn text(c: &Checkout, path: &str) -> String {
    let bytes = c
        .files
        .get(path)
        .unwrap_or_else(|| panic!("{path} missing from {:?}", c.files.keys()));
    String::from_utf8(bytes.clone()).unwrap()
}

fn paths(c: &Checkout) -> Vec<&str> {
    c.files.keys().map(String::as_str).collect()
}

fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}

#[test]
fn file_url_at_branch_tag_and_commit_ids() {
    let f = fixture();
    assert_ne!(f.first, f.second);
    let url = file_url(&f.bare);

    let main = fetch(&url, "main", &f.cache).unwrap();
    assert_eq!(main.commit, f.second);
    assert_eq!(main.url, url);
    assert_eq!(main.refname, "main");
    assert_eq!(
        paths(&main),
        [
            "bin/run.sh",
            "current",
            "top.sls",
            "version.txt",
            "web/extra.sls",
            "web/init.sls"
        ]
    );
    assert_eq!(text(&main, "version.txt"), "two\n");
    // The symlink inside the tree is read as a copy of its target.
    assert_eq!(text(&main, "current"), "two\n");
    assert_eq!(text(&main, "bin/run.sh"), "#!/bin/sh\necho hi\n");
    assert!(main.skipped.is_empty(), "{:?}", main.skipped);

    let tag = fetch(&url, "v1", &f.cache).unwrap();
    assert_eq!(
        tag.commit, f.first,
        "the annotated tag is peeled to its commit"
    );
    assert_eq!(
        paths(&tag),
        [
            "bin/run.sh",
            "current",
            "top.sls",
            "version.txt",
            "web/init.sls"
        ]
    );
    assert_eq!(text(&tag, "version.txt"), "one\n");
    assert_eq!(text(&tag, "current"), "one\n");

    let full = fetch(&url, &f.first, &f.cache).unwrap();
    assert_eq!(full.commit, f.first);
    assert_eq!(full.files, tag.files);

    let short = fetch(&url, &f.first[..7], &f.cache).unwrap();
    assert_eq!(short.commit, f.first);
    assert_eq!(short.refname, &f.first[..7]);
    assert_eq!(short.files, tag.files);

    let head = fetch(&url, "HEAD", &f.cache).unwrap();
    assert_eq!(head.commit, f.second);
    let full_ref = fetch(&url, "refs/tags/v1", &f.cache).unwrap();
    assert_eq!(full_ref.commit, f.first);

    // A plain path works the same way and gets its own cache repository.
    let by_path = fetch(f.bare.to_str().unwrap(), "main", &f.cache).unwrap();
    assert_eq!(by_path.commit, f.second);
    assert_eq!(by_path.files, main.files);
    assert_eq!(
        cache_repos(&f.cache).len(),
        2,
        "{:?}",
        cache_repos(&f.cache)
    );
}

fn cache_repos(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".git"))
        .collect();
    names.sort();
    names
}

#[test]
fn a_recorded_commit_reads_from_the_cache_when_the_remote_is_gone() {
    let f = fixture();
    let url = file_url(&f.bare);
    let first = fetch(&url, "main", &f.cache).unwrap();
    std::fs::remove_dir_all(&f.bare).unwrap();
    // What a node does with the commit the run recorded: no fetch needed, same files.
    let again = fetch(&url, &first.commit, &f.cache).unwrap();
    assert_eq!(again.commit, f.second);
    assert_eq!(again.files, first.files);
    // A branch name still needs the remote, and says so.
    let e = fetch(&url, "main", &f.cache).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    assert!(e.to_string().contains(&url), "{e}");
}

/// A `git daemon` on a free loopback port, killed on drop.
struct Daemon {
    child: Child,
    port: u16,
}

impl Daemon {
    fn start(base: &Path) -> Daemon {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("git")
            .args([
                "daemon",
                "--export-all",
                "--reuseaddr",
                "--informative-errors",
                "--listen=127.0.0.1",
                &format!("--port={port}"),
                &format!("--base-path={}", base.display()),
                base.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            // `git daemon` execs `git-daemon`, which forks per connection: a group of its own
            // lets Drop end all of them.
            .process_group(0)
            .spawn()
            .expect("start git daemon");
        let mut daemon = Daemon { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return daemon;
            }
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!("git daemon exited before listening on {port}: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "git daemon did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test created; no memory is involved.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

#[test]
fn git_daemon_fetch_and_cache_update() {
    let f = fixture();
    let daemon = Daemon::start(&f.served);
    let url = daemon.url("states.git");

    let main = fetch(&url, "main", &f.cache).unwrap();
    assert_eq!(main.commit, f.second);
    assert_eq!(text(&main, "version.txt"), "two\n");
    let tag = fetch(&url, "v1", &f.cache).unwrap();
    assert_eq!(tag.commit, f.first);
    assert_eq!(text(&tag, "version.txt"), "one\n");
    let short = fetch(&url, &f.second[..10], &f.cache).unwrap();
    assert_eq!(short.commit, f.second);

    // A new commit pushed to the served repository: the next fetch picks it up.
    write(&f.work, "version.txt", "three\n");
    git(&f.work, &["rm", "-q", "web/extra.sls"]);
    git(&f.work, &["add", "-A"]);
    git(&f.work, &["commit", "-q", "-m", "third"]);
    let third = git(&f.work, &["rev-parse", "HEAD"]);
    git(&f.work, &["push", "-q", f.bare.to_str().unwrap(), "main"]);

    let updated = fetch(&url, "main", &f.cache).unwrap();
    assert_eq!(updated.commit, third);
    assert_eq!(text(&updated, "version.txt"), "three\n");
    assert!(!updated.files.contains_key("web/extra.sls"));
    let head = fetch(&url, "HEAD", &f.cache).unwrap();
    assert_eq!(head.commit, third);
    // The older commit is still readable by id; one cache repository served all of it.
    assert_eq!(fetch(&url, &f.second, &f.cache).unwrap().files, main.files);
    assert_eq!(
        cache_repos(&f.cache).len(),
        1,
        "{:?}",
        cache_repos(&f.cache)
    );

    // A repository the daemon does not have.
    let missing = daemon.url("nope.git");
    let e = fetch(&missing, "main", &f.cache).unwrap_err();
    assert!(e.to_string().contains(&missing), "{e}");
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
}

#[test]
fn unknown_ref_names_it_and_lists_what_exists() {
    let f = fixture();
    let url = file_url(&f.bare);
    let e = fetch(&url, "nope", &f.cache).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("nope") && msg.contains(&url), "{msg}");
    assert!(
        msg.contains("branch main") && msg.contains("tag v1"),
        "{msg}"
    );
    // Hex that is no object here is an unknown ref too, not a crash.
    let e = fetch(&url, "deadbeef", &f.cache).unwrap_err();
    assert!(e.to_string().contains("deadbeef"), "{e}");
}

#[test]
fn not_a_repository_unreachable_and_empty_fail_by_name() {
    let f = fixture();
    let plain = f.served.join("plain-dir");
    std::fs::create_dir_all(&plain).unwrap();
    let url = file_url(&plain);
    let e = fetch(&url, "main", &f.cache).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    assert!(
        e.to_string().contains(&url) && e.to_string().contains("not a git repository"),
        "{e}"
    );

    let missing = f.served.join("does-not-exist");
    let e = fetch(missing.to_str().unwrap(), "main", &f.cache).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    assert!(
        e.to_string().contains("does-not-exist") && e.to_string().contains("no such"),
        "{e}"
    );

    // Nothing listens on this port once the listener is dropped.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("git://127.0.0.1:{port}/states.git");
    let e = fetch(&url, "main", &f.cache).unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    assert!(e.to_string().contains(&url), "{e}");

    let empty = f.served.join("empty.git");
    git(
        &f.served,
        &["init", "-q", "--bare", empty.to_str().unwrap()],
    );
    let e = fetch(&file_url(&empty), "main", &f.cache).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    assert!(e.to_string().contains("empty.git"), "{e}");

    let e = fetch("https://example.com/states.git", "main", &f.cache).unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
    assert!(
        e.to_string().contains("https://example.com/states.git"),
        "{e}"
    );
}

#[test]
fn links_and_submodules_in_a_real_tree() {
    let f = fixture();
    let w = &f.work;
    std::os::unix::fs::symlink("web", w.join("conf")).unwrap();
    std::os::unix::fs::symlink("../../etc/passwd", w.join("web/passwd")).unwrap();
    std::os::unix::fs::symlink("/etc/hosts", w.join("hosts")).unwrap();
    std::os::unix::fs::symlink("missing.sls", w.join("dangling")).unwrap();
    git(w, &["add", "-A"]);
    // A submodule entry (gitlink) without a .gitmodules: what matters is the tree entry.
    let gitlink = format!("160000,{},vendor/lib", f.first);
    git(w, &["update-index", "--add", "--cacheinfo", &gitlink]);
    git(w, &["commit", "-q", "-m", "links"]);
    let url = file_url(w);

    let c = fetch(&url, "main", &f.cache).unwrap();
    assert_eq!(
        paths(&c),
        [
            "bin/run.sh",
            "conf/extra.sls",
            "conf/init.sls",
            "current",
            "top.sls",
            "version.txt",
            "web/extra.sls",
            "web/init.sls"
        ]
    );
    assert_eq!(c.files["conf/init.sls"], c.files["web/init.sls"]);
    let skipped: Vec<(&str, &str)> = c
        .skipped
        .iter()
        .map(|s| (s.path.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(skipped.len(), 4, "{skipped:?}");
    assert_eq!(skipped[0].0, "dangling");
    assert!(skipped[0].1.contains("does not exist"), "{skipped:?}");
    assert_eq!(skipped[1].0, "hosts");
    assert!(skipped[1].1.contains("outside the tree"), "{skipped:?}");
    assert_eq!(skipped[2].0, "vendor/lib");
    assert!(
        skipped[2].1.contains("submodule") && skipped[2].1.contains(&f.first),
        "{skipped:?}"
    );
    assert_eq!(skipped[3].0, "web/passwd");
    assert!(skipped[3].1.contains("outside the tree"), "{skipped:?}");
}

#[test]
fn deleted_branches_and_moved_tags_upstream_are_seen() {
    let f = fixture();
    let url = file_url(&f.bare);
    git(&f.bare, &["branch", "feature", &f.first]);
    assert_eq!(fetch(&url, "feature", &f.cache).unwrap().commit, f.first);
    assert_eq!(fetch(&url, "v1", &f.cache).unwrap().commit, f.first);

    git(&f.bare, &["branch", "-D", "feature"]);
    git(&f.bare, &["tag", "-f", "v1", &f.second]);
    // The cache still has refs/remotes/origin/feature from the first fetch until pruned; the
    // lookup goes by what the remote advertises now.
    let e = fetch(&url, "feature", &f.cache).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    assert!(e.to_string().contains("feature"), "{e}");
    assert_eq!(fetch(&url, "v1", &f.cache).unwrap().commit, f.second);
}

#[test]
fn concurrent_fetches_of_one_url_share_the_cache() {
    let f = fixture();
    let url = file_url(&f.bare);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (url, cache) = (&url, &f.cache);
                let refname = if i % 2 == 0 { "main" } else { "v1" };
                s.spawn(move || fetch(url, refname, cache))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in results.into_iter().enumerate() {
        let c = r.unwrap_or_else(|e| panic!("fetch {i}: {e}"));
        let want = if i % 2 == 0 { &f.second } else { &f.first };
        assert_eq!(&c.commit, want, "fetch {i}");
    }
    assert_eq!(cache_repos(&f.cache).len(), 1);
}
