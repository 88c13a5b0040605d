//! Two orchestrators (DMS-1 and DMS-2) over one bus — in-process, and a real nats-server — with the other
//! services played by small stand-ins that answer each command with its outcome, and a gateway stand-in
//! that hands each peer message to the other deployment's orchestrator by request/reply. Delegations of
//! every type reach Active on both sides; an orchestrator stopped mid-way and started again finishes the job
//! from the stored state.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use dm_bus::testing::NatsServer;
use dm_bus::{Bus, Names};
use dm_orchestrator::{Config, Orchestrator};
use dm_saga::pb::{self, DelType, Event, Phase, Role, event};
use support::StandIns;

const DEADLINE: Duration = Duration::from_secs(20);
const SESSION: &str = "9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11";

fn config(deployment: &str, server_id: &str) -> Config {
    Config {
        names: Names::new(deployment).unwrap(),
        server_id: server_id.into(),
        saga: dm_saga::Config::default(),
        ack_wait: Duration::from_secs(5),
    }
}

struct Deployment {
    orchestrator: Orchestrator,
    task: tokio::task::JoinHandle<()>,
}

async fn deploy(bus: &Bus, deployment: &str, server_id: &str) -> Deployment {
    let orchestrator = Orchestrator::new(config(deployment, server_id), bus.clone())
        .await
        .unwrap();
    let runner = orchestrator.clone();
    let task = tokio::spawn(async move { runner.run(std::future::pending()).await.unwrap() });
    Deployment { orchestrator, task }
}

async fn wait_for(o: &Orchestrator, peer: &str, phase: Phase) -> pb::DelegationState {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(s) = o.get(peer, SESSION).await.unwrap()
            && s.phase() == phase
        {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{peer}: never reached {phase:?}: {:?}",
            o.get(peer, SESSION).await.unwrap().map(|s| s.phase())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn start(role: Role, t: DelType, peer: &str) -> Event {
    let mut s = pb::OperatorStart {
        session_id: SESSION.into(),
        peer_server_id: peer.into(),
        device: Some(pb::Device {
            dev_id: "IMEI:490154203237518".into(),
            ..Default::default()
        }),
        scope: if t == DelType::Full {
            vec![".".into()]
        } else {
            vec!["./Vendor/Acme/Apps".into()]
        },
        not_after_ms: (t == DelType::Temporary).then_some(4_102_444_800_000),
        ..Default::default()
    };
    s.set_role(role);
    s.set_del_type(t);
    Event {
        kind: Some(event::Kind::OperatorStart(s)),
    }
}

async fn every_type_reaches_active_on(bus: Bus) {
    let (n1, n2) = (Names::new("dms1").unwrap(), Names::new("dms2").unwrap());
    let d1 = deploy(&bus, "dms1", "dms1.example").await;
    let d2 = deploy(&bus, "dms2", "dms2.example").await;
    tokio::spawn(StandIns::new(bus.clone(), n1.clone(), "dms1.example", n2.clone()).run());
    tokio::spawn(StandIns::new(bus.clone(), n2.clone(), "dms2.example", n1.clone()).run());
    // Partial initiated by DMS-1; it reaches Active on both sides.
    let applied = d1
        .orchestrator
        .apply(
            "dms2.example",
            SESSION,
            &start(Role::Delegating, DelType::Partial, "dms2.example"),
        )
        .await
        .unwrap();
    assert_eq!(applied.answer, dm_saga::Answer::Accepted);
    wait_for(&d1.orchestrator, "dms2.example", Phase::Active).await;
    wait_for(&d2.orchestrator, "dms1.example", Phase::Active).await;
    // A second start for the same device is refused with 409 while the first holds its scope.
    let again = d1
        .orchestrator
        .apply(
            "dms2.example",
            "1c9a6e55-3f0b-4f4e-9d2a-6a1b7c8d9e01",
            &start(Role::Delegating, DelType::Partial, "dms2.example"),
        )
        .await
        .unwrap();
    assert_eq!(again.answer.http_status(), 409);
    // Revocation ends both sides.
    let revoked = d1
        .orchestrator
        .apply(
            "dms2.example",
            SESSION,
            &Event {
                kind: Some(event::Kind::OperatorRevoke(pb::OperatorRevoke {})),
            },
        )
        .await
        .unwrap();
    assert_eq!(revoked.answer, dm_saga::Answer::Accepted);
    wait_for(&d1.orchestrator, "dms2.example", Phase::Revoked).await;
    wait_for(&d2.orchestrator, "dms1.example", Phase::Revoked).await;
    d1.task.abort();
    d2.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegation_runs_end_to_end_on_the_in_process_bus() {
    every_type_reaches_active_on(Bus::in_process()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegation_runs_end_to_end_on_nats() {
    let server = NatsServer::start().unwrap();
    every_type_reaches_active_on(Bus::connect(server.url()).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_restarted_mid_way_finishes_from_the_stored_state() {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(server.url()).await.unwrap();
    let (n1, n2) = (Names::new("dms1").unwrap(), Names::new("dms2").unwrap());
    // DMS-1 comes up without its services: the delegation stops after NOTIF/RES, waiting on auth.
    let d1 = deploy(&bus, "dms1", "dms1.example").await;
    let d2 = deploy(&bus, "dms2", "dms2.example").await;
    tokio::spawn(StandIns::new(bus.clone(), n2.clone(), "dms2.example", n1.clone()).run());
    // DMS-1's gateway alone, so that NOTIF reaches DMS-2 (the other commands wait in the stream).
    d1.orchestrator
        .apply(
            "dms2.example",
            SESSION,
            &start(Role::Delegating, DelType::Final, "dms2.example"),
        )
        .await
        .unwrap();
    // Stop DMS-1's orchestrator, start a new one on the same bus, then the services.
    d1.task.abort();
    let d1 = deploy(&bus, "dms1", "dms1.example").await;
    tokio::spawn(StandIns::new(bus.clone(), n1.clone(), "dms1.example", n2.clone()).run());
    wait_for(&d1.orchestrator, "dms2.example", Phase::Active).await;
    let s = wait_for(&d2.orchestrator, "dms1.example", Phase::Active).await;
    assert_eq!(s.role(), Role::Delegated);
    d1.task.abort();
    d2.task.abort();
}

/// Timers live in the stored state: a deadline armed by one orchestrator fires in the next one, after a
/// restart, and the delegation fails with 408 as the saga says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_armed_before_a_restart_fires_after_it() {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(server.url()).await.unwrap();
    let mut cfg = config("dms1", "dms1.example");
    cfg.saga.await_res_ms = 500;
    let first = Orchestrator::new(cfg.clone(), bus.clone()).await.unwrap();
    first
        .apply(
            "dms2.example",
            SESSION,
            &start(Role::Delegating, DelType::Partial, "dms2.example"),
        )
        .await
        .unwrap();
    drop(first);
    // A new orchestrator on the same bus: it finds the armed timer in the stored state.
    let second = Orchestrator::new(cfg, bus.clone()).await.unwrap();
    let runner = second.clone();
    let task = tokio::spawn(async move { runner.run(std::future::pending()).await.unwrap() });
    let failed = wait_for(&second, "dms2.example", Phase::Failed).await;
    let fault = failed.fault.unwrap();
    assert_eq!((fault.status_code, fault.step), (408, 1));
    task.abort();
}

/// A deadline armed by an operator request while the run loop already waits (with no timer at all)
/// still fires: the loop is woken when a timer is armed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_armed_while_the_loop_waits_fires() {
    let bus = Bus::in_process();
    let mut cfg = config("dms1", "dms1.example");
    cfg.saga.await_res_ms = 300;
    let o = Orchestrator::new(cfg, bus).await.unwrap();
    let runner = o.clone();
    let task = tokio::spawn(async move { runner.run(std::future::pending()).await.unwrap() });
    // Let the loop reach its wait with nothing armed, then start (no peer will ever answer).
    tokio::task::yield_now().await;
    o.apply(
        "dms2.example",
        SESSION,
        &start(Role::Delegating, DelType::Partial, "dms2.example"),
    )
    .await
    .unwrap();
    let failed = wait_for(&o, "dms2.example", Phase::Failed).await;
    assert_eq!(failed.fault.unwrap().status_code, 408);
    task.abort();
}
