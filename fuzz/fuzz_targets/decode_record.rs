//! Decoding stored bytes must never panic, and whatever decodes must re-encode to the same bytes
//! (so a record has exactly one encoding).
#![no_main]

use eden_storage::codec::{decode_lease, decode_record, encode_lease, encode_record, RevKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(rec) = decode_record(data) {
        assert_eq!(encode_record(&rec), data);
    }
    if let Ok(ttl) = decode_lease(data) {
        assert_eq!(encode_lease(ttl), data);
    }
    if let Ok(at) = RevKey::from_tree_key(data) {
        assert_eq!(&at.to_tree_key()[..], data);
    }
});
