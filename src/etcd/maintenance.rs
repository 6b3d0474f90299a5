//! The Maintenance service: Status, Hash, HashKV, Snapshot (streamed), Alarm, Defragment,
//! MoveLeader.
//!
//! Status reports this node's view: `leader` and `raftTerm` from Raft metrics, `raftIndex` the
//! last log index, `raftAppliedIndex` the applied one, `dbSize` the size of the store's data file.
//! eden raises no alarms (the store has no fixed quota), so Alarm always answers with an empty
//! list. Defragment is a no-op: the store rewrites its data file itself once it is mostly
//! garbage. The snapshot is eden's store export (`EDENSNAP`), not a bbolt
//! file: it restores into eden, not into etcd.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::errors::ApiError;
use super::pb::etcdserverpb as pb;
use super::{Backend, ETCD_VERSION};

/// Snapshot bytes per streamed message.
const SNAPSHOT_CHUNK: usize = 32 * 1024;

pub struct MaintenanceService {
    backend: Arc<Backend>,
}

impl MaintenanceService {
    pub fn new(backend: Arc<Backend>) -> MaintenanceService {
        MaintenanceService { backend }
    }
}

impl Backend {
    pub fn status(&self) -> pb::StatusResponse {
        let m = self.node.metrics();
        let size = self.node.store().size_bytes() as i64;
        pb::StatusResponse {
            header: self.header_now(),
            version: ETCD_VERSION.to_string(),
            db_size: size,
            leader: m.leader.unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.term,
            raft_applied_index: m.applied_index.unwrap_or(0),
            errors: Vec::new(),
            db_size_in_use: size,
            is_learner: m.learners.contains_key(&self.node.id()),
        }
    }

    pub fn hash_kv(&self, revision: i64) -> Result<pb::HashKvResponse, ApiError> {
        let store = self.node.store();
        let current = store.revision();
        let (hash, compact_revision) = store.hash_kv(revision)?;
        Ok(pb::HashKvResponse {
            header: self.header(current),
            hash,
            compact_revision,
        })
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        _req: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        Ok(Response::new(pb::AlarmResponse {
            header: self.backend.header_now(),
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.backend.status()))
    }

    async fn defragment(
        &self,
        _req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        Ok(Response::new(pb::DefragmentResponse {
            header: self.backend.header_now(),
        }))
    }

    async fn hash(
        &self,
        _req: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        let r = self.backend.hash_kv(0)?;
        Ok(Response::new(pb::HashResponse {
            header: r.header,
            hash: r.hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        Ok(Response::new(
            self.backend.hash_kv(req.into_inner().revision)?,
        ))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        _req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let store = self.backend.node.store().clone();
        let bytes = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            store.export_snapshot(&mut buf).map(|()| buf)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("snapshot export task failed: {e}")))?
        .map_err(ApiError::from)?;
        let header = self.backend.header_now();
        let total = bytes.len();
        let chunks: Vec<Result<pb::SnapshotResponse, Status>> = bytes
            .chunks(SNAPSHOT_CHUNK)
            .scan(total, |remaining, chunk| {
                *remaining -= chunk.len();
                Some(Ok(pb::SnapshotResponse {
                    header,
                    remaining_bytes: *remaining as u64,
                    blob: chunk.to_vec(),
                }))
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        let target = req.into_inner().target_id;
        if !self.backend.members().iter().any(|m| m.id == target) {
            return Err(ApiError::MemberNotFound.into());
        }
        Err(ApiError::Unsupported(format!(
            "eden does not transfer Raft leadership on request (target {target:x}); the role \
             controller chooses the leader"
        ))
        .into())
    }
}
