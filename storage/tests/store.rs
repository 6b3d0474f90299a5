//! Store-level tests: limits checked against etcd 3.4.23, persistence across reopen, snapshots,
//! hashing, meta and lease-id determinism.

use eden_storage::*;

fn put(k: &str) -> RequestOp {
    RequestOp::Put(PutRequest {
        key: k.into(),
        value: b"x".to_vec(),
        ..Default::default()
    })
}
fn get(k: &str) -> RequestOp {
    RequestOp::Range(RangeRequest {
        key: k.into(),
        ..Default::default()
    })
}
fn del(k: &str) -> RequestOp {
    RequestOp::DeleteRange(DeleteRangeRequest {
        key: k.into(),
        ..Default::default()
    })
}
fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare: Vec::new(),
        success,
        failure,
    }
}
fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
    RequestOp::Txn(txn(success, failure))
}

fn apply_one(store: &Store, cmd: Command) -> Result<(Applied, Vec<Event>), Error> {
    store.apply(&[cmd], &[]).unwrap().pop().unwrap()
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

/// Each case was sent to etcd 3.4.23 through its JSON gateway; the expected outcome is what it
/// answered.
#[test]
fn txn_limits_and_duplicates_match_etcd() {
    let (_dir, store) = open();
    let cmp = Compare {
        result: CompareResult::Greater,
        target: CompareTarget::Version(0),
        key: b"a".to_vec(),
        range_end: Vec::new(),
    };
    let empty_cmp = Compare {
        key: Vec::new(),
        ..cmp.clone()
    };
    let cases: Vec<(&str, TxnRequest, Option<Error>)> = vec![
        ("128 ops", txn(vec![get("a"); 128], vec![]), None),
        (
            "129 ops",
            txn(vec![get("a"); 129], vec![]),
            Some(Error::TooManyOps),
        ),
        (
            "129 compares",
            TxnRequest {
                compare: vec![cmp; 129],
                ..Default::default()
            },
            Some(Error::TooManyOps),
        ),
        (
            "nested 99+28",
            txn(
                [vec![get("a"); 99], vec![nested(vec![get("a"); 28], vec![])]].concat(),
                vec![],
            ),
            None,
        ),
        (
            "nested 99+29",
            txn(
                [vec![get("a"); 99], vec![nested(vec![get("a"); 29], vec![])]].concat(),
                vec![],
            ),
            Some(Error::TooManyOps),
        ),
        (
            "nested failure branch 99+29",
            txn(
                [vec![get("a"); 99], vec![nested(vec![], vec![get("a"); 29])]].concat(),
                vec![],
            ),
            Some(Error::TooManyOps),
        ),
        (
            "empty compare key",
            TxnRequest {
                compare: vec![empty_cmp],
                ..Default::default()
            },
            Some(Error::EmptyKey),
        ),
        (
            "nested empty key",
            txn(vec![nested(vec![put("")], vec![])], vec![]),
            Some(Error::EmptyKey),
        ),
        (
            "too many ops is checked before duplicates",
            txn(
                [vec![put("x"), put("x")], vec![get("a"); 127]].concat(),
                vec![],
            ),
            Some(Error::TooManyOps),
        ),
        (
            "then/else of one nested txn may put the same key",
            txn(vec![nested(vec![put("n")], vec![put("n")])], vec![]),
            None,
        ),
        (
            "two nested txns putting the same key",
            txn(
                vec![
                    nested(vec![put("n")], vec![]),
                    nested(vec![], vec![put("n")]),
                ],
                vec![],
            ),
            Some(Error::DuplicateKey),
        ),
        (
            "nested delete vs outer put",
            txn(vec![nested(vec![del("n")], vec![]), put("n")], vec![]),
            Some(Error::DuplicateKey),
        ),
        (
            "outer delete vs nested put",
            txn(vec![del("n"), nested(vec![put("n")], vec![])], vec![]),
            Some(Error::DuplicateKey),
        ),
    ];
    for (name, t, want) in cases {
        let before = store.revision();
        let got = apply_one(&store, Command::Txn(t)).err();
        assert_eq!(got, want, "{name}");
        if want.is_some() {
            assert_eq!(
                store.revision(),
                before,
                "{name}: a rejected txn must not add a revision"
            );
        }
    }
}

/// etcd 3.4 panics on this txn (its pre-checks pass, then the delete removes the key the
/// ignore_value put needs). eden rejects it as a whole with "key not found" instead.
#[test]
fn ignore_value_after_from_key_delete_fails_the_whole_txn() {
    let (_dir, store) = open();
    apply_one(&store, Command::Txn(txn(vec![put("b")], vec![]))).unwrap();
    let t = txn(
        vec![
            RequestOp::DeleteRange(DeleteRangeRequest {
                key: b"a".to_vec(),
                range_end: vec![0],
                prev_kv: false,
            }),
            RequestOp::Put(PutRequest {
                key: b"b".to_vec(),
                ignore_value: true,
                ..Default::default()
            }),
        ],
        vec![],
    );
    assert_eq!(
        apply_one(&store, Command::Txn(t)).unwrap_err(),
        Error::KeyNotFound
    );
    assert_eq!(store.revision(), 2);
    let r = store
        .range(&RangeRequest {
            key: b"b".to_vec(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.kvs[0].value, b"x");
}

/// A range over every key.
fn everything() -> RangeRequest {
    RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    }
}

/// Opens the store in a directory sled had open moments ago in this process: sled releases its
/// lock from a background thread after the drop, so the first tries may find it held.
fn open_after_sled(dir: &std::path::Path) -> Store {
    (0..100)
        .find_map(|_| {
            Store::open(dir)
                .map_err(|_| std::thread::sleep(std::time::Duration::from_millis(20)))
                .ok()
        })
        .expect("the store opens once sled has let go of the directory")
}

fn sample_commands() -> Vec<Command> {
    let p = |k: &str, v: &str, lease| {
        Command::Put(PutRequest {
            key: k.into(),
            value: v.into(),
            lease,
            ..Default::default()
        })
    };
    vec![
        Command::LeaseGrant { id: 0, ttl: 60 },
        Command::LeaseGrant { id: 0, ttl: 30 },
        p("a", "1", 0),
        p("b", "1", 1),
        p("c", "1", 2),
        p("a", "2", 0),
        Command::DeleteRange(DeleteRangeRequest {
            key: b"c".to_vec(),
            ..Default::default()
        }),
        Command::Compact(CompactionRequest {
            revision: 4,
            physical: true,
        }),
        p("d", "1", 1),
    ]
}

/// Everything a reader can see of a store, for before/after comparisons.
#[allow(clippy::type_complexity)]
fn observe(
    store: &Store,
) -> (
    i64,
    i64,
    Vec<Lease>,
    RangeResponse,
    (u32, i64),
    Vec<(i64, Vec<Event>)>,
) {
    let all = everything();
    (
        store.revision(),
        store.compact_revision(),
        store.leases(),
        store.range(&all).unwrap(),
        store.hash_kv(0).unwrap(),
        store.events(4, 100).unwrap(),
    )
}

#[test]
fn state_survives_reopen_and_meta_is_stored_with_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let before;
    {
        let store = Store::open(dir.path()).unwrap();
        let results = store
            .apply(&sample_commands(), &[(b"applied".to_vec(), b"9".to_vec())])
            .unwrap();
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        store.flush().unwrap();
        before = observe(&store);
    }
    let store = Store::open(dir.path()).unwrap();
    let after = observe(&store);
    assert_eq!(before, after);
    assert_eq!(store.revision(), 7);
    assert_eq!(store.compact_revision(), 4);
    assert_eq!(store.meta(b"applied").unwrap(), Some(b"9".to_vec()));
    // Generated lease ids are deterministic and continue after reopen.
    let ids: Vec<_> = store.leases().iter().map(|l| l.id).collect();
    assert_eq!(ids, vec![1, 2]);
    let (applied, _) = apply_one(&store, Command::LeaseGrant { id: 0, ttl: 5 }).unwrap();
    assert_eq!(
        applied.response,
        CommandResponse::LeaseGrant { id: 3, ttl: 5 }
    );
}

#[test]
fn snapshot_round_trip_replaces_everything() {
    let (_d1, source) = open();
    source
        .apply(&sample_commands(), &[(b"applied".to_vec(), b"9".to_vec())])
        .unwrap();
    let mut snap = Vec::new();
    source.export_snapshot(&mut snap).unwrap();

    let (d2, target) = open();
    target
        .apply(
            &[Command::Put(PutRequest {
                key: b"zzz".to_vec(),
                value: b"old".to_vec(),
                ..Default::default()
            })],
            &[(b"other".to_vec(), b"x".to_vec())],
        )
        .unwrap();
    target.import_snapshot(&mut snap.as_slice()).unwrap();
    let all = everything();
    assert_eq!(target.range(&all).unwrap(), source.range(&all).unwrap());
    assert_eq!(target.hash_kv(0).unwrap(), source.hash_kv(0).unwrap());
    assert_eq!(target.leases(), source.leases());
    assert_eq!(target.meta(b"applied").unwrap(), Some(b"9".to_vec()));
    assert_eq!(target.meta(b"other").unwrap(), None);
    assert_eq!(
        target.events(4, 100).unwrap(),
        source.events(4, 100).unwrap()
    );
    // And it is durable: reopen sees the imported state.
    drop(target);
    let reopened = Store::open(d2.path()).unwrap();
    assert_eq!(reopened.range(&all).unwrap(), source.range(&all).unwrap());
}

#[test]
fn damaged_snapshot_changes_nothing() {
    let (_d1, source) = open();
    source.apply(&sample_commands(), &[]).unwrap();
    let mut snap = Vec::new();
    source.export_snapshot(&mut snap).unwrap();

    let (_d2, target) = open();
    target
        .apply(
            &[Command::Put(PutRequest {
                key: b"keep".to_vec(),
                value: b"me".to_vec(),
                ..Default::default()
            })],
            &[],
        )
        .unwrap();
    let all = everything();
    let before = target.range(&all).unwrap();
    let mut flipped = snap.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    for bad in [
        snap[..snap.len() - 3].to_vec(),
        flipped,
        b"not a snapshot".to_vec(),
    ] {
        let err = target.import_snapshot(&mut bad.as_slice()).unwrap_err();
        assert!(
            matches!(err, Error::InvalidSnapshot(_) | Error::Corrupt(_)),
            "{err}"
        );
        assert_eq!(target.range(&all).unwrap(), before);
    }
}

#[test]
fn hash_kv_tracks_history_and_checks_revisions() {
    let (_d1, a) = open();
    let (_d2, b) = open();
    a.apply(&sample_commands(), &[]).unwrap();
    b.apply(&sample_commands(), &[]).unwrap();
    assert_eq!(a.hash_kv(0).unwrap(), b.hash_kv(0).unwrap());
    assert_eq!(a.hash_kv(5).unwrap(), b.hash_kv(5).unwrap());
    assert_ne!(a.hash_kv(5).unwrap().0, a.hash_kv(6).unwrap().0);
    assert_eq!(a.hash_kv(0).unwrap().1, 4);
    assert_eq!(a.hash_kv(100).unwrap_err(), Error::FutureRev);
    assert_eq!(a.hash_kv(3).unwrap_err(), Error::Compacted);
    b.apply(
        &[Command::Put(PutRequest {
            key: b"x".to_vec(),
            ..Default::default()
        })],
        &[],
    )
    .unwrap();
    assert_ne!(a.hash_kv(0).unwrap(), b.hash_kv(0).unwrap());
}

#[test]
fn failed_commands_in_a_batch_do_not_affect_the_others() {
    let (_d, store) = open();
    let cmds = vec![
        Command::Put(PutRequest {
            key: b"a".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        }),
        Command::Put(PutRequest {
            key: b"b".to_vec(),
            lease: 42,
            ..Default::default()
        }),
        Command::LeaseRevoke { id: 42 },
        Command::Put(PutRequest {
            key: b"a".to_vec(),
            value: b"2".to_vec(),
            ..Default::default()
        }),
    ];
    let results = store.apply(&cmds, &[]).unwrap();
    assert_eq!(results[0].as_ref().unwrap().0.revision, 2);
    assert_eq!(results[1].as_ref().unwrap_err(), &Error::LeaseNotFound);
    assert_eq!(results[2].as_ref().unwrap_err(), &Error::LeaseNotFound);
    assert_eq!(results[3].as_ref().unwrap().0.revision, 3);
    assert_eq!(store.revision(), 3);
}

#[test]
fn store_is_send_and_sync_and_reads_run_beside_writes() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
    let (_d, store) = open();
    let store = std::sync::Arc::new(store);
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..200 {
                let put = Command::Put(PutRequest {
                    key: format!("k{i:03}").into(),
                    value: b"v".to_vec(),
                    ..Default::default()
                });
                store.apply(&[put], &[]).unwrap();
            }
        })
    };
    // Every read sees a whole prefix of the writes: the count lies between the revisions seen
    // just before and just after it (each put adds one key and one revision).
    for _ in 0..200 {
        let before = store.revision();
        let r = store
            .range(&RangeRequest {
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                count_only: true,
                ..Default::default()
            })
            .unwrap();
        let after = store.revision();
        assert!(
            before - 1 <= r.count && r.count < after,
            "count {} between revisions {before} and {after}",
            r.count
        );
    }
    writer.join().unwrap();
    assert_eq!(store.revision(), 201);
}

/// What a crash in the middle of `import_snapshot` leaves behind: a half-written next data file
/// under its temporary name. Open must ignore it (and remove it), keeping the old state.
#[test]
fn half_written_import_is_dropped_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let all = everything();
    let before = {
        let store = Store::open(dir.path()).unwrap();
        store.apply(&sample_commands(), &[]).unwrap();
        store.flush().unwrap();
        store.range(&all).unwrap()
    };
    let half = dir.path().join("data-00000002.tmp");
    std::fs::write(&half, b"EDENTREE\0\0\0\x01 and then the crash").unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.range(&all).unwrap(), before);
    assert_eq!(store.revision(), 7);
    assert!(!half.exists());
    // The next import fills the next file from scratch.
    let mut snap = Vec::new();
    store.export_snapshot(&mut snap).unwrap();
    store.import_snapshot(&mut snap.as_slice()).unwrap();
    assert_eq!(store.range(&all).unwrap(), before);
}

/// A directory of the older layout (one sled database: the default tree names the current
/// generation, `eden-g<N>` holds its entries, and a half-written import may have left
/// `eden-g<N+1>`) opens with the current generation's content, and sled's files are gone.
#[test]
fn a_sled_store_of_earlier_builds_is_converted_on_open() {
    let all = everything();
    let source = tempfile::tempdir().unwrap();
    let (before, entries) = {
        let store = Store::open(source.path()).unwrap();
        store
            .apply(&sample_commands(), &[(b"applied".to_vec(), b"42".to_vec())])
            .unwrap();
        let before = store.range(&all).unwrap();
        drop(store);
        let tree = eden_storage::tree::Tree::open(source.path()).unwrap();
        let entries: Vec<(Vec<u8>, Vec<u8>)> = tree
            .iter()
            .map(|r| r.map(|(k, v)| (k.to_vec(), v)).unwrap())
            .collect();
        (before, entries)
    };
    assert!(entries.len() > 5);
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.insert(b"generation", &1i64.to_be_bytes()).unwrap();
        let current = db.open_tree("eden-g1").unwrap();
        for (k, v) in &entries {
            current.insert(k, v.as_slice()).unwrap();
        }
        let half = db.open_tree("eden-g2").unwrap();
        half.insert(b"mrev", &999i64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let store = open_after_sled(dir.path());
    assert_eq!(store.range(&all).unwrap(), before);
    assert_eq!(store.revision(), 7);
    assert_eq!(store.meta(b"applied").unwrap(), Some(b"42".to_vec()));
    assert_eq!(store.converted_from_sled(), Some(entries.len()));
    for gone in ["conf", "db", "blobs"] {
        assert!(!dir.path().join(gone).exists(), "{gone} is still there");
    }
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.range(&all).unwrap(), before);
    assert_eq!(store.converted_from_sled(), None);
}

/// After a conversion, leftovers of sled's files (an open that stopped before removing them
/// all) are removed on the next open without converting again: neither a partial directory
/// (`db` gone, which sled would recreate empty) nor a whole one may replace newer data.
#[test]
fn sled_leftovers_after_a_conversion_do_not_convert_again() {
    let all = everything();
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.insert(b"generation", &0i64.to_be_bytes()).unwrap();
        db.open_tree("eden-g0").unwrap();
        db.flush().unwrap();
    }
    let open = || open_after_sled(dir.path());
    let store = open();
    assert_eq!(store.converted_from_sled(), Some(0));
    store.apply(&sample_commands(), &[]).unwrap();
    store.flush().unwrap();
    let before = store.range(&all).unwrap();
    drop(store);
    // Only sled's blob directory is left.
    std::fs::create_dir(dir.path().join("blobs")).unwrap();
    let store = open();
    assert_eq!(store.converted_from_sled(), None);
    assert_eq!(store.range(&all).unwrap(), before);
    assert!(!dir.path().join("blobs").exists());
    drop(store);
    // A whole (empty) sled database is left.
    {
        let db = sled::open(dir.path()).unwrap();
        db.insert(b"generation", &0i64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let store = open();
    assert_eq!(store.converted_from_sled(), None);
    assert_eq!(store.range(&all).unwrap(), before);
    assert!(!dir.path().join("db").exists() && !dir.path().join("conf").exists());
}

/// Splits a snapshot stream into its entries (checking nothing) and builds one back, with a
/// correct checksum.
fn snapshot_entries(stream: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut at = 12;
    let mut out = Vec::new();
    let u32_at = |at: usize| u32::from_be_bytes(stream[at..at + 4].try_into().unwrap()) as usize;
    while stream[at] == 1 {
        let klen = u32_at(at + 1);
        let key = stream[at + 5..at + 5 + klen].to_vec();
        let vat = at + 5 + klen;
        let vlen = u32_at(vat);
        out.push((key, stream[vat + 4..vat + 4 + vlen].to_vec()));
        at = vat + 4 + vlen;
    }
    out
}

fn snapshot_stream(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut s = b"EDENSNAP".to_vec();
    s.extend_from_slice(&1u32.to_be_bytes());
    for (k, v) in entries {
        s.push(1);
        s.extend_from_slice(&(k.len() as u32).to_be_bytes());
        s.extend_from_slice(k);
        s.extend_from_slice(&(v.len() as u32).to_be_bytes());
        s.extend_from_slice(v);
    }
    s.push(0);
    let mut crc = eden_storage::codec::Crc32c::new();
    crc.update(&s);
    s.extend_from_slice(&crc.finish().to_be_bytes());
    s
}

/// A stream whose checksum is right but whose content does not load (history above the
/// stored current revision) is refused, and the store keeps its state, on disk too.
#[test]
fn a_snapshot_that_does_not_load_changes_nothing() {
    let all = everything();
    let source_dir = tempfile::tempdir().unwrap();
    let source = Store::open(source_dir.path()).unwrap();
    source.apply(&sample_commands(), &[]).unwrap();
    let mut good = Vec::new();
    source.export_snapshot(&mut good).unwrap();
    let entries = snapshot_entries(&good);
    assert_eq!(
        snapshot_stream(&entries),
        good,
        "the test's encoder matches"
    );
    let without_rev: Vec<_> = entries
        .into_iter()
        .filter(|(k, _)| k.as_slice() != codec::META_REV)
        .collect();
    let bad = snapshot_stream(&without_rev);

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .apply(
            &[Command::Put(PutRequest {
                key: b"mine".to_vec(),
                value: b"1".to_vec(),
                ..Default::default()
            })],
            &[],
        )
        .unwrap();
    let before = store.range(&all).unwrap();
    let err = store.import_snapshot(&mut bad.as_slice()).unwrap_err();
    assert!(err.is_fault(), "{err}");
    assert_eq!(store.range(&all).unwrap(), before);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.range(&all).unwrap(), before);
    store.import_snapshot(&mut good.as_slice()).unwrap();
    assert_eq!(store.revision(), source.revision());
}

/// A checkpoint of the data file that fails does not fail the batch that triggered it: every
/// apply succeeds, the error is handed to the caller once, and a later checkpoint succeeds.
#[test]
fn a_failed_checkpoint_is_reported_and_the_writes_stand() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path(), 4096).unwrap();
    let blocker = dir.path().join("data-00000002.tmp");
    std::fs::create_dir(&blocker).unwrap();
    // Each put overwrites the key and compacts the history away: all garbage.
    let put = |i: usize| {
        vec![
            Command::Put(PutRequest {
                key: b"k".to_vec(),
                value: vec![i as u8; 300],
                ..Default::default()
            }),
            Command::Compact(CompactionRequest {
                revision: i as i64 + 2,
                physical: false,
            }),
        ]
    };
    for i in 0..40 {
        let results = store.apply(&put(i), &[]).unwrap();
        assert!(results.iter().all(|r| r.is_ok()));
    }
    let err = store
        .take_maintenance_error()
        .expect("the checkpoint failed");
    assert!(err.to_string().contains("data-00000002.tmp"), "{err}");
    assert!(store.take_maintenance_error().is_none(), "reported once");
    assert_eq!(store.revision(), 41);
    std::fs::remove_dir(&blocker).unwrap();
    for i in 40..80 {
        store.apply(&put(i), &[]).unwrap();
    }
    assert!(store.take_maintenance_error().is_none());
    assert!(
        !dir.path().join("data-00000001.edb").exists(),
        "a checkpoint replaced the first data file"
    );
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.revision(), 81);
}

fn alarm(activate: bool, member: u64, alarm: AlarmType) -> Command {
    Command::Alarm {
        activate,
        member,
        alarm,
    }
}

/// A `NoSpace` alarm refuses what etcd's capped applier refuses (puts, txns with puts of their
/// own, lease grants) and lets the rest through; alarms survive a reopen and travel in
/// snapshots.
#[test]
fn a_nospace_alarm_caps_writes_and_is_kept() {
    let (dir, store) = open();
    apply_one(
        &store,
        Command::Put(PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        }),
    )
    .unwrap();
    let raised = AlarmMember {
        member: 7,
        alarm: AlarmType::NoSpace,
    };
    let (applied, _) = apply_one(&store, alarm(true, 7, AlarmType::NoSpace)).unwrap();
    assert_eq!(applied.response, CommandResponse::Alarm(vec![raised]));
    // Raising it again answers with it, and changes nothing.
    let (again, _) = apply_one(&store, alarm(true, 7, AlarmType::NoSpace)).unwrap();
    assert_eq!(again.response, CommandResponse::Alarm(vec![raised]));
    assert_eq!(store.alarms(), vec![raised]);
    let rev = store.revision();

    let refused = [
        Command::Put(PutRequest {
            key: b"k2".to_vec(),
            ..Default::default()
        }),
        Command::Txn(txn(vec![get("k")], vec![put("k")])),
        Command::LeaseGrant { id: 0, ttl: 60 },
    ];
    for cmd in refused {
        assert_eq!(
            apply_one(&store, cmd.clone()).unwrap_err(),
            Error::NoSpace,
            "{cmd:?}"
        );
    }
    // Validation comes first, as in etcd.
    let empty = Command::Put(PutRequest::default());
    assert_eq!(apply_one(&store, empty).unwrap_err(), Error::EmptyKey);
    // Reads, deletes, compaction and a txn whose only put is in a nested txn go through.
    apply_one(&store, Command::Txn(txn(vec![get("k")], vec![]))).unwrap();
    apply_one(
        &store,
        Command::Txn(txn(vec![nested(vec![put("n")], vec![])], vec![])),
    )
    .unwrap();
    apply_one(
        &store,
        Command::DeleteRange(DeleteRangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        }),
    )
    .unwrap();
    apply_one(
        &store,
        Command::Compact(CompactionRequest {
            revision: rev,
            physical: false,
        }),
    )
    .unwrap();

    let mut snap = Vec::new();
    store.export_snapshot(&mut snap).unwrap();
    store.flush().unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.alarms(), vec![raised]);
    let (_d2, other) = open();
    other.import_snapshot(&mut &snap[..]).unwrap();
    assert_eq!(other.alarms(), vec![raised]);
    assert_eq!(
        apply_one(&other, Command::LeaseGrant { id: 0, ttl: 60 }).unwrap_err(),
        Error::NoSpace
    );

    // Clearing answers with what was cleared; clearing again with nothing.
    let (cleared, _) = apply_one(&store, alarm(false, 7, AlarmType::NoSpace)).unwrap();
    assert_eq!(cleared.response, CommandResponse::Alarm(vec![raised]));
    let (none, _) = apply_one(&store, alarm(false, 7, AlarmType::NoSpace)).unwrap();
    assert_eq!(none.response, CommandResponse::Alarm(vec![]));
    assert!(store.alarms().is_empty());
    apply_one(&store, Command::LeaseGrant { id: 0, ttl: 60 }).unwrap();
    // A CORRUPT alarm refuses every change (after the request's own validation); reads and
    // txns of ranges only go on, and clearing the alarm lets writes through again.
    apply_one(&store, alarm(true, 3, AlarmType::Corrupt)).unwrap();
    let rev = store.revision();
    let refused = [
        Command::Put(PutRequest {
            key: b"k3".to_vec(),
            ..Default::default()
        }),
        Command::DeleteRange(DeleteRangeRequest {
            key: b"k3".to_vec(),
            ..Default::default()
        }),
        Command::Txn(txn(vec![get("k")], vec![put("k")])),
        Command::Txn(txn(vec![nested(vec![get("k")], vec![])], vec![])),
        Command::Compact(CompactionRequest {
            revision: rev,
            physical: false,
        }),
        Command::LeaseGrant { id: 0, ttl: 60 },
        Command::LeaseRevoke { id: 1 },
    ];
    for cmd in refused {
        assert_eq!(
            apply_one(&store, cmd.clone()).unwrap_err(),
            Error::CorruptCluster,
            "{cmd:?}"
        );
    }
    assert_eq!(
        apply_one(&store, Command::Put(PutRequest::default())).unwrap_err(),
        Error::EmptyKey
    );
    store
        .range(&RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })
        .unwrap();
    // A txn of ranges only is a read, as etcd serves it.
    apply_one(&store, Command::Txn(txn(vec![get("k")], vec![get("x")]))).unwrap();
    apply_one(&store, alarm(false, 3, AlarmType::Corrupt)).unwrap();
    apply_one(
        &store,
        Command::Put(PutRequest {
            key: b"k3".to_vec(),
            ..Default::default()
        }),
    )
    .unwrap();
}

/// Defragment rewrites the data file with only what is live: after compacting away the
/// history of one key written many times, the file is a fraction of its size.
#[test]
fn defragment_leaves_out_compacted_history() {
    let (_dir, store) = open();
    for i in 0..200 {
        let value = vec![b'a' + (i % 26) as u8; 4096];
        apply_one(
            &store,
            Command::Put(PutRequest {
                key: b"big".to_vec(),
                value,
                ..Default::default()
            }),
        )
        .unwrap();
    }
    let rev = store.revision();
    apply_one(
        &store,
        Command::Compact(CompactionRequest {
            revision: rev,
            physical: false,
        }),
    )
    .unwrap();
    let before = store.size_bytes();
    store.defragment().unwrap();
    let after = store.size_bytes();
    assert!(before > 200 * 4096, "{before}");
    assert!(
        after < 3 * 4096,
        "defragment left {after} of {before} bytes"
    );
    let got = store
        .range(&RangeRequest {
            key: b"big".to_vec(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(got.kvs[0].value, vec![b'a' + (199 % 26) as u8; 4096]);
}
