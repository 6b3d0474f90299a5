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
