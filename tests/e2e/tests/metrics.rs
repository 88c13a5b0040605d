//! `/metrics` after real delegations: two deployments over a real nats-server, one delegation that
//! completes, one refused at step 1 and a poison command; the endpoint is scraped over HTTP before and
//! after, and every family of docs/operations.md ("Metrics") must have moved with the right labels.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use dm_bus::testing::NatsServer;
use dm_bus::{Area, Bus, Headers, Names};
use dm_saga::pb::{DelType, Phase};
use dmd::demo::{D1, D2, World, device_id};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STEP: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `GET /metrics` over HTTP/1.1: the body, after checking the status and the content type.
async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(STEP, tcp.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(
        body.ends_with("# EOF\n"),
        "an incomplete exposition:\n{body}"
    );
    body.to_string()
}

/// The value of one series (`name{labels}` exactly as exposed), 0 when it is not there yet.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

/// The sum of every series whose `name{labels…` starts with `prefix`.
fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegation_shows_on_metrics_scraped_over_http() {
    let server = NatsServer::start().unwrap();
    let dir = std::env::temp_dir().join(format!("dmd-e2e-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bus = Bus::connect(server.url()).await.unwrap();
    let w = World::start(&dir, bus.clone(), 4).await.unwrap();
    // The endpoint `dmd all` serves beside /livez and /readyz.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(dmd::serve::serve_health(
        listener,
        Arc::new(AtomicBool::new(true)),
    ));
    let before = scrape(addr).await;

    // A Partial delegation from DMS-1 to DMS-2, to Active on both sides.
    let ok = w
        .start_delegation(
            D1,
            &device_id(0),
            DelType::Partial,
            &["./Vendor/Acme"],
            None,
        )
        .await
        .unwrap();
    w.wait_for(D1, &ok, Phase::Active, STEP).await.unwrap();
    w.wait_for(D2, &ok, Phase::Active, STEP).await.unwrap();
    // A Temporary one longer than DMS-2 accepts: refused at step 1 with 403.
    let refused = w
        .start_delegation(
            D1,
            &device_id(1),
            DelType::Temporary,
            &["./Vendor/Acme"],
            Some(now_ms() + 30 * 86_400_000),
        )
        .await
        .unwrap();
    let d1 = w
        .wait_for(D1, &refused, Phase::Declined, STEP)
        .await
        .unwrap();
    assert_eq!(d1.fault.unwrap().status_code, 403);
    w.wait_for(D2, &refused, Phase::Declined, STEP)
        .await
        .unwrap();
    // A command nobody can read: dropped as poison by DMS-1's provisioning, with a dead letter.
    let names = Names::new("dms1").unwrap();
    bus.publish(
        &names.subject(Area::Cmd, "provisioning.apply").unwrap(),
        Headers::new(),
        bytes::Bytes::from_static(b"not a command"),
        "metrics-test-poison",
    )
    .await
    .unwrap();
    // Scraped once the dead letter is counted and nothing is in flight any more (a peer's answer may be
    // on its way back after the delegation's state moved on): the counters are final then.
    let dead = r#"dmd_bus_dead_letters_total{deployment="dms1",service="provisioning"}"#;
    let deadline = tokio::time::Instant::now() + STEP;
    let after = loop {
        let text = scrape(addr).await;
        let idle = [
            "dmd_peer_messages_in_flight{",
            "dmd_bus_messages_in_flight{",
            "dmd_device_jobs_in_progress{",
        ]
        .iter()
        .all(|gauge| sum(&text, gauge) == 0.0);
        if idle && value(&text, dead) > value(&before, dead) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead letter was not counted or work stayed in flight:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let delta = |series: &str| value(&after, series) - value(&before, series);

    // Delegations: started, established, ended, by deployment, role and type (and outcome, code, step).
    for (series, expected) in [
        (
            r#"dmd_delegations_started_total{deployment="dms1",role="delegating",type="partial"}"#,
            1.0,
        ),
        (
            r#"dmd_delegations_started_total{deployment="dms2",role="delegated",type="partial"}"#,
            1.0,
        ),
        (
            r#"dmd_delegations_started_total{deployment="dms1",role="delegating",type="temporary"}"#,
            1.0,
        ),
        (
            r#"dmd_delegations_established_total{deployment="dms1",role="delegating",type="partial"}"#,
            1.0,
        ),
        (
            r#"dmd_delegations_established_total{deployment="dms2",role="delegated",type="partial"}"#,
            1.0,
        ),
        (
            r#"dmd_delegation_setup_duration_seconds_count{deployment="dms1",role="delegating",type="partial"}"#,
            1.0,
        ),
        (
            r#"dmd_delegations_ended_total{deployment="dms1",role="delegating",type="temporary",outcome="declined",status_code="403",step="1"}"#,
            1.0,
        ),
        // Both delegations waited for DMS-2's DELEGATION_RES once.
        (
            r#"dmd_delegation_step_duration_seconds_count{deployment="dms1",role="delegating",phase="notif_sent"}"#,
            2.0,
        ),
        // Device work: DMS-1 applied its plan, DMS-2 had its first session.
        (
            r#"dmd_device_jobs_total{deployment="dms1",work="apply_plan",outcome="ok",status_code="200"}"#,
            1.0,
        ),
        (
            r#"dmd_device_jobs_total{deployment="dms2",work="first_session",outcome="ok",status_code="200"}"#,
            1.0,
        ),
        (
            r#"dmd_device_job_duration_seconds_count{deployment="dms1",work="apply_plan"}"#,
            1.0,
        ),
        (dead, 1.0),
    ] {
        assert_eq!(delta(series), expected, "{series}\n{after}");
    }
    assert_eq!(
        sum(
            &after,
            r#"dmd_delegations_ended_total{deployment="dms2",role="delegated",type="temporary",outcome="declined""#
        ) - sum(
            &before,
            r#"dmd_delegations_ended_total{deployment="dms2",role="delegated",type="temporary",outcome="declined""#
        ),
        1.0,
        "{after}"
    );
    // The refused delegation never reached Active, and nothing else ended.
    assert_eq!(
        sum(&after, "dmd_delegations_ended_total{") - sum(&before, "dmd_delegations_ended_total{"),
        2.0,
        "{after}"
    );
    // Peer messages, both ways, by type and status (retries may add attempts, never remove them).
    for series in [
        r#"dmd_peer_messages_received_total{deployment="dms2",message="DELEGATION_NOTIF",status="202"}"#,
        r#"dmd_peer_messages_sent_total{deployment="dms1",message="DELEGATION_NOTIF",status="202"}"#,
        r#"dmd_peer_messages_received_total{deployment="dms1",message="DELEGATION_CONFIRM",status="202"}"#,
        r#"dmd_peer_messages_sent_total{deployment="dms2",message="DELEGATION_CONFIRM",status="202"}"#,
    ] {
        assert!(delta(series) >= 1.0, "{series}\n{after}");
    }
    // Both delegations' NOTIF and RES went through.
    for series in [
        r#"dmd_peer_messages_received_total{deployment="dms2",message="DELEGATION_NOTIF",status="202"}"#,
        r#"dmd_peer_messages_received_total{deployment="dms1",message="DELEGATION_RES",status="202"}"#,
    ] {
        assert!(delta(series) >= 2.0, "{series}\n{after}");
    }
    // Bus latency of NATS operations; nothing left in flight.
    for op in ["publish", "request", "kv_get", "kv_create", "kv_update"] {
        let series = format!(r#"dmd_bus_operation_duration_seconds_count{{op="{op}"}}"#);
        assert!(delta(&series) > 0.0, "{series}\n{after}");
    }
    for series in [
        r#"dmd_bus_messages_in_flight{deployment="dms1",service="provisioning"}"#,
        r#"dmd_device_jobs_in_progress{deployment="dms1"}"#,
        r#"dmd_peer_messages_in_flight{deployment="dms1",direction="out"}"#,
    ] {
        assert!(
            after.contains(&format!("{series} 0\n")),
            "{series}\n{after}"
        );
    }
    assert!(
        after.contains(r#"dmd_bus_redeliveries_total{deployment="dms2",service="provisioning"}"#),
        "{after}"
    );
    // No series names a device or a session.
    for line in after.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("IMEI") && !line.contains(&ok) && !line.contains(&refused),
            "{line}"
        );
    }
    w.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
