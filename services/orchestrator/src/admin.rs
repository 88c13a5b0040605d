//! The operator API (gRPC, `dmd.admin.v1.Admin`): start, get, list, watch, revoke, release. Never open: every
//! call must carry the operator token (`authorization: Bearer <token>`), and every call is audited.

use std::pin::Pin;

use dm_proto::admin::v1::admin_server::{Admin, AdminServer};
use dm_proto::admin::v1::{
    DelegationId, DelegationReply, ListDelegationsReply, ListDelegationsRequest,
    StartDelegationRequest,
};
use dm_protocol::types::Uuid;
use dm_saga::Answer;
use dm_saga::pb::{self, Event, event};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{Orchestrator, OrchestratorError};

/// Wraps the service with the token check.
pub fn server(
    orchestrator: Orchestrator,
    token: String,
) -> tonic::service::interceptor::InterceptedService<AdminServer<AdminApi>, TokenCheck> {
    AdminServer::with_interceptor(AdminApi { orchestrator }, TokenCheck { token })
}

/// Refuses calls without the operator token.
#[derive(Clone)]
pub struct TokenCheck {
    token: String,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCheck(<redacted>)")
    }
}

/// Compares without stopping at the first difference, so the time taken does not tell how much matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !self.token.is_empty() && same(presented.as_bytes(), self.token.as_bytes()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "the operator token is missing or wrong",
            ))
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminApi {
    orchestrator: Orchestrator,
}

fn internal(e: OrchestratorError) -> Status {
    Status::unavailable(format!("the delegation store cannot be reached: {e}"))
}

/// The decider's refusals as gRPC statuses; the message keeps the contract's code.
fn refused(status: u32, reason: String) -> Status {
    let message = format!("{status}: {reason}");
    match status {
        400 => Status::invalid_argument(message),
        403 => Status::permission_denied(message),
        404 => Status::not_found(message),
        405 => Status::failed_precondition(message),
        409 => Status::already_exists(message),
        _ => Status::internal(message),
    }
}

impl AdminApi {
    async fn act(
        &self,
        id: &DelegationId,
        what: &str,
        kind: event::Kind,
    ) -> Result<Response<DelegationReply>, Status> {
        self.orchestrator
            .audit_operator(what, &id.peer_server_id, &id.session_id)
            .await
            .map_err(internal)?;
        let applied = self
            .orchestrator
            .apply(
                &id.peer_server_id,
                &id.session_id,
                &Event { kind: Some(kind) },
            )
            .await
            .map_err(internal)?;
        match applied.answer {
            Answer::Accepted => Ok(Response::new(DelegationReply {
                state: applied.state,
            })),
            Answer::Rejected { status, reason } => Err(refused(status, reason)),
            Answer::Repeat(_) | Answer::Ignored => Err(Status::internal("unexpected answer")),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<DelegationReply, Status>> + Send>>;

fn is_terminal(s: &pb::DelegationState) -> bool {
    matches!(
        s.phase(),
        pb::Phase::Declined
            | pb::Phase::Failed
            | pb::Phase::Revoked
            | pb::Phase::Expired
            | pb::Phase::Released
    )
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn start_delegation(
        &self,
        request: Request<StartDelegationRequest>,
    ) -> Result<Response<DelegationReply>, Status> {
        let r = request.into_inner();
        let session_id = if r.session_id.is_empty() {
            Uuid::from_random_bytes(rand::random()).to_string()
        } else {
            r.session_id.clone()
        };
        let start = pb::OperatorStart {
            role: r.role,
            session_id: session_id.clone(),
            peer_server_id: r.peer_server_id.clone(),
            device: r.device,
            del_type: r.del_type,
            scope: r.scope,
            not_after_ms: r.not_after_ms,
        };
        let id = DelegationId {
            peer_server_id: r.peer_server_id,
            session_id,
        };
        self.act(&id, "start", event::Kind::OperatorStart(start))
            .await
    }

    async fn get_delegation(
        &self,
        request: Request<DelegationId>,
    ) -> Result<Response<DelegationReply>, Status> {
        let id = request.into_inner();
        self.orchestrator
            .audit_operator("get", &id.peer_server_id, &id.session_id)
            .await
            .map_err(internal)?;
        match self
            .orchestrator
            .get(&id.peer_server_id, &id.session_id)
            .await
            .map_err(internal)?
        {
            Some(state) => Ok(Response::new(DelegationReply { state: Some(state) })),
            None => Err(Status::not_found("404: no such delegation")),
        }
    }

    async fn list_delegations(
        &self,
        request: Request<ListDelegationsRequest>,
    ) -> Result<Response<ListDelegationsReply>, Status> {
        let r = request.into_inner();
        self.orchestrator
            .audit_operator("list", "", "")
            .await
            .map_err(internal)?;
        let mut delegations = self.orchestrator.list().await.map_err(internal)?;
        if !r.dev_id.is_empty() {
            delegations.retain(|s| s.device.as_ref().is_some_and(|d| d.dev_id == r.dev_id));
        }
        Ok(Response::new(ListDelegationsReply { delegations }))
    }

    type WatchDelegationStream = WatchStream;

    async fn watch_delegation(
        &self,
        request: Request<DelegationId>,
    ) -> Result<Response<WatchStream>, Status> {
        let id = request.into_inner();
        self.orchestrator
            .audit_operator("watch", &id.peer_server_id, &id.session_id)
            .await
            .map_err(internal)?;
        // Subscribe before reading, so that no change falls between the two.
        let mut changes = self.orchestrator.subscribe();
        let current = self
            .orchestrator
            .get(&id.peer_server_id, &id.session_id)
            .await
            .map_err(internal)?;
        let Some(current) = current else {
            return Err(Status::not_found("404: no such delegation"));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let done = is_terminal(&current);
            if tx
                .send(Ok(DelegationReply {
                    state: Some(current),
                }))
                .await
                .is_err()
                || done
            {
                return;
            }
            loop {
                match changes.recv().await {
                    Ok(s)
                        if s.peer_server_id == id.peer_server_id
                            && s.session_id.eq_ignore_ascii_case(&id.session_id) =>
                    {
                        let done = is_terminal(&s);
                        if tx
                            .send(Ok(DelegationReply { state: Some(s) }))
                            .await
                            .is_err()
                            || done
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn revoke_delegation(
        &self,
        request: Request<DelegationId>,
    ) -> Result<Response<DelegationReply>, Status> {
        let id = request.into_inner();
        self.act(
            &id,
            "revoke",
            event::Kind::OperatorRevoke(pb::OperatorRevoke {}),
        )
        .await
    }

    async fn release_delegation(
        &self,
        request: Request<DelegationId>,
    ) -> Result<Response<DelegationReply>, Status> {
        let id = request.into_inner();
        self.act(
            &id,
            "release",
            event::Kind::OperatorRelease(pb::OperatorRelease {}),
        )
        .await
    }
}
