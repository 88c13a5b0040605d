//! Outbound: the saga's `Send` commands (`cmd.gateway.send`) become delegation messages POSTed to the
//! peer over mutual TLS.
//!
//! Per delegation the commands run one after the other, each until its final answer (A.2: a message is
//! sent only after the previous one was answered); different delegations run side by side. A message is
//! retried with exponential back-off and the same MsgID on network errors and 503 until the send deadline.
//! The command is acknowledged once the message was answered, whatever the status, or given up; there is
//! no outcome event (a delivery that outlasts the step is the saga's deadline). Requests go over the
//! peer's pooled connections ([`crate::pool`]).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dm_bus::{Area, Bus, BusError, ConsumerConfig, Delivery, Names};
use dm_proto::bus::v1::{CommandEnvelope, DelegationRef, Fetch, FetchAnswer, fetch};
use dm_protocol::delegation::{self, TempDelegationKey};
use dm_protocol::types::UtcTime;
use dm_saga::pb::command;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

use crate::ask::{AskError, TRACE_HEADERS, ask};
use crate::config::{Endpoint, Timeouts};
use crate::convert::{Secret, outbound_message, secret_needed};
use crate::pool::{self, Pool};

/// Largest answer body read from a peer (a `<DelegationError>` is small).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Where and how to reach one peer.
pub(crate) struct PeerTarget {
    pub endpoint: Endpoint,
    pub server_name: ServerName<'static>,
    pub connector: TlsConnector,
    /// Open connections to the peer, for reuse.
    pub pool: Pool,
}

impl std::fmt::Debug for PeerTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTarget")
            .field("endpoint", &self.endpoint.uri)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Outbound {
    pub bus: Bus,
    /// Per delegation, the `seq` of the last message of this side that was answered or given up (shared
    /// by every gateway replica: the order of a delegation's messages does not depend on which one holds
    /// which message).
    pub sent: dm_bus::Kv,
    /// What this replica wrote to `sent` last, per delegation: (`seq`, revision). A hint that saves the
    /// reads before and after a send while one replica carries a delegation's messages; the value only
    /// grows, and a write from a stale revision is refused by compare-and-set and read again.
    pub sent_here: std::sync::Mutex<HashMap<String, (u64, u64)>>,
    pub names: Names,
    pub server_id: String,
    pub peers: HashMap<String, PeerTarget>,
    pub timeouts: Timeouts,
    pub fetch_subject: String,
    /// Opens what auth hands out (sealed for this deployment).
    pub bus_key: dm_seal::BusKey,
}

/// The encoded message: it may hold a secret, so it never shows in `Debug`.
struct Wire(Bytes);

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wire(<{} bytes>)", self.0.len())
    }
}

/// Why one attempt did not get a final answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("timed out")]
    TimedOut,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The peer answered with this status (final).
    Answered(u16),
    /// Not sent and never will be: acknowledge and forget (the saga's deadline handles the delegation).
    GaveUp(String),
    /// Cannot ever be handled (malformed command, unknown peer): terminated.
    Invalid(String),
}

fn now_utc() -> UtcTime {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default();
    UtcTime::from_unix(secs)
}

/// The back-off before retry number `n` (0-based): `min · 2ⁿ`, at most `max`, with jitter in its upper
/// half so that many senders do not retry in step.
pub(crate) fn backoff(n: u32, min: Duration, max: Duration) -> Duration {
    let base = min
        .checked_mul(2u32.saturating_pow(n.min(20)))
        .unwrap_or(max)
        .min(max);
    let half = base / 2;
    let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    half + Duration::from_millis(if jitter_ms == 0 {
        0
    } else {
        rand::random_range(0..=jitter_ms)
    })
}

/// Entries of [`Outbound::sent_here`] before it is emptied (each costs one read at most).
const SENT_HERE_MAX: usize = 16_384;

/// The `seq` a record of the `sent` bucket holds (the last message of its delegation that is done).
/// The pause before the next attempt: the back-off, or longer when a 503's `Retry-After` asks for it
/// (never longer than `retry_max`, so that a peer cannot park a message past its deadline by asking).
pub(crate) fn retry_pause(
    backoff: Duration,
    asked: Option<Duration>,
    retry_max: Duration,
) -> Duration {
    match asked {
        Some(wait) => backoff.max(wait.min(retry_max)),
        None => backoff,
    }
}

fn done_seq(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn lane_key(d: &DelegationRef) -> String {
    format!("{}/{}", d.peer_server_id, d.session_id.to_ascii_lowercase())
}

impl Outbound {
    /// Consumes `cmd.gateway.send` until `stop` turns true. Commands of one delegation go through one lane,
    /// in order.
    pub(crate) async fn run(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), BusError> {
        let consumer_config = ConsumerConfig {
            stream: self.names.stream(Area::Cmd),
            durable: self.names.consumer("gateway")?,
            filter: self.names.commands_for("gateway")?,
            ack_wait: self.timeouts.ack_wait,
        };
        // A NATS outage or a lost consumer never ends the gateway: the queue opens itself again.
        let mut consumer = dm_bus::stack::Reopening::open(
            self.bus.clone(),
            consumer_config,
            "gateway",
            (Duration::from_millis(250), Duration::from_secs(30)),
        )
        .await?;
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
        // Per lane: the queue into its worker and how many commands it holds.
        let mut lanes: HashMap<
            String,
            (mpsc::UnboundedSender<(Delivery, CommandEnvelope)>, usize),
        > = HashMap::new();
        let mut workers = JoinSet::new();
        // Idle connections are also checked when taken; the sweep closes those of quiet peers.
        let mut sweep = tokio::time::interval(pool::IDLE_TIMEOUT / 2);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::stopped(&mut stop) => break,
                _ = sweep.tick() => {
                    for target in self.peers.values() {
                        target.pool.sweep();
                    }
                }
                Some(key) = done_rx.recv() => {
                    if let Some((_, pending)) = lanes.get_mut(&key) {
                        *pending = pending.saturating_sub(1);
                        if *pending == 0 {
                            // Nothing queued: dropping the sender ends the worker.
                            lanes.remove(&key);
                        }
                    }
                }
                Some(_) = workers.join_next(), if !workers.is_empty() => {}
                delivery = consumer.next() => {
                    let Some(delivery) = delivery else { break };
                    let envelope = match CommandEnvelope::decode(delivery.message.payload.clone()) {
                        Ok(e) => e,
                        Err(_) => {
                            tracing::error!("undecodable gateway command dropped");
                            if let Err(e) = delivery.term().await {
                                tracing::warn!(error = %e, "a command could not be dropped; it comes back");
                            }
                            continue;
                        }
                    };
                    let Some(delegation) = envelope.delegation.clone() else {
                        tracing::error!(outbox_id = %envelope.outbox_id, "gateway command without delegation dropped");
                        if let Err(e) = delivery.term().await {
                            tracing::warn!(error = %e, "a command could not be dropped; it comes back");
                        }
                        continue;
                    };
                    let key = lane_key(&delegation);
                    let lane = lanes.entry(key.clone()).or_insert_with(|| {
                        let (tx, rx) = mpsc::unbounded_channel();
                        workers.spawn(self.clone().lane(key.clone(), rx, done_tx.clone(), stop.clone()));
                        (tx, 0)
                    });
                    lane.1 += 1;
                    if lane.0.send((delivery, envelope)).is_err() {
                        // The worker is gone (it panicked): the delivery was dropped with it and comes back.
                        lanes.remove(&key);
                    }
                }
            }
        }
        // The lanes hand back what they hold (nak): it is delivered again, to another replica or to this one
        // after a restart, and sent with the same MsgID. A lane that does not finish in time is dropped;
        // its commands come back after the ack wait.
        drop(lanes);
        let drained = tokio::time::timeout(Duration::from_secs(2), async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            workers.abort_all();
        }
        for target in self.peers.values() {
            target.pool.clear();
        }
        Ok(())
    }

    async fn lane(
        self: Arc<Self>,
        key: String,
        mut rx: mpsc::UnboundedReceiver<(Delivery, CommandEnvelope)>,
        done: mpsc::UnboundedSender<String>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let next = tokio::select! {
                next = rx.recv() => next,
                _ = crate::stopped(&mut stop) => None,
            };
            let Some((delivery, envelope)) = next else {
                break;
            };
            let trace: Vec<(String, String)> = TRACE_HEADERS
                .iter()
                .filter_map(|h| {
                    delivery
                        .message
                        .headers
                        .get(h)
                        .map(|v| (h.to_string(), v.to_string()))
                })
                .collect();
            if !self.is_turn(&envelope).await {
                // The message before it is not answered yet (held here further back, or by another
                // replica): it waits apart, so that this lane goes on with what it holds.
                let me = self.clone();
                let stop = stop.clone();
                tokio::spawn(async move { me.wait_turn(delivery, envelope, trace, stop).await });
                let _ = done.send(key.clone());
                continue;
            }
            if self
                .carry(delivery, &envelope, &trace, &mut stop)
                .await
                .is_err()
            {
                break;
            }
            let _ = done.send(key.clone());
        }
        // What is still queued here goes back too.
        rx.close();
        while let Ok((delivery, _)) = rx.try_recv() {
            let _ = delivery.nak(Duration::ZERO).await;
        }
    }

    /// The `seq` of a send command (`None`: not a send).
    fn seq_of(envelope: &CommandEnvelope) -> Option<u64> {
        match envelope.command.as_ref().and_then(|c| c.kind.as_ref()) {
            Some(command::Kind::Send(send)) => Some(send.seq),
            _ => None,
        }
    }

    fn sent_key(envelope: &CommandEnvelope) -> Option<String> {
        envelope
            .delegation
            .as_ref()
            .map(|d| dm_bus::subjects::encode_key(&lane_key(d)))
    }

    /// Whether the message before this one (same delegation, `seq - 1`) was answered or given up.
    async fn is_turn(&self, envelope: &CommandEnvelope) -> bool {
        let (Some(seq), Some(key)) = (Self::seq_of(envelope), Self::sent_key(envelope)) else {
            return true;
        };
        if seq == 0 {
            return true;
        }
        if self
            .sent_here(&key)
            .is_some_and(|(done, _)| done + 1 >= seq)
        {
            return true;
        }
        match self.sent.get(&key).await {
            Ok(Some(e)) => done_seq(&e.value).is_some_and(|done| done + 1 >= seq),
            Ok(None) => false,
            // The store is away: better out of order than stuck.
            Err(_) => true,
        }
    }

    /// Records that the message `seq` of its delegation is done (answered, given up or refused).
    async fn mark_sent(&self, envelope: &CommandEnvelope) {
        let (Some(seq), Some(key)) = (Self::seq_of(envelope), Self::sent_key(envelope)) else {
            return;
        };
        let value = Bytes::from(seq.to_string());
        // The next message of the delegation waits for this record: a bus away (a NATS node lost, a
        // leader being elected) is waited out, up to the send deadline.
        let give_up_at = tokio::time::Instant::now() + self.timeouts.send_deadline;
        let mut attempt = 0u32;
        // First from what this replica wrote last (no read); then from what the store holds.
        let mut known = self.sent_here(&key);
        loop {
            let written = match known.take() {
                Some((done, _)) if done >= seq => return,
                Some((_, revision)) => self.sent.update(&key, value.clone(), revision).await,
                None => match self.sent.get(&key).await {
                    Ok(Some(e)) => {
                        if done_seq(&e.value).is_some_and(|d| d >= seq) {
                            return;
                        }
                        self.sent.update(&key, value.clone(), e.revision).await
                    }
                    Ok(None) => self.sent.create(&key, value.clone()).await,
                    Err(e) => Err(e),
                },
            };
            let e = match written {
                Ok(revision) => {
                    self.remember_sent(&key, seq, revision);
                    return;
                }
                Err(BusError::Conflict(_)) => continue,
                Err(e) => e,
            };
            let pause = backoff(attempt, Duration::from_millis(50), Duration::from_secs(2));
            if tokio::time::Instant::now() + pause >= give_up_at {
                tracing::warn!(outbox_id = %envelope.outbox_id, error = %e, "the order of sent messages could not be recorded");
                return;
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    fn sent_here(&self, key: &str) -> Option<(u64, u64)> {
        self.sent_here
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    fn remember_sent(&self, key: &str, seq: u64, revision: u64) {
        let mut known = self.sent_here.lock().unwrap_or_else(|e| e.into_inner());
        // A hint only: emptied when large rather than kept per delegation forever.
        if known.len() >= SENT_HERE_MAX {
            known.clear();
        }
        known.insert(key.to_string(), (seq, revision));
    }

    /// Holds a message (reporting it in progress) until the one before it is done, then carries it out.
    /// A message whose predecessor never comes goes anyway after the longest time that one could take
    /// (its holder's ack wait, then its send deadline).
    async fn wait_turn(
        self: Arc<Self>,
        delivery: Delivery,
        envelope: CommandEnvelope,
        trace: Vec<(String, String)>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let give_up_at =
            tokio::time::Instant::now() + self.timeouts.ack_wait + self.timeouts.send_deadline;
        let mut progress_at = tokio::time::Instant::now() + self.timeouts.ack_wait / 3;
        let mut pause = Duration::from_millis(20);
        while !self.is_turn(&envelope).await {
            let now = tokio::time::Instant::now();
            if now >= give_up_at {
                tracing::warn!(outbox_id = %envelope.outbox_id, "the message before this one never ended; sending out of order");
                break;
            }
            if now >= progress_at {
                let _ = delivery.progress().await;
                progress_at = now + self.timeouts.ack_wait / 3;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = crate::stopped(&mut stop) => {
                    let _ = delivery.nak(Duration::ZERO).await;
                    return;
                }
            }
            pause = (pause * 2).min(Duration::from_millis(500));
        }
        let _ = self.carry(delivery, &envelope, &trace, &mut stop).await;
    }

    /// Carries out one command and settles it; `Err` when stopping cut it short (it was handed back).
    async fn carry(
        &self,
        delivery: Delivery,
        envelope: &CommandEnvelope,
        trace: &[(String, String)],
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), ()> {
        let span = dm_bus::trace::process_span("gateway", &delivery.message);
        tracing::Instrument::instrument(self.carry_traced(delivery, envelope, trace, stop), span)
            .await
    }

    async fn carry_traced(
        &self,
        delivery: Delivery,
        envelope: &CommandEnvelope,
        trace: &[(String, String)],
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), ()> {
        {
            let outcome = tokio::select! {
                outcome = self.execute(envelope, trace) => outcome,
                _ = crate::stopped(stop) => {
                    // Stopping: hand the command back at once, to be sent (same MsgID) by whoever gets it.
                    let _ = delivery.nak(Duration::ZERO).await;
                    return Err(());
                }
            };
            // Done either way: the next message of the delegation may go.
            self.mark_sent(envelope).await;
            let settled = match &outcome {
                Outcome::Answered(status) => {
                    tracing::info!(outbox_id = %envelope.outbox_id, status, "message answered by the peer");
                    delivery.ack().await
                }
                Outcome::GaveUp(reason) => {
                    tracing::warn!(outbox_id = %envelope.outbox_id, %reason, "message given up");
                    delivery.ack().await
                }
                Outcome::Invalid(reason) => {
                    tracing::error!(outbox_id = %envelope.outbox_id, %reason, "gateway command cannot be carried out");
                    delivery.term().await
                }
            };
            if let Err(e) = settled {
                tracing::warn!(outbox_id = %envelope.outbox_id, error = %e, "command not acknowledged; it will be delivered again");
            }
        }
        Ok(())
    }

    /// Carries out one command until its final answer or its deadline.
    pub(crate) async fn execute(
        &self,
        envelope: &CommandEnvelope,
        trace: &[(String, String)],
    ) -> Outcome {
        let metrics = dm_metrics::global();
        let _in_flight = metrics.peer_in_flight(self.names.deployment(), "out");
        let deadline = tokio::time::Instant::now() + self.timeouts.send_deadline;
        let Some(delegation) = envelope.delegation.as_ref() else {
            return Outcome::Invalid("no delegation".into());
        };
        let Some(command::Kind::Send(send)) =
            envelope.command.as_ref().and_then(|c| c.kind.as_ref())
        else {
            return Outcome::Invalid("not a Send command".into());
        };
        let Some(target) = self.peers.get(&delegation.peer_server_id) else {
            return Outcome::Invalid(format!(
                "peer '{}' has no endpoint in the gateway configuration",
                delegation.peer_server_id
            ));
        };
        let Some(body) = send.body.as_ref() else {
            return Outcome::Invalid("the send command has no message body".into());
        };
        // The secret, fetched at send time; auth being away is retried like the network.
        let mut attempt = 0u32;
        let secret = match secret_needed(body) {
            None => None,
            Some(what) => loop {
                match self.fetch(delegation, what, trace).await {
                    Ok(secret) => break Some(secret),
                    Err(FetchError::Permanent(reason)) => return Outcome::GaveUp(reason),
                    Err(FetchError::Transient(reason)) => {
                        let pause =
                            backoff(attempt, self.timeouts.retry_min, self.timeouts.retry_max);
                        if tokio::time::Instant::now() + pause >= deadline {
                            return Outcome::GaveUp(format!(
                                "auth did not hand out the secret in time: {reason}"
                            ));
                        }
                        tracing::info!(%reason, "secret not fetched yet; retrying");
                        tokio::time::sleep(pause).await;
                        attempt += 1;
                    }
                }
            },
        };
        let message = match outbound_message(
            &self.server_id,
            &delegation.peer_server_id,
            &delegation.session_id,
            send,
            secret,
            now_utc(),
        ) {
            Ok(m) => m,
            Err(reason) => return Outcome::Invalid(reason),
        };
        let text = delegation::encode(&message);
        // What the peer would refuse as a 400 is not worth sending: check it as the peer will.
        if let Err(e) = delegation::decode(text.as_bytes()) {
            return Outcome::Invalid(format!("the message would not be valid: {e}"));
        }
        let wire = Wire(Bytes::from(text));
        let msg_id = message.msg_id.to_string();
        let kind = message.body.name();
        drop(message);
        let mut attempt = 0u32;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let limit = remaining.min(self.timeouts.request);
            // Every attempt carries the time it goes out: a retry never ages past the peer's window.
            let stamped = if attempt == 0 {
                None
            } else {
                Some(Wire(crate::guard::restamp(&wire.0, now_utc())))
            };
            let this_try = stamped.as_ref().unwrap_or(&wire);
            let result = match tokio::time::timeout(limit, self.post(target, this_try, trace)).await
            {
                Ok(r) => r,
                Err(_) => Err(AttemptError::TimedOut),
            };
            let status = match &result {
                Ok(a) => dm_metrics::Status::Code(a.status.as_u16()),
                Err(_) => dm_metrics::Status::Error,
            };
            metrics.peer_sent(self.names.deployment(), kind, status);
            let mut asked_wait = None;
            let retry_reason = match result {
                Ok(a) if a.status == StatusCode::SERVICE_UNAVAILABLE => {
                    asked_wait = a.retry_after;
                    "503".to_string()
                }
                Ok(a) => {
                    if a.status != StatusCode::ACCEPTED {
                        let reason = delegation::decode_error(&a.body)
                            .map(|e| e.reason)
                            .unwrap_or_default();
                        tracing::warn!(%msg_id, status = a.status.as_u16(), %reason, "peer refused the message");
                    }
                    return Outcome::Answered(a.status.as_u16());
                }
                Err(e) => e.to_string(),
            };
            let pause = retry_pause(
                backoff(attempt, self.timeouts.retry_min, self.timeouts.retry_max),
                asked_wait,
                self.timeouts.retry_max,
            );
            if tokio::time::Instant::now() + pause >= deadline {
                return Outcome::GaveUp(format!(
                    "no final answer before the send deadline (last: {retry_reason})"
                ));
            }
            tracing::info!(%msg_id, attempt, reason = %retry_reason, "retrying with the same MsgID");
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    async fn fetch(
        &self,
        delegation: &DelegationRef,
        what: fetch::What,
        trace: &[(String, String)],
    ) -> Result<Secret, FetchError> {
        let mut request = Fetch {
            delegation: Some(delegation.clone()),
            ..Default::default()
        };
        request.set_what(what);
        let answer: FetchAnswer = ask(
            &self.bus,
            &self.fetch_subject,
            &request,
            "dmd.bus.v1.Fetch",
            "FetchAnswer",
            trace,
            self.timeouts.auth,
        )
        .await
        .map_err(|e: AskError| FetchError::Transient(e.to_string()))?;
        if !answer.found {
            return Err(FetchError::Permanent(format!(
                "auth has no {} for this delegation: {}",
                what.as_str_name(),
                answer.reason
            )));
        }
        let field = match what {
            fetch::What::OwnAccount => dm_seal::field::OWN_ACCOUNT,
            fetch::What::TempKey => dm_seal::field::TEMP_KEY,
            _ => return Err(FetchError::Permanent("unexpected secret kind".into())),
        };
        let record =
            dm_bus::subjects::delegation_key(&delegation.peer_server_id, &delegation.session_id);
        let value = self
            .bus_key
            .open(
                &record,
                field,
                dm_seal::Direction::FromAuth,
                &answer.sealed_value,
            )
            .map_err(|_| {
                FetchError::Permanent(
                    "the secret from auth does not open (another master key, or tampered)".into(),
                )
            })?;
        match what {
            fetch::What::OwnAccount => dm_protocol::tnds::decode(&value)
                .map(Secret::OwnAccount)
                .map_err(|e| {
                    FetchError::Permanent(format!("the account from auth is not TNDS: {e}"))
                }),
            fetch::What::TempKey => std::str::from_utf8(&value)
                .ok()
                .and_then(|s| TempDelegationKey::from_str(s.trim()).ok())
                .map(Secret::TempKey)
                .ok_or_else(|| {
                    FetchError::Permanent(
                        "the TEMP_DELEGATION_KEY from auth is not 32 bytes of base64".into(),
                    )
                }),
            _ => Err(FetchError::Permanent("unexpected secret kind".into())),
        }
    }

    /// One POST on a pooled connection to the peer (or a new one), until the end of the answer.
    async fn post(
        &self,
        target: &PeerTarget,
        wire: &Wire,
        trace: &[(String, String)],
    ) -> Result<pool::Answer, AttemptError> {
        let endpoint = &target.endpoint;
        // The client span of this hop; the peer's server span is its child.
        let span = if dm_telemetry::enabled() {
            tracing::info_span!(
                "dmd.gateway.post",
                otel.name = %format!("POST {}", endpoint.authority),
                otel.kind = "client",
                http.request.method = "POST",
                server.address = %endpoint.authority,
                http.response.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let carried = trace
            .iter()
            .find(|(n, _)| n == "traceparent")
            .map(|(_, v)| v.as_str());
        let own = dm_telemetry::outgoing(&span, carried);
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(endpoint.uri.clone())
            .header(HOST, endpoint.authority.as_str())
            .header(
                CONTENT_TYPE,
                format!("{}; charset=utf-8", delegation::CONTENT_TYPE),
            );
        for (name, value) in trace {
            if name != "traceparent" {
                builder = builder.header(name.as_str(), value.as_str());
            }
        }
        if let Some(tp) = &own {
            builder = builder.header("traceparent", tp.as_str());
        }
        let request = builder
            .body(Full::new(wire.0.clone()))
            .map_err(|e| AttemptError::Http(e.to_string()))?;
        let answer = tracing::Instrument::instrument(
            target
                .pool
                .exchange(request, MAX_ANSWER_BYTES, self.timeouts.connect, || {
                    self.connect(target)
                }),
            span.clone(),
        )
        .await;
        if let Ok(a) = &answer {
            span.record("http.response.status_code", a.status.as_u16());
        }
        answer
    }

    /// A new connection to the peer: TCP, the full mutual-TLS handshake (the peer's certificate verified
    /// against its configured CA, ours presented), HTTP/1.1. Its connection task runs until the handle
    /// is dropped or the peer closes.
    async fn connect(&self, target: &PeerTarget) -> Result<pool::Sender, AttemptError> {
        let endpoint = &target.endpoint;
        let addrs: Vec<_> = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| AttemptError::Resolve(format!("{}: {e}", endpoint.host)))?
            .collect();
        let mut last = AttemptError::Resolve(format!("{}: no address", endpoint.host));
        let mut tcp = None;
        for addr in addrs {
            match tokio::time::timeout(self.timeouts.connect, tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) => last = AttemptError::Connect(format!("{addr}: {e}")),
                Err(_) => last = AttemptError::Connect(format!("{addr}: timed out")),
            }
        }
        let tcp = tcp.ok_or(last)?;
        let _ = tcp.set_nodelay(true);
        let tls = target
            .connector
            .connect(target.server_name.clone(), tcp)
            .await
            .map_err(|e| AttemptError::Tls(e.to_string()))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| AttemptError::Http(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "peer connection ended with an error");
            }
        });
        Ok(sender)
    }
}

enum FetchError {
    /// Auth is away or slow: try again.
    Transient(String),
    /// Auth has no such secret (purged, never created): sending is pointless.
    Permanent(String),
}

impl std::fmt::Debug for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Transient(r) => write!(f, "Transient({r})"),
            FetchError::Permanent(r) => write!(f, "Permanent({r})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_503s_retry_after_lengthens_the_pause_up_to_retry_max() {
        let ms = Duration::from_millis;
        assert_eq!(retry_pause(ms(500), None, ms(30_000)), ms(500));
        assert_eq!(retry_pause(ms(500), Some(ms(2_000)), ms(30_000)), ms(2_000));
        assert_eq!(
            retry_pause(ms(4_000), Some(ms(1_000)), ms(30_000)),
            ms(4_000)
        );
        assert_eq!(
            retry_pause(ms(500), Some(ms(3_600_000)), ms(30_000)),
            ms(30_000)
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for n in 0..30 {
            let d = backoff(n, min, max);
            let base = (min * 2u32.pow(n.min(20))).min(max);
            assert!(
                d >= base / 2 && d <= base,
                "retry {n}: {d:?} outside {base:?}"
            );
        }
    }
}
