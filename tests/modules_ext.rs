//! Signed extension modules, end to end: keys made and modules signed with the real `eden`
//! binary, modules run through the engine from a state tree's `_modules/`, and refusals of a
//! really tampered file, a really wrong key, a missing and a forged signature. A refused module
//! must never run: each module writes a side-effect file when it runs, and the tests check that
//! the file does not appear.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use eden::engine::{self, tree::LocalTree, Context, Mode, Quiet, RunOptions, StepResult};
use eden::modules::ext::{self, ExtModule, ModuleSignature, ModuleSource, TrustedKeys};
use eden::modules::{Args, Call, EmptyTree, Module, Registry};
use serde_json::{json, Value};

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

/// A module that records its request in `side_effect` and replies.
fn module_script(side_effect: &Path) -> String {
    format!(
        "#!/bin/sh\ncat > '{}'\n\
         echo '{{\"result\": true, \"changes\": {{\"greeted\": \"yes\"}}, \"comment\": \"hi\", \
         \"outputs\": {{\"greeting\": \"hello from ext\"}}}}'\n",
        side_effect.display()
    )
}

struct Keys {
    dir: tempfile::TempDir,
    a_pub: String,
    b_pub: String,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.key");
        let b = dir.path().join("b.key");
        let (code, a_pub, err) = eden(&["module", "keygen", "--out", a.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let (code, b_pub, err) = eden(&["module", "keygen", "--out", b.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert_ne!(a_pub, b_pub);
        Keys {
            dir,
            a_pub: a_pub.trim().into(),
            b_pub: b_pub.trim().into(),
        }
    }
    fn key(&self, which: &str) -> PathBuf {
        self.dir.path().join(format!("{which}.key"))
    }
}

fn sign(file: &Path, key: &Path) {
    let (code, out, err) = eden(&[
        "module",
        "sign",
        file.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--publishes",
        "greeting",
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

/// Runs `greet.hello` then a cmd step that reads its output, from a tree whose `_modules/`
/// holds `greet.sh`, trusting `trusted`.
fn apply(tree_dir: &Path, trusted: &str) -> Vec<StepResult> {
    apply_sls(
        tree_dir,
        trusted,
        "x:\n  greet.hello:\n    - who: world\nuse:\n  cmd.run:\n    - name: echo '${{ steps.x.greeting }}'\n",
    )
}

fn apply_sls(tree_dir: &Path, trusted: &str, sls: &str) -> Vec<StepResult> {
    std::fs::write(tree_dir.join("s.sls"), sls).unwrap();
    let trusted = Arc::new(TrustedKeys::parse_lines(trusted).unwrap());
    let mut reg = Registry::builtin();
    let names = ext::register_tree_modules(&mut reg, tree_dir, trusted).unwrap();
    assert_eq!(names, vec!["greet".to_string()]);
    let tree = Arc::new(LocalTree::new(tree_dir).unwrap());
    let plan = engine::plan(
        tree.clone(),
        &["s".into()],
        &Context::default(),
        &reg,
        Mode::Ansible,
    )
    .unwrap();
    engine::run::run(&plan, &reg, tree.as_ref(), &RunOptions::default(), &Quiet)
}

fn tree_with_module(side_effect: &Path) -> (tempfile::TempDir, PathBuf) {
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir(tree.path().join("_modules")).unwrap();
    let module = tree.path().join("_modules/greet.sh");
    std::fs::write(&module, module_script(side_effect)).unwrap();
    (tree, module)
}

#[test]
fn signed_module_runs_and_its_outputs_feed_later_steps() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let side = work.path().join("ran");
    let (tree, module) = tree_with_module(&side);
    sign(&module, &keys.key("a"));
    let (code, out, err) = eden(&[
        "module",
        "verify",
        module.to_str().unwrap(),
        "--trust",
        &keys.a_pub,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("OK"), "{out}");

    let results = apply(tree.path(), &keys.a_pub);
    assert_eq!(results[0].result, Some(true), "{}", results[0].comment);
    assert_eq!(results[0].changes, json!({"greeted": "yes"}));
    assert_eq!(results[1].outputs["stdout"], "hello from ext");
    let request: Value = serde_json::from_slice(&std::fs::read(&side).unwrap()).unwrap();
    assert_eq!(request["function"], "hello");
    assert_eq!(request["args"]["who"], "world");
    assert_eq!(request["test"], false);
}

#[test]
fn tampered_module_is_refused_and_never_runs() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let side = work.path().join("ran");
    let (tree, module) = tree_with_module(&side);
    sign(&module, &keys.key("a"));
    // Tamper after signing: one extra line.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&module)
        .unwrap();
    writeln!(f, "touch '{}.evil'", side.display()).unwrap();
    drop(f);

    let (code, _, err) = eden(&[
        "module",
        "verify",
        module.to_str().unwrap(),
        "--trust",
        &keys.a_pub,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("changed after it was signed"), "{err}");
    let results = apply(tree.path(), &keys.a_pub);
    assert_eq!(results[0].result, Some(false));
    assert!(
        results[0].comment.contains("refused"),
        "{}",
        results[0].comment
    );
    assert!(
        results[0].comment.contains("changed after it was signed"),
        "{}",
        results[0].comment
    );
    assert_eq!(
        results[1].result,
        Some(false),
        "the dependent step does not run"
    );
    assert!(!side.exists(), "a tampered module must never run");
    assert!(!work.path().join("ran.evil").exists());
}

#[test]
fn module_signed_by_an_untrusted_key_is_refused_and_never_runs() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let side = work.path().join("ran");
    let (tree, module) = tree_with_module(&side);
    sign(&module, &keys.key("b"));
    let (code, _, err) = eden(&[
        "module",
        "verify",
        module.to_str().unwrap(),
        "--trust",
        &keys.a_pub,
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("does not trust") && err.contains(&keys.b_pub),
        "{err}"
    );
    let results = apply(tree.path(), &keys.a_pub);
    assert_eq!(results[0].result, Some(false));
    assert!(
        results[0].comment.contains("does not trust"),
        "{}",
        results[0].comment
    );
    assert!(
        !side.exists(),
        "a module with an untrusted key must never run"
    );
    // The same file runs once its key is trusted.
    let results = apply(tree.path(), &format!("{}\n{}", keys.a_pub, keys.b_pub));
    assert_eq!(results[0].result, Some(true), "{}", results[0].comment);
    assert!(side.exists());
}

#[test]
fn unsigned_and_forged_modules_are_refused_and_never_run() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let side = work.path().join("ran");
    let (tree, module) = tree_with_module(&side);
    // Without a signature file the module declares no outputs, so only a plain call compiles.
    let results = apply_sls(tree.path(), &keys.a_pub, "x:\n  greet.hello: []\n");
    assert_eq!(results[0].result, Some(false));
    assert!(
        results[0].comment.contains("not signed"),
        "{}",
        results[0].comment
    );
    assert!(!side.exists());

    // A signature made by the trusted key for other bytes, its sha256 field edited to match.
    let other = work.path().join("other.sh");
    std::fs::write(&other, "#!/bin/sh\necho other\n").unwrap();
    sign(&other, &keys.key("a"));
    let mut forged: ModuleSignature =
        serde_json::from_slice(&std::fs::read(work.path().join("other.sh.sig")).unwrap()).unwrap();
    forged.sha256 = ext::sha256_hex(&std::fs::read(&module).unwrap());
    std::fs::write(
        tree.path().join("_modules/greet.sh.sig"),
        serde_json::to_vec(&forged).unwrap(),
    )
    .unwrap();
    let results = apply(tree.path(), &keys.a_pub);
    assert_eq!(results[0].result, Some(false));
    assert!(
        results[0].comment.contains("does not verify"),
        "{}",
        results[0].comment
    );
    assert!(
        !side.exists(),
        "a forged signature must never let a module run"
    );
}

#[test]
fn module_add_installs_only_verified_modules() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let side = work.path().join("ran");
    let src = work.path().join("greet.sh");
    std::fs::write(&src, module_script(&side)).unwrap();
    sign(&src, &keys.key("b"));
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path().to_str().unwrap();
    let (code, _, err) = eden(&[
        "module",
        "add",
        src.to_str().unwrap(),
        "--tree",
        t,
        "--trust",
        &keys.a_pub,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("does not trust"), "{err}");
    assert!(!tree.path().join("_modules/greet.sh").exists());
    let keyfile = work.path().join("trusted");
    std::fs::write(&keyfile, format!("# ops team\n{}\n", keys.b_pub)).unwrap();
    let (code, out, err) = eden(&[
        "module",
        "add",
        src.to_str().unwrap(),
        "--tree",
        t,
        "--trusted-keys",
        keyfile.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let results = apply(tree.path(), &keys.b_pub);
    assert_eq!(results[0].result, Some(true), "{}", results[0].comment);
    assert!(side.exists());
}

/// A one-shot-per-connection HTTPS server on loopback with a self-signed certificate that
/// serves `body` for every request. Returns the port and the certificate PEM.
fn https_server(body: Vec<u8>) -> (u16, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert_pem = ck.cert.pem();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut tcp) = stream else { continue };
            let mut conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = tls.write_all(head.as_bytes());
            let _ = tls.write_all(&body);
            let _ = tls.flush();
            conn.send_close_notify();
            let _ = conn.complete_io(&mut tcp);
        }
    });
    (port, cert_pem)
}

fn greet(source: ModuleSource, trusted: &Arc<TrustedKeys>) -> ExtModule {
    ExtModule::new("greet", source, trusted.clone(), &[]).unwrap()
}

fn call_ext(m: &ExtModule) -> eden::modules::Outcome {
    let args: Args = json!({"name": "x"}).as_object().unwrap().clone();
    m.validate("hello", &args).unwrap();
    match m.call(&Call {
        id: "x",
        function: "hello",
        args: &args,
        test: true,
        tree: &EmptyTree,
        changed_watches: &[],
    }) {
        Ok(o) => o,
        Err(e) => eden::modules::Outcome::failed(e.to_string()),
    }
}

#[test]
fn module_from_an_https_url_is_fetched_verified_and_run() {
    let (pem, public) = ext::generate_key().unwrap();
    let key = ext::parse_secret_key(&pem).unwrap();
    let work = tempfile::tempdir().unwrap();
    let side = work.path().join("ran");
    let script = module_script(&side).into_bytes();
    let signature = ext::sign(&script, &key, vec![]);
    let trusted = Arc::new(TrustedKeys(vec![public]));

    let (port, ca) = https_server(script.clone());
    let ca_file = work.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let url = format!("https://127.0.0.1:{port}/greet.sh");
    let m = greet(
        ModuleSource::Url {
            url: url.clone(),
            signature: signature.clone(),
            ca: Some(ca_file.clone()),
        },
        &trusted,
    );
    let out = call_ext(&m);
    assert_eq!(out.result, Some(true), "{}", out.comment);
    let request: Value = serde_json::from_slice(&std::fs::read(&side).unwrap()).unwrap();
    assert_eq!(request["test"], true);
    std::fs::remove_file(&side).unwrap();

    // The server now serves other bytes under the same signature: refused, not run.
    let mut evil = script.clone();
    evil.extend_from_slice(b"touch /tmp/eden-never-run\n");
    let (port, ca) = https_server(evil);
    std::fs::write(&ca_file, ca).unwrap();
    let m = greet(
        ModuleSource::Url {
            url: format!("https://127.0.0.1:{port}/greet.sh"),
            signature,
            ca: Some(ca_file.clone()),
        },
        &trusted,
    );
    let out = call_ext(&m);
    assert_eq!(out.result, Some(false));
    assert!(
        out.comment.contains("changed after it was signed"),
        "{}",
        out.comment
    );
    assert!(!side.exists());

    // Without the server's CA the fetch fails on TLS; plain http is refused.
    let m = greet(
        ModuleSource::Url {
            url,
            signature: ext::sign(b"", &key, vec![]),
            ca: None,
        },
        &trusted,
    );
    let out = call_ext(&m);
    assert!(out.comment.contains("TLS"), "{}", out.comment);
    let m = greet(
        ModuleSource::Url {
            url: format!("http://127.0.0.1:{port}/x"),
            signature: ext::sign(b"", &key, vec![]),
            ca: None,
        },
        &trusted,
    );
    let out = call_ext(&m);
    assert!(out.comment.contains("https only"), "{}", out.comment);
    assert!(!side.exists());
}

#[test]
fn datastore_source_is_verified_before_it_runs() {
    let (pem, public) = ext::generate_key().unwrap();
    let key = ext::parse_secret_key(&pem).unwrap();
    let work = tempfile::tempdir().unwrap();
    let side = work.path().join("ran");
    let script = module_script(&side).into_bytes();
    let signature = ext::sign(&script, &key, vec![]);
    let config = json!({"module_keys": [public.to_string()]});
    let trusted = Arc::new(TrustedKeys::from_cluster_config(&config).unwrap());
    let mut tampered = script.clone();
    tampered[12] ^= 1;
    let bad = greet(
        ModuleSource::Datastore {
            blob: Arc::new(tampered),
            signature: signature.clone(),
        },
        &trusted,
    );
    assert_eq!(call_ext(&bad).result, Some(false));
    assert!(!side.exists());
    let good = greet(
        ModuleSource::Datastore {
            blob: Arc::new(script),
            signature,
        },
        &trusted,
    );
    assert_eq!(call_ext(&good).result, Some(true));
    assert!(side.exists());
}

/// What `eden apply --local` will use: the built-ins plus `_modules/`, trusting the keys in the
/// file `EDEN_MODULE_KEYS` names.
#[test]
fn local_registry_trusts_the_local_keys_file() {
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let side = work.path().join("ran");
    let (tree, module) = tree_with_module(&side);
    sign(&module, &keys.key("a"));
    let keyfile = work.path().join("module-keys");
    std::fs::write(&keyfile, format!("{}\n", keys.a_pub)).unwrap();
    // This test process is the only one reading the variable.
    std::env::set_var("EDEN_MODULE_KEYS", &keyfile);
    let reg = ext::registry_for_local_tree(tree.path()).unwrap();
    assert!(reg.get("cmd").is_some() && reg.get("greet").is_some());
    let args: Args = json!({"name": "x"}).as_object().unwrap().clone();
    let local = eden::engine::tree::LocalTree::new(tree.path()).unwrap();
    let call = |reg: &Registry| {
        reg.get("greet").unwrap().call(&Call {
            id: "x",
            function: "hello",
            args: &args,
            test: false,
            tree: &local,
            changed_watches: &[],
        })
    };
    assert_eq!(call(&reg).unwrap().result, Some(true));
    assert!(side.exists());
    std::fs::remove_file(&side).unwrap();
    // A file that trusts only the other key: refused, not run.
    std::fs::write(&keyfile, format!("{}\n", keys.b_pub)).unwrap();
    let reg = ext::registry_for_local_tree(tree.path()).unwrap();
    let e = call(&reg).unwrap_err().to_string();
    assert!(e.contains("does not trust"), "{e}");
    assert!(!side.exists());
}
