//! Scripted golden tests: `tests/golden/*.txt` hold commands and the output they must produce.
//!
//! A file is a sequence of commands, each followed by its expected output on lines starting with
//! `> `. Lines starting with `#` are comments. A command line starts in column 0; indented lines
//! after it belong to it (the body of a `txn`). The runner replays every file on a fresh store
//! and compares the whole re-rendered file with the original. When behaviour changes on purpose,
//! regenerate with `UPDATE_GOLDEN=1 cargo test -p eden-storage --test golden` and review the
//! diff. `tests/golden/etcd_check.py` renders the same files from a real etcd 3.4 through its
//! JSON gateway, which is how every expectation here was checked.
//!
//! Syntax (bytes: `""` is empty, `\0` and `\xNN` escape):
//! ```text
//! put KEY VALUE [lease=N] [prev_kv] [ignore_value] [ignore_lease]
//! get KEY [end=E | prefix | from_key] [rev=N] [limit=N] [sort=key|version|create|mod|value[:asc|:desc|:none]]
//!         [keys_only] [count_only] [min_mod=N] [max_mod=N] [min_create=N] [max_create=N]
//! del KEY [end=E | prefix | from_key] [prev_kv]
//! txn                        then, indented:  if TARGET KEY [end=E] OP ARG  (OP: = != > <)
//!                                             then|else put|get|del ...  or  then|else txn (deeper body)
//! compact N | grant ID TTL | revoke ID | leases | events FROM [max=N]
//! ```

use std::path::{Path, PathBuf};

use eden_storage::*;

fn parse_bytes(tok: &str) -> Vec<u8> {
    if tok == "\"\"" {
        return Vec::new();
    }
    let b = tok.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() && b[i + 1] == b'0' {
            out.push(0);
            i += 2;
        } else if b[i] == b'\\' && i + 3 < b.len() && b[i + 1] == b'x' {
            out.push(u8::from_str_radix(&tok[i + 2..i + 4], 16).expect("bad \\x escape"));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn show_bytes(b: &[u8]) -> String {
    if b.is_empty() {
        return "\"\"".into();
    }
    b.iter()
        .map(|&c| match c {
            0 => "\\0".to_string(),
            0x21..=0x7e if c != b'\\' => (c as char).to_string(),
            _ => format!("\\x{c:02x}"),
        })
        .collect()
}

fn show_kv(kv: &KeyValue) -> String {
    format!(
        "{}={} create={} mod={} ver={} lease={}",
        show_bytes(&kv.key),
        show_bytes(&kv.value),
        kv.create_revision,
        kv.mod_revision,
        kv.version,
        kv.lease
    )
}

fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Splits `key=value` options from flags and positional words.
struct Args<'a> {
    words: Vec<&'a str>,
}

impl<'a> Args<'a> {
    fn new(line: &'a str) -> Self {
        Args {
            words: line.split_whitespace().collect(),
        }
    }
    fn pos(&self, i: usize) -> &'a str {
        self.words
            .iter()
            .filter(|w| !w.contains('=') || w.starts_with('='))
            .nth(i)
            .copied()
            .unwrap_or_else(|| panic!("missing argument {i} in {:?}", self.words))
    }
    fn flag(&self, name: &str) -> bool {
        self.words.contains(&name)
    }
    fn opt(&self, name: &str) -> Option<&'a str> {
        self.words
            .iter()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
    }
    fn num(&self, name: &str) -> i64 {
        self.opt(name).map_or(0, |v| v.parse().expect("a number"))
    }
    fn range_end(&self, key: &[u8]) -> Vec<u8> {
        if let Some(e) = self.opt("end") {
            parse_bytes(e)
        } else if self.flag("prefix") {
            prefix_end(key)
        } else if self.flag("from_key") {
            vec![0]
        } else {
            Vec::new()
        }
    }
}

fn parse_op(line: &str) -> RequestOp {
    let a = Args::new(line);
    let key = parse_bytes(a.pos(1));
    match a.pos(0) {
        "put" => RequestOp::Put(PutRequest {
            value: parse_bytes(a.pos(2)),
            lease: a.num("lease"),
            prev_kv: a.flag("prev_kv"),
            ignore_value: a.flag("ignore_value"),
            ignore_lease: a.flag("ignore_lease"),
            key,
        }),
        "get" => {
            let (target, order) = match a.opt("sort") {
                None => (SortTarget::Key, SortOrder::None),
                Some(s) => {
                    let (t, o) = s.split_once(':').unwrap_or((s, "asc"));
                    let target = match t {
                        "key" => SortTarget::Key,
                        "version" => SortTarget::Version,
                        "create" => SortTarget::Create,
                        "mod" => SortTarget::Mod,
                        "value" => SortTarget::Value,
                        other => panic!("unknown sort target {other}"),
                    };
                    let order = match o {
                        "asc" => SortOrder::Ascend,
                        "desc" => SortOrder::Descend,
                        "none" => SortOrder::None,
                        other => panic!("unknown sort order {other}"),
                    };
                    (target, order)
                }
            };
            RequestOp::Range(RangeRequest {
                range_end: a.range_end(&key),
                key,
                limit: a.num("limit"),
                revision: a.num("rev"),
                sort_order: order,
                sort_target: target,
                keys_only: a.flag("keys_only"),
                count_only: a.flag("count_only"),
                min_mod_revision: a.num("min_mod"),
                max_mod_revision: a.num("max_mod"),
                min_create_revision: a.num("min_create"),
                max_create_revision: a.num("max_create"),
            })
        }
        "del" => RequestOp::DeleteRange(DeleteRangeRequest {
            range_end: a.range_end(&key),
            key,
            prev_kv: a.flag("prev_kv"),
        }),
        other => panic!("unknown op {other}"),
    }
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Parses a txn body: `lines` are the indented lines, all at indentation >= `lines[0]`'s.
fn parse_txn(lines: &[&str]) -> TxnRequest {
    let mut t = TxnRequest::default();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        let ind = indent_of(lines[i]);
        i += 1;
        let (head, rest) = line.split_once(' ').unwrap_or((line, ""));
        match head {
            "if" => {
                let a = Args::new(rest);
                let key = parse_bytes(a.pos(1));
                let arg = a.pos(3);
                let target = match a.pos(0) {
                    "value" => CompareTarget::Value(parse_bytes(arg)),
                    "version" => CompareTarget::Version(arg.parse().unwrap()),
                    "create" => CompareTarget::Create(arg.parse().unwrap()),
                    "mod" => CompareTarget::Mod(arg.parse().unwrap()),
                    "lease" => CompareTarget::Lease(arg.parse().unwrap()),
                    other => panic!("unknown compare target {other}"),
                };
                let result = match a.pos(2) {
                    "=" => CompareResult::Equal,
                    "!=" => CompareResult::NotEqual,
                    ">" => CompareResult::Greater,
                    "<" => CompareResult::Less,
                    other => panic!("unknown compare op {other}"),
                };
                t.compare.push(Compare {
                    result,
                    target,
                    range_end: a.range_end(&key),
                    key,
                });
            }
            "then" | "else" => {
                let op = if rest.trim() == "txn" {
                    let start = i;
                    while i < lines.len() && indent_of(lines[i]) > ind {
                        i += 1;
                    }
                    RequestOp::Txn(parse_txn(&lines[start..i]))
                } else {
                    parse_op(rest)
                };
                if head == "then" {
                    t.success.push(op)
                } else {
                    t.failure.push(op)
                }
            }
            other => panic!("unknown txn line {other:?}"),
        }
    }
    t
}

fn render_range(out: &mut Vec<String>, pad: &str, r: &RangeResponse) {
    for kv in &r.kvs {
        out.push(format!("{pad}{}", show_kv(kv)));
    }
}

fn render_txn(out: &mut Vec<String>, pad: &str, t: &TxnResponse) {
    for resp in &t.responses {
        match resp {
            ResponseOp::Put(p) => match &p.prev_kv {
                Some(kv) => out.push(format!("{pad}put prev {}", show_kv(kv))),
                None => out.push(format!("{pad}put")),
            },
            ResponseOp::Range(r) => {
                out.push(format!("{pad}get count={} more={}", r.count, r.more));
                render_range(out, &format!("{pad}  "), r);
            }
            ResponseOp::DeleteRange(d) => {
                out.push(format!("{pad}del deleted={}", d.deleted));
                for kv in &d.prev_kvs {
                    out.push(format!("{pad}  prev {}", show_kv(kv)));
                }
            }
            ResponseOp::Txn(inner) => {
                out.push(format!("{pad}txn succeeded={}", inner.succeeded));
                render_txn(out, &format!("{pad}  "), inner);
            }
        }
    }
}

/// Runs one command (its first line and body) and renders its output lines.
fn run(store: &Store, lines: &[&str]) -> Vec<String> {
    let a = Args::new(lines[0]);
    let mut out = Vec::new();
    let cmd = match a.pos(0) {
        "get" => {
            let RequestOp::Range(req) = parse_op(lines[0]) else {
                unreachable!()
            };
            match store.range(&req) {
                Ok(r) => {
                    out.push(format!(
                        "rev={} count={} more={}",
                        store.revision(),
                        r.count,
                        r.more
                    ));
                    render_range(&mut out, "", &r);
                }
                Err(e) => out.push(format!("err: {e}")),
            }
            return out;
        }
        "leases" => {
            for l in store.leases() {
                let keys: Vec<String> = l.keys.iter().map(|k| show_bytes(k)).collect();
                out.push(format!(
                    "lease {} ttl={} keys=[{}]",
                    l.id,
                    l.ttl,
                    keys.join(",")
                ));
            }
            return out;
        }
        "events" => {
            let from: i64 = a.pos(1).parse().unwrap();
            let max = a.opt("max").map_or(1000, |m| m.parse().unwrap());
            match store.events(from, max) {
                Ok(revs) => {
                    for (rev, events) in revs {
                        for e in events {
                            let prev = e.prev_kv.as_ref().map_or("none".to_string(), show_kv);
                            let kind = match e.kind {
                                EventKind::Put => "PUT",
                                EventKind::Delete => "DELETE",
                            };
                            out.push(format!("{rev} {kind} {} prev: {prev}", show_kv(&e.kv)));
                        }
                    }
                }
                Err(e) => out.push(format!("err: {e}")),
            }
            return out;
        }
        "put" | "del" => match parse_op(lines[0]) {
            RequestOp::Put(p) => Command::Put(p),
            RequestOp::DeleteRange(d) => Command::DeleteRange(d),
            _ => unreachable!(),
        },
        "txn" => Command::Txn(parse_txn(&lines[1..])),
        "compact" => Command::Compact(CompactionRequest {
            revision: a.pos(1).parse().unwrap(),
            physical: false,
        }),
        "grant" => Command::LeaseGrant {
            id: a.pos(1).parse().unwrap(),
            ttl: a.pos(2).parse().unwrap(),
        },
        "revoke" => Command::LeaseRevoke {
            id: a.pos(1).parse().unwrap(),
        },
        other => panic!("unknown command {other:?}"),
    };
    let mut results = store.apply(&[cmd], &[]).expect("no I/O fault");
    match results.pop().expect("one result") {
        Err(e) => out.push(format!("err: {e}")),
        Ok((applied, _events)) => match applied.response {
            CommandResponse::Put(p) => {
                out.push(format!("rev={}", applied.revision));
                if let Some(kv) = p.prev_kv {
                    out.push(format!("prev {}", show_kv(&kv)));
                }
            }
            CommandResponse::DeleteRange(d) => {
                out.push(format!("rev={} deleted={}", applied.revision, d.deleted));
                for kv in &d.prev_kvs {
                    out.push(format!("prev {}", show_kv(kv)));
                }
            }
            CommandResponse::Txn(t) => {
                out.push(format!(
                    "rev={} succeeded={}",
                    applied.revision, t.succeeded
                ));
                render_txn(&mut out, "  ", &t);
            }
            CommandResponse::Compact => out.push(format!("rev={}", applied.revision)),
            CommandResponse::LeaseGrant { id, ttl } => out.push(format!("id={id} ttl={ttl}")),
            CommandResponse::LeaseRevoke => out.push(format!("rev={}", applied.revision)),
            CommandResponse::Alarm(a) => out.push(format!("alarms={a:?}")),
        },
    }
    out
}

/// Replays one file and returns it re-rendered with the actual outputs.
fn replay(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.starts_with('#') || line.trim().is_empty() {
            out.push_str(line);
            out.push('\n');
            i += 1;
            continue;
        }
        if line.starts_with('>') {
            i += 1; // an expectation: replaced by the actual output below
            continue;
        }
        let start = i;
        i += 1;
        while i < lines.len() && lines[i].starts_with(' ') {
            i += 1;
        }
        for l in &lines[start..i] {
            out.push_str(l);
            out.push('\n');
        }
        for l in run(&store, &lines[start..i]) {
            out.push_str("> ");
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

fn golden_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    files
}

#[test]
fn golden_scripts() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let files = golden_files();
    assert!(
        files.len() >= 5,
        "expected the golden scripts in tests/golden, found {files:?}"
    );
    let mut failures = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let actual = replay(&text);
        if actual == text {
            continue;
        }
        if update {
            std::fs::write(&path, &actual).unwrap();
            continue;
        }
        let first = text
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(text.lines().count().min(actual.lines().count()));
        let excerpt: Vec<&str> = actual
            .lines()
            .skip(first.saturating_sub(3))
            .take(8)
            .collect();
        failures.push(format!(
            "{}: differs from line {}; actual output around it:\n{}",
            path.display(),
            first + 1,
            excerpt.join("\n")
        ));
    }
    assert!(
        failures.is_empty(),
        "golden mismatch (UPDATE_GOLDEN=1 regenerates; review the diff):\n{}",
        failures.join("\n\n")
    );
}
