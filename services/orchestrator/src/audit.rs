//! The audit records of stored changes, written in batches (group commit).
//!
//! Every decision that stores a change publishes its audit record before the decision is done (the
//! record is in the outbox, ARCHITECTURE rule 12). One JetStream write per record was 12 of a
//! delegation's ~70 writes; under load many decisions are ready at the same moment, so the records that
//! queue up while one write is on its way go together in the next one (`AuditBatch`). A decision still
//! waits until its own record is stored. Alone, a record is written at once (a batch of one), so nothing
//! waits for a batch to fill.

use std::hash::{Hash, Hasher};

use bytes::Bytes;
use dm_bus::{Bus, BusError};
use dm_proto::bus::v1::{AuditBatch, AuditEvent};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

/// Records in one write at most (a batch of 256 small records is ~60 KB, well under NATS's 1 MB).
const MAX_BATCH: usize = 256;

struct Pending {
    event: AuditEvent,
    done: oneshot::Sender<Result<(), BusError>>,
}

/// Hands records to the task that writes them; cheap to share.
#[derive(Debug, Clone)]
pub struct AuditWriter {
    queue: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("outbox_id", &self.event.outbox_id)
            .finish()
    }
}

impl AuditWriter {
    /// Starts the writing task on the current runtime; it ends when the last writer is dropped.
    pub fn start(bus: Bus, subject: String) -> Self {
        let (queue, pending) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(serve(bus, subject, pending));
        Self { queue }
    }

    /// Stores `event` (with those ready beside it); returns once it is in the audit stream.
    pub async fn write(&self, event: AuditEvent) -> Result<(), BusError> {
        let (done, stored) = oneshot::channel();
        self.queue
            .send(Pending { event, done })
            .await
            .map_err(|_| BusError::Closed)?;
        stored.await.map_err(|_| BusError::Closed)?
    }
}

/// The message id of a batch, for the stream's duplicate window: a batch of one keeps its record's own
/// id (as when every record was a message), a larger one an id derived from all of its records'.
fn batch_id(events: &[AuditEvent]) -> String {
    match events {
        [one] => one.outbox_id.clone(),
        many => {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            for e in many {
                e.outbox_id.hash(&mut hasher);
            }
            format!("audit-batch:{}:{:016x}", many.len(), hasher.finish())
        }
    }
}

async fn serve(bus: Bus, subject: String, mut queue: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (events, waiting): (Vec<AuditEvent>, Vec<_>) =
            batch.drain(..).map(|p| (p.event, p.done)).unzip();
        let id = batch_id(&events);
        let payload = Bytes::from(AuditBatch { events }.encode_to_vec());
        let result = bus
            .publish(
                &subject,
                crate::typed_headers("dmd.bus.v1.AuditBatch"),
                payload,
                &id,
            )
            .await;
        for done in waiting {
            let _ = done.send(result.clone());
        }
    }
}

/// The records of one message of the audit stream, batched or not (by its type header).
pub fn records_of(type_name: &str, payload: &[u8]) -> Result<Vec<AuditEvent>, prost::DecodeError> {
    if type_name == "dmd.bus.v1.AuditBatch" {
        Ok(AuditBatch::decode(payload)?.events)
    } else {
        Ok(vec![AuditEvent::decode(payload)?])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn event(id: &str) -> AuditEvent {
        AuditEvent {
            outbox_id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_batch_of_one_keeps_its_records_id_and_larger_ones_depend_on_every_record() {
        assert_eq!(batch_id(&[event("k:3:0")]), "k:3:0");
        let ab = batch_id(&[event("a:1:0"), event("b:1:0")]);
        assert_eq!(ab, batch_id(&[event("a:1:0"), event("b:1:0")]));
        assert_ne!(ab, batch_id(&[event("a:1:0"), event("c:1:0")]));
    }

    #[test]
    fn both_kinds_of_message_decode_to_their_records() {
        let one = event("k:1:0");
        let batch = AuditBatch {
            events: vec![event("a:1:0"), event("b:2:0")],
        };
        assert_eq!(
            records_of("dmd.bus.v1.AuditEvent", &one.encode_to_vec()).unwrap(),
            vec![one]
        );
        assert_eq!(
            records_of("dmd.bus.v1.AuditBatch", &batch.encode_to_vec()).unwrap(),
            batch.events
        );
        assert!(records_of("dmd.bus.v1.AuditBatch", b"\xff\xff").is_err());
    }
}
