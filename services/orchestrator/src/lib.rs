//! The orchestrator: the delegation saga over the bus. For every event it loads the delegation's state
//! from the key-value bucket (or takes the one this replica stored last, which the compare-and-set below
//! proves current or refuses), calls the pure decider (`dm-saga`), stores the new state **and** the commands
//! in one compare-and-set write (the outbox), then publishes the commands with the msg-id
//! `<delegation>:<revision>:<index>`. The outbox is not cleared by a second write while the delegation is
//! in progress: the next decision's write replaces it, and a replica that finds an outbox it did not see
//! published (a failed publish, a crash, another replica's decision) publishes it again with the same ids
//! before deciding (duplicates are dropped by the msg-id and by idempotent consumers). Only a delegation
//! that comes to rest (Active or ended) gets its outbox cleared, so that a resting record is never
//! republished. A lost race (another replica advanced the same delegation) is retried on the fresh state; a
//! crash between the write and the publish is repaired at start by publishing every outbox left behind. Timers live in the state, so they survive restarts: each replica
//! keeps an index of the armed ones, fed by a watch of every write to the bucket (any replica's), and fires
//! them through the decider, which ignores a timer that no longer matches (ARCHITECTURE rules 2 and 4).
//! Device claims (rule 9) are compare-and-set entries per device in the `claims` bucket.
//!
//! Inputs: events from the services (work queue `evt.>`), inbound peer messages from the gateway
//! (request/reply `req.orchestrator.peer`, answered after the commit, A.2), operator requests (the API of
//! [`Orchestrator`]). Outputs: commands to the services (work queue `cmd.<service>.<verb>`) and the audit
//! trail.

pub mod admin;
pub mod audit;
mod claims;
mod metrics;
mod route;
mod timers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dm_bus::{Area, Bus, BusError, ConsumerConfig, Headers, Kv, Names};
use dm_proto::bus::v1::{
    AuditEvent, CommandEnvelope, DelegationRef, EventEnvelope, InboundAnswer, InboundPeerMessage,
    Lodge, LodgeAnswer, StoredDelegation, StoredTimerView,
};
use dm_saga::pb::{self, DelegationState, Event, command, event};
use dm_saga::{Answer, Claim, Decider, claim_of};
use prost::Message as _;
use tokio::sync::Mutex;

use claims::{Claimed, Claims};

/// How many locks this replica's decisions are spread over: two delegations whose keys fall on one lock
/// wait for each other, others are decided at once (compare-and-set guards across replicas anyway).
const SHARDS: usize = 256;

pub use route::route;

/// Header naming the protobuf type of a payload.
pub const TYPE_HEADER: &str = "dmd-type";

/// How the orchestrator of one deployment is set up.
#[derive(Debug, Clone)]
pub struct Config {
    pub names: Names,
    /// This DM Server's ServerID.
    pub server_id: String,
    pub saga: dm_saga::Config,
    /// How long a service may hold an event before it is delivered again.
    pub ack_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("stored state of {0} cannot be read: {1}")]
    Corrupt(String, String),
    #[error("gave up on {0} after repeated write conflicts")]
    Contention(String),
}

/// The result of one event: the answer, and the delegation's phase afterwards.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub answer: Answer,
    pub state: Option<DelegationState>,
}

/// The orchestrator of one deployment. Cheap to clone; replicas share nothing but the bus.
#[derive(Debug, Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    bus: Bus,
    kv: Kv,
    decider: Decider,
    timers: timers::Timers,
    /// Which delegations hold each device (ARCHITECTURE rule 9).
    claims: Claims,
    /// Serializes this replica's decisions per delegation (by key), so that they do not race each other
    /// into compare-and-set conflicts; other replicas are kept apart by compare-and-set.
    shards: Vec<Mutex<()>>,
    /// Every state this replica stored, for watchers.
    changes: tokio::sync::broadcast::Sender<DelegationState>,
    /// Per delegation in progress, the state this replica stored last, at its revision, whose outbox it
    /// published in full: such an outbox is left for the next decision to replace (a second write per
    /// decision was 12 of a delegation's ~80 JetStream writes), and the next decision here starts from
    /// this state instead of reading it back (12 reads per delegation). A hint only: the decision's
    /// compare-and-set on the revision refuses a stale one (another replica moved the delegation), and
    /// the state is read then; a missing entry means reading and publishing again.
    published: std::sync::Mutex<HashMap<String, (u64, DelegationState)>>,
    /// Writes the audit records of stored changes, several per JetStream write under load.
    audit: audit::AuditWriter,
}

/// Entries of [`Inner::published`] before it is emptied (each costs one read and one republish at most;
/// delegations at rest leave it, so it holds about the delegations in flight).
const PUBLISHED_MAX: usize = 16_384;

/// A delegation at rest waits for no work of its own: its outbox is cleared once published, so that a
/// late decision or a restart does not publish it again.
fn at_rest(state: &DelegationState) -> bool {
    matches!(
        state.phase(),
        pb::Phase::Active
            | pb::Phase::Declined
            | pb::Phase::Failed
            | pb::Phase::Revoked
            | pb::Phase::Expired
            | pb::Phase::Released
    )
}

pub use dm_bus::subjects::delegation_key;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

fn typed_headers(type_name: &str) -> Headers {
    let mut h = Headers::new();
    h.insert(TYPE_HEADER, type_name);
    h.insert("dmd-version", "1");
    h
}

/// A device claimed by this call for a new delegation, and whether its state may have been written.
#[derive(Debug)]
struct NewClaim {
    dev_id: String,
    written: bool,
}

/// The device and scope an event would start a delegation over (an operator start, a peer's NOTIF; not a
/// stale one, which the decider refuses).
fn start_of(event: &Event) -> Option<(String, Vec<String>)> {
    let (device, scope) = match &event.kind {
        Some(event::Kind::OperatorStart(s)) => (s.device.as_ref(), &s.scope),
        Some(event::Kind::Peer(pb::PeerMessage {
            body: Some(pb::peer_message::Body::Notif(n)),
            stale,
            ..
        })) if stale.is_empty() => (n.device.as_ref(), &n.scope),
        _ => return None,
    };
    Some((
        device.map(|d| d.dev_id.clone()).unwrap_or_default(),
        scope.clone(),
    ))
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if it is a valid one.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && hex(flags, 2);
    valid.then(|| trace.to_ascii_lowercase())
}

/// A `traceparent` for one message of the delegation: its trace, a fresh span.
fn traceparent(trace_id: &str) -> Option<String> {
    trace_id_of(&format!("00-{trace_id}-0000000000000001-01"))
        .map(|t| format!("00-{t}-{:016x}-01", rand::random::<u64>() | 1))
}

/// A `traceparent` on a delegation's stored trace (a fresh span id: the parent of a step that came
/// without context of its own).
fn traceparent_of_trace(trace_id: &str) -> Option<String> {
    traceparent(trace_id)
}

tokio::task_local! {
    /// Who an operator's change is made for ([`Orchestrator::apply_as`]).
    static CALLER: String;
}

/// Who caused `event`: the operator the admin API named, the peer whose message it is, the service whose
/// work ended, the timer.
fn caller_of(event: &Event) -> String {
    if let Ok(caller) = CALLER.try_with(String::clone) {
        return caller;
    }
    match &event.kind {
        Some(event::Kind::Peer(m)) => format!("peer:{}", m.sender),
        Some(event::Kind::Work(_)) => "service".into(),
        Some(event::Kind::Timer(_)) => "timer".into(),
        Some(
            event::Kind::OperatorStart(_)
            | event::Kind::OperatorRevoke(_)
            | event::Kind::OperatorRelease(_),
        ) => "operator".into(),
        None => "unknown".into(),
    }
}

/// The commands of a decision that stores `after`, each audit record naming caller, method (the event),
/// target (the delegation and its device) and outcome; one record is added when the decision has none
/// (a change within a phase), so that every stored change is audited.
fn audit_commands(
    mut commands: Vec<pb::Command>,
    before: Option<&DelegationState>,
    after: &DelegationState,
    event: &Event,
    answer: &Answer,
) -> Vec<pb::Command> {
    let caller = caller_of(event);
    let method = event_name(event);
    let mut target = format!("delegation {}/{}", after.peer_server_id, after.session_id);
    if let Some(d) = &after.device {
        target.push_str(&format!(" device {}", d.dev_id));
    }
    let outcome = match answer {
        Answer::Rejected { status, .. } => status.to_string(),
        _ => "ok".to_string(),
    };
    let mut found = false;
    for c in &mut commands {
        if let Some(command::Kind::Audit(r)) = &mut c.kind {
            r.caller.clone_from(&caller);
            r.method.clone_from(&method);
            r.target.clone_from(&target);
            r.outcome.clone_from(&outcome);
            found = true;
        }
    }
    if !found {
        let mut r = pb::AuditRecord {
            what: "stored".into(),
            caller,
            method,
            target,
            outcome,
            ..Default::default()
        };
        r.set_from(before.map_or(pb::Phase::Unspecified, DelegationState::phase));
        r.set_to(after.phase());
        commands.push(pb::Command {
            kind: Some(command::Kind::Audit(r)),
        });
    }
    commands
}

/// A short name of an event for spans: `operator_start`, `peer notif`, `work apply_plan ok`, `timer`, …
fn event_name(event: &Event) -> String {
    match &event.kind {
        Some(event::Kind::OperatorStart(_)) => "operator_start".into(),
        Some(event::Kind::Peer(m)) => match &m.body {
            Some(b) => format!("peer {}", peer_body_name(b)),
            None => "peer".into(),
        },
        Some(event::Kind::Work(w)) => format!(
            "work {} {}",
            w.work()
                .as_str_name()
                .trim_start_matches("WORK_")
                .to_ascii_lowercase(),
            if w.ok { "ok" } else { "failed" }
        ),
        Some(event::Kind::Timer(_)) => "timer".into(),
        Some(event::Kind::OperatorRevoke(_)) => "operator_revoke".into(),
        Some(event::Kind::OperatorRelease(_)) => "operator_release".into(),
        None => "unknown".into(),
    }
}

fn peer_body_name(body: &pb::peer_message::Body) -> &'static str {
    use pb::peer_message::Body;
    match body {
        Body::Notif(_) => "notif",
        Body::Res(_) => "res",
        Body::Start(_) => "start",
        Body::Prepared(_) => "prepared",
        Body::Confirm(_) => "confirm",
        Body::Failure(_) => "failure",
        Body::Revoke(_) => "revoke",
        Body::Release(_) => "release",
    }
}

fn new_trace_id() -> String {
    format!("{:032x}", rand::random::<u128>() | 1)
}

fn reference(state: &DelegationState) -> DelegationRef {
    DelegationRef {
        peer_server_id: state.peer_server_id.clone(),
        session_id: state.session_id.clone(),
        role: state.role,
        dev_id: state
            .device
            .as_ref()
            .map(|d| d.dev_id.clone())
            .unwrap_or_default(),
    }
}

impl Orchestrator {
    /// Connects the orchestrator to its streams and bucket, repairs outboxes left by a crash and indexes the
    /// armed timers.
    pub async fn new(config: Config, bus: Bus) -> Result<Self, OrchestratorError> {
        for area in [Area::Cmd, Area::Evt] {
            bus.ensure_work_queue(&config.names.work_queue(area))
                .await?;
        }
        // The audit trail is a log every reader sees whole, kept for a year.
        bus.ensure_log(&dm_bus::LogStream {
            stream: config.names.stream(Area::Audit),
            subjects: vec![config.names.area_wildcard(Area::Audit)],
            max_age: Duration::from_secs(365 * 24 * 3600),
        })
        .await?;
        let kv = bus.kv(&config.names.bucket("delegations")?, 1).await?;
        let claims = Claims::new(
            bus.kv(&config.names.bucket("claims")?, 1).await?,
            kv.clone(),
        );
        let decider = Decider::new(config.saga.clone());
        let audit = audit::AuditWriter::start(
            bus.clone(),
            config.names.subject(Area::Audit, "delegation")?,
        );
        let o = Self {
            inner: Arc::new(Inner {
                config,
                bus,
                kv,
                decider,
                timers: timers::Timers::default(),
                claims,
                shards: (0..SHARDS).map(|_| Mutex::new(())).collect(),
                changes: tokio::sync::broadcast::channel(1024).0,
                published: std::sync::Mutex::new(HashMap::new()),
                audit,
            }),
        };
        o.recover().await?;
        Ok(o)
    }

    pub fn names(&self) -> &Names {
        &self.inner.config.names
    }

    /// Every state this replica stores from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<DelegationState> {
        self.inner.changes.subscribe()
    }

    /// How many delegations hold the device now (in progress, or Active): its inventory entry must
    /// stay while any does, since ending them needs the device's credentials.
    pub async fn device_holders(&self, dev_id: &str) -> Result<usize, OrchestratorError> {
        Ok(self.inner.claims.holders(dev_id, now_ms()).await?)
    }

    /// Records an operator's call in the audit trail (ARCHITECTURE rule 12): who (`caller`, never a
    /// secret), which call, of what, and how it ended. `delegation`: the (peer, session) it was about.
    pub async fn audit_operator(
        &self,
        caller: &str,
        method: &str,
        target: &str,
        delegation: Option<(&str, &str)>,
        outcome: &str,
    ) -> Result<(), OrchestratorError> {
        let audit = AuditEvent {
            delegation: delegation.map(|(peer, session)| DelegationRef {
                peer_server_id: peer.to_string(),
                session_id: session.to_string(),
                ..Default::default()
            }),
            record: Some(pb::AuditRecord {
                what: "operator call".into(),
                caller: caller.to_string(),
                method: method.to_string(),
                target: target.to_string(),
                outcome: outcome.to_string(),
                ..Default::default()
            }),
            at_ms: now_ms(),
            revision: 0,
            outbox_id: String::new(),
        };
        let id = format!("op:{}:{}", now_ms(), rand::random::<u64>());
        self.inner
            .bus
            .publish(
                &self.inner.config.names.subject(Area::Audit, "operator")?,
                typed_headers("dmd.bus.v1.AuditEvent"),
                Bytes::from(audit.encode_to_vec()),
                &id,
            )
            .await?;
        Ok(())
    }

    /// After a restart: publish what outboxes hold, and index every armed timer.
    async fn recover(&self) -> Result<(), OrchestratorError> {
        for key in self.inner.kv.keys().await? {
            let Some((stored, revision)) = self.load(&key).await? else {
                continue;
            };
            if let Some(state) = &stored.state {
                self.inner
                    .timers
                    .track_at(&key, state.timer.as_ref(), revision);
                if !stored.outbox.is_empty() {
                    self.flush(&key, state, &stored.outbox, revision).await?;
                    self.settle(&key, state, revision).await?;
                }
            }
        }
        Ok(())
    }

    async fn load(&self, key: &str) -> Result<Option<(StoredDelegation, u64)>, OrchestratorError> {
        let Some(entry) = self.inner.kv.get(key).await? else {
            return Ok(None);
        };
        let stored = StoredDelegation::decode(entry.value)
            .map_err(|e| OrchestratorError::Corrupt(key.to_string(), e.to_string()))?;
        Ok(Some((stored, entry.revision)))
    }

    /// The stored state of a delegation.
    pub async fn get(
        &self,
        peer_server_id: &str,
        session_id: &str,
    ) -> Result<Option<DelegationState>, OrchestratorError> {
        let key = delegation_key(peer_server_id, session_id);
        Ok(self.load(&key).await?.and_then(|(s, _)| s.state))
    }

    /// Every stored delegation.
    pub async fn list(&self) -> Result<Vec<DelegationState>, OrchestratorError> {
        let mut out = Vec::new();
        for key in self.inner.kv.keys().await? {
            if let Some((stored, _)) = self.load(&key).await?
                && let Some(state) = stored.state
            {
                out.push(state);
            }
        }
        Ok(out)
    }

    /// [`Orchestrator::apply`] on behalf of `caller` (an operator, as the admin API names them): the audit
    /// records of the changes it stores name that caller.
    pub async fn apply_as(
        &self,
        caller: &str,
        peer_server_id: &str,
        session_id: &str,
        event: &Event,
    ) -> Result<Applied, OrchestratorError> {
        CALLER
            .scope(
                caller.to_string(),
                self.apply(peer_server_id, session_id, event),
            )
            .await
    }

    /// Decides one event for the delegation (peer, session), commits, publishes. Retries on a lost race.
    pub async fn apply(
        &self,
        peer_server_id: &str,
        session_id: &str,
        event: &Event,
    ) -> Result<Applied, OrchestratorError> {
        self.apply_traced(peer_server_id, session_id, event, None)
            .await
    }

    /// [`Orchestrator::apply`], with the `traceparent` the event came with: a delegation created by a
    /// peer's message continues the peer's trace, so that one delegation is one trace on both sides.
    pub async fn apply_traced(
        &self,
        peer_server_id: &str,
        session_id: &str,
        event: &Event,
        traceparent: Option<&str>,
    ) -> Result<Applied, OrchestratorError> {
        let key = delegation_key(peer_server_id, session_id);
        let span = self
            .step_span(&key, peer_server_id, session_id, event, traceparent)
            .await;
        tracing::Instrument::instrument(self.apply_locked(key, event, traceparent, None), span)
            .await
    }

    /// [`Orchestrator::apply_traced`] for a peer's message that carries a secret (START's account,
    /// PREPARED's key, sealed by the gateway): the secret is lodged with auth only if the decision accepts
    /// the message, and before that decision is committed. A refused message leaves no secret anywhere;
    /// an accepted one is never ahead of its secret (the commands it starts fetch it); a secret auth does
    /// not keep commits nothing (503: the peer sends the message again).
    async fn apply_peer(
        &self,
        message: &pb::PeerMessage,
        event: &Event,
        traceparent: Option<&str>,
        lodge: Option<&Lodge>,
    ) -> Result<Applied, OrchestratorError> {
        let key = delegation_key(&message.sender, &message.session_id);
        let span = self
            .step_span(
                &key,
                &message.sender,
                &message.session_id,
                event,
                traceparent,
            )
            .await;
        tracing::Instrument::instrument(self.apply_locked(key, event, traceparent, lodge), span)
            .await
    }

    /// Hands a sealed secret to auth (`req.auth.lodge`); `Err` says why it was not kept.
    async fn lodge(&self, lodge: &Lodge, traceparent: Option<&str>) -> Result<(), String> {
        let subject = self
            .inner
            .config
            .names
            .subject(Area::Req, "auth.lodge")
            .map_err(|e| e.to_string())?;
        let mut headers = typed_headers("dmd.bus.v1.Lodge");
        if let Some(tp) = traceparent {
            headers.insert("traceparent", tp);
        }
        let answer = self
            .inner
            .bus
            .request(
                &subject,
                headers,
                Bytes::from(lodge.encode_to_vec()),
                LODGE_TIMEOUT,
            )
            .await
            .map_err(|e| format!("auth did not answer: {e}"))?;
        match LodgeAnswer::decode(answer.payload) {
            Ok(a) if a.ok => Ok(()),
            Ok(a) => Err(a.reason),
            Err(_) => Err("auth's answer does not decode".into()),
        }
    }

    /// The span of one step (one event decided): child of the context the event came with, else of the
    /// delegation's stored trace (a timer, an operator's request), so that one delegation is one trace.
    async fn step_span(
        &self,
        key: &str,
        peer_server_id: &str,
        session_id: &str,
        event: &Event,
        traceparent: Option<&str>,
    ) -> tracing::Span {
        if !dm_telemetry::enabled() {
            return tracing::Span::none();
        }
        let name = event_name(event);
        let span = tracing::info_span!(
            parent: None,
            "dmd.orchestrator.step",
            otel.name = %format!("step {name}"),
            dmd.deployment = %self.inner.config.names.deployment(),
            dmd.server_id = %self.inner.config.server_id,
            dmd.peer_server_id = %peer_server_id,
            dmd.session_id = %session_id,
            dmd.event = %name,
            dmd.phase = tracing::field::Empty,
            dmd.answer = tracing::field::Empty,
        );
        let stored = match traceparent {
            Some(tp) => Some(tp.to_string()),
            None => match self.load(key).await {
                Ok(Some((stored, _))) => {
                    stored.state.and_then(|s| traceparent_of_trace(&s.trace_id))
                }
                _ => None,
            },
        };
        dm_telemetry::follow(&span, stored.as_deref(), None);
        span
    }

    async fn apply_locked(
        &self,
        key: String,
        event: &Event,
        traceparent: Option<&str>,
        lodge: Option<&Lodge>,
    ) -> Result<Applied, OrchestratorError> {
        let _guard = self.shard(&key).lock().await;
        // Set once this call claimed the device for a new delegation: released if nothing is stored.
        let mut claimed: Option<NewClaim> = None;
        let result = self
            .decide_and_commit(&key, event, traceparent, lodge, &mut claimed)
            .await;
        // Refused before anything was written: the claim goes. Once the state may have been written
        // (even if the call then failed: a publish, a write whose answer was lost), the claim stays with
        // the stored delegation, or lapses after PENDING_MS if nothing was stored.
        if let Some(NewClaim {
            dev_id,
            written: false,
        }) = &claimed
            && let Err(e) = self.inner.claims.release(dev_id, &key).await
        {
            tracing::warn!(error = %e, "a claim could not be released; it lapses by itself");
        }
        result
    }

    fn shard(&self, key: &str) -> &Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let at = usize::try_from(h.finish() % SHARDS as u64).unwrap_or(0);
        &self.inner.shards[at]
    }

    async fn decide_and_commit(
        &self,
        key: &str,
        event: &Event,
        traceparent: Option<&str>,
        lodge: Option<&Lodge>,
        claimed: &mut Option<NewClaim>,
    ) -> Result<Applied, OrchestratorError> {
        let key = key.to_string();
        let mut from_cache = true;
        for _ in 0..16 {
            // The state this replica stored last, if it is still the one in force; else read it.
            let cached = if from_cache { self.cached(&key) } else { None };
            from_cache = cached.is_some();
            let loaded = match cached {
                Some((revision, state)) => Some((
                    StoredDelegation {
                        state: Some(state),
                        outbox: Vec::new(),
                    },
                    revision,
                )),
                None => self.load(&key).await?,
            };
            // A decision committed earlier whose commands were not all published (a failed publish, a
            // crash between write and publish): publish them now, with their ids, before anything else
            // overwrites the outbox (ARCHITECTURE rule 2).
            if let Some((stored, rev)) = &loaded
                && !stored.outbox.is_empty()
                && let Some(state) = &stored.state
                && !self.was_published(&key, *rev)
            {
                self.flush(&key, state, &stored.outbox, *rev).await?;
                self.settle(&key, state, *rev).await?;
                // In progress, nothing was written: decide on what was loaded (this decision's write
                // replaces the outbox). A resting record was cleared: read it again.
                if at_rest(state) {
                    continue;
                }
            }
            let (state, revision) = match &loaded {
                Some((stored, rev)) => (stored.state.clone(), Some(*rev)),
                None => (None, None),
            };
            let now = now_ms();
            // One delegation in progress per device, and no overlap with an Active scope (rule 9): a
            // new delegation claims its device before it is stored.
            if state.is_none()
                && claimed.is_none()
                && let Some((dev_id, scope)) = start_of(event)
            {
                match self.inner.claims.claim(&dev_id, &scope, &key, now).await? {
                    Claimed::Yes => {
                        *claimed = Some(NewClaim {
                            dev_id,
                            written: false,
                        })
                    }
                    Claimed::Conflict => {
                        return Ok(Applied {
                            answer: Answer::Rejected {
                                status: 409,
                                reason: "the device already has a delegation in progress or an \
                                         overlapping one"
                                    .into(),
                            },
                            state: None,
                        });
                    }
                }
            }
            let decision = self.inner.decider.decide(state.clone(), event, now);
            if from_cache && (decision.answer != Answer::Accepted || decision.state.is_none()) {
                // Refused or ignored on the state this replica stored last: another replica may have
                // moved the delegation since. Decided again on the stored state (nothing written
                // proves a cached state current).
                from_cache = false;
                continue;
            }
            if decision.answer != Answer::Accepted {
                return Ok(Applied {
                    answer: decision.answer,
                    state,
                });
            }
            let Some(mut new_state) = decision.state else {
                return Ok(Applied {
                    answer: decision.answer,
                    state: None,
                });
            };
            // The message's secret goes to auth now that the message is accepted, before the decision
            // is stored: a refused message put nothing on the bus, and the commands of this decision
            // find the secret kept.
            if lodge.is_some() && from_cache {
                // A secret is handed to auth only on a decision taken on the stored state (a stale
                // one could lodge the secret of a message the real state refuses).
                from_cache = false;
                continue;
            }
            if let Some(lodge) = lodge
                && let Err(reason) = self.lodge(lodge, traceparent).await
            {
                tracing::warn!(%reason, "auth did not keep the message's secret; answering 503");
                return Ok(Applied {
                    answer: Answer::Rejected {
                        status: 503,
                        reason: "the message's secret could not be stored; retry later".into(),
                    },
                    state,
                });
            }
            if new_state.trace_id.is_empty() {
                new_state.trace_id = traceparent
                    .and_then(trace_id_of)
                    .or_else(|| dm_telemetry::trace_id(&tracing::Span::current()))
                    .unwrap_or_else(new_trace_id);
            }
            // Every stored change is in the audit trail, with who caused it, written with the state (the
            // outbox): it cannot be lost between the write and its record (ARCHITECTURE rule 12).
            let audited = audit_commands(
                decision.commands.clone(),
                state.as_ref(),
                &new_state,
                event,
                &decision.answer,
            );
            let stored = StoredDelegation {
                state: Some(new_state.clone()),
                outbox: audited.clone(),
            };
            let bytes = Bytes::from(stored.encode_to_vec());
            if let Some(c) = claimed.as_mut() {
                c.written = true;
            }
            let written = match revision {
                None => self.inner.kv.create(&key, bytes).await,
                Some(rev) => self.inner.kv.update(&key, bytes, rev).await,
            };
            let revision = match written {
                Ok(rev) => rev,
                Err(BusError::Conflict(_)) => {
                    // Moved by another replica: decided again on the stored state.
                    from_cache = false;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            self.inner
                .timers
                .track_at(&key, new_state.timer.as_ref(), revision);
            metrics::record(
                self.inner.config.names.deployment(),
                state.as_ref(),
                &new_state,
                now,
            );
            // A delegation that ended holds its device no more.
            let held_before = state.as_ref().map_or(Claim::None, claim_of);
            if claim_of(&new_state) == Claim::None
                && (held_before != Claim::None || claimed.is_some())
                && let Some(device) = &new_state.device
                && let Err(e) = self.inner.claims.release(&device.dev_id, &key).await
            {
                tracing::warn!(error = %e, "a claim could not be released; it is dropped at the next start");
            }
            let span = tracing::Span::current();
            span.record("dmd.phase", new_state.phase().as_str_name());
            span.record("dmd.answer", decision.answer.http_status());
            self.log_failure(state.as_ref(), &new_state);
            // Watchers (the admin API, the demo) see every stored state.
            let _ = self.inner.changes.send(new_state.clone());
            match self.flush(&key, &new_state, &audited, revision).await {
                Ok(()) if !audited.is_empty() => {
                    // Out on the bus; a resting record whose outbox could not be cleared keeps it (a
                    // restart publishes it again, with the same ids).
                    if let Err(e) = self.settle(&key, &new_state, revision).await {
                        tracing::warn!(error = %e, "a published outbox could not be settled");
                    }
                }
                Ok(()) => {}
                // The decision is stored, its commands with it (the outbox): it stands, and its
                // commands go out as soon as the bus takes them. Failing the call instead would lose a
                // peer's message whose sender gives up before a stream is back (a JetStream leader
                // being elected after a node died took longer than a sender's deadline).
                Err(e) => {
                    tracing::warn!(error = %e, "a stored decision's commands are not out yet; publishing them in the background");
                    self.publish_later(key.clone(), new_state.clone(), audited.clone(), revision);
                }
            }
            return Ok(Applied {
                answer: decision.answer,
                state: Some(new_state),
            });
        }
        Err(OrchestratorError::Contention(key))
    }

    /// Says why a delegation failed, once, when its fault first appears (issue 11: the default log level
    /// tells why any delegation failed). Never a secret: the step, the status code and the reason.
    fn log_failure(&self, before: Option<&DelegationState>, after: &DelegationState) {
        let Some(fault) = &after.fault else {
            return;
        };
        if before.and_then(|b| b.fault.as_ref()) == Some(fault) {
            return;
        }
        tracing::warn!(
            deployment = %self.inner.config.names.deployment(),
            peer = %after.peer_server_id,
            session = %after.session_id,
            device = %after.device.as_ref().map(|d| d.dev_id.as_str()).unwrap_or_default(),
            role = %after.role().as_str_name(),
            step = fault.step,
            code = fault.status_code,
            from_peer = fault.from_peer,
            reason = %fault.reason,
            "delegation failed"
        );
    }

    /// Whether this replica published the outbox stored at `revision` in full.
    fn was_published(&self, key: &str, revision: u64) -> bool {
        let published = self
            .inner
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        published.get(key).is_some_and(|(r, _)| *r == revision)
    }

    /// The state this replica stored last for a delegation in progress, with its revision.
    fn cached(&self, key: &str) -> Option<(u64, DelegationState)> {
        let published = self
            .inner
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        published.get(key).cloned()
    }

    /// After a flush: a delegation at rest gets its outbox cleared (if the state is unchanged) and is
    /// forgotten here; one in progress is noted as published, its outbox left for the next decision.
    async fn settle(
        &self,
        key: &str,
        state: &DelegationState,
        revision: u64,
    ) -> Result<(), OrchestratorError> {
        {
            let mut published = self
                .inner
                .published
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if at_rest(state) {
                published.remove(key);
            } else {
                if published.len() >= PUBLISHED_MAX {
                    published.clear();
                }
                published.insert(key.to_string(), (revision, state.clone()));
                return Ok(());
            }
        }
        let cleared = StoredDelegation {
            state: Some(state.clone()),
            outbox: Vec::new(),
        };
        // A newer decision may have been stored meanwhile: its own outbox stays.
        match self
            .inner
            .kv
            .update(key, Bytes::from(cleared.encode_to_vec()), revision)
            .await
        {
            Ok(_) | Err(BusError::Conflict(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Publishes a stored decision's outbox until the bus takes it, or until a later decision on the
    /// delegation was stored (which published it before deciding: it was not seen published here).
    fn publish_later(
        &self,
        key: String,
        state: DelegationState,
        commands: Vec<pb::Command>,
        revision: u64,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(250);
            loop {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
                // In the delegation's order: no decision on it runs meanwhile here.
                let _guard = this.shard(&key).lock().await;
                match this.inner.kv.get(&key).await {
                    Ok(Some(entry)) if entry.revision == revision => {}
                    Ok(_) => return,
                    Err(_) => continue,
                }
                if let Err(e) = this.flush(&key, &state, &commands, revision).await {
                    tracing::warn!(error = %e, retry_in = ?pause, "a stored decision's commands are still not out");
                    continue;
                }
                if !commands.is_empty()
                    && let Err(e) = this.settle(&key, &state, revision).await
                {
                    tracing::warn!(error = %e, "a published outbox could not be settled");
                }
                return;
            }
        });
    }

    /// Publishes the commands of a committed decision (the outbox stays; see [`Self::settle`]).
    async fn flush(
        &self,
        key: &str,
        state: &DelegationState,
        commands: &[pb::Command],
        revision: u64,
    ) -> Result<(), OrchestratorError> {
        let names = &self.inner.config.names;
        let delegation = reference(state);
        let headers = |type_name: &str| {
            let mut h = typed_headers(type_name);
            if let Some(tp) = traceparent(&state.trace_id) {
                h.insert("traceparent", tp);
            }
            h
        };
        for (index, cmd) in commands.iter().enumerate() {
            let outbox_id = format!("{key}:{revision}:{index}");
            match &cmd.kind {
                Some(command::Kind::Audit(record)) => {
                    // Batched with the records of other decisions ready at the same moment; no trace
                    // header (a batch spans delegations).
                    self.inner
                        .audit
                        .write(AuditEvent {
                            delegation: Some(delegation.clone()),
                            record: Some(record.clone()),
                            at_ms: now_ms(),
                            revision,
                            outbox_id,
                        })
                        .await?;
                }
                // Timers are in the state; the index was refreshed when it was stored.
                Some(command::Kind::ArmTimer(_)) | Some(command::Kind::CancelTimer(_)) | None => {}
                Some(_) => {
                    let Some((service, verb)) = route(cmd) else {
                        continue;
                    };
                    let envelope = CommandEnvelope {
                        delegation: Some(delegation.clone()),
                        command: Some(cmd.clone()),
                        del_type: state.del_type,
                        scope: state.scope.clone(),
                        not_after_ms: state.not_after_ms,
                        outbox_id: outbox_id.clone(),
                    };
                    self.inner
                        .bus
                        .publish(
                            &names.subject(Area::Cmd, &format!("{service}.{verb}"))?,
                            headers("dmd.bus.v1.CommandEnvelope"),
                            Bytes::from(envelope.encode_to_vec()),
                            &outbox_id,
                        )
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Serves the inputs until `shutdown`: service events, inbound peer messages, timers. Inputs are
    /// decided concurrently across delegations and in arrival order for each one: every input goes to the
    /// lane its delegation's key falls on, and each lane decides one input at a time. A full lane holds
    /// the intake back (bounded work in flight).
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), OrchestratorError> {
        let names = self.inner.config.names.clone();
        let events_config = ConsumerConfig {
            stream: names.stream(Area::Evt),
            durable: names.consumer("orchestrator")?,
            filter: names.area_wildcard(Area::Evt),
            ack_wait: self.inner.config.ack_wait,
        };
        // A NATS outage or a lost consumer never ends the service: the queue opens itself again.
        let mut events = dm_bus::stack::Reopening::open(
            self.inner.bus.clone(),
            events_config,
            "orchestrator",
            (Duration::from_millis(250), Duration::from_secs(30)),
        )
        .await?;
        let consumer = dm_metrics::global().consumer(names.deployment(), "orchestrator");
        let mut peer = self
            .inner
            .bus
            .serve(
                &names.subject(Area::Req, "orchestrator.peer")?,
                &names.queue_group("orchestrator")?,
            )
            .await?;
        // Timers armed by any replica are indexed here too: whichever replica sees one due first fires
        // it, and the decider's fence makes the others' firings no-ops (ARCHITECTURE rules 4 and 13).
        let watcher = tokio::spawn(self.clone().watch_timers());
        let mut lanes = Vec::with_capacity(LANES);
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..LANES {
            let (tx, rx) = tokio::sync::mpsc::channel(LANE_DEPTH);
            lanes.push(tx);
            workers.spawn(self.clone().lane(rx));
        }
        let lane = |key: &str| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            lanes[usize::try_from(h.finish() % LANES as u64).unwrap_or(0)].clone()
        };
        tokio::pin!(shutdown);
        let ended = loop {
            let next_timer = self.inner.timers.next_due();
            let sleep = tokio::time::sleep(next_timer.map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis(u64::try_from((at - now_ms()).max(0)).unwrap_or(0))
            }));
            let job = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                delivery = events.next() => {
                    let Some(delivery) = delivery else { break Ok(()) };
                    consumer.redelivered(delivery.attempt);
                    match EventEnvelope::decode(delivery.message.payload.clone()) {
                        Ok(EventEnvelope { delegation: Some(d), event: Some(event) }) => {
                            let key = delegation_key(&d.peer_server_id, &d.session_id);
                            Some((key, Input::Event { delivery, delegation: d, event }))
                        }
                        _ => {
                            if let Err(e) = delivery.term().await {
                                tracing::warn!(error = %e, "an unreadable event could not be terminated");
                            }
                            None
                        }
                    }
                }
                request = peer.next() => {
                    let Some(request) = request else { break Ok(()) };
                    match InboundPeerMessage::decode(request.message.payload.clone()) {
                        Ok(InboundPeerMessage { message: Some(m), lodge }) => {
                            let key = delegation_key(&m.sender, &m.session_id);
                            Some((key, Input::Peer { request, message: m, lodge }))
                        }
                        _ => {
                            let answer = InboundAnswer { http_status: 400, reason: "malformed request".into() };
                            let _ = request
                                .respond(typed_headers("dmd.bus.v1.InboundAnswer"), Bytes::from(answer.encode_to_vec()))
                                .await;
                            None
                        }
                    }
                }
                // A timer armed outside this loop (operator requests, peer messages) may be due earlier.
                _ = self.inner.timers.changed() => None,
                _ = sleep, if next_timer.is_some() => {
                    for (key, id) in self.inner.timers.take_due(now_ms()) {
                        if lane(&key).send(Input::Timer { key: key.clone(), id }).await.is_err() {
                            break;
                        }
                    }
                    None
                }
            };
            if let Some((key, input)) = job
                && lane(&key).send(input).await.is_err()
            {
                break Ok(());
            }
        };
        // The lanes finish what they hold; what was not acked is delivered again later.
        watcher.abort();
        drop(lanes);
        while workers.join_next().await.is_some() {}
        ended
    }

    /// Indexes the timer of every write to the delegations bucket, whoever made it. A broken watch is
    /// opened again, after indexing what was stored meanwhile.
    async fn watch_timers(self) {
        let mut attempts = 0u64;
        loop {
            match self.inner.kv.watch().await {
                Ok(mut watch) => {
                    if attempts > 0 {
                        // Writes made while the watch was down: read what is stored now.
                        if let Err(e) = self.index_all_timers().await {
                            tracing::warn!(error = %e, "timers could not be indexed again");
                        }
                    }
                    attempts = 0;
                    loop {
                        match watch.next().await {
                            Ok(Some(change)) => {
                                let timer = change.value.as_ref().and_then(|v| {
                                    StoredTimerView::decode(v.clone())
                                        .ok()
                                        .and_then(|view| view.state)
                                        .and_then(|state| state.timer)
                                });
                                self.inner.timers.track_at(
                                    &change.key,
                                    timer.as_ref(),
                                    change.revision,
                                );
                            }
                            Ok(None) => return,
                            Err(e) => {
                                tracing::warn!(error = %e, "the timer watch failed; reopening it");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the timer watch cannot be opened yet"),
            }
            attempts += 1;
            tokio::time::sleep(dm_bus::stack::backoff(
                attempts,
                Duration::from_millis(250),
                Duration::from_secs(30),
            ))
            .await;
        }
    }

    async fn index_all_timers(&self) -> Result<(), OrchestratorError> {
        for key in self.inner.kv.keys().await? {
            if let Some((stored, revision)) = self.load(&key).await? {
                let timer = stored.state.and_then(|s| s.timer);
                self.inner.timers.track_at(&key, timer.as_ref(), revision);
            }
        }
        Ok(())
    }

    /// One lane: decides its inputs one at a time. No error ends it: an event that could not be decided
    /// is delivered again, a peer gets 503, a timer is tried again.
    async fn lane(self, mut inputs: tokio::sync::mpsc::Receiver<Input>) {
        while let Some(input) = inputs.recv().await {
            match input {
                Input::Event {
                    delivery,
                    delegation,
                    event,
                } => {
                    let tp = delivery
                        .message
                        .headers
                        .get("traceparent")
                        .map(str::to_string);
                    let settled = match self
                        .apply_traced(
                            &delegation.peer_server_id,
                            &delegation.session_id,
                            &event,
                            tp.as_deref(),
                        )
                        .await
                    {
                        Ok(_) => delivery.ack().await,
                        // An event that keeps failing is poison: dropped, with a dead-letter record in
                        // the audit stream, instead of looping for ever.
                        Err(e) if delivery.attempt >= MAX_DELIVER => {
                            tracing::warn!(error = %e, attempt = delivery.attempt, "event dropped as poison");
                            dm_metrics::global()
                                .consumer(self.inner.config.names.deployment(), "orchestrator")
                                .dead_letter();
                            if let Ok(subject) =
                                self.inner.config.names.subject(Area::Audit, "dead")
                            {
                                dm_bus::stack::record_dead_letter(
                                    &self.inner.bus,
                                    "orchestrator",
                                    &subject,
                                    &delivery.message,
                                    &format!("gave up after {} attempts: {e}", delivery.attempt),
                                )
                                .await;
                            }
                            delivery.term().await
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "event not applied; will be delivered again");
                            let pause = dm_bus::stack::backoff(
                                delivery.attempt,
                                Duration::from_millis(250),
                                Duration::from_secs(30),
                            );
                            delivery.nak(pause).await
                        }
                    };
                    if let Err(e) = settled {
                        tracing::warn!(error = %e, "an event could not be acknowledged; it comes again");
                    }
                }
                Input::Peer {
                    request,
                    message,
                    lodge,
                } => {
                    let event = Event {
                        kind: Some(event::Kind::Peer(message.clone())),
                    };
                    let tp = request
                        .message
                        .headers
                        .get("traceparent")
                        .map(str::to_string);
                    let answer = match self
                        .apply_peer(&message, &event, tp.as_deref(), lodge.as_ref())
                        .await
                    {
                        Ok(applied) => InboundAnswer {
                            http_status: applied.answer.http_status(),
                            reason: match applied.answer {
                                Answer::Rejected { reason, .. } => reason,
                                _ => String::new(),
                            },
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "peer message not decided");
                            InboundAnswer {
                                http_status: 503,
                                reason: "try again later".into(),
                            }
                        }
                    };
                    let _ = request
                        .respond(
                            typed_headers("dmd.bus.v1.InboundAnswer"),
                            Bytes::from(answer.encode_to_vec()),
                        )
                        .await;
                }
                Input::Timer { key, id } => self.fire(&key, id).await,
            }
        }
    }

    /// A timer came due: the decider gets it (and ignores it unless it is still the armed one).
    async fn fire(&self, key: &str, id: u64) {
        let event = Event {
            kind: Some(event::Kind::Timer(pb::TimerFired { id })),
        };
        let fired = match self.load(key).await {
            Ok(Some((stored, _))) => match stored.state {
                Some(state) => self
                    .apply(&state.peer_server_id, &state.session_id, &event)
                    .await
                    .map(|_| ()),
                None => Ok(()),
            },
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = fired {
            // Try again a little later with whatever timer is stored now (not the one that fired: a
            // newer one may have been armed meanwhile).
            tracing::warn!(error = %e, "timer not applied; retrying");
            let retry = pb::Timer {
                id,
                at_ms: now_ms() + 1000,
                kind: 0,
            };
            let stored_timer = match self.load(key).await {
                Ok(Some((stored, _))) => stored.state.and_then(|s| s.timer),
                _ => Some(retry),
            };
            let timer = stored_timer.map(|t| pb::Timer {
                at_ms: t.at_ms.max(now_ms() + 1000),
                ..t
            });
            self.inner.timers.track(key, timer.as_ref());
        }
    }
}

/// How long auth may take to keep a peer message's secret (the gateway waits for the whole decision).
const LODGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts after which an event that cannot be decided is dropped as poison (with a dead-letter record).
const MAX_DELIVER: u64 = 20;

/// How many lanes decide inputs at once, and how many inputs each holds before the intake waits.
const LANES: usize = 64;
const LANE_DEPTH: usize = 16;

/// One input of the run loop, for a lane.
enum Input {
    Event {
        delivery: dm_bus::Delivery,
        delegation: DelegationRef,
        event: Event,
    },
    Peer {
        request: dm_bus::Request,
        message: pb::PeerMessage,
        /// The message's secret, sealed for auth (START, PREPARED).
        lodge: Option<Lodge>,
    },
    Timer {
        key: String,
        id: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_come_only_from_valid_traceparents() {
        let tp = "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01";
        assert_eq!(
            trace_id_of(tp).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
            "garbage",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
        let id = new_trace_id();
        let made = traceparent(&id).unwrap_or_default();
        assert_eq!(trace_id_of(&made), Some(id));
    }
}
