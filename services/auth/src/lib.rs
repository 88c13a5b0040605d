//! The auth service (ARCHITECTURE.md, services table): the trust registry of peer DM Servers, the identity
//! check of inbound messages (PROTOCOL.md A.2), the record of mutual authentication (step 2), and the
//! secrets of each delegation (the peer's DM Account from DELEGATION_START, this server's own account, the
//! TEMP_DELEGATION_KEY), encrypted at rest with a data key per delegation (rule 7).
//!
//! On the bus (docs/bus.md):
//! - `req.auth.identity` (`IdentityCheck` → `IdentityAnswer`): allowed iff the registry entry matching the
//!   certificate (by SPKI pin, or by CA + SAN) has ServerID == `dm_server_id`;
//! - `req.auth.lodge` (`Lodge` → `LodgeAnswer`): keeps a secret of an inbound message, sealed by the
//!   gateway with the deployment's bus key (`dm_seal::BusKey`) and handed over by the orchestrator once
//!   it accepted the message;
//! - `req.auth.fetch` (`Fetch` → `FetchAnswer`): hands a secret out for a send or a device plan, sealed
//!   with the bus key. No payload carries a secret in clear: a reader of the bus without the master key
//!   learns none.
//! - commands `cmd.auth.{verify_peer, create_key, forget_key, purge}` (consumer `<dep>_auth`); the outcomes
//!   of `verify_peer` and `create_key` go to `evt.auth.peer_verified` and `evt.auth.key_created` as a
//!   `WorkResult` with msg-id `<outbox_id>:result`, then the command is acknowledged. Each command is
//!   remembered under its `outbox_id` in the same write as its effect, so a redelivery has no second effect
//!   and gets the same outcome.
//!
//! An unused TEMP key expires after [`Config::temp_key_ttl`]: a fetch refuses and deletes it, and a sweep at
//! start (then every [`Config::sweep_interval`]) deletes the others.

mod account;
mod config;
mod registry;
mod vault;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dm_bus::stack::Settle;
use dm_bus::{Area, Bus, BusError, ConsumerConfig, Headers, Message, Request};
use dm_proto::bus::v1::{
    CommandEnvelope, EventEnvelope, Fetch, FetchAnswer, IdentityAnswer, IdentityCheck, Lodge,
    LodgeAnswer, fetch, lodge,
};
use dm_proto::saga::v1::{self as pb, Work, WorkResult, command, event};
use dm_protocol::delegation::{DelType, TempDelegationKey};
use dm_protocol::dmacc::DmAccount;
use dm_protocol::tnds;
use dm_protocol::types::DmUri;
use dm_seal::{Direction, Zeroizing, field};
use prost::Message as _;
use tokio::task::JoinSet;

pub use account::{CLIENT_CRED_KEY, SERVER_CRED_KEY};
pub use config::{
    Config, ConfigError, DEFAULT_ACK_WAIT, DEFAULT_SWEEP_INTERVAL, DEFAULT_TEMP_KEY_TTL,
};
pub use dm_seal::{BusKey, MasterKey};
pub use registry::{
    IdentityRefusal, Peer, PeerIdentity, PeerPolicy, PolicyRefusal, PresentedCertificate,
    TrustRegistry, format_pin, parse_pin,
};

use vault::{Fetched, Kind, Lodged, Vault};
pub use vault::{OpenedRecord, RecordError, open_stored_record};

/// The service's name on the bus (consumer, queue group, subjects).
pub const SERVICE: &str = "auth";
/// Header naming the protobuf type of a payload.
pub const TYPE_HEADER: &str = "dmd-type";
/// Event names of the outcomes (`evt.auth.<name>`).
pub const EVT_PEER_VERIFIED: &str = "auth.peer_verified";
pub const EVT_KEY_CREATED: &str = "auth.key_created";

/// How long in-flight requests may take to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// What stops the service. Messages never carry secrets.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The key of a delegation's secrets in the bucket: the same key the orchestrator uses for its state.
pub use dm_bus::subjects::delegation_key;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Typed headers, with the trace context of the message being answered.
fn headers(type_name: &str, cause: &Headers) -> Headers {
    let mut h = Headers::new();
    h.insert(TYPE_HEADER, type_name);
    h.insert("dmd-version", "1");
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = cause.get(name) {
            h.insert(name, v);
        }
    }
    h
}

fn work_result(work: Work, ok: bool, status_code: u32, reason: impl Into<String>) -> WorkResult {
    let mut r = WorkResult {
        ok,
        status_code,
        reason: reason.into(),
        ..Default::default()
    };
    r.set_work(work);
    r
}

fn del_type(t: pb::DelType) -> Option<DelType> {
    match t {
        pb::DelType::Partial => Some(DelType::Partial),
        pb::DelType::Full => Some(DelType::Full),
        pb::DelType::Final => Some(DelType::Final),
        pb::DelType::Temporary => Some(DelType::Temporary),
        pb::DelType::Unspecified => None,
    }
}

struct Service {
    config: Config,
    bus: Bus,
    vault: Vault,
    /// Opens what the gateway lodges, seals what is fetched.
    bus_key: BusKey,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("deployment", &self.config.names.deployment())
            .finish_non_exhaustive()
    }
}

/// Runs the auth service of one deployment until `shutdown` completes: creates the command and event
/// streams and the `secrets` bucket if needed, sweeps expired keys, then answers requests and carries out
/// commands. Requests in flight are given a few seconds to finish at shutdown.
pub async fn run(
    config: Config,
    bus: Bus,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AuthError> {
    let names = config.names.clone();
    for area in [Area::Cmd, Area::Evt] {
        bus.ensure_work_queue(&names.work_queue(area)).await?;
    }
    if config.master_key.is_ephemeral() && matches!(bus, Bus::Nats(_)) {
        tracing::warn!(
            "no master_key configured: secrets kept now cannot be read after a restart or by another replica"
        );
    }
    let kv = bus.kv(&names.bucket("secrets")?, 1).await?;
    let vault = Vault::new(kv, config.master_key.clone(), config.temp_key_ttl);
    match vault.sweep(now_ms()).await {
        Ok(n) => tracing::info!(expired_keys = n, "swept expired TEMP keys"),
        Err(e) => tracing::warn!(error = %e, "sweep of expired TEMP keys failed"),
    }
    let mut commands_config = dm_bus::stack::StackConfig::new(
        SERVICE,
        ConsumerConfig {
            stream: names.stream(Area::Cmd),
            durable: names.consumer(SERVICE)?,
            filter: names.commands_for(SERVICE)?,
            ack_wait: config.ack_wait,
        },
    );
    commands_config.dead_letter_subject = Some(names.subject(Area::Audit, "dead")?);
    commands_config.deployment = names.deployment().to_string();
    let group = names.queue_group(SERVICE)?;
    let mut identity = bus
        .serve(&names.subject(Area::Req, "auth.identity")?, &group)
        .await?;
    let mut lodges = bus
        .serve(&names.subject(Area::Req, "auth.lodge")?, &group)
        .await?;
    let mut fetches = bus
        .serve(&names.subject(Area::Req, "auth.fetch")?, &group)
        .await?;
    tracing::info!(
        deployment = names.deployment(),
        server_id = config.registry.server_id(),
        peers = config.registry.peers().len(),
        "auth serving"
    );
    let sweep_every = config.sweep_interval;
    let bus_key = config.master_key.bus_key();
    let service = Arc::new(Service {
        config,
        bus,
        vault,
        bus_key,
    });
    let sweeper = {
        let service = service.clone();
        tokio::spawn(async move {
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + sweep_every, sweep_every);
            loop {
                ticks.tick().await;
                if let Err(e) = service.vault.sweep(now_ms()).await {
                    tracing::warn!(error = %e, "sweep of expired TEMP keys failed");
                }
            }
        })
    };
    let mut in_flight = JoinSet::new();
    // Commands go through the consumer stack: several delegations at once, one at a time for each.
    let (stop_commands, commands_stopped) = tokio::sync::oneshot::channel::<()>();
    let commands = {
        let service = service.clone();
        let bus = service.bus.clone();
        tokio::spawn(dm_bus::stack::consume(
            bus,
            commands_config,
            |m: &Message| {
                CommandEnvelope::decode(m.payload.clone())
                    .ok()
                    .and_then(|e| e.delegation)
                    .map(|d| delegation_key(&d.peer_server_id, &d.session_id))
                    .unwrap_or_default()
            },
            move |message, _attempt| {
                let service = service.clone();
                async move { service.command(message).await }
            },
            async {
                let _ = commands_stopped.await;
            },
        ))
    };
    tokio::pin!(shutdown);
    let outcome = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            request = identity.next() => {
                let Some(request) = request else { break Ok(()) };
                let service = service.clone();
                let span = dm_bus::trace::process_span(SERVICE, &request.message);
                in_flight.spawn(tracing::Instrument::instrument(
                    async move { service.identity(request).await },
                    span,
                ));
            }
            request = lodges.next() => {
                let Some(request) = request else { break Ok(()) };
                let service = service.clone();
                let span = dm_bus::trace::process_span(SERVICE, &request.message);
                in_flight.spawn(tracing::Instrument::instrument(
                    async move { service.lodge(request).await },
                    span,
                ));
            }
            request = fetches.next() => {
                let Some(request) = request else { break Ok(()) };
                let service = service.clone();
                let span = dm_bus::trace::process_span(SERVICE, &request.message);
                in_flight.spawn(tracing::Instrument::instrument(
                    async move { service.fetch(request).await },
                    span,
                ));
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    };
    sweeper.abort();
    let _ = stop_commands.send(());
    let _ = commands.await;
    let _ = tokio::time::timeout(DRAIN, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    outcome
}

impl Service {
    async fn respond(&self, request: Request, type_name: &str, payload: Vec<u8>) {
        let h = headers(type_name, &request.message.headers);
        if let Err(e) = request.respond(h, Bytes::from(payload)).await {
            tracing::warn!(error = %e, "an answer could not be sent");
        }
    }

    async fn identity(&self, request: Request) {
        let answer = match IdentityCheck::decode(request.message.payload.clone()) {
            Ok(check) => {
                let cert = PresentedCertificate {
                    spki_sha256: check.spki_sha256,
                    subject_alt_names: check.subject_alt_names,
                    issuer_ca: check.issuer_ca,
                };
                match self
                    .config
                    .registry
                    .check_identity(&cert, &check.dm_server_id)
                {
                    Ok(_) => IdentityAnswer {
                        allowed: true,
                        reason: String::new(),
                    },
                    Err(refusal) => IdentityAnswer {
                        allowed: false,
                        reason: refusal.to_string(),
                    },
                }
            }
            Err(_) => IdentityAnswer {
                allowed: false,
                reason: "malformed IdentityCheck".into(),
            },
        };
        self.respond(request, "dmd.bus.v1.IdentityAnswer", answer.encode_to_vec())
            .await;
    }

    async fn lodge(&self, request: Request) {
        let answer = self.lodge_answer(request.message.payload.clone()).await;
        self.respond(request, "dmd.bus.v1.LodgeAnswer", answer.encode_to_vec())
            .await;
    }

    async fn lodge_answer(&self, payload: Bytes) -> LodgeAnswer {
        let refuse = |reason: &str| LodgeAnswer {
            ok: false,
            reason: reason.to_string(),
        };
        let Ok(Lodge {
            delegation: Some(d),
            secret: Some(secret),
        }) = Lodge::decode(payload)
        else {
            return refuse("malformed Lodge: a delegation and a secret are required");
        };
        if d.peer_server_id.is_empty() || d.session_id.is_empty() {
            return refuse("the delegation needs a peer ServerID and a SessionID");
        }
        let key = delegation_key(&d.peer_server_id, &d.session_id);
        let (sealed, name) = match &secret {
            lodge::Secret::SealedStartAccount(b) => (b, field::PEER_ACCOUNT),
            lodge::Secret::SealedTempDelegationKey(b) => (b, field::TEMP_KEY),
        };
        let Ok(plain) = self.bus_key.open(&key, name, Direction::ToAuth, sealed) else {
            return refuse(
                "the sealed secret does not open (another master key, another delegation, or tampered)",
            );
        };
        let (kind, value): (Kind, Zeroizing<Vec<u8>>) = match secret {
            lodge::Secret::SealedStartAccount(_) => {
                // The gateway checked the message; a second look keeps garbage out of the bucket.
                let account = tnds::decode(&plain)
                    .ok()
                    .and_then(|tree| DmAccount::from_tnds(&tree).ok());
                match account {
                    None => return refuse("the DM Account is not a valid TNDS DMAcc"),
                    Some(a) if a.server_id != d.peer_server_id => {
                        return refuse("the DM Account's ServerID is not the peer's");
                    }
                    Some(_) => (Kind::PeerAccount, plain),
                }
            }
            lodge::Secret::SealedTempDelegationKey(_) => {
                let parsed = std::str::from_utf8(&plain)
                    .map_err(|_| "is not UTF-8 text".to_string())
                    .and_then(|text| {
                        text.trim()
                            .parse::<TempDelegationKey>()
                            .map_err(|rule| rule.to_string())
                    });
                match parsed {
                    Ok(key) => (Kind::TempKey, Zeroizing::new(key.to_base64().into_bytes())),
                    Err(rule) => {
                        return refuse(&format!("the TEMP_DELEGATION_KEY {rule}"));
                    }
                }
            }
        };
        match self.vault.lodge(&key, kind, &value, now_ms()).await {
            Ok(Lodged::Stored) | Ok(Lodged::AlreadyStored) => LodgeAnswer {
                ok: true,
                reason: String::new(),
            },
            Ok(Lodged::NotKept(reason)) => LodgeAnswer {
                ok: true,
                reason: reason.into(),
            },
            Ok(Lodged::Conflict(reason)) => refuse(reason),
            Err(e) => {
                tracing::warn!(error = %e, "a secret could not be lodged");
                refuse("the secret could not be kept now; try again")
            }
        }
    }

    async fn fetch(&self, request: Request) {
        let answer = self.fetch_answer(request.message.payload.clone()).await;
        self.respond(request, "dmd.bus.v1.FetchAnswer", answer.encode_to_vec())
            .await;
    }

    async fn fetch_answer(&self, payload: Bytes) -> FetchAnswer {
        let missing = |reason: &str| FetchAnswer {
            found: false,
            sealed_value: Vec::new(),
            reason: reason.to_string(),
        };
        let Ok(req) = Fetch::decode(payload) else {
            return missing("malformed Fetch");
        };
        let Some(d) = req.delegation.as_ref() else {
            return missing("the Fetch names no delegation");
        };
        let kind = match req.what() {
            fetch::What::OwnAccount => Kind::OwnAccount,
            fetch::What::PeerAccount => Kind::PeerAccount,
            fetch::What::TempKey => Kind::TempKey,
            fetch::What::Unspecified => return missing("the Fetch names no secret"),
        };
        let key = delegation_key(&d.peer_server_id, &d.session_id);
        let config = &self.config;
        let make_own = || {
            Zeroizing::new(account::own_account_tnds(
                config.registry.server_id(),
                &config.dm_address,
                &d.dev_id,
            ))
        };
        let make: Option<&(dyn Fn() -> Zeroizing<Vec<u8>> + Sync)> = if kind == Kind::OwnAccount {
            if d.dev_id.is_empty() {
                return missing("the delegation names no device, which the account's CLCRED needs");
            }
            Some(&make_own)
        } else {
            None
        };
        match self.vault.fetch(&key, kind, now_ms(), make).await {
            Ok(Fetched::Found(value)) => {
                match self
                    .bus_key
                    .seal(&key, kind.field(), Direction::FromAuth, &value)
                {
                    Ok(sealed_value) => FetchAnswer {
                        found: true,
                        sealed_value,
                        reason: String::new(),
                    },
                    Err(_) => missing("the secret could not be sealed"),
                }
            }
            Ok(Fetched::Missing(reason)) => missing(&reason),
            Err(e) => {
                tracing::warn!(error = %e, "a secret could not be read");
                missing("the secret cannot be read now")
            }
        }
    }

    /// Decides `verify_peer` from the registry: the peer must be in it (401) and the delegation within its
    /// policy (403).
    fn verify(&self, env: &CommandEnvelope, peer_server_id: &str) -> WorkResult {
        let Some(peer) = self.config.registry.peer(peer_server_id) else {
            return work_result(
                Work::VerifyPeer,
                false,
                401,
                format!("'{peer_server_id}' is not in the trust registry"),
            );
        };
        let Some(t) = del_type(env.del_type()) else {
            return work_result(Work::VerifyPeer, false, 400, "the delegation has no type");
        };
        let mut scope = Vec::with_capacity(env.scope.len());
        for uri in &env.scope {
            match uri.parse::<DmUri>() {
                Ok(u) => scope.push(u),
                Err(rule) => {
                    return work_result(
                        Work::VerifyPeer,
                        false,
                        400,
                        format!("scope '{uri}' {rule}"),
                    );
                }
            }
        }
        match peer.policy.check(t, &scope, env.not_after_ms, now_ms()) {
            Ok(()) => work_result(Work::VerifyPeer, true, 0, ""),
            Err(refusal) => work_result(Work::VerifyPeer, false, 403, refusal.0),
        }
    }

    /// Carries out one command, publishes its outcome (if it has one), then acknowledges it. A failure of
    /// the bucket or of the publish leaves it to be delivered again.
    async fn command(&self, message: Message) -> Settle {
        let Ok(env) = CommandEnvelope::decode(message.payload.clone()) else {
            return Settle::Poison("an undecodable command".into());
        };
        let (Some(d), Some(kind)) = (
            env.delegation.clone(),
            env.command.as_ref().and_then(|c| c.kind.clone()),
        ) else {
            return Settle::Poison("a command without a delegation or a command".into());
        };
        if env.outbox_id.is_empty() {
            return Settle::Poison("a command without an outbox id".into());
        }
        let key = delegation_key(&d.peer_server_id, &d.session_id);
        let now = now_ms();
        let done = match kind {
            command::Kind::VerifyPeer(_) => {
                let verdict = self.verify(&env, &d.peer_server_id);
                self.vault
                    .record_verification(&key, &env.outbox_id, verdict, now)
                    .await
                    .map(Some)
            }
            command::Kind::CreateTempKey(_) => self
                .vault
                .create_key(&key, &env.outbox_id, now)
                .await
                .map(Some),
            command::Kind::ForgetTempKey(_) => self
                .vault
                .forget_key(&key, &env.outbox_id)
                .await
                .map(|()| None),
            command::Kind::Purge(_) => self
                .vault
                .purge(&key, &env.outbox_id, now)
                .await
                .map(|()| None),
            _ => {
                return Settle::Poison(format!(
                    "{} is a command for another service",
                    env.outbox_id
                ));
            }
        };
        let outcome = match done {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(error = %e, outbox_id = %env.outbox_id, "command not carried out; it will be delivered again");
                return Settle::Retry(e.to_string());
            }
        };
        if let Some(result) = outcome {
            let name = match result.work() {
                Work::VerifyPeer => EVT_PEER_VERIFIED,
                _ => EVT_KEY_CREATED,
            };
            let evt = EventEnvelope {
                delegation: Some(d),
                event: Some(pb::Event {
                    kind: Some(event::Kind::Work(result)),
                }),
            };
            let published = match self.config.names.subject(Area::Evt, name) {
                Ok(subject) => {
                    self.bus
                        .publish(
                            &subject,
                            headers("dmd.bus.v1.EventEnvelope", &message.headers),
                            Bytes::from(evt.encode_to_vec()),
                            &format!("{}:result", env.outbox_id),
                        )
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = published {
                tracing::warn!(error = %e, outbox_id = %env.outbox_id, "outcome not published; the command will be delivered again");
                return Settle::Retry(e.to_string());
            }
        }
        Settle::Done
    }
}
