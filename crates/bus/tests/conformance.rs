//! The same behaviour from both buses: every scenario runs on the in-process bus and on a real
//! `nats-server` started by the test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bytes::Bytes;
use dm_bus::testing::NatsServer;
use dm_bus::{Area, Bus, BusError, ConsumerConfig, Headers, Names};

const DEADLINE: Duration = Duration::from_secs(10);

async fn buses() -> Vec<(Bus, Option<NatsServer>)> {
    let server =
        NatsServer::start().expect("a nats-server for the tests (scripts/test installs one)");
    let nats = Bus::connect(server.url()).await.unwrap();
    vec![(Bus::in_process(), None), (nats, Some(server))]
}

fn label(bus: &Bus) -> &'static str {
    match bus {
        Bus::Memory(_) => "in-process",
        Bus::Nats(_) => "nats",
    }
}

async fn work_queue(bus: &Bus, names: &Names, ack_wait: Duration) -> dm_bus::Consumer {
    bus.ensure_work_queue(&names.work_queue(Area::Cmd))
        .await
        .unwrap();
    bus.consumer(&ConsumerConfig {
        stream: names.stream(Area::Cmd),
        durable: names.consumer("worker").unwrap(),
        filter: names.area_wildcard(Area::Cmd),
        ack_wait,
    })
    .await
    .unwrap()
}

async fn next(consumer: &mut dm_bus::Consumer) -> dm_bus::Delivery {
    tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("a delivery in time")
        .unwrap()
        .expect("the consumer is open")
}

#[tokio::test]
async fn publish_consume_ack_with_headers_and_dedupe() {
    for (bus, _server) in buses().await {
        let names = Names::new("dms1").unwrap();
        let mut consumer = work_queue(&bus, &names, Duration::from_secs(30)).await;
        let subject = names.subject(Area::Cmd, "provisioning.apply").unwrap();
        let mut headers = Headers::new();
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        bus.publish(
            &subject,
            headers.clone(),
            Bytes::from_static(b"one"),
            "d1:1:0",
        )
        .await
        .unwrap();
        // The same msg-id again: dropped.
        bus.publish(
            &subject,
            headers.clone(),
            Bytes::from_static(b"one again"),
            "d1:1:0",
        )
        .await
        .unwrap();
        bus.publish(
            &subject,
            Headers::new(),
            Bytes::from_static(b"two"),
            "d1:1:1",
        )
        .await
        .unwrap();
        let first = next(&mut consumer).await;
        assert_eq!(first.message.payload, "one", "{}", label(&bus));
        assert_eq!(first.message.subject, subject);
        assert_eq!(
            first.message.headers.get("traceparent"),
            headers.get("traceparent")
        );
        assert_eq!(first.attempt, 1);
        first.ack().await.unwrap();
        let second = next(&mut consumer).await;
        assert_eq!(
            second.message.payload,
            "two",
            "{}: the duplicate was delivered",
            label(&bus)
        );
        second.ack().await.unwrap();
    }
}

#[tokio::test]
async fn nak_and_ack_wait_redeliver_with_the_attempt_counted() {
    for (bus, _server) in buses().await {
        let names = Names::new("dms1").unwrap();
        let mut consumer = work_queue(&bus, &names, Duration::from_secs(1)).await;
        let subject = names.subject(Area::Cmd, "x").unwrap();
        bus.publish(&subject, Headers::new(), Bytes::from_static(b"m"), "m1")
            .await
            .unwrap();
        let d = next(&mut consumer).await;
        assert_eq!(d.attempt, 1);
        d.nak(Duration::from_millis(50)).await.unwrap();
        let d = next(&mut consumer).await;
        assert_eq!(d.attempt, 2, "{}", label(&bus));
        // Not acknowledged: after ack_wait it comes back.
        drop(d);
        let d = next(&mut consumer).await;
        assert_eq!(d.attempt, 3, "{}", label(&bus));
        d.term().await.unwrap();
    }
}

#[tokio::test]
async fn replicas_sharing_a_durable_consumer_get_each_message_once() {
    for (bus, _server) in buses().await {
        let names = Names::new("dms1").unwrap();
        let mut a = work_queue(&bus, &names, Duration::from_secs(30)).await;
        let mut b = work_queue(&bus, &names, Duration::from_secs(30)).await;
        let subject = names.subject(Area::Cmd, "y").unwrap();
        for i in 0..20 {
            bus.publish(
                &subject,
                Headers::new(),
                Bytes::from(format!("{i}")),
                &format!("y{i}"),
            )
            .await
            .unwrap();
        }
        let mut seen = Vec::new();
        while seen.len() < 20 {
            let d = tokio::select! {
                d = a.next() => d.unwrap().unwrap(),
                d = b.next() => d.unwrap().unwrap(),
                _ = tokio::time::sleep(DEADLINE) => panic!("{}: only {} of 20 delivered", label(&bus), seen.len()),
            };
            seen.push(String::from_utf8(d.message.payload.to_vec()).unwrap());
            d.ack().await.unwrap();
        }
        seen.sort_by_key(|s| s.parse::<u32>().unwrap());
        seen.dedup();
        assert_eq!(
            seen.len(),
            20,
            "{}: a message was delivered twice",
            label(&bus)
        );
    }
}

#[tokio::test]
async fn key_value_compare_and_set() {
    for (bus, _server) in buses().await {
        let names = Names::new("dms1").unwrap();
        let kv = bus
            .kv(&names.bucket("delegations").unwrap(), 1)
            .await
            .unwrap();
        let key = dm_bus::subjects::encode_key("dms2.example/9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11");
        assert_eq!(kv.get(&key).await.unwrap(), None);
        let r1 = kv.create(&key, Bytes::from_static(b"v1")).await.unwrap();
        assert!(
            matches!(
                kv.create(&key, Bytes::from_static(b"again")).await,
                Err(BusError::Conflict(_))
            ),
            "{}",
            label(&bus)
        );
        let r2 = kv
            .update(&key, Bytes::from_static(b"v2"), r1)
            .await
            .unwrap();
        assert!(r2 > r1);
        // A writer holding the old revision loses.
        assert!(
            matches!(
                kv.update(&key, Bytes::from_static(b"stale"), r1).await,
                Err(BusError::Conflict(_))
            ),
            "{}",
            label(&bus)
        );
        let e = kv.get(&key).await.unwrap().unwrap();
        assert_eq!((e.value, e.revision), (Bytes::from_static(b"v2"), r2));
        assert_eq!(kv.keys().await.unwrap(), vec![key.clone()]);
        // Keys outside [-/_=.A-Za-z0-9] are refused the same way by both.
        assert!(matches!(
            kv.get("IMEI:1").await,
            Err(BusError::InvalidKey(_))
        ));
        kv.delete(&key).await.unwrap();
        assert_eq!(kv.get(&key).await.unwrap(), None, "{}", label(&bus));
        kv.create(&key, Bytes::from_static(b"v3")).await.unwrap();
    }
}

#[tokio::test]
async fn request_reply_through_a_queue_group() {
    for (bus, _server) in buses().await {
        let names = Names::new("dms1").unwrap();
        let subject = names.subject(Area::Req, "auth.verify").unwrap();
        let nobody = bus
            .request(
                &subject,
                Headers::new(),
                Bytes::new(),
                Duration::from_secs(2),
            )
            .await;
        assert!(
            matches!(
                nobody,
                Err(BusError::NoResponders(_)) | Err(BusError::TimedOut(_))
            ),
            "{}: {nobody:?}",
            label(&bus)
        );
        let mut requests = bus
            .serve(&subject, &names.queue_group("auth").unwrap())
            .await
            .unwrap();
        tokio::spawn(async move {
            while let Some(r) = requests.next().await {
                let mut body = b"echo:".to_vec();
                body.extend_from_slice(&r.message.payload);
                r.respond(Headers::new(), Bytes::from(body)).await.unwrap();
            }
        });
        let answer = bus
            .request(
                &subject,
                Headers::new(),
                Bytes::from_static(b"hi"),
                DEADLINE,
            )
            .await
            .unwrap();
        assert_eq!(answer.payload, "echo:hi", "{}", label(&bus));
    }
}

#[tokio::test]
async fn two_deployments_share_one_server_without_seeing_each_other() {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(server.url()).await.unwrap();
    let (one, two) = (Names::new("dms1").unwrap(), Names::new("dms2").unwrap());
    let mut c1 = work_queue(&bus, &one, Duration::from_secs(30)).await;
    let mut c2 = work_queue(&bus, &two, Duration::from_secs(30)).await;
    bus.publish(
        &one.subject(Area::Cmd, "a").unwrap(),
        Headers::new(),
        Bytes::from_static(b"for-one"),
        "same-id",
    )
    .await
    .unwrap();
    bus.publish(
        &two.subject(Area::Cmd, "a").unwrap(),
        Headers::new(),
        Bytes::from_static(b"for-two"),
        "same-id",
    )
    .await
    .unwrap();
    assert_eq!(next(&mut c1).await.message.payload, "for-one");
    assert_eq!(next(&mut c2).await.message.payload, "for-two");
    let k1 = bus
        .kv(&one.bucket("delegations").unwrap(), 1)
        .await
        .unwrap();
    let k2 = bus
        .kv(&two.bucket("delegations").unwrap(), 1)
        .await
        .unwrap();
    k1.create("k", Bytes::from_static(b"1")).await.unwrap();
    assert_eq!(k2.get("k").await.unwrap(), None);
}

#[tokio::test]
async fn publishing_where_no_stream_listens_is_an_error() {
    for (bus, _server) in buses().await {
        let names = Names::new("lonely").unwrap();
        let r = bus
            .publish(
                &names.subject(Area::Evt, "x").unwrap(),
                Headers::new(),
                Bytes::new(),
                "1",
            )
            .await;
        assert!(
            matches!(r, Err(BusError::NoStream(_))),
            "{}: {r:?}",
            label(&bus)
        );
    }
}

#[tokio::test]
async fn a_log_stream_gives_every_consumer_every_message() {
    for (bus, _server) in buses().await {
        let names = Names::new("dms1").unwrap();
        bus.ensure_log(&dm_bus::LogStream {
            stream: names.stream(Area::Audit),
            subjects: vec![names.area_wildcard(Area::Audit)],
            max_age: Duration::from_secs(3600),
        })
        .await
        .unwrap();
        let subject = names.subject(Area::Audit, "delegation").unwrap();
        bus.publish(&subject, Headers::new(), Bytes::from_static(b"first"), "a1")
            .await
            .unwrap();
        let reader = |durable: &'static str| ConsumerConfig {
            stream: names.stream(Area::Audit),
            durable: names.consumer(durable).unwrap(),
            filter: names.area_wildcard(Area::Audit),
            ack_wait: Duration::from_secs(30),
        };
        let mut a = bus.consumer(&reader("reader_a")).await.unwrap();
        let mut b = bus.consumer(&reader("reader_b")).await.unwrap();
        bus.publish(
            &subject,
            Headers::new(),
            Bytes::from_static(b"second"),
            "a2",
        )
        .await
        .unwrap();
        for consumer in [&mut a, &mut b] {
            for expected in ["first", "second"] {
                let d = next(consumer).await;
                assert_eq!(d.message.payload, expected, "{}", label(&bus));
                d.ack().await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn a_watcher_sees_every_change_of_a_bucket_in_order_from_any_writer() {
    for (bus, server) in buses().await {
        let kv = bus.kv("dmd_dms1_watched", 1).await.unwrap();
        let mut watch = kv.watch().await.unwrap();
        // Another client (another replica) writes too.
        let other = match &server {
            Some(s) => Bus::connect(s.url()).await.unwrap(),
            None => bus.clone(),
        };
        let other_kv = other.kv("dmd_dms1_watched", 1).await.unwrap();
        let r1 = kv.create("a", Bytes::from_static(b"1")).await.unwrap();
        let r2 = other_kv
            .update("a", Bytes::from_static(b"2"), r1)
            .await
            .unwrap();
        other_kv
            .create("b", Bytes::from_static(b"3"))
            .await
            .unwrap();
        kv.delete("a").await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 4 {
            let change = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .expect("a change in time")
                .unwrap()
                .unwrap();
            seen.push((
                change.key,
                change.value.map(|v| v.to_vec()),
                change.revision,
            ));
        }
        assert_eq!(
            seen[0],
            ("a".into(), Some(b"1".to_vec()), r1),
            "{}",
            label(&bus)
        );
        assert_eq!(
            seen[1],
            ("a".into(), Some(b"2".to_vec()), r2),
            "{}",
            label(&bus)
        );
        assert_eq!(seen[2].0, "b");
        assert_eq!((seen[3].0.as_str(), seen[3].1.as_deref()), ("a", None));
    }
}
