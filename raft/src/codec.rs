//! bincode 2 (serde API) with one fixed configuration, for everything this crate writes to
//! disk or sends to a peer. Changing the configuration changes the on-disk format.

use serde::de::DeserializeOwned;
use serde::Serialize;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(v, config()).map_err(|e| format!("encode: {e}"))
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (v, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| format!("decode: {e}"))?;
    if used != bytes.len() {
        return Err(format!(
            "decode: {} trailing bytes after the value",
            bytes.len() - used
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use eden_storage::{Command, KeyValue, PutRequest};

    /// The Raft log on disk and the peer messages carry these encodings: they must not change.
    /// Byte strings are a varint length and the bytes.
    #[test]
    fn the_encoding_of_commands_and_kvs_is_stable() {
        let put = Command::Put(PutRequest {
            key: b"k".to_vec(),
            value: b"vv".to_vec(),
            lease: 3,
            prev_kv: true,
            ..Default::default()
        });
        let bytes = encode(&put).unwrap();
        // variant 0; key; value; lease 3 (zigzag 6); prev_kv, ignore_value, ignore_lease.
        assert_eq!(bytes, [0, 1, b'k', 2, b'v', b'v', 6, 1, 0, 0]);
        assert_eq!(decode::<Command>(&bytes).unwrap(), put);

        let long = Command::Put(PutRequest {
            key: b"k".to_vec(),
            value: vec![7; 300],
            ..Default::default()
        });
        let bytes = encode(&long).unwrap();
        // A length of 300 takes bincode's 3-byte varint (251, then u16 little-endian).
        assert_eq!(&bytes[..6], &[0, 1, b'k', 251, 44, 1]);
        assert_eq!(bytes.len(), 6 + 300 + 4);
        assert_eq!(decode::<Command>(&bytes).unwrap(), long);

        let kv = KeyValue {
            key: b"a".to_vec(),
            value: b"b".to_vec(),
            ..Default::default()
        };
        let bytes = encode(&kv).unwrap();
        assert_eq!(&bytes[..2], &[1, b'a']);
        assert_eq!(decode::<KeyValue>(&bytes).unwrap(), kv);
    }
}
