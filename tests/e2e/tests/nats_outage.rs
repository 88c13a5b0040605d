//! A NATS outage (issue 10): the one nats-server both deployments use is killed with delegations in
//! flight and started again on the same port and store a few seconds later. No service ends on the bus
//! errors; every delegation reaches Active on both sides, and new ones start.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use dm_bus::Bus;
use dm_bus::testing::NatsServer;
use dm_saga::pb::{DelType, Phase};
use dmd::demo::{D1, D2, World, device_id};

/// Long enough for a message that was out when the server died to come back after its ack wait.
const RECOVERY: Duration = Duration::from_secs(90);

struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegations_in_flight_survive_a_nats_outage_and_new_ones_start() {
    let mut server = NatsServer::start().unwrap();
    let dir = Dir(std::env::temp_dir().join(format!("dmd-outage-{}", std::process::id())));
    let bus = Bus::connect(server.url()).await.unwrap();
    let mut w = World::start(&dir.0, bus, 6).await.unwrap();
    let mut sessions = Vec::new();
    for n in 0..3 {
        sessions.push(
            w.start_delegation(
                D1,
                &device_id(n),
                DelType::Partial,
                &["./Vendor/Acme"],
                None,
            )
            .await
            .unwrap(),
        );
    }
    // The outage: the server is gone for a few seconds (the scenario's length, not a wait for anything).
    server.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.restart().unwrap();
    let back = Instant::now();
    for n in 3..5 {
        // The first requests after the outage may still find the client reconnecting: retried.
        let deadline = Instant::now() + RECOVERY;
        let session = loop {
            match w
                .start_delegation(
                    D1,
                    &device_id(n),
                    DelType::Partial,
                    &["./Vendor/Acme"],
                    None,
                )
                .await
            {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("start after the outage not taken yet: {e:#}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("no start taken after the outage: {e:#}"),
            }
        };
        sessions.push(session);
    }
    for s in &sessions {
        w.wait_for(D1, s, Phase::Active, RECOVERY).await.unwrap();
        w.wait_for(D2, s, Phase::Active, RECOVERY).await.unwrap();
    }
    eprintln!("all Active {:?} after the server came back", back.elapsed());
    for (side, running) in [("DMS-1", &mut w.dms1), ("DMS-2", &mut w.dms2)] {
        if let Ok(ended) = tokio::time::timeout(Duration::ZERO, running.failed()).await {
            panic!("a service of {side} ended: {ended:?}");
        }
    }
    w.stop().await.unwrap();
}
