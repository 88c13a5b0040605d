//! The in-process bus: the semantics the services rely on, in memory. Work queues deliver each message to
//! one consumer of a durable name, redeliver what is not acknowledged within `ack_wait` (or nak'ed, after
//! its delay), and drop a publish whose msg-id was seen within the duplicate window. Buckets have revisions
//! and compare-and-set. Nothing survives the process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::subjects::subject_matches;
use crate::{
    Acker, BusError, ConsumerConfig, Delivery, Entry, Headers, Message, Reply, Request, WorkQueue,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct Stream {
    config: Option<WorkQueue>,
    /// A log (limits retention): every consumer gets every message, and the messages stay.
    log: bool,
    /// A log's messages, for consumers created later.
    kept: Vec<(u64, Message)>,
    next_seq: u64,
    /// Msg-ids within the duplicate window, and the same in the order they came (to prune cheaply).
    seen: HashMap<String, Instant>,
    seen_order: std::collections::VecDeque<(Instant, String)>,
    /// Messages no consumer takes yet (a consumer created later gets them).
    unassigned: Vec<(u64, Message)>,
    consumers: Vec<Arc<Shared>>,
}

#[derive(Debug, Default)]
struct Queue {
    messages: HashMap<u64, Message>,
    ready: VecDeque<u64>,
    attempts: HashMap<u64, u64>,
    /// Delivered and not yet settled, with the attempt that is out.
    inflight: HashMap<u64, u64>,
    /// How many times the delivery out was reported in progress: an expiry armed before the last report
    /// does nothing.
    progress: HashMap<u64, u64>,
}

#[derive(Debug)]
struct Shared {
    durable: String,
    filter: String,
    ack_wait: Duration,
    queue: Mutex<Queue>,
    notify: Notify,
}

impl Shared {
    fn push_ready(&self, seq: u64) {
        lock(&self.queue).ready.push_back(seq);
        self.notify.notify_one();
    }

    /// Delivers `seq` again unless attempt `attempt` is settled, or reported in progress since `epoch`,
    /// within `ack_wait`.
    fn expire_after_ack_wait(self: &Arc<Self>, seq: u64, attempt: u64, epoch: u64) {
        let shared = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(shared.ack_wait).await;
            let expired = {
                let mut q = lock(&shared.queue);
                let current = q.inflight.get(&seq) == Some(&attempt)
                    && q.progress.get(&seq).copied().unwrap_or(0) == epoch;
                if current {
                    q.inflight.remove(&seq);
                }
                current
            };
            if expired {
                shared.push_ready(seq);
            }
        });
    }
}

type Services = HashMap<String, Vec<(String, mpsc::UnboundedSender<Request>)>>;

#[derive(Debug, Default)]
struct State {
    streams: HashMap<String, Stream>,
    buckets: HashMap<String, MemoryKv>,
    services: Services,
}

#[derive(Debug, Clone, Default)]
pub struct MemoryBus {
    state: Arc<Mutex<State>>,
}

impl MemoryBus {
    pub(crate) fn ensure_work_queue(&self, q: &WorkQueue) -> Result<(), BusError> {
        let mut state = lock(&self.state);
        state.streams.entry(q.stream.clone()).or_default().config = Some(q.clone());
        Ok(())
    }

    pub(crate) fn ensure_log(&self, l: &crate::LogStream) -> Result<(), BusError> {
        let mut state = lock(&self.state);
        let stream = state.streams.entry(l.stream.clone()).or_default();
        stream.config = Some(WorkQueue {
            stream: l.stream.clone(),
            subjects: l.subjects.clone(),
            duplicate_window: Duration::from_secs(120),
        });
        stream.log = true;
        Ok(())
    }

    pub(crate) fn publish(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: &str,
    ) -> Result<(), BusError> {
        let mut state = lock(&self.state);
        let stream = state
            .streams
            .values_mut()
            .find(|s| {
                s.config
                    .as_ref()
                    .is_some_and(|c| c.subjects.iter().any(|p| subject_matches(p, subject)))
            })
            .ok_or_else(|| BusError::NoStream(subject.to_string()))?;
        let window = stream
            .config
            .as_ref()
            .map_or(Duration::from_secs(120), |c| c.duplicate_window);
        let now = Instant::now();
        // Ids leave the window oldest first: pruning costs what expired, not what is kept.
        while let Some((at, id)) = stream.seen_order.front() {
            if now.duration_since(*at) < window {
                break;
            }
            if stream.seen.get(id) == Some(at) {
                stream.seen.remove(id);
            }
            stream.seen_order.pop_front();
        }
        if !msg_id.is_empty() && stream.seen.contains_key(msg_id) {
            return Ok(());
        }
        if !msg_id.is_empty() {
            stream.seen.insert(msg_id.to_string(), now);
            stream.seen_order.push_back((now, msg_id.to_string()));
        }
        stream.next_seq += 1;
        let seq = stream.next_seq;
        let message = Message {
            subject: subject.to_string(),
            headers,
            payload,
        };
        if stream.log {
            for consumer in stream
                .consumers
                .iter()
                .filter(|c| subject_matches(&c.filter, subject))
            {
                lock(&consumer.queue).messages.insert(seq, message.clone());
                consumer.push_ready(seq);
            }
            stream.kept.push((seq, message));
            return Ok(());
        }
        match stream
            .consumers
            .iter()
            .find(|c| subject_matches(&c.filter, subject))
        {
            Some(consumer) => {
                lock(&consumer.queue).messages.insert(seq, message);
                consumer.push_ready(seq);
            }
            None => stream.unassigned.push((seq, message)),
        }
        Ok(())
    }

    pub(crate) fn consumer(&self, c: &ConsumerConfig) -> Result<MemoryConsumer, BusError> {
        let mut state = lock(&self.state);
        let stream = state
            .streams
            .get_mut(&c.stream)
            .filter(|s| s.config.is_some())
            .ok_or_else(|| BusError::NoStream(c.stream.clone()))?;
        if let Some(shared) = stream.consumers.iter().find(|s| s.durable == c.durable) {
            return Ok(MemoryConsumer {
                shared: shared.clone(),
            });
        }
        let shared = Arc::new(Shared {
            durable: c.durable.clone(),
            filter: c.filter.clone(),
            ack_wait: c.ack_wait,
            queue: Mutex::default(),
            notify: Notify::new(),
        });
        let mine: Vec<(u64, Message)> = if stream.log {
            stream
                .kept
                .iter()
                .filter(|(_, m)| subject_matches(&c.filter, &m.subject))
                .cloned()
                .collect()
        } else {
            let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut stream.unassigned)
                .into_iter()
                .partition(|(_, m)| subject_matches(&c.filter, &m.subject));
            stream.unassigned = rest;
            mine
        };
        {
            let mut q = lock(&shared.queue);
            for (seq, m) in mine {
                q.messages.insert(seq, m);
                q.ready.push_back(seq);
            }
        }
        stream.consumers.push(shared.clone());
        Ok(MemoryConsumer { shared })
    }

    pub(crate) fn kv(&self, bucket: &str) -> Result<MemoryKv, BusError> {
        let mut state = lock(&self.state);
        Ok(state.buckets.entry(bucket.to_string()).or_default().clone())
    }

    pub(crate) fn serve(&self, subject: &str, group: &str) -> Result<MemoryRequests, BusError> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.state)
            .services
            .entry(subject.to_string())
            .or_default()
            .push((group.to_string(), tx));
        Ok(MemoryRequests { rx })
    }

    pub(crate) async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let request = Request {
            message: Message {
                subject: subject.to_string(),
                headers,
                payload,
            },
            reply: Reply::Memory(reply_tx),
        };
        {
            let mut state = lock(&self.state);
            let members = state
                .services
                .iter_mut()
                .filter(|(pattern, _)| subject_matches(pattern, subject))
                .flat_map(|(_, members)| {
                    members.retain(|(_, tx)| !tx.is_closed());
                    members.iter()
                })
                .collect::<Vec<_>>();
            // One member answers (a queue group shares the work; take turns by rotating the list).
            let Some((_, tx)) = members.first() else {
                return Err(BusError::NoResponders(subject.to_string()));
            };
            tx.send(request)
                .map_err(|_| BusError::NoResponders(subject.to_string()))?;
            if let Some(list) = state.services.get_mut(subject)
                && list.len() > 1
            {
                list.rotate_left(1);
            }
        }
        match tokio::time::timeout(timeout, reply_rx).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(_)) => Err(BusError::NoResponders(subject.to_string())),
            Err(_) => Err(BusError::TimedOut(format!("request on {subject}"))),
        }
    }
}

#[derive(Debug)]
pub struct MemoryConsumer {
    shared: Arc<Shared>,
}

impl MemoryConsumer {
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = {
                let mut q = lock(&self.shared.queue);
                q.ready.pop_front().and_then(|seq| {
                    let message = q.messages.get(&seq)?.clone();
                    let attempt = q.attempts.entry(seq).or_insert(0);
                    *attempt += 1;
                    let attempt = *attempt;
                    q.inflight.insert(seq, attempt);
                    Some((seq, attempt, message))
                })
            };
            if let Some((seq, attempt, message)) = taken {
                // Not settled within ack_wait: delivered again.
                let epoch = lock(&self.shared.queue)
                    .progress
                    .get(&seq)
                    .copied()
                    .unwrap_or(0);
                self.shared.expire_after_ack_wait(seq, attempt, epoch);
                return Some(Delivery {
                    message,
                    attempt,
                    acker: Acker::Memory(MemoryAcker {
                        shared: self.shared.clone(),
                        seq,
                        attempt,
                    }),
                });
            }
            notified.await;
        }
    }
}

#[derive(Debug)]
pub struct MemoryAcker {
    shared: Arc<Shared>,
    seq: u64,
    attempt: u64,
}

impl MemoryAcker {
    /// Settles the delivery if it is still the one out; `false` when ack_wait already gave it away.
    fn settle(&self, remove: bool) -> bool {
        let mut q = lock(&self.shared.queue);
        if q.inflight.get(&self.seq) != Some(&self.attempt) {
            return false;
        }
        q.inflight.remove(&self.seq);
        if remove {
            q.messages.remove(&self.seq);
            q.attempts.remove(&self.seq);
            q.progress.remove(&self.seq);
        }
        true
    }

    pub(crate) fn ack(self) {
        self.settle(true);
    }

    /// Still working on it: `ack_wait` starts again.
    pub(crate) fn progress(&self) {
        let epoch = {
            let mut q = lock(&self.shared.queue);
            if q.inflight.get(&self.seq) != Some(&self.attempt) {
                return;
            }
            let epoch = q.progress.entry(self.seq).or_insert(0);
            *epoch += 1;
            *epoch
        };
        self.shared
            .expire_after_ack_wait(self.seq, self.attempt, epoch);
    }

    pub(crate) fn term(self) {
        self.settle(true);
    }

    pub(crate) fn nak(self, delay: Duration) {
        if self.settle(false) {
            let shared = self.shared.clone();
            let seq = self.seq;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                shared.push_ready(seq);
            });
        }
    }
}

#[derive(Debug, Default)]
struct Bucket {
    revision: u64,
    entries: HashMap<String, Entry>,
    /// Entries read or written so far, one per key a listing returned (see `Kv::entries_touched`).
    touched: u64,
    /// Who watches the bucket's changes.
    watchers: Vec<tokio::sync::mpsc::UnboundedSender<crate::KvChange>>,
}

impl Bucket {
    fn changed(&mut self, key: &str, value: Option<Bytes>) {
        let change = crate::KvChange {
            key: key.to_string(),
            value,
            revision: self.revision,
        };
        self.watchers.retain(|w| w.send(change.clone()).is_ok());
    }
}

#[derive(Debug, Clone, Default)]
pub struct MemoryKv {
    bucket: Arc<Mutex<Bucket>>,
}

impl MemoryKv {
    pub(crate) fn get(&self, key: &str) -> Option<Entry> {
        let mut b = lock(&self.bucket);
        b.touched += 1;
        b.entries.get(key).cloned()
    }

    pub(crate) fn touched(&self) -> u64 {
        lock(&self.bucket).touched
    }

    pub(crate) fn create(&self, key: &str, value: Bytes) -> Result<u64, BusError> {
        let mut b = lock(&self.bucket);
        b.touched += 1;
        if b.entries.contains_key(key) {
            return Err(BusError::Conflict(key.to_string()));
        }
        b.revision += 1;
        let revision = b.revision;
        b.entries.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                revision,
            },
        );
        b.changed(key, Some(value));
        Ok(revision)
    }

    pub(crate) fn update(&self, key: &str, value: Bytes, expected: u64) -> Result<u64, BusError> {
        let mut b = lock(&self.bucket);
        b.touched += 1;
        match b.entries.get(key) {
            Some(e) if e.revision == expected => {}
            _ => return Err(BusError::Conflict(key.to_string())),
        }
        b.revision += 1;
        let revision = b.revision;
        b.entries.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                revision,
            },
        );
        b.changed(key, Some(value));
        Ok(revision)
    }

    pub(crate) fn delete(&self, key: &str) {
        let mut b = lock(&self.bucket);
        b.touched += 1;
        b.revision += 1;
        b.entries.remove(key);
        b.changed(key, None);
    }

    pub(crate) fn watch(&self) -> tokio::sync::mpsc::UnboundedReceiver<crate::KvChange> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        lock(&self.bucket).watchers.push(tx);
        rx
    }

    pub(crate) fn keys(&self) -> Vec<String> {
        let mut b = lock(&self.bucket);
        b.touched += b.entries.len() as u64;
        b.entries.keys().cloned().collect()
    }
}

#[derive(Debug)]
pub struct MemoryRequests {
    rx: mpsc::UnboundedReceiver<Request>,
}

impl MemoryRequests {
    pub(crate) async fn next(&mut self) -> Option<Request> {
        self.rx.recv().await
    }
}
