//! The operator API (gRPC, `dmd.admin.v1.Admin`): start, get, list, watch, revoke, release, and the device
//! inventory. Never open: every call must carry the operator token (`authorization: Bearer <token>`) or
//! come over TLS with a client certificate the listener verified against the operator CA (ARCHITECTURE
//! rule 12). Every call is audited, refused ones too: who (the token's fingerprint or the certificate's
//! subject, never the token), which call, of what, and how it ended.
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

/// Wraps the service with the caller check (no device inventory: device calls are refused).
pub fn server(
    orchestrator: Orchestrator,
    token: String,
) -> tonic::service::interceptor::InterceptedService<AdminServer<AdminApi>, TokenCheck> {
    server_with_inventory(orchestrator, token, None)
}

/// [`server`] with the device inventory. An empty `token` accepts no token: only client certificates
/// (when the listener asks for them).
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

/// Who a call comes from, as the interceptor found it (a request extension the handlers read).
#[derive(Debug, Clone)]
enum Caller {
    /// "token:<fingerprint>" or "cert:<subject>".
    Known(String),
    /// Why nobody is named.
    Refused(&'static str),
}

/// How the audit names a token: the first 16 hex digits of its SHA-256, enough to tell tokens apart
/// after a rotation, never the token.
pub fn token_id(token: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("token:{hex}")
}

/// The common name of a certificate's subject (the first CN attribute); `None` when it has none or the
/// certificate does not parse. The chain was verified by the TLS layer already.
fn subject_cn(der: &[u8]) -> Option<String> {
    common_name(cert_subject(der)?)
}

/// The subject Name of a DER certificate: TBSCertificate's sixth element (after the optional version).
fn cert_subject(der: &[u8]) -> Option<&[u8]> {
    let (_, cert) = der_tlv(der)?; // Certificate
    let (_, tbs) = der_tlv(cert)?; // TBSCertificate
    let mut rest = tbs;
    let mut index = 0;
    loop {
        let (tag, value, after) = der_next(rest)?;
        // [0] version is optional: count from the serial number.
        if tag != 0xa0 {
            index += 1;
        }
        // serial, signature algorithm, issuer, validity, subject.
        if index == 5 {
            return Some(value);
        }
        rest = after;
    }
}

/// The first CN (2.5.4.3) value in a DER Name, if it is a string.
fn common_name(name: &[u8]) -> Option<String> {
    const CN: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let at = name.windows(CN.len()).position(|w| w == CN)?;
    let (tag, value, _) = der_next(name.get(at + CN.len()..)?)?;
    // UTF8String, PrintableString, IA5String, T61String.
    matches!(tag, 0x0c | 0x13 | 0x16 | 0x14).then(|| String::from_utf8_lossy(value).into_owned())
}

/// One DER element: (tag, contents, the rest after it).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in input.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        (len, 2 + n)
    };
    let value = input.get(header..header.checked_add(len)?)?;
    Some((tag, value, &input[header + len..]))
}

fn der_tlv(input: &[u8]) -> Option<(u8, &[u8])> {
    der_next(input).map(|(t, v, _)| (t, v))
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
    /// Names the caller; the handler refuses (and audits) a call with nobody named, since only it knows
    /// which call and target it was.
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        // A certificate here passed the listener's verification against the operator CA.
        let cert = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let caller = if let Some(der) = cert {
            Caller::Known(match subject_cn(&der) {
                Some(cn) => format!("cert:CN={cn}"),
                None => "cert:(no common name)".into(),
            })
        } else if !self.token.is_empty() && same(presented.as_bytes(), self.token.as_bytes()) {
            Caller::Known(token_id(&self.token))
        } else if presented.is_empty() {
            Caller::Refused("no operator token and no client certificate")
        } else {
            Caller::Refused("the operator token is wrong")
        };
        request.extensions_mut().insert(caller);
        Ok(request)
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

    /// The caller of `request`; a call with nobody named is audited as refused and answered
    /// `unauthenticated`.
    async fn admit<T>(
        &self,
        request: &Request<T>,
        method: &str,
        target: &str,
        delegation: Option<(&str, &str)>,
    ) -> Result<String, Status> {
        let why = match request.extensions().get::<Caller>() {
            Some(Caller::Known(caller)) => return Ok(caller.clone()),
            Some(Caller::Refused(why)) => *why,
            None => "no caller check on this server",
        };
        let outcome = format!("unauthenticated: {why}");
        self.orchestrator
            .audit_operator("unauthenticated", method, target, delegation, &outcome)
            .await
            .map_err(internal)?;
        Err(Status::unauthenticated(why))
    }

    /// Audits how a call ended and returns its result; a call whose record cannot be written fails.
    async fn audited<T>(
        &self,
        caller: &str,
        method: &str,
        target: &str,
        delegation: Option<(&str, &str)>,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        self.orchestrator
            .audit_operator(caller, method, target, delegation, &outcome)
            .await
            .map_err(internal)?;
        result
    }

    /// One operator event for a delegation, audited.
    async fn act(
        &self,
        request: &Request<impl Sync>,
        method: &str,
        id: &DelegationId,
        kind: event::Kind,
    ) -> Result<Response<DelegationReply>, Status> {
        let target = delegation_target(id);
        let delegation = Some((id.peer_server_id.as_str(), id.session_id.as_str()));
        let caller = self.admit(request, method, &target, delegation).await?;
        let result = self.apply_as(&caller, id, kind).await;
        self.audited(&caller, method, &target, delegation, result)
            .await
    }

    async fn apply_as(
        &self,
        caller: &str,
        id: &DelegationId,
        kind: event::Kind,
    ) -> Result<Response<DelegationReply>, Status> {
        let applied = self
            .orchestrator
            .apply_as(
                caller,
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

fn delegation_target(id: &DelegationId) -> String {
    format!("delegation {}/{}", id.peer_server_id, id.session_id)
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
        let r = request.get_ref().clone();
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
        self.act(
            &request,
            "StartDelegation",
            &id,
            event::Kind::OperatorStart(start),
        )
        .await
    }

    async fn get_delegation(
        &self,
        request: Request<DelegationId>,
    ) -> Result<Response<DelegationReply>, Status> {
        let id = request.get_ref().clone();
        let (target, delegation) = (
            delegation_target(&id),
            Some((id.peer_server_id.as_str(), id.session_id.as_str())),
        );
        let caller = self
            .admit(&request, "GetDelegation", &target, delegation)
            .await?;
        let result = match self
            .orchestrator
            .get(&id.peer_server_id, &id.session_id)
            .await
        {
            Ok(Some(state)) => Ok(Response::new(DelegationReply { state: Some(state) })),
            Ok(None) => Err(Status::not_found("404: no such delegation")),
            Err(e) => Err(internal(e)),
        };
        self.audited(&caller, "GetDelegation", &target, delegation, result)
            .await
    }

    async fn list_delegations(
        &self,
        request: Request<ListDelegationsRequest>,
    ) -> Result<Response<ListDelegationsReply>, Status> {
        let target = match request.get_ref().dev_id.as_str() {
            "" => String::new(),
            dev => format!("device {dev}"),
        };
        let caller = self
            .admit(&request, "ListDelegations", &target, None)
            .await?;
        let r = request.into_inner();
        let result = self
            .orchestrator
            .list()
            .await
            .map_err(internal)
            .map(|mut delegations| {
                if !r.dev_id.is_empty() {
                    delegations.retain(|s| s.device.as_ref().is_some_and(|d| d.dev_id == r.dev_id));
                }
                Response::new(ListDelegationsReply { delegations })
            });
        self.audited(&caller, "ListDelegations", &target, None, result)
            .await
    }

    type WatchDelegationStream = WatchStream;

    async fn watch_delegation(
        &self,
        request: Request<DelegationId>,
    ) -> Result<Response<WatchStream>, Status> {
        let id = request.get_ref().clone();
        let (target, delegation) = (
            delegation_target(&id),
            Some((id.peer_server_id.as_str(), id.session_id.as_str())),
        );
        let caller = self
            .admit(&request, "WatchDelegation", &target, delegation)
            .await?;
        let result = self.watch(id.clone()).await;
        self.audited(&caller, "WatchDelegation", &target, delegation, result)
            .await
    }

    async fn revoke_delegation(
        &self,
        request: Request<DelegationId>,
    ) -> Result<Response<DelegationReply>, Status> {
        let id = request.get_ref().clone();
        self.act(
            &request,
            "RevokeDelegation",
            &id,
            event::Kind::OperatorRevoke(pb::OperatorRevoke {}),
        )
        .await
    }

    async fn add_devices(
        &self,
        request: Request<AddDevicesRequest>,
    ) -> Result<Response<AddDevicesReply>, Status> {
        let ids: Vec<&str> = request
            .get_ref()
            .devices
            .iter()
            .map(|d| d.dev_id.as_str())
            .collect();
        let target = format!("devices {}", ids.join(","));
        let method = if request.get_ref().replace {
            "AddDevices(replace)"
        } else {
            "AddDevices"
        };
        let caller = self.admit(&request, method, &target, None).await?;
        let result = self.add(request.into_inner()).await;
        self.audited(&caller, method, &target, None, result).await
    }

    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesReply>, Status> {
        let caller = self.admit(&request, "ListDevices", "", None).await?;
        let result = match self.inventory() {
            Ok(inventory) => inventory
                .list()
                .await
                .map(|devices| Response::new(ListDevicesReply { devices }))
                .map_err(inventory_status),
            Err(e) => Err(e),
        };
        self.audited(&caller, "ListDevices", "", None, result).await
    }

    async fn remove_device(
        &self,
        request: Request<RemoveDeviceRequest>,
    ) -> Result<Response<RemoveDeviceReply>, Status> {
        let target = format!("device {}", request.get_ref().dev_id);
        let caller = self.admit(&request, "RemoveDevice", &target, None).await?;
        let result = self.remove(&request.get_ref().dev_id).await;
        self.audited(&caller, "RemoveDevice", &target, None, result)
            .await
    }

    async fn release_delegation(
        &self,
        request: Request<DelegationId>,
    ) -> Result<Response<DelegationReply>, Status> {
        let id = request.get_ref().clone();
        self.act(
            &request,
            "ReleaseDelegation",
            &id,
            event::Kind::OperatorRelease(pb::OperatorRelease {}),
        )
        .await
    }
}

impl AdminApi {
    async fn add(&self, r: AddDevicesRequest) -> Result<Response<AddDevicesReply>, Status> {
        let inventory = self.inventory()?;
        let mut results = Vec::with_capacity(r.devices.len());
        for device in &r.devices {
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

    async fn remove(&self, dev_id: &str) -> Result<Response<RemoveDeviceReply>, Status> {
        let inventory = self.inventory()?;
        // Ending a delegation (revocation, failure, expiry) restores the device: it needs its credentials.
        let holders = self
            .orchestrator
            .device_holders(dev_id)
            .await
            .map_err(internal)?;
        if holders > 0 {
            return Err(Status::failed_precondition(format!(
                "409: {holders} delegation(s) hold {dev_id}; end them first (dmdctl list --device)"
            )));
        }
        let removed = inventory.remove(dev_id).await.map_err(inventory_status)?;
        Ok(Response::new(RemoveDeviceReply { removed }))
    }

    /// The current state of a delegation, then each change until it rests.
    async fn watch(&self, id: DelegationId) -> Result<Response<WatchStream>, Status> {
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
}
