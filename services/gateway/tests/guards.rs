//! Replay and abuse guards of the inbound endpoint, with real parts: rcgen certificates, mutual TLS on
//! loopback, the in-process bus, stand-ins for auth and the orchestrator. A `Timestamp` outside the window
//! is a 400 with its reason unless the message is a copy of one seen (then the first answer); a burst or a pile-up past a peer's limits is a 503 with `Retry-After`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dm_bus::{Area, Bus, Headers, Names};
use dm_gateway::{Config, ConfigError, Gateway, GatewayError, PeerLimits};
use dm_proto::bus::v1::{CommandEnvelope, DelegationRef, InboundPeerMessage};
use dm_protocol::types::UtcTime;
use dm_saga::pb::{self, send_message};
use prost::Message as _;
use support::*;
use tokio::sync::oneshot;

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), GatewayError>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

/// DMS-2's gateway with auth knowing dms1 and dms3; `change` adjusts its configuration.
struct Receiver {
    pki: Pki,
    gateway: Running,
    auth: Shared<AuthState>,
    orchestrator: Shared<OrchestratorState>,
}

async fn receiver(change: impl FnOnce(&Pki, &mut Config)) -> Receiver {
    receiver_on(Bus::in_process(), change).await
}

async fn receiver_on(bus: Bus, change: impl FnOnce(&Pki, &mut Config)) -> Receiver {
    let pki = Pki::new();
    let names = Names::new("dms2").unwrap();
    let auth = Arc::new(Mutex::new(AuthState::default()));
    {
        let mut a = auth.lock().unwrap();
        a.registry.insert(pki.dms1.pin(), "dms1.example".into());
        a.registry.insert(pki.dms3.pin(), "dms3.example".into());
    }
    let orchestrator = Arc::new(Mutex::new(OrchestratorState::default()));
    stand_in_auth(&bus, &names, auth.clone()).await;
    stand_in_orchestrator(&bus, &names, orchestrator.clone()).await;
    let mut config = pki.config("dms2", "dms2.example", &pki.dms2, vec![]);
    change(&pki, &mut config);
    let gateway = Gateway::bind(config, bus).await.unwrap();
    let addr = gateway.local_addr();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(gateway.serve(async {
        let _ = rx.await;
    }));
    Receiver {
        pki,
        gateway: Running {
            addr,
            stop: Some(tx),
            task,
        },
        auth,
        orchestrator,
    }
}

/// This machine's clock moved by `offset_secs`, as a `Timestamp`.
fn stamp(offset_secs: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    UtcTime::from_unix(i64::try_from(now).unwrap() + offset_secs).to_string()
}

/// `message` with its envelope's `Timestamp` replaced by `timestamp`.
fn stamped(message: &str, timestamp: &str) -> String {
    let start = message.find("<Timestamp>").unwrap() + "<Timestamp>".len();
    let end = message.find("</Timestamp>").unwrap();
    format!("{}{timestamp}{}", &message[..start], &message[end..])
}

fn assert_error(answer: &(u16, Bytes), status: u16, reason_has: &str) {
    assert_eq!(answer.0, status, "{}", String::from_utf8_lossy(&answer.1));
    let e = error_of(&answer.1);
    assert_eq!(e.status_code, status);
    assert!(
        e.reason.contains(reason_has),
        "reason '{}' lacks '{reason_has}'",
        e.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_outside_the_timestamp_window_is_refused_with_its_reason() {
    let r = receiver(|_, _| {}).await;
    let addr = r.gateway.addr;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    let dms3 = Client::new(&r.pki, Some(&r.pki.dms3));
    let fresh = notif(&msg_id(0), SESSION, "dms1.example");

    // PROTOCOL.md's example time, and ten minutes either way: 400, the reason says how far and the limit.
    for (when, says) in [
        ("2026-11-21T22:40:10Z".to_string(), "behind"),
        (stamp(-600), "behind"),
        (stamp(600), "ahead of"),
    ] {
        let a = dms1.post(addr, stamped(&fresh, &when)).await.unwrap();
        assert_error(&a, 400, &format!("Timestamp {when} is "));
        assert_error(&a, 400, says);
        assert_error(&a, 400, "at most 300 s either way");
    }
    // The certificate is checked first: a peer speaking as another is 403 whatever the time.
    let a = dms3
        .post(addr, stamped(&fresh, "2026-11-21T22:40:10Z"))
        .await
        .unwrap();
    assert_error(&a, 403, "dms1.example");
    // A stale START leaves its account nowhere: auth kept nothing, and the orchestrator, which alone
    // knows whether it is a copy of a message seen, got it marked stale and without its secret.
    let old_start = stamped(&start(&msg_id(5), SESSION, "dms1.example"), &stamp(-3600));
    let a = dms1.post(addr, old_start).await.unwrap();
    assert_error(&a, 400, "Timestamp");
    assert!(r.auth.lock().unwrap().lodged.is_empty());
    {
        let o = r.orchestrator.lock().unwrap();
        assert!(o.messages.last().unwrap().stale.contains("behind"));
        let inbound = InboundPeerMessage::decode(o.payloads.last().unwrap().clone()).unwrap();
        assert!(
            inbound.lodge.is_none(),
            "a stale message's secret travelled"
        );
    }

    // Within the window, either way: taken.
    let a = dms1
        .post(addr, stamped(&fresh, &stamp(-240)))
        .await
        .unwrap();
    assert_eq!(a.0, 202, "{}", String::from_utf8_lossy(&a.1));
    let a = dms1
        .post(
            addr,
            stamped(&notif(&msg_id(1), &session(1), "dms1.example"), &stamp(240)),
        )
        .await
        .unwrap();
    assert_eq!(a.0, 202, "{}", String::from_utf8_lossy(&a.1));

    // A peer retrying an accepted message with its first bytes after the window (A.2: the same MsgID
    // until the step's deadline) gets the answer the first copy got.
    let a = dms1
        .post(addr, stamped(&fresh, &stamp(-3600)))
        .await
        .unwrap();
    assert_eq!(a.0, 202, "{}", String::from_utf8_lossy(&a.1));

    // A replay once the dedupe record is gone (the orchestrator forgot everything): the same message,
    // now older than the window, is refused.
    {
        let mut o = r.orchestrator.lock().unwrap();
        o.answers.clear();
        o.delegations.clear();
        o.messages.clear();
    }
    let a = dms1
        .post(addr, stamped(&fresh, &stamp(-301)))
        .await
        .unwrap();
    assert_error(&a, 400, "Timestamp");
    r.gateway.stop().await;

    // Switched off (`timestamp_window_secs = 0`): PROTOCOL.md's example time is taken.
    let r = receiver(|_, c| c.timestamp_window = None).await;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    let a = dms1
        .post(r.gateway.addr, stamped(&fresh, "2026-11-21T22:40:10Z"))
        .await
        .unwrap();
    assert_eq!(a.0, 202, "{}", String::from_utf8_lossy(&a.1));
    r.gateway.stop().await;
}

/// `dms1.example` as a configured peer with these limits.
fn dms1_with(limits: PeerLimits) -> impl FnOnce(&Pki, &mut Config) {
    move |pki, c| {
        let mut peer = pki.peer("dms1.example", "127.0.0.1:9".parse().unwrap());
        peer.limits = limits;
        c.peers.push(peer);
    }
}

fn retry_after(headers: &hyper::HeaderMap) -> u64 {
    headers
        .get("retry-after")
        .expect("a 503 without Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_above_a_peers_rate_gets_503_with_retry_after() {
    // One message per 100 s after a burst of 3: the fourth of a quick burst must wait.
    let r = receiver(dms1_with(PeerLimits {
        rate_per_sec: 0.01,
        rate_burst: 3,
        max_in_flight: 100,
    }))
    .await;
    let addr = r.gateway.addr;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    for n in 0..3 {
        let (status, _, body) = dms1
            .post_full(addr, notif(&msg_id(n), &session(n), "dms1.example"))
            .await
            .unwrap();
        assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    }
    let (status, headers, body) = dms1
        .post_full(addr, notif(&msg_id(3), &session(3), "dms1.example"))
        .await
        .unwrap();
    assert_error(&(status, body), 503, "messages per second from this sender");
    let wait = retry_after(&headers);
    assert!((1..=100).contains(&wait), "Retry-After {wait}");
    // Refused before the bus: the orchestrator never saw the fourth (auth was asked once, for the
    // first; its yes holds for the others of the same certificate and DMServerID).
    assert_eq!(r.auth.lock().unwrap().checks.len(), 1);
    assert_eq!(r.orchestrator.lock().unwrap().messages.len(), 3);
    // Another sender has limits of its own.
    let dms3 = Client::new(&r.pki, Some(&r.pki.dms3));
    let a = dms3
        .post(addr, notif(&msg_id(4), &session(4), "dms3.example"))
        .await
        .unwrap();
    assert_eq!(a.0, 202, "{}", String::from_utf8_lossy(&a.1));
    r.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_progress_past_a_peers_limit_get_503_with_retry_after() {
    let r = receiver(dms1_with(PeerLimits {
        max_in_flight: 2,
        ..PeerLimits::default()
    }))
    .await;
    let addr = r.gateway.addr;
    // The orchestrator holds every message: two stay in progress.
    r.orchestrator.lock().unwrap().silent = true;
    let mut held = Vec::new();
    for n in 0..2 {
        let client = Client::new(&r.pki, Some(&r.pki.dms1));
        held.push(tokio::spawn(async move {
            client
                .post(addr, notif(&msg_id(n), &session(n), "dms1.example"))
                .await
        }));
    }
    let o = r.orchestrator.clone();
    wait_until("two messages held by the orchestrator", || {
        (o.lock().unwrap().messages.len() == 2).then_some(())
    })
    .await;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    let (status, headers, body) = dms1
        .post_full(addr, notif(&msg_id(2), &session(2), "dms1.example"))
        .await
        .unwrap();
    assert_error(
        &(status, body),
        503,
        "more than 2 messages of this sender in progress",
    );
    assert_eq!(retry_after(&headers), 1);
    // The held ones end (503: the orchestrator did not answer in time) and give their places back.
    r.orchestrator.lock().unwrap().silent = false;
    for h in held {
        let a = h.await.unwrap().unwrap();
        assert_eq!(a.0, 503);
    }
    let a = dms1
        .post(addr, notif(&msg_id(2), &session(2), "dms1.example"))
        .await
        .unwrap();
    assert_eq!(a.0, 202, "{}", String::from_utf8_lossy(&a.1));
    r.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_the_default_limits_a_quick_series_passes() {
    // Defaults for a configured peer: 40 messages back to back, each taken.
    let r = receiver(dms1_with(PeerLimits::default())).await;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    for n in 0..40u64 {
        let a = dms1
            .post(
                r.gateway.addr,
                notif(&msg_id(n), &session(n), "dms1.example"),
            )
            .await
            .unwrap();
        assert_eq!(a.0, 202, "{}", String::from_utf8_lossy(&a.1));
    }
    r.gateway.stop().await;
}

/// DMS-1's command to send a DELEGATION_CONFIRM (no secret needed) in `session`.
async fn send_confirm(bus: &Bus, session: &str) {
    let n1 = Names::new("dms1").unwrap();
    let mut delegation = DelegationRef {
        peer_server_id: "dms2.example".into(),
        session_id: session.into(),
        dev_id: "IMEI:490154203237518".into(),
        ..Default::default()
    };
    delegation.set_role(pb::Role::Delegating);
    let envelope = CommandEnvelope {
        delegation: Some(delegation),
        command: Some(pb::Command {
            kind: Some(pb::command::Kind::Send(pb::SendMessage {
                msg_id: dm_saga::message_id(session, pb::Role::Delegating, 0),
                seq: 0,
                body: Some(send_message::Body::Confirm(pb::ConfirmBody {
                    session_established_ms: 1_795_300_812_000,
                })),
            })),
        }),
        outbox_id: format!("dms2.example/{session}:0:0"),
        ..Default::default()
    };
    let mut h = Headers::new();
    h.insert("dmd-type", "dmd.bus.v1.CommandEnvelope");
    h.insert("dmd-version", "1");
    bus.publish(
        &n1.subject(Area::Cmd, "gateway.send").unwrap(),
        h,
        Bytes::from(envelope.encode_to_vec()),
        &envelope.outbox_id,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_sender_waits_out_a_peers_limit_and_gets_through_with_the_same_msgid() {
    // DMS-2 takes one message of dms1 at once and then one per second.
    let bus = Bus::in_process();
    let r = receiver_on(
        bus.clone(),
        dms1_with(PeerLimits {
            rate_per_sec: 1.0,
            rate_burst: 1,
            max_in_flight: 100,
        }),
    )
    .await;
    let sessions = [session(10), session(11), session(12)];
    {
        let mut o = r.orchestrator.lock().unwrap();
        for s in &sessions {
            o.delegations.insert(("dms1.example".into(), s.clone()));
        }
    }
    let n1 = Names::new("dms1").unwrap();
    stand_in_auth(&bus, &n1, Arc::default()).await;
    let config = r.pki.config(
        "dms1",
        "dms1.example",
        &r.pki.dms1,
        vec![r.pki.peer("dms2.example", r.gateway.addr)],
    );
    let sender = Gateway::bind(config, bus.clone()).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(sender.serve(async {
        let _ = stopped.await;
    }));
    // Three delegations' messages at once: two of them are answered 503 with Retry-After at first.
    for s in &sessions {
        send_confirm(&bus, s).await;
    }
    let o = r.orchestrator.clone();
    let mut ids = wait_until("all three messages taken", || {
        let o = o.lock().unwrap();
        (o.messages.len() >= 3).then(|| {
            o.messages
                .iter()
                .map(|m| m.msg_id.clone())
                .collect::<Vec<_>>()
        })
    })
    .await;
    // Each reached the orchestrator once, with the MsgID it was first sent with; the refused attempts
    // never left the gateway.
    ids.sort();
    let mut expected: Vec<String> = sessions
        .iter()
        .map(|s| dm_saga::message_id(s, pb::Role::Delegating, 0))
        .collect();
    expected.sort();
    assert_eq!(ids, expected);
    // Auth's yes for dms1 was asked once and reused.
    assert_eq!(r.auth.lock().unwrap().checks.len(), 1);
    // And some attempts were refused with 503 (only this test sends CONFIRMs in this process).
    let metrics = dm_metrics::encode();
    let refused: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("dmd_peer_messages_sent_total")
                && l.contains("deployment=\"dms1\"")
                && l.contains("DELEGATION_CONFIRM")
                && l.contains("status=\"503\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(refused >= 2.0, "503 attempts: {refused}\n{metrics}");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    r.gateway.stop().await;
}

#[test]
fn the_window_and_the_limits_in_the_gateways_own_configuration() {
    let text = include_str!("../gateway.example.toml");
    let c = Config::from_toml(text).unwrap();
    assert_eq!(c.timestamp_window, Some(Duration::from_secs(300)));
    assert_eq!(c.peers[0].limits, PeerLimits::default());
    let c = Config::from_toml(
        &text.replace("timestamp_window_secs = 300", "timestamp_window_secs = 0"),
    )
    .unwrap();
    assert_eq!(c.timestamp_window, None);
    let c = Config::from_toml(&text.replace("rate_per_sec = 1000", "rate_per_sec = 0.5")).unwrap();
    assert_eq!(c.peers[0].limits.rate_per_sec, 0.5);
    for (bad, key) in [
        ("max_in_flight = 0", "peer[0].limits.max_in_flight"),
        ("rate_burst = 0", "peer[0].limits.rate_burst"),
        ("rate_per_sec = 0", "peer[0].limits.rate_per_sec"),
    ] {
        let name = bad.split(' ').next().unwrap();
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        match Config::from_toml(&text.replace(line, bad)) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{bad}: {other:?}"),
        }
    }
    let e = Config::from_toml(&text.replace("rate_burst = 2000", "rate_brust = 2000")).unwrap_err();
    assert!(e.to_string().contains("rate_brust"), "{e}");
}
