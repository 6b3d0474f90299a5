//! The Cluster service: members are Raft nodes, `ID` is the Raft node id.
//!
//! MemberList shows voters and learners (eden's standbys, `isLearner: true`) with their peer
//! and client URLs from the replicated membership. MemberRemove and MemberPromote map onto
//! Raft membership changes. MemberAdd and MemberUpdate are refused: an eden node joins with the
//! cluster token (`eden serve --join`, `eden node add`), which gives it a certificate and an id;
//! a peer URL alone cannot.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::errors::ApiError;
use super::pb::etcdserverpb as pb;
use super::Backend;

pub struct ClusterService {
    backend: Arc<Backend>,
}

impl ClusterService {
    pub fn new(backend: Arc<Backend>) -> ClusterService {
        ClusterService { backend }
    }
}

/// The peer port is always mutual TLS; the client URL takes this node's client scheme.
fn member(id: u64, info: &eden_raft::NodeInfo, is_learner: bool, scheme: &str) -> pb::Member {
    pb::Member {
        id,
        name: info.name.clone(),
        peer_ur_ls: vec![format!("https://{}", info.peer_addr)],
        client_ur_ls: vec![format!("{scheme}://{}", info.client_addr)],
        is_learner,
    }
}

impl Backend {
    /// Every member, voters then learners, each by id.
    pub fn members(&self) -> Vec<pb::Member> {
        let m = self.node.metrics();
        let scheme = self.client_scheme();
        let mut out: Vec<pb::Member> = m
            .voters
            .iter()
            .map(|(id, info)| member(*id, info, false, scheme))
            .chain(
                m.learners
                    .iter()
                    .map(|(id, info)| member(*id, info, true, scheme)),
            )
            .collect();
        out.sort_by_key(|m| m.id);
        out
    }

    pub async fn member_remove(&self, id: u64) -> Result<pb::MemberRemoveResponse, ApiError> {
        if !self.members().iter().any(|m| m.id == id) {
            return Err(ApiError::MemberNotFound);
        }
        self.node.remove(id).await?;
        Ok(pb::MemberRemoveResponse {
            header: self.header_now(),
            members: self.members(),
        })
    }

    pub async fn member_promote(&self, id: u64) -> Result<pb::MemberPromoteResponse, ApiError> {
        match self.members().iter().find(|m| m.id == id) {
            None => return Err(ApiError::MemberNotFound),
            Some(m) if !m.is_learner => return Err(ApiError::MemberNotLearner),
            Some(_) => {}
        }
        self.node.promote(id).await?;
        Ok(pb::MemberPromoteResponse {
            header: self.header_now(),
            members: self.members(),
        })
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn member_add(
        &self,
        req: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        let urls = req.into_inner().peer_ur_ls;
        let members = self.backend.members();
        if members
            .iter()
            .any(|m| m.peer_ur_ls.iter().any(|u| urls.contains(u)))
        {
            return Err(ApiError::PeerUrlExists.into());
        }
        Err(ApiError::Unsupported(format!(
            "eden cannot add a member by peer URL ({}): start the new node with `eden serve \
             --join HOST:PORT --token TOKEN` (token from `eden cluster token`) or run `eden node \
             add USER@HOST`",
            urls.join(", ")
        ))
        .into())
    }

    async fn member_remove(
        &self,
        req: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        Ok(Response::new(
            self.backend.member_remove(req.into_inner().id).await?,
        ))
    }

    async fn member_update(
        &self,
        req: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        let id = req.into_inner().id;
        if !self.backend.members().iter().any(|m| m.id == id) {
            return Err(ApiError::MemberNotFound.into());
        }
        Err(ApiError::Unsupported(format!(
            "eden cannot change the peer URL of member {id:x}: restart that node with the new \
             --peer-addr instead"
        ))
        .into())
    }

    async fn member_list(
        &self,
        _req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        Ok(Response::new(pb::MemberListResponse {
            header: self.backend.header_now(),
            members: self.backend.members(),
        }))
    }

    async fn member_promote(
        &self,
        req: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        Ok(Response::new(
            self.backend.member_promote(req.into_inner().id).await?,
        ))
    }
}
