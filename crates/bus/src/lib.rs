//! The bus of the delegation system (ARCHITECTURE.md "The bus").
//!
//! One API, two implementations with the same semantics:
//! - [`Bus::connect`] / [`Bus::connect_with`]: NATS with JetStream, one server or a cluster
//!   ([`BusOptions`] sets the replicas of streams and buckets) — durable work-queue streams with explicit
//!   ack, redelivery and `Nats-Msg-Id` dedupe; key-value buckets with compare-and-set on the revision;
//!   core request/reply with queue groups;
//! - [`Bus::in_process`]: the embedded default, in memory (nothing survives a restart), enforcing the same
//!   rules (key syntax, dedupe, one delivery per durable consumer, redelivery after `ack_wait`), so a test
//!   cannot pass in-process and fail on NATS.
//!
//! Names come from [`subjects::Names`] only. [`testing::NatsServer`] starts a real `nats-server` for tests,
//! [`testing::NatsCluster`] a JetStream cluster of them.

mod memory;
mod nats;
pub mod stack;
pub mod subjects;
pub mod testing;
pub mod trace;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::Instrument;

pub use subjects::{Area, Names};

/// What can go wrong on the bus. Messages name what failed; they never carry payloads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("invalid key-value key '{0}': keys allow only [-/_=.A-Za-z0-9]")]
    InvalidKey(String),
    /// Compare-and-set lost: the key was created or changed by someone else.
    #[error("revision conflict on key '{0}'")]
    Conflict(String),
    #[error("no stream takes subject '{0}'")]
    NoStream(String),
    #[error("nobody answers on '{0}'")]
    NoResponders(String),
    #[error("timed out: {0}")]
    TimedOut(String),
    #[error("the bus is closed")]
    Closed,
    #[error("NATS: {0}")]
    Nats(String),
    #[error("invalid bus option: {0}")]
    InvalidOption(String),
}

/// How the bus uses NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusOptions {
    /// How many servers of a JetStream cluster keep a copy of every stream and key-value bucket this bus
    /// creates (JetStream allows 1 to 5): 1 on a single server, 3 on a three-node cluster so that losing
    /// one node loses nothing. Streams and buckets that exist already keep their own count.
    pub replicas: u8,
    /// How the connection is protected: TLS and who the client is.
    pub security: NatsSecurity,
}

impl Default for BusOptions {
    fn default() -> Self {
        Self {
            replicas: 1,
            security: NatsSecurity::default(),
        }
    }
}

/// TLS and credentials of the NATS connection. The default is none of them (a server on loopback in
/// tests and `dmd demo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsSecurity {
    /// Refuse a server that does not speak TLS (the connection is never made in clear).
    pub require_tls: bool,
    /// PEM file of the CA(s) the servers' certificates chain to (besides the system's roots).
    pub ca: Option<PathBuf>,
    /// This client's certificate and key (PEM), for servers that verify clients (mutual TLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub credentials: Option<NatsCredentials>,
}

/// Who the client is to the NATS server.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsCredentials {
    /// A `.creds` file (user JWT and nkey seed, decentralised authentication).
    CredsFile(PathBuf),
    /// A user nkey seed (`SU…`): the server knows the public key and checks a signed nonce.
    NkeySeed(String),
    Token(String),
    UserPassword {
        user: String,
        password: String,
    },
}

/// Whether `seed` is a user nkey seed (`SU…`) the client can sign with.
pub fn valid_nkey_seed(seed: &str) -> bool {
    seed.starts_with("SU") && nkeys::KeyPair::from_seed(seed).is_ok()
}

impl std::fmt::Debug for NatsCredentials {
    /// Names the kind of credential, never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsCredentials::CredsFile(p) => f.debug_tuple("CredsFile").field(p).finish(),
            NatsCredentials::NkeySeed(_) => f.write_str("NkeySeed(<redacted>)"),
            NatsCredentials::Token(_) => f.write_str("Token(<redacted>)"),
            NatsCredentials::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

/// Message headers (trace context, event type and version, …), in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: &str, value: impl Into<String>) {
        self.0.retain(|(n, _)| n != name);
        self.0.push((name.to_string(), value.into()));
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A message on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
}

/// A durable stream taking the subjects of some areas, consumed as a work queue: each message goes to
/// one consumer and is removed once acknowledged.
#[derive(Debug, Clone)]
pub struct WorkQueue {
    pub stream: String,
    pub subjects: Vec<String>,
    /// How long a publish with the same `Nats-Msg-Id` is a duplicate.
    pub duplicate_window: Duration,
}

/// A durable stream kept as a log (limits retention): every consumer sees every message, and messages stay
/// until they are older than `max_age` (the audit trail).
#[derive(Debug, Clone)]
pub struct LogStream {
    pub stream: String,
    pub subjects: Vec<String>,
    pub max_age: Duration,
}

/// How a durable consumer reads a work queue.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub stream: String,
    /// The durable name, shared by all replicas of a service.
    pub durable: String,
    /// Only messages of these subjects (wildcards allowed).
    pub filter: String,
    /// A message not acknowledged within this time is delivered again.
    pub ack_wait: Duration,
}

/// The bus.
#[derive(Debug, Clone)]
pub enum Bus {
    Memory(memory::MemoryBus),
    Nats(Box<nats::NatsBus>),
}

impl Bus {
    /// The in-process bus: same semantics, nothing kept across a restart.
    pub fn in_process() -> Self {
        Bus::Memory(memory::MemoryBus::default())
    }

    /// Connects to NATS at `url` (JetStream must be enabled on the server), with one replica of each
    /// stream and bucket. `url` may list the servers of a cluster separated by commas
    /// (`nats://a:4222,nats://b:4222`, as NATS clients accept): the client fails over between them.
    pub async fn connect(url: &str) -> Result<Self, BusError> {
        Self::connect_with(url, BusOptions::default()).await
    }

    /// As [`Bus::connect`], with `options` (e.g. 3 replicas on a three-node cluster).
    pub async fn connect_with(url: &str, options: BusOptions) -> Result<Self, BusError> {
        if !(1..=5).contains(&options.replicas) {
            return Err(BusError::InvalidOption(format!(
                "replicas {}: JetStream keeps 1 to 5",
                options.replicas
            )));
        }
        let urls: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(BusError::InvalidOption("no NATS URL".into()));
        }
        nats::NatsBus::connect(&urls, options)
            .await
            .map(|b| Bus::Nats(Box::new(b)))
    }

    /// The name of the NATS server this bus is connected to now (`None` in-process or between
    /// connections): tests stop that one to make the client fail over.
    pub fn connected_server(&self) -> Option<String> {
        match self {
            Bus::Memory(_) => None,
            Bus::Nats(b) => b.connected_server(),
        }
    }

    /// Creates the work-queue stream if it does not exist (idempotent).
    pub async fn ensure_work_queue(&self, q: &WorkQueue) -> Result<(), BusError> {
        match self {
            Bus::Memory(b) => b.ensure_work_queue(q),
            Bus::Nats(b) => b.ensure_work_queue(q).await,
        }
    }

    /// Creates the log stream if it does not exist (idempotent).
    pub async fn ensure_log(&self, l: &LogStream) -> Result<(), BusError> {
        match self {
            Bus::Memory(b) => b.ensure_log(l),
            Bus::Nats(b) => b.ensure_log(l).await,
        }
    }

    /// Publishes durably into the stream taking `subject`, and waits until the stream has it. A second
    /// publish with the same `msg_id` within the duplicate window is dropped.
    pub async fn publish(
        &self,
        subject: &str,
        mut headers: Headers,
        payload: Bytes,
        msg_id: &str,
    ) -> Result<(), BusError> {
        let span = trace::send_span(subject, &mut headers);
        match self {
            Bus::Memory(b) => span.in_scope(|| b.publish(subject, headers, payload, msg_id)),
            Bus::Nats(b) => {
                b.publish(subject, headers, payload, msg_id)
                    .instrument(span)
                    .await
            }
        }
    }

    /// A durable consumer (created if needed).
    pub async fn consumer(&self, c: &ConsumerConfig) -> Result<Consumer, BusError> {
        match self {
            Bus::Memory(b) => b.consumer(c).map(Consumer::Memory),
            Bus::Nats(b) => b.consumer(c).await.map(|c| Consumer::Nats(Box::new(c))),
        }
    }

    /// A key-value bucket (created if needed) keeping `history` revisions per key.
    pub async fn kv(&self, bucket: &str, history: i64) -> Result<Kv, BusError> {
        match self {
            Bus::Memory(b) => b.kv(bucket).map(Kv::Memory),
            Bus::Nats(b) => b.kv(bucket, history).await.map(|k| Kv::Nats(Arc::new(k))),
        }
    }

    /// Answers requests on `subject`, shared with the other members of `queue_group`.
    pub async fn serve(&self, subject: &str, queue_group: &str) -> Result<Requests, BusError> {
        match self {
            Bus::Memory(b) => b.serve(subject, queue_group).map(Requests::Memory),
            Bus::Nats(b) => b
                .serve(subject, queue_group)
                .await
                .map(|r| Requests::Nats(Box::new(r))),
        }
    }

    /// Sends a request and waits for one answer.
    pub async fn request(
        &self,
        subject: &str,
        mut headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        let span = trace::send_span(subject, &mut headers);
        match self {
            Bus::Memory(b) => {
                b.request(subject, headers, payload, timeout)
                    .instrument(span)
                    .await
            }
            Bus::Nats(b) => {
                b.request(subject, headers, payload, timeout)
                    .instrument(span)
                    .await
            }
        }
    }
}

/// A durable consumer.
#[derive(Debug)]
pub enum Consumer {
    Memory(memory::MemoryConsumer),
    Nats(Box<nats::NatsConsumer>),
}

impl Consumer {
    /// The next message (waits for one). `None` when the bus is gone.
    pub async fn next(&mut self) -> Result<Option<Delivery>, BusError> {
        match self {
            Consumer::Memory(c) => Ok(c.next().await),
            Consumer::Nats(c) => c.next().await,
        }
    }
}

/// A delivered message, to be acknowledged once its effect is stored.
#[derive(Debug)]
pub struct Delivery {
    pub message: Message,
    /// 1 on the first delivery, then 2, 3, … on redeliveries.
    pub attempt: u64,
    acker: Acker,
}

#[derive(Debug)]
enum Acker {
    Memory(memory::MemoryAcker),
    Nats(Box<async_nats::jetstream::Message>),
}

impl Delivery {
    /// Done: the message is removed.
    pub async fn ack(self) -> Result<(), BusError> {
        match self.acker {
            Acker::Memory(a) => {
                a.ack();
                Ok(())
            }
            Acker::Nats(m) => m.ack().await.map_err(|e| BusError::Nats(e.to_string())),
        }
    }

    /// Still working on it: the ack wait starts again (a long task keeps its message this way, and a
    /// replica that dies lets it go after one ack wait).
    pub async fn progress(&self) -> Result<(), BusError> {
        match &self.acker {
            Acker::Memory(a) => {
                a.progress();
                Ok(())
            }
            Acker::Nats(m) => m
                .ack_with(async_nats::jetstream::AckKind::Progress)
                .await
                .map_err(|e| BusError::Nats(e.to_string())),
        }
    }

    /// Not now: deliver it again after `delay`.
    pub async fn nak(self, delay: Duration) -> Result<(), BusError> {
        match self.acker {
            Acker::Memory(a) => {
                a.nak(delay);
                Ok(())
            }
            Acker::Nats(m) => m
                .ack_with(async_nats::jetstream::AckKind::Nak(Some(delay)))
                .await
                .map_err(|e| BusError::Nats(e.to_string())),
        }
    }

    /// Never: drop it without redelivery (a message that can never be handled).
    pub async fn term(self) -> Result<(), BusError> {
        match self.acker {
            Acker::Memory(a) => {
                a.term();
                Ok(())
            }
            Acker::Nats(m) => m
                .ack_with(async_nats::jetstream::AckKind::Term)
                .await
                .map_err(|e| BusError::Nats(e.to_string())),
        }
    }
}

/// A value and the revision it has in its bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    pub revision: u64,
}

/// One change of a key-value bucket: the new value, or `None` when the key was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvChange {
    pub key: String,
    pub value: Option<Bytes>,
    pub revision: u64,
}

/// The changes of a key-value bucket, in the order they were made.
#[derive(Debug)]
pub enum KvWatch {
    Memory(tokio::sync::mpsc::UnboundedReceiver<KvChange>),
    Nats(Box<nats::NatsKvWatch>),
}

impl KvWatch {
    /// The next change (waits for one); `None` when the bus is gone.
    pub async fn next(&mut self) -> Result<Option<KvChange>, BusError> {
        match self {
            KvWatch::Memory(rx) => Ok(rx.recv().await),
            KvWatch::Nats(w) => w.next().await,
        }
    }
}

/// A key-value bucket. Cheap to clone (services clone it into tasks and per request).
#[derive(Debug, Clone)]
pub enum Kv {
    Memory(memory::MemoryKv),
    Nats(Arc<nats::NatsKv>),
}

impl Kv {
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, BusError> {
        check_key(key)?;
        match self {
            Kv::Memory(k) => Ok(k.get(key)),
            Kv::Nats(k) => k.get(key).await,
        }
    }

    /// Creates the key; [`BusError::Conflict`] when it exists.
    pub async fn create(&self, key: &str, value: Bytes) -> Result<u64, BusError> {
        check_key(key)?;
        match self {
            Kv::Memory(k) => k.create(key, value),
            Kv::Nats(k) => k.create(key, value).await,
        }
    }

    /// Compare-and-set: writes only if the key is still at `revision`; [`BusError::Conflict`] otherwise.
    pub async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, BusError> {
        check_key(key)?;
        match self {
            Kv::Memory(k) => k.update(key, value, revision),
            Kv::Nats(k) => k.update(key, value, revision).await,
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), BusError> {
        check_key(key)?;
        match self {
            Kv::Memory(k) => {
                k.delete(key);
                Ok(())
            }
            Kv::Nats(k) => k.delete(key).await,
        }
    }

    /// How many entries this in-process bucket has read or written so far, counting one per key a
    /// listing returned: tests use it to show that an operation's cost does not grow with the bucket.
    /// `None` on NATS.
    pub fn entries_touched(&self) -> Option<u64> {
        match self {
            Kv::Memory(k) => Some(k.touched()),
            Kv::Nats(_) => None,
        }
    }

    /// Every change of the bucket from now on, by any writer (another replica's included).
    pub async fn watch(&self) -> Result<KvWatch, BusError> {
        match self {
            Kv::Memory(k) => Ok(KvWatch::Memory(k.watch())),
            Kv::Nats(k) => Ok(KvWatch::Nats(Box::new(k.watch().await?))),
        }
    }

    /// The live keys.
    pub async fn keys(&self) -> Result<Vec<String>, BusError> {
        let mut keys = match self {
            Kv::Memory(k) => k.keys(),
            Kv::Nats(k) => k.keys().await?,
        };
        keys.sort();
        Ok(keys)
    }
}

fn check_key(key: &str) -> Result<(), BusError> {
    if subjects::valid_key(key) {
        Ok(())
    } else {
        Err(BusError::InvalidKey(key.to_string()))
    }
}

/// Requests arriving for a service.
#[derive(Debug)]
pub enum Requests {
    Memory(memory::MemoryRequests),
    Nats(Box<nats::NatsRequests>),
}

/// One request; answer it with [`Request::respond`].
#[derive(Debug)]
pub struct Request {
    pub message: Message,
    reply: Reply,
}

#[derive(Debug)]
enum Reply {
    Memory(tokio::sync::oneshot::Sender<Message>),
    Nats {
        client: async_nats::Client,
        subject: Option<async_nats::Subject>,
    },
}

impl Requests {
    pub async fn next(&mut self) -> Option<Request> {
        match self {
            Requests::Memory(r) => r.next().await,
            Requests::Nats(r) => r.next().await,
        }
    }
}

impl Request {
    pub async fn respond(self, headers: Headers, payload: Bytes) -> Result<(), BusError> {
        match self.reply {
            Reply::Memory(tx) => tx
                .send(Message {
                    subject: String::new(),
                    headers,
                    payload,
                })
                .map_err(|_| BusError::Closed),
            Reply::Nats { client, subject } => {
                let Some(subject) = subject else {
                    return Ok(());
                };
                client
                    .publish_with_headers(subject, nats::to_header_map(&headers), payload)
                    .await
                    .map_err(|e| BusError::Nats(e.to_string()))
            }
        }
    }
}
