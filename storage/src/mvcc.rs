//! The keyspace semantics, as plain functions over an in-memory index and a record source.
//!
//! This module owns *what* every command and read means; `store.rs` owns *where* the bytes go.
//! It never touches a disk, a clock or a random source: [`Keyspace::apply`] is deterministic,
//! which is what lets every Raft replica apply the same log to the same state.
//!
//! ## The model (etcd's)
//! - The store has a revision, 1 when empty. A command that changes keys adds exactly 1, and
//!   all its changes share that main revision, told apart by a `sub` number ([`RevKey`]).
//!   A command that changes nothing (a delete matching no key, a read-only txn, a lease grant,
//!   a compaction) adds none.
//! - History is a list of [`Record`]s keyed by [`RevKey`]: a put holds the full key-value as of
//!   that revision, a delete holds a tombstone. Records are never rewritten, only dropped by
//!   compaction.
//! - The index maps each key to the list of its changes ([`Entry`]), oldest first. Reading key
//!   `k` at revision `r` means: the newest entry of `k` at or below `r`; if it is a tombstone or
//!   there is none, the key does not exist at `r`. The index is rebuilt from history on open.
//! - The compacted revision is -1 until the first compaction, as in etcd (so `Compact(0)` is
//!   accepted once on a fresh store).
//! - Compaction at `c` keeps, for every key, only the newest entry at or below `c` (and drops it
//!   too if it is a tombstone) plus everything above `c`. Reads at `r >= c` are unaffected.
//!
//! ## Txn, the etcd way
//! Validation first (op count, empty keys, duplicate puts), then the compares of the txn *and of
//! every nested txn on the chosen path* are evaluated against the state before the txn, then
//! puts and ranges on the path are checked against that same state, and only then are the ops
//! run in order, each seeing the writes of the ones before it. Any failure discards everything.
//!
//! ## Not here
//! TTLs and deadlines (the leader issues `LeaseRevoke`), watch fan-out, gRPC error codes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::codec::{Record, RevKey};
use crate::error::{Error, MAX_LEASE_TTL, MAX_TXN_OPS};
use crate::types::*;

/// Where records come from: the tree plus the batch being written, or a map in tests.
pub trait RecordRead {
    fn record(&self, at: RevKey) -> Result<Record, Error>;
}

/// Where a command's durable effects go. Calls happen only for commands that succeed.
pub trait RecordSink: RecordRead {
    fn insert_record(&mut self, at: RevKey, rec: &Record);
    fn remove_record(&mut self, at: RevKey);
    fn put_lease(&mut self, id: LeaseId, ttl: i64);
    fn remove_lease(&mut self, id: LeaseId);
    fn put_alarm(&mut self, alarm: AlarmMember);
    fn remove_alarm(&mut self, alarm: AlarmMember);
}

/// One change of one key, as the index remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub at: RevKey,
    pub tombstone: bool,
    /// The lease of the key after this change (0 for a tombstone).
    pub lease: LeaseId,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct LeaseState {
    ttl: i64,
    keys: BTreeSet<Vec<u8>>,
}

/// The in-memory part of the store: index, revisions and leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    index: BTreeMap<Vec<u8>, Vec<Entry>>,
    revision: Revision,
    compacted: Revision,
    leases: BTreeMap<LeaseId, LeaseState>,
    lease_seq: i64,
    alarms: BTreeSet<AlarmMember>,
}

impl Default for Keyspace {
    fn default() -> Self {
        Keyspace {
            index: BTreeMap::new(),
            revision: 1,
            compacted: -1,
            leases: BTreeMap::new(),
            lease_seq: 0,
            alarms: BTreeSet::new(),
        }
    }
}

/// The key set a request names, decoded from etcd's `key`/`range_end` convention.
#[derive(Debug, Clone, Copy)]
enum KeySet<'a> {
    Single(&'a [u8]),
    /// `[from, to)`; empty when `to <= from`.
    Span(&'a [u8], &'a [u8]),
    /// Every key `>= from` (`range_end == "\0"`).
    From(&'a [u8]),
}

impl<'a> KeySet<'a> {
    fn new(key: &'a [u8], range_end: &'a [u8]) -> Self {
        match range_end {
            [] => KeySet::Single(key),
            [0] => KeySet::From(key),
            end => KeySet::Span(key, end),
        }
    }
    fn contains(&self, k: &[u8]) -> bool {
        match *self {
            KeySet::Single(key) => k == key,
            KeySet::Span(from, to) => from <= k && k < to,
            KeySet::From(from) => from <= k,
        }
    }
}

/// Where the value of a range candidate lives.
#[derive(Debug, Clone)]
enum Source {
    Stored(RevKey),
    Pending(KeyValue),
}

fn load(recs: &impl RecordRead, key: &[u8], src: &Source) -> Result<KeyValue, Error> {
    match src {
        Source::Pending(kv) => Ok(kv.clone()),
        Source::Stored(at) => {
            let rec = recs.record(*at)?;
            if rec.kind != EventKind::Put || rec.kv.key != key {
                return Err(Error::Corrupt(format!(
                    "index points at revision {}/{} for key {:?}, which holds something else",
                    at.main,
                    at.sub,
                    String::from_utf8_lossy(key)
                )));
            }
            Ok(rec.kv)
        }
    }
}

/// The live entry of a key at `rev`, if the key exists then.
fn live_at(entries: &[Entry], rev: Revision) -> Option<&Entry> {
    let n = entries.partition_point(|e| e.at.main <= rev);
    entries[..n].last().filter(|e| !e.tombstone)
}

/// The effects of one command, computed before anything is changed.
struct Outcome {
    response: CommandResponse,
    /// The changes, in `sub` order: a put (`Some`) or a delete (`None`) of a key.
    writes: Vec<(Vec<u8>, Option<KeyValue>)>,
    /// Keys whose state before the command the view already read (see `TxnView::before`).
    before: HashMap<Vec<u8>, Option<KeyValue>>,
}

/// A txn in progress: the state before it plus its own writes so far.
struct TxnView<'a, R: RecordRead> {
    ks: &'a Keyspace,
    recs: &'a R,
    pending: BTreeMap<Vec<u8>, Option<KeyValue>>,
    writes: Vec<(Vec<u8>, Option<KeyValue>)>,
    /// The state before this command of the keys a put read it for, kept so that `commit`
    /// need not read them again for the events' `prev_kv`.
    before: HashMap<Vec<u8>, Option<KeyValue>>,
}

/// Which way each txn on the chosen path went: the outer one, then its nested txns in op order.
struct Path {
    succeeded: bool,
    nested: Vec<Path>,
}

impl Keyspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the in-memory state from what is on disk. `history` must come in revision order.
    pub fn load(
        revision: Revision,
        compacted: Revision,
        lease_seq: i64,
        leases: impl IntoIterator<Item = (LeaseId, i64)>,
        alarms: impl IntoIterator<Item = AlarmMember>,
        history: impl IntoIterator<Item = Result<(RevKey, Record), Error>>,
    ) -> Result<Keyspace, Error> {
        let mut ks = Keyspace {
            revision: revision.max(1),
            compacted,
            lease_seq,
            alarms: alarms.into_iter().collect(),
            leases: leases
                .into_iter()
                .map(|(id, ttl)| {
                    (
                        id,
                        LeaseState {
                            ttl,
                            keys: BTreeSet::new(),
                        },
                    )
                })
                .collect(),
            index: BTreeMap::new(),
        };
        for item in history {
            let (at, rec) = item?;
            if at.main > ks.revision {
                return Err(Error::Corrupt(format!(
                    "history holds revision {} above the stored current revision {}",
                    at.main, ks.revision
                )));
            }
            let entries = ks.index.entry(rec.kv.key.clone()).or_default();
            if entries.last().is_some_and(|e| e.at >= at) {
                return Err(Error::Corrupt(format!(
                    "history out of order at revision {}",
                    at.main
                )));
            }
            let tombstone = rec.kind == EventKind::Delete;
            entries.push(Entry {
                at,
                tombstone,
                lease: if tombstone { 0 } else { rec.kv.lease },
            });
        }
        for (key, entries) in &ks.index {
            if let Some(e) = entries.last().filter(|e| !e.tombstone && e.lease != 0) {
                if let Some(l) = ks.leases.get_mut(&e.lease) {
                    l.keys.insert(key.clone());
                }
            }
        }
        Ok(ks)
    }

    pub fn revision(&self) -> Revision {
        self.revision
    }

    pub fn compact_revision(&self) -> Revision {
        self.compacted
    }

    /// The raised alarms, by member then type.
    pub fn alarms(&self) -> Vec<AlarmMember> {
        self.alarms.iter().copied().collect()
    }

    /// Whether writes are refused: some member's store reached its quota.
    pub fn capped(&self) -> bool {
        self.alarms.iter().any(|a| a.alarm == AlarmType::NoSpace)
    }

    /// Whether every change is refused: a member's store was found to differ from the
    /// leader's (a CORRUPT alarm), so nothing more is written until an operator repairs it.
    pub fn corrupted(&self) -> bool {
        self.alarms.iter().any(|a| a.alarm == AlarmType::Corrupt)
    }

    /// The counter behind generated lease ids; persisted so ids never repeat.
    pub fn lease_seq(&self) -> i64 {
        self.lease_seq
    }

    pub fn lease(&self, id: LeaseId) -> Option<Lease> {
        self.leases.get(&id).map(|l| Lease {
            id,
            ttl: l.ttl,
            keys: l.keys.iter().cloned().collect(),
        })
    }

    /// Every lease's id and granted TTL, without its keys.
    pub fn lease_ttls(&self) -> Vec<(LeaseId, i64)> {
        self.leases.iter().map(|(&id, l)| (id, l.ttl)).collect()
    }

    pub fn leases(&self) -> Vec<Lease> {
        self.leases
            .iter()
            .map(|(&id, l)| Lease {
                id,
                ttl: l.ttl,
                keys: l.keys.iter().cloned().collect(),
            })
            .collect()
    }

    /// Checks a read revision against the retained window; 0 (or less) means current.
    pub fn check_read_revision(&self, rev: Revision) -> Result<Revision, Error> {
        if rev <= 0 {
            return Ok(self.revision);
        }
        if rev > self.revision {
            return Err(Error::FutureRev);
        }
        if rev < self.compacted {
            return Err(Error::Compacted);
        }
        Ok(rev)
    }

    /// The keys of `set` alive at `rev`, in key order, with where their values are.
    fn slots(&self, set: KeySet<'_>, rev: Revision) -> Vec<(Vec<u8>, Source)> {
        self.live(set, rev)
            .map(|(k, e)| (k.clone(), Source::Stored(e.at)))
            .collect()
    }

    /// The keys of `set` alive at `rev` with their live entries, in key order, without copying.
    fn live<'s>(
        &'s self,
        set: KeySet<'s>,
        rev: Revision,
    ) -> Box<dyn Iterator<Item = (&'s Vec<u8>, &'s Entry)> + 's> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let live = move |(k, es): (&'s Vec<u8>, &'s Vec<Entry>)| live_at(es, rev).map(|e| (k, e));
        match set {
            KeySet::Single(key) => {
                Box::new(self.index.get_key_value(key).and_then(live).into_iter())
            }
            KeySet::Span(from, to) if to <= from => Box::new(std::iter::empty()),
            KeySet::Span(from, to) => Box::new(
                self.index
                    .range::<[u8], _>((Included(from), Excluded(to)))
                    .filter_map(live),
            ),
            KeySet::From(from) => Box::new(
                self.index
                    .range::<[u8], _>((Included(from), Unbounded))
                    .filter_map(live),
            ),
        }
    }

    /// The current value of one key.
    pub fn get(&self, recs: &impl RecordRead, key: &[u8]) -> Result<Option<KeyValue>, Error> {
        match self
            .index
            .get(key)
            .and_then(|es| live_at(es, self.revision))
        {
            Some(e) => load(recs, key, &Source::Stored(e.at)).map(Some),
            None => Ok(None),
        }
    }

    /// etcd's Range.
    pub fn range(
        &self,
        recs: &impl RecordRead,
        req: &RangeRequest,
    ) -> Result<RangeResponse, Error> {
        if req.key.is_empty() {
            return Err(Error::EmptyKey);
        }
        let rev = self.check_read_revision(req.revision)?;
        let set = KeySet::new(&req.key, &req.range_end);
        let count = self.live(set, rev).count();
        // Copy out only the keys finish_range will load.
        let wanted = if req.count_only {
            0
        } else if req.limit > 0 && !needs_all(req) {
            req.limit as usize + 1
        } else {
            count
        };
        let slots = self
            .live(set, rev)
            .take(wanted)
            .map(|(k, e)| (k.clone(), Source::Stored(e.at)))
            .collect();
        finish_range(recs, req, count as i64, slots)
    }

    /// A watch event's `prev_kv`, as etcd computes it: the key at the revision before the
    /// event's (not merely before the event's `sub`). The caller leaves it out for a create.
    pub fn prev_kv(
        &self,
        recs: &impl RecordRead,
        key: &[u8],
        at: RevKey,
    ) -> Result<Option<KeyValue>, Error> {
        let Some(entries) = self.index.get(key) else {
            return Ok(None);
        };
        let n = entries.partition_point(|e| e.at.main < at.main);
        match entries[..n].last() {
            Some(e) if !e.tombstone => load(recs, key, &Source::Stored(e.at)).map(Some),
            _ => Ok(None),
        }
    }

    /// Applies one command. On `Err` nothing changed (neither this value nor the sink). On `Ok`
    /// the effects went to `sink` and the events of the new revision (if any) are returned.
    pub fn apply(
        &mut self,
        sink: &mut impl RecordSink,
        cmd: &Command,
    ) -> Result<(Applied, Vec<Event>), Error> {
        if self.corrupted() {
            // etcd's corrupt applier refuses every change; only alarms go through (so the
            // alarm can be cleared). The request's own validation comes first, as in etcd.
            match cmd {
                Command::Alarm { .. } => {}
                Command::Put(p) => {
                    check_put(p)?;
                    return Err(Error::CorruptCluster);
                }
                Command::DeleteRange(d) if d.key.is_empty() => return Err(Error::EmptyKey),
                // etcd serves a txn of ranges only without its applier: it goes through.
                Command::Txn(t) if is_read_only(t) => {}
                Command::Txn(t) => {
                    validate_txn(t)?;
                    return Err(Error::CorruptCluster);
                }
                _ => return Err(Error::CorruptCluster),
            }
        }
        match cmd {
            Command::Put(p) => {
                check_put(p)?;
                if self.capped() {
                    return Err(Error::NoSpace);
                }
                if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                    return Err(Error::LeaseNotFound);
                }
                let mut view = TxnView::new(self, sink);
                let resp = view.put(p)?;
                let outcome = view.finish(CommandResponse::Put(resp));
                self.commit(sink, outcome)
            }
            Command::DeleteRange(d) => {
                if d.key.is_empty() {
                    return Err(Error::EmptyKey);
                }
                let mut view = TxnView::new(self, sink);
                let resp = view.delete(d)?;
                let outcome = view.finish(CommandResponse::DeleteRange(resp));
                self.commit(sink, outcome)
            }
            Command::Txn(t) => {
                let outcome = self.plan_txn(sink, t)?;
                self.commit(sink, outcome)
            }
            Command::Compact(c) => {
                if c.revision <= self.compacted {
                    return Err(Error::Compacted);
                }
                if c.revision > self.revision {
                    return Err(Error::FutureRev);
                }
                self.compact(sink, c.revision);
                let applied = Applied {
                    revision: self.revision,
                    response: CommandResponse::Compact,
                };
                Ok((applied, Vec::new()))
            }
            Command::LeaseGrant { id, ttl } => {
                if self.capped() {
                    return Err(Error::NoSpace);
                }
                if *ttl > MAX_LEASE_TTL {
                    return Err(Error::LeaseTtlTooLarge);
                }
                let id = if *id == 0 {
                    // Deterministic: the next unused number. etcd draws ids from its request-id
                    // generator; any id is valid as long as every replica picks the same one.
                    let mut next = self.lease_seq + 1;
                    while next == 0 || self.leases.contains_key(&next) {
                        next = next.wrapping_add(1);
                    }
                    self.lease_seq = next;
                    next
                } else if self.leases.contains_key(id) {
                    return Err(Error::LeaseExists);
                } else {
                    *id
                };
                self.leases.insert(
                    id,
                    LeaseState {
                        ttl: *ttl,
                        keys: BTreeSet::new(),
                    },
                );
                sink.put_lease(id, *ttl);
                let response = CommandResponse::LeaseGrant { id, ttl: *ttl };
                Ok((
                    Applied {
                        revision: self.revision,
                        response,
                    },
                    Vec::new(),
                ))
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
                    if self.alarms.insert(a) {
                        sink.put_alarm(a);
                    }
                    vec![a]
                } else if self.alarms.remove(&a) {
                    sink.remove_alarm(a);
                    vec![a]
                } else {
                    Vec::new()
                };
                let applied = Applied {
                    revision: self.revision,
                    response: CommandResponse::Alarm(changed),
                };
                Ok((applied, Vec::new()))
            }
            Command::LeaseRevoke { id } => {
                let Some(lease) = self.leases.get(id) else {
                    return Err(Error::LeaseNotFound);
                };
                let keys: Vec<Vec<u8>> = lease.keys.iter().cloned().collect();
                let mut view = TxnView::new(self, sink);
                for key in keys {
                    view.delete(&DeleteRangeRequest {
                        key,
                        range_end: Vec::new(),
                        prev_kv: false,
                    })?;
                }
                let outcome = view.finish(CommandResponse::LeaseRevoke);
                let result = self.commit(sink, outcome)?;
                self.leases.remove(id);
                sink.remove_lease(*id);
                Ok(result)
            }
        }
    }

    /// Validates a txn and runs it against a view, without changing anything.
    fn plan_txn(&self, recs: &impl RecordRead, t: &TxnRequest) -> Result<Outcome, Error> {
        validate_txn(t)?;
        // etcd's capped applier looks at the txn's own puts only, not at nested txns'.
        let puts = |ops: &[RequestOp]| ops.iter().any(|op| matches!(op, RequestOp::Put(_)));
        if self.capped() && (puts(&t.success) || puts(&t.failure)) {
            return Err(Error::NoSpace);
        }
        let path = self.eval_path(recs, t)?;
        self.check_path(recs, t, &path, true)?;
        self.check_path(recs, t, &path, false)?;
        let mut view = TxnView::new(self, recs);
        let resp = view.txn(t, &path)?;
        Ok(view.finish(CommandResponse::Txn(resp)))
    }

    /// Evaluates the compares of `t` and of every nested txn on the chosen path, all against the
    /// state before the txn (etcd's `compareToPath`).
    fn eval_path(&self, recs: &impl RecordRead, t: &TxnRequest) -> Result<Path, Error> {
        let mut succeeded = true;
        for c in &t.compare {
            if !self.compare(recs, c)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { &t.success } else { &t.failure };
        let mut nested = Vec::new();
        for op in ops {
            if let RequestOp::Txn(inner) = op {
                nested.push(self.eval_path(recs, inner)?);
            }
        }
        Ok(Path { succeeded, nested })
    }

    fn compare(&self, recs: &impl RecordRead, c: &Compare) -> Result<bool, Error> {
        let slots = self.slots(KeySet::new(&c.key, &c.range_end), self.revision);
        if slots.is_empty() {
            // etcd: a value compare on a missing key always fails; the others compare against
            // a zero key-value.
            if matches!(c.target, CompareTarget::Value(_)) {
                return Ok(false);
            }
            return Ok(compare_kv(c, &KeyValue::default()));
        }
        for (key, src) in &slots {
            if !compare_kv(c, &load(recs, key, src)?) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// etcd's `checkRequests`: puts on the path (lease exists; with ignore_* the key exists) or
    /// ranges on the path (revision retained), against the state before the txn.
    fn check_path(
        &self,
        recs: &impl RecordRead,
        t: &TxnRequest,
        path: &Path,
        puts: bool,
    ) -> Result<(), Error> {
        let ops = if path.succeeded {
            &t.success
        } else {
            &t.failure
        };
        let mut nested = path.nested.iter();
        for op in ops {
            match op {
                RequestOp::Put(p) if puts => {
                    if (p.ignore_value || p.ignore_lease) && self.get(recs, &p.key)?.is_none() {
                        return Err(Error::KeyNotFound);
                    }
                    if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                        return Err(Error::LeaseNotFound);
                    }
                }
                RequestOp::Range(r) if !puts && r.revision != 0 => {
                    if r.revision > self.revision {
                        return Err(Error::FutureRev);
                    }
                    // Unlike a plain range, a negative revision here is compared with the
                    // compacted revision as is (etcd's checkRequestRange): fine on a store
                    // never compacted (-1), ErrCompacted after any compaction.
                    if r.revision < self.compacted {
                        return Err(Error::Compacted);
                    }
                }
                RequestOp::Txn(inner) => {
                    let p = nested.next().expect("one path per nested txn");
                    self.check_path(recs, inner, p, puts)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Records a successful command: one new revision if it wrote anything.
    fn commit(
        &mut self,
        sink: &mut impl RecordSink,
        outcome: Outcome,
    ) -> Result<(Applied, Vec<Event>), Error> {
        let Outcome {
            response,
            writes,
            mut before,
        } = outcome;
        if writes.is_empty() {
            return Ok((
                Applied {
                    revision: self.revision,
                    response,
                },
                Vec::new(),
            ));
        }
        let rev = self.revision + 1;
        let mut events = Vec::with_capacity(writes.len());
        // prev_kv of an event is the key as of the previous revision, as etcd's watch reads it.
        for (key, _) in &writes {
            let prev = match before.remove(key) {
                Some(prev) => prev,
                None => self.get(sink, key)?,
            };
            events.push(prev);
        }
        let events: Vec<Event> = writes
            .iter()
            .zip(events)
            .map(|((key, kv), prev_kv)| match kv {
                // etcd's watch never fills prev_kv for a create (create == mod revision).
                Some(kv) => Event {
                    kind: EventKind::Put,
                    kv: kv.clone(),
                    prev_kv: prev_kv.filter(|_| kv.create_revision != kv.mod_revision),
                },
                None => Event {
                    kind: EventKind::Delete,
                    kv: KeyValue {
                        key: key.clone(),
                        mod_revision: rev,
                        ..Default::default()
                    },
                    prev_kv,
                },
            })
            .collect();
        for (sub, (key, kv)) in writes.into_iter().enumerate() {
            let at = RevKey {
                main: rev,
                sub: sub as u32,
            };
            let entries = self.index.entry(key.clone()).or_default();
            let old_lease = entries
                .last()
                .filter(|e| !e.tombstone)
                .map_or(0, |e| e.lease);
            let (record, entry) = match kv {
                Some(kv) => {
                    let entry = Entry {
                        at,
                        tombstone: false,
                        lease: kv.lease,
                    };
                    (
                        Record {
                            kind: EventKind::Put,
                            kv,
                        },
                        entry,
                    )
                }
                None => {
                    let kv = KeyValue {
                        key: key.clone(),
                        mod_revision: rev,
                        ..Default::default()
                    };
                    (
                        Record {
                            kind: EventKind::Delete,
                            kv,
                        },
                        Entry {
                            at,
                            tombstone: true,
                            lease: 0,
                        },
                    )
                }
            };
            entries.push(entry);
            sink.insert_record(at, &record);
            if old_lease != 0 {
                if let Some(l) = self.leases.get_mut(&old_lease) {
                    l.keys.remove(&key);
                }
            }
            if entry.lease != 0 {
                if let Some(l) = self.leases.get_mut(&entry.lease) {
                    l.keys.insert(key);
                }
            }
        }
        self.revision = rev;
        Ok((
            Applied {
                revision: rev,
                response,
            },
            events,
        ))
    }

    /// Drops history that no read at or above `at` can see (etcd's keyIndex.compact).
    fn compact(&mut self, sink: &mut impl RecordSink, at: Revision) {
        let mut emptied = Vec::new();
        for (key, entries) in self.index.iter_mut() {
            let n = entries.partition_point(|e| e.at.main <= at);
            if n == 0 {
                continue;
            }
            // Keep the newest entry at or below `at`, unless it is a tombstone.
            let drop_to = if entries[n - 1].tombstone { n } else { n - 1 };
            for e in entries.drain(..drop_to) {
                sink.remove_record(e.at);
            }
            if entries.is_empty() {
                emptied.push(key.clone());
            }
        }
        for key in emptied {
            self.index.remove(&key);
        }
        self.compacted = at;
    }

    /// Every retained history position, in revision order (for hashing and replay checks).
    pub fn retained(&self) -> Vec<RevKey> {
        let mut all: Vec<RevKey> = self.index.values().flatten().map(|e| e.at).collect();
        all.sort();
        all
    }
}

/// Whether etcd loads every key of the range before applying `limit`: when it must sort or
/// filter first. Otherwise it loads `limit + 1` keys in key order.
fn needs_all(req: &RangeRequest) -> bool {
    req.sort_order != SortOrder::None
        || req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0
}

/// Range's second half: fetch, filter, sort, limit (etcd's `applierV3backend.Range`). `count`
/// is the number of keys in the range; `slots` its first keys in key order, at least as many as
/// etcd loads.
fn finish_range(
    recs: &impl RecordRead,
    req: &RangeRequest,
    count: i64,
    slots: Vec<(Vec<u8>, Source)>,
) -> Result<RangeResponse, Error> {
    if req.count_only {
        return Ok(RangeResponse {
            kvs: Vec::new(),
            more: false,
            count,
        });
    }
    let fetch = if needs_all(req) || req.limit <= 0 {
        slots.len()
    } else {
        slots.len().min(req.limit as usize + 1)
    };
    let mut kvs = Vec::with_capacity(fetch);
    for (key, src) in &slots[..fetch] {
        kvs.push(load(recs, key, src)?);
    }
    if req.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= req.max_mod_revision);
    }
    if req.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= req.min_mod_revision);
    }
    if req.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= req.max_create_revision);
    }
    if req.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= req.min_create_revision);
    }
    let order = if req.sort_target != SortTarget::Key && req.sort_order == SortOrder::None {
        SortOrder::Ascend
    } else {
        req.sort_order
    };
    if order != SortOrder::None {
        let cmp = |a: &KeyValue, b: &KeyValue| match req.sort_target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        // Stable, so ties stay in key order both ways (as Go's insertion sort leaves them).
        match order {
            SortOrder::Descend => kvs.sort_by(|a, b| cmp(b, a)),
            _ => kvs.sort_by(cmp),
        }
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse { kvs, more, count })
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    let ord = match &c.target {
        CompareTarget::Value(v) => kv.value.as_slice().cmp(v.as_slice()),
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
}

/// The checks etcd makes of a txn before it is proposed: its size, and duplicate keys.
pub fn validate_txn(t: &TxnRequest) -> Result<(), Error> {
    check_txn(t, MAX_TXN_OPS)?;
    check_intervals(&t.success)?;
    check_intervals(&t.failure)?;
    Ok(())
}

/// etcd's `isTxnReadonly`: every op of both branches is a range (a nested txn is not).
pub fn is_read_only(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| matches!(op, RequestOp::Range(_)))
}

/// etcd's `checkPutRequest`.
pub fn check_put(p: &PutRequest) -> Result<(), Error> {
    if p.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if p.ignore_value && !p.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

/// etcd's `checkTxnRequest`: the widest of compare/success/failure counts against the budget;
/// nested txns get what is left of it.
fn check_txn(t: &TxnRequest, max_ops: usize) -> Result<(), Error> {
    let opc = t.compare.len().max(t.success.len()).max(t.failure.len());
    if opc > max_ops {
        return Err(Error::TooManyOps);
    }
    if t.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    for op in t.success.iter().chain(&t.failure) {
        match op {
            RequestOp::Range(r) if r.key.is_empty() => return Err(Error::EmptyKey),
            RequestOp::Put(p) => check_put(p)?,
            RequestOp::DeleteRange(d) if d.key.is_empty() => return Err(Error::EmptyKey),
            RequestOp::Txn(inner) => check_txn(inner, max_ops - opc)?,
            _ => {}
        }
    }
    Ok(())
}

/// A delete's interval as etcd's `checkIntervals` sees it: a point, or `[key, range_end)`
/// compared as plain byte strings. (So a from-key delete, `range_end = "\0"`, covers no
/// non-empty key: etcd accepts `del --from-key a` and `put b` in one txn.)
#[derive(Debug, Clone)]
struct Interval {
    from: Vec<u8>,
    to: Option<Vec<u8>>,
}

impl Interval {
    fn hits(&self, k: &[u8]) -> bool {
        match &self.to {
            None => self.from == k,
            Some(to) => self.from.as_slice() <= k && k < to.as_slice(),
        }
    }
}

/// etcd's `checkIntervals`: no key may be put twice in one branch (nested txns included, though
/// the two branches of one nested txn may put the same key), nor be put and deleted.
fn check_intervals(ops: &[RequestOp]) -> Result<(BTreeSet<Vec<u8>>, Vec<Interval>), Error> {
    let mut dels: Vec<Interval> = ops
        .iter()
        .filter_map(|op| match op {
            RequestOp::DeleteRange(d) => Some(Interval {
                from: d.key.clone(),
                to: (!d.range_end.is_empty()).then(|| d.range_end.clone()),
            }),
            _ => None,
        })
        .collect();
    let mut puts = BTreeSet::new();
    for op in ops {
        let RequestOp::Txn(inner) = op else { continue };
        let (puts_then, dels_then) = check_intervals(&inner.success)?;
        let (puts_else, dels_else) = check_intervals(&inner.failure)?;
        for k in &puts_then {
            if puts.contains(k) || dels.iter().any(|d| d.hits(k)) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            if puts.contains(k) && !puts_then.contains(k) {
                return Err(Error::DuplicateKey);
            }
            if dels.iter().any(|d| d.hits(k)) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let RequestOp::Put(p) = op else { continue };
        if puts.contains(&p.key) || dels.iter().any(|d| d.hits(&p.key)) {
            return Err(Error::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

impl<'a, R: RecordRead> TxnView<'a, R> {
    fn new(ks: &'a Keyspace, recs: &'a R) -> Self {
        TxnView {
            ks,
            recs,
            pending: BTreeMap::new(),
            writes: Vec::new(),
            before: HashMap::new(),
        }
    }

    fn finish(self, response: CommandResponse) -> Outcome {
        Outcome {
            response,
            writes: self.writes,
            before: self.before,
        }
    }

    fn rev(&self) -> Revision {
        self.ks.revision + 1
    }

    /// The live keys of `set` as this txn sees them now.
    fn current_slots(&self, set: KeySet<'_>) -> Vec<(Vec<u8>, Source)> {
        let mut merged: BTreeMap<Vec<u8>, Source> =
            self.ks.slots(set, self.ks.revision).into_iter().collect();
        for (k, v) in &self.pending {
            if !set.contains(k) {
                continue;
            }
            match v {
                Some(kv) => {
                    merged.insert(k.clone(), Source::Pending(kv.clone()));
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        merged.into_iter().collect()
    }

    fn current(&self, key: &[u8]) -> Result<Option<KeyValue>, Error> {
        match self.current_slots(KeySet::Single(key)).pop() {
            Some((k, src)) => load(self.recs, &k, &src).map(Some),
            None => Ok(None),
        }
    }

    fn range(&self, r: &RangeRequest) -> Result<RangeResponse, Error> {
        if r.revision > 0 {
            // A past revision cannot see this txn's writes; it reads history.
            return self.ks.range(self.recs, r);
        }
        let slots = self.current_slots(KeySet::new(&r.key, &r.range_end));
        finish_range(self.recs, r, slots.len() as i64, slots)
    }

    fn put(&mut self, p: &PutRequest) -> Result<PutResponse, Error> {
        let prev = self.current(&p.key)?;
        if !self.pending.contains_key(&p.key) {
            // Nothing earlier in this command wrote the key: `prev` is its state before it.
            self.before.insert(p.key.clone(), prev.clone());
        }
        if (p.ignore_value || p.ignore_lease) && prev.is_none() {
            return Err(Error::KeyNotFound);
        }
        let value = match (&prev, p.ignore_value) {
            (Some(prev), true) => prev.value.clone(),
            _ => p.value.clone(),
        };
        let lease = match (&prev, p.ignore_lease) {
            (Some(prev), true) => prev.lease,
            _ => p.lease,
        };
        let rev = self.rev();
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: prev.as_ref().map_or(rev, |kv| kv.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |kv| kv.version + 1),
            value,
            lease,
        };
        self.pending.insert(p.key.clone(), Some(kv.clone()));
        self.writes.push((p.key.clone(), Some(kv)));
        Ok(PutResponse {
            prev_kv: if p.prev_kv { prev } else { None },
        })
    }

    fn delete(&mut self, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse, Error> {
        let slots = self.current_slots(KeySet::new(&d.key, &d.range_end));
        let mut prev_kvs = Vec::new();
        for (key, src) in &slots {
            if d.prev_kv {
                prev_kvs.push(load(self.recs, key, src)?);
            }
            self.pending.insert(key.clone(), None);
            self.writes.push((key.clone(), None));
        }
        Ok(DeleteRangeResponse {
            deleted: slots.len() as i64,
            prev_kvs,
        })
    }

    fn txn(&mut self, t: &TxnRequest, path: &Path) -> Result<TxnResponse, Error> {
        let ops = if path.succeeded {
            &t.success
        } else {
            &t.failure
        };
        let mut nested = path.nested.iter();
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                RequestOp::Range(r) => ResponseOp::Range(self.range(r)?),
                RequestOp::Put(p) => ResponseOp::Put(self.put(p)?),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(self.delete(d)?),
                RequestOp::Txn(inner) => {
                    let p = nested.next().expect("one path per nested txn");
                    ResponseOp::Txn(self.txn(inner, p)?)
                }
            });
        }
        Ok(TxnResponse {
            succeeded: path.succeeded,
            responses,
        })
    }
}

/// A record source held entirely in memory: for tests, fuzzing and benchmarks of the logic.
#[derive(Debug, Default, Clone)]
pub struct MemRecords {
    pub records: BTreeMap<RevKey, Record>,
    pub leases: BTreeMap<LeaseId, i64>,
    pub alarms: BTreeSet<AlarmMember>,
}

impl RecordRead for MemRecords {
    fn record(&self, at: RevKey) -> Result<Record, Error> {
        self.records
            .get(&at)
            .cloned()
            .ok_or_else(|| Error::Corrupt(format!("no record at revision {}/{}", at.main, at.sub)))
    }
}

impl RecordSink for MemRecords {
    fn insert_record(&mut self, at: RevKey, rec: &Record) {
        self.records.insert(at, rec.clone());
    }
    fn remove_record(&mut self, at: RevKey) {
        self.records.remove(&at);
    }
    fn put_lease(&mut self, id: LeaseId, ttl: i64) {
        self.leases.insert(id, ttl);
    }
    fn remove_lease(&mut self, id: LeaseId) {
        self.leases.remove(&id);
    }
    fn put_alarm(&mut self, alarm: AlarmMember) {
        self.alarms.insert(alarm);
    }
    fn remove_alarm(&mut self, alarm: AlarmMember) {
        self.alarms.remove(&alarm);
    }
}
