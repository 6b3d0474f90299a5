//! pkgrepo against the real apt configuration and the real PackageKit: a local flat apt
//! repository holding a package built here is added, the cache is refreshed through
//! PackageKit, the package installs from it, and after pkgrepo.absent it is gone from the cache.
//! Needs root, apt and a system bus (`scripts/test` starts one).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use eden::modules::pkg::Pkg;
use eden::modules::pkgrepo::PkgRepo;
use eden::modules::{Args, Call, EmptyTree, Module, Outcome};
use ring::digest::{digest, SHA256};
use serde_json::{json, Value};

fn call(m: &dyn Module, function: &str, args: Value, test: bool) -> Outcome {
    let args: Args = args.as_object().unwrap().clone();
    m.validate(function, &args).unwrap();
    m.call(&Call {
        id: "t",
        function,
        args: &args,
        test,
        tree: &EmptyTree,
        changed_watches: &[],
    })
    .unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Builds `eden-testpkg_1.0_all.deb` with dpkg-deb and writes a flat repository
/// (`Packages`, `Release`) around it in `repo`.
fn make_repo(repo: &Path) {
    let root = repo.join("build");
    fs::create_dir_all(root.join("DEBIAN")).unwrap();
    fs::create_dir_all(root.join("usr/share/eden-testpkg")).unwrap();
    fs::write(root.join("usr/share/eden-testpkg/marker"), "eden\n").unwrap();
    let control = "Package: eden-testpkg\nVersion: 1.0\nArchitecture: all\n\
                   Maintainer: eden tests <eden@localhost>\n\
                   Description: eden pkgrepo test package\n";
    fs::write(root.join("DEBIAN/control"), control).unwrap();
    let deb = repo.join("eden-testpkg_1.0_all.deb");
    let st = Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&root)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    fs::remove_dir_all(&root).unwrap();
    let bytes = fs::read(&deb).unwrap();
    let packages = format!(
        "{control}Filename: ./eden-testpkg_1.0_all.deb\nSize: {}\nSHA256: {}\n\n",
        bytes.len(),
        hex(digest(&SHA256, &bytes).as_ref())
    );
    fs::write(repo.join("Packages"), &packages).unwrap();
    let release = format!(
        "Origin: eden-test\nLabel: eden-test\nDate: Thu, 01 Jan 2026 00:00:00 UTC\nSHA256:\n {} {} Packages\n",
        hex(digest(&SHA256, packages.as_bytes()).as_ref()),
        packages.len()
    );
    fs::write(repo.join("Release"), release).unwrap();
}

fn dpkg_installed(name: &str) -> bool {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("install ok installed")
}

#[test]
fn local_repository_is_added_refreshed_used_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    // apt reads file: repositories as its unprivileged `_apt` user.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    make_repo(dir.path());
    let line = format!("deb [trusted=yes] file:{} ./", dir.path().display());
    let list = format!(
        "/etc/apt/sources.list.d/eden-test-{}.list",
        std::process::id()
    );
    // If an assertion fails midway, do not leave a source pointing at a deleted directory.
    struct RemoveOnDrop(String);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }
    let _cleanup = RemoveOnDrop(list.clone());
    let repo = PkgRepo::packagekit();
    let pkg = Pkg::packagekit();

    // Test mode writes nothing.
    let dry = call(
        &repo,
        "managed",
        json!({"name": line, "file": list, "humanname": "eden test"}),
        true,
    );
    assert_eq!(dry.result, None, "{}", dry.comment);
    assert!(dry.changes["diff"].as_str().unwrap().contains(&line));
    assert!(!Path::new(&list).exists());

    let added = call(
        &repo,
        "managed",
        json!({"name": line, "file": list, "humanname": "eden test"}),
        false,
    );
    assert_eq!(added.result, Some(true), "{}", added.comment);
    assert!(added.comment.contains("refreshed"), "{}", added.comment);
    assert_eq!(
        fs::read_to_string(&list).unwrap(),
        format!("# eden test\n{line}\n")
    );
    assert_eq!(added.outputs["file"], list.as_str());
    let again = call(
        &repo,
        "managed",
        json!({"name": line, "file": list, "humanname": "eden test"}),
        false,
    );
    assert_eq!(again.changes, json!({}), "{}", again.comment);

    // The refreshed cache knows the package: it installs from the new repository.
    let inst = call(&pkg, "installed", json!({"name": "eden-testpkg"}), false);
    assert_eq!(inst.result, Some(true), "{}", inst.comment);
    assert_eq!(
        inst.changes["eden-testpkg"],
        json!({"old": "", "new": "1.0"})
    );
    assert!(dpkg_installed("eden-testpkg"));
    assert!(Path::new("/usr/share/eden-testpkg/marker").exists());
    let rm = call(&pkg, "removed", json!({"name": "eden-testpkg"}), false);
    assert_eq!(rm.result, Some(true), "{}", rm.comment);
    assert!(!dpkg_installed("eden-testpkg"));

    // Disabling comments the line out; absent removes the file (its only line) and refreshes.
    let off = call(
        &repo,
        "managed",
        json!({"name": line, "file": list, "disabled": true, "refresh": false}),
        false,
    );
    assert_eq!(off.result, Some(true), "{}", off.comment);
    assert_eq!(
        fs::read_to_string(&list).unwrap(),
        format!("# eden test\n# {line}\n")
    );
    let gone = call(&repo, "absent", json!({"name": line, "file": list}), false);
    assert_eq!(gone.result, Some(true), "{}", gone.comment);
    assert!(gone.comment.contains("refreshed"), "{}", gone.comment);
    assert!(!Path::new(&list).exists());
    let again = call(&repo, "absent", json!({"name": line, "file": list}), false);
    assert_eq!(again.changes, json!({}));
    // The refreshed cache no longer knows the package.
    let unknown = call(&pkg, "installed", json!({"name": "eden-testpkg"}), false);
    assert_eq!(unknown.result, Some(false), "{}", unknown.comment);
}

#[test]
fn bad_lines_and_paths_are_refused() {
    let repo = PkgRepo::packagekit();
    let args: Args = json!({"name": "deb http://x bookworm main", "file": "relative.list"})
        .as_object()
        .unwrap()
        .clone();
    let e = repo.validate("managed", &args).unwrap_err().to_string();
    assert!(e.contains("relative.list") && e.contains("absolute"), "{e}");
    let args: Args = json!({"name": "http://x bookworm main", "file": "/tmp/eden-never.list"})
        .as_object()
        .unwrap()
        .clone();
    let e = repo
        .call(&Call {
            id: "t",
            function: "managed",
            args: &args,
            test: false,
            tree: &EmptyTree,
            changed_watches: &[],
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an apt source line"), "{e}");
    assert!(!Path::new("/tmp/eden-never.list").exists());
}
