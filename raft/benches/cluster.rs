//! Write latency and throughput of a 3-node cluster on loopback: real mutual TLS, real fsync.
//!
//! Prints, in one run:
//! - the fsync floor of this disk (4 KiB write + fdatasync, sequential),
//! - sequential commit latency (one client, one write at a time): p50, p99, mean,
//! - throughput with 64 concurrent clients, and how many commands went into each Raft entry.
//!
//! `cargo bench -p eden-raft --bench cluster` (env `BENCH_SECONDS`, default 5 per phase).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, no_tuning, put, TestCa};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn fsync_floor(dir: &std::path::Path, n: usize) -> Vec<Duration> {
    let mut f = std::fs::File::create(dir.join("fsync-probe")).unwrap();
    let block = vec![7u8; 4096];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    times
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    println!("eden-raft cluster bench: 3 nodes in one process, loopback, mutual TLS, fsync on");
    println!("data in {}", root.path().display());

    let floor = fsync_floor(root.path(), 200);
    println!(
        "fsync floor (4 KiB write + fdatasync)   p50 {:>8.3} ms   p99 {:>8.3} ms",
        ms(percentile(&floor, 0.5)),
        ms(percentile(&floor, 0.99))
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ca = TestCa::new("bench-ca");
        let nodes = cluster(&ca, root.path(), 3, no_tuning).await;
        let leader = nodes
            .iter()
            .find(|n| n.node.is_leader())
            .unwrap()
            .node
            .clone();

        // Sequential: one write at a time.
        let mut lat = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut i = 0u64;
        while Instant::now() < deadline {
            let t = Instant::now();
            leader
                .write(put(&format!("seq/{i:08}"), "value-of-some-100-bytes"))
                .await
                .unwrap();
            lat.push(t.elapsed());
            i += 1;
        }
        lat.sort();
        let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
        println!(
            "sequential commit ({:>6} writes)      p50 {:>8.3} ms   p99 {:>8.3} ms   mean {:.3} ms",
            lat.len(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            ms(mean)
        );

        // 64 concurrent clients, each one write at a time.
        let entries_before = leader.metrics().last_log_index.unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let deadline = start + Duration::from_secs(seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..64 {
            let node = leader.clone();
            let done = done.clone();
            tasks.spawn(async move {
                let mut lat = Vec::new();
                let mut j = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    node.write(put(&format!("par/{c:02}/{j:08}"), "value-of-some-100-bytes"))
                        .await
                        .unwrap();
                    lat.push(t.elapsed());
                    done.fetch_add(1, Ordering::Relaxed);
                    j += 1;
                }
                lat
            });
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.extend(r.unwrap());
        }
        let elapsed = start.elapsed();
        all.sort();
        let writes = done.load(Ordering::Relaxed);
        let entries = leader.metrics().last_log_index.unwrap() - entries_before;
        println!(
            "64 clients ({writes:>7} writes in {:.1} s)  {:>8.0} writes/s   p50 {:.3} ms   p99 {:.3} ms   {:.1} commands per Raft entry",
            elapsed.as_secs_f64(),
            writes as f64 / elapsed.as_secs_f64(),
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99)),
            writes as f64 / entries.max(1) as f64
        );
        for n in nodes {
            n.stop().await;
        }
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
