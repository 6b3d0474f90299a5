//! Arbitrary byte strings turned into small command sequences for the pure keyspace: apply must
//! never panic, and a reload of the in-memory state from its own records must equal it.
#![no_main]

use eden_storage::codec::Record;
use eden_storage::mvcc::{Keyspace, MemRecords};
use eden_storage::*;
use libfuzzer_sys::fuzz_target;

fn key(b: u8) -> Vec<u8> {
    vec![b'a' + b % 5]
}

fuzz_target!(|data: &[u8]| {
    let mut ks = Keyspace::new();
    let mut recs = MemRecords::default();
    for chunk in data.chunks(4) {
        let [op, a, b, c] = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
            *chunk.get(3).unwrap_or(&0),
        ];
        let end = match c % 4 {
            0 => vec![],
            1 => vec![0],
            _ => key(c),
        };
        let cmd = match op % 7 {
            0 => Command::Put(PutRequest {
                key: key(a),
                value: vec![b],
                lease: (c % 3) as i64,
                prev_kv: true,
                ignore_value: c % 7 == 0,
                ..Default::default()
            }),
            1 => Command::DeleteRange(DeleteRangeRequest {
                key: key(a),
                range_end: end,
                prev_kv: true,
            }),
            2 => Command::Txn(TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Greater,
                    target: CompareTarget::Version(b as i64 % 3),
                    key: key(a),
                    range_end: end.clone(),
                }],
                success: vec![
                    RequestOp::Put(PutRequest {
                        key: key(b),
                        value: vec![c],
                        ..Default::default()
                    }),
                    RequestOp::DeleteRange(DeleteRangeRequest {
                        key: key(c),
                        range_end: end,
                        prev_kv: false,
                    }),
                ],
                failure: vec![RequestOp::Range(RangeRequest {
                    key: key(a),
                    range_end: vec![0],
                    revision: b as i64 % 8,
                    ..Default::default()
                })],
            }),
            3 => Command::Compact(CompactionRequest {
                revision: (a % 16) as i64,
                physical: false,
            }),
            4 => Command::LeaseGrant {
                id: (a % 4) as i64,
                ttl: 10,
            },
            5 => Command::Alarm {
                activate: a % 2 == 0,
                member: (b % 3) as u64,
                alarm: if a % 3 == 0 {
                    AlarmType::Corrupt
                } else {
                    AlarmType::NoSpace
                },
            },
            _ => Command::LeaseRevoke { id: (a % 4) as i64 },
        };
        let _ = ks.apply(&mut recs, &cmd);
        let _ = ks.range(
            &recs,
            &RangeRequest {
                key: vec![0],
                range_end: vec![0],
                revision: (b % 16) as i64,
                ..Default::default()
            },
        );
    }
    let history = recs
        .records
        .iter()
        .map(|(at, r): (_, &Record)| Ok((*at, r.clone())));
    let reloaded = Keyspace::load(
        ks.revision(),
        ks.compact_revision(),
        ks.lease_seq(),
        recs.leases.clone(),
        recs.alarms.clone(),
        history,
    )
    .unwrap();
    assert_eq!(reloaded, ks);
});
