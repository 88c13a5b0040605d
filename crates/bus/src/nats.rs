//! The bus on NATS with JetStream (async-nats).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use dm_metrics::BusOp;
use futures::StreamExt;

use crate::{
    Acker, BusError, BusOptions, ConsumerConfig, Delivery, Entry, Headers, Message,
    NatsCredentials, NatsSecurity, Reply, Request, WorkQueue,
};

/// Runs a NATS operation, recording its latency (and whether it failed) in the process's metrics.
async fn timed<T>(
    op: BusOp,
    operation: impl std::future::Future<Output = Result<T, BusError>>,
) -> Result<T, BusError> {
    let started = std::time::Instant::now();
    let result = operation.await;
    let failed = matches!(&result, Err(e) if !matches!(e, BusError::Conflict(_)));
    dm_metrics::global().bus_op(op, started.elapsed(), failed);
    result
}

fn nats_error(e: impl std::fmt::Display) -> BusError {
    BusError::Nats(e.to_string())
}

/// A compare-and-set a clustered stream refused because another write of the same key was still being
/// agreed on (server error 10164, "wrong last sequence"): a conflict like a stale revision, which the
/// caller resolves by reading again. async-nats reports it as an unclassified publish error.
fn write_in_flight(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.downcast_ref::<jetstream::Error>().is_some_and(|j| {
            j.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
        }) {
            return true;
        }
        next = err.source();
    }
    false
}

pub(crate) fn to_header_map(headers: &Headers) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in &headers.0 {
        map.insert(name.as_str(), value.as_str());
    }
    map
}

fn from_header_map(map: Option<&HeaderMap>) -> Headers {
    let mut headers = Headers::new();
    if let Some(map) = map {
        for (name, values) in map.iter() {
            if let Some(value) = values.first() {
                headers
                    .0
                    .push((name.to_string(), value.as_str().to_string()));
            }
        }
    }
    headers
}

/// How long a JetStream request (stream and bucket operations, publish acks) waits for its answer. A
/// request sent to a cluster node that dies is never answered: with the client's default for API requests
/// (10 s) it held its caller longer than the cluster takes to elect a new leader. Publish acks already
/// waited 5 s.
const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// The client's options from `security`: credentials first (a `.creds` file is read here), then TLS.
async fn connect_options(security: &NatsSecurity) -> Result<async_nats::ConnectOptions, BusError> {
    let mut options = async_nats::ConnectOptions::new();
    match &security.credentials {
        None => {}
        Some(NatsCredentials::CredsFile(path)) => {
            options = options.credentials_file(path).await.map_err(|e| {
                // The reader's message may quote the file; only its name and the kind of failure.
                BusError::InvalidOption(format!(
                    "NATS credentials file {}: {}",
                    path.display(),
                    e.kind()
                ))
            })?;
        }
        Some(NatsCredentials::NkeySeed(seed)) => {
            // Checked here: a bad seed would otherwise surface as a failed handshake at every connect.
            if !crate::valid_nkey_seed(seed) {
                return Err(BusError::InvalidOption(
                    "NATS nkey seed: not a valid user seed (SU…)".into(),
                ));
            }
            options = options.nkey(seed.clone());
        }
        Some(NatsCredentials::Token(token)) => options = options.token(token.clone()),
        Some(NatsCredentials::UserPassword { user, password }) => {
            options = options.user_and_password(user.clone(), password.clone());
        }
    }
    let tls = security.require_tls || security.ca.is_some() || security.client_cert.is_some();
    if tls {
        // async-nats builds its rustls configuration with the process's provider: ring, as everywhere
        // (STACK.md); installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    if let Some(ca) = &security.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &security.client_cert {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options.require_tls(security.require_tls))
}

/// A failed first connection, said without anything the client was given: async-nats's messages name
/// the server's complaint ("authorization violation"), the TLS failure or the network error.
fn connect_error(e: &async_nats::ConnectError) -> BusError {
    use async_nats::ConnectErrorKind as K;
    let what = match e.kind() {
        // A failed handshake comes as an I/O error carrying rustls's.
        K::Io if from_tls(e) => {
            "TLS failed (wrong CA, a server without TLS, or a client certificate refused)"
        }
        K::Authentication | K::AuthorizationViolation => {
            "the server refused the credentials (authorization violation)"
        }
        K::Tls => "TLS failed (wrong CA, a server without TLS, or a client certificate refused)",
        K::TimedOut => "timed out",
        K::Dns => "the name does not resolve",
        K::Io => "no connection",
        // The parser's message quotes the URL, which may hold a password.
        K::ServerParse => return BusError::InvalidOption("invalid NATS server URL".into()),
        _ => "failed",
    };
    BusError::Nats(format!("cannot connect: {what}: {e}"))
}

/// Whether a rustls error is among the causes of `e`.
fn from_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        let inner = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if c.is::<rustls::Error>() || inner.is_some_and(|i| i.is::<rustls::Error>()) {
            return true;
        }
        cause = c.source();
    }
    false
}

#[derive(Debug, Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Replicas of every stream and bucket this bus creates.
    replicas: usize,
}

impl NatsBus {
    /// Connects to the first of `urls` that answers; the client fails over to the others (and to servers
    /// the cluster announces) when its server goes away.
    pub(crate) async fn connect(urls: &[&str], options: BusOptions) -> Result<Self, BusError> {
        let client = connect_options(&options.security)
            .await?
            .connect(urls)
            .await
            .map_err(|e| connect_error(&e))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(JETSTREAM_TIMEOUT);
        Ok(Self {
            client,
            js,
            replicas: usize::from(options.replicas),
        })
    }

    pub(crate) fn connected_server(&self) -> Option<String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Some(self.client.server_info().server_name),
            _ => None,
        }
    }

    pub(crate) async fn ensure_work_queue(&self, q: &WorkQueue) -> Result<(), BusError> {
        self.js
            .get_or_create_stream(stream::Config {
                name: q.stream.clone(),
                subjects: q.subjects.clone(),
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: q.duplicate_window,
                num_replicas: self.replicas,
                ..Default::default()
            })
            .await
            .map_err(nats_error)?;
        Ok(())
    }

    pub(crate) async fn ensure_log(&self, l: &crate::LogStream) -> Result<(), BusError> {
        self.js
            .get_or_create_stream(stream::Config {
                name: l.stream.clone(),
                subjects: l.subjects.clone(),
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: l.max_age,
                num_replicas: self.replicas,
                ..Default::default()
            })
            .await
            .map_err(nats_error)?;
        Ok(())
    }

    pub(crate) async fn publish(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: &str,
    ) -> Result<(), BusError> {
        timed(
            BusOp::Publish,
            self.publish_untimed(subject, headers, payload, msg_id),
        )
        .await
    }

    async fn publish_untimed(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: &str,
    ) -> Result<(), BusError> {
        let mut map = to_header_map(&headers);
        if !msg_id.is_empty() {
            map.insert("Nats-Msg-Id", msg_id);
        }
        let ack = self
            .js
            .publish_with_headers(subject.to_string(), map, payload)
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::PublishErrorKind::StreamNotFound => {
                    BusError::NoStream(subject.to_string())
                }
                _ => nats_error(e),
            })?;
        ack.await.map_err(|e| match e.kind() {
            jetstream::context::PublishErrorKind::StreamNotFound => {
                BusError::NoStream(subject.to_string())
            }
            _ => nats_error(e),
        })?;
        Ok(())
    }

    pub(crate) async fn consumer(&self, c: &ConsumerConfig) -> Result<NatsConsumer, BusError> {
        let stream = self
            .js
            .get_stream(&c.stream)
            .await
            .map_err(|_| BusError::NoStream(c.stream.clone()))?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &c.durable,
                consumer::pull::Config {
                    durable_name: Some(c.durable.clone()),
                    filter_subject: c.filter.clone(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: c.ack_wait,
                    ..Default::default()
                },
            )
            .await
            .map_err(nats_error)?;
        let messages = open_messages(&consumer).await.map_err(nats_error)?;
        Ok(NatsConsumer {
            consumer,
            messages,
            pause: REOPEN_FIRST,
        })
    }

    pub(crate) async fn kv(&self, bucket: &str, history: i64) -> Result<NatsKv, BusError> {
        let store = match self.js.get_key_value(bucket).await {
            Ok(store) => store,
            Err(_) => {
                // The bucket's stream as async-nats would make it, but for one setting: with more than
                // one replica a direct get may be answered by a follower behind its leader, and a read
                // just after a write could miss it (a device forgotten, a compare-and-set from a stale
                // revision refused). Every read of our buckets must see the last write: with replicas,
                // reads go to the stream's leader.
                self.js
                    .get_or_create_stream(stream::Config {
                        name: format!("KV_{bucket}"),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        max_messages_per_subject: history,
                        storage: stream::StorageType::File,
                        num_replicas: self.replicas,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: self.replicas == 1,
                        discard: stream::DiscardPolicy::New,
                        ..Default::default()
                    })
                    .await
                    .map_err(nats_error)?;
                self.js.get_key_value(bucket).await.map_err(nats_error)?
            }
        };
        let store = if self.replicas > 1 {
            self.reads_from_the_leader(bucket, store).await?
        } else {
            store
        };
        Ok(NatsKv { store })
    }

    /// A bucket made with direct gets (by an earlier version) is changed to leader reads when it has
    /// replicas; see [`Self::kv`].
    async fn reads_from_the_leader(
        &self,
        bucket: &str,
        store: kv::Store,
    ) -> Result<kv::Store, BusError> {
        // The store was opened with its stream's configuration: no request needed to see it.
        let config = &store.stream.cached_info().config;
        if !config.allow_direct {
            return Ok(store);
        }
        let mut config = config.clone();
        config.allow_direct = false;
        self.js.update_stream(config).await.map_err(nats_error)?;
        // The store remembers how its stream was configured when it was opened.
        self.js.get_key_value(bucket).await.map_err(nats_error)
    }

    pub(crate) async fn serve(&self, subject: &str, group: &str) -> Result<NatsRequests, BusError> {
        let sub = self
            .client
            .queue_subscribe(subject.to_string(), group.to_string())
            .await
            .map_err(nats_error)?;
        // The subscription must reach the server before anyone can be answered.
        self.client.flush().await.map_err(nats_error)?;
        Ok(NatsRequests {
            sub,
            client: self.client.clone(),
        })
    }

    pub(crate) async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        timed(
            BusOp::Request,
            self.request_untimed(subject, headers, payload, timeout),
        )
        .await
    }

    async fn request_untimed(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        let fut =
            self.client
                .request_with_headers(subject.to_string(), to_header_map(&headers), payload);
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(BusError::TimedOut(format!("request on {subject}"))),
            Ok(Err(e)) => match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    Err(BusError::NoResponders(subject.to_string()))
                }
                async_nats::RequestErrorKind::TimedOut => {
                    Err(BusError::TimedOut(format!("request on {subject}")))
                }
                _ => Err(nats_error(e)),
            },
            Ok(Ok(m)) => Ok(Message {
                subject: m.subject.to_string(),
                headers: from_header_map(m.headers.as_ref()),
                payload: m.payload,
            }),
        }
    }
}

/// How long one pull request waits at the server, and how often the server says it is still there when
/// it has nothing. A pull request lives on the server that leads the consumer; when that server dies
/// (a cluster node lost), the request dies with it and only missing heartbeats tell: two missed ones
/// reopen the pull, so a consumer resumes seconds after a new leader is elected rather than after the
/// client's default 30 s expiry.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

async fn open_messages(
    consumer: &consumer::PullConsumer,
) -> Result<consumer::pull::Stream, consumer::StreamError> {
    consumer
        .stream()
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
}

/// The pause before the first pull again after a lost one, and the longest.
const REOPEN_FIRST: Duration = Duration::from_millis(50);
const REOPEN_MAX: Duration = Duration::from_secs(2);

pub struct NatsConsumer {
    consumer: consumer::PullConsumer,
    messages: consumer::pull::Stream,
    /// The pause before the next pull again; back to the first once a message arrives.
    pause: Duration,
}

impl std::fmt::Debug for NatsConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConsumer").finish_non_exhaustive()
    }
}

impl NatsConsumer {
    /// Opens a new pull after a pause that doubles (to 2 s) while pulls keep failing: with no server
    /// leading the consumer yet, a pull fails at once, and pulling again at once would spin.
    async fn reopen(&mut self) {
        loop {
            tokio::time::sleep(self.pause).await;
            self.pause = (self.pause * 2).clamp(REOPEN_FIRST, REOPEN_MAX);
            match open_messages(&self.consumer).await {
                Ok(messages) => {
                    self.messages = messages;
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "consumer cannot pull yet"),
            }
        }
    }

    pub(crate) async fn next(&mut self) -> Result<Option<Delivery>, BusError> {
        loop {
            let Some(next) = self.messages.next().await else {
                return Ok(None);
            };
            let m = match next {
                Ok(m) => {
                    self.pause = REOPEN_FIRST;
                    m
                }
                // The pull request is gone (its server died, or no server leads the consumer yet):
                // pull again. Nothing is lost: no message came since the last heartbeat.
                Err(e)
                    if matches!(
                        e.kind(),
                        consumer::pull::MessagesErrorKind::MissingHeartbeat
                            | consumer::pull::MessagesErrorKind::NoResponders
                    ) =>
                {
                    tracing::warn!(error = %e, "consumer lost its pull request; pulling again");
                    self.reopen().await;
                    continue;
                }
                // Other transient stream errors: keep reading.
                Err(e) => {
                    tracing::warn!(error = %e, "consumer stream error");
                    continue;
                }
            };
            let attempt = m
                .info()
                .map(|i| u64::try_from(i.delivered).unwrap_or(1))
                .unwrap_or(1);
            let message = Message {
                subject: m.subject.to_string(),
                headers: from_header_map(m.headers.as_ref()),
                payload: m.payload.clone(),
            };
            return Ok(Some(Delivery {
                message,
                attempt,
                acker: Acker::Nats(Box::new(m)),
            }));
        }
    }
}

#[derive(Debug, Clone)]
pub struct NatsKv {
    store: kv::Store,
}

impl NatsKv {
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Entry>, BusError> {
        timed(BusOp::KvGet, self.get_untimed(key)).await
    }

    async fn get_untimed(&self, key: &str) -> Result<Option<Entry>, BusError> {
        let entry = self.store.entry(key).await.map_err(nats_error)?;
        Ok(entry.and_then(|e| match e.operation {
            kv::Operation::Put => Some(Entry {
                value: e.value,
                revision: e.revision,
            }),
            kv::Operation::Delete | kv::Operation::Purge => None,
        }))
    }

    pub(crate) async fn create(&self, key: &str, value: Bytes) -> Result<u64, BusError> {
        timed(BusOp::KvCreate, self.create_untimed(key, value)).await
    }

    async fn create_untimed(&self, key: &str, value: Bytes) -> Result<u64, BusError> {
        self.store
            .create(key, value)
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => BusError::Conflict(key.to_string()),
                kv::CreateErrorKind::InvalidKey => BusError::InvalidKey(key.to_string()),
                _ if write_in_flight(&e) => BusError::Conflict(key.to_string()),
                _ => nats_error(e),
            })
    }

    pub(crate) async fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<u64, BusError> {
        timed(BusOp::KvUpdate, self.update_untimed(key, value, revision)).await
    }

    async fn update_untimed(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<u64, BusError> {
        self.store
            .update(key, value, revision)
            .await
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => BusError::Conflict(key.to_string()),
                kv::UpdateErrorKind::InvalidKey => BusError::InvalidKey(key.to_string()),
                _ if write_in_flight(&e) => BusError::Conflict(key.to_string()),
                _ => nats_error(e),
            })
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), BusError> {
        timed(BusOp::KvDelete, self.delete_untimed(key)).await
    }

    async fn delete_untimed(&self, key: &str) -> Result<(), BusError> {
        self.store.delete(key).await.map_err(nats_error)
    }

    pub(crate) async fn keys(&self) -> Result<Vec<String>, BusError> {
        let mut keys = self.store.keys().await.map_err(nats_error)?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            out.push(key.map_err(nats_error)?);
        }
        Ok(out)
    }

    /// Every change from now on.
    pub(crate) async fn watch(&self) -> Result<NatsKvWatch, BusError> {
        let watch = self.store.watch_all().await.map_err(nats_error)?;
        Ok(NatsKvWatch { watch })
    }
}

pub struct NatsKvWatch {
    watch: kv::Watch,
}

impl std::fmt::Debug for NatsKvWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsKvWatch").finish_non_exhaustive()
    }
}

impl NatsKvWatch {
    pub(crate) async fn next(&mut self) -> Result<Option<crate::KvChange>, BusError> {
        let Some(entry) = self.watch.next().await else {
            return Ok(None);
        };
        let entry = entry.map_err(nats_error)?;
        Ok(Some(crate::KvChange {
            key: entry.key,
            value: matches!(entry.operation, kv::Operation::Put).then_some(entry.value),
            revision: entry.revision,
        }))
    }
}

pub struct NatsRequests {
    sub: async_nats::Subscriber,
    client: async_nats::Client,
}

impl std::fmt::Debug for NatsRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsRequests").finish_non_exhaustive()
    }
}

impl NatsRequests {
    pub(crate) async fn next(&mut self) -> Option<Request> {
        let m = self.sub.next().await?;
        Some(Request {
            message: Message {
                subject: m.subject.to_string(),
                headers: from_header_map(m.headers.as_ref()),
                payload: m.payload,
            },
            reply: Reply::Nats {
                client: self.client.clone(),
                subject: m.reply,
            },
        })
    }
}
