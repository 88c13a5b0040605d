//! The notification service on the bus: answers the saga's `AskAcceptance` commands with the policy's
//! verdict (docs/bus.md). A proposal that would make this server the delegating one (the peer asks to be
//! delegated to) is also checked against the device inventory: a device this server does not manage is
//! refused at step 1 with 404 (A.4), not acked and failed at step 4. Presence of the device's key in the
//! `devices` bucket is enough; nothing sealed is opened here.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dm_bus::stack::{Settle, StackConfig};
use dm_bus::{Area, Bus, BusError, ConsumerConfig, Headers, Message, Names};
use dm_proto::bus::v1::{CommandEnvelope, EventEnvelope};
use dm_saga::pb::{Event, Role, Work, WorkResult, command, event};
use prost::Message as _;

use crate::policy::{AcceptancePolicy, Verdict};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Serves `cmd.notification.*` until `shutdown`, through the consumer stack (several delegations at once;
/// a bus error never ends the service).
pub async fn run(
    policy: AcceptancePolicy,
    bus: Bus,
    names: Names,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), BusError> {
    let mut config = StackConfig::new(
        "notification",
        ConsumerConfig {
            stream: names.stream(Area::Cmd),
            durable: names.consumer("notification")?,
            filter: names.commands_for("notification")?,
            ack_wait: Duration::from_secs(30),
        },
    );
    config.dead_letter_subject = Some(names.subject(Area::Audit, "dead")?);
    config.deployment = names.deployment().to_string();
    let decided = names.subject(Area::Evt, "notification.decided")?;
    let devices = bus.kv(&names.bucket("devices")?, 1).await?;
    let policy = Arc::new(policy);
    let handler = {
        let bus = bus.clone();
        move |message: Message, _attempt: u64| {
            let (policy, bus, decided, devices) = (
                policy.clone(),
                bus.clone(),
                decided.clone(),
                devices.clone(),
            );
            async move { decide(&policy, &devices, &bus, &decided, message).await }
        }
    };
    let delegation = |m: &Message| {
        CommandEnvelope::decode(m.payload.clone())
            .ok()
            .and_then(|e| e.delegation)
            .map(|d| format!("{}/{}", d.peer_server_id, d.session_id))
            .unwrap_or_default()
    };
    dm_bus::stack::consume(bus, config, delegation, handler, shutdown).await;
    Ok(())
}

/// One `AskAcceptance`: the policy's verdict, published as the work's outcome.
async fn decide(
    policy: &AcceptancePolicy,
    devices: &dm_bus::Kv,
    bus: &Bus,
    decided: &str,
    message: Message,
) -> Settle {
    let Ok(envelope) = CommandEnvelope::decode(message.payload.clone()) else {
        return Settle::Poison("an undecodable command".into());
    };
    let ask = match envelope.command.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(command::Kind::AskAcceptance(ask)) => ask.clone(),
        _ => return Settle::Poison(format!("{} is not an AskAcceptance", envelope.outbox_id)),
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
    let verdict = match (verdict, ask.notif.as_ref()) {
        // The peer asks to be delegated to: this server would provision the device, so it must manage it.
        (Verdict::Ack, Some(n)) if n.sender_role() == Role::Delegated => {
            let dev_id = n.device.as_ref().map(|d| d.dev_id.as_str()).unwrap_or("");
            if dev_id.is_empty() {
                Verdict::Nack {
                    status: 400,
                    reason: "the proposal names no device".into(),
                }
            } else {
                match devices.get(&dm_bus::subjects::encode_key(dev_id)).await {
                    Ok(Some(_)) => Verdict::Ack,
                    Ok(None) => Verdict::Nack {
                        status: 404,
                        reason: format!("device {dev_id} is not managed by this server"),
                    },
                    Err(e) => {
                        return Settle::Retry(format!("the device inventory cannot be read: {e}"));
                    }
                }
            }
        }
        (verdict, _) => verdict,
    };
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
        if let Some(v) = message.headers.get(name) {
            headers.insert(name, v);
        }
    }
    match bus
        .publish(
            decided,
            headers,
            Bytes::from(outcome.encode_to_vec()),
            &format!("{}:result", envelope.outbox_id),
        )
        .await
    {
        Ok(()) => Settle::Done,
        Err(e) => Settle::Retry(format!("the verdict could not be published: {e}")),
    }
}
