//! Single-threaded throughput of the store: puts with and without an fsync per put, and ranges.
//! Prints figures; asserts nothing about time. Run: `cargo bench -p eden-storage`.
//! The store lives under the target directory (a real disk), not /tmp (often tmpfs, where fsync
//! costs nothing).

use std::time::Instant;

use eden_storage::*;

fn put(i: usize) -> Command {
    Command::Put(PutRequest {
        key: format!("/bench/key/{i:08}").into_bytes(),
        value: vec![b'v'; 100],
        ..Default::default()
    })
}

fn report(name: &str, n: usize, start: Instant) {
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<44} {n:>7} ops  {:>10.0} ops/s  {:>8.1} us/op",
        n as f64 / secs,
        secs * 1e6 / n as f64
    );
}

fn main() {
    let base = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let store = Store::open(dir.path()).unwrap();
    println!(
        "eden-storage throughput (single thread, 100-byte values, store in {})",
        base.display()
    );

    let n = 20_000;
    let start = Instant::now();
    for i in 0..n {
        store.apply(&[put(i)], &[]).unwrap();
    }
    report("put, no flush", n, start);
    let start = Instant::now();
    store.flush().unwrap();
    println!(
        "{:<44} {:>10.1} ms",
        "one flush after them",
        start.elapsed().as_secs_f64() * 1e3
    );

    let m = 500;
    let start = Instant::now();
    for i in n..n + m {
        store.apply(&[put(i)], &[]).unwrap();
        store.flush().unwrap();
    }
    report("put + flush (fsync) each", m, start);

    let start = Instant::now();
    for i in 0..m {
        let batch: Vec<Command> = (0..100).map(|j| put(n + m + i * 100 + j)).collect();
        store.apply(&batch, &[]).unwrap();
        store.flush().unwrap();
    }
    report("put, batches of 100 + flush per batch", m * 100, start);

    let total = n + m + m * 100;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % total as u64) as usize
    };
    let start = Instant::now();
    for _ in 0..n {
        let req = RangeRequest {
            key: format!("/bench/key/{:08}", next()).into_bytes(),
            ..Default::default()
        };
        assert_eq!(store.range(&req).unwrap().kvs.len(), 1);
    }
    report("range, single key (random)", n, start);

    let start = Instant::now();
    for _ in 0..n / 10 {
        let from = next().min(total - 100);
        let req = RangeRequest {
            key: format!("/bench/key/{from:08}").into_bytes(),
            range_end: format!("/bench/key/{:08}", from + 100).into_bytes(),
            ..Default::default()
        };
        assert_eq!(store.range(&req).unwrap().kvs.len(), 100);
    }
    report("range, 100 keys", n / 10, start);

    let start = Instant::now();
    for _ in 0..n / 10 {
        let req = RangeRequest {
            key: b"/bench/".to_vec(),
            range_end: b"/bench0".to_vec(),
            count_only: true,
            ..Default::default()
        };
        assert_eq!(store.range(&req).unwrap().count, total as i64);
    }
    report(
        &format!("range, count_only over {total} keys"),
        n / 10,
        start,
    );

    let start = Instant::now();
    let mut back = Vec::new();
    store.export_snapshot(&mut back).unwrap();
    println!(
        "{:<44} {:>10.1} ms  ({} bytes)",
        "export snapshot",
        start.elapsed().as_secs_f64() * 1e3,
        back.len()
    );
    println!("{:<44} {:>10} bytes", "size on disk", store.size_bytes());
}
