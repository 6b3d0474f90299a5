//! `eden cluster ...`: look at the cluster through the etcd API of any datastore node.
//!
//! `status` reads the member list, asks every member for its etcd `Status` (applied index,
//! leader), and reads the health the leader's role controller publishes at
//! `/eden/cluster/health`. It works against any node that is up.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::cluster::controller::{HealthReport, HealthState, HEALTH_KEY};
use crate::error::{Error, Result};
use crate::etcd::pb::etcdserverpb as pb;

/// Inspect the cluster.
#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// The leader and, per node: name, role, health, raft id, applied index and lag.
    ///
    /// Examples:
    ///   eden cluster status --data-dir /var/lib/eden          # credentials from DATA/admin
    ///   eden cluster status --endpoints https://10.0.0.1:2379 --cacert ca.crt \
    ///       --cert admin.crt --key admin.key --output json
    #[command(verbatim_doc_comment)]
    Status(ConnectArgs),
    /// After quorum is lost for good: make this stopped node the only voter.
    ///
    /// Use it only when a majority of voters is gone and will not come back (for example two
    /// of three destroyed). Stop the surviving node first, run this on its data dir, then start
    /// it again with `eden serve --data-dir DIR`: it is a one-voter cluster with every entry its
    /// log held, and new nodes can --join it. Writes the lost voters had and this replica did
    /// not (after the last log index it prints) are gone. Other survivors must be wiped and
    /// --join again.
    ///
    /// Example:
    ///   eden cluster recover --data-dir /var/lib/eden --yes
    #[command(verbatim_doc_comment)]
    Recover(RecoverArgs),
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// The data dir of a stopped node (voter or standby) of the broken cluster.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Confirm: this rewrites the cluster's membership.
    #[arg(long)]
    pub yes: bool,
    /// text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

fn recover(a: &RecoverArgs, rt: &tokio::runtime::Runtime) -> Result<i32> {
    let dir = crate::cluster::datadir::DataDir::lock(&a.data_dir)?;
    let node = dir.node()?.ok_or_else(|| {
        Error::InvalidInput(format!(
            "{} holds no eden node (no node.json); give the data dir of a surviving node",
            a.data_dir.display()
        ))
    })?;
    if !a.yes {
        return Err(Error::InvalidInput(format!(
            "this makes {} the only voter of cluster {:?}; the other members are dropped and \
             writes only they had are lost. Stop every other survivor, then run again with --yes",
            node.name, node.cluster_name
        )));
    }
    let info = eden_raft::NodeInfo {
        name: node.name.clone(),
        peer_addr: node.peer_addr.clone(),
        client_addr: node.client_addr.clone(),
    };
    let report = rt
        .block_on(eden_raft::recover::recover_as_single_voter(
            &dir.raft(),
            node.raft_id,
            info,
        ))
        .map_err(|e| Error::Unavailable(format!("recovery failed, nothing was changed: {e}")))?;
    if a.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?
        );
        return Ok(0);
    }
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
    println!(
        "{} is now the only voter of cluster {:?}.",
        node.name, node.cluster_name
    );
    println!(
        "  old voters: {}; old standbys: {}",
        report.old_voters.join(", "),
        if report.old_learners.is_empty() {
            "none".into()
        } else {
            report.old_learners.join(", ")
        }
    );
    println!(
        "  this replica's log ended at index {} (term {}); it knew entries up to {} were \
         committed and had applied up to {} (revision {}).",
        opt(report.last_log.map(|l| l.0)),
        opt(report.last_log.map(|l| l.1)),
        opt(report.known_committed),
        opt(report.applied),
        report.revision
    );
    println!(
        "  may be lost: entries after index {} that the lost voters had committed.",
        opt(report.last_log.map(|l| l.0))
    );
    println!(
        "  entries {}..{} were not known committed here; they are committed now.",
        report.known_committed.map(|c| c + 1).unwrap_or(0),
        opt(report.last_log.map(|l| l.0))
    );
    println!(
        "Start it with `eden serve --data-dir {}`; wipe the other survivors and --join them.",
        a.data_dir.display()
    );
    Ok(0)
}

/// How to reach the etcd API.
#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// A node's data dir: its client address and DATA/admin/ credentials are used.
    #[arg(long, value_name = "DIR", conflicts_with = "endpoints")]
    pub data_dir: Option<PathBuf>,
    /// An etcd endpoint of the cluster (http:// only for --client-plaintext nodes).
    #[arg(long, value_name = "URL")]
    pub endpoints: Option<String>,
    /// CA certificate (DATA/admin/ca.crt).
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (DATA/admin/admin.crt).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client key (DATA/admin/admin.key).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

/// How the CLI connects: the first endpoint and TLS settings for every member.
pub struct Connector {
    endpoint: String,
    tls: Option<ClientTlsConfig>,
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", path.display())))
}

impl Connector {
    pub fn from_args(a: &ConnectArgs) -> Result<Connector> {
        let (endpoint, cacert, cert, key) = match &a.data_dir {
            Some(dir) => {
                let node: crate::cluster::datadir::NodeFile =
                    serde_json::from_slice(&read(&dir.join("node.json"))?).map_err(|e| {
                        Error::InvalidData(format!("{}: {e}", dir.join("node.json").display()))
                    })?;
                let scheme = if node.client_plaintext {
                    "http"
                } else {
                    "https"
                };
                let admin = dir.join("admin");
                (
                    format!("{scheme}://{}", node.client_addr),
                    Some(admin.join("ca.crt")),
                    Some(admin.join("admin.crt")),
                    Some(admin.join("admin.key")),
                )
            }
            None => (
                a.endpoints.clone().ok_or_else(|| {
                    Error::InvalidInput(
                        "say where the cluster is: --data-dir DIR, or --endpoints URL with \
                         --cacert/--cert/--key"
                            .into(),
                    )
                })?,
                a.cacert.clone(),
                a.cert.clone(),
                a.key.clone(),
            ),
        };
        let endpoint = endpoint.split(',').next().unwrap_or_default().to_string();
        let tls = if endpoint.starts_with("https://") {
            let ca = cacert.ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{endpoint} is https: give --cacert (and --cert/--key)"
                ))
            })?;
            Some(super::client::tls(
                &ca,
                cert.as_deref().zip(key.as_deref()),
            )?)
        } else {
            None
        };
        Ok(Connector { endpoint, tls })
    }

    /// A member's URL with the scheme this CLI was given (a member reports https always).
    fn member_url(&self, client_url: &str) -> String {
        let hostport = client_url.split("://").last().unwrap_or(client_url);
        super::client::url(hostport, self.tls.is_some())
    }

    async fn channel(&self, url: &str) -> Result<Channel> {
        super::client::connect(
            url,
            self.tls.as_ref(),
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .await
    }
}

/// One row of `eden cluster status`.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub name: String,
    /// voter, standby, or agent (not in Raft).
    pub role: &'static str,
    /// alive, suspect, dead or unreachable.
    pub health: String,
    /// `health` is alive.
    pub healthy: bool,
    pub raft_id: u64,
    pub leader: bool,
    pub applied_index: Option<u64>,
    pub lag: Option<u64>,
    pub client_url: String,
    pub error: Option<String>,
}

/// A raised alarm (etcd's NOSPACE or CORRUPT): writes are refused cluster-wide while it is up.
#[derive(Debug, Clone, Serialize)]
pub struct AlarmStatus {
    /// The member's name, if it is a member.
    pub member: Option<String>,
    pub raft_id: u64,
    /// NOSPACE, CORRUPT (or NONE).
    pub alarm: String,
}

/// The whole answer.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub leader: Option<String>,
    /// Raft members first, then agent-only nodes.
    #[serde(rename = "nodes")]
    pub members: Vec<MemberStatus>,
    /// Raised alarms; empty when writes are accepted.
    pub alarms: Vec<AlarmStatus>,
    /// Why the alarms could not be read, if they could not.
    pub alarm_error: Option<String>,
}

pub async fn status(connector: &Connector) -> Result<ClusterStatus> {
    let ch = connector.channel(&connector.endpoint).await?;
    let members = pb::cluster_client::ClusterClient::new(ch.clone())
        .member_list(pb::MemberListRequest::default())
        .await
        .map_err(|e| Error::Unavailable(format!("member list: {}", e.message())))?
        .into_inner()
        .members;
    let registered = pb::kv_client::KvClient::new(ch.clone())
        .range(pb::RangeRequest {
            key: crate::agent::records::NODES.as_bytes().to_vec(),
            range_end: crate::agent::kv::prefix_end(crate::agent::records::NODES.as_bytes()),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().kvs)
        .unwrap_or_default();
    let (alarms, alarm_error) = match pb::maintenance_client::MaintenanceClient::new(ch.clone())
        .alarm(pb::AlarmRequest::default())
        .await
    {
        Ok(r) => (r.into_inner().alarms, None),
        Err(e) => (Vec::new(), Some(e.message().to_string())),
    };
    let health: Option<HealthReport> = pb::kv_client::KvClient::new(ch)
        .range(pb::RangeRequest {
            key: HEALTH_KEY.as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().kvs.into_iter().next())
        .and_then(|kv| serde_json::from_slice(&kv.value).ok());
    let mut rows = Vec::new();
    let mut leader_id = None;
    for m in &members {
        let url = connector.member_url(m.client_ur_ls.first().map(String::as_str).unwrap_or(""));
        let st = match connector.channel(&url).await {
            Ok(ch) => pb::maintenance_client::MaintenanceClient::new(ch)
                .status(pb::StatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|e| e.message().to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Ok(s) = &st {
            if s.leader != 0 {
                leader_id = Some(s.leader);
            }
        }
        let health = health
            .as_ref()
            .and_then(|h| h.members.get(&m.id.to_string()).copied());
        let health: String = match (health, &st) {
            (Some(HealthState::Alive), _) => "alive".into(),
            (Some(HealthState::Suspect), _) => "suspect".into(),
            (Some(HealthState::Dead), _) => "dead".into(),
            (None, Ok(_)) => "alive".into(),
            (None, Err(_)) => "unreachable".into(),
        };
        rows.push(MemberStatus {
            name: m.name.clone(),
            role: if m.is_learner { "standby" } else { "voter" },
            healthy: health == "alive",
            health,
            raft_id: m.id,
            leader: false,
            applied_index: st.as_ref().ok().map(|s| s.raft_applied_index),
            lag: None,
            client_url: url,
            error: st.err(),
        });
    }
    let leader_applied = rows
        .iter()
        .find(|r| Some(r.raft_id) == leader_id)
        .and_then(|r| r.applied_index);
    for r in rows.iter_mut() {
        r.leader = Some(r.raft_id) == leader_id;
        if let (Some(l), Some(a)) = (leader_applied, r.applied_index) {
            r.lag = Some(l.saturating_sub(a));
        }
    }
    // Agents are not Raft members (agent-only nodes, and eligible agents: datastore-capable
    // nodes the role controller keeps outside Raft): their agents register under
    // /eden/nodes/, and their alive key (on the agent's lease) is their health.
    let alive: std::collections::BTreeSet<String> = registered
        .iter()
        .filter_map(|kv| {
            let k = String::from_utf8_lossy(&kv.key).into_owned();
            k.strip_suffix("/alive")
                .and_then(|k| k.strip_prefix(crate::agent::records::NODES))
                .map(str::to_string)
        })
        .collect();
    for kv in &registered {
        let Ok(rec) = serde_json::from_slice::<crate::agent::records::NodeRecord>(&kv.value) else {
            continue;
        };
        if rows.iter().any(|r| r.name == rec.name) {
            continue;
        }
        let up = alive.contains(&rec.name);
        rows.push(MemberStatus {
            name: rec.name.clone(),
            role: "agent",
            health: if up { "alive" } else { "dead" }.into(),
            healthy: up,
            raft_id: rec.raft_id,
            leader: false,
            applied_index: None,
            lag: None,
            client_url: String::new(),
            error: None,
        });
    }
    let alarms = alarms
        .into_iter()
        .map(|a| AlarmStatus {
            member: rows
                .iter()
                .find(|r| r.raft_id == a.member_id && r.role != "agent")
                .map(|r| r.name.clone()),
            raft_id: a.member_id,
            alarm: pb::AlarmType::try_from(a.alarm)
                .map(|t| t.as_str_name().to_string())
                .unwrap_or_else(|_| a.alarm.to_string()),
        })
        .collect();
    Ok(ClusterStatus {
        leader: rows.iter().find(|r| r.leader).map(|r| r.name.clone()),
        members: rows,
        alarms,
        alarm_error,
    })
}

pub fn run(args: ClusterArgs) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
    match args.command {
        ClusterCommand::Status(a) => {
            let connector = Connector::from_args(&a)?;
            let st = rt.block_on(status(&connector))?;
            if a.output == "json" {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&st)
                        .map_err(|e| Error::Internal(e.to_string()))?
                );
            } else {
                println!("leader: {}", st.leader.as_deref().unwrap_or("none"));
                println!(
                    "{:<16} {:<8} {:<12} {:<20} {:>10} {:>6}",
                    "NAME", "ROLE", "HEALTH", "RAFT ID", "APPLIED", "LAG"
                );
                for m in &st.members {
                    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or("-".into());
                    println!(
                        "{:<16} {:<8} {:<12} {:<20} {:>10} {:>6}{}",
                        format!("{}{}", m.name, if m.leader { " *" } else { "" }),
                        m.role,
                        m.health,
                        m.raft_id,
                        opt(m.applied_index),
                        opt(m.lag),
                        m.error
                            .as_ref()
                            .map(|e| format!("  ({e})"))
                            .unwrap_or_default()
                    );
                }
                if let Some(e) = &st.alarm_error {
                    println!("alarms: could not be read ({e})");
                }
                for a in &st.alarms {
                    let what = match a.alarm.as_str() {
                        "NOSPACE" => {
                            "its store reached --quota-backend-bytes: compact, defrag, then \
                             `etcdctl alarm disarm`"
                        }
                        "CORRUPT" => {
                            "its store differs from the leader's: rebuild it (--join again), \
                             then `etcdctl alarm disarm`"
                        }
                        _ => "see `etcdctl alarm list`",
                    };
                    println!(
                        "alarm {} on {} (raft id {}): writes are refused; {what}",
                        a.alarm,
                        a.member.as_deref().unwrap_or("a former member"),
                        a.raft_id
                    );
                }
            }
            Ok(0)
        }
        ClusterCommand::Recover(a) => recover(&a, &rt),
    }
}
