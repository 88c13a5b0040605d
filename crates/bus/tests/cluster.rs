//! The bus on a three-node JetStream cluster (`testing::NatsCluster`): streams and buckets get the
//! replicas asked for, and work queues, key-value buckets and request/reply go on when a node is killed —
//! the one the client is connected to, then (after it is back) the meta leader.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dm_bus::testing::NatsCluster;
use dm_bus::{Area, Bus, BusError, BusOptions, ConsumerConfig, Headers, Names};

/// How long the cluster may take to get over a lost node (raft elections take seconds).
const RECOVERY: Duration = Duration::from_secs(30);

/// Tries `f` until it succeeds or `RECOVERY` has passed.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BusError>>,
{
    let deadline = tokio::time::Instant::now() + RECOVERY;
    loop {
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(Ok(v)) => return v,
            Ok(Err(e)) if tokio::time::Instant::now() < deadline => {
                eprintln!("{what}: {e}; trying again");
                // A pause between tries of a condition with a deadline, not a timing assumption.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(e)) => panic!("{what}: still failing after {RECOVERY:?}: {e}"),
            Err(_) => panic!("{what}: no answer within {RECOVERY:?}"),
        }
    }
}

#[tokio::test]
async fn replicas_out_of_range_and_empty_urls_are_refused() {
    for replicas in [0, 6] {
        let err = Bus::connect_with(
            "nats://127.0.0.1:1",
            BusOptions {
                replicas,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BusError::InvalidOption(_)), "{err}");
    }
    let err = Bus::connect(" , ").await.unwrap_err();
    assert!(matches!(err, BusError::InvalidOption(_)), "{err}");
}

async fn config_of(cluster: &NatsCluster, stream: &str) -> async_nats::jetstream::stream::Config {
    let client = async_nats::connect(cluster.urls()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream(stream).await.unwrap();
    s.info().await.unwrap().config.clone()
}

async fn replicas_of(cluster: &NatsCluster, stream: &str) -> usize {
    config_of(cluster, stream).await.num_replicas
}

/// One round of everything the services use: a publish consumed and acked, a key created and read back,
/// earlier keys still there, a request answered.
async fn round(bus: &Bus, names: &Names, consumer: &mut dm_bus::Consumer, n: u32) {
    let t0 = Instant::now();
    let bucket = names.bucket("state").unwrap();
    let kv = eventually(&format!("bucket {n}"), || bus.kv(&bucket, 1)).await;
    let subject = names.subject(Area::Cmd, "work.do").unwrap();
    let payload = Bytes::from(format!("job {n}"));
    let msg_id = format!("job-{n}");
    eventually(&format!("publish {n}"), || {
        bus.publish(&subject, Headers::new(), payload.clone(), &msg_id)
    })
    .await;
    tokio::time::timeout(RECOVERY, async {
        loop {
            match consumer.next().await {
                Ok(Some(d)) => {
                    let ours = d.message.payload == payload;
                    // An ack lost with a node brings an earlier job back later: it is acked again.
                    if let Err(e) = d.ack().await {
                        eprintln!("ack: {e}");
                    }
                    if ours {
                        return;
                    }
                }
                Ok(None) => panic!("the consumer ended"),
                Err(e) => eprintln!("consumer: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("job {n} not delivered within {RECOVERY:?}"));
    let key = format!("k{n}");
    let value = Bytes::from(format!("v{n}"));
    eventually(&format!("create {key}"), || async {
        match kv.create(&key, value.clone()).await {
            // A create whose answer was lost on the way may have been stored.
            Err(BusError::Conflict(_)) => Ok(0),
            other => other,
        }
    })
    .await;
    for earlier in 0..=n {
        let key = format!("k{earlier}");
        let entry = eventually(&format!("get {key}"), || kv.get(&key)).await;
        assert_eq!(
            entry.map(|e| e.value),
            Some(Bytes::from(format!("v{earlier}"))),
            "k{earlier} after round {n}"
        );
    }
    let echo = names.subject(Area::Req, "echo.ask").unwrap();
    let answer = eventually(&format!("request {n}"), || {
        bus.request(
            &echo,
            Headers::new(),
            Bytes::from("ping"),
            Duration::from_secs(5),
        )
    })
    .await;
    assert_eq!(answer.payload, Bytes::from("pong"));
    eprintln!("round {n}: done after {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_a_node_and_then_its_meta_leader_and_goes_on() {
    let started = Instant::now();
    let mut cluster = NatsCluster::start(3)
        .await
        .expect("a three-node nats-server cluster (scripts/test installs nats-server)");
    eprintln!("cluster ready after {:?}", started.elapsed());
    let bus = Bus::connect_with(
        &cluster.url(),
        BusOptions {
            replicas: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let names = Names::new("dms1").unwrap();
    bus.ensure_work_queue(&names.work_queue(Area::Cmd))
        .await
        .unwrap();
    let bucket = names.bucket("state").unwrap();
    bus.kv(&bucket, 1).await.unwrap();
    assert_eq!(replicas_of(&cluster, &names.stream(Area::Cmd)).await, 3);
    assert_eq!(replicas_of(&cluster, &format!("KV_{bucket}")).await, 3);
    // A follower may answer a direct get with what it has: reads must go to the leader.
    assert!(
        !config_of(&cluster, &format!("KV_{bucket}"))
            .await
            .allow_direct
    );
    let mut consumer = bus
        .consumer(&ConsumerConfig {
            stream: names.stream(Area::Cmd),
            durable: names.consumer("worker").unwrap(),
            filter: names.area_wildcard(Area::Cmd),
            ack_wait: Duration::from_secs(30),
        })
        .await
        .unwrap();
    let mut requests = bus
        .serve(
            &names.subject(Area::Req, "echo.ask").unwrap(),
            &names.queue_group("echo").unwrap(),
        )
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(r) = requests.next().await {
            let _ = r.respond(Headers::new(), Bytes::from("pong")).await;
        }
    });
    round(&bus, &names, &mut consumer, 0).await;

    // The node this client is connected to: the client must fail over.
    let connected = bus.connected_server().expect("connected");
    let first = cluster.index_of(&connected).unwrap();
    cluster.stop(first);
    let t = Instant::now();
    round(&bus, &names, &mut consumer, 1).await;
    eprintln!("stopped {connected}: next round after {:?}", t.elapsed());

    cluster.restart(first).await.unwrap();
    cluster.wait_ready(RECOVERY).await.unwrap();
    let leader = cluster.meta_leader().await.expect("a meta leader");
    eprintln!(
        "{connected} back; stopping the meta leader {}",
        cluster.name(leader).unwrap()
    );
    cluster.stop(leader);
    let t = Instant::now();
    round(&bus, &names, &mut consumer, 2).await;
    eprintln!(
        "stopped the meta leader: next round after {:?}",
        t.elapsed()
    );
    eprintln!("whole test {:?}", started.elapsed());
}
