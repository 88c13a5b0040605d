//! The notification service on the bus: answers the saga's `AskAcceptance` commands with the policy's
//! verdict (docs/bus.md).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dm_bus::{Area, Bus, BusError, ConsumerConfig, Headers, Names};
use dm_proto::bus::v1::{CommandEnvelope, EventEnvelope};
use dm_saga::pb::{Event, Work, WorkResult, command, event};
use prost::Message as _;

use crate::policy::{AcceptancePolicy, Verdict};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Serves `cmd.notification.*` until `shutdown`.
pub async fn run(
    policy: AcceptancePolicy,
    bus: Bus,
    names: Names,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), BusError> {
    let mut commands = bus
        .consumer(&ConsumerConfig {
            stream: names.stream(Area::Cmd),
            durable: names.consumer("notification")?,
            filter: names.commands_for("notification")?,
            ack_wait: Duration::from_secs(30),
        })
        .await?;
    tokio::pin!(shutdown);
    loop {
        let delivery = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            d = commands.next() => match d? {
                Some(d) => d,
                None => return Ok(()),
            },
        };
        let Ok(envelope) = CommandEnvelope::decode(delivery.message.payload.clone()) else {
            delivery.term().await?;
            continue;
        };
        let ask = match envelope.command.as_ref().and_then(|c| c.kind.as_ref()) {
            Some(command::Kind::AskAcceptance(ask)) => ask.clone(),
            _ => {
                delivery.term().await?;
                continue;
            }
        };
        let peer = envelope
            .delegation
            .as_ref()
            .map(|d| d.peer_server_id.as_str())
            .unwrap_or_default();
        let verdict = ask
            .notif
            .as_ref()
            .map(|n| policy.decide(peer, n, now_ms()))
            .unwrap_or(Verdict::Nack {
                status: 400,
                reason: "no proposal".into(),
            });
        let mut result = match verdict {
            Verdict::Ack => WorkResult {
                ok: true,
                ..Default::default()
            },
            Verdict::Nack { status, reason } => WorkResult {
                ok: false,
                status_code: status,
                reason,
                ..Default::default()
            },
        };
        result.set_work(Work::Acceptance);
        let outcome = EventEnvelope {
            delegation: envelope.delegation.clone(),
            event: Some(Event {
                kind: Some(event::Kind::Work(result)),
            }),
        };
        let mut headers = Headers::new();
        headers.insert("dmd-type", "dmd.bus.v1.EventEnvelope");
        // The delegation's trace goes on with the outcome.
        for name in ["traceparent", "tracestate"] {
            if let Some(v) = delivery.message.headers.get(name) {
                headers.insert(name, v);
            }
        }
        bus.publish(
            &names.subject(Area::Evt, "notification.decided")?,
            headers,
            Bytes::from(outcome.encode_to_vec()),
            &format!("{}:result", envelope.outbox_id),
        )
        .await?;
        delivery.ack().await?;
    }
}
