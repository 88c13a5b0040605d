//! The gateway with real parts: certificates made by rcgen at test time, real mutual-TLS handshakes on
//! loopback, the bus in-process and on a real nats-server, stand-ins for auth and the orchestrator.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dm_bus::testing::NatsServer;
use dm_bus::{Area, Bus, Headers, Names};
use dm_gateway::{Config, ConfigError, Gateway, GatewayError};
use dm_proto::bus::v1::{CommandEnvelope, DelegationRef, fetch};
use dm_saga::pb::{self, peer_message, send_message};
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

async fn start_gateway(config: Config, bus: Bus) -> Running {
    let gateway = Gateway::bind(config, bus).await.unwrap();
    let addr = gateway.local_addr();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(gateway.serve(async {
        let _ = rx.await;
    }));
    Running {
        addr,
        stop: Some(tx),
        task,
    }
}

/// DMS-2's gateway on its own bus, with auth knowing dms1's, dms3's and the pinned certificate.
struct Receiver {
    pki: Pki,
    gateway: Running,
    auth: Shared<AuthState>,
    orchestrator: Shared<OrchestratorState>,
}

async fn receiver(bus: Bus, with_orchestrator: bool, with_auth: bool) -> Receiver {
    let pki = Pki::new();
    let names = Names::new("dms2").unwrap();
    let auth = Arc::new(Mutex::new(AuthState::default()));
    {
        let mut a = auth.lock().unwrap();
        a.registry.insert(pki.dms1.pin(), "dms1.example".into());
        a.registry.insert(pki.dms3.pin(), "dms3.example".into());
        a.registry.insert(pki.pinned.pin(), "dms4.example".into());
    }
    let orchestrator = Arc::new(Mutex::new(OrchestratorState::default()));
    if with_auth {
        stand_in_auth(&bus, &names, auth.clone()).await;
    }
    if with_orchestrator {
        stand_in_orchestrator(&bus, &names, orchestrator.clone()).await;
    }
    let config = pki.config("dms2", "dms2.example", &pki.dms2, vec![]);
    let gateway = start_gateway(config, bus).await;
    Receiver {
        pki,
        gateway,
        auth,
        orchestrator,
    }
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
async fn every_answer_of_a2_in_its_order() {
    let r = receiver(Bus::in_process(), true, true).await;
    let addr = r.gateway.addr;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    let dms3 = Client::new(&r.pki, Some(&r.pki.dms3));
    let good = notif(&msg_id(0), SESSION, "dms1.example");
    let oversized = vec![b' '; 64 * 1024 + 1];

    // 415 first: even a GET with the wrong type, or no type at all.
    let a = dms1
        .send(addr, "POST", Some("text/xml"), good.clone())
        .await
        .unwrap();
    assert_error(&a, 415, "Content-Type");
    let a = dms1
        .send(addr, "GET", Some("application/xml"), "")
        .await
        .unwrap();
    assert_error(&a, 415, "Content-Type");
    let a = dms1.send(addr, "POST", None, good.clone()).await.unwrap();
    assert_error(&a, 415, "Content-Type");
    let a = dms1
        .send(
            addr,
            "POST",
            Some("application/vnd.dm.delegation+xml; charset=ISO-8859-1"),
            good.clone(),
        )
        .await
        .unwrap();
    assert_error(&a, 415, "Content-Type");
    // 405 before the size.
    let a = dms1
        .send(addr, "GET", Some(CONTENT_TYPE), "")
        .await
        .unwrap();
    assert_error(&a, 405, "POST");
    let a = dms1
        .send(addr, "PUT", Some(CONTENT_TYPE), oversized.clone())
        .await
        .unwrap();
    assert_error(&a, 405, "POST");
    // 413 before decoding; the limit itself still gets decoded.
    let a = dms1.post(addr, oversized).await.unwrap();
    assert_error(&a, 413, "65536");
    let a = dms1.post(addr, vec![b' '; 64 * 1024]).await.unwrap();
    assert_error(&a, 400, "");
    // 400 with the field and the reason.
    let bad = good.replace(
        "<Del_Type>Partial</Del_Type>",
        "<Del_Type>Sometimes</Del_Type>",
    );
    let a = dms1.post(addr, bad.clone()).await.unwrap();
    assert_error(&a, 400, "Del_Type");
    let dtd = good.replace(
        "<DelegationMessage",
        "<!DOCTYPE DelegationMessage [<!ENTITY x \"y\">]>\n<DelegationMessage",
    );
    let a = dms1.post(addr, dtd).await.unwrap();
    assert_error(&a, 400, "");
    // 400 before the identity: auth was never asked so far.
    let a = dms3.post(addr, bad).await.unwrap();
    assert_error(&a, 400, "Del_Type");
    assert!(r.auth.lock().unwrap().checks.is_empty());

    // 403: a known peer claiming another DMServerID; the orchestrator never hears of it.
    let a = dms3.post(addr, good.clone()).await.unwrap();
    assert_error(&a, 403, "dms1.example");
    assert!(r.orchestrator.lock().unwrap().messages.is_empty());
    {
        let auth = r.auth.lock().unwrap();
        let check = auth.checks.last().unwrap();
        assert_eq!(check.spki_sha256, r.pki.dms3.pin());
        assert_eq!(check.dm_server_id, "dms1.example");
        assert_eq!(check.issuer_ca, "partners");
    }

    // 202, empty body; charset parameter allowed.
    let a = dms1
        .send(
            addr,
            "POST",
            Some("application/vnd.dm.delegation+xml; charset=UTF-8"),
            good.clone(),
        )
        .await
        .unwrap();
    assert_eq!(a.0, 202);
    assert!(a.1.is_empty());
    {
        let auth = r.auth.lock().unwrap();
        let check = auth.checks.last().unwrap();
        assert_eq!(check.spki_sha256, r.pki.dms1.pin());
        assert_eq!(check.issuer_ca, "partners");
        for san in ["dms1.example", "localhost", "urn:dmd:dms1"] {
            assert!(
                check.subject_alt_names.iter().any(|s| s == san),
                "{:?}",
                check.subject_alt_names
            );
        }
    }
    // Duplicate MsgID: the same answer again.
    let a = dms1.post(addr, good.clone()).await.unwrap();
    assert_eq!(a.0, 202);
    // 409: a NOTIF for an existing (peer, SessionID); its duplicate gets 409 again.
    let again = notif(&msg_id(1), SESSION, "dms1.example");
    let a = dms1.post(addr, again.clone()).await.unwrap();
    assert_error(&a, 409, "SessionID");
    let a = dms1.post(addr, again).await.unwrap();
    assert_eq!(a.0, 409);
    // 404: a message for an unknown SessionID.
    let other = "1c9a6e55-3f0b-4f4e-9d2a-6a1b7c8d9e01";
    let a = dms1
        .post(addr, confirm(&msg_id(2), other, "dms1.example"))
        .await
        .unwrap();
    assert_error(&a, 404, "SessionID");

    // What reached the orchestrator: the decoded messages, sender bound, times in milliseconds.
    {
        let o = r.orchestrator.lock().unwrap();
        let ids: Vec<_> = o.messages.iter().map(|m| m.msg_id.as_str()).collect();
        assert_eq!(ids, [msg_id(0), msg_id(0), msg_id(1), msg_id(1), msg_id(2)]);
        let first = &o.messages[0];
        assert_eq!(first.sender, "dms1.example");
        assert_eq!(first.session_id, SESSION);
        let Some(peer_message::Body::Notif(n)) = &first.body else {
            panic!("not a NOTIF: {first:?}")
        };
        assert_eq!(n.del_type(), pb::DelType::Partial);
        assert_eq!(n.sender_role(), pb::Role::Delegating);
        assert_eq!(n.scope, ["./Vendor/Acme/Apps"]);
        let device = n.device.as_ref().unwrap();
        assert_eq!(
            (device.dev_id.as_str(), device.man.as_str()),
            ("IMEI:490154203237518", "Acme")
        );
        let Some(peer_message::Body::Confirm(c)) = &o.messages[4].body else {
            panic!("not a CONFIRM")
        };
        assert_eq!(c.session_established_ms, 1_795_300_812_250);
    }
    r.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_is_cut_at_the_limit_and_other_paths_are_not_the_endpoint() {
    let r = receiver(Bus::in_process(), true, true).await;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    // Chunked, no Content-Length: the limit is found while reading.
    let mut request = format!(
        "POST /delegation HTTP/1.1\r\nHost: gw\r\nContent-Type: {CONTENT_TYPE}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    let chunk = vec![b' '; 16 * 1024];
    for _ in 0..5 {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = dms1.raw(r.gateway.addr, &request).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("<DelegationError"), "{answer}");
    // Another path.
    let body = notif(&msg_id(0), SESSION, "dms1.example");
    let request = format!(
        "POST /other HTTP/1.1\r\nHost: gw\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = dms1.raw(r.gateway.addr, request.as_bytes()).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(r.auth.lock().unwrap().checks.is_empty());
    r.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_without_a_trusted_certificate_fail() {
    let r = receiver(Bus::in_process(), true, true).await;
    let addr = r.gateway.addr;
    // A certificate from a CA nobody configured, with the right names: refused in the handshake.
    let intruder = Client::new(&r.pki, Some(&r.pki.intruder));
    let refused = intruder
        .post(addr, notif(&msg_id(0), SESSION, "dms1.example"))
        .await;
    assert!(
        refused.is_err(),
        "an unknown CA's certificate got {refused:?}"
    );
    // No certificate at all.
    let anonymous = Client::new(&r.pki, None);
    let refused = anonymous
        .post(addr, notif(&msg_id(0), SESSION, "dms1.example"))
        .await;
    assert!(refused.is_err(), "no certificate got {refused:?}");
    // Nothing went further than TLS.
    assert!(r.auth.lock().unwrap().checks.is_empty());
    assert!(r.orchestrator.lock().unwrap().messages.is_empty());
    // A pinned self-signed certificate is accepted, and is said to chain to no CA.
    let pinned = Client::new(&r.pki, Some(&r.pki.pinned));
    let a = pinned
        .post(addr, notif(&msg_id(0), SESSION, "dms4.example"))
        .await
        .unwrap();
    assert_eq!(a.0, 202, "{}", String::from_utf8_lossy(&a.1));
    let auth = r.auth.lock().unwrap();
    let check = auth.checks.last().unwrap();
    assert_eq!(check.spki_sha256, r.pki.pinned.pin());
    assert_eq!(check.issuer_ca, "");
    assert_eq!(check.subject_alt_names, ["pinned.example"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_or_prepared_lodges_nothing() {
    let r = receiver(Bus::in_process(), true, true).await;
    let addr = r.gateway.addr;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    // No NOTIF before: the SessionID is unknown (404), and nothing may reach auth.
    for (i, body) in [
        start(&msg_id(1), SESSION, "dms1.example"),
        prepared(&msg_id(2), SESSION, "dms1.example"),
    ]
    .into_iter()
    .enumerate()
    {
        let a = dms1.post(addr, body).await.unwrap();
        assert_eq!(a.0, 404, "message {i}: {}", String::from_utf8_lossy(&a.1));
    }
    assert!(r.auth.lock().unwrap().lodged.is_empty());
    // What went to the orchestrator carried the secret sealed only.
    let o = r.orchestrator.lock().unwrap();
    assert_eq!(o.payloads.len(), 2);
    for payload in &o.payloads {
        for secret in [ACCOUNT_SECRET.as_bytes(), TEMP_KEY.as_bytes()] {
            assert!(!contains(payload, secret), "a secret travelled the bus");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_lodged_with_auth_and_never_reach_the_bus() {
    let r = receiver(Bus::in_process(), true, true).await;
    let addr = r.gateway.addr;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    for (i, body) in [
        notif(&msg_id(0), SESSION, "dms1.example"),
        start(&msg_id(1), SESSION, "dms1.example"),
        prepared(&msg_id(2), SESSION, "dms1.example"),
    ]
    .into_iter()
    .enumerate()
    {
        let a = dms1.post(addr, body).await.unwrap();
        assert_eq!(a.0, 202, "message {i}: {}", String::from_utf8_lossy(&a.1));
    }
    // Auth holds the account (TNDS) and the key, under the delegation.
    {
        let auth = r.auth.lock().unwrap();
        assert_eq!(auth.lodged.len(), 2);
        let account = &auth.lodged[0];
        let d = account.delegation.as_ref().unwrap();
        assert_eq!(
            (d.peer_server_id.as_str(), d.session_id.as_str()),
            ("dms1.example", SESSION)
        );
        assert_eq!(d.role(), pb::Role::Delegating);
        let (field, tnds) = opened(account);
        assert_eq!(field, dm_seal::field::PEER_ACCOUNT);
        let tree = dm_protocol::tnds::decode(&tnds).unwrap();
        let expected = dm_protocol::tnds::decode(account_tnds("dms1.example").as_bytes()).unwrap();
        assert_eq!(tree, expected);
        let key = &auth.lodged[1];
        assert_eq!(key.delegation.as_ref().unwrap().role(), pb::Role::Delegated);
        assert_eq!(
            opened(key),
            (dm_seal::field::TEMP_KEY, TEMP_KEY.as_bytes().to_vec())
        );
    }
    // The orchestrator got the messages without their secrets.
    let o = r.orchestrator.lock().unwrap();
    assert_eq!(o.messages.len(), 3);
    assert_eq!(
        o.messages[1].body,
        Some(peer_message::Body::Start(pb::StartBody {}))
    );
    let Some(peer_message::Body::Prepared(p)) = &o.messages[2].body else {
        panic!("not PREPARED")
    };
    assert_eq!(p.del_type(), pb::DelType::Partial);
    let plan = p.plan.as_ref().unwrap();
    assert_eq!(plan.account_uri, "./DMAcc/dms2");
    assert_eq!(plan.server_nonce_b64, "bm9uY2U=");
    assert_eq!(plan.acl_results.len(), 1);
    assert_eq!(plan.acl_results[0].uri, "./Vendor/Acme/Apps");
    assert_eq!(
        plan.acl_results[0].value,
        "Add=dms2.example&Get=dms2.example+dms1.example"
    );
    let raw_key = b"super-secret-temp-key-32-bytes!!";
    for payload in &o.payloads {
        for secret in [
            ACCOUNT_SECRET.as_bytes(),
            TEMP_KEY.as_bytes(),
            raw_key,
            b"AAuthSecret",
        ] {
            assert!(!contains(payload, secret), "a secret travelled the bus");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_503_when_auth_or_the_orchestrator_do_not_answer() {
    // Nobody decides: no orchestrator at all.
    let r = receiver(Bus::in_process(), false, true).await;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    let a = dms1
        .post(r.gateway.addr, notif(&msg_id(0), SESSION, "dms1.example"))
        .await
        .unwrap();
    assert_error(&a, 503, "");
    r.gateway.stop().await;

    // No auth: the identity cannot be checked.
    let r = receiver(Bus::in_process(), true, false).await;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    let a = dms1
        .post(r.gateway.addr, notif(&msg_id(0), SESSION, "dms1.example"))
        .await
        .unwrap();
    assert_error(&a, 503, "");
    assert!(r.orchestrator.lock().unwrap().messages.is_empty());
    r.gateway.stop().await;

    // An orchestrator that does not answer in time; then one that says 503 itself.
    let r = receiver(Bus::in_process(), true, true).await;
    r.orchestrator.lock().unwrap().silent = true;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    let a = dms1
        .post(r.gateway.addr, notif(&msg_id(0), SESSION, "dms1.example"))
        .await
        .unwrap();
    assert_error(&a, 503, "");
    {
        let mut o = r.orchestrator.lock().unwrap();
        o.silent = false;
        o.busy = 1;
    }
    let a = dms1
        .post(r.gateway.addr, notif(&msg_id(0), SESSION, "dms1.example"))
        .await
        .unwrap();
    assert_error(&a, 503, "busy");
    let a = dms1
        .post(r.gateway.addr, notif(&msg_id(0), SESSION, "dms1.example"))
        .await
        .unwrap();
    assert_eq!(a.0, 202);
    r.gateway.stop().await;
}

// ---- outbound ---------------------------------------------------------------------------------------

fn send_command(
    n1: &Names,
    peer: &str,
    index: u64,
    body: send_message::Body,
) -> (String, CommandEnvelope) {
    send_command_in(n1, peer, SESSION, index, body)
}

fn send_command_in(
    n1: &Names,
    peer: &str,
    session: &str,
    index: u64,
    body: send_message::Body,
) -> (String, CommandEnvelope) {
    let mut delegation = DelegationRef {
        peer_server_id: peer.into(),
        session_id: session.into(),
        dev_id: "IMEI:490154203237518".into(),
        ..Default::default()
    };
    delegation.set_role(pb::Role::Delegating);
    let outbox_id = format!("{peer}/{session}:{index}:0");
    (
        n1.subject(Area::Cmd, "gateway.send").unwrap(),
        CommandEnvelope {
            delegation: Some(delegation),
            command: Some(pb::Command {
                kind: Some(pb::command::Kind::Send(pb::SendMessage {
                    msg_id: dm_saga::message_id(session, pb::Role::Delegating, index),
                    seq: index,
                    body: Some(body),
                })),
            }),
            outbox_id,
            ..Default::default()
        },
    )
}

async fn publish(bus: &Bus, (subject, envelope): (String, CommandEnvelope)) {
    let mut h = Headers::new();
    h.insert("dmd-type", "dmd.bus.v1.CommandEnvelope");
    h.insert("dmd-version", "1");
    bus.publish(
        &subject,
        h,
        Bytes::from(envelope.encode_to_vec()),
        &envelope.outbox_id,
    )
    .await
    .unwrap();
}

/// Two deployments on one bus: DMS-1's gateway sends to DMS-2's gateway.
struct Pair {
    receiver: Receiver,
    sender: Running,
    sender_auth: Shared<AuthState>,
}

async fn pair(bus: Bus) -> Pair {
    let receiver = receiver(bus.clone(), true, true).await;
    let pki = &receiver.pki;
    let n1 = Names::new("dms1").unwrap();
    let sender_auth = Arc::new(Mutex::new(AuthState::default()));
    stand_in_auth(&bus, &n1, sender_auth.clone()).await;
    let config = pki.config(
        "dms1",
        "dms1.example",
        &pki.dms1,
        vec![
            pki.peer("dms2.example", receiver.gateway.addr),
            // A peer whose endpoint nobody listens on.
            pki.peer("dms9.example", "127.0.0.1:9".parse().unwrap()),
        ],
    );
    let sender = start_gateway(config, bus).await;
    Pair {
        receiver,
        sender,
        sender_auth,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_retries_503_with_the_same_msgid_in_order_over_nats() {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(server.url()).await.unwrap();
    let p = pair(bus.clone()).await;
    let n1 = Names::new("dms1").unwrap();
    // DMS-2 knows the delegation and is busy for the first two tries.
    {
        let mut o = p.receiver.orchestrator.lock().unwrap();
        o.delegations
            .insert(("dms1.example".into(), SESSION.into()));
        o.busy = 2;
    }
    // The key is with DMS-1's auth.
    p.sender_auth.lock().unwrap().secrets.insert(
        (SESSION.into(), what(fetch::What::TempKey)),
        TEMP_KEY.as_bytes().to_vec(),
    );
    let mut prepared = pb::PreparedBody {
        plan: Some(pb::PlanOutcome {
            account_uri: "./DMAcc/dms2".into(),
            acl_results: vec![pb::AclResult {
                uri: "./Vendor/Acme/Apps".into(),
                value: "Add=dms2.example&Get=dms2.example+dms1.example".into(),
            }],
            server_nonce_b64: "bm9uY2U=".into(),
        }),
        ..Default::default()
    };
    prepared.set_del_type(pb::DelType::Partial);
    publish(
        &bus,
        send_command(
            &n1,
            "dms2.example",
            0,
            send_message::Body::Prepared(prepared),
        ),
    )
    .await;
    publish(
        &bus,
        send_command(
            &n1,
            "dms2.example",
            1,
            send_message::Body::Confirm(pb::ConfirmBody {
                session_established_ms: 1_795_300_812_000,
            }),
        ),
    )
    .await;
    let ids = wait_until("both messages answered 202", || {
        let o = p.receiver.orchestrator.lock().unwrap();
        (o.messages.len() >= 4).then(|| {
            o.messages
                .iter()
                .map(|m| m.msg_id.clone())
                .collect::<Vec<_>>()
        })
    })
    .await;
    // Two 503s, then the same MsgID succeeds; only then the next message goes out.
    assert_eq!(ids, [msg_id(0), msg_id(0), msg_id(0), msg_id(1)]);
    let o = p.receiver.orchestrator.lock().unwrap();
    assert_eq!(
        o.answers.get(&("dms1.example".to_string(), msg_id(0))),
        Some(&202)
    );
    assert!(
        o.messages
            .iter()
            .all(|m| m.sender == "dms1.example" && m.session_id == SESSION)
    );
    let Some(peer_message::Body::Prepared(got)) = &o.messages[2].body else {
        panic!("not PREPARED")
    };
    assert_eq!(got.plan.as_ref().unwrap().acl_results.len(), 1);
    drop(o);
    // The key went from DMS-1's auth over mTLS into DMS-2's auth, and nowhere else.
    let auth2 = p.receiver.auth.lock().unwrap();
    // Lodged once: the two copies answered 503 were refused, and a refused message lodges nothing.
    assert_eq!(auth2.lodged.len(), 1);
    assert_eq!(
        opened(&auth2.lodged[0]),
        (dm_seal::field::TEMP_KEY, TEMP_KEY.as_bytes().to_vec())
    );
    let auth1 = p.sender_auth.lock().unwrap();
    assert_eq!(auth1.fetches.len(), 1);
    assert_eq!(auth1.fetches[0].what(), fetch::What::TempKey);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_start_carries_this_servers_account_from_auth() {
    let bus = Bus::in_process();
    let p = pair(bus.clone()).await;
    let n1 = Names::new("dms1").unwrap();
    p.sender_auth.lock().unwrap().secrets.insert(
        (SESSION.into(), what(fetch::What::OwnAccount)),
        account_tnds("dms1.example").into_bytes(),
    );
    // A command for a peer without a usable endpoint does not hold up the others.
    publish(
        &bus,
        send_command(
            &n1,
            "dms7.example",
            0,
            send_message::Body::Release(pb::ReleaseBody {}),
        ),
    )
    .await;
    let mut notif = pb::NotifBody {
        device: Some(pb::Device {
            dev_id: "IMEI:490154203237518".into(),
            ..Default::default()
        }),
        scope: vec!["./Vendor/Acme/Apps".into()],
        ..Default::default()
    };
    notif.set_del_type(pb::DelType::Final);
    notif.set_sender_role(pb::Role::Delegated);
    publish(
        &bus,
        send_command(
            &n1,
            "dms2.example",
            0,
            send_message::Body::Notif(notif.clone()),
        ),
    )
    .await;
    publish(
        &bus,
        send_command(
            &n1,
            "dms2.example",
            1,
            send_message::Body::Start(pb::StartBody {}),
        ),
    )
    .await;
    wait_until("NOTIF and START answered", || {
        let o = p.receiver.orchestrator.lock().unwrap();
        (o.messages.len() >= 2).then_some(())
    })
    .await;
    {
        let o = p.receiver.orchestrator.lock().unwrap();
        assert_eq!(o.messages[0].body, Some(peer_message::Body::Notif(notif)));
        assert_eq!(
            o.messages[1].body,
            Some(peer_message::Body::Start(pb::StartBody {}))
        );
        assert_eq!(
            o.answers.get(&("dms1.example".to_string(), msg_id(1))),
            Some(&202)
        );
    }
    {
        let auth2 = p.receiver.auth.lock().unwrap();
        let (_, tnds) = opened(&auth2.lodged[0]);
        assert_eq!(
            dm_protocol::tnds::decode(&tnds).unwrap(),
            dm_protocol::tnds::decode(account_tnds("dms1.example").as_bytes()).unwrap()
        );
    }
    p.sender.stop().await;
    p.receiver.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_cut_short_by_shutdown_is_taken_up_again_with_the_same_msgid() {
    let bus = Bus::in_process();
    let r = receiver(bus.clone(), true, true).await;
    r.orchestrator
        .lock()
        .unwrap()
        .delegations
        .insert(("dms1.example".into(), SESSION.into()));
    let n1 = Names::new("dms1").unwrap();
    let sender_auth = Arc::new(Mutex::new(AuthState::default()));
    sender_auth.lock().unwrap().secrets.insert(
        (SESSION.into(), what(fetch::What::TempKey)),
        TEMP_KEY.as_bytes().to_vec(),
    );
    stand_in_auth(&bus, &n1, sender_auth.clone()).await;
    // First DMS-1's gateway cannot reach DMS-2 (nothing listens there): it keeps retrying.
    let unreachable = r.pki.config(
        "dms1",
        "dms1.example",
        &r.pki.dms1,
        vec![r.pki.peer("dms2.example", "127.0.0.1:9".parse().unwrap())],
    );
    let first = start_gateway(unreachable, bus.clone()).await;
    let mut prepared = pb::PreparedBody {
        plan: Some(pb::PlanOutcome {
            account_uri: "./DMAcc/dms2".into(),
            server_nonce_b64: "bm9uY2U=".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    prepared.set_del_type(pb::DelType::Full);
    publish(
        &bus,
        send_command(
            &n1,
            "dms2.example",
            0,
            send_message::Body::Prepared(prepared),
        ),
    )
    .await;
    wait_until("the key fetched for the first try", || {
        (sender_auth.lock().unwrap().fetches.len() == 1).then_some(())
    })
    .await;
    // Stopped mid-retry: the command goes back to the stream; the next gateway sends it.
    first.stop().await;
    let reachable = r.pki.config(
        "dms1",
        "dms1.example",
        &r.pki.dms1,
        vec![r.pki.peer("dms2.example", r.gateway.addr)],
    );
    let second = start_gateway(reachable, bus.clone()).await;
    let ids = wait_until("the message delivered by the second gateway", || {
        let o = r.orchestrator.lock().unwrap();
        (!o.messages.is_empty()).then(|| {
            o.messages
                .iter()
                .map(|m| m.msg_id.clone())
                .collect::<Vec<_>>()
        })
    })
    .await;
    assert_eq!(ids, [msg_id(0)]);
    assert_eq!(sender_auth.lock().unwrap().fetches.len(), 2);
    second.stop().await;
    r.gateway.stop().await;
}

/// The order of a delegation's messages is the saga's (`seq`), not the order in which the bus hands them
/// out nor which gateway replica holds which: two replicas, the second message published first, and
/// DMS-2 busy for the first tries; the first message is answered before the second goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegations_messages_keep_their_order_across_replicas() {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(server.url()).await.unwrap();
    let p = pair(bus.clone()).await;
    let n1 = Names::new("dms1").unwrap();
    let config = p.receiver.pki.config(
        "dms1",
        "dms1.example",
        &p.receiver.pki.dms1,
        vec![p.receiver.pki.peer("dms2.example", p.receiver.gateway.addr)],
    );
    let second = start_gateway(config, bus.clone()).await;
    {
        let mut o = p.receiver.orchestrator.lock().unwrap();
        o.delegations
            .insert(("dms1.example".into(), SESSION.into()));
        o.busy = 2;
    }
    for i in [2, 1, 0] {
        publish(&bus, send_command(&n1, "dms2.example", i, confirm_body())).await;
    }
    let answered = wait_until("the three messages answered 202", || {
        let o = p.receiver.orchestrator.lock().unwrap();
        (o.answers.len() >= 3).then(|| {
            o.messages
                .iter()
                .map(|m| m.msg_id.clone())
                .collect::<Vec<_>>()
        })
    })
    .await;
    // Retries of a message (503) come before the next message, never after it.
    let mut firsts = answered.clone();
    firsts.dedup();
    assert_eq!(firsts, ids(SESSION, 0..=2), "{answered:?}");
    second.stop().await;
}

// ---- connection reuse ---------------------------------------------------------------------------------

/// DMS-1's gateway sending to DMS-2's gateway through a relay that counts the connections DMS-2 accepts.
async fn relayed_pair(bus: Bus) -> (Receiver, Running, Relay) {
    let receiver = receiver(bus.clone(), true, true).await;
    let relay = Relay::start(receiver.gateway.addr).await;
    let pki = &receiver.pki;
    let n1 = Names::new("dms1").unwrap();
    stand_in_auth(&bus, &n1, Arc::new(Mutex::new(AuthState::default()))).await;
    let config = pki.config(
        "dms1",
        "dms1.example",
        &pki.dms1,
        vec![pki.peer("dms2.example", relay.addr)],
    );
    let sender = start_gateway(config, bus).await;
    (receiver, sender, relay)
}

fn confirm_body() -> send_message::Body {
    send_message::Body::Confirm(pb::ConfirmBody {
        session_established_ms: 1_795_300_812_000,
    })
}

/// The MsgIDs DMS-2's orchestrator received for `session`, in order, once there are `n` of them.
async fn received(r: &Receiver, session: &str, n: usize) -> Vec<String> {
    wait_until(&format!("{n} messages of {session} received"), || {
        let o = r.orchestrator.lock().unwrap();
        let ids: Vec<String> = o
            .messages
            .iter()
            .filter(|m| m.session_id == session)
            .map(|m| m.msg_id.clone())
            .collect();
        (ids.len() >= n).then_some(ids)
    })
    .await
}

/// Like [`received`], for a test that cuts connections: a message whose answer was cut off on its way
/// is sent again with the same MsgID (A.2) and may arrive twice in a row.
async fn received_once_each(r: &Receiver, session: &str, n: usize) -> Vec<String> {
    wait_until(&format!("{n} messages of {session} received"), || {
        let o = r.orchestrator.lock().unwrap();
        let mut ids: Vec<String> = o
            .messages
            .iter()
            .filter(|m| m.session_id == session)
            .map(|m| m.msg_id.clone())
            .collect();
        ids.dedup();
        (ids.len() >= n).then_some(ids)
    })
    .await
}

fn ids(session: &str, range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range
        .map(|n| dm_saga::message_id(session, pb::Role::Delegating, n))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_a_peer_reuse_one_kept_alive_connection() {
    let bus = Bus::in_process();
    let (r, sender, relay) = relayed_pair(bus.clone()).await;
    let n1 = Names::new("dms1").unwrap();
    let sessions: Vec<String> = (0..5)
        .map(|i| format!("5e5510{i}0-0000-4000-8000-000000000000"))
        .collect();
    {
        let mut o = r.orchestrator.lock().unwrap();
        for session in std::iter::once(SESSION).chain(sessions.iter().map(String::as_str)) {
            o.delegations
                .insert(("dms1.example".into(), session.to_string()));
        }
    }
    // Twenty messages of one delegation, one after the other: one connection carries them all.
    for i in 0..20 {
        publish(&bus, send_command(&n1, "dms2.example", i, confirm_body())).await;
    }
    assert_eq!(received(&r, SESSION, 20).await, ids(SESSION, 0..=19));
    assert!(
        relay.accepted() <= 2,
        "{} connections for 20 messages",
        relay.accepted()
    );
    // Five delegations side by side: at most one connection per message in flight, kept afterwards (the
    // last answer of the twenty may still be on its way: six in flight at most).
    for i in 0..4 {
        for session in &sessions {
            publish(
                &bus,
                send_command_in(&n1, "dms2.example", session, i, confirm_body()),
            )
            .await;
        }
    }
    for session in &sessions {
        assert_eq!(received(&r, session, 4).await, ids(session, 0..=3));
    }
    assert!(
        relay.accepted() <= sessions.len() + 1,
        "{} connections for {} delegations in flight",
        relay.accepted(),
        sessions.len()
    );
    {
        let o = r.orchestrator.lock().unwrap();
        assert_eq!(o.messages.len(), 40, "a message was sent twice");
        assert!(o.answers.values().all(|status| *status == 202));
    }
    sender.stop().await;
    r.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_restarted_is_reconnected_and_gets_the_next_message() {
    let bus = Bus::in_process();
    let (mut r, sender, relay) = relayed_pair(bus.clone()).await;
    let n1 = Names::new("dms1").unwrap();
    r.orchestrator
        .lock()
        .unwrap()
        .delegations
        .insert(("dms1.example".into(), SESSION.into()));
    for i in 0..5 {
        publish(&bus, send_command(&n1, "dms2.example", i, confirm_body())).await;
    }
    assert_eq!(received(&r, SESSION, 5).await, ids(SESSION, 0..=4));
    assert_eq!(relay.accepted(), 1);
    // DMS-2 restarts: its gateway stops (closing the kept connection), a new one takes over behind the
    // same address, and whatever was still open is cut.
    r.gateway.stop().await;
    let config = r.pki.config("dms2", "dms2.example", &r.pki.dms2, vec![]);
    r.gateway = start_gateway(config, bus.clone()).await;
    relay.point_at(r.gateway.addr);
    relay.cut_all();
    wait_until("the old connection closed", || {
        (relay.open() == 0).then_some(())
    })
    .await;
    for i in 5..10 {
        publish(&bus, send_command(&n1, "dms2.example", i, confirm_body())).await;
    }
    assert_eq!(
        received_once_each(&r, SESSION, 10).await,
        ids(SESSION, 0..=9)
    );
    // One new connection (with a new handshake) for the five messages after the restart.
    assert_eq!(relay.accepted(), 2);
    sender.stop().await;
    r.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_cut_under_the_sender_is_replaced() {
    let bus = Bus::in_process();
    let (r, sender, relay) = relayed_pair(bus.clone()).await;
    let n1 = Names::new("dms1").unwrap();
    r.orchestrator
        .lock()
        .unwrap()
        .delegations
        .insert(("dms1.example".into(), SESSION.into()));
    for i in 0..2 {
        publish(&bus, send_command(&n1, "dms2.example", i, confirm_body())).await;
    }
    received(&r, SESSION, 2).await;
    assert_eq!(relay.accepted(), 1);
    // The connection dies in the network; neither gateway closed it.
    relay.cut_all();
    wait_until("the connection cut", || (relay.open() == 0).then_some(())).await;
    for i in 2..4 {
        publish(&bus, send_command(&n1, "dms2.example", i, confirm_body())).await;
    }
    assert_eq!(
        received_once_each(&r, SESSION, 4).await,
        ids(SESSION, 0..=3)
    );
    assert_eq!(relay.accepted(), 2);
    sender.stop().await;
    r.gateway.stop().await;
}

// ---- configuration ----------------------------------------------------------------------------------

const EXAMPLE: &str = r#"
deployment = "dms1"
server_id = "dms1.operator.example"
listen = "0.0.0.0:8443"

[tls]
cert = "/etc/dmd/gateway.crt"
key = "/etc/dmd/gateway.key"

[trust]
pins = ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
[[trust.ca]]
name = "partner-ca"
pem = "/etc/dmd/partner-ca.pem"

[[peer]]
server_id = "dms2.enterprise.example"
endpoint = "https://dms2.enterprise.example:8443/delegation"
ca = "/etc/dmd/dms2-server-ca.pem"

[timeouts]
send_deadline_ms = 120000
"#;

#[test]
fn the_shipped_example_configuration_parses() {
    let c = Config::from_toml(include_str!("../gateway.example.toml")).unwrap();
    assert_eq!(c.deployment, "dms1");
    assert_eq!(
        c.timeouts.send_deadline,
        std::time::Duration::from_secs(300)
    );
    assert_eq!(c.trust.pins.len(), 1);
    assert_eq!(c.peers[0].server_id, "dms2.enterprise.example");
}

#[test]
fn configuration_from_toml() {
    let c = Config::from_toml(EXAMPLE).unwrap();
    assert_eq!(c.server_id, "dms1.operator.example");
    assert_eq!(c.path, "/delegation");
    assert_eq!(c.max_body_bytes, 65536);
    assert_eq!(c.peers.len(), 1);
    assert_eq!(c.trust.cas[0].name.as_deref(), Some("partner-ca"));
    assert_eq!(
        c.timeouts.send_deadline,
        std::time::Duration::from_secs(120)
    );
    assert_eq!(c.timeouts.ack_wait, std::time::Duration::from_secs(180));
    for (change, key) in [
        (
            ("listen = \"0.0.0.0:8443\"", "listen = \"nowhere\""),
            "listen",
        ),
        (
            (
                "server_id = \"dms1.operator.example\"",
                "server_id = \"dms 1\"",
            ),
            "server_id",
        ),
        (
            ("deployment = \"dms1\"", "deployment = \"dms.1\""),
            "deployment",
        ),
        (
            (
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "xyz",
            ),
            "trust.pins[0]",
        ),
        (
            (
                "https://dms2.enterprise.example:8443",
                "http://dms2.enterprise.example:8443",
            ),
            "peer[0].endpoint",
        ),
        (
            (
                "send_deadline_ms = 120000",
                "send_deadline_ms = 120000\nack_wait_ms = 1000",
            ),
            "timeouts.ack_wait_ms",
        ),
    ] {
        let text = EXAMPLE.replace(change.0, change.1);
        match Config::from_toml(&text) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{key}: {other:?}"),
        }
    }
    let typo = EXAMPLE.replace("[timeouts]", "[timeouts]\nsend_dedline_ms = 1");
    let e = Config::from_toml(&typo).unwrap_err();
    assert!(e.to_string().contains("send_dedline_ms"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_refuses_bad_files_before_listening() {
    let pki = Pki::new();
    let bus = Bus::in_process();
    let mut config = pki.config("dms1", "dms1.example", &pki.dms1, vec![]);
    config.tls.cert = pki.dir.path().join("missing.crt");
    let e = Gateway::bind(config, bus.clone()).await.unwrap_err();
    assert!(e.to_string().contains("tls.cert"), "{e}");
    // A key that is not the certificate's.
    let mut config = pki.config("dms1", "dms1.example", &pki.dms1, vec![]);
    config.tls.key = pki.dir.write("other.key", &pki.dms2.key_pem);
    let e = Gateway::bind(config, bus.clone()).await.unwrap_err();
    assert!(e.to_string().contains("tls.key"), "{e}");
    assert!(!e.to_string().contains("PRIVATE KEY"), "{e}");
    // A CA file that is not PEM.
    let mut config = pki.config("dms1", "dms1.example", &pki.dms1, vec![]);
    config.trust.cas[0].pem = pki.dir.write("junk.pem", "not a certificate");
    let e = Gateway::bind(config, bus).await.unwrap_err();
    assert!(e.to_string().contains("trust.ca[0].pem"), "{e}");
}

/// Auth's yes for a certificate and DMServerID is reused for the next messages (a delegation's messages
/// all come with the same pair); a no is asked again each time, and another pair is asked on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_auth_allowed_is_not_asked_again_for_each_message_and_a_refusal_is() {
    let r = receiver(Bus::in_process(), true, true).await;
    let addr = r.gateway.addr;
    let dms1 = Client::new(&r.pki, Some(&r.pki.dms1));
    let dms3 = Client::new(&r.pki, Some(&r.pki.dms3));
    for n in 0..3 {
        let a = dms1
            .post(addr, notif(&msg_id(n), &session(n), "dms1.example"))
            .await
            .unwrap();
        assert_eq!(a.0, 202, "{}", String::from_utf8_lossy(&a.1));
    }
    assert_eq!(
        r.auth.lock().unwrap().checks.len(),
        1,
        "asked once for three"
    );
    for n in 3..5 {
        // dms3's certificate speaking as dms1: refused each time, asked each time.
        let a = dms3
            .post(addr, notif(&msg_id(n), &session(n), "dms1.example"))
            .await
            .unwrap();
        assert_error(&a, 403, "dms1.example");
    }
    assert_eq!(r.auth.lock().unwrap().checks.len(), 3);
    let a = dms3
        .post(addr, notif(&msg_id(5), &session(5), "dms3.example"))
        .await
        .unwrap();
    assert_eq!(a.0, 202, "{}", String::from_utf8_lossy(&a.1));
    assert_eq!(r.auth.lock().unwrap().checks.len(), 4);
    assert_eq!(r.orchestrator.lock().unwrap().messages.len(), 4);
}
