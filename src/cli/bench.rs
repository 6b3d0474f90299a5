//! `eden bench`: a load generator that speaks the etcd v3 protocol, so the same workload can
//! be run against eden and against etcd (as etcd's own `benchmark` tool does).
//!
//! `--clients` tasks share `--conns` HTTP/2 connections, spread over `--endpoints`. They take
//! operations from one counter until `--total` are done; each records its latencies. The
//! report gives throughput and p50/p99/max latency, plus errors (a benchmark with errors says
//! so and exits non-zero).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use tonic::transport::Channel;

use crate::error::{Error, Result};
use crate::etcd::pb::etcdserverpb as pb;

/// What each operation does.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchOp {
    /// Put a value under a key from the key space.
    Put,
    /// Linearizable range of one key (a read index round per request).
    Get,
    /// Serializable range of one key, served by the local replica.
    SerializableGet,
    /// A txn with one compare (the key's version >= 0) and one put.
    Txn,
}

impl BenchOp {
    fn name(self) -> &'static str {
        match self {
            BenchOp::Put => "put",
            BenchOp::Get => "get",
            BenchOp::SerializableGet => "serializable-get",
            BenchOp::Txn => "txn",
        }
    }
}

/// Load an etcd v3 endpoint (eden or etcd) and report throughput and latency.
///
/// Examples:
///   eden bench put --endpoints 127.0.0.1:2379 --clients 64 --conns 8 --total 100000
///   eden bench get --endpoints a:2379,b:2379,c:2379 --clients 64 --total 100000
///   eden bench put --clients 1 --conns 1 --total 2000        # sequential latency
///   eden bench serializable-get --cacert ca.crt --cert admin.crt --key admin.key \
///       --endpoints https://10.0.0.1:2379
///
/// Endpoints without a scheme use http:// unless --cacert is given.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct BenchArgs {
    /// The operation to run.
    #[arg(value_enum)]
    pub op: BenchOp,
    /// Comma-separated etcd v3 endpoints.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// Concurrent clients (tasks), each with one request in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub clients: u64,
    /// HTTP/2 connections shared by the clients (round robin over the endpoints).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub conns: u64,
    /// Operations in all.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub total: u64,
    /// Bytes per value (put, txn).
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Bytes per key.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(4..=4096))]
    pub key_size: u64,
    /// Distinct keys written (put, txn); reads use the first.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub key_space: u64,
    /// CA certificate for https endpoints (e.g. DATA/admin/ca.crt).
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (e.g. DATA/admin/admin.crt).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client key (e.g. DATA/admin/admin.key).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub op: &'static str,
    pub clients: u64,
    pub conns: u64,
    pub total: u64,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Key `i` of the key space: its decimal digits, zero-padded to `size` bytes.
fn key_for(i: u64, size: u64) -> Vec<u8> {
    format!("{i:0width$}", width = size as usize).into_bytes()
}

async fn channels(args: &BenchArgs) -> Result<Vec<Channel>> {
    if args.endpoints.is_empty() {
        return Err(Error::InvalidInput("--endpoints is empty".into()));
    }
    let tls = match &args.cacert {
        None => None,
        Some(ca) => Some(super::client::tls(
            ca,
            args.cert.as_deref().zip(args.key.as_deref()),
        )?),
    };
    let mut out = Vec::new();
    for i in 0..args.conns {
        let raw = &args.endpoints[(i as usize) % args.endpoints.len()];
        let url = super::client::url(raw, tls.is_some());
        out.push(
            super::client::connect(
                &url,
                tls.as_ref(),
                Duration::from_secs(5),
                Duration::from_secs(30),
            )
            .await?,
        );
    }
    Ok(out)
}

async fn one(
    op: BenchOp,
    kv: &mut pb::kv_client::KvClient<Channel>,
    key: Vec<u8>,
    value: &[u8],
) -> std::result::Result<(), tonic::Status> {
    match op {
        BenchOp::Put => {
            kv.put(pb::PutRequest {
                key,
                value: value.to_vec(),
                ..Default::default()
            })
            .await?;
        }
        BenchOp::Get | BenchOp::SerializableGet => {
            kv.range(pb::RangeRequest {
                key,
                serializable: op == BenchOp::SerializableGet,
                ..Default::default()
            })
            .await?;
        }
        BenchOp::Txn => {
            kv.txn(pb::TxnRequest {
                compare: vec![pb::Compare {
                    result: pb::compare::CompareResult::Greater as i32,
                    target: pb::compare::CompareTarget::Version as i32,
                    key: key.clone(),
                    target_union: Some(pb::compare::TargetUnion::Version(-1)),
                    ..Default::default()
                }],
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        key,
                        value: value.to_vec(),
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            })
            .await?;
        }
    }
    Ok(())
}

/// Runs the benchmark; `progress` is called about once a second with operations done so far.
pub async fn run_bench(args: &BenchArgs, progress: impl Fn(u64, u64)) -> Result<BenchReport> {
    let chans = channels(args).await?;
    let value = vec![b'v'; args.val_size];
    // Reads need the key to exist.
    if matches!(args.op, BenchOp::Get | BenchOp::SerializableGet) {
        let mut kv = pb::kv_client::KvClient::new(chans[0].clone());
        one(BenchOp::Put, &mut kv, key_for(0, args.key_size), &value)
            .await
            .map_err(|e| Error::Unavailable(format!("preparing the read key: {}", e.message())))?;
    }
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let value = Arc::new(value);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut kv = pb::kv_client::KvClient::new(chans[(c % args.conns) as usize].clone());
        let (next, done, value) = (next.clone(), done.clone(), value.clone());
        let (op, total, key_size, key_space) = (args.op, args.total, args.key_size, args.key_space);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let key = match op {
                    BenchOp::Put | BenchOp::Txn => key_for(i % key_space, key_size),
                    _ => key_for(0, key_size),
                };
                let t = Instant::now();
                match one(op, &mut kv, key, &value).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error
                            .get_or_insert_with(|| format!("{:?}: {}", e.code(), e.message()));
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (lat, errors, first_error)
        }));
    }
    let ticker = {
        let done = done.clone();
        let total = args.total;
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                progress(done.load(Ordering::Relaxed), total);
            }
        }
    };
    let joined = tokio::select! {
        r = join_all(tasks) => r,
        _ = ticker => unreachable!("the progress ticker never ends"),
    };
    let seconds = start.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for r in joined {
        let (l, e, f) = r.map_err(|e| Error::Internal(format!("bench client task: {e}")))?;
        lat.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    lat.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            ms(lat[((lat.len() - 1) as f64 * p).round() as usize])
        }
    };
    let ok = lat.len() as u64;
    Ok(BenchReport {
        op: args.op.name(),
        clients: args.clients,
        conns: args.conns,
        total: args.total,
        ok,
        errors,
        first_error,
        seconds,
        ops_per_sec: ok as f64 / seconds,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: lat.last().map(|d| ms(*d)).unwrap_or(0.0),
        mean_ms: if lat.is_empty() {
            0.0
        } else {
            lat.iter().map(|d| ms(*d)).sum::<f64>() / lat.len() as f64
        },
    })
}

async fn join_all<T>(
    tasks: Vec<tokio::task::JoinHandle<T>>,
) -> Vec<std::result::Result<T, tokio::task::JoinError>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await);
    }
    out
}

pub fn run(args: BenchArgs) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
    let report = rt.block_on(run_bench(&args, |done, total| {
        eprintln!("{done}/{total} operations");
    }))?;
    if args.output == "json" {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| Error::Internal(e.to_string()))?
        );
    } else {
        println!(
            "{}: {} ok, {} errors in {:.2} s ({} clients, {} conns)",
            report.op, report.ok, report.errors, report.seconds, report.clients, report.conns
        );
        println!("  throughput  {:.0} ops/s", report.ops_per_sec);
        println!(
            "  latency     p50 {:.3} ms   p99 {:.3} ms   max {:.3} ms   mean {:.3} ms",
            report.p50_ms, report.p99_ms, report.max_ms, report.mean_ms
        );
    }
    if let Some(e) = &report.first_error {
        eprintln!(
            "eden bench: {} operations failed; the first: {e}",
            report.errors
        );
        return Ok(1);
    }
    Ok(0)
}
