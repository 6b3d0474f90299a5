//! Differential tests: the same scripted operations against a fresh real etcd 3.4
//! (`/usr/bin/etcd`) and a fresh eden node, through the same gRPC client, comparing the
//! responses with the header's cluster id, member id and raft term masked (revisions are
//! compared). Errors are compared by gRPC code and exact message. `EDEN_SHOW_STEPS=1` prints
//! eden's normalized steps of the scripts run through `differential`.

mod etcd_common;

use std::fmt::Debug;
use std::time::Duration;

use eden::etcd::pb::etcdserverpb as pb;
use etcd_common::{EdenCluster, RealEtcd};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::maintenance_client::MaintenanceClient;
use pb::watch_client::WatchClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Replaces the digits after each `field: ` with `_` (ids and terms differ between servers).
fn mask(s: &str, fields: &[&str]) -> String {
    let mut out = s.to_string();
    for f in fields {
        let pat = format!("{f}: ");
        let mut result = String::new();
        let mut rest = out.as_str();
        while let Some(i) = rest.find(&pat) {
            result.push_str(&rest[..i + pat.len()]);
            rest = &rest[i + pat.len()..];
            let digits = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '-'))
                .unwrap_or(rest.len());
            result.push('_');
            rest = &rest[digits..];
        }
        result.push_str(rest);
        out = result;
    }
    out
}

struct Recorder {
    steps: Vec<(String, String)>,
    extra_mask: Vec<&'static str>,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            steps: Vec::new(),
            extra_mask: Vec::new(),
        }
    }

    fn rec<T: Debug>(&mut self, name: &str, r: Result<tonic::Response<T>, tonic::Status>) {
        let text = match r {
            Ok(resp) => format!("{:?}", resp.into_inner()),
            Err(s) => format!("ERR {:?} {}", s.code(), s.message()),
        };
        let mut fields = vec!["cluster_id", "member_id", "raft_term"];
        fields.extend(self.extra_mask.iter());
        self.steps.push((name.to_string(), mask(&text, &fields)));
    }
}

async fn connect(endpoint: String) -> Channel {
    Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn put(key: &str, value: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

fn range(key: &str, end: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.into(),
        range_end: end.into(),
        ..Default::default()
    }
}

fn op_put(key: &str, value: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(put(key, value))),
    }
}

fn op_range(key: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestRange(range(key, ""))),
    }
}

fn cmp_value(key: &str, value: &str, result: pb::compare::CompareResult) -> pb::Compare {
    pb::Compare {
        result: result as i32,
        target: pb::compare::CompareTarget::Value as i32,
        key: key.into(),
        target_union: Some(pb::compare::TargetUnion::Value(value.into())),
        range_end: Vec::new(),
    }
}

async fn kv_script(endpoint: String) -> Vec<(String, String)> {
    let ch = connect(endpoint).await;
    let mut kv = KvClient::new(ch.clone());
    let mut r = Recorder::new();
    r.rec("put a", kv.put(put("a", "1")).await);
    r.rec(
        "put b prev_kv",
        kv.put(pb::PutRequest {
            prev_kv: true,
            ..put("b", "2")
        })
        .await,
    );
    r.rec(
        "put a prev_kv",
        kv.put(pb::PutRequest {
            prev_kv: true,
            ..put("a", "3")
        })
        .await,
    );
    r.rec("put c", kv.put(put("c", "4")).await);
    r.rec(
        "range a..c limit 1",
        kv.range(pb::RangeRequest {
            limit: 1,
            ..range("a", "c")
        })
        .await,
    );
    r.rec(
        "range all sorted desc by value",
        kv.range(pb::RangeRequest {
            key: vec![0],
            range_end: vec![0],
            sort_order: 2,
            sort_target: 4,
            ..Default::default()
        })
        .await,
    );
    r.rec(
        "range from b, keys only",
        kv.range(pb::RangeRequest {
            keys_only: true,
            ..range("b", "\0")
        })
        .await,
    );
    r.rec(
        "range count only",
        kv.range(pb::RangeRequest {
            count_only: true,
            ..range("a", "z")
        })
        .await,
    );
    r.rec(
        "range at revision 2",
        kv.range(pb::RangeRequest {
            revision: 2,
            ..range("a", "z")
        })
        .await,
    );
    r.rec(
        "range min_mod_revision 4",
        kv.range(pb::RangeRequest {
            min_mod_revision: 4,
            ..range("a", "z")
        })
        .await,
    );
    r.rec(
        "range serializable",
        kv.range(pb::RangeRequest {
            serializable: true,
            ..range("a", "")
        })
        .await,
    );
    r.rec(
        "range future revision",
        kv.range(pb::RangeRequest {
            revision: 100,
            ..range("a", "")
        })
        .await,
    );
    r.rec("range empty key", kv.range(range("", "")).await);
    r.rec(
        "delete b prev_kv",
        kv.delete_range(pb::DeleteRangeRequest {
            key: "b".into(),
            prev_kv: true,
            ..Default::default()
        })
        .await,
    );
    r.rec(
        "delete missing",
        kv.delete_range(pb::DeleteRangeRequest {
            key: "nope".into(),
            ..Default::default()
        })
        .await,
    );
    r.rec("put empty key", kv.put(put("", "x")).await);
    r.rec(
        "put ignore_value missing key",
        kv.put(pb::PutRequest {
            ignore_value: true,
            ..put("missing", "")
        })
        .await,
    );
    r.rec(
        "put ignore_value with value",
        kv.put(pb::PutRequest {
            ignore_value: true,
            ..put("a", "v")
        })
        .await,
    );
    r.rec(
        "put ignore_value existing",
        kv.put(pb::PutRequest {
            ignore_value: true,
            prev_kv: true,
            ..put("a", "")
        })
        .await,
    );
    r.rec(
        "put unknown lease",
        kv.put(pb::PutRequest {
            lease: 777,
            ..put("l", "x")
        })
        .await,
    );
    use pb::compare::CompareResult as C;
    r.rec(
        "txn success",
        kv.txn(pb::TxnRequest {
            compare: vec![cmp_value("a", "3", C::Equal)],
            success: vec![op_put("d", "5"), op_range("a")],
            failure: vec![op_range("c")],
        })
        .await,
    );
    r.rec(
        "txn failure",
        kv.txn(pb::TxnRequest {
            compare: vec![cmp_value("a", "3", C::NotEqual)],
            success: vec![op_put("d", "6")],
            failure: vec![op_range("d")],
        })
        .await,
    );
    r.rec(
        "txn compare greater on missing key",
        kv.txn(pb::TxnRequest {
            compare: vec![cmp_value("zz", "", C::Greater)],
            success: vec![op_range("a")],
            failure: vec![],
        })
        .await,
    );
    r.rec(
        "txn duplicate key",
        kv.txn(pb::TxnRequest {
            compare: vec![],
            success: vec![op_put("e", "1"), op_put("e", "2")],
            failure: vec![],
        })
        .await,
    );
    r.rec(
        "txn too many ops",
        kv.txn(pb::TxnRequest {
            compare: vec![],
            success: (0..129).map(|i| op_put(&format!("k{i}"), "v")).collect(),
            failure: vec![],
        })
        .await,
    );
    r.rec(
        "txn range before and after a write",
        kv.txn(pb::TxnRequest {
            compare: vec![],
            success: vec![
                op_range("a"),
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestDeleteRange(
                        pb::DeleteRangeRequest {
                            key: b"no-such-key".to_vec(),
                            ..Default::default()
                        },
                    )),
                },
                op_range("a"),
                op_put("g", "8"),
                op_range("g"),
            ],
            failure: vec![],
        })
        .await,
    );
    r.rec(
        "txn nested",
        kv.txn(pb::TxnRequest {
            compare: vec![],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestTxn(pb::TxnRequest {
                    compare: vec![cmp_value("d", "5", C::Equal)],
                    success: vec![op_put("f", "7")],
                    failure: vec![],
                })),
            }],
            failure: vec![],
        })
        .await,
    );
    r.rec(
        "compact 3",
        kv.compact(pb::CompactionRequest {
            revision: 3,
            physical: true,
        })
        .await,
    );
    r.rec(
        "compact 2 again",
        kv.compact(pb::CompactionRequest {
            revision: 2,
            physical: false,
        })
        .await,
    );
    r.rec(
        "compact future",
        kv.compact(pb::CompactionRequest {
            revision: 1000,
            physical: false,
        })
        .await,
    );
    r.rec(
        "range compacted revision",
        kv.range(pb::RangeRequest {
            revision: 2,
            ..range("a", "")
        })
        .await,
    );
    r.rec("range final", kv.range(range("\0", "\0")).await);
    let mut m = MaintenanceClient::new(ch);
    r.extra_mask.push("hash");
    r.rec("hashkv", m.hash_kv(pb::HashKvRequest { revision: 0 }).await);
    r.rec(
        "hashkv compacted",
        m.hash_kv(pb::HashKvRequest { revision: 1 }).await,
    );

    // Request sizes: under --max-request-bytes (1.5 MiB) a write is served; over it, etcd says
    // "request is too large" (for a put, a delete and a txn alike); over that plus 512 KiB the
    // message is refused before it is read (ResourceExhausted, grpc-go's words).
    let sized = |n: usize| put("big", &"v".repeat(n));
    r.rec("put of 1500000 bytes", kv.put(sized(1_500_000)).await);
    r.rec("put of 1600000 bytes", kv.put(sized(1_600_000)).await);
    r.rec(
        "delete with a key of 1600000 bytes",
        kv.delete_range(pb::DeleteRangeRequest {
            key: vec![b'k'; 1_600_000],
            ..Default::default()
        })
        .await,
    );
    r.rec(
        "txn of two 800000-byte puts",
        kv.txn(pb::TxnRequest {
            success: ["t1", "t2"]
                .iter()
                .map(|k| pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(put(
                        k,
                        &"v".repeat(800_000),
                    ))),
                })
                .collect(),
            ..Default::default()
        })
        .await,
    );
    r.rec(
        "put of 1600000 bytes with an empty key",
        kv.put(pb::PutRequest {
            key: vec![],
            ..sized(1_600_000)
        })
        .await,
    );
    r.rec(
        "read-only txn comparing against 1600000 bytes",
        kv.txn(pb::TxnRequest {
            compare: vec![pb::Compare {
                key: "big".into(),
                target: pb::compare::CompareTarget::Value as i32,
                target_union: Some(pb::compare::TargetUnion::Value(
                    "v".repeat(1_600_000).into(),
                )),
                ..Default::default()
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(range("big", ""))),
            }],
            ..Default::default()
        })
        .await,
    );
    r.rec("put of 2200000 bytes", kv.put(sized(2_200_000)).await);
    r.rec(
        "range of the sizes",
        kv.range(pb::RangeRequest {
            keys_only: true,
            ..range("big", "")
        })
        .await,
    );
    r.steps
}

async fn lease_script(endpoint: String) -> Vec<(String, String)> {
    let ch = connect(endpoint).await;
    let mut kv = KvClient::new(ch.clone());
    let mut lease = LeaseClient::new(ch.clone());
    let mut r = Recorder::new();
    r.rec(
        "grant 1000",
        lease
            .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 1000 })
            .await,
    );
    r.rec(
        "grant 1000 again",
        lease
            .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 1000 })
            .await,
    );
    r.rec(
        "grant below the minimum ttl",
        lease
            .lease_grant(pb::LeaseGrantRequest { ttl: 1, id: 1001 })
            .await,
    );
    r.rec(
        "grant too large",
        lease
            .lease_grant(pb::LeaseGrantRequest {
                ttl: 9_000_000_001,
                id: 1002,
            })
            .await,
    );
    r.rec(
        "put with lease",
        kv.put(pb::PutRequest {
            lease: 1000,
            ..put("leased", "x")
        })
        .await,
    );
    r.rec(
        "put second key with lease",
        kv.put(pb::PutRequest {
            lease: 1000,
            ..put("leased2", "y")
        })
        .await,
    );
    r.rec(
        "put ignore_lease",
        kv.put(pb::PutRequest {
            ignore_lease: true,
            ..put("leased", "z")
        })
        .await,
    );
    r.rec(
        "leases",
        lease.lease_leases(pb::LeaseLeasesRequest {}).await,
    );
    // The remaining TTL depends on the clock; the granted TTL and the keys must match.
    r.extra_mask.push("ttl");
    // etcd keeps a lease's keys in a Go map, so their order is not defined: compare sorted.
    r.rec(
        "time to live with keys",
        lease
            .lease_time_to_live(pb::LeaseTimeToLiveRequest {
                id: 1000,
                keys: true,
            })
            .await
            .map(|resp| {
                let mut resp = resp.into_inner();
                resp.keys.sort();
                tonic::Response::new(resp)
            }),
    );
    r.extra_mask.pop();
    r.rec(
        "time to live unknown",
        lease
            .lease_time_to_live(pb::LeaseTimeToLiveRequest { id: 5, keys: true })
            .await,
    );
    let (tx, rx) = mpsc::channel(4);
    // grpc-go sends the response headers with the first message, so the first request must be
    // queued before waiting for the call to open.
    tx.send(pb::LeaseKeepAliveRequest { id: 1000 })
        .await
        .unwrap();
    let mut ka = lease
        .lease_keep_alive(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    r.rec("keep alive", ka.message().await.map(tonic::Response::new));
    tx.send(pb::LeaseKeepAliveRequest { id: 4242 })
        .await
        .unwrap();
    r.rec(
        "keep alive unknown",
        ka.message().await.map(tonic::Response::new),
    );
    drop(tx);
    r.rec(
        "revoke",
        lease
            .lease_revoke(pb::LeaseRevokeRequest { id: 1000 })
            .await,
    );
    r.rec(
        "revoke again",
        lease
            .lease_revoke(pb::LeaseRevokeRequest { id: 1000 })
            .await,
    );
    r.rec("keys gone", kv.range(range("leased", "leasee")).await);
    r.rec(
        "revoke lease without keys",
        lease
            .lease_revoke(pb::LeaseRevokeRequest { id: 1001 })
            .await,
    );
    r.rec(
        "keep alive of 2200000 bytes",
        padded_keep_alive(ch.clone(), 2_200_000).await,
    );
    r.steps
}

/// A LeaseKeepAliveRequest with an unknown field of `pad` bytes (servers skip unknown fields).
#[derive(Clone, PartialEq, prost::Message)]
struct PaddedKeepAlive {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(bytes = "vec", tag = "15")]
    pad: Vec<u8>,
}

/// Sends one padded keep-alive on a LeaseKeepAlive stream and returns the first answer.
async fn padded_keep_alive(
    ch: Channel,
    pad: usize,
) -> Result<tonic::Response<Option<pb::LeaseKeepAliveResponse>>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<PaddedKeepAlive, pb::LeaseKeepAliveResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/etcdserverpb.Lease/LeaseKeepAlive");
    let req = tonic::Request::new(tokio_stream::iter(vec![PaddedKeepAlive {
        id: 4242,
        pad: vec![b'p'; pad],
    }]));
    let resp = grpc.streaming(req, path, codec).await?;
    resp.into_inner().message().await.map(tonic::Response::new)
}

/// A watch stream driven step by step; after each step it collects what arrives until the
/// stream has been quiet for a moment (how long a server takes is not compared, only what it
/// sends).
struct WatchDriver {
    tx: mpsc::Sender<pb::WatchRequest>,
    rx: tonic::Streaming<pb::WatchResponse>,
}

impl WatchDriver {
    async fn collect(&mut self) -> Vec<pb::WatchResponse> {
        let mut got = Vec::new();
        while let Ok(Some(Ok(m))) =
            tokio::time::timeout(Duration::from_millis(400), self.rx.next_message()).await
        {
            got.push(m);
        }
        got.sort_by_key(|m| m.watch_id);
        got
    }

    async fn send(&mut self, req: pb::watch_request::RequestUnion) -> Vec<pb::WatchResponse> {
        self.tx
            .send(pb::WatchRequest {
                request_union: Some(req),
            })
            .await
            .unwrap();
        self.collect().await
    }
}

trait NextMessage {
    async fn next_message(&mut self) -> Option<Result<pb::WatchResponse, tonic::Status>>;
}

impl NextMessage for tonic::Streaming<pb::WatchResponse> {
    async fn next_message(&mut self) -> Option<Result<pb::WatchResponse, tonic::Status>> {
        self.message().await.transpose()
    }
}

fn create(key: &str, end: &str, start: i64, id: i64) -> pb::watch_request::RequestUnion {
    pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
        key: key.into(),
        range_end: end.into(),
        start_revision: start,
        watch_id: id,
        prev_kv: true,
        ..Default::default()
    })
}

async fn watch_script(endpoint: String) -> Vec<(String, String)> {
    use pb::watch_request::RequestUnion as U;
    let ch = connect(endpoint).await;
    let mut kv = KvClient::new(ch.clone());
    let mut wc = WatchClient::new(ch);
    let mut r = Recorder::new();
    let log = |r: &mut Recorder, name: &str, msgs: Vec<pb::WatchResponse>| {
        r.rec(name, Ok(tonic::Response::new(msgs)));
    };
    for (k, v) in [("w/a", "1"), ("w/b", "2"), ("w/a", "3"), ("x", "4")] {
        kv.put(put(k, v)).await.unwrap();
    }
    kv.delete_range(pb::DeleteRangeRequest {
        key: "w/b".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Revisions now: 2 w/a, 3 w/b, 4 w/a, 5 x, 6 delete w/b.
    // grpc-go sends the response headers with the first message, so the first request is
    // queued before waiting for the call to open.
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::WatchRequest {
        request_union: Some(create("w/", "w0", 2, 0)),
    })
    .await
    .unwrap();
    let resp = wc
        .watch(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut w = WatchDriver { tx, rx: resp };
    let m = w.collect().await;
    log(&mut r, "create prefix from revision 2 (replays history)", m);
    let m = w.send(create("w/a", "", 0, 7)).await;
    log(&mut r, "create with client id 7", m);
    let m = w.send(create("w/a", "", 0, 7)).await;
    log(&mut r, "create duplicate id 7", m);
    let m = w.send(create("b", "a", 0, 0)).await;
    log(&mut r, "create empty range", m);
    let m = w.send(create("w/", "w0", 100, 20)).await;
    log(&mut r, "create future start revision", m);
    let m = w
        .send(U::CreateRequest(pb::WatchCreateRequest {
            key: "w/".into(),
            range_end: "w0".into(),
            filters: vec![pb::watch_create_request::FilterType::Noput as i32],
            watch_id: 30,
            ..Default::default()
        }))
        .await;
    log(&mut r, "create with NOPUT filter", m);
    kv.put(put("w/a", "5")).await.unwrap();
    let m = w.collect().await;
    log(&mut r, "events after put w/a", m);
    kv.txn(pb::TxnRequest {
        compare: vec![],
        success: vec![
            op_put("w/c", "6"),
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestDeleteRange(
                    pb::DeleteRangeRequest {
                        key: "w/a".into(),
                        ..Default::default()
                    },
                )),
            },
        ],
        failure: vec![],
    })
    .await
    .unwrap();
    let m = w.collect().await;
    log(&mut r, "events after a txn (one revision, two events)", m);
    let m = w
        .send(U::CancelRequest(pb::WatchCancelRequest { watch_id: 7 }))
        .await;
    log(&mut r, "cancel 7", m);
    let m = w
        .send(U::CancelRequest(pb::WatchCancelRequest { watch_id: 99 }))
        .await;
    log(&mut r, "cancel unknown", m);
    // An empty key watches "\0", the smallest key (etcd rewrites it).
    let m = w.send(create("", "", 0, 50)).await;
    log(&mut r, "create with an empty key", m);
    kv.put(put("\0", "8")).await.unwrap();
    let m = w.collect().await;
    log(&mut r, "events for key \\0 after an empty-key watch", m);
    let m = w
        .send(U::ProgressRequest(pb::WatchProgressRequest {}))
        .await;
    log(&mut r, "progress", m);
    kv.compact(pb::CompactionRequest {
        revision: 5,
        physical: true,
    })
    .await
    .unwrap();
    let m = w.send(create("w/", "w0", 3, 40)).await;
    log(&mut r, "create from a compacted revision", m);
    let m = w.send(create("w/", "w0", 5, 41)).await;
    log(&mut r, "create at the compacted revision", m);
    // The client closes its side of the stream: the watches go on.
    let WatchDriver { tx, rx } = w;
    drop(tx);
    let mut w = WatchDriver {
        tx: mpsc::channel(1).0,
        rx,
    };
    kv.put(put("w/d", "7")).await.unwrap();
    let m = w.collect().await;
    log(&mut r, "events after the client closed its side", m);

    // A create request over the 2 MiB message limit ends its stream with ResourceExhausted.
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::WatchRequest {
        request_union: Some(create(&"k".repeat(2_200_000), "", 0, 0)),
    })
    .await
    .unwrap();
    let outcome = match wc.watch(ReceiverStream::new(rx)).await {
        Err(status) => Err(status),
        Ok(resp) => resp.into_inner().message().await.map(tonic::Response::new),
    };
    r.rec("watch create of 2200000 bytes", outcome);
    r.steps
}

/// The store quota both servers run with in [`quota_matches_etcd`].
const QUOTA: &str = "4194304";

/// Fills the store past its quota, then walks etcd's recovery: what is refused while the
/// NOSPACE alarm is up, and compact, defragment and disarm. How many 256 KiB puts fit differs
/// (bbolt pages against eden's data file), so from the fill on revisions are masked and the
/// fill and delete counts are recorded as "some".
async fn quota_script(endpoint: String) -> Vec<(String, String)> {
    let ch = connect(endpoint).await;
    let mut kv = KvClient::new(ch.clone());
    let mut lease = LeaseClient::new(ch.clone());
    let mut m = MaintenanceClient::new(ch);
    let mut r = Recorder::new();
    r.rec("put before the fill", kv.put(put("small", "v")).await);
    let big = "x".repeat(256 * 1024);
    let mut stored = 0;
    let refusal = loop {
        match kv.put(put(&format!("big/{stored:03}"), &big)).await {
            Ok(_) if stored < 64 => stored += 1,
            Ok(_) => panic!("64 puts of 256 KiB did not reach a quota of {QUOTA} bytes"),
            Err(e) => break e,
        }
    };
    r.extra_mask = vec!["revision"];
    r.steps.push((
        "filled".into(),
        format!("some puts went in: {}", stored > 0),
    ));
    r.rec::<()>("the put that reached the quota", Err(refusal));
    use pb::alarm_request::AlarmAction;
    let alarm_req = |action: AlarmAction, member_id: u64, alarm: i32| pb::AlarmRequest {
        action: action as i32,
        member_id,
        alarm,
    };
    let get_alarms = |alarm: pb::AlarmType| alarm_req(AlarmAction::Get, 0, alarm as i32);
    r.rec("alarm list", m.alarm(get_alarms(pb::AlarmType::None)).await);
    r.rec(
        "alarm list NOSPACE",
        m.alarm(get_alarms(pb::AlarmType::Nospace)).await,
    );
    r.rec(
        "alarm list CORRUPT",
        m.alarm(get_alarms(pb::AlarmType::Corrupt)).await,
    );
    let raised = m
        .alarm(get_alarms(pb::AlarmType::None))
        .await
        .unwrap()
        .into_inner()
        .alarms;
    let errors = m
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .errors;
    let errors: Vec<String> = errors
        .iter()
        .map(|e| mask(&e.replace("memberID:", "memberID: "), &["memberID"]))
        .collect();
    r.steps
        .push(("status errors".into(), format!("{errors:?}")));
    r.rec(
        "a small put while the alarm is up",
        kv.put(put("tiny", "v")).await,
    );
    let txn = |success: Vec<pb::RequestOp>| pb::TxnRequest {
        compare: Vec::new(),
        success,
        failure: Vec::new(),
    };
    r.rec(
        "a read-only txn",
        kv.txn(txn(vec![op_range("small")])).await,
    );
    r.rec(
        "a txn with a put",
        kv.txn(txn(vec![op_put("t", "v")])).await,
    );
    r.rec(
        "a lease grant",
        lease
            .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 0 })
            .await,
    );
    r.rec("a read", kv.range(range("small", "")).await);
    let deleted = kv
        .delete_range(pb::DeleteRangeRequest {
            key: b"big/".to_vec(),
            range_end: b"big0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    r.steps.push((
        "delete the fill".into(),
        format!(
            "deleted all: {}",
            deleted.deleted == stored + 1 || deleted.deleted == stored
        ),
    ));
    let now = deleted.header.unwrap().revision;
    r.rec(
        "compact",
        kv.compact(pb::CompactionRequest {
            revision: now,
            physical: true,
        })
        .await,
    );
    r.rec("defragment", m.defragment(pb::DefragmentRequest {}).await);
    r.rec(
        "still refused before the disarm",
        kv.put(put("tiny", "v")).await,
    );
    for a in &raised {
        r.rec(
            "disarm",
            m.alarm(alarm_req(AlarmAction::Deactivate, a.member_id, a.alarm))
                .await,
        );
    }
    r.rec(
        "alarm list after the disarm",
        m.alarm(get_alarms(pb::AlarmType::None)).await,
    );
    r.rec("a put after the disarm", kv.put(put("tiny", "v")).await);
    r.rec(
        "a lease grant after the disarm",
        lease
            .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 77 })
            .await,
    );
    let last = [
        (
            "disarm again",
            alarm_req(
                AlarmAction::Deactivate,
                raised[0].member_id,
                pb::AlarmType::Nospace as i32,
            ),
        ),
        (
            "raise no alarm",
            alarm_req(AlarmAction::Activate, 5, pb::AlarmType::None as i32),
        ),
        (
            "raise CORRUPT for a member",
            alarm_req(AlarmAction::Activate, 5, pb::AlarmType::Corrupt as i32),
        ),
    ];
    for (name, req) in last {
        r.rec(name, m.alarm(req).await);
    }
    // While a CORRUPT alarm is up: changes are refused, reads and read-only txns served.
    r.rec("a put under CORRUPT", kv.put(put("c", "v")).await);
    r.rec(
        "a delete under CORRUPT",
        kv.delete_range(pb::DeleteRangeRequest {
            key: b"small".to_vec(),
            ..Default::default()
        })
        .await,
    );
    r.rec(
        "a read-only txn under CORRUPT",
        kv.txn(txn(vec![op_range("small")])).await,
    );
    r.rec("a read under CORRUPT", kv.range(range("small", "")).await);
    // etcd lists alarms from a Go map, in no fixed order: compare them sorted.
    let mut all = m.alarm(get_alarms(pb::AlarmType::None)).await;
    if let Ok(resp) = all.as_mut() {
        resp.get_mut()
            .alarms
            .sort_by_key(|a| (a.member_id, a.alarm));
    }
    r.rec("alarm list with CORRUPT", all);
    r.steps
}

/// The server-side Lock and Election services: a second locker waits for the first, a
/// campaigner for the leader, and Observe follows the leader's key. Everything is driven from
/// one task with short waits, so the order of events is the same on both servers.
async fn lock_election_script(endpoint: String) -> Vec<(String, String)> {
    use eden::etcd::pb::v3electionpb as el;
    use eden::etcd::pb::v3lockpb as lk;
    let ch = connect(endpoint).await;
    let mut lease = LeaseClient::new(ch.clone());
    let kv = KvClient::new(ch.clone());
    // Waits until a contender's key is in, so the order of events does not depend on timing.
    let key_in = |key: &'static str| {
        let mut kv = kv.clone();
        async move {
            for _ in 0..200 {
                let got = kv.range(range(key, "")).await.unwrap().into_inner();
                if got.count == 1 {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };
    let mut lock = lk::lock_client::LockClient::new(ch.clone());
    let mut elect = el::election_client::ElectionClient::new(ch.clone());
    let mut r = Recorder::new();
    for id in [1001, 1002] {
        lease
            .lease_grant(pb::LeaseGrantRequest { ttl: 60, id })
            .await
            .unwrap();
    }
    let lock_req = |name: &str, lease: i64| lk::LockRequest {
        name: name.into(),
        lease,
    };
    let first = lock.lock(lock_req("mylock", 1001)).await;
    let first_key = first.as_ref().unwrap().get_ref().key.clone();
    r.rec("lock", first);
    let mut second_client = lock.clone();
    let second = tokio::spawn(async move { second_client.lock(lock_req("mylock", 1002)).await });
    let queued = key_in("mylock/3ea").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.steps.push((
        "second locker waits".into(),
        format!("{queued} {}", !second.is_finished()),
    ));
    r.rec(
        "unlock",
        lock.unlock(lk::UnlockRequest { key: first_key }).await,
    );
    r.rec("second locker gets it", second.await.unwrap());
    r.rec(
        "lock with an unknown lease",
        lock.lock(lock_req("other", 999)).await,
    );
    let fresh = lock.lock(lock_req("fresh", 0)).await.unwrap().into_inner();
    r.steps.push((
        "lock with lease 0 gets a new lease".into(),
        format!(
            "{}",
            fresh.key.starts_with(b"fresh/") && fresh.key.len() > 6
        ),
    ));
    r.rec(
        "unlock a key that is not there",
        lock.unlock(lk::UnlockRequest { key: "nope".into() }).await,
    );

    let leader_req = || el::LeaderRequest { name: "e1".into() };
    r.rec(
        "leader of an empty election",
        elect.leader(leader_req()).await,
    );
    let alice = elect
        .campaign(el::CampaignRequest {
            name: "e1".into(),
            lease: 1001,
            value: "alice".into(),
        })
        .await;
    let alice_key = alice.as_ref().unwrap().get_ref().leader.clone().unwrap();
    r.rec("campaign", alice);
    r.rec("leader", elect.leader(leader_req()).await);
    let mut observe = elect.observe(leader_req()).await.unwrap().into_inner();
    let mut next_observed = async |r: &mut Recorder, name: &str| {
        let msg = tokio::time::timeout(Duration::from_secs(5), observe.message()).await;
        match msg {
            Ok(Ok(Some(m))) => r.rec(name, Ok(tonic::Response::new(m))),
            other => r
                .steps
                .push((name.into(), format!("no message: {other:?}"))),
        }
    };
    next_observed(&mut r, "observe: the leader").await;
    let mut bob_client = elect.clone();
    let bob = tokio::spawn(async move {
        bob_client
            .campaign(el::CampaignRequest {
                name: "e1".into(),
                lease: 1002,
                value: "bob".into(),
            })
            .await
    });
    let queued = key_in("e1/3ea").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.steps.push((
        "second campaigner waits".into(),
        format!("{queued} {}", !bob.is_finished()),
    ));
    r.rec(
        "proclaim",
        elect
            .proclaim(el::ProclaimRequest {
                leader: Some(alice_key.clone()),
                value: "alice2".into(),
            })
            .await,
    );
    next_observed(&mut r, "observe: the proclaimed value").await;
    r.rec(
        "proclaim with a stale revision",
        elect
            .proclaim(el::ProclaimRequest {
                leader: Some(el::LeaderKey {
                    rev: alice_key.rev - 1,
                    ..alice_key.clone()
                }),
                value: "x".into(),
            })
            .await,
    );
    r.rec(
        "proclaim without a leader key",
        elect
            .proclaim(el::ProclaimRequest {
                leader: None,
                value: "x".into(),
            })
            .await,
    );
    r.rec(
        "resign",
        elect
            .resign(el::ResignRequest {
                leader: Some(alice_key.clone()),
            })
            .await,
    );
    let bob = bob.await.unwrap();
    let bob_key = bob.as_ref().unwrap().get_ref().leader.clone().unwrap();
    r.rec("second campaigner wins", bob);
    next_observed(&mut r, "observe: the next leader").await;
    r.rec(
        "campaign again with another value",
        elect
            .campaign(el::CampaignRequest {
                name: "e1".into(),
                lease: 1002,
                value: "bob2".into(),
            })
            .await,
    );
    next_observed(&mut r, "observe: the new value").await;
    r.rec(
        "leader after the new value",
        elect.leader(leader_req()).await,
    );
    r.rec(
        "resign with a stale revision",
        elect
            .resign(el::ResignRequest {
                leader: Some(el::LeaderKey {
                    rev: bob_key.rev + 100,
                    ..bob_key.clone()
                }),
            })
            .await,
    );
    r.rec(
        "resign without a leader key",
        elect.resign(el::ResignRequest { leader: None }).await,
    );
    lease
        .lease_revoke(pb::LeaseRevokeRequest { id: 1002 })
        .await
        .unwrap();
    r.rec(
        "leader after its lease is revoked",
        elect.leader(leader_req()).await,
    );
    r.steps
}

fn compare(what: &str, etcd: &[(String, String)], eden: &[(String, String)]) {
    let mut diffs = Vec::new();
    for (i, (e, d)) in etcd.iter().zip(eden).enumerate() {
        if e != d {
            diffs.push(format!(
                "step {i} {:?}:\n  etcd: {}\n  eden: {}",
                e.0, e.1, d.1
            ));
        }
    }
    assert_eq!(etcd.len(), eden.len(), "{what}: different number of steps");
    assert!(
        diffs.is_empty(),
        "{what}: eden differs from etcd 3.4 in {} steps:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// One scripted run against one endpoint: (step name, normalized response) pairs.
type ScriptFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Vec<(String, String)>>>>;

async fn differential(what: &str, script: fn(String) -> ScriptFuture) {
    let etcd = RealEtcd::start().await;
    let eden = EdenCluster::start(1, false).await;
    let reference = script(etcd.endpoint.clone()).await;
    let ours = script(eden.endpoint(0)).await;
    if std::env::var("EDEN_SHOW_STEPS").is_ok() {
        for s in &ours {
            eprintln!("{} => {}", s.0, s.1);
        }
    }
    compare(what, &reference, &ours);
    eden.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kv_matches_etcd() {
    differential("kv", |e| Box::pin(kv_script(e))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_matches_etcd() {
    differential("lease", |e| Box::pin(lease_script(e))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_matches_etcd() {
    differential("watch", |e| Box::pin(watch_script(e))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_and_alarms_match_etcd() {
    let etcd = RealEtcd::start_with(&[&format!("--quota-backend-bytes={QUOTA}")]).await;
    let eden = EdenCluster::start(1, false).await;
    eden.nodes[0]
        .backend
        .set_quota_bytes(QUOTA.parse().unwrap());
    let reference = quota_script(etcd.endpoint.clone()).await;
    let ours = quota_script(eden.endpoint(0)).await;
    compare("quota", &reference, &ours);
    eden.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_and_election_match_etcd() {
    differential("lock and election", |e| Box::pin(lock_election_script(e))).await;
}
