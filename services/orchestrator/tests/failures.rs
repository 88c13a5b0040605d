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
    Config {
        names: Names::new(deployment).unwrap(),
        server_id: server_id.into(),
        saga,
        ack_wait: Duration::from_secs(30),
    }
}

async fn deploy(bus: &Bus, deployment: &str, server_id: &str) -> Orchestrator {
    let o = Orchestrator::new(config(deployment, server_id), bus.clone())
        .await
        .unwrap();
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
    let (n1, n2) = (Names::new("dms1").unwrap(), Names::new("dms2").unwrap());
    let d1 = deploy(&bus, "dms1", D1).await;
    let d2 = deploy(&bus, "dms2", D2).await;
    let first = StandIns::new(bus.clone(), n1.clone(), D1, n2.clone());
    let (fault, restores) = (first.fault.clone(), first.seen.restores.clone());
    let mut second = StandIns::new(bus.clone(), n2, D2, n1);
    second.fault = fault.clone();
    second.seen = first.seen.clone();
    tokio::spawn(first.run());
    tokio::spawn(second.run());

    // (fault, the step both sides record, its status, whether DMS-1 had touched the device, DMS-2's end)
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
    for (n, (case, step, status, touched, d2_end)) in cases.into_iter().enumerate() {
        let n = n as u64;
        let dev = format!("IMEI:{n}");
        *fault.lock().unwrap() = case;
        let failing = session(2 * n);
        let applied = d1
            .apply(D2, &failing, &start(&dev, &failing))
            .await
            .unwrap();
        assert_eq!(applied.answer, dm_saga::Answer::Accepted, "{case:?}");
        let s1 = wait_until(&d1, D2, &failing, |p| {
            matches!(p, Phase::Failed | Phase::Declined)
        })
        .await;
        let s2 = wait_until(&d2, D1, &failing, |p| p == d2_end || p == Phase::Failed).await;
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
        wait_until(&d1, D2, &next, |p| p == Phase::Active).await;
        wait_until(&d2, D1, &next, |p| p == Phase::Active).await;
    }
}
