//! A restart is a non-event (issue 10): both deployments are stopped and started again (same addresses,
//! same keys, the state in a real nats-server), and every Active delegation can still be revoked or
//! released, its device reached, and a new delegation started.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use dm_bus::Bus;
use dm_bus::testing::NatsServer;
use dm_saga::pb::{self, DelType, Phase, event};
use dmd::demo::{D1, D2, World, device_id};

const STEP: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn has_account_of_d2(w: &World, device: &str) -> bool {
    w.fleet
        .with_device(device, |d| d.account_uri(D2).is_some())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_both_sides_restart_active_delegations_end_and_new_ones_start() {
    let server = NatsServer::start().unwrap();
    let dir = Dir(std::env::temp_dir().join(format!("dmd-restart-{}", std::process::id())));
    let bus = Bus::connect(server.url()).await.unwrap();
    let w = World::start(&dir.0, bus, 4).await.unwrap();
    let partial = w
        .start_delegation(
            D1,
            &device_id(0),
            DelType::Partial,
            &["./Vendor/Acme"],
            None,
        )
        .await
        .unwrap();
    let temporary = w
        .start_delegation(
            D2,
            &device_id(1),
            DelType::Temporary,
            &["./Vendor/Acme"],
            Some(now_ms() + 3_600_000),
        )
        .await
        .unwrap();
    for session in [&partial, &temporary] {
        w.wait_for(D1, session, Phase::Active, STEP).await.unwrap();
        w.wait_for(D2, session, Phase::Active, STEP).await.unwrap();
    }

    let w = w.restart(D1).await.unwrap();
    let w = w.restart(D2).await.unwrap();

    // DMS-1 revokes: it reaches the device with what it stored (nonces, secrets), DMS-2 hears of it.
    let revoke = pb::Event {
        kind: Some(event::Kind::OperatorRevoke(pb::OperatorRevoke {})),
    };
    let applied = w
        .dms1
        .orchestrator()
        .unwrap()
        .apply(D2, &partial, &revoke)
        .await
        .unwrap();
    assert_eq!(applied.answer, dm_saga::Answer::Accepted);
    w.wait_for(D1, &partial, Phase::Revoked, STEP)
        .await
        .unwrap();
    w.wait_for(D2, &partial, Phase::Revoked, STEP)
        .await
        .unwrap();
    assert!(!has_account_of_d2(&w, &device_id(0)));
    // DMS-2 releases the other one.
    let release = pb::Event {
        kind: Some(event::Kind::OperatorRelease(pb::OperatorRelease {})),
    };
    let applied = w
        .dms2
        .orchestrator()
        .unwrap()
        .apply(D1, &temporary, &release)
        .await
        .unwrap();
    assert_eq!(applied.answer, dm_saga::Answer::Accepted);
    w.wait_for(D1, &temporary, Phase::Released, STEP)
        .await
        .unwrap();
    w.wait_for(D2, &temporary, Phase::Released, STEP)
        .await
        .unwrap();
    assert!(!has_account_of_d2(&w, &device_id(1)));
    // And a new delegation goes all the way.
    let fresh = w
        .start_delegation(D1, &device_id(2), DelType::Full, &["."], None)
        .await
        .unwrap();
    w.wait_for(D1, &fresh, Phase::Active, STEP).await.unwrap();
    w.wait_for(D2, &fresh, Phase::Active, STEP).await.unwrap();
    assert!(has_account_of_d2(&w, &device_id(2)));
    w.stop().await.unwrap();
}
