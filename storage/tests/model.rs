//! Property test: the durable [`Store`] against a deliberately naive in-memory model.
//!
//! The model keeps a full copy of the keyspace for every revision (`states[rev]`) and answers
//! every question by brute force over those copies; the store keeps history records and an
//! index. Random sequences of puts, deletes, txns (nested, with compares over ranges), lease
//! grants/revokes, compactions, ranges at past revisions and watch replays must give identical
//! responses, revisions, events and lease lists; at the end the store is reopened from disk and
//! compared again.
//!
//! Cases: `PROPTEST_CASES` (default 256 here; the largest run is recorded in
//! `docs/architecture.md`).

use std::collections::{BTreeMap, BTreeSet};

use eden_storage::*;
use proptest::prelude::*;

type Map = BTreeMap<Vec<u8>, KeyValue>;

#[derive(Debug, Clone, Default)]
struct Model {
    /// `states[r]` is the keyspace at revision r (`states[0]` is unused).
    states: Vec<Map>,
    /// `events[r]`: the events of revision r.
    events: Vec<Vec<Event>>,
    compacted: i64,
    leases: BTreeMap<i64, i64>,
    lease_seq: i64,
    alarms: BTreeSet<AlarmMember>,
}

fn in_range(key: &[u8], range_end: &[u8], k: &[u8]) -> bool {
    match range_end {
        [] => k == key,
        [0] => k >= key,
        end => k >= key && k < end,
    }
}

fn model_range(state: &Map, req: &RangeRequest) -> RangeResponse {
    let mut kvs: Vec<KeyValue> = state
        .values()
        .filter(|kv| in_range(&req.key, &req.range_end, &kv.key))
        .cloned()
        .collect();
    let count = kvs.len() as i64;
    if req.count_only {
        return RangeResponse {
            kvs: vec![],
            more: false,
            count,
        };
    }
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    if req.sort_order == SortOrder::None && !filtered && req.limit > 0 {
        kvs.truncate(req.limit as usize + 1);
    }
    kvs.retain(|kv| {
        (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
            && (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
            && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
            && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
    });
    let order = match (req.sort_target, req.sort_order) {
        (SortTarget::Key, o) => o,
        (_, SortOrder::None) => SortOrder::Ascend,
        (_, o) => o,
    };
    let sort_key = |kv: &KeyValue| -> (i64, Vec<u8>) {
        match req.sort_target {
            SortTarget::Key => (0, kv.key.clone()),
            SortTarget::Version => (kv.version, vec![]),
            SortTarget::Create => (kv.create_revision, vec![]),
            SortTarget::Mod => (kv.mod_revision, vec![]),
            SortTarget::Value => (0, kv.value.clone()),
        }
    };
    match order {
        SortOrder::Ascend => kvs.sort_by_key(sort_key),
        SortOrder::Descend => kvs.sort_by_key(|kv| std::cmp::Reverse(sort_key(kv))),
        SortOrder::None => {}
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        kvs.iter_mut().for_each(|kv| kv.value.clear());
    }
    RangeResponse { kvs, more, count }
}

/// Over-approximates etcd's duplicate check: some key is put twice in one branch (the two
/// branches of one nested txn excepted) or put and deleted.
fn naive_conflict(ops: &[RequestOp]) -> bool {
    fn collect(ops: &[RequestOp], puts: &mut Vec<Vec<u8>>, dels: &mut Vec<(Vec<u8>, Vec<u8>)>) {
        for op in ops {
            match op {
                RequestOp::Put(p) => puts.push(p.key.clone()),
                RequestOp::DeleteRange(d) => dels.push((d.key.clone(), d.range_end.clone())),
                RequestOp::Txn(t) => {
                    let mut then_puts = Vec::new();
                    collect(&t.success, &mut then_puts, dels);
                    let mut else_puts = Vec::new();
                    collect(&t.failure, &mut else_puts, dels);
                    for k in else_puts {
                        if !then_puts.contains(&k) {
                            then_puts.push(k);
                        }
                    }
                    puts.extend(then_puts);
                }
                RequestOp::Range(_) => {}
            }
        }
    }
    let nested_conflict = ops.iter().any(|op| match op {
        RequestOp::Txn(t) => naive_conflict(&t.success) || naive_conflict(&t.failure),
        _ => false,
    });
    let (mut puts, mut dels) = (Vec::new(), Vec::new());
    collect(ops, &mut puts, &mut dels);
    let mut sorted = puts.clone();
    sorted.sort();
    sorted.dedup();
    nested_conflict
        || sorted.len() != puts.len()
        || puts.iter().any(|k| {
            dels.iter().any(|(key, end)| {
                if end.is_empty() {
                    k == key
                } else {
                    key.as_slice() <= k.as_slice() && k.as_slice() < end.as_slice()
                }
            })
        })
}

struct Exec<'a> {
    model: &'a Model,
    work: Map,
    writes: Vec<(Vec<u8>, Option<KeyValue>)>,
}

impl Model {
    fn new() -> Self {
        Model {
            states: vec![Map::new(), Map::new()],
            events: vec![vec![], vec![]],
            compacted: -1,
            ..Default::default()
        }
    }
    fn rev(&self) -> i64 {
        self.states.len() as i64 - 1
    }
    fn capped(&self) -> bool {
        self.alarms.iter().any(|a| a.alarm == AlarmType::NoSpace)
    }
    fn corrupted(&self) -> bool {
        self.alarms.iter().any(|a| a.alarm == AlarmType::Corrupt)
    }
    fn current(&self) -> &Map {
        self.states.last().unwrap()
    }
    fn read_rev(&self, rev: i64) -> Result<i64, Error> {
        if rev <= 0 {
            Ok(self.rev())
        } else if rev > self.rev() {
            Err(Error::FutureRev)
        } else if rev < self.compacted {
            Err(Error::Compacted)
        } else {
            Ok(rev)
        }
    }
    fn range(&self, req: &RangeRequest) -> Result<RangeResponse, Error> {
        let rev = self.read_rev(req.revision)?;
        Ok(model_range(&self.states[rev as usize], req))
    }
    fn compare(&self, c: &Compare) -> bool {
        let kvs: Vec<&KeyValue> = self
            .current()
            .values()
            .filter(|kv| in_range(&c.key, &c.range_end, &kv.key))
            .collect();
        let zero = KeyValue::default();
        let check = |kv: &KeyValue| {
            let ord = match &c.target {
                CompareTarget::Value(v) => kv.value.cmp(v),
                CompareTarget::Version(n) => kv.version.cmp(n),
                CompareTarget::Create(n) => kv.create_revision.cmp(n),
                CompareTarget::Mod(n) => kv.mod_revision.cmp(n),
                CompareTarget::Lease(n) => kv.lease.cmp(n),
            };
            match c.result {
                CompareResult::Equal => ord.is_eq(),
                CompareResult::NotEqual => ord.is_ne(),
                CompareResult::Greater => ord.is_gt(),
                CompareResult::Less => ord.is_lt(),
            }
        };
        if kvs.is_empty() {
            return !matches!(c.target, CompareTarget::Value(_)) && check(&zero);
        }
        kvs.into_iter().all(check)
    }
    /// Pre-txn checks along the chosen path, puts first then ranges, as etcd does.
    fn check_path(&self, t: &TxnRequest, puts: bool) -> Result<(), Error> {
        let ops = if t.compare.iter().all(|c| self.compare(c)) {
            &t.success
        } else {
            &t.failure
        };
        for op in ops {
            match op {
                RequestOp::Put(p) if puts => {
                    if (p.ignore_value || p.ignore_lease) && !self.current().contains_key(&p.key) {
                        return Err(Error::KeyNotFound);
                    }
                    if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                        return Err(Error::LeaseNotFound);
                    }
                }
                RequestOp::Range(r) if !puts && r.revision != 0 => {
                    if r.revision > self.rev() {
                        return Err(Error::FutureRev);
                    }
                    if r.revision < self.compacted {
                        return Err(Error::Compacted);
                    }
                }
                RequestOp::Txn(inner) => self.check_path(inner, puts)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn apply(&mut self, cmd: &Command) -> Result<(Applied, Vec<Event>), Error> {
        self.apply_checked(cmd, true)
    }

    fn apply_checked(
        &mut self,
        cmd: &Command,
        conflicts: bool,
    ) -> Result<(Applied, Vec<Event>), Error> {
        if self.corrupted() {
            let read_only = |t: &TxnRequest| {
                t.success
                    .iter()
                    .chain(&t.failure)
                    .all(|op| matches!(op, RequestOp::Range(_)))
            };
            match cmd {
                Command::Alarm { .. } => {}
                Command::Txn(t) if read_only(t) => {}
                Command::Put(p) if p.key.is_empty() => return Err(Error::EmptyKey),
                Command::DeleteRange(d) if d.key.is_empty() => return Err(Error::EmptyKey),
                Command::Txn(t)
                    if conflicts && (naive_conflict(&t.success) || naive_conflict(&t.failure)) =>
                {
                    return Err(Error::DuplicateKey)
                }
                _ => return Err(Error::CorruptCluster),
            }
        }
        let mut exec = Exec {
            model: self,
            work: self.current().clone(),
            writes: vec![],
        };
        let response = match cmd {
            Command::Put(p) => {
                if p.key.is_empty() {
                    return Err(Error::EmptyKey);
                }
                if self.capped() {
                    return Err(Error::NoSpace);
                }
                if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                    return Err(Error::LeaseNotFound);
                }
                CommandResponse::Put(exec.put(p)?)
            }
            Command::DeleteRange(d) => CommandResponse::DeleteRange(exec.delete(d)),
            Command::Txn(t) => {
                let ops = t.compare.len().max(t.success.len()).max(t.failure.len());
                assert!(ops <= 128, "generator makes small txns");
                let conflict = |ops: &[RequestOp]| naive_conflict(ops);
                if conflicts && (conflict(&t.success) || conflict(&t.failure)) {
                    // etcd's exact rule is order-dependent; the store must either reject with
                    // DuplicateKey or accept, and the test checks the response it gave.
                    return Err(Error::DuplicateKey);
                }
                let puts = |ops: &[RequestOp]| ops.iter().any(|o| matches!(o, RequestOp::Put(_)));
                if self.capped() && (puts(&t.success) || puts(&t.failure)) {
                    return Err(Error::NoSpace);
                }
                self.check_path(t, true)?;
                self.check_path(t, false)?;
                CommandResponse::Txn(exec.txn(t)?)
            }
            Command::Compact(c) => {
                if c.revision <= self.compacted {
                    return Err(Error::Compacted);
                }
                if c.revision > self.rev() {
                    return Err(Error::FutureRev);
                }
                self.compacted = c.revision;
                // What survives of revision C's events: each key's last change there, if it is
                // a put, and without prev_kv (etcd reads it at C-1, which is now compacted).
                if c.revision >= 1 {
                    let evs = &mut self.events[c.revision as usize];
                    let mut kept: Vec<Event> = Vec::new();
                    for (i, e) in evs.iter().enumerate() {
                        let last = !evs[i + 1..].iter().any(|later| later.kv.key == e.kv.key);
                        if last && e.kind == EventKind::Put {
                            kept.push(Event {
                                prev_kv: None,
                                ..e.clone()
                            });
                        }
                    }
                    *evs = kept;
                }
                return Ok((
                    Applied {
                        revision: self.rev(),
                        response: CommandResponse::Compact,
                    },
                    vec![],
                ));
            }
            Command::LeaseGrant { id, ttl } => {
                if self.capped() {
                    return Err(Error::NoSpace);
                }
                let id = if *id == 0 {
                    let mut n = self.lease_seq + 1;
                    while self.leases.contains_key(&n) {
                        n += 1;
                    }
                    self.lease_seq = n;
                    n
                } else if self.leases.contains_key(id) {
                    return Err(Error::LeaseExists);
                } else {
                    *id
                };
                self.leases.insert(id, *ttl);
                let response = CommandResponse::LeaseGrant { id, ttl: *ttl };
                return Ok((
                    Applied {
                        revision: self.rev(),
                        response,
                    },
                    vec![],
                ));
            }
            Command::Alarm {
                activate,
                member,
                alarm,
            } => {
                let a = AlarmMember {
                    member: *member,
                    alarm: *alarm,
                };
                let changed = if *activate {
                    self.alarms.insert(a);
                    vec![a]
                } else if self.alarms.remove(&a) {
                    vec![a]
                } else {
                    vec![]
                };
                return Ok((
                    Applied {
                        revision: self.rev(),
                        response: CommandResponse::Alarm(changed),
                    },
                    vec![],
                ));
            }
            Command::LeaseRevoke { id } => {
                if !self.leases.contains_key(id) {
                    return Err(Error::LeaseNotFound);
                }
                let keys: Vec<Vec<u8>> = self
                    .current()
                    .values()
                    .filter(|kv| kv.lease == *id)
                    .map(|kv| kv.key.clone())
                    .collect();
                for key in keys {
                    exec.delete(&DeleteRangeRequest {
                        key,
                        ..Default::default()
                    });
                }
                CommandResponse::LeaseRevoke
            }
        };
        let Exec { work, writes, .. } = exec;
        if let Command::LeaseRevoke { id } = cmd {
            self.leases.remove(id);
        }
        if writes.is_empty() {
            return Ok((
                Applied {
                    revision: self.rev(),
                    response,
                },
                vec![],
            ));
        }
        let rev = self.rev() + 1;
        let before = self.current().clone();
        let events: Vec<Event> = writes
            .into_iter()
            .map(|(key, kv)| {
                let prev = before.get(&key).cloned();
                match kv {
                    Some(kv) => Event {
                        kind: EventKind::Put,
                        prev_kv: if kv.create_revision == kv.mod_revision {
                            None
                        } else {
                            prev
                        },
                        kv,
                    },
                    None => Event {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            key,
                            mod_revision: rev,
                            ..Default::default()
                        },
                        prev_kv: prev,
                    },
                }
            })
            .collect();
        self.states.push(work);
        self.events.push(events.clone());
        Ok((
            Applied {
                revision: rev,
                response,
            },
            events,
        ))
    }

    fn lease_list(&self) -> Vec<Lease> {
        self.leases
            .iter()
            .map(|(&id, &ttl)| Lease {
                id,
                ttl,
                keys: self
                    .current()
                    .values()
                    .filter(|kv| kv.lease == id)
                    .map(|kv| kv.key.clone())
                    .collect(),
            })
            .collect()
    }
}

impl Exec<'_> {
    fn rev(&self) -> i64 {
        self.model.rev() + 1
    }
    fn put(&mut self, p: &PutRequest) -> Result<PutResponse, Error> {
        let prev = self.work.get(&p.key).cloned();
        if (p.ignore_value || p.ignore_lease) && prev.is_none() {
            return Err(Error::KeyNotFound);
        }
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: prev.as_ref().map_or(self.rev(), |kv| kv.create_revision),
            mod_revision: self.rev(),
            version: prev.as_ref().map_or(0, |kv| kv.version) + 1,
            value: if p.ignore_value {
                prev.as_ref().unwrap().value.clone()
            } else {
                p.value.clone()
            },
            lease: if p.ignore_lease {
                prev.as_ref().unwrap().lease
            } else {
                p.lease
            },
        };
        self.work.insert(p.key.clone(), kv.clone());
        self.writes.push((p.key.clone(), Some(kv)));
        Ok(PutResponse {
            prev_kv: prev.filter(|_| p.prev_kv),
        })
    }
    fn delete(&mut self, d: &DeleteRangeRequest) -> DeleteRangeResponse {
        let gone: Vec<KeyValue> = self
            .work
            .values()
            .filter(|kv| in_range(&d.key, &d.range_end, &kv.key))
            .cloned()
            .collect();
        for kv in &gone {
            self.work.remove(&kv.key);
            self.writes.push((kv.key.clone(), None));
        }
        DeleteRangeResponse {
            deleted: gone.len() as i64,
            prev_kvs: if d.prev_kv { gone } else { vec![] },
        }
    }
    fn txn(&mut self, t: &TxnRequest) -> Result<TxnResponse, Error> {
        // Compares of nested txns see the state before the outer txn.
        let succeeded = t.compare.iter().all(|c| self.model.compare(c));
        let mut responses = vec![];
        for op in if succeeded { &t.success } else { &t.failure } {
            responses.push(match op {
                RequestOp::Range(r) if r.revision > 0 => ResponseOp::Range(self.model.range(r)?),
                RequestOp::Range(r) => ResponseOp::Range(model_range(&self.work, r)),
                RequestOp::Put(p) => ResponseOp::Put(self.put(p)?),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(self.delete(d)),
                RequestOp::Txn(inner) => ResponseOp::Txn(self.txn(inner)?),
            });
        }
        Ok(TxnResponse {
            succeeded,
            responses,
        })
    }
}

// ---- generators --------------------------------------------------------------------------

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"a".to_vec()),
        Just(b"b".to_vec()),
        Just(b"ba".to_vec()),
        Just(b"c".to_vec()),
        Just(b"d".to_vec())
    ]
}

fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![3 => Just(vec![]), 1 => Just(vec![0]), 1 => Just(b"c".to_vec()), 1 => Just(b"bb".to_vec()), 1 => Just(b"e".to_vec())]
}

fn put_req() -> impl Strategy<Value = PutRequest> {
    (
        key(),
        prop_oneof![Just(b"".to_vec()), Just(b"x".to_vec()), Just(b"y".to_vec())],
        0..3i64,
        any::<bool>(),
        0..6u8,
    )
        .prop_map(|(key, value, lease, prev_kv, flags)| {
            let ignore_value = flags == 4;
            let ignore_lease = flags == 5;
            PutRequest {
                key,
                value: if ignore_value { vec![] } else { value },
                lease: if ignore_lease { 0 } else { lease },
                prev_kv,
                ignore_value,
                ignore_lease,
            }
        })
}

fn range_req() -> impl Strategy<Value = RangeRequest> {
    (
        key(),
        range_end(),
        0..3i64,
        0..12i64,
        (0..3u8, 0..5u8),
        (any::<bool>(), any::<bool>()),
        (0..6i64, 0..12i64, 0..6i64, 0..12i64),
    )
        .prop_map(
            |(key, range_end, limit, revision, (o, t), (keys_only, count_only), (a, b, c, d))| {
                let filters = revision % 3 == 0;
                RangeRequest {
                    key,
                    range_end,
                    limit,
                    revision: revision - 1,
                    sort_order: [SortOrder::None, SortOrder::Ascend, SortOrder::Descend]
                        [o as usize],
                    sort_target: [
                        SortTarget::Key,
                        SortTarget::Version,
                        SortTarget::Create,
                        SortTarget::Mod,
                        SortTarget::Value,
                    ][t as usize],
                    keys_only,
                    count_only: count_only && limit == 2,
                    min_mod_revision: if filters { a } else { 0 },
                    max_mod_revision: if filters { b } else { 0 },
                    min_create_revision: if filters { c } else { 0 },
                    max_create_revision: if filters { d } else { 0 },
                }
            },
        )
}

fn del_req() -> impl Strategy<Value = DeleteRangeRequest> {
    (key(), range_end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    })
}

fn compare() -> impl Strategy<Value = Compare> {
    (
        key(),
        range_end(),
        0..4u8,
        0..5u8,
        0..4i64,
        prop_oneof![Just(b"x".to_vec()), Just(b"y".to_vec()), Just(vec![])],
    )
        .prop_map(|(key, range_end, r, t, n, v)| Compare {
            result: [
                CompareResult::Equal,
                CompareResult::Greater,
                CompareResult::Less,
                CompareResult::NotEqual,
            ][r as usize],
            target: match t {
                0 => CompareTarget::Version(n),
                1 => CompareTarget::Create(n),
                2 => CompareTarget::Mod(n),
                3 => CompareTarget::Value(v),
                _ => CompareTarget::Lease(n),
            },
            key,
            range_end,
        })
}

fn leaf_op() -> impl Strategy<Value = RequestOp> {
    prop_oneof![
        2 => put_req().prop_map(RequestOp::Put),
        2 => range_req().prop_map(RequestOp::Range),
        1 => del_req().prop_map(RequestOp::DeleteRange),
    ]
}

fn txn_req(depth: u32) -> BoxedStrategy<TxnRequest> {
    let op = if depth == 0 {
        leaf_op().boxed()
    } else {
        prop_oneof![4 => leaf_op(), 1 => txn_req(depth - 1).prop_map(RequestOp::Txn)].boxed()
    };
    (
        prop::collection::vec(compare(), 0..3),
        prop::collection::vec(op.clone(), 0..4),
        prop::collection::vec(op, 0..3),
    )
        .prop_map(|(compare, success, failure)| TxnRequest {
            compare,
            success,
            failure,
        })
        .boxed()
}

#[derive(Debug, Clone)]
enum Step {
    Apply(Vec<Command>),
    Range(RangeRequest),
    Events(i64),
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        4 => put_req().prop_map(Command::Put),
        2 => del_req().prop_map(Command::DeleteRange),
        4 => txn_req(1).prop_map(Command::Txn),
        1 => (-1..14i64).prop_map(|revision| Command::Compact(CompactionRequest { revision, physical: false })),
        1 => (0..3i64, 1..100i64).prop_map(|(id, ttl)| Command::LeaseGrant { id, ttl }),
        1 => (0..3i64).prop_map(|id| Command::LeaseRevoke { id }),
        1 => (any::<bool>(), 0..2u64, prop_oneof![Just(AlarmType::NoSpace), Just(AlarmType::Corrupt)])
            .prop_map(|(activate, member, alarm)| Command::Alarm { activate, member, alarm }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => prop::collection::vec(command(), 1..4).prop_map(Step::Apply),
        3 => range_req().prop_map(Step::Range),
        1 => (0..16i64).prop_map(Step::Events),
    ]
}

fn check_reads(store: &Store, model: &Model, probes: &[RangeRequest]) {
    assert_eq!(store.revision(), model.rev());
    assert_eq!(store.compact_revision(), model.compacted);
    assert_eq!(store.leases(), model.lease_list());
    for probe in probes {
        assert_eq!(store.range(probe), model.range(probe), "range {probe:?}");
    }
}

fn model_events(model: &Model, from: i64) -> Result<Vec<(i64, Vec<Event>)>, Error> {
    if from < model.compacted {
        return Err(Error::Compacted);
    }
    Ok((from.max(1)..=model.rev())
        .filter(|&r| !model.events[r as usize].is_empty())
        .map(|r| (r, model.events[r as usize].clone()))
        .collect())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(steps in prop::collection::vec(step(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut model = Model::new();
        for step in &steps {
            match step {
                Step::Apply(cmds) => {
                    let got = store.apply(cmds, &[]).unwrap();
                    for (cmd, got) in cmds.iter().zip(got) {
                        let want = model.apply(cmd);
                        match (&want, &got) {
                            // The naive conflict check over-approximates etcd's order-dependent
                            // one: where they disagree, the model runs the txn without it.
                            (Err(Error::DuplicateKey), got) if !matches!(got, Err(Error::DuplicateKey)) => {
                                let want = model.apply_checked(cmd, false);
                                prop_assert_eq!(got, &want, "command {:?}", cmd);
                            }
                            _ => prop_assert_eq!(&got, &want, "command {:?}", cmd),
                        }
                    }
                }
                Step::Range(req) => prop_assert_eq!(store.range(req), model.range(req)),
                Step::Events(from) => {
                    prop_assert_eq!(store.events(*from, 100), model_events(&model, *from));
                    // One watcher's view: puts to keys below "c" only, without previous values.
                    let wanted = |kind: EventKind, key: &[u8]| kind == EventKind::Put && key < &b"c"[..];
                    let want = model_events(&model, *from).map(|revs| {
                        revs.into_iter()
                            .filter_map(|(rev, evs)| {
                                let evs: Vec<Event> = evs
                                    .into_iter()
                                    .filter(|e| wanted(e.kind, &e.kv.key))
                                    .map(|e| Event { prev_kv: None, ..e })
                                    .collect();
                                (!evs.is_empty()).then_some((rev, evs))
                            })
                            .collect::<Vec<_>>()
                    });
                    prop_assert_eq!(store.events_matching(*from, 100, wanted, false), want);
                }
            }
        }
        let probes: Vec<RangeRequest> = (0..=model.rev() + 1)
            .map(|revision| RangeRequest { key: vec![0], range_end: vec![0], revision, ..Default::default() })
            .collect();
        check_reads(&store, &model, &probes);
        store.flush().unwrap();
        drop(store);
        let reopened = Store::open(dir.path()).unwrap();
        check_reads(&reopened, &model, &probes);
        prop_assert_eq!(reopened.alarms(), model.alarms.iter().copied().collect::<Vec<_>>());
        for from in model.compacted + 1..=model.rev() {
            prop_assert_eq!(reopened.events(from, 100), model_events(&model, from));
        }
    }
}
