//! Replaying a data file must never panic, whatever its bytes. What it keeps must be stable:
//! the file cut to the end of its last whole frame (as open cuts it) replays to the same
//! entries, and so does that file with garbage appended.
#![no_main]

use eden_storage::codec::Crc32c;
use eden_storage::tree::scan_bytes;
use libfuzzer_sys::fuzz_target;

/// A valid header: magic, version 1, base 0.
const HEADER: &[u8] = b"EDENTREE\0\0\0\x01\0\0\0\0\0\0\0\0";

/// Walks the frames of `bytes` (after the header) and writes each one's correct CRC, so the
/// fuzzer reaches the op parser instead of stopping at checksums.
fn fix_checksums(bytes: &mut [u8]) {
    let mut at = HEADER.len();
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 || at + 8 + len > bytes.len() {
            return;
        }
        let mut crc = Crc32c::new();
        crc.update(&bytes[at + 8..at + 8 + len]);
        bytes[at + 4..at + 8].copy_from_slice(&crc.finish().to_be_bytes());
        at += 8 + len;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Most inputs would fail the header check: give them a valid one unless bit 0 is set.
    let mut bytes = Vec::new();
    if mode & 1 == 0 {
        bytes.extend_from_slice(HEADER);
    }
    bytes.extend_from_slice(rest);
    if mode & 2 == 0 && bytes.len() >= HEADER.len() {
        fix_checksums(&mut bytes);
    }
    if let Ok((entries, end)) = scan_bytes(&bytes) {
        assert!(end as usize <= bytes.len());
        let cut = &bytes[..end as usize];
        let (again, end_again) = scan_bytes(cut).expect("the cut file replays");
        assert_eq!(end_again, end);
        assert_eq!(again, entries);
        let mut longer = cut.to_vec();
        longer.extend_from_slice(&[0xff, 0, 0, 0, 1]);
        let (third, _) = scan_bytes(&longer).expect("garbage after the last frame is cut");
        assert_eq!(third, entries);
    }
});
