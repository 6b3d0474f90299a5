//! The `etcd-client` crate (a clientv3-style Rust client) against a 3-node eden cluster: KV,
//! txn, watch, leases with keep-alive through a follower, members and status. The client is
//! given every endpoint, as applications are.

mod etcd_common;

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaseTimeToLiveOptions, PutOptions, Txn,
    TxnOp, WatchOptions,
};

use etcd_common::EdenCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_client_crate_on_a_three_node_cluster() {
    let eden = EdenCluster::start(3, false).await;
    let endpoints: Vec<String> = (0..3).map(|i| eden.endpoint(i)).collect();
    let mut client = Client::connect(&endpoints, None).await.unwrap();

    // KV.
    let put = client.put("app/a", "1", None).await.unwrap();
    let first = put.header().unwrap().revision();
    client.put("app/b", "2", None).await.unwrap();
    let prev = client
        .put("app/a", "3", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(prev.prev_key().unwrap().value(), b"1");
    let got = client
        .get("app/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let kvs: Vec<(&[u8], &[u8])> = got.kvs().iter().map(|kv| (kv.key(), kv.value())).collect();
    assert_eq!(
        kvs,
        [(&b"app/a"[..], &b"3"[..]), (&b"app/b"[..], &b"2"[..])]
    );
    assert_eq!(got.kvs()[0].version(), 2);
    assert_eq!(got.kvs()[0].create_revision(), first);

    // Txn: the failure branch runs when the compare fails.
    let txn = Txn::new()
        .when([Compare::value("app/a", CompareOp::Equal, "1")])
        .and_then([TxnOp::put("app/c", "never", None)])
        .or_else([TxnOp::get("app/a", None)]);
    let resp = client.txn(txn).await.unwrap();
    assert!(!resp.succeeded());
    assert_eq!(
        client.get("app/c", None).await.unwrap().count(),
        0,
        "the success branch ran"
    );

    // Watch from a past revision replays history, then streams new events.
    let mut watch = client
        .watch(
            "app/a",
            Some(WatchOptions::new().with_start_revision(first)),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("watch replay within 10 s")
            .unwrap()
            .unwrap();
        for e in msg.events() {
            seen.push(e.kv().unwrap().value().to_vec());
        }
    }
    assert_eq!(seen, [b"1".to_vec(), b"3".to_vec()]);
    client.delete("app/a", None).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("delete event within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(msg.events()[0].event_type(), EventType::Delete);

    // Leases: grant, attach, keep alive through a client that talks to a follower only.
    let lease = client.lease_grant(5, None).await.unwrap();
    client
        .put(
            "app/leased",
            "x",
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await
        .unwrap();
    let leader = client.status().await.unwrap().leader();
    let mut follower_endpoint = None;
    for e in &endpoints {
        let mut c = Client::connect([e], None).await.unwrap();
        if c.status().await.unwrap().header().unwrap().member_id() != leader {
            follower_endpoint = Some(e.clone());
            break;
        }
    }
    let mut follower = Client::connect([follower_endpoint.unwrap()], None)
        .await
        .unwrap();
    let (mut keeper, mut answers) = follower.lease_keep_alive(lease.id()).await.unwrap();
    // Keep it alive past its TTL: 8 s of keep-alives every second on a 5 s lease.
    for _ in 0..8 {
        keeper.keep_alive().await.unwrap();
        let a = answers.message().await.unwrap().unwrap();
        assert_eq!(a.ttl(), 5);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        client.get("app/leased", None).await.unwrap().count(),
        1,
        "the lease expired although a follower kept it alive"
    );
    let ttl = client
        .lease_time_to_live(lease.id(), Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 5);
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 5, "ttl {}", ttl.ttl());
    assert_eq!(ttl.keys(), [b"app/leased".to_vec()]);
    // Without keep-alives the leader expires it and the key goes.
    drop(keeper);
    drop(answers);
    let mut gone = false;
    for _ in 0..100 {
        if client.get("app/leased", None).await.unwrap().count() == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        gone,
        "the lease's key was still there 20 s after keep-alives stopped"
    );

    // Members and status.
    let members = client.member_list().await.unwrap();
    assert_eq!(members.members().len(), 3);
    assert!(members.members().iter().all(|m| !m.is_learner()));
    let status = client.status().await.unwrap();
    assert_eq!(status.version(), eden::etcd::ETCD_VERSION);
    assert!(status.raft_index() > 0);

    eden.stop().await;
}

/// The crate's `lock()` and election calls use etcd's server-side Lock and Election services:
/// two clients on different nodes take turns on a lock, and a campaign waits for the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_client_crate_lock_and_election_on_three_nodes() {
    use etcd_client::{LockOptions, ProclaimOptions, ResignOptions};
    let eden = EdenCluster::start(3, false).await;
    let mut a = Client::connect([eden.endpoint(1)], None).await.unwrap();
    let mut b = Client::connect([eden.endpoint(2)], None).await.unwrap();
    let lease_a = a.lease_grant(30, None).await.unwrap().id();
    let lease_b = b.lease_grant(30, None).await.unwrap().id();

    let held = a
        .lock("jobs", Some(LockOptions::new().with_lease(lease_a)))
        .await
        .unwrap();
    assert_eq!(held.key(), format!("jobs/{lease_a:x}").as_bytes());
    let waiting = tokio::spawn(async move {
        let r = b
            .lock("jobs", Some(LockOptions::new().with_lease(lease_b)))
            .await
            .unwrap();
        (b, r.key().to_vec())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the second client took a held lock");
    a.unlock(held.key()).await.unwrap();
    let (mut b, key_b) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the second client did not get the lock after the unlock")
        .unwrap();
    assert_eq!(key_b, format!("jobs/{lease_b:x}").as_bytes());
    b.unlock(key_b).await.unwrap();

    // A waiter whose client gives up leaves no key behind to take the lock later.
    let again = a
        .lock("jobs", Some(LockOptions::new().with_lease(lease_a)))
        .await
        .unwrap();
    let mut c = Client::connect([eden.endpoint(0)], None).await.unwrap();
    let lease_c = c.lease_grant(30, None).await.unwrap().id();
    let key_c = format!("jobs/{lease_c:x}");
    let gives_up = tokio::spawn(async move {
        c.lock("jobs", Some(LockOptions::new().with_lease(lease_c)))
            .await
    });
    let mut waited = false;
    for _ in 0..50 {
        if a.get(key_c.as_str(), None).await.unwrap().count() == 1 {
            waited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(waited, "the third waiter never put its key {key_c}");
    gives_up.abort();
    let mut cleaned = false;
    for _ in 0..50 {
        if a.get(key_c.as_str(), None).await.unwrap().count() == 0 {
            cleaned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cleaned, "the abandoned waiter's key {key_c} is still there");
    a.unlock(again.key()).await.unwrap();

    let won = a.campaign("leader", "node-a", lease_a).await.unwrap();
    let leader_a = won.leader().unwrap().clone();
    let mut observe = b.observe("leader").await.unwrap();
    let first = observe.message().await.unwrap().unwrap();
    assert_eq!(first.kv().unwrap().value(), b"node-a");
    let mut b2 = b.clone();
    let contender =
        tokio::spawn(async move { b2.campaign("leader", "node-b", lease_b).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!contender.is_finished(), "a second leader was elected");
    a.proclaim(
        "node-a v2",
        Some(ProclaimOptions::new().with_leader(leader_a.clone())),
    )
    .await
    .unwrap();
    let news = observe.message().await.unwrap().unwrap();
    assert_eq!(news.kv().unwrap().value(), b"node-a v2");
    a.resign(Some(ResignOptions::new().with_leader(leader_a)))
        .await
        .unwrap();
    let won_b = tokio::time::timeout(Duration::from_secs(10), contender)
        .await
        .expect("the contender did not win after the leader resigned")
        .unwrap();
    assert_eq!(
        won_b.leader().unwrap().key(),
        format!("leader/{lease_b:x}").as_bytes()
    );
    let next = observe.message().await.unwrap().unwrap();
    assert_eq!(next.kv().unwrap().value(), b"node-b");
    let now = a.leader("leader").await.unwrap();
    assert_eq!(now.kv().unwrap().value(), b"node-b");
    eden.stop().await;
}

/// A progress answer promises that every event up to its revision was sent: under a stream of
/// writes, no event at or below a progress answer's revision may come after it (etcd #15220).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_progress_answer_never_overtakes_an_event() {
    let eden = EdenCluster::start(1, false).await;
    let mut client = Client::connect([eden.endpoint(0)], None).await.unwrap();
    let mut stream = client.watch("p", None).await.unwrap();
    let created = stream.message().await.unwrap().unwrap();
    assert!(created.created());
    const WRITES: usize = 400;
    let writer = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut last = 0;
            for i in 0..WRITES {
                let put = client.put("p", i.to_string(), None).await.unwrap();
                last = put.header().unwrap().revision();
            }
            last
        })
    };
    let (mut events, mut progresses, mut promised) = (0, 0, 0i64);
    while events < WRITES {
        stream.request_progress().await.unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an answer")
            .unwrap()
            .unwrap();
        if resp.events().is_empty() {
            promised = promised.max(resp.header().unwrap().revision());
            progresses += 1;
            continue;
        }
        for e in resp.events() {
            let rev = e.kv().unwrap().mod_revision();
            assert!(
                rev > promised,
                "the event at {rev} came after a progress answer promised {promised}"
            );
            events += 1;
        }
    }
    writer.await.unwrap();
    assert!(progresses > 0);
    eden.stop().await;
}

/// A keep-alive through a follower while the leader has just gone is not failed: as etcd, the
/// follower tries again until a new leader answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keep_alive_through_a_follower_survives_the_leaders_loss() {
    let mut eden = EdenCluster::start(3, false).await;
    assert!(eden.nodes[0].node.is_leader());
    let mut client = Client::connect([eden.endpoint(1)], None).await.unwrap();
    let lease = client.lease_grant(30, None).await.unwrap().id();
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().ttl(), 30);

    let leader = eden.nodes.remove(0);
    leader.stop().await;
    keeper.keep_alive().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(15), answers.message())
        .await
        .expect("an answer within the request timeout")
        .expect("the keep-alive stream goes on")
        .expect("an answer, not the end of the stream");
    assert_eq!(
        answer.ttl(),
        30,
        "the lease was kept alive by the new leader"
    );
    assert!(eden.nodes.iter().any(|n| n.node.is_leader()));
    eden.stop().await;
}

/// `progress_notify`: a caught-up watch that asked is told the current revision every progress
/// interval (etcd's `--experimental-watch-progress-notify-interval`, here 200 ms); one that
/// did not ask hears nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_progress_notify_watch_hears_the_revision_every_interval() {
    let eden = EdenCluster::start(1, false).await;
    eden.nodes[0]
        .backend
        .set_watch_progress_notify_interval(Duration::from_millis(200));
    let mut client = Client::connect([eden.endpoint(0)], None).await.unwrap();
    let rev = client
        .put("n", "1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let mut asked = client
        .watch("n", Some(WatchOptions::new().with_progress_notify()))
        .await
        .unwrap();
    let mut quiet = client.watch("n", None).await.unwrap();
    let asked_id = asked.message().await.unwrap().unwrap().watch_id();
    assert!(quiet.message().await.unwrap().unwrap().created());

    let mut notes = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(1100);
    while let Ok(msg) = tokio::time::timeout_at(until, asked.message()).await {
        let msg = msg.unwrap().unwrap();
        assert!(msg.events().is_empty(), "{msg:?}");
        assert_eq!(msg.watch_id(), asked_id);
        assert_eq!(msg.header().unwrap().revision(), rev);
        notes += 1;
    }
    assert!(
        (3..=6).contains(&notes),
        "{notes} progress notifications in 1.1 s"
    );
    let heard = tokio::time::timeout(Duration::from_millis(300), quiet.message()).await;
    assert!(
        heard.is_err(),
        "a watch without progress_notify heard {heard:?}"
    );
    eden.stop().await;
}
