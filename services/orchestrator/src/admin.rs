//! The operator API (gRPC, `dmd.admin.v1.Admin`): start, get, list, watch, revoke, release, and the device
//! inventory. Never open: every call must carry the operator token (`authorization: Bearer <token>`), and
//! every call is audited.
//!
//! The inventory is behind [`Inventory`], which the deployment provides: the credentials an operator sends
//! are sealed with the master key in this process and written to the store, never put on the bus in clear
//! (ARCHITECTURE rule 7). An orchestrator without the master key serves no device calls.

use std::pin::Pin;
use std::sync::Arc;

use dm_proto::admin::v1::admin_server::{Admin, AdminServer};
use dm_proto::admin::v1::{
    AddDevicesReply, AddDevicesRequest, AddOutcome, AddResult, DelegationId, DelegationReply,
    DeviceInfo, DeviceRecord, ListDelegationsReply, ListDelegationsRequest, ListDevicesReply,
    ListDevicesRequest, RemoveDeviceReply, RemoveDeviceRequest, StartDelegationRequest,
};
use dm_protocol::types::Uuid;
use dm_saga::Answer;
use dm_saga::pb::{self, Event, event};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{Orchestrator, OrchestratorError};

/// Wraps the service with the token check (no device inventory: device calls are refused).
pub fn server(
    orchestrator: Orchestrator,
    token: String,
) -> tonic::service::interceptor::InterceptedService<AdminServer<AdminApi>, TokenCheck> {
    server_with_inventory(orchestrator, token, None)
}

/// [`server`] with the device inventory.
pub fn server_with_inventory(
    orchestrator: Orchestrator,
    token: String,
    inventory: Option<Arc<dyn Inventory>>,
) -> tonic::service::interceptor::InterceptedService<AdminServer<AdminApi>, TokenCheck> {
    AdminServer::with_interceptor(
        AdminApi {
            orchestrator,
            inventory,
        },
        TokenCheck { token },
    )
}

/// Why an inventory operation failed; the text never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    /// The record is not usable (nothing written).
    #[error("{0}")]
    Invalid(String),
    /// The store cannot be reached.
    #[error("the device store cannot be reached: {0}")]
    Unavailable(String),
}

/// The devices this server manages, their credentials sealed at rest.
#[tonic::async_trait]
pub trait Inventory: Send + Sync + 'static {
    /// Adds one device; with `replace`, overwrites one that is there.
    async fn add(&self, device: &DeviceRecord, replace: bool)
    -> Result<AddOutcome, InventoryError>;
    /// Every device, without secrets.
    async fn list(&self) -> Result<Vec<DeviceInfo>, InventoryError>;
    /// Removes a device; false when there was none.
    async fn remove(&self, dev_id: &str) -> Result<bool, InventoryError>;
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

#[derive(Clone)]
pub struct AdminApi {
    orchestrator: Orchestrator,
    inventory: Option<Arc<dyn Inventory>>,
}

impl std::fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminApi")
            .field("inventory", &self.inventory.is_some())
            .finish_non_exhaustive()
    }
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

fn inventory_status(e: InventoryError) -> Status {
    match e {
        InventoryError::Invalid(reason) => Status::invalid_argument(format!("400: {reason}")),
        InventoryError::Unavailable(_) => Status::unavailable(e.to_string()),
    }
}

impl AdminApi {
    fn inventory(&self) -> Result<&dyn Inventory, Status> {
        self.inventory.as_deref().ok_or_else(|| {
            Status::failed_precondition(
                "this orchestrator has no device inventory: its configuration has no master key",
            )
        })
    }

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

/// How often a watch reads the delegation from the store (changes stored by other replicas).
const WATCH_POLL: std::time::Duration = std::time::Duration::from_secs(1);

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
        let orchestrator = self.orchestrator.clone();
        tokio::spawn(async move {
            let mut last = (current.phase, current.updated_ms);
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
            // Changes stored by this replica arrive at once; those of other replicas are read from the
            // store every second.
            let mut poll = tokio::time::interval(WATCH_POLL);
            loop {
                let next = tokio::select! {
                    change = changes.recv() => match change {
                        Ok(s)
                            if s.peer_server_id == id.peer_server_id
                                && s.session_id.eq_ignore_ascii_case(&id.session_id) =>
                        {
                            Some(s)
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = poll.tick() => orchestrator
                        .get(&id.peer_server_id, &id.session_id)
                        .await
                        .ok()
                        .flatten(),
                };
                let Some(s) = next else { continue };
                if (s.phase, s.updated_ms) == last || s.updated_ms < last.1 {
                    continue;
                }
                last = (s.phase, s.updated_ms);
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

    async fn add_devices(
        &self,
        request: Request<AddDevicesRequest>,
    ) -> Result<Response<AddDevicesReply>, Status> {
        let r = request.into_inner();
        let inventory = self.inventory()?;
        let mut results = Vec::with_capacity(r.devices.len());
        for device in &r.devices {
            let what = if r.replace {
                "device replace"
            } else {
                "device add"
            };
            self.orchestrator
                .audit_operator(&format!("{what} {}", device.dev_id), "", "")
                .await
                .map_err(internal)?;
            let (outcome, reason) = match inventory.add(device, r.replace).await {
                Ok(AddOutcome::Exists) => (
                    AddOutcome::Exists,
                    "the device is in the inventory already (replace to overwrite)".to_string(),
                ),
                Ok(outcome) => (outcome, String::new()),
                Err(InventoryError::Invalid(reason)) => (AddOutcome::Invalid, reason),
                Err(e) => return Err(inventory_status(e)),
            };
            let mut result = AddResult {
                dev_id: device.dev_id.clone(),
                reason,
                ..Default::default()
            };
            result.set_outcome(outcome);
            results.push(result);
        }
        Ok(Response::new(AddDevicesReply { results }))
    }

    async fn list_devices(
        &self,
        _request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesReply>, Status> {
        let inventory = self.inventory()?;
        self.orchestrator
            .audit_operator("device list", "", "")
            .await
            .map_err(internal)?;
        let devices = inventory.list().await.map_err(inventory_status)?;
        Ok(Response::new(ListDevicesReply { devices }))
    }

    async fn remove_device(
        &self,
        request: Request<RemoveDeviceRequest>,
    ) -> Result<Response<RemoveDeviceReply>, Status> {
        let r = request.into_inner();
        let inventory = self.inventory()?;
        self.orchestrator
            .audit_operator(&format!("device remove {}", r.dev_id), "", "")
            .await
            .map_err(internal)?;
        // Ending a delegation (revocation, failure, expiry) restores the device: it needs its credentials.
        let holders = self
            .orchestrator
            .device_holders(&r.dev_id)
            .await
            .map_err(internal)?;
        if holders > 0 {
            return Err(Status::failed_precondition(format!(
                "409: {holders} delegation(s) hold {}; end them first (dmdctl list --device)",
                r.dev_id
            )));
        }
        let removed = inventory
            .remove(&r.dev_id)
            .await
            .map_err(inventory_status)?;
        Ok(Response::new(RemoveDeviceReply { removed }))
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
