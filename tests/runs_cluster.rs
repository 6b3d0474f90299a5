//! Cluster runs with real processes: 4 datastore nodes (3 voters and a standby) and one
//! agent-only node, driven by the `eden` CLI exactly as an operator would.

mod serve_common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use serve_common::*;

struct Fleet {
    root: PathBuf,
    /// n1..n4: datastore nodes.
    data: Vec<Node>,
    /// a1: agent-only.
    agent: Node,
}

impl Fleet {
    fn endpoints(&self) -> String {
        self.data
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.endpoint())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn eden(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_eden"));
        c.args(args).args(["--endpoints", &self.endpoints()]);
        c.env_remove("EDEN_CREDS").env_remove("EDEN_ENDPOINTS");
        c.env("XDG_CACHE_HOME", self.root.join("cache"));
        c
    }

    /// Runs a CLI command with `--output json`; its exit code and parsed output.
    fn json(&self, args: &[&str]) -> (i32, Value) {
        let out = self.eden(args).args(["--output", "json"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "eden {args:?} printed no JSON ({e}):\nstdout: {text}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), v)
    }

    fn out(&self, name: &str) -> PathBuf {
        self.root.join("out").join(name)
    }
}

/// Waits until every node's agent has registered (its alive key exists).
async fn wait_agents(via: &Node, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in names {
        let key = format!("/eden/nodes/{n}/alive");
        while local_get(&via.endpoint(), &key).await.is_none() {
            assert!(Instant::now() < deadline, "agent {n} did not register");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn fleet(root: &Path) -> Fleet {
    let mut n1 = Node::new(root, "n1");
    n1.create(None, &["--labels", "role=db,dc=eu"]);
    n1.ready().await;
    let token = n1.token();
    let via = n1.peer.clone();
    let mut data = vec![n1];
    for (name, labels) in [
        ("n2", "role=web,dc=eu"),
        ("n3", "role=db,dc=us"),
        ("n4", "role=cache,dc=us"),
    ] {
        let mut n = Node::new(root, name);
        n.create(Some((&via, &token)), &["--labels", labels]);
        n.ready().await;
        data.push(n);
    }
    wait_roles(&data[0], 3, 1).await;
    let mut agent = Node::new(root, "a1");
    agent.create(
        Some((&via, &token)),
        &["--datastore", "never", "--labels", "role=web,dc=us"],
    );
    wait_agents(&data[0], &["n1", "n2", "n3", "n4", "a1"]).await;
    std::fs::create_dir_all(root.join("out")).unwrap();
    Fleet {
        root: root.to_path_buf(),
        data,
        agent,
    }
}

/// Waits until the cluster has `voters` voters and `learners` standbys.
async fn wait_roles(node: &Node, voters: usize, learners: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = members(&node.endpoint()).await;
        let l = m.iter().filter(|m| m.is_learner).count();
        if m.len() - l == voters && l == learners {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cluster did not reach {voters} voters and {learners} standbys: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
}

fn node_names(v: &Value) -> BTreeSet<String> {
    v["nodes"].as_object().unwrap().keys().cloned().collect()
}

fn step<'a>(v: &'a Value, node: &str, id: &str) -> &'a Value {
    v["nodes"][node]
        .as_array()
        .unwrap_or_else(|| panic!("no results for {node}: {v}"))
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} on {node}: {v}"))
}

/// Nanosecond timestamps a step printed (one per line).
fn stamps(v: &Value, node: &str, id: &str) -> Vec<u128> {
    step(v, node, id)["outputs"]["stdout"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_target_by_label_pass_values_between_nodes_and_order_steps_across_them() {
    let tmp = tempfile::tempdir().unwrap();
    let fleet = fleet(tmp.path()).await;
    let out = fleet.out("").display().to_string();
    let tree = tmp.path().join("states");
    write(
        &tree,
        &[(
            "web.sls",
            &format!(
                "role-file:\n  file.managed:\n    - name: {out}/{{{{ node.name }}}}-role\n    \
                 - contents: \"{{{{ node.labels.role }}}} {{{{ node.facts.os }}}} {{{{ vars.greeting }}}}\"\n"
            ),
        )],
    );
    let tree_s = tree.display().to_string();

    // 1. Targeting by label: exactly the two role=web nodes run, one of them agent-only.
    let (code, dry) = fleet.json(&["apply", "--target", "role=web", "--dry-targets"]);
    assert_eq!(code, 0, "{dry}");
    assert_eq!(dry["nodes"], serde_json::json!(["a1", "n2"]));
    // Every node published its facts, and targets match on them as well as on labels.
    for n in ["n1", "n2", "n3", "n4", "a1"] {
        let key = format!("/eden/nodes/{n}/facts");
        let raw = local_get(&fleet.data[0].endpoint(), &key)
            .await
            .unwrap_or_else(|| panic!("{key} is missing"));
        let facts: Value = serde_json::from_slice(&raw).unwrap();
        for field in ["os", "kernel", "hostname", "fqdn", "ips", "cpus", "memory"] {
            assert!(
                !facts[field].is_null() && facts[field] != "",
                "{key}: no {field}: {facts}"
            );
        }
        assert!(facts["cpus"].as_u64().unwrap() >= 1, "{facts}");
        assert!(facts["labels"]["role"].is_string(), "{facts}");
    }
    let os = {
        let raw = local_get(&fleet.data[0].endpoint(), "/eden/nodes/a1/facts")
            .await
            .unwrap();
        serde_json::from_slice::<Value>(&raw).unwrap()["os"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let expr = format!("kernel=Linux and os=\"{os}\" and not (role=db or n4)");
    let (code, dry) = fleet.json(&["apply", "--target", &expr, "--dry-targets"]);
    assert_eq!(code, 0, "{dry}");
    assert_eq!(dry["nodes"], serde_json::json!(["a1", "n2"]), "{expr}");
    let (code, dry) = fleet.json(&["apply", "--target", "os=no-such-os,n3", "--dry-targets"]);
    assert_eq!(code, 0, "{dry}");
    assert_eq!(dry["nodes"], serde_json::json!(["n3"]));
    let vars = tmp.path().join("extra.yaml");
    std::fs::write(&vars, "greeting: hello\n").unwrap();
    let vars_s = vars.display().to_string();
    let (code, v) = fleet.json(&[
        "apply", &tree_s, "web", "--target", "role=web", "--vars", &vars_s,
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(node_names(&v), BTreeSet::from(["a1".into(), "n2".into()]));
    for n in ["a1", "n2"] {
        assert_eq!(step(&v, n, "role-file")["result"], true, "{v}");
        let text = std::fs::read_to_string(fleet.out(&format!("{n}-role"))).unwrap();
        assert!(text.starts_with("web "), "{n}: {text}");
        assert!(
            text.trim_end().ends_with(" hello"),
            "--vars reached {n}: {text}"
        );
    }
    for n in ["n1", "n3", "n4"] {
        assert!(
            !fleet.out(&format!("{n}-role")).exists(),
            "{n} was not targeted"
        );
    }
    assert_eq!(v["summary"]["changed"], 2, "{v}");
    assert_eq!(v["summary"]["nodes"], 2, "{v}");
    // The run can be read back, and its events say what happened on each node.
    let run = v["run"].as_str().unwrap().to_string();
    let (code, shown) = fleet.json(&["runs", "show", &run]);
    assert_eq!(code, 0, "{shown}");
    assert_eq!(
        shown["nodes"], v["nodes"],
        "runs show gives the same results"
    );
    let o = fleet
        .eden(&["events", "--run", &run, "--output", "json"])
        .output()
        .unwrap();
    let events: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds = |node: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["node"] == node)
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect()
    };
    for n in ["a1", "n2"] {
        assert_eq!(
            kinds(n),
            ["run.started", "step.finished", "run.finished"],
            "{n}: {events:?}"
        );
    }
    assert!(
        kinds("controller").contains(&"run.finished".to_string()),
        "{events:?}"
    );

    // 1b. Live progress: `eden events --follow` prints a later run's events as they happen,
    // `eden run` shows one plain line per step when stderr is not a terminal, and a progress
    // bar per node on a terminal.
    live_progress(&fleet, &run).await;

    // 2. A value made on one node reaches the others; target_limit runs a step once.
    write(
        &tree,
        &[(
            "token.sls",
            &format!(
                "{{% if node.name == 'n3' %}}\ngen:\n  cmd.run:\n    - name: cat /proc/sys/kernel/random/uuid\n{{% endif %}}\n\
                 use:\n  file.managed:\n    - name: {out}/{{{{ node.name }}}}-token\n    \
                 - contents: \"${{{{ nodes.n3.steps.gen.stdout }}}}\"\n\
                 once:\n  cmd.run:\n    - name: echo {{{{ node.name }}}} >> {out}/once\n    - target_limit: 1\n"
            ),
        )],
    );
    let (code, v) = fleet.json(&["apply", &tree_s, "token", "--target", "*"]);
    assert_eq!(code, 0, "{v}");
    let token = step(&v, "n3", "gen")["outputs"]["stdout"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(token.len(), 36, "a uuid: {token:?}");
    for n in ["n1", "n2", "n3", "n4", "a1"] {
        let got = std::fs::read_to_string(fleet.out(&format!("{n}-token"))).unwrap();
        // file.managed ends contents with a newline, as Salt does.
        assert_eq!(got, format!("{token}\n"), "{n} got the token made on n3");
    }
    let once = std::fs::read_to_string(fleet.out("once")).unwrap();
    assert_eq!(once.lines().count(), 1, "target_limit 1 ran once: {once:?}");
    let ran_on = once.trim();
    for n in ["n1", "n2", "n3", "n4", "a1"] {
        let s = step(&v, n, "once");
        if n == ran_on {
            assert_eq!(s["result"], true);
        } else {
            let c = s["comment"].as_str().unwrap();
            assert!(c.contains("target_limit") && c.contains(ran_on), "{n}: {c}");
        }
    }

    // 3. serialize: 1 runs the step on one node at a time; sync: true holds every node until
    //    all have finished the step. Shown by the timestamps the steps print.
    write(
        &tree,
        &[(
            "order.sls",
            "{% set d = {'n1': 0.1, 'n2': 0.2, 'n3': 0.3, 'n4': 0.4, 'a1': 0.5} %}\n\
             one-at-a-time:\n  cmd.run:\n    - name: date +%s%N; sleep 0.3; date +%s%N\n    - serialize: 1\n\
             staggered:\n  cmd.run:\n    - name: sleep {{ d[node.name] }}; date +%s%N\n    - sync: true\n\
             after:\n  cmd.run:\n    - name: date +%s%N\n",
        )],
    );
    let (code, v) = fleet.json(&["apply", &tree_s, "order", "--target", "*"]);
    assert_eq!(code, 0, "{v}");
    let nodes = ["n1", "n2", "n3", "n4", "a1"];
    let mut spans: Vec<(u128, u128, &str)> = nodes
        .iter()
        .map(|n| {
            let t = stamps(&v, n, "one-at-a-time");
            (t[0], t[1], *n)
        })
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "serialize 1: {} ran {:?} while {} ran {:?}",
            w[0].2,
            (w[0].0, w[0].1),
            w[1].2,
            (w[1].0, w[1].1)
        );
    }
    let last_staggered = nodes
        .iter()
        .map(|n| stamps(&v, n, "staggered")[0])
        .max()
        .unwrap();
    for n in nodes {
        let after = stamps(&v, n, "after")[0];
        assert!(
            after >= last_staggered,
            "sync: {n} moved on at {after} before every node finished (last at {last_staggered})"
        );
    }

    // 3b. A sync barrier that gives up fails the step on the node that waited (the run's
    //     --wait-secs), and what requires the step does not run there.
    write(
        &tree,
        &[(
            "held.sls",
            "held:\n  cmd.run:\n    - name: {% if node.name == 'n1' %}sleep 4{% else %}true{% endif %}\n\
             \x20   - sync: true\n\
             next:\n  cmd.run:\n    - name: echo next\n    - require:\n      - cmd: held\n",
        )],
    );
    let (code, v) = fleet.json(&[
        "apply",
        &tree_s,
        "held",
        "--target",
        "n1 or n2",
        "--wait-secs",
        "1",
    ]);
    assert_ne!(
        code, 0,
        "a sync barrier that gave up did not fail the run: {v}"
    );
    let held = step(&v, "n2", "held");
    assert_eq!(held["result"], false, "{v}");
    let c = held["comment"].as_str().unwrap();
    assert!(
        c.contains("sync") && c.contains("still waiting after 1s"),
        "{c}"
    );
    assert_eq!(step(&v, "n2", "next")["result"], false, "{v}");
    let c = step(&v, "n2", "next")["comment"].as_str().unwrap();
    assert!(c.contains("requisite failed"), "{c}");
    // n1 finished last: everyone had finished by then, so it went on.
    assert_eq!(step(&v, "n1", "held")["result"], true, "{v}");
    assert_eq!(step(&v, "n1", "next")["result"], true, "{v}");

    // 4. A git source at two commits: the ref is resolved once per run, recorded in the run,
    //    and every node runs that commit's states.
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let o = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    git(&["init", "-q"]);
    let site = |version: &str| {
        format!(
            "site:\n  file.managed:\n    - name: {out}/{{{{ node.name }}}}-site\n    - contents: {version}\n"
        )
    };
    std::fs::write(repo.join("site.sls"), site("v1")).unwrap();
    git(&["add", "site.sls"]);
    git(&["commit", "-q", "-m", "v1"]);
    git(&["tag", "v1"]);
    let c1 = git(&["rev-parse", "HEAD"]);
    std::fs::write(repo.join("site.sls"), site("v2")).unwrap();
    git(&["commit", "-q", "-am", "v2"]);
    let c2 = git(&["rev-parse", "HEAD"]);
    let url = format!("file://{}", repo.display());
    let o = fleet
        .eden(&["repo", "add", "site", &url, "--ref", "main"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (spec, want, commit) in [("site@v1", "v1", &c1), ("site", "v2", &c2)] {
        let (code, v) = fleet.json(&["apply", "--repo", spec, "site", "--target", "n2,a1"]);
        assert_eq!(code, 0, "{v}");
        for n in ["n2", "a1"] {
            let got = std::fs::read_to_string(fleet.out(&format!("{n}-site"))).unwrap();
            assert_eq!(got.trim(), want, "{n} ran {spec}");
        }
        let (_, runs) = fleet.json(&["runs", "list"]);
        let this = runs
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == v["run"])
            .unwrap_or_else(|| panic!("run {} not listed: {runs}", v["run"]));
        assert_eq!(
            this["request"]["source"]["commit"],
            commit.as_str(),
            "{this}"
        );
    }
    assert_ne!(c1, c2);

    // 5. Extension modules travel with the tree and are verified on each node against the
    //    keys in /eden/cluster/config; a tampered one runs nowhere.
    let mods = tmp.path().join("mods");
    std::fs::create_dir_all(mods.join("_modules")).unwrap();
    let key = tmp.path().join("signer.key");
    let plain = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_eden"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = plain(&["module", "keygen", "--out", key.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let public = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let config = serde_json::json!({"voters": 3, "standbys": 1, "module_keys": [public]});
    put_retrying(
        &fleet.data[0].endpoint(),
        "/eden/cluster/config",
        &config.to_string(),
    )
    .await;
    let module = mods.join("_modules/hello");
    std::fs::write(
        &module,
        format!(
            "#!/bin/sh\ncat >> '{out}/ext.log'\necho >> '{out}/ext.log'\n\
             echo '{{\"result\": true, \"changes\": {{}}, \"comment\": \"greeted\", \"outputs\": {{}}}}'\n"
        ),
    )
    .unwrap();
    let o = plain(&[
        "module",
        "sign",
        "--key",
        key.to_str().unwrap(),
        module.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    write(
        &mods,
        &[(
            "greet.sls",
            "say hi:\n  hello.greet:\n    - who: {{ node.name }}\n",
        )],
    );
    let mods_s = mods.display().to_string();
    let (code, v) = fleet.json(&["apply", &mods_s, "greet", "--target", "n2,a1"]);
    assert_eq!(code, 0, "{v}");
    let log = std::fs::read_to_string(fleet.out("ext.log")).unwrap();
    let callers: BTreeSet<&str> = ["n2", "a1"]
        .into_iter()
        .filter(|n| log.contains(&format!("\"who\":\"{n}\"")))
        .collect();
    assert_eq!(callers.len(), 2, "both nodes ran the module: {log}");
    let mut text = std::fs::read_to_string(&module).unwrap();
    text.push_str("# changed after signing\n");
    std::fs::write(&module, text).unwrap();
    let (code, v) = fleet.json(&["apply", &mods_s, "greet", "--target", "n2,a1"]);
    assert_eq!(code, 1, "{v}");
    let c = step(&v, "a1", "say hi")["comment"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(c.contains("refused"), "{c}");
    assert_eq!(
        std::fs::read_to_string(fleet.out("ext.log")).unwrap(),
        log,
        "ran nowhere"
    );

    // 6. A file from the datastore (`source: kv:///KEY`) and a module stored in the datastore
    //    with `eden module add`, neither in the tree.
    put_retrying(
        &fleet.data[0].endpoint(),
        "/config/banner",
        "from the datastore",
    )
    .await;
    let stored = tmp.path().join("stored.sh");
    std::fs::write(
        &stored,
        format!(
            "#!/bin/sh\ncat >> '{out}/stored.log'\necho >> '{out}/stored.log'\n\
             echo '{{\"result\": true, \"changes\": {{}}, \"comment\": \"stored ran\", \"outputs\": {{}}}}'\n"
        ),
    )
    .unwrap();
    let o = plain(&[
        "module",
        "sign",
        "--key",
        key.to_str().unwrap(),
        stored.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = fleet
        .eden(&[
            "module",
            "add",
            stored.to_str().unwrap(),
            "--name",
            "stored",
            "--trust",
            &public,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let kvtree = tmp.path().join("kvtree");
    write(
        &kvtree,
        &[(
            "kv.sls",
            &format!(
                "banner:\n  file.managed:\n    - name: {out}/{{{{ node.name }}}}-banner\n    \
                 - source: kv:///config/banner\n\
                 stored-call:\n  stored.go:\n    - who: {{{{ node.name }}}}\n"
            ),
        )],
    );
    let kvtree_s = kvtree.display().to_string();
    let (code, v) = fleet.json(&["apply", &kvtree_s, "kv", "--target", "n2,a1"]);
    assert_eq!(code, 0, "{v}");
    for n in ["n2", "a1"] {
        let got = std::fs::read_to_string(fleet.out(&format!("{n}-banner"))).unwrap();
        assert_eq!(got.trim_end(), "from the datastore", "{n}");
        assert_eq!(step(&v, n, "stored-call")["comment"], "stored ran", "{v}");
    }
    let log = std::fs::read_to_string(fleet.out("stored.log")).unwrap();
    assert_eq!(log.matches("\"function\":\"go\"").count(), 2, "{log}");
    drop(fleet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_survives_a_killed_leader_and_reports_a_killed_node_as_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let mut fleet = fleet(tmp.path()).await;
    let out = fleet.out("").display().to_string();
    let tree = tmp.path().join("states");
    write(
        &tree,
        &[(
            "slow.sls",
            &format!(
                "start:\n  cmd.run:\n    - name: touch {out}/{{{{ node.name }}}}-started\n\
                 wait:\n  cmd.run:\n    - name: sleep 4\n\
                 done:\n  file.managed:\n    - name: {out}/{{{{ node.name }}}}-done\n    - contents: ok\n"
            ),
        )],
    );
    let tree_s = tree.display().to_string();

    // The leader, and the nodes to target: every node but the leader.
    let st = status(&fleet.data[0].endpoint()).await.unwrap();
    let leader = fleet
        .data
        .iter()
        .position(|n| member_id(&n.endpoint()) == st.leader)
        .expect("a leader among the datastore nodes");
    let leader_name = fleet.data[leader].name.clone();
    let targets: Vec<String> = ["n1", "n2", "n3", "n4"]
        .iter()
        .filter(|n| **n != leader_name)
        .map(|s| s.to_string())
        .collect();
    let target = targets.join(",");

    // 1. The leader is killed while the targeted nodes sleep; the run still completes.
    let child = fleet
        .eden(&[
            "apply", &tree_s, "slow", "--target", &target, "--output", "json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_file(&fleet.out(&format!("{}-started", targets[0]))).await;
    fleet.data[leader].kill9();
    let outp = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&outp.stdout);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&outp.stderr)
        )
    });
    assert_eq!(outp.status.code(), Some(0), "{v}");
    assert_eq!(v["state"], "done", "{v}");
    for n in &targets {
        assert_eq!(step(&v, n, "done")["result"], true, "{v}");
        assert!(fleet.out(&format!("{n}-done")).exists());
    }

    // 2. A targeted node (the agent-only one) is killed mid-run: it is reported lost, the
    //    others finish, and the exit code says the run failed.
    let with_agent = format!("a1,{target}");
    let child = fleet
        .eden(&[
            "apply",
            &tree_s,
            "slow",
            "--target",
            &with_agent,
            "--output",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _ = std::fs::remove_file(fleet.out("a1-started"));
    wait_file(&fleet.out("a1-started")).await;
    fleet.agent.kill9();
    let outp = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&outp.stdout);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&outp.stderr)
        )
    });
    assert_eq!(outp.status.code(), Some(1), "{v}");
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(v["node_status"]["a1"]["state"], "lost", "{v}");
    for n in &targets {
        assert_eq!(v["node_status"][n]["state"], "done", "{v}");
    }
}

fn member_id(endpoint: &str) -> u64 {
    // Each node's own id, from its Status (member_id is in the header).
    let ep = endpoint.to_string();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { status(&ep).await.map(|s| s.header.unwrap().member_id) })
    })
    .join()
    .unwrap()
    .unwrap_or(0)
}

async fn wait_file(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The datastore nodes of the cluster as `via` sees them: (voters, standbys) by name.
async fn roles(via: &Node) -> (BTreeSet<String>, BTreeSet<String>) {
    let m = members(&via.endpoint()).await;
    let pick = |learner: bool| {
        m.iter()
            .filter(|m| m.is_learner == learner)
            .map(|m| m.name.clone())
            .collect()
    };
    (pick(false), pick(true))
}

/// Waits until the cluster, as `via` sees it, has three voters and none of them is `dead`.
async fn wait_replaced(via: &Node, dead: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (voters, _) = roles(via).await;
        if voters.len() == 3 && dead.iter().all(|d| !voters.contains(*d)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "voters {voters:?} still hold one of {dead:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_only_node_follows_the_datastore_when_the_nodes_it_joined_through_are_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut nodes = three_nodes(root, &[]).await;
    // Two standbys wanted: all five datastore nodes hold a replica, so each one the test
    // kills leaves a caught-up replica behind.
    put_retrying(
        &nodes[0].endpoint(),
        "/eden/cluster/config",
        r#"{"voters": 3, "standbys": 2}"#,
    )
    .await;
    let token = nodes[0].token();
    let via = nodes[0].peer.clone();
    // a1 joins while n1..n3 are the whole datastore: those are the endpoints it is given.
    let mut a1 = Node::new(root, "a1");
    a1.create(Some((&via, &token)), &["--datastore", "never"]);
    wait_agents(&nodes[0], &["a1"]).await;
    for name in ["n4", "n5"] {
        let mut n = Node::new(root, name);
        n.create(Some((&via, &token)), &[]);
        n.ready().await;
        nodes.push(n);
    }
    // It learns about n4 and n5 from the node records, and remembers them.
    let node_json = a1.dir.join("node.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&node_json).unwrap_or_default();
        if [&nodes[3], &nodes[4]]
            .iter()
            .all(|n| text.contains(n.client.as_str()))
        {
            break;
        }
        assert!(Instant::now() < deadline, "a1 never used n4 and n5: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every node a1 joined through goes; the role controller replaces them one at a time.
    nodes[0].kill9();
    wait_replaced(&nodes[3], &["n1"]).await;
    nodes[1].kill9();
    wait_replaced(&nodes[3], &["n1", "n2"]).await;
    nodes[2].kill9();
    // n4 and n5 are two of three voters: the cluster still has quorum, and a1 still runs
    // what it is given.
    let eps = format!("{},{}", nodes[3].endpoint(), nodes[4].endpoint());
    let out = Command::new(env!("CARGO_BIN_EXE_eden"))
        .args(["run", "--target", "a1", "cmd.run", "echo still here"])
        .args(["--endpoints", &eps, "--output", "json"])
        .env_remove("EDEN_CREDS")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {text}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            a1.log_text()
        )
    });
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", a1.log_text());
    assert_eq!(
        step(&v, "a1", "run")["outputs"]["stdout"],
        "still here",
        "{v}"
    );
}

/// Strips ANSI escape sequences (colors, cursor moves) from terminal output.
fn strip_ansi(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// See step 1b of the label test. `earlier` is a finished run whose events exist already.
async fn live_progress(fleet: &Fleet, earlier: &str) {
    use std::io::BufRead;
    let mut follower = fleet
        .eden(&["events", "--follow", "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    let next = |what: &str| -> Value {
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("events --follow printed no {what} within 30 s"))
    };
    // Its listing of what exists is done once the earlier run's events come out: the run
    // started below is newer than that listing, so its events can only come from the watch.
    while next("earlier events")["run"] != earlier {}

    // Plain lines: stderr is a pipe here.
    let out = fleet
        .eden(&["run", "--target", "n1,a1", "cmd.run", "sleep 0.3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for n in ["n1", "a1"] {
        for line in [
            format!("{n}: [1/1] chg  run (cmd.run)"),
            format!("{n}: done"),
        ] {
            assert!(
                stderr.lines().any(|l| l.starts_with(&line)),
                "no line {line:?} in:\n{stderr}"
            );
        }
    }
    let run = stderr
        .lines()
        .find_map(|l| l.strip_prefix("run ")?.strip_suffix(" submitted"))
        .unwrap_or_else(|| panic!("no run id in:\n{stderr}"))
        .to_string();
    let mut finished = BTreeSet::new();
    while finished.len() < 2 {
        let e = next("step.finished event of the new run");
        if e["run"] == run.as_str() && e["kind"] == "step.finished" {
            assert_eq!(e["result"], true, "{e}");
            finished.insert(e["node"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(finished, BTreeSet::from(["a1".into(), "n1".into()]));
    let _ = follower.kill();
    let _ = follower.wait();

    // On a terminal (`script` gives the command a pseudo-terminal): a bar per node, drawn
    // while its step runs and finished with the node's state.
    let cmd = format!(
        "{} run --target n1,a1 cmd.run 'sleep 0.3' --endpoints {} >/dev/null",
        env!("CARGO_BIN_EXE_eden"),
        fleet.endpoints()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("XDG_CACHE_HOME", fleet.root.join("cache"))
        .output()
        .unwrap();
    let screen = strip_ansi(&String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{screen}");
    let full = format!("[{}]", "=".repeat(30));
    let empty = format!("[{}]", " ".repeat(30));
    // indicatif limits its redraws, so not every node's intermediate state need be drawn;
    // at least one bar is seen before its step finished, and every bar at the end.
    assert!(
        ["n1", "a1"]
            .iter()
            .any(|n| screen.contains(&format!("{n} {empty}   0/1   running"))),
        "no bar was drawn while its step ran:\n{screen}"
    );
    assert!(
        !screen.contains("0/0"),
        "a bar was drawn before its plan:\n{screen}"
    );
    for n in ["n1", "a1"] {
        let done = format!("{n} {full}   1/1   done");
        assert!(
            screen.contains(&done),
            "no {done:?} on the terminal:\n{screen}"
        );
    }
}
