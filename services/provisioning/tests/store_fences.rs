//! What the provisioning service's store keeps safe (issue 10: nothing stuck, no device half-done), with
//! the store on a real nats-server:
//! - a store that fails in the middle of a device session (NATS away): the plan is held back and the
//!   device's session broken off, and the job still ends. It used to wait for an outcome forever: the
//!   message had moved the device's activity past the watchdog armed before it, and no other was armed,
//!   so the command's lane on the bus (and every restore queued behind it) never moved;
//! - an apply whose command comes again after the saga ordered its plan's restore (a redelivery after a
//!   NATS outage) is given up: run after the restore, it left the plan on a device both sides had failed;
//! - a finished plan's snapshot leaves memory and its restore reads it from the store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dm_bus::Bus;
use dm_bus::testing::NatsServer;
use dm_client::Fleet;
use dm_protocol::delegation::{self, DelType};
use dm_protocol::dmacc::{DmAccount, Secret};
use dm_provisioning::{Config, Job, PlanRequest, Provisioning};

mod support;

const D1: &str = "dms1.operator.example";
const D2: &str = "dms2.enterprise.example";
const DEV: &str = "IMEI:490154203237518";

struct World {
    prov: Provisioning,
    outcomes: tokio::sync::mpsc::UnboundedReceiver<dm_provisioning::JobOutcome>,
    fleet: Fleet,
    /// Device messages passed on to the service so far.
    seen: Arc<AtomicUsize>,
    before: dm_protocol::tnds::MgmtTree,
}

/// DMS-1's provisioning with its snapshots on a fresh nats-server, one device behind a front that kills
/// the nats-server just before the device's message number `kill_at` (from 0) reaches the service.
async fn world(kill_at: Option<usize>) -> World {
    let nats = NatsServer::start().unwrap();
    let bus = Bus::connect(nats.url()).await.unwrap();
    let snapshots = bus.kv("dmd_dms1_snapshots", 1).await.unwrap();
    let nats = Arc::new(std::sync::Mutex::new(nats));
    let (fleet, fleet_url) = support::serve_fleet().await;
    let (front, front_url) = support::dm_listener().await;
    let mut config = Config::new(D1, front_url.clone());
    config.session_timeout = Duration::from_secs(2);
    let (prov, outcomes) = Provisioning::new(config, support::push(&fleet_url));
    let prov = prov.with_snapshot_store(snapshots);
    let seen = support::serve_front(front, prov.clone(), move |n| {
        if Some(n) == kill_at {
            nats.lock().unwrap().kill();
        }
        async {}
    });
    let creds = support::add_device(&fleet, DEV, D1, &front_url);
    prov.register_device(DEV, creds);
    let before = fleet.export(DEV).unwrap();
    World {
        prov,
        outcomes,
        fleet,
        seen,
        before,
    }
}

/// An apply of DMS-2's account (examples/start.xml) with `./Vendor/Acme/Apps` delegated.
fn apply(plan_id: &str) -> Job {
    // DMS-2's DM Account as DELEGATION_START carries it (examples/start.xml).
    let xml = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/start.xml"
    ))
    .unwrap();
    let delegation::Body::Start(start) = delegation::decode(&xml).unwrap().body else {
        panic!("examples/start.xml is a DELEGATION_START");
    };
    let request = PlanRequest {
        account_key: "dms2".into(),
        account: DmAccount::from_tnds(&start.dm_acc).unwrap(),
        delegating: D1.into(),
        delegated: D2.into(),
        del_type: DelType::Partial,
        scope: vec!["./Vendor/Acme/Apps".parse().unwrap()],
        not_after: None,
        temp_key_b64: Secret::new("dGVtcC1kZWxlZ2F0aW9uLWtleQ=="),
    };
    Job::Apply {
        plan_id: plan_id.into(),
        request: Box::new(request),
    }
}

/// Nothing of the plan is on the device (only the sessions' nonces moved).
fn unchanged(w: &World) {
    let after = w.fleet.export(DEV).unwrap();
    let child = |tree: &dm_protocol::tnds::MgmtTree, name: &str| {
        tree.nodes[0]
            .children()
            .iter()
            .find(|n| n.name == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(child(&after, "Vendor"), child(&w.before, "Vendor"));
    let accounts = |tree| -> Vec<String> {
        child(tree, "DMAcc")
            .children()
            .iter()
            .map(|n| n.name.clone())
            .collect()
    };
    assert_eq!(accounts(&after), vec![D1.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_held_back_by_a_store_outage_still_ends_its_job() {
    // Message 1 brings the reads the plan's snapshot is taken from.
    let mut w = world(Some(1)).await;
    let outcome = support::run_job(
        &w.prov,
        &mut w.outcomes,
        DEV,
        apply("held-back"),
        Duration::from_secs(40),
    )
    .await;
    let failure = outcome.result.expect_err("the plan was not sent");
    assert_eq!(failure.status, 408, "{failure:?}");
    assert!(w.seen.load(Ordering::SeqCst) >= 2);
    unchanged(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_whose_plan_is_being_undone_is_given_up() {
    let mut w = world(None).await;
    // The saga failed the delegation before its plan reached the device: the restore has nothing to do.
    let outcome = support::run_job(
        &w.prov,
        &mut w.outcomes,
        DEV,
        Job::Restore {
            plan_id: "undone".into(),
        },
        Duration::from_secs(20),
    )
    .await;
    assert!(outcome.result.is_ok(), "{outcome:?}");
    // The apply's command comes again: it is given up, and the device is left as the restore left it.
    let outcome = support::run_job(
        &w.prov,
        &mut w.outcomes,
        DEV,
        apply("undone"),
        Duration::from_secs(20),
    )
    .await;
    assert!(outcome.is_superseded(), "{outcome:?}");
    unchanged(&w);
    // Another plan of the same device still applies.
    let outcome = support::run_job(
        &w.prov,
        &mut w.outcomes,
        DEV,
        apply("another"),
        Duration::from_secs(20),
    )
    .await;
    assert!(outcome.result.is_ok(), "{outcome:?}");
}

/// A plan whose apply ended leaves the service's memory (memory stays bounded by the jobs in hand): its
/// restore reads the snapshot back from the store and puts the device back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_plan_leaves_memory_and_is_restored_from_the_store() {
    let mut w = world(None).await;
    let outcome = support::run_job(
        &w.prov,
        &mut w.outcomes,
        DEV,
        apply("kept"),
        Duration::from_secs(20),
    )
    .await;
    assert!(outcome.result.is_ok(), "{outcome:?}");
    assert!(w.prov.snapshot("kept").is_none(), "still in memory");
    let outcome = support::run_job(
        &w.prov,
        &mut w.outcomes,
        DEV,
        Job::Restore {
            plan_id: "kept".into(),
        },
        Duration::from_secs(20),
    )
    .await;
    assert!(outcome.result.is_ok(), "{outcome:?}");
    unchanged(&w);
}
