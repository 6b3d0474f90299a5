//! Extension modules in the datastore, against a real etcd 3.4 on loopback (the store eden's
//! own API matches): `eden module add --endpoints` stores the blob and the record in one txn,
//! `eden module verify NAME --endpoints` checks them with the keys from /eden/cluster/config,
//! and a module run from the stored record is refused once the stored blob is tampered with.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use eden::modules::ext::{ExtModule, ModuleRecord, TrustedKeys};
use eden::modules::{Args, Call, EmptyTree, Module};
use serde_json::{json, Value};

struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .args([
                "--name=eden-modules-test",
                &format!("--data-dir={}", dir.path().join("data").display()),
                &format!("--listen-client-urls={endpoint}"),
                &format!("--advertise-client-urls={endpoint}"),
                &format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                &format!("--initial-cluster=eden-modules-test=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd 3.4 (Debian's etcd-server) must be installed");
        let etcd = Etcd {
            child,
            endpoint,
            _dir: dir,
        };
        for _ in 0..500 {
            if etcd.ctl(&["endpoint", "health"]).0 {
                return etcd;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("etcd did not become healthy");
    }

    fn ctl(&self, args: &[&str]) -> (bool, Vec<u8>) {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), out.stdout)
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let (ok, out) = self.ctl(&["get", "--print-value-only", key]);
        assert!(ok);
        if out.is_empty() {
            return None;
        }
        let mut v = out;
        if v.last() == Some(&b'\n') {
            v.pop();
        }
        Some(v)
    }

    /// Puts raw bytes (etcdctl reads the value from stdin).
    fn put(&self, key: &str, value: &[u8]) {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .args(["put", key])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(value).unwrap();
        assert!(child.wait().unwrap().success());
    }
}

fn eden(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_eden"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn keygen(dir: &Path, name: &str) -> String {
    let (code, out, err) = eden(&[
        "module",
        "keygen",
        "--out",
        dir.join(name).to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    out.trim().to_string()
}

#[test]
fn modules_in_the_datastore_are_stored_verified_and_refused_when_tampered() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint.clone();
    let work = tempfile::tempdir().unwrap();
    let a_pub = keygen(work.path(), "a.key");
    keygen(work.path(), "b.key");
    etcd.put(
        "/eden/cluster/config",
        json!({"module_keys": [a_pub]}).to_string().as_bytes(),
    );

    let side = work.path().join("ran");
    let module = work.path().join("greet.sh");
    std::fs::write(
        &module,
        format!(
            "#!/bin/sh\ncat > '{}'\necho '{{\"result\": true, \"comment\": \"stored module ran\"}}'\n",
            side.display()
        ),
    )
    .unwrap();
    let m = module.to_str().unwrap();

    // Signed by a key the cluster does not trust: refused, nothing stored.
    let k = work.path().join("b.key");
    assert_eq!(
        eden(&["module", "sign", m, "--key", k.to_str().unwrap()]).0,
        0
    );
    let (code, _, err) = eden(&["module", "add", m, "--endpoints", &ep]);
    assert_ne!(code, 0);
    assert!(err.contains("does not trust"), "{err}");
    assert_eq!(etcd.get("/eden/modules/greet"), None);

    // Signed by the trusted key: stored as blob + record.
    let k = work.path().join("a.key");
    assert_eq!(
        eden(&["module", "sign", m, "--key", k.to_str().unwrap()]).0,
        0
    );
    let (code, out, err) = eden(&["module", "add", m, "--endpoints", &ep]);
    assert_eq!(code, 0, "{out}{err}");
    let record_bytes = etcd.get("/eden/modules/greet").expect("record stored");
    let record: Value = serde_json::from_slice(&record_bytes).unwrap();
    assert_eq!(record["source"], "blob");
    assert_eq!(record["key"], a_pub.as_str());
    let sha = record["sha256"].as_str().unwrap().to_string();
    let blob_key = format!("/eden/blobs/{sha}");
    assert_eq!(
        etcd.get(&blob_key).unwrap(),
        std::fs::read(&module).unwrap()
    );

    let (code, out, err) = eden(&["module", "verify", "greet", "--endpoints", &ep]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&sha), "{out}");

    // What an agent does: read the record and blob, run through the verified runner.
    let run_stored = |etcd: &Etcd| {
        let record =
            ModuleRecord::parse(&etcd.get("/eden/modules/greet").unwrap(), "greet").unwrap();
        let blob = record.blob_key().and_then(|k| etcd.get(&k));
        let config: Value =
            serde_json::from_slice(&etcd.get("/eden/cluster/config").unwrap()).unwrap();
        let trusted = Arc::new(TrustedKeys::from_cluster_config(&config).unwrap());
        let module =
            ExtModule::new("greet", record.into_source(blob).unwrap(), trusted, &[]).unwrap();
        let args: Args = json!({"name": "x"}).as_object().unwrap().clone();
        module
            .call(&Call {
                id: "x",
                function: "hello",
                args: &args,
                test: false,
                tree: &EmptyTree,
                changed_watches: &[],
            })
            .map_err(|e| e.to_string())
    };
    let ran = run_stored(&etcd).unwrap();
    assert_eq!(ran.result, Some(true), "{}", ran.comment);
    assert_eq!(ran.comment, "stored module ran");
    assert!(side.exists());
    std::fs::remove_file(&side).unwrap();

    // Someone with write access to the store swaps the blob: refused, never run.
    let mut evil = std::fs::read(&module).unwrap();
    evil.extend_from_slice(b"touch /tmp/eden-datastore-evil\n");
    etcd.put(&blob_key, &evil);
    let (code, _, err) = eden(&["module", "verify", "greet", "--endpoints", &ep]);
    assert_eq!(code, 1);
    assert!(err.contains("changed after it was signed"), "{err}");
    let refused = run_stored(&etcd).unwrap_err();
    assert!(refused.contains("refused"), "{refused}");
    assert!(!side.exists(), "a tampered stored module must never run");

    // The cluster stops trusting the key: refused too.
    etcd.put("/eden/cluster/config", br#"{"module_keys": []}"#);
    let (code, _, err) = eden(&["module", "verify", "greet", "--endpoints", &ep]);
    assert_eq!(code, 1);
    assert!(err.contains("trusts no module key"), "{err}");
}
