//! The consumer stack on both buses: retries with back-off until done, poison dropped with a dead-letter
//! record in the audit stream after `max_deliver`, one message at a time per key, several keys at once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dm_bus::stack::{self, Settle, StackConfig};
use dm_bus::testing::NatsServer;
use dm_bus::{Area, Bus, ConsumerConfig, Headers, Names};
use tokio::sync::Notify;

const DEADLINE: Duration = Duration::from_secs(20);

async fn buses() -> Vec<(Bus, Option<NatsServer>)> {
    let server =
        NatsServer::start().expect("a nats-server for the tests (scripts/test installs one)");
    let nats = Bus::connect(server.url()).await.unwrap();
    vec![(Bus::in_process(), None), (nats, Some(server))]
}

async fn setup(bus: &Bus, names: &Names) -> StackConfig {
    bus.ensure_work_queue(&names.work_queue(Area::Cmd))
        .await
        .unwrap();
    bus.ensure_log(&dm_bus::LogStream {
        stream: names.stream(Area::Audit),
        subjects: vec![names.area_wildcard(Area::Audit)],
        max_age: Duration::from_secs(3600),
    })
    .await
    .unwrap();
    let mut config = StackConfig::new(
        "worker",
        ConsumerConfig {
            stream: names.stream(Area::Cmd),
            durable: names.consumer("worker").unwrap(),
            filter: names.area_wildcard(Area::Cmd),
            ack_wait: Duration::from_secs(30),
        },
    );
    config.backoff_min = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(40);
    config.max_deliver = 3;
    config.lanes = 4;
    config.dead_letter_subject = Some(names.subject(Area::Audit, "dead").unwrap());
    config
}

/// A log of what the handler saw: (payload, attempt).
type Seen = Arc<Mutex<Vec<(String, u64)>>>;

async fn wait_until(seen: &Seen, changed: &Notify, done: impl Fn(&[(String, u64)]) -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let notified = changed.notified();
        if done(&seen.lock().unwrap()) {
            return;
        }
        assert!(
            tokio::time::timeout_at(deadline, notified).await.is_ok(),
            "{:?}",
            seen.lock().unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_done_and_drops_poison_with_a_dead_letter_record() {
    for (i, (bus, _server)) in buses().await.into_iter().enumerate() {
        let names = Names::new("stack1").unwrap();
        let mut config = setup(&bus, &names).await;
        // Its own label value: the registry is the process's, shared by the tests running beside it.
        config.deployment = format!("stack-metrics-{i}");
        let metrics = dm_metrics::global().consumer(&config.deployment, "worker");
        let seen: Seen = Arc::default();
        let changed = Arc::new(Notify::new());
        let (log, notify) = (seen.clone(), changed.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(stack::consume(
            bus.clone(),
            config,
            |m| String::from_utf8_lossy(&m.payload).to_string(),
            move |m, attempt| {
                let (log, notify) = (log.clone(), notify.clone());
                async move {
                    let text = String::from_utf8_lossy(&m.payload).to_string();
                    log.lock().unwrap().push((text.clone(), attempt));
                    notify.notify_waiters();
                    match text.as_str() {
                        // Not now, then done.
                        "flaky" if attempt < 2 => Settle::Retry("away".into()),
                        "bad" => Settle::Retry("never works".into()),
                        _ => Settle::Done,
                    }
                }
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        for (i, text) in ["flaky", "bad", "fine"].into_iter().enumerate() {
            bus.publish(
                &names.subject(Area::Cmd, "x.do").unwrap(),
                Headers::new(),
                Bytes::from(text),
                &format!("m{i}"),
            )
            .await
            .unwrap();
        }
        wait_until(&seen, &changed, |s| {
            s.contains(&("flaky".into(), 2))
                && s.contains(&("fine".into(), 1))
                && s.contains(&("bad".into(), 3))
        })
        .await;
        // The poison message came with a dead-letter record naming the consumer and the reason.
        let mut audit = bus
            .consumer(&ConsumerConfig {
                stream: names.stream(Area::Audit),
                durable: names.consumer("reader").unwrap(),
                filter: names.area_wildcard(Area::Audit),
                ack_wait: Duration::from_secs(30),
            })
            .await
            .unwrap();
        let record = tokio::time::timeout(DEADLINE, audit.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let headers = &record.message.headers;
        assert_eq!(headers.get(stack::DEAD_LETTER_SERVICE), Some("worker"));
        let reason = headers.get(stack::DEAD_LETTER_REASON).unwrap();
        assert!(
            reason.contains("3 attempts") && reason.contains("never works"),
            "{reason}"
        );
        let _ = stop_tx.send(());
        tokio::time::timeout(DEADLINE, running)
            .await
            .unwrap()
            .unwrap();
        // Metrics: flaky came twice, bad three times (three deliveries again); bad was dropped.
        assert_eq!(metrics.redeliveries(), 3);
        assert_eq!(metrics.dead_letters(), 1);
        let text = dm_metrics::encode();
        for line in [
            format!(
                r#"dmd_bus_redeliveries_total{{deployment="stack-metrics-{i}",service="worker"}} 3"#
            ),
            format!(
                r#"dmd_bus_dead_letters_total{{deployment="stack-metrics-{i}",service="worker"}} 1"#
            ),
            format!(
                r#"dmd_bus_messages_in_flight{{deployment="stack-metrics-{i}",service="worker"}} 0"#
            ),
        ] {
            assert!(text.contains(&line), "{line} not in\n{text}");
        }
        // Each message was handled until settled, never again after.
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen.iter().filter(|(t, _)| t == "bad").count(),
            3,
            "{seen:?}"
        );
        assert_eq!(
            seen.iter().filter(|(t, _)| t == "fine").count(),
            1,
            "{seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_at_a_time_per_key_and_keys_at_once() {
    for (bus, _server) in buses().await {
        let names = Names::new("stack2").unwrap();
        let config = setup(&bus, &names).await;
        // Key "a" is held until key "b" was handled: lanes run at once; the order within "a" stays.
        let b_done = Arc::new(Notify::new());
        let seen: Seen = Arc::default();
        let changed = Arc::new(Notify::new());
        let (log, notify, gate) = (seen.clone(), changed.clone(), b_done.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(stack::consume(
            bus.clone(),
            config,
            // The key is the payload without its last character: "a1", "a2" → "a".
            |m| {
                let text = String::from_utf8_lossy(&m.payload).to_string();
                text[..text.len().saturating_sub(1)].to_string()
            },
            move |m, attempt| {
                let (log, notify, gate) = (log.clone(), notify.clone(), gate.clone());
                async move {
                    let text = String::from_utf8_lossy(&m.payload).to_string();
                    if text == "a1" {
                        let _ = tokio::time::timeout(DEADLINE, gate.notified()).await;
                    }
                    let is_b = !text.starts_with('a');
                    log.lock()
                        .unwrap()
                        .push((if is_b { "b1".into() } else { text }, attempt));
                    if is_b {
                        gate.notify_one();
                    }
                    notify.notify_waiters();
                    Settle::Done
                }
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        // Two keys on two lanes.
        let other = (0..)
            .map(|n| format!("b{n}"))
            .find(|k| stack::lane_of(k, 4) != stack::lane_of("a", 4))
            .unwrap();
        let b1 = format!("{other}1");
        for (subject, text) in [("a.k", "a1"), ("a.k", "a2"), ("b.k", b1.as_str())] {
            bus.publish(
                &names.subject(Area::Cmd, subject).unwrap(),
                Headers::new(),
                Bytes::from(text.to_string()),
                text,
            )
            .await
            .unwrap();
        }
        wait_until(&seen, &changed, |s| s.len() == 3).await;
        let order: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.clone())
            .collect();
        assert_eq!(order, ["b1", "a1", "a2"]);
        let _ = stop_tx.send(());
        tokio::time::timeout(DEADLINE, running)
            .await
            .unwrap()
            .unwrap();
    }
}
