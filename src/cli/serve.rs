//! `eden serve`: run a node. See `cluster::serve` for what happens, in order.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use crate::cluster::serve::{serve, ServeOptions};
use crate::error::{Error, Result};

/// Run a node: create a cluster (--init), join one (--join), or restart from --data-dir.
///
/// Examples:
///   eden serve --name n1 --data-dir /var/lib/eden --peer-addr 10.0.0.1:2380 \
///       --client-addr 10.0.0.1:2379 --init
///   eden serve --name n2 --data-dir /var/lib/eden --peer-addr 10.0.0.2:2380 \
///       --client-addr 10.0.0.2:2379 --join 10.0.0.1:2380 --token "$(cat join-token)"
///   eden serve --name w7 --data-dir /var/lib/eden --datastore never --labels role=web \
///       --join 10.0.0.1:2380 --token "$(cat join-token)"     # an agent-only node
///   eden serve --data-dir /var/lib/eden        # restart
///
/// Every node runs an agent: it publishes the node's facts under /eden/nodes/NAME and runs
/// the states of cluster runs that target it (eden apply --target, eden run).
/// --init prints a join token and writes DATA/admin/{ca.crt,admin.crt,admin.key,join-token}.
/// Logs go to stderr; set EDEN_LOG (e.g. EDEN_LOG=debug) for more.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct ServeArgs {
    /// This node's name (certificate name, KV key); needed with --init and --join.
    #[arg(long)]
    pub name: Option<String>,
    /// Where the node keeps its keys, Raft log and keyspace. One process per dir.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// host:port for peers (Raft, join). Default 127.0.0.1:2380.
    #[arg(long, value_name = "HOST:PORT")]
    pub peer_addr: Option<String>,
    /// host:port for etcd clients. Default 127.0.0.1:2379.
    #[arg(long, value_name = "HOST:PORT")]
    pub client_addr: Option<String>,
    /// Create a new cluster with this node as its first voter.
    #[arg(long, conflicts_with_all = ["join", "token"])]
    pub init: bool,
    /// Join the cluster that has a datastore node at this peer address.
    #[arg(long, value_name = "HOST:PORT", requires = "token")]
    pub join: Option<String>,
    /// The join token (eden1:<CA sha256>:<secret>) from `eden serve --init`.
    #[arg(long, env = "EDEN_JOIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// auto: may hold the datastore (voter or standby); never: agent only (no Raft, no ports:
    /// it reaches the datastore nodes' etcd API; only with --join).
    #[arg(long, value_name = "auto|never")]
    pub datastore: Option<String>,
    /// Labels for targeting, k=v,k=v.
    #[arg(long, value_name = "K=V,...")]
    pub labels: Option<String>,
    /// Serve the etcd API without TLS (only on a loopback --client-addr).
    #[arg(long)]
    pub client_plaintext: bool,
    /// Raft entries between snapshots (as etcd's flag). A follower that falls further behind
    /// than a tenth of this catches up from a snapshot instead of the log.
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub snapshot_count: u64,
    /// How --auto-compaction-retention is read: periodic (keep a time window of history) or
    /// revision (keep the last N revisions). The leader compacts older history away, so the
    /// keyspace's memory and data file stay bounded (etcd's flag).
    #[arg(long, value_name = "periodic|revision", default_value = "periodic")]
    pub auto_compaction_mode: String,
    /// History to keep. Periodic: a duration (30m, 2h, 90s) or whole hours (1 = 1h), checked
    /// every tenth of it (at most every 6 min). Revision: a count, checked every 5 min.
    /// 0 keeps all history (etcd's default; memory then grows with every write).
    #[arg(long, value_name = "RETENTION", default_value = crate::cluster::compactor::DEFAULT_RETENTION)]
    pub auto_compaction_retention: String,
    /// The most this node's store may hold, in bytes (etcd's flag; 0 means 2 GiB, negative
    /// none). A write that would pass it raises a NOSPACE alarm, and the cluster refuses puts,
    /// txns with puts and lease grants until an operator compacts, defragments and disarms:
    /// `etcdctl compact REV; etcdctl defrag; etcdctl alarm disarm`. Reads and deletes go on.
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub quota_backend_bytes: i64,
    /// How often the leader compares every member's store with its own (etcd's flag): it
    /// hashes its history at its revision and asks each member for the same hash. A member
    /// whose history differs gets a CORRUPT alarm, and the cluster refuses every change until
    /// an operator rebuilds that member and disarms (`etcdctl alarm disarm`). A duration
    /// (30m, 1h); 0 turns it off.
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    pub experimental_corrupt_check_time: String,
    /// Before serving, compare this member's store with the other members' (etcd's flag): its
    /// history's hash at its revision against each member's at the same revision. If one
    /// differs, the node does not start and says which member and what to do. Members that
    /// are down, behind or compacted past that revision are skipped.
    #[arg(long)]
    pub experimental_initial_corrupt_check: bool,
    /// How often a watch created with `progress_notify` is told the current revision while it
    /// has nothing to send (etcd's flag): clients such as Kubernetes use it to know how fresh
    /// their view is. A duration (500ms, 10s, 10m).
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub experimental_watch_progress_notify_interval: String,
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| Error::InvalidInput(format!("--labels: {part:?} is not key=value")))?;
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(labels)
}

/// `--experimental-corrupt-check-time`: `None` for 0.
fn parse_check_time(s: &str) -> Result<Option<std::time::Duration>> {
    let d = if s.trim() == "0" {
        Some(std::time::Duration::ZERO)
    } else {
        crate::cluster::compactor::parse_duration(s.trim())
    };
    match d {
        Some(d) if d.is_zero() => Ok(None),
        Some(d) => Ok(Some(d)),
        None => Err(Error::InvalidInput(format!(
            "--experimental-corrupt-check-time {s:?}: use a duration such as 30m or 1h, or 0 \
             to turn the check off"
        ))),
    }
}

/// `--experimental-watch-progress-notify-interval`: a duration above zero.
fn parse_progress_interval(s: &str) -> Result<std::time::Duration> {
    match crate::cluster::compactor::parse_duration(s.trim()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(Error::InvalidInput(format!(
            "--experimental-watch-progress-notify-interval {s:?}: use a duration above zero, \
             such as 500ms, 10s or 10m"
        ))),
    }
}

pub fn run(args: ServeArgs) -> Result<i32> {
    let opts = ServeOptions {
        name: args.name,
        data_dir: args.data_dir,
        peer_addr: args.peer_addr,
        client_addr: args.client_addr,
        init: args.init,
        join: args.join,
        token: args.token,
        datastore: args.datastore,
        labels: parse_labels(args.labels.as_deref().unwrap_or(""))?,
        client_plaintext: args.client_plaintext,
        snapshot_count: args.snapshot_count,
        compaction: crate::cluster::compactor::Policy::parse(
            &args.auto_compaction_mode,
            &args.auto_compaction_retention,
        )?,
        quota_backend_bytes: args.quota_backend_bytes,
        corrupt_check: parse_check_time(&args.experimental_corrupt_check_time)?,
        initial_corrupt_check: args.experimental_initial_corrupt_check,
        watch_progress_notify: parse_progress_interval(
            &args.experimental_watch_progress_notify_interval,
        )?,
    };
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
    rt.block_on(serve(opts, shutdown_signal()))?;
    Ok(0)
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
    }
}

/// Logs to stderr; EDEN_LOG sets the filter (default info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::parse_progress_interval;
    use std::time::Duration;

    #[test]
    fn the_progress_interval_takes_durations_above_zero() {
        assert_eq!(
            parse_progress_interval("10m").unwrap(),
            Duration::from_secs(600)
        );
        assert_eq!(
            parse_progress_interval("500ms").unwrap(),
            Duration::from_millis(500)
        );
        for bad in ["0", "0s", "ten", ""] {
            let err = parse_progress_interval(bad).unwrap_err().to_string();
            assert!(
                err.contains("--experimental-watch-progress-notify-interval"),
                "{bad}: {err}"
            );
        }
    }
}
