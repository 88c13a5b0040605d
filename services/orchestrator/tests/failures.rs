//! A failure at each step, from either side (issue 10): two orchestrators on a real nats-server, the other
//! services played by stand-ins that can fail one kind of work or lose one kind of peer message. Each case
//! ends both sides (Failed, Declined for a refused proposal, Revoked for a DMS-2 whose CONFIRM was lost)
//! with the step and code of the fault, the delegating side restores the device when it had touched it, and the device is free again: a
//! new delegation of it then reaches Active on both sides.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use dm_bus::testing::NatsServer;
use dm_bus::{Bus, Names};
use dm_orchestrator::{Config, Orchestrator};
use dm_saga::pb::{self, Event, Phase, Work};
use support::{DEADLINE, Fault, StandIns};

const D1: &str = "dms1.example";
const D2: &str = "dms2.example";

/// DMS-1 waits briefly for the peer's messages (a lost one ends its delegation within a test's patience),
/// DMS-2 as long as by default: so DMS-1's deadline decides, and tells DMS-2.
fn config(deployment: &str, server_id: &str) -> Config {
    const SHORT: i64 = 1_500;
    let saga = if server_id == D1 {
        dm_saga::Config {
            await_res_ms: SHORT,
            await_start_ms: SHORT,
            await_confirm_ms: SHORT,
            ..dm_saga::Config::default()
        }
    } else {
        dm_saga::Config::default()
    };
    with_saga(deployment, server_id, saga)
}

fn with_saga(deployment: &str, server_id: &str, saga: dm_saga::Config) -> Config {
    Config {
        names: Names::new(deployment).unwrap(),
        server_id: server_id.into(),
        saga,
        ack_wait: Duration::from_secs(30),
    }
}

async fn deploy(bus: &Bus, config: Config) -> Orchestrator {
    let o = Orchestrator::new(config, bus.clone()).await.unwrap();
    let runner = o.clone();
    tokio::spawn(async move { runner.run(std::future::pending()).await.unwrap() });
    o
}

async fn wait_until(
    o: &Orchestrator,
    peer: &str,
    session: &str,
    done: impl Fn(Phase) -> bool,
) -> pb::DelegationState {
    let mut changes = o.subscribe();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(s) = o.get(peer, session).await.unwrap()
            && done(s.phase())
        {
            return s;
        }
        let now = o.get(peer, session).await.unwrap().map(|s| s.phase());
        assert!(
            tokio::time::timeout_at(deadline, changes.recv())
                .await
                .is_ok(),
            "{peer}/{session}: stuck at {now:?}"
        );
    }
}

fn start(dev_id: &str, session: &str) -> Event {
    support::partial_start(D2, session, dev_id, "./Vendor/Acme")
}

fn session(n: u64) -> String {
    format!("7e57f00d-0000-4000-8000-{n:012x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_at_each_step_from_either_side_ends_both_and_frees_the_device() {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(server.url()).await.unwrap();
    let d1 = deploy(&bus, config("dms1", D1)).await;
    let d2 = deploy(&bus, config("dms2", D2)).await;
    let cases = [
        (
            Fault::Work(D2, Work::Acceptance),
            1,
            500,
            false,
            Phase::Declined,
        ),
        (Fault::Lose(D2, "RES"), 1, 408, false, Phase::Failed),
        (
            Fault::Work(D1, Work::VerifyPeer),
            2,
            401,
            false,
            Phase::Failed,
        ),
        (
            Fault::Work(D2, Work::VerifyPeer),
            2,
            401,
            false,
            Phase::Failed,
        ),
        (Fault::Lose(D2, "START"), 3, 408, false, Phase::Failed),
        (
            Fault::Work(D1, Work::CreateKey),
            4,
            500,
            false,
            Phase::Failed,
        ),
        (
            Fault::Work(D1, Work::ApplyPlan),
            4,
            500,
            true,
            Phase::Failed,
        ),
        (Fault::Lose(D1, "PREPARED"), 9, 408, true, Phase::Failed),
        (
            Fault::Work(D2, Work::FirstSession),
            7,
            500,
            true,
            Phase::Failed,
        ),
        // DMS-2 sent CONFIRM and is Active, where a FAILURE is refused: DMS-1 revokes as well.
        (Fault::Lose(D2, "CONFIRM"), 9, 408, true, Phase::Revoked),
    ];
    run_cases(&bus, &d1, &d2, &cases).await;
}

/// Steps 5, 6 and 8 end by a deadline: the device does not answer DMS-1's plan (5, DMS-1's deadline),
/// DELEGATION_PREPARED never reaches DMS-2 (6, DMS-2's deadline, DMS-1 told by the FAILURE), DMS-2's first
/// session never ends (8, DMS-2's deadline). Each side's deadline is the first to pass in its case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_at_steps_5_6_and_8_end_both_sides_and_restore_the_device() {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(server.url()).await.unwrap();
    let d1 = dm_saga::Config {
        apply_ms: 1_000,
        ..dm_saga::Config::default()
    };
    let d2 = dm_saga::Config {
        await_prepared_ms: 3_000,
        first_session_ms: 1_000,
        ..dm_saga::Config::default()
    };
    let d1 = deploy(&bus, with_saga("dms1", D1, d1)).await;
    let d2 = deploy(&bus, with_saga("dms2", D2, d2)).await;
    let cases = [
        (
            Fault::Hang(D1, Work::ApplyPlan),
            5,
            408,
            true,
            Phase::Failed,
        ),
        (Fault::Lose(D1, "PREPARED"), 6, 408, true, Phase::Failed),
        (
            Fault::Hang(D2, Work::FirstSession),
            8,
            408,
            true,
            Phase::Failed,
        ),
    ];
    run_cases(&bus, &d1, &d2, &cases).await;
}

/// (fault, the step both sides record, its status, whether DMS-1 had touched the device, DMS-2's end)
type Case = (Fault, u32, u32, bool, Phase);

/// Runs each case with the stand-ins of both sides, then checks the device is free again.
async fn run_cases(bus: &Bus, d1: &Orchestrator, d2: &Orchestrator, cases: &[Case]) {
    let (n1, n2) = (d1.names().clone(), d2.names().clone());
    let first = StandIns::new(bus.clone(), n1.clone(), D1, n2.clone());
    let (fault, restores) = (first.fault.clone(), first.seen.restores.clone());
    let mut second = StandIns::new(bus.clone(), n2, D2, n1);
    second.fault = fault.clone();
    second.seen = first.seen.clone();
    tokio::spawn(first.run());
    tokio::spawn(second.run());
    for (n, &(case, step, status, touched, d2_end)) in cases.iter().enumerate() {
        let n = n as u64;
        let dev = format!("IMEI:{n}");
        *fault.lock().unwrap() = case;
        let failing = session(2 * n);
        let applied = d1
            .apply(D2, &failing, &start(&dev, &failing))
            .await
            .unwrap();
        assert_eq!(applied.answer, dm_saga::Answer::Accepted, "{case:?}");
        let s1 = wait_until(d1, D2, &failing, |p| {
            matches!(p, Phase::Failed | Phase::Declined)
        })
        .await;
        let s2 = wait_until(d2, D1, &failing, |p| p == d2_end || p == Phase::Failed).await;
        assert_eq!(s2.phase(), d2_end, "{case:?}: DMS-2 {:?}", s2.fault);
        let faulted: &[(&str, &pb::DelegationState)] = if d2_end == Phase::Revoked {
            &[("DMS-1", &s1)]
        } else {
            &[("DMS-1", &s1), ("DMS-2", &s2)]
        };
        for (side, s) in faulted.iter().copied() {
            let f = s
                .fault
                .clone()
                .unwrap_or_else(|| panic!("{case:?}: {side} has no fault"));
            assert_eq!(
                (f.step, f.status_code),
                (step, status),
                "{case:?}: {side} {f:?}"
            );
        }
        assert_eq!(
            restores.lock().unwrap().contains(&failing),
            touched,
            "{case:?}: restore of the device"
        );
        // The device is free again: the next delegation goes all the way.
        *fault.lock().unwrap() = Fault::None;
        let next = session(2 * n + 1);
        let applied = d1.apply(D2, &next, &start(&dev, &next)).await.unwrap();
        assert_eq!(
            applied.answer,
            dm_saga::Answer::Accepted,
            "{case:?}: the device stayed claimed"
        );
        wait_until(d1, D2, &next, |p| p == Phase::Active).await;
        wait_until(d2, D1, &next, |p| p == Phase::Active).await;
    }
}
