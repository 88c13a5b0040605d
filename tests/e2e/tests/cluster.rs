//! Both deployments and the fleet on a three-node JetStream cluster, every stream and bucket with three
//! replicas (issue 10, item 7): a node is killed while delegations are in flight — the node the bus is
//! connected to, so the client fails over — and later, once it is back, the meta leader. Delegations
//! started before, during and after each loss reach Active on both sides, and the earlier ones stay
//! readable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use dm_bus::testing::NatsCluster;
use dm_bus::{Bus, BusOptions};
use dm_protocol::types::Uuid;
use dm_saga::Answer;
use dm_saga::pb::{self, DelType, Phase, Role, event};
use dmd::demo::{D1, D2, World, device_id};

/// How long one delegation may take to reach Active around a node's death: a message the dead node had
/// handed out waits its consumer's ack wait (30 s) and the retries' back-off (up to 30 s) before it comes
/// back, possibly twice on the way (NOTIF, then RES).
const STEP: Duration = Duration::from_secs(150);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

mod tempdir {
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("dmd-e2e-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            Self(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One delegation of the test: which device, and its session once started.
struct Started {
    device: String,
    session: String,
}

/// A fresh SessionID (v4 UUID from the clock and a counter: no RNG needed here).
fn session_id(n: usize) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&(nanos as u64).to_be_bytes());
    bytes[8..].copy_from_slice(&(n as u64).to_be_bytes());
    Uuid::from_random_bytes(bytes).to_string()
}

/// Starts a delegation of device `n`, alternating initiators and types, as an operator would: a start
/// answered with an error (the bus lost a leader) is sent again with the same SessionID until `STEP` has
/// passed, and a start refused because that SessionID exists was taken by an earlier try.
async fn start(w: &World, n: usize) -> Started {
    let device = device_id(n);
    let (running, role, peer) = if n.is_multiple_of(2) {
        (&w.dms1, Role::Delegating, D2)
    } else {
        (&w.dms2, Role::Delegated, D1)
    };
    let (del_type, not_after_ms) = match n % 3 {
        0 => (DelType::Partial, None),
        1 => (DelType::Temporary, Some(now_ms() + 3_600_000)),
        _ => (DelType::Full, None),
    };
    let scope = if del_type == DelType::Full {
        "."
    } else {
        "./Vendor/Acme"
    };
    let session = session_id(n);
    let mut start = pb::OperatorStart {
        session_id: session.clone(),
        peer_server_id: peer.into(),
        device: Some(pb::Device {
            dev_id: device.clone(),
            ..Default::default()
        }),
        scope: vec![scope.to_string()],
        not_after_ms,
        ..Default::default()
    };
    start.set_role(role);
    start.set_del_type(del_type);
    let event = pb::Event {
        kind: Some(event::Kind::OperatorStart(start)),
    };
    let orchestrator = running.orchestrator().unwrap();
    let deadline = Instant::now() + STEP;
    loop {
        let why = match orchestrator.apply(peer, &session, &event).await {
            Ok(applied) if applied.answer == Answer::Accepted => {
                return Started { device, session };
            }
            Ok(applied) => match orchestrator.get(peer, &session).await {
                Ok(Some(_)) => return Started { device, session },
                Ok(None) => panic!("start of {device} refused: {:?}", applied.answer),
                Err(e) => format!("refused ({:?}), and not readable: {e}", applied.answer),
            },
            Err(e) => e.to_string(),
        };
        assert!(Instant::now() < deadline, "start of {device}: {why}");
        eprintln!("start of {device}: {why}; sending it again");
        // A pause between tries of a condition with a deadline, not a timing assumption.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `s` is Active on both sides (a read that fails while the cluster recovers is tried
/// again; a delegation that ends otherwise fails the test), and DMS-2 has its account on the device.
async fn active_on_both_sides(w: &World, s: &Started) {
    let deadline = tokio::time::Instant::now() + STEP;
    for side in [D1, D2] {
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match w.wait_for(side, &s.session, Phase::Active, left).await {
                Ok(_) => break,
                Err(e) if e.to_string().contains(" ended ") => {
                    panic!("{} at {side}: {e:#}", s.device)
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("{} at {side}: {e:#}; reading again", s.device);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    // Both sides' view of it, to tell a lost message from a stuck step.
                    for (name, running, peer) in [(D1, &w.dms1, D2), (D2, &w.dms2, D1)] {
                        let state = running.orchestrator().unwrap().get(peer, &s.session).await;
                        eprintln!("{} at {name}: {state:?}", s.device);
                    }
                    panic!("{} at {side}: {e:#}", s.device)
                }
            }
        }
    }
    let has_account = w
        .fleet
        .with_device(&s.device, |d| d.account_uri(D2).is_some())
        .unwrap();
    assert!(has_account, "{}: DMS-2's account on the device", s.device);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegations_go_on_when_a_nats_node_and_then_the_meta_leader_are_killed() {
    let began = Instant::now();
    // Warnings and errors of every service on the test's output (RUST_LOG may ask for more).
    let _logs = dm_telemetry::init(dm_telemetry::LogFormat::Text, "warn", None);
    let mut cluster = NatsCluster::start(3)
        .await
        .expect("a three-node nats-server cluster (scripts/test installs nats-server)");
    let bus = Bus::connect_with(
        &cluster.url(),
        BusOptions {
            replicas: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let dir = tempdir::Dir::new("cluster");
    let mut w = World::start(dir.path(), bus.clone(), 12).await.unwrap();
    let mut all = Vec::new();

    // Before: two delegations to Active.
    for n in 0..2 {
        all.push(start(&w, n).await);
    }
    for s in &all {
        active_on_both_sides(&w, s).await;
    }
    eprintln!("{:?}: two Active on the whole cluster", began.elapsed());

    // The node the bus is connected to is killed with three delegations in flight; two more start
    // after it is gone.
    let connected = bus.connected_server().expect("connected to a node");
    let first = cluster.index_of(&connected).unwrap();
    let mut phase = Vec::new();
    for n in 2..5 {
        phase.push(start(&w, n).await);
    }
    cluster.stop(first);
    let t = Instant::now();
    for n in 5..7 {
        phase.push(start(&w, n).await);
    }
    for s in &phase {
        active_on_both_sides(&w, s).await;
    }
    eprintln!(
        "{:?}: killed {connected} (the bus's node): five more Active {:?} after",
        began.elapsed(),
        t.elapsed()
    );
    all.append(&mut phase);

    // It comes back; once the cluster is whole again, the meta leader is killed, with delegations in
    // flight and more started after.
    cluster.restart(first).await.unwrap();
    cluster.wait_ready(STEP).await.unwrap();
    let leader = cluster.meta_leader().await.expect("a meta leader");
    let leader_name = cluster.name(leader).unwrap().to_string();
    for n in 7..10 {
        phase.push(start(&w, n).await);
    }
    cluster.stop(leader);
    let t = Instant::now();
    for n in 10..12 {
        phase.push(start(&w, n).await);
    }
    for s in &phase {
        active_on_both_sides(&w, s).await;
    }
    eprintln!(
        "{:?}: {connected} back, killed the meta leader {leader_name}: five more Active {:?} after",
        began.elapsed(),
        t.elapsed()
    );
    all.append(&mut phase);

    // Every delegation is still readable, Active on both sides, and no service ended on a bus error.
    for s in &all {
        active_on_both_sides(&w, s).await;
    }
    for (side, running) in [("DMS-1", &mut w.dms1), ("DMS-2", &mut w.dms2)] {
        if let Ok(ended) = tokio::time::timeout(Duration::ZERO, running.failed()).await {
            panic!("a service of {side} ended: {ended:?}");
        }
    }
    eprintln!("{:?}: all twelve Active and readable", began.elapsed());
    w.stop().await.unwrap();
}
