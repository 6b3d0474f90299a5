//! etcd's request size limits, with etcd's answers.
//!
//! - A write whose Raft request would be larger than `--max-request-bytes` (1.5 MiB by default)
//!   is refused before it is proposed: `etcdserver: request is too large` (InvalidArgument).
//!   [`check_write_size`] estimates the size etcd measures, its `InternalRaftRequest` (the
//!   operation plus a request header with a 64-bit id), from the operation's encoded length.
//! - A gRPC message larger than that plus 512 KiB is not even decoded: grpc-go answers
//!   ResourceExhausted, `grpc: received message larger than max (N vs. M)`. tonic enforces the
//!   same limit ([`MAX_RECV_BYTES`]) with its own code and words; [`grpc_go_words`] rewrites
//!   that answer to grpc-go's, so clients see what etcd sends.

use prost::encoding::encoded_len_varint;

use super::errors::ApiError;

/// etcd's default `--max-request-bytes`.
pub const MAX_REQUEST_BYTES: usize = 3 * 512 * 1024;

/// The largest gRPC message the server decodes: etcd's `--max-request-bytes` plus its
/// `grpcOverheadBytes` (512 KiB).
pub const MAX_RECV_BYTES: usize = MAX_REQUEST_BYTES + 512 * 1024;

/// The encoded size of etcd's `InternalRaftRequest` carrying one operation of `op_len` bytes:
/// the operation as a length-delimited field (a one-byte tag), and the header (field 100, a
/// two-byte tag) holding a request id, which etcd draws from its member id and the clock and
/// which takes ten bytes as a varint when the member id's top bit is set (eight or nine
/// otherwise: the estimate can be one or two bytes high).
pub fn raft_request_len(op_len: usize) -> usize {
    let header = 1 + 10;
    (1 + encoded_len_varint(op_len as u64) + op_len)
        + (2 + encoded_len_varint(header as u64) + header)
}

/// Refuses a write (put, delete or txn) of `op_len` encoded bytes as etcd does when its Raft
/// request would pass [`MAX_REQUEST_BYTES`].
pub fn check_write_size(op_len: usize) -> Result<(), ApiError> {
    if raft_request_len(op_len) > MAX_REQUEST_BYTES {
        return Err(ApiError::RequestTooLarge);
    }
    Ok(())
}

/// grpc-go's answer (ResourceExhausted, "grpc: received message larger than max (N vs. M)")
/// for tonic's refusal of an oversized message (OutOfRange, "Error, decoded message length too
/// large: found N bytes, the limit is: M bytes"); `None` for any other status.
pub fn grpc_go_status(status: &tonic::Status) -> Option<tonic::Status> {
    if status.code() != tonic::Code::OutOfRange {
        return None;
    }
    let (found, limit) = status
        .message()
        .strip_prefix("Error, decoded message length too large: found ")
        .and_then(|rest| rest.strip_suffix(" bytes"))
        .and_then(|rest| rest.split_once(" bytes, the limit is: "))?;
    Some(tonic::Status::resource_exhausted(format!(
        "grpc: received message larger than max ({found} vs. {limit})"
    )))
}

/// Rewrites tonic's refusal of an oversized message in a trailers-only answer's `headers` to
/// grpc-go's ([`grpc_go_status`]). Any other answer is left alone. (A stream that already sent
/// its headers rewrites the status itself: see `watch.rs`.)
pub fn grpc_go_words(headers: &mut http::HeaderMap) {
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
        return;
    }
    let Some(words) = tonic::Status::from_header_map(headers).and_then(|s| grpc_go_status(&s))
    else {
        return;
    };
    headers.remove("grpc-message");
    let _ = words.add_header(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_counts_the_header_and_both_tags() {
        // A put of 100 bytes: tag, one length byte, 100; header: two-byte tag, length, id tag
        // and a ten-byte id.
        assert_eq!(raft_request_len(100), 1 + 1 + 100 + 2 + 1 + 11);
        assert_eq!(
            raft_request_len(MAX_REQUEST_BYTES - 100),
            MAX_REQUEST_BYTES - 100 + 18
        );
        assert!(check_write_size(MAX_REQUEST_BYTES - 18).is_ok());
        assert_eq!(
            check_write_size(MAX_REQUEST_BYTES - 17),
            Err(ApiError::RequestTooLarge)
        );
    }

    #[test]
    fn tonics_oversize_answer_becomes_grpc_gos() {
        let mut headers = http::HeaderMap::new();
        tonic::Status::out_of_range(
            "Error, decoded message length too large: found 2200011 bytes, the limit is: \
             2097152 bytes",
        )
        .add_header(&mut headers)
        .unwrap();
        grpc_go_words(&mut headers);
        let status = tonic::Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "grpc: received message larger than max (2200011 vs. 2097152)"
        );

        // Another OutOfRange answer stays as it was.
        let mut headers = http::HeaderMap::new();
        let compacted = "etcdserver: mvcc: required revision has been compacted";
        tonic::Status::out_of_range(compacted)
            .add_header(&mut headers)
            .unwrap();
        grpc_go_words(&mut headers);
        let status = tonic::Status::from_header_map(&headers).unwrap();
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::OutOfRange, compacted)
        );
    }
}
