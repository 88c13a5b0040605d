//! The device channel against DM clients as deployed (PROTOCOL.md B.6, "More observed in the field"):
//! two deployments with every service, real HTTPS between the gateways and real DM sessions over HTTP
//! with simulated devices that have one field habit each (`dm-client-sim --quirks`). Every habit still
//! lets a delegation of each type reach Active and be revoked, with the device's tree as A.6 says; a
//! habit that makes success impossible (a NUL in a child list) fails the delegation at once, cleanly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use dm_bus::Bus;
use dm_client::{Quirks, SessionConfig};
use dm_protocol::acl::AclCommand;
use dm_protocol::tree::DmTree;
use dm_protocol::types::DmUri;
use dm_saga::pb::{self, DelType, Phase, event};
use dmd::demo::{D1, D2, World, device_id};

const STEP: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn uri(s: &str) -> DmUri {
    s.parse().unwrap()
}

struct Dir(std::path::PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("dmd-field-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn world(quirks: &str, dir: &Dir) -> World {
    let config = SessionConfig {
        quirks: quirks.parse::<Quirks>().unwrap(),
        ..SessionConfig::default()
    };
    World::start_with_fleet(&dir.0, Bus::in_process(), 4, config)
        .await
        .unwrap()
}

/// Every node of `at`'s subtree, `at` included.
fn subtree(tree: &DmTree, at: &DmUri) -> Vec<DmUri> {
    let mut out = vec![at.clone()];
    for name in tree.children(at).unwrap_or_default() {
        out.extend(subtree(tree, &at.join(name).unwrap()));
    }
    out
}

/// The device's tree after a delegation reached Active, as A.6 says.
fn assert_tree_as_a6(w: &World, device: &str, del_type: DelType, what: &str) {
    w.fleet
        .with_device(device, |d| {
            let tree = d.tree();
            let account = d
                .account_uri(D2)
                .unwrap_or_else(|| panic!("{what}: no account of DMS-2"));
            for node in subtree(tree, &account) {
                let acl = tree.acl(&node).unwrap();
                // An explicit ACL on every node the plan added: no client default stays.
                assert!(!acl.is_empty(), "{what}: {node} has no ACL of its own");
                let readers = acl.servers(AclCommand::Get);
                assert!(
                    !readers.contains(&"*"),
                    "{what}: {node} readable by every server: {acl}"
                );
                let name = node.as_str().rsplit('/').next().unwrap_or_default();
                if matches!(name, "AAuthSecret" | "AAuthData") {
                    assert!(readers.is_empty(), "{what}: {node} readable: {acl}");
                }
            }
            // Authority over the scope moved to DMS-2; DMS-1 keeps what lets it revoke.
            let root = if del_type == DelType::Full {
                uri("./Vendor")
            } else {
                uri("./Vendor/Acme")
            };
            let acl = tree.effective_acl(&root).unwrap();
            assert!(acl.allows(AclCommand::Replace, D2), "{what}: {root}: {acl}");
            assert!(
                !acl.allows(AclCommand::Replace, D1),
                "{what}: {root}: {acl}"
            );
            let parent = tree.effective_acl(&root.parent().unwrap()).unwrap();
            assert!(
                parent.allows(AclCommand::Replace, D1),
                "{what}: parent of {root}"
            );
            // Nothing outside the scope changed hands.
            let dev_info = tree.effective_acl(&uri("./DevInfo")).unwrap();
            assert!(
                !dev_info.allows(AclCommand::Replace, D2),
                "{what}: ./DevInfo"
            );
            if del_type != DelType::Full {
                let other = tree.effective_acl(&uri("./Vendor/Other")).unwrap();
                assert!(
                    other.allows(AclCommand::Replace, D1),
                    "{what}: ./Vendor/Other"
                );
                assert!(
                    !other.allows(AclCommand::Replace, D2),
                    "{what}: ./Vendor/Other"
                );
            }
        })
        .unwrap();
}

fn revoke() -> pb::Event {
    pb::Event {
        kind: Some(event::Kind::OperatorRevoke(pb::OperatorRevoke {})),
    }
}

/// One delegation of each type on its own device: Active on both sides with the tree as A.6 says, then
/// (but Final) revoked, with DMS-2's account gone. The server sends nothing after a message's root.
async fn every_type_reaches_active_and_is_revoked(quirks: &str) {
    let dir = Dir::new(quirks);
    let w = world(quirks, &dir).await;
    let types = [
        DelType::Partial,
        DelType::Full,
        DelType::Final,
        DelType::Temporary,
    ];
    for (n, del_type) in types.into_iter().enumerate() {
        let device = device_id(n);
        let what = format!("{quirks}: {del_type:?}");
        let scope: &[&str] = if del_type == DelType::Full {
            &["."]
        } else {
            &["./Vendor/Acme"]
        };
        let not_after = (del_type == DelType::Temporary).then(|| now_ms() + 3_600_000);
        // A device that lost DMS-1's nonce before the plan (a session of its own, then a reset) still
        // gets the plan: package #0 over the zero nonce, the credential challenged and resent.
        let earlier = usize::from(quirks.contains("forget-nonce"));
        if earlier > 0 {
            w.fleet.connect(&device, D1).unwrap();
            w.fleet.wait_for_sessions(&device, 1, STEP).await.unwrap();
        }
        let session = w
            .start_delegation(D1, &device, del_type, scope, not_after)
            .await
            .unwrap();
        w.wait_for(D2, &session, Phase::Active, STEP)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        w.wait_for(D1, &session, Phase::Active, STEP)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_tree_as_a6(&w, &device, del_type, &what);
        if del_type != DelType::Final {
            let applied = w
                .dms1
                .orchestrator()
                .unwrap()
                .apply(D2, &session, &revoke())
                .await
                .unwrap();
            assert_eq!(applied.answer, dm_saga::Answer::Accepted, "{what}");
            w.wait_for(D1, &session, Phase::Revoked, STEP)
                .await
                .unwrap_or_else(|e| panic!("{what}: revoke: {e:#}"));
            let gone = w
                .fleet
                .with_device(&device, |d| d.account_uri(D2).is_none())
                .unwrap();
            assert!(gone, "{what}: DMS-2's account is still on the device");
        }
        // DMS-1's plan, DMS-2's first session, then (but Final) DMS-1's restore.
        let expected = earlier + if del_type == DelType::Final { 2 } else { 3 };
        let sessions = w
            .fleet
            .wait_for_sessions(&device, expected, STEP)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        for s in &sessions {
            assert_eq!(s.trailing_bytes, 0, "{what}: bytes after the root: {s:?}");
        }
        // A device that keeps its nonces needs no resynchronisation: every package #0 digest held
        // (B.6: AAuthData sent as b64 even to a client that keeps chr text). One that loses them needs it.
        let resynchronised = sessions.iter().filter(|s| s.zero_nonce).count();
        if quirks.contains("forget-nonce") {
            assert!(
                sessions[1].zero_nonce,
                "{what}: the plan's session: {sessions:?}"
            );
            assert!(resynchronised > 0, "{what}: {sessions:?}");
        } else {
            assert_eq!(resynchronised, 0, "{what}: {sessions:?}");
        }
    }
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailing_bytes() {
    every_type_reaches_active_and_is_revoked("trailing-bytes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_on_add() {
    every_type_reaches_active_and_is_revoked("acl-on-add").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_nonce() {
    every_type_reaches_active_and_is_revoked("text-nonce").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_nonce() {
    // Each session after the first meets a device that lost DMS-1's (or DMS-2's) server nonce: the
    // package #0 goes again with the zero nonce, the server's credential is challenged and resent.
    every_type_reaches_active_and_is_revoked("forget-nonce").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_habit_but_nul_in_lists_at_once() {
    every_type_reaches_active_and_is_revoked("trailing-bytes,acl-on-add,text-nonce,forget-nonce")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_lists_fails_at_once_with_the_reason_and_leaves_the_device_as_it_was() {
    // A child list with a trailing NUL is not XML: the plan cannot be read, so the delegation fails
    // at step 4 with the reason and byte offset, long before the step's deadline, on both sides.
    for quirks in ["nul-in-lists", "all"] {
        let dir = Dir::new(quirks);
        let w = world(quirks, &dir).await;
        for (n, del_type) in [DelType::Partial, DelType::Full].into_iter().enumerate() {
            let device = device_id(n);
            let what = format!("{quirks}: {del_type:?}");
            let before = w.fleet.with_device(&device, |d| d.tree().clone()).unwrap();
            let scope: &[&str] = if del_type == DelType::Full {
                &["."]
            } else {
                &["./Vendor/Acme"]
            };
            let started = std::time::Instant::now();
            let session = w
                .start_delegation(D1, &device, del_type, scope, None)
                .await
                .unwrap();
            let d1 = w
                .wait_for(D1, &session, Phase::Failed, STEP)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
            w.wait_for(D2, &session, Phase::Failed, STEP)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
            assert!(started.elapsed() < STEP, "{what}: failed by a deadline");
            let fault = d1.fault.unwrap();
            assert_eq!(fault.step, 4, "{what}: {fault:?}");
            assert_eq!(fault.status_code, 400, "{what}: {fault:?}");
            assert!(fault.reason.contains("U+0000"), "{what}: {fault:?}");
            assert!(fault.reason.contains("byte"), "{what}: {fault:?}");
            let after = w.fleet.with_device(&device, |d| d.tree().clone()).unwrap();
            let nonces: Vec<DmUri> = w
                .fleet
                .with_device(&device, |d| d.account_uri(D1).into_iter().collect())
                .unwrap();
            assert_eq!(
                after.first_difference(&before, &nonces),
                None,
                "{what}: the device changed"
            );
        }
        w.stop().await.unwrap();
    }
}
