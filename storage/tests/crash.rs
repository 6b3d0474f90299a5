//! The crash loop: a child process writes, flushes every eighth batch and reports the batches
//! that flush acknowledged; the parent kills it with SIGKILL at a random moment, reopens the
//! store and checks that
//!
//! - it opens at all, and its in-memory index rebuilds from history without error;
//! - every batch acknowledged after a flush is there (the Raft-style `applied` meta key is at
//!   least the last acknowledged op), and no batch is torn (meta and data agree);
//! - the whole state (every retained revision, leases, compaction) equals a replay of ops
//!   `1..=applied` on the pure in-memory keyspace.
//!
//! Then the next child continues on the same directory. `CRASH_CYCLES` (default 50) sets the
//! number of kills, `CRASH_SEED` replays a run.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use eden_storage::codec::RevKey;
use eden_storage::mvcc::{Keyspace, MemRecords};
use eden_storage::*;

const CHILD_ENV: &str = "EDEN_CRASH_CHILD_DIR";
const APPLIED: &[u8] = b"applied";

/// The deterministic batch of op `n`: puts with growing versions, leases, txns, deletes,
/// compactions and some large values (stored in the data file, not in memory).
fn op(n: u64, current_rev: Revision) -> Vec<Command> {
    let key = |i: u64| format!("key/{:02}", i % 40).into_bytes();
    let value = if n.is_multiple_of(9) {
        vec![b'L'; 5000 + (n % 7) as usize]
    } else {
        format!("v{n}").into_bytes()
    };
    let lease = if n.is_multiple_of(5) {
        (n / 5) % 3 + 1
    } else {
        0
    } as i64;
    let mut cmds = Vec::new();
    if n % 30 == 1 {
        for id in 1..=3 {
            cmds.push(Command::LeaseGrant { id, ttl: 60 });
        }
    }
    cmds.push(Command::Put(PutRequest {
        key: key(n),
        value,
        lease,
        ..Default::default()
    }));
    match n % 10 {
        3 => cmds.push(Command::Txn(TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Greater,
                target: CompareTarget::Version(1),
                key: key(n + 1),
                range_end: Vec::new(),
            }],
            success: vec![
                RequestOp::Put(PutRequest {
                    key: key(n + 2),
                    value: b"t".to_vec(),
                    ..Default::default()
                }),
                RequestOp::DeleteRange(DeleteRangeRequest {
                    key: key(n + 3),
                    ..Default::default()
                }),
            ],
            failure: vec![RequestOp::Put(PutRequest {
                key: key(n + 1),
                value: b"f".to_vec(),
                ..Default::default()
            })],
        })),
        6 => cmds.push(Command::DeleteRange(DeleteRangeRequest {
            key: key(n),
            range_end: key(n + 4),
            prev_kv: true,
        })),
        8 if n % 40 == 8 => cmds.push(Command::LeaseRevoke {
            id: ((n / 40) % 3 + 1) as i64,
        }),
        _ => {}
    }
    if n.is_multiple_of(25) && current_rev > 20 {
        cmds.push(Command::Compact(CompactionRequest {
            revision: current_rev - 10,
            physical: true,
        }));
    }
    cmds
}

fn applied_of(store: &Store) -> u64 {
    store
        .meta(APPLIED)
        .unwrap()
        .map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap())
}

/// The child: continue the op sequence forever, flushing after every eighth op and then
/// acknowledging the ops up to it. The ops in between went to the data file unsynced when the
/// kill comes. The child checkpoints its data file once it holds 64 KiB of garbage (instead of
/// 64 MiB), so kills also land inside checkpoints.
fn child(dir: &Path) -> ! {
    let store = Store::open_with(dir, 64 << 10).expect("child opens the store");
    println!("open");
    let mut n = applied_of(&store);
    loop {
        n += 1;
        let cmds = op(n, store.revision());
        store
            .apply(&cmds, &[(APPLIED.to_vec(), n.to_string().into_bytes())])
            .expect("apply");
        if n.is_multiple_of(8) {
            store.flush().expect("flush");
            println!("ack {n}");
        }
    }
}

/// Replays ops `1..=upto` on the in-memory keyspace.
fn replay(upto: u64) -> (Keyspace, MemRecords) {
    let mut ks = Keyspace::new();
    let mut recs = MemRecords::default();
    for n in 1..=upto {
        for cmd in op(n, ks.revision()) {
            let _ = ks.apply(&mut recs, &cmd);
        }
    }
    (ks, recs)
}

fn check_against_replay(store: &Store, seed: u64, cycle: usize) -> u64 {
    let applied = applied_of(store);
    let (ks, recs) = replay(applied);
    let ctx = format!("seed {seed}, cycle {cycle}, applied {applied}");
    assert_eq!(store.revision(), ks.revision(), "revision, {ctx}");
    assert_eq!(
        store.compact_revision(),
        ks.compact_revision(),
        "compaction, {ctx}"
    );
    assert_eq!(store.leases(), ks.leases(), "leases, {ctx}");
    let lo = ks.compact_revision().max(1);
    for rev in (lo..=ks.revision())
        .rev()
        .step_by(7)
        .chain([ks.revision(), lo])
    {
        let req = RangeRequest {
            key: vec![0],
            range_end: vec![0],
            revision: rev,
            ..Default::default()
        };
        assert_eq!(
            store.range(&req),
            ks.range(&recs, &req),
            "range at {rev}, {ctx}"
        );
    }
    applied
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn crash_loop_keeps_every_acknowledged_write() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
    }
    let cycles: usize = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(50);
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash loop: {cycles} cycles, CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let mut last_acked = 0u64;
    let mut total_acks = 0u64;
    for cycle in 0..cycles {
        let mut child = Process::new(&exe)
            .args([
                "crash_loop_keeps_every_acknowledged_write",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (opened_tx, opened) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acked = None;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // (libtest's "test NAME ... " has no newline: the first line ends with it.)
                if line.ends_with("open") {
                    let _ = opened_tx.send(());
                }
                if let Some(n) = line.strip_prefix("ack ") {
                    acked = Some(n.parse::<u64>().unwrap());
                }
            }
            acked
        });
        // A random moment: every other cycle counts from the spawn, so the kill may land while
        // the store opens (or recovers); the others count from the open, so the kill lands in
        // the write loop however slowly a loaded machine starts the child.
        if cycle % 2 == 1 {
            let _ = opened.recv_timeout(Duration::from_secs(30));
        }
        std::thread::sleep(Duration::from_millis(rng.next() % 120));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        if let Some(a) = acked {
            total_acks += a.saturating_sub(last_acked);
            last_acked = a;
        }
        let store = Store::open(dir.path())
            .unwrap_or_else(|e| panic!("seed {seed}, cycle {cycle}: store did not reopen: {e}"));
        let applied = check_against_replay(&store, seed, cycle);
        assert!(
            applied >= last_acked,
            "seed {seed}, cycle {cycle}: op {last_acked} was acknowledged but the store has only {applied}"
        );
        last_acked = applied;
        if (cycle + 1) % 100 == 0 && cycle + 1 < cycles {
            eprintln!(
                "crash loop: {} of {cycles} kills survived, {applied} ops applied, {:?}",
                cycle + 1,
                started.elapsed()
            );
        }
    }
    eprintln!(
        "crash loop: {cycles} kills survived, {total_acks} acknowledged batches, {} ops applied, {:?}",
        last_acked,
        started.elapsed()
    );
    assert!(
        last_acked > 0,
        "the child never got a write acknowledged in {cycles} cycles"
    );
}

/// The op schedule is deterministic and its batches apply cleanly; the check above relies on it.
#[test]
fn op_schedule_replays_identically() {
    let (a, ra) = replay(300);
    let (b, rb) = replay(300);
    assert_eq!(a, b);
    assert_eq!(ra.records, rb.records);
    assert!(a.revision() > 300, "revision {}", a.revision());
    assert!(a.compact_revision() > 0);
    // The history holds only what compaction kept.
    assert!(ra.records.keys().all(|at: &RevKey| at.main > 0));
}
