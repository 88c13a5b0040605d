//! Two replicas of the provisioning service (issue 10): a device posts to whichever replica its address
//! reaches; the replica that holds the device's job carries the session, the other forwards the messages
//! to it over the bus. Here the device's address is replica B's, the job is queued on replica A.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use dm_bus::{Bus, Names};
use dm_protocol::auth;
use dm_protocol::syncml::{Command, Item, ItemCommand};
use dm_provisioning::{Config, Job, JobOutcome, JobSuccess, Provisioning};
use dm_seal::MasterKey;
use tokio::sync::mpsc::UnboundedReceiver;

mod support;

const D1: &str = "dms1.operator.example";
const DEV: &str = "IMEI:490154203237518";

/// DMS-1's shared state on an in-process bus: the device store and the device leases, with the
/// deployment's master key.
struct Shared {
    bus: Bus,
    devices: dm_bus::Kv,
    owners: dm_bus::Kv,
    key: MasterKey,
}

async fn shared() -> Shared {
    let bus = Bus::in_process();
    let names = Names::new("dms1").unwrap();
    Shared {
        devices: bus.kv("dmd_dms1_devices", 1).await.unwrap(),
        owners: bus
            .kv(&names.bucket("device_owners").unwrap(), 1)
            .await
            .unwrap(),
        bus,
        key: MasterKey::random(),
    }
}

/// A replica of DMS-1's provisioning on `bus`: the deployment's bus key, the device store (when given),
/// forwarding to and from the other replicas; package #0s go to the fleet at `fleet_url`.
async fn replica(
    config: Config,
    bus: &Bus,
    devices: Option<&dm_bus::Kv>,
    key: &MasterKey,
    fleet_url: &str,
) -> (Provisioning, UnboundedReceiver<JobOutcome>) {
    let (p, outcomes) = Provisioning::new(config, support::push(fleet_url));
    let mut p = p.with_bus_key(key.bus_key());
    if let Some(devices) = devices {
        p = p.with_device_store(devices.clone(), key.clone());
    }
    let p = p
        .with_forwarding(bus.clone(), Names::new("dms1").unwrap())
        .await
        .unwrap();
    (p, outcomes)
}

/// [`replica`] serving a device endpoint of its own, whose URL it returns too.
async fn serving_replica(
    bus: &Bus,
    devices: &dm_bus::Kv,
    key: &MasterKey,
    fleet_url: &str,
) -> (Provisioning, UnboundedReceiver<JobOutcome>, String) {
    let (listener, url) = support::dm_listener().await;
    let (p, outcomes) = replica(
        Config::new(D1, url.clone()),
        bus,
        Some(devices),
        key,
        fleet_url,
    )
    .await;
    tokio::spawn(p.clone().serve(listener, std::future::pending()));
    (p, outcomes, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reaching_another_replica_is_served_by_the_one_with_its_job() {
    let bus = Bus::in_process();
    let devices = bus.kv("dmd_dms1_devices", 1).await.unwrap();
    let key = MasterKey::random();
    let (fleet, fleet_url) = support::serve_fleet().await;
    let replica = || serving_replica(&bus, &devices, &key, &fleet_url);
    let (a, mut a_outcomes, _) = replica().await;
    let (b, mut b_outcomes, b_url) = replica().await;
    let creds = support::add_device(&fleet, DEV, D1, &b_url);
    a.seed_device(DEV, creds.clone()).await.unwrap();
    b.seed_device(DEV, creds).await.unwrap();

    for value in ["de", "fr"] {
        let id = a
            .enqueue(
                DEV,
                Job::Commands(vec![Command::Replace(ItemCommand::new(
                    "0",
                    vec![Item::target("./DevInfo/Lang").with_data(value)],
                ))]),
            )
            .await
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(20), a_outcomes.recv())
            .await
            .expect("the job's outcome in time")
            .unwrap();
        assert_eq!(outcome.job_id, id);
        assert!(
            matches!(outcome.result, Ok(JobSuccess::Commands { .. })),
            "{outcome:?}"
        );
        let lang = fleet
            .with_device(DEV, |d| {
                d.tree()
                    .value(&"./DevInfo/Lang".parse().unwrap())
                    .unwrap()
                    .to_string()
            })
            .unwrap();
        assert_eq!(lang, value);
    }
    // Now B gets a job for the device: it takes the nonces A left in the store, so its package #0 and
    // session work at once (no resynchronisation over the zero nonce).
    let id = b
        .enqueue(
            DEV,
            Job::Commands(vec![Command::Replace(ItemCommand::new(
                "0",
                vec![Item::target("./DevInfo/Lang").with_data("it")],
            ))]),
        )
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), b_outcomes.recv())
        .await
        .expect("the job's outcome in time")
        .unwrap();
    assert_eq!(outcome.job_id, id);
    assert!(outcome.result.is_ok(), "{outcome:?}");
    let sessions = fleet
        .wait_for_sessions(DEV, 3, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(sessions.iter().all(|s| !s.zero_nonce), "{sessions:?}");

    // Both replicas get work for the device at once: one talks to it while the other waits for the
    // device's lease (two sessions at once would move the nonces under each other).
    let job = |value: &str| {
        Job::Commands(vec![Command::Replace(ItemCommand::new(
            "0",
            vec![Item::target("./DevInfo/Lang").with_data(value)],
        ))])
    };
    let (on_a, on_b) = tokio::join!(a.enqueue(DEV, job("nl")), b.enqueue(DEV, job("pt")));
    let (on_a, on_b) = (on_a.unwrap(), on_b.unwrap());
    for (outcomes, id) in [(&mut a_outcomes, on_a), (&mut b_outcomes, on_b)] {
        let outcome = tokio::time::timeout(Duration::from_secs(20), outcomes.recv())
            .await
            .expect("the job's outcome in time")
            .unwrap();
        assert_eq!(outcome.job_id, id);
        assert!(outcome.result.is_ok(), "{outcome:?}");
    }
    let sessions = fleet
        .wait_for_sessions(DEV, 5, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        sessions
            .iter()
            .all(|s| s.outcome == dm_client::Outcome::Completed),
        "{sessions:?}"
    );
}

/// What a sniffer saw: each message's subject and payload.
type Seen = Vec<(String, Vec<u8>)>;

/// Forwarded device messages carry what the server writes on the device (accounts with their secrets):
/// on a real nats-server, a client subscribed to everything sees the messages forwarded between the
/// replicas, and never the value the session wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_device_messages_cross_the_bus_sealed() {
    use futures::StreamExt as _;

    const SECRET: &str = "a-value-only-the-device-may-see-4711";
    let server = dm_bus::testing::NatsServer::start().unwrap();
    let sniffer = async_nats::connect(server.url()).await.unwrap();
    let mut everything = sniffer.subscribe(">").await.unwrap();
    sniffer.flush().await.unwrap();
    let seen: Arc<std::sync::Mutex<Seen>> = Arc::default();
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(m) = everything.next().await {
                seen.lock()
                    .unwrap()
                    .push((m.subject.to_string(), m.payload.to_vec()));
            }
        })
    };
    let bus = Bus::connect(server.url()).await.unwrap();
    let devices = bus.kv("dmd_dms1_devices", 1).await.unwrap();
    let key = MasterKey::random();
    let (fleet, fleet_url) = support::serve_fleet().await;
    let replica = || serving_replica(&bus, &devices, &key, &fleet_url);
    let (a, mut a_outcomes, _) = replica().await;
    let (b, _b_outcomes, b_url) = replica().await;
    // The device reaches replica B; the job is A's.
    let creds = support::add_device(&fleet, DEV, D1, &b_url);
    a.seed_device(DEV, creds.clone()).await.unwrap();
    b.seed_device(DEV, creds).await.unwrap();
    let id = a
        .enqueue(
            DEV,
            Job::Commands(vec![Command::Replace(ItemCommand::new(
                "0",
                vec![Item::target("./DevInfo/Lang").with_data(SECRET)],
            ))]),
        )
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), a_outcomes.recv())
        .await
        .expect("the job's outcome in time")
        .unwrap();
    assert_eq!(outcome.job_id, id);
    assert!(outcome.result.is_ok(), "{outcome:?}");
    let written = fleet
        .with_device(DEV, |d| {
            d.tree()
                .value(&"./DevInfo/Lang".parse().unwrap())
                .unwrap()
                .to_string()
        })
        .unwrap();
    assert_eq!(written, SECRET);
    sniffer.flush().await.unwrap();
    recorder.abort();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let forwarded = seen
        .iter()
        .filter(|(subject, _)| subject.contains(".req.provisioning.device."))
        .count();
    assert!(
        forwarded >= 2,
        "the device's messages went through A: {forwarded}"
    );
    let forms = [
        SECRET.as_bytes().to_vec(),
        auth::encode_nonce(SECRET.as_bytes()).into_bytes(),
    ];
    for (subject, payload) in &seen {
        for form in &forms {
            assert!(
                !payload.windows(form.len()).any(|w| w == form.as_slice()),
                "the value travelled the bus in clear on {subject}"
            );
        }
    }
}

/// A replica whose device lease was taken over by another one (which found it silent, e.g. while it
/// reconnected after a NATS outage) sends the device nothing more: its session and job are given up
/// without an outcome (the other replica has the command). Two sessions at once once let a plan complete
/// on a device after its restore had run. Here the device posts through a front that hands the lease to
/// another replica just before the device's first message reaches A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_the_device_lease_sends_the_device_nothing_more() {
    let Shared {
        bus,
        devices,
        owners,
        key,
    } = shared().await;
    let (fleet, fleet_url) = support::serve_fleet().await;
    let (front, front_url) = support::dm_listener().await;
    let (a, mut outcomes) = replica(
        Config::new(D1, front_url.clone()),
        &bus,
        Some(&devices),
        &key,
        &fleet_url,
    )
    .await;
    support::serve_front(front, a.clone(), move |n| {
        let owners = owners.clone();
        async move {
            if n == 0 {
                let k = dm_bus::subjects::encode_key(DEV);
                let lease = owners.get(&k).await.unwrap().expect("A holds the lease");
                owners
                    .update(&k, "another-replica".into(), lease.revision)
                    .await
                    .unwrap();
            }
        }
    });
    let creds = support::add_device(&fleet, DEV, D1, &front_url);
    a.seed_device(DEV, creds).await.unwrap();
    let lang = || {
        fleet
            .with_device(DEV, |d| {
                d.tree()
                    .value(&"./DevInfo/Lang".parse().unwrap())
                    .unwrap()
                    .to_string()
            })
            .unwrap()
    };
    let before = lang();

    let outcome = support::run_job(
        &a,
        &mut outcomes,
        DEV,
        set_lang("xx"),
        Duration::from_secs(20),
    )
    .await;
    assert!(outcome.is_superseded(), "{outcome:?}");
    let sessions = fleet
        .wait_for_sessions(DEV, 1, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(sessions[0].changes.is_empty(), "{sessions:?}");
    assert_eq!(
        lang(),
        before,
        "a command went to the device after the lease was lost"
    );

    // The replica named by the lease never answers: A's next job takes the lease back and runs.
    let outcome = support::run_job(
        &a,
        &mut outcomes,
        DEV,
        set_lang("yy"),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        matches!(outcome.result, Ok(JobSuccess::Commands { .. })),
        "{outcome:?}"
    );
    assert_eq!(lang(), "yy");
}

fn set_lang(value: &str) -> Job {
    Job::Commands(vec![Command::Replace(ItemCommand::new(
        "0",
        vec![Item::target("./DevInfo/Lang").with_data(value)],
    ))])
}

/// The same while the device has not come yet: the watchdog of the replica that lost the lease reports
/// no 408 (it could reach the saga before the outcome of the replica that took the device over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_the_device_lease_reports_no_timeout() {
    let Shared {
        bus, owners, key, ..
    } = shared().await;
    let (fleet, fleet_url) = support::serve_fleet().await;
    let (front, front_url) = support::dm_listener().await;
    let mut config = Config::new(D1, front_url.clone());
    config.session_timeout = Duration::from_secs(2);
    let (a, mut outcomes) = replica(config, &bus, None, &key, &fleet_url).await;
    // The device's first message never arrives: another replica takes the lease meanwhile.
    support::serve_front(front, a.clone(), move |_| {
        let owners = owners.clone();
        async move {
            let k = dm_bus::subjects::encode_key(DEV);
            let lease = owners.get(&k).await.unwrap().expect("A holds the lease");
            owners
                .update(&k, "another-replica".into(), lease.revision)
                .await
                .unwrap();
            std::future::pending::<()>().await;
        }
    });
    a.register_device(DEV, support::add_device(&fleet, DEV, D1, &front_url));
    let outcome = support::run_job(
        &a,
        &mut outcomes,
        DEV,
        set_lang("xx"),
        Duration::from_secs(20),
    )
    .await;
    assert!(outcome.is_superseded(), "{outcome:?}");
}

/// A replica answering a device whose lease another replica holds (the holder does not answer the
/// forwarded messages) stores nothing of the device's credentials: what it knows may be older than
/// what the holder stored (a chaos run lost a new server secret that way, and the device refused every
/// package #0 after). With the lease free, the same session's nonces are stored as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_device_lease_writes_none_of_its_credentials() {
    let Shared {
        bus,
        devices,
        owners,
        key,
    } = shared().await;
    let (fleet, fleet_url) = support::serve_fleet().await;
    let (a, _outcomes, url) = serving_replica(&bus, &devices, &key, &fleet_url).await;
    let creds = support::add_device(&fleet, DEV, D1, &url);
    a.seed_device(DEV, creds).await.unwrap();
    let k = dm_bus::subjects::encode_key(DEV);
    let stored = devices.get(&k).await.unwrap().unwrap().revision;
    owners
        .create(&k, "a-replica-that-is-gone".into())
        .await
        .unwrap();

    // The device calls in; A answers it (the holder is not there), and its nonces move.
    fleet.connect(DEV, D1).unwrap();
    let sessions = fleet
        .wait_for_sessions(DEV, 1, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        matches!(sessions[0].outcome, dm_client::Outcome::Completed),
        "{sessions:?}"
    );
    assert_eq!(
        devices.get(&k).await.unwrap().unwrap().revision,
        stored,
        "a replica without the lease wrote the device's credentials"
    );

    // The lease let go (empty): the next session's nonces are stored.
    let lease = owners.get(&k).await.unwrap().unwrap();
    owners.update(&k, "".into(), lease.revision).await.unwrap();
    fleet.connect(DEV, D1).unwrap();
    fleet
        .wait_for_sessions(DEV, 2, Duration::from_secs(20))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while devices.get(&k).await.unwrap().unwrap().revision == stored {
        assert!(
            std::time::Instant::now() < deadline,
            "the nonces of a session on a free device were not stored"
        );
        tokio::task::yield_now().await;
    }
}
