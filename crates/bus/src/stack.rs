//! The one consumer stack under every service (ARCHITECTURE rule 13): read a work queue, hand each message
//! to the service's handler, settle it by what the handler says — done (ack), not yet (nak with
//! exponential back-off), never (terminate with a dead-letter record) — and never let a bus error end the
//! service: a broken consumer is opened again after a pause, a failed ack is logged (the message comes
//! back after its ack wait, and handlers are idempotent).
//!
//! Messages are handled concurrently, at most `lanes` at a time, and in arrival order per key: the handler's
//! `key` (a delegation, a device) picks the lane, and each lane handles one message at a time. A full lane
//! holds the intake back, so work in flight stays bounded.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{Bus, ConsumerConfig, Delivery, Headers, Message};

/// How a handler settles a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Its effect is stored: acknowledge it.
    Done,
    /// Not now (a dependency is away, a write conflicted): deliver it again after a back-off; after
    /// `max_deliver` attempts it counts as poison.
    Retry(String),
    /// It can never be handled (undecodable, invalid): drop it with a dead-letter record.
    Poison(String),
}

/// How a stack reads and settles.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Who consumes, for logs and dead-letter records (`provisioning`, `auth`, …).
    pub service: String,
    /// The deployment it reads for, for its metrics (`dmd_bus_*{deployment, service}`).
    pub deployment: String,
    pub consumer: ConsumerConfig,
    /// How many messages are handled at once (one per lane).
    pub lanes: usize,
    /// How many messages a lane holds before the intake waits.
    pub lane_depth: usize,
    /// Attempts after which a message that keeps asking for a retry is dropped as poison.
    pub max_deliver: u64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Where dead-letter records go (the audit stream), if anywhere.
    pub dead_letter_subject: Option<String>,
    /// For handlers that take long (a device session): report the message in progress this often, so
    /// that it stays with this replica while it works and goes to another one an ack wait after it died.
    pub progress_every: Option<Duration>,
    /// At shutdown, how long the lanes may take to finish what they hold; then they are dropped (what
    /// they did not settle comes back after its ack wait).
    pub drain: Duration,
}

impl StackConfig {
    /// Defaults: 32 lanes of 16, 20 attempts, back-off from 250 ms to 30 s.
    pub fn new(service: impl Into<String>, consumer: ConsumerConfig) -> Self {
        Self {
            service: service.into(),
            deployment: String::new(),
            consumer,
            lanes: 32,
            lane_depth: 16,
            max_deliver: 20,
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            dead_letter_subject: None,
            progress_every: None,
            drain: Duration::from_secs(5),
        }
    }
}

/// The header of a dead-letter record naming why the message was dropped.
pub const DEAD_LETTER_REASON: &str = "dmd-dead-letter-reason";
/// The header of a dead-letter record naming the consumer that dropped it.
pub const DEAD_LETTER_SERVICE: &str = "dmd-dead-letter-service";

/// A work queue that opens itself again when it fails (a NATS outage, a deleted consumer), after a pause
/// that doubles with every failure in a row: no bus error ends its reader. Cancel-safe: a reader that
/// stops waiting in the middle of a pause finds the same pause when it asks again.
pub struct Reopening {
    bus: Bus,
    config: ConsumerConfig,
    service: String,
    backoff: (Duration, Duration),
    consumer: Option<crate::Consumer>,
    failures: u64,
    reopen_at: Option<tokio::time::Instant>,
}

impl std::fmt::Debug for Reopening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reopening")
            .field("durable", &self.config.durable)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl Reopening {
    /// Opens the queue now (an error at start is the caller's to report).
    pub async fn open(
        bus: Bus,
        config: ConsumerConfig,
        service: &str,
        backoff: (Duration, Duration),
    ) -> Result<Self, crate::BusError> {
        let consumer = bus.consumer(&config).await?;
        let mut queue = Self::lazy(bus, config, service, backoff);
        queue.consumer = Some(consumer);
        Ok(queue)
    }

    /// Opens the queue when first read (and again until it opens).
    pub fn lazy(
        bus: Bus,
        config: ConsumerConfig,
        service: &str,
        backoff: (Duration, Duration),
    ) -> Self {
        Self {
            bus,
            config,
            service: service.to_string(),
            backoff,
            consumer: None,
            failures: 0,
            reopen_at: None,
        }
    }

    /// The next message; `None` when the bus is gone.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(at) = self.reopen_at {
                tokio::time::sleep_until(at).await;
                self.reopen_at = None;
            }
            let consumer = match self.consumer.as_mut() {
                Some(c) => c,
                None => match self.bus.consumer(&self.config).await {
                    Ok(c) => self.consumer.insert(c),
                    Err(e) => {
                        self.failed(&e, "cannot open the work queue; trying again");
                        continue;
                    }
                },
            };
            match consumer.next().await {
                Ok(Some(d)) => {
                    self.failures = 0;
                    return Some(d);
                }
                Ok(None) => return None,
                Err(e) => {
                    self.consumer = None;
                    self.failed(&e, "the work queue failed; reopening it");
                }
            }
        }
    }

    fn failed(&mut self, error: &crate::BusError, what: &str) {
        self.failures += 1;
        let pause = backoff(self.failures, self.backoff.0, self.backoff.1);
        tracing::warn!(service = %self.service, error = %error, ?pause, "{what}");
        self.reopen_at = Some(tokio::time::Instant::now() + pause);
    }
}

/// The back-off before attempt `attempt + 1`: doubling from `min`, capped at `max`.
pub fn backoff(attempt: u64, min: Duration, max: Duration) -> Duration {
    let shift = u32::try_from(attempt.saturating_sub(1).min(20)).unwrap_or(20);
    min.saturating_mul(1u32 << shift).min(max)
}

/// The lane a key goes to, of `lanes`.
pub fn lane_of(key: &str, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    usize::try_from(h.finish() % lanes.max(1) as u64).unwrap_or(0)
}

/// Consumes `config.consumer` until `shutdown`, handing every message to `handle` and settling it by the
/// answer. `key` orders messages: those with one key are handled one at a time, in order.
pub async fn consume<K, H, F>(
    bus: Bus,
    config: StackConfig,
    key: K,
    handle: H,
    shutdown: impl Future<Output = ()>,
) where
    K: Fn(&Message) -> String,
    H: Fn(Message, u64) -> F + Send + Sync + 'static,
    F: Future<Output = Settle> + Send + 'static,
{
    let config = Arc::new(config);
    let handle = Arc::new(handle);
    let mut lanes = Vec::with_capacity(config.lanes.max(1));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.lanes.max(1) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Delivery>(config.lane_depth.max(1));
        lanes.push(tx);
        workers.spawn(lane(bus.clone(), config.clone(), handle.clone(), rx));
    }
    tokio::pin!(shutdown);
    let mut queue = Reopening::lazy(
        bus.clone(),
        config.consumer.clone(),
        &config.service,
        (config.backoff_min, config.backoff_max),
    );
    loop {
        let delivery = tokio::select! {
            _ = &mut shutdown => break,
            next = queue.next() => next,
        };
        // The bus was closed: nothing more will come.
        let Some(delivery) = delivery else { break };
        let at = lane_of(&key(&delivery.message), lanes.len());
        let sent = tokio::select! {
            _ = &mut shutdown => break,
            sent = lanes[at].send(delivery) => sent,
        };
        if sent.is_err() {
            // A lane ended (it cannot, short of a panic): the message comes back after its ack wait.
            tracing::error!(service = %config.service, "a consumer lane is gone");
        }
    }
    // The lanes finish what they hold, for a while; what they did not settle comes back after its ack
    // wait.
    drop(lanes);
    let drained = tokio::time::timeout(config.drain, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(service = %config.service, "stopping with work in hand; it will be delivered again");
        workers.abort_all();
    }
}

async fn lane<H, F>(
    bus: Bus,
    config: Arc<StackConfig>,
    handle: Arc<H>,
    mut deliveries: tokio::sync::mpsc::Receiver<Delivery>,
) where
    H: Fn(Message, u64) -> F + Send + Sync + 'static,
    F: Future<Output = Settle> + Send + 'static,
{
    let metrics = dm_metrics::global().consumer(&config.deployment, &config.service);
    while let Some(delivery) = deliveries.recv().await {
        let _in_flight = metrics.delivered(delivery.attempt);
        let attempt = delivery.attempt;
        let span = crate::trace::process_span(&config.service, &delivery.message);
        let handled =
            tracing::Instrument::instrument(handle(delivery.message.clone(), attempt), span);
        tokio::pin!(handled);
        let settle = match config.progress_every {
            None => handled.await,
            Some(every) => loop {
                tokio::select! {
                    settle = &mut handled => break settle,
                    _ = tokio::time::sleep(every) => {
                        if let Err(e) = delivery.progress().await {
                            tracing::warn!(service = %config.service, error = %e, "progress not reported");
                        }
                    }
                }
            },
        };
        let settle = match settle {
            Settle::Retry(reason) if attempt >= config.max_deliver => {
                Settle::Poison(format!("gave up after {attempt} attempts: {reason}"))
            }
            other => other,
        };
        let settled = match settle {
            Settle::Done => delivery.ack().await,
            Settle::Retry(reason) => {
                let pause = backoff(attempt, config.backoff_min, config.backoff_max);
                tracing::debug!(service = %config.service, attempt, ?pause, %reason, "message held back");
                delivery.nak(pause).await
            }
            Settle::Poison(reason) => {
                tracing::warn!(service = %config.service, attempt, %reason, "message dropped as poison");
                metrics.dead_letter();
                dead_letter(&bus, &config, &delivery.message, &reason).await;
                delivery.term().await
            }
        };
        if let Err(e) = settled {
            tracing::warn!(service = %config.service, error = %e, "a message could not be settled; it comes back");
        }
    }
}

/// Records a dropped message (its subject and headers, not its payload, which may be large) where the
/// operator looks: the audit stream.
async fn dead_letter(bus: &Bus, config: &StackConfig, message: &Message, reason: &str) {
    let Some(subject) = &config.dead_letter_subject else {
        return;
    };
    record_dead_letter(bus, &config.service, subject, message, reason).await;
}

/// Writes the dead-letter record of `message`, dropped by `service`, on `subject` (for consumers that
/// keep their own loop, like the orchestrator's).
pub async fn record_dead_letter(
    bus: &Bus,
    service: &str,
    subject: &str,
    message: &Message,
    reason: &str,
) {
    let mut headers = Headers::new();
    headers.insert("dmd-type", "dmd.bus.v1.DeadLetter");
    headers.insert("dmd-version", "1");
    headers.insert(DEAD_LETTER_SERVICE, service);
    headers.insert(DEAD_LETTER_REASON, reason);
    headers.insert("dmd-dead-letter-subject", message.subject.clone());
    for (name, value) in &message.headers.0 {
        if matches!(name.as_str(), "traceparent" | "tracestate" | "dmd-type") {
            headers.insert(&format!("dmd-original-{name}"), value.clone());
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let id = format!("dead:{service}:{nanos}");
    if let Err(e) = bus.publish(subject, headers, Bytes::new(), &id).await {
        tracing::warn!(service, error = %e, "a dead-letter record could not be written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap() {
        let (min, max) = (Duration::from_millis(250), Duration::from_secs(30));
        assert_eq!(backoff(1, min, max), min);
        assert_eq!(backoff(2, min, max), Duration::from_millis(500));
        assert_eq!(backoff(4, min, max), Duration::from_secs(2));
        assert_eq!(backoff(40, min, max), max);
        assert_eq!(backoff(u64::MAX, min, max), max);
    }
}
