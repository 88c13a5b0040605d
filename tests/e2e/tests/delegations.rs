//! Two deployments (DMS-1, DMS-2: orchestrator, auth, notification, provisioning, gateway each) and a
//! simulated fleet, over a real nats-server shared by both deployments, with mutual TLS between the
//! gateways and real DM sessions with the devices.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use dm_bus::Bus;
use dm_bus::testing::NatsServer;
use dm_protocol::acl::AclCommand;
use dm_saga::pb::{self, DelType, Phase, event};
use dmd::demo::{D1, D2, World, device_id};

const STEP: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn world(server: &NatsServer, dir: &tempdir::Dir) -> World {
    let bus = Bus::connect(server.url()).await.unwrap();
    World::start(dir.path(), bus, 12).await.unwrap()
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

fn revoke() -> pb::Event {
    pb::Event {
        kind: Some(event::Kind::OperatorRevoke(pb::OperatorRevoke {})),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_with_both_initiators_moves_authority_on_the_device() {
    let server = NatsServer::start().unwrap();
    let dir = tempdir::Dir::new("types");
    let w = world(&server, &dir).await;
    let mut n = 0;
    for del_type in [
        DelType::Partial,
        DelType::Full,
        DelType::Final,
        DelType::Temporary,
    ] {
        for initiator in [D1, D2] {
            let device = device_id(n);
            n += 1;
            let scope: &[&str] = if del_type == DelType::Full {
                &["."]
            } else {
                &["./Vendor/Acme"]
            };
            let not_after = (del_type == DelType::Temporary).then(|| now_ms() + 3_600_000);
            let session = w
                .start_delegation(initiator, &device, del_type, scope, not_after)
                .await
                .unwrap();
            let d1 = w.wait_for(D1, &session, Phase::Active, STEP).await.unwrap();
            let d2 = w.wait_for(D2, &session, Phase::Active, STEP).await.unwrap();
            assert_eq!(d2.role(), pb::Role::Delegated);
            // One delegation is one trace, across both deployments (traceparent over the bus and HTTP).
            assert_eq!(d1.trace_id.len(), 32);
            assert_eq!(d1.trace_id, d2.trace_id, "{del_type:?} by {initiator}");
            // On the device: DMS-2 has an account, and authority over the scope moved to it.
            let root = if del_type == DelType::Full {
                "./Vendor"
            } else {
                "./Vendor/Acme"
            };
            let (has_account, d2_replace, d1_replace) = w
                .fleet
                .with_device(&device, |d| {
                    let acl = d
                        .tree()
                        .effective_acl(&root.parse().unwrap())
                        .unwrap()
                        .clone();
                    (
                        d.account_uri(D2).is_some(),
                        acl.allows(AclCommand::Replace, D2),
                        acl.allows(AclCommand::Replace, D1),
                    )
                })
                .unwrap();
            assert!(
                has_account,
                "{del_type:?} by {initiator}: DMS-2's account on the device"
            );
            assert!(
                d2_replace && !d1_replace,
                "{del_type:?} by {initiator}: Replace on {root} moved to DMS-2"
            );
        }
    }
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_expiry_final_and_a_refused_request() {
    let server = NatsServer::start().unwrap();
    let dir = tempdir::Dir::new("ends");
    let w = world(&server, &dir).await;
    // Revocation restores the device and tells the peer.
    let s = w
        .start_delegation(
            D1,
            &device_id(0),
            DelType::Partial,
            &["./Vendor/Acme"],
            None,
        )
        .await
        .unwrap();
    w.wait_for(D2, &s, Phase::Active, STEP).await.unwrap();
    w.wait_for(D1, &s, Phase::Active, STEP).await.unwrap();
    let before_revoke = w
        .fleet
        .with_device(&device_id(0), |d| d.account_uri(D2).is_some())
        .unwrap();
    assert!(before_revoke);
    let applied = w
        .dms1
        .orchestrator()
        .unwrap()
        .apply(D2, &s, &revoke())
        .await
        .unwrap();
    assert_eq!(applied.answer, dm_saga::Answer::Accepted);
    w.wait_for(D1, &s, Phase::Revoked, STEP).await.unwrap();
    w.wait_for(D2, &s, Phase::Revoked, STEP).await.unwrap();
    assert!(
        !w.fleet
            .with_device(&device_id(0), |d| d.account_uri(D2).is_some())
            .unwrap()
    );
    // Final refuses revocation.
    let f = w
        .start_delegation(D1, &device_id(1), DelType::Final, &["./Vendor/Acme"], None)
        .await
        .unwrap();
    w.wait_for(D1, &f, Phase::Active, STEP).await.unwrap();
    let refused = w
        .dms1
        .orchestrator()
        .unwrap()
        .apply(D2, &f, &revoke())
        .await
        .unwrap();
    assert_eq!(refused.answer.http_status(), 405);
    // Temporary expires by itself, on both sides, and the device's authority returns to DMS-1.
    let t = w
        .start_delegation(
            D2,
            &device_id(2),
            DelType::Temporary,
            &["./Vendor/Acme"],
            Some(now_ms() + 4000),
        )
        .await
        .unwrap();
    w.wait_for(D1, &t, Phase::Expired, STEP).await.unwrap();
    w.wait_for(D2, &t, Phase::Expired, STEP).await.unwrap();
    assert!(
        !w.fleet
            .with_device(&device_id(2), |d| d.account_uri(D2).is_some())
            .unwrap()
    );
    // A nack'ed notification ends cleanly on both sides, and nothing touched the device.
    let before = w.fleet.export(&device_id(3)).unwrap();
    let nack = w
        .start_delegation(
            D1,
            &device_id(3),
            DelType::Temporary,
            &["./Vendor/Acme"],
            Some(now_ms() + 30 * 86_400_000),
        )
        .await
        .unwrap();
    let d1 = w.wait_for(D1, &nack, Phase::Declined, STEP).await.unwrap();
    assert_eq!(d1.fault.unwrap().status_code, 403);
    w.wait_for(D2, &nack, Phase::Declined, STEP).await.unwrap();
    assert_eq!(w.fleet.export(&device_id(3)).unwrap(), before);
    w.stop().await.unwrap();
}
