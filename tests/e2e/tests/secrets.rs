//! Issue 13, item 1: a reader of the bus learns no secret. Two deployments on a real nats-server run a
//! delegation of every type (Partial, Full, Final, Temporary; both initiators) to Active, revoke one, and
//! DMS-1 refuses two STARTs (an unknown SessionID: 404; a late one: 409), while a raw NATS client subscribed to `>` records every message (commands, events, requests and
//! replies, JetStream API traffic, stream contents, key-value puts, audit records). Every secret of the
//! run — the TEMP_DELEGATION_KEYs, DMS-2's account secrets as sent in DELEGATION_START, the secrets DMS-2
//! rotated in on the devices, DMS-1's device secrets — is then searched for in every subject, header and
//! payload, raw and as base64 (standard and URL-safe, with and without padding) and hex (lower and upper
//! case): no hit. The same search covers the logs written at trace level by every crate of the process
//! and the admin API's answers (GetDelegation, ListDelegations).
//!
//! The secrets are found where they legitimately are: the TEMP keys and DMS-2's first account in the
//! `secrets` buckets, opened with each side's master key from the records the sniffer saw being
//! written (so the test also fails if it saw none); the rotated secrets on the devices. Nonces are not
//! searched: they are single-use challenges the DM protocol itself sends in clear (`Chal`, B.1; the
//! `Nonce` of DELEGATION_PREPARED).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use dm_bus::Bus;
use dm_bus::testing::NatsServer;
use dm_proto::admin::v1::admin_client::AdminClient;
use dm_proto::admin::v1::{DelegationId, ListDelegationsRequest};
use dm_protocol::dmacc::{AuthLevel, DmAccount};
use dm_saga::pb::{self, DelType, Phase, event};
use dmd::demo::{D1, D2, World, device_id};
use futures::StreamExt as _;
use prost::Message as _;

const STEP: Duration = Duration::from_secs(60);
/// The client secret in the account of the STARTs DMS-1 refuses: it must never reach the bus or a log.
const REFUSED_SECRET: &str = "secret-of-a-refused-start-5c1e";
const UNKNOWN_SESSION: &str = "7e57ab1e-0000-4000-8000-00000000c0de";
const TOKEN: &str = "secrets-test-admin-token";

/// One message as the sniffer saw it.
struct Seen {
    subject: String,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

/// The log lines of the whole process, as written.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// DMS-2's DELEGATION_START as a peer sends it (the shipped example, stamped now, with its own MsgID, the
/// given SessionID and [`REFUSED_SECRET`] as the account's client secret).
fn start_message(session_id: &str) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/start.xml"
    ))
    .unwrap()
    .replace("c2VjcmV0LWNsaWVudC1wYXNzd29yZA==", REFUSED_SECRET);
    let mut m = dm_protocol::delegation::decode(text.as_bytes()).unwrap();
    assert_eq!(m.dm_server_id, D2);
    m.session_id = session_id.parse().unwrap();
    m.msg_id = dm_protocol::types::Uuid(rand_bytes());
    m.msg_id.0[6] = (m.msg_id.0[6] & 0x0f) | 0x40;
    m.msg_id.0[8] = (m.msg_id.0[8] & 0x3f) | 0x80;
    m.timestamp = dm_protocol::types::UtcTime::from_unix(now_ms() / 1000);
    dm_protocol::delegation::encode(&m)
}

fn rand_bytes() -> [u8; 16] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    nanos.to_le_bytes()
}

/// POSTs `body` to a gateway with DMS-2's certificate (from the World's PKI under `dir`); the HTTP status.
async fn post_as_d2(dir: &std::path::Path, addr: std::net::SocketAddr, body: &str) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_file(dir.join(format!("{D2}.pem"))).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{D2}.key"))).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap();
    let request = format!(
        "POST /delegation HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/vnd.dm.delegation+xml\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"))
}

fn with_token<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Every form a secret could take in an output: its bytes, base64 and hex of them.
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![secret.to_vec()];
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        out.push(engine.encode(secret).into_bytes());
    }
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    out.push(hex.to_uppercase().into_bytes());
    out.push(hex.into_bytes());
    out.sort();
    out.dedup();
    out
}

/// The secrets of a DM Account (TNDS): each credential's `AAuthSecret`.
fn account_secrets(tnds: &[u8]) -> Vec<String> {
    let tree = dm_protocol::tnds::decode(tnds).unwrap();
    let account = DmAccount::from_tnds(&tree).unwrap();
    account
        .app_auths
        .iter()
        .filter_map(|a| a.secret.as_ref().map(|s| s.expose().to_string()))
        .collect()
}

/// What one side's `secrets` bucket held, from the writes the sniffer saw: TEMP keys and accounts.
fn stored_secrets(
    seen: &[Seen],
    side: &str,
    master: &dm_auth::MasterKey,
    bucket: &str,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let prefix = format!("$KV.{bucket}.");
    let mut temp_keys = BTreeSet::new();
    let mut account_secrets_seen = BTreeSet::new();
    for m in seen {
        let Some(key) = m.subject.strip_prefix(&prefix) else {
            continue;
        };
        if m.payload.is_empty() {
            continue;
        }
        let opened = dm_auth::open_stored_record(master, key, &m.payload)
            .unwrap_or_else(|e| panic!("{side}: the record {key}: {e}"));
        if let Some(k) = &opened.temp_key {
            temp_keys.insert(String::from_utf8(k.to_vec()).unwrap());
        }
        for account in [&opened.peer_account, &opened.own_account]
            .into_iter()
            .flatten()
        {
            account_secrets_seen.extend(account_secrets(account));
        }
    }
    (temp_keys, account_secrets_seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_on_the_bus_in_the_logs_or_in_admin_answers() {
    // Every crate's logs at trace level, into memory (this binary has this one test).
    let logs = LogBuffer::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(logs.clone())
        .try_init()
        .unwrap();

    let server = NatsServer::start().unwrap();
    // The sniffer: a plain client with full read access, subscribed to everything before anything runs.
    let sniffer = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(server.url())
        .await
        .unwrap();
    let mut everything = sniffer.subscribe(">").await.unwrap();
    sniffer.flush().await.unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(m) = everything.next().await {
                let headers = m
                    .headers
                    .as_ref()
                    .map(|h| {
                        h.iter()
                            .flat_map(|(name, values)| {
                                values
                                    .iter()
                                    .map(|v| (name.to_string(), v.to_string()))
                                    .collect::<Vec<_>>()
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                seen.lock().unwrap().push(Seen {
                    subject: m.subject.to_string(),
                    headers,
                    payload: m.payload.to_vec(),
                });
            }
        })
    };

    let dir = std::env::temp_dir().join(format!("dmd-e2e-secrets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bus = Bus::connect(server.url()).await.unwrap();
    let w = World::start(&dir, bus, 4).await.unwrap();

    // A delegation of every type, both initiators, each to Active on both sides.
    let mut sessions = Vec::new();
    let mut rotated = BTreeSet::new();
    for (i, (del_type, initiator)) in [
        (DelType::Partial, D1),
        (DelType::Full, D2),
        (DelType::Final, D1),
        (DelType::Temporary, D2),
    ]
    .into_iter()
    .enumerate()
    {
        let device = device_id(i);
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
        w.wait_for(D1, &session, Phase::Active, STEP).await.unwrap();
        w.wait_for(D2, &session, Phase::Active, STEP).await.unwrap();
        // The secrets DMS-2 rotated in during its first session, and DMS-1's own, on the device.
        w.fleet
            .with_device(&device, |d| {
                for server in [D1, D2] {
                    for level in [AuthLevel::Srvcred, AuthLevel::Clcred] {
                        let c = d.credential(server, level).unwrap();
                        assert!(!c.secret().is_empty(), "{server} {level:?} on {device}");
                        rotated.insert(c.secret().to_string());
                    }
                }
            })
            .unwrap();
        sessions.push(session);
    }
    // One is revoked: DMS-1 restores the device and tells DMS-2.
    let revoke = pb::Event {
        kind: Some(event::Kind::OperatorRevoke(pb::OperatorRevoke {})),
    };
    w.dms1
        .orchestrator()
        .unwrap()
        .apply(D2, &sessions[0], &revoke)
        .await
        .unwrap();
    w.wait_for(D1, &sessions[0], Phase::Revoked, STEP)
        .await
        .unwrap();
    w.wait_for(D2, &sessions[0], Phase::Revoked, STEP)
        .await
        .unwrap();

    // STARTs DMS-1 refuses: one for a SessionID it does not know (404), a late one for an Active
    // delegation (409). Neither may put its account on the bus or in the store.
    let gateway1 = w.dms1.gateway_addr.unwrap();
    assert_eq!(
        post_as_d2(&dir, gateway1, &start_message(UNKNOWN_SESSION)).await,
        404
    );
    assert_eq!(
        post_as_d2(&dir, gateway1, &start_message(&sessions[1])).await,
        409
    );

    // The admin API's answers, over gRPC as an operator gets them.
    let mut admin_answers: Vec<Vec<u8>> = Vec::new();
    for side in [D1, D2] {
        let url = w.serve_admin(side, TOKEN).await.unwrap();
        let channel = tonic::transport::Channel::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = AdminClient::new(channel);
        let list = client
            .list_delegations(with_token(ListDelegationsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.delegations.len(), sessions.len(), "{side}");
        admin_answers.push(list.encode_to_vec());
        for s in &sessions {
            let peer = if side == D1 { D2 } else { D1 };
            let got = client
                .get_delegation(with_token(DelegationId {
                    peer_server_id: peer.into(),
                    session_id: s.clone(),
                }))
                .await
                .unwrap()
                .into_inner();
            admin_answers.push(got.encode_to_vec());
        }
    }

    // Everything the sniffer saw, with the services stopped (what they still had in flight is done).
    let masters = [
        (D1, w.master_key(D1), "dmd_dms1_secrets"),
        (D2, w.master_key(D2), "dmd_dms2_secrets"),
    ];
    w.stop().await.unwrap();
    sniffer.flush().await.unwrap();
    recorder.abort();
    let seen = std::mem::take(&mut *seen.lock().unwrap());

    // The secrets, from where they legitimately are.
    let mut temp_keys = Vec::new();
    let mut accounts = Vec::new();
    for (side, master, bucket) in &masters {
        let (keys, secrets) = stored_secrets(&seen, side, master, bucket);
        temp_keys.push(keys);
        accounts.push(secrets);
    }
    // A TEMP key per delegation, created by DMS-1 and lodged with DMS-2; DMS-2's account (its client
    // secret) made by DMS-2 and lodged with DMS-1.
    assert_eq!(
        temp_keys[0].len(),
        sessions.len(),
        "TEMP keys in DMS-1's store"
    );
    assert_eq!(temp_keys[0], temp_keys[1]);
    assert_eq!(accounts[0].len(), sessions.len(), "DMS-2's account secrets");
    assert_eq!(accounts[0], accounts[1]);
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    for (n, key) in temp_keys[0].iter().enumerate() {
        secrets.push((format!("TEMP key {n}"), key.as_bytes().to_vec()));
        secrets.push((
            format!("TEMP key {n} (bytes)"),
            STANDARD.decode(key).unwrap(),
        ));
    }
    for (n, s) in accounts[0].iter().enumerate() {
        secrets.push((format!("DMS-2 account secret {n}"), s.as_bytes().to_vec()));
    }
    for (n, s) in rotated.iter().enumerate() {
        secrets.push((format!("device secret {n}"), s.as_bytes().to_vec()));
    }
    secrets.push((
        "a refused START's client secret".into(),
        REFUSED_SECRET.as_bytes().to_vec(),
    ));
    for i in 0..4 {
        // DMS-1's device credentials as World seeds them.
        secrets.push((
            format!("DMS-1 server secret {i}"),
            format!("dms1-secret-{i}").into_bytes(),
        ));
        secrets.push((
            format!("device {i} client secret"),
            format!("device-secret-{i}").into_bytes(),
        ));
    }
    let mut labels = Vec::new();
    let mut patterns = Vec::new();
    for (label, secret) in &secrets {
        for (k, form) in forms(secret).into_iter().enumerate() {
            assert!(form.len() >= 12, "{label}: too short to search for");
            labels.push(format!("{label}, form {k}"));
            patterns.push(form);
        }
    }
    let search = aho_corasick::AhoCorasick::new(&patterns).unwrap();
    let hits = |text: &[u8]| -> Vec<String> {
        search
            .find_overlapping_iter(text)
            .map(|m| labels[m.pattern().as_usize()].clone())
            .collect()
    };

    // The bus: every subject, header and payload.
    let mut found = Vec::new();
    let mut bus_bytes = 0usize;
    for m in &seen {
        bus_bytes += m.payload.len();
        let mut texts = vec![m.subject.as_bytes(), m.payload.as_slice()];
        for (name, value) in &m.headers {
            texts.push(name.as_bytes());
            texts.push(value.as_bytes());
        }
        for text in texts {
            for label in hits(text) {
                found.push(format!("bus, {}: {label}", m.subject));
            }
        }
    }
    // The logs at trace level.
    let log_text = logs.0.lock().unwrap().clone();
    for label in hits(&log_text) {
        found.push(format!("logs: {label}"));
    }
    // The admin API's answers.
    for answer in &admin_answers {
        for label in hits(answer) {
            found.push(format!("admin API: {label}"));
        }
    }
    let audits = seen
        .iter()
        .filter(|m| m.subject.contains(".audit."))
        .count();
    let kv_puts = seen
        .iter()
        .filter(|m| m.subject.starts_with("$KV."))
        .count();
    // The traffic that carried secrets before they were sealed was there: a lodge per START and per
    // PREPARED, fetches for every send and device plan.
    let on = |name: &str| seen.iter().filter(|m| m.subject.ends_with(name)).count();
    let (lodges, fetches) = (on(".req.auth.lodge"), on(".req.auth.fetch"));
    assert!(lodges >= 2 * sessions.len(), "{lodges} lodge requests");
    // Nothing was lodged for the refused STARTs: none for the unknown SessionID, and DMS-1 got the
    // late START's session's account once (its own START).
    let lodged_sessions: Vec<String> = seen
        .iter()
        .filter(|m| m.subject == "dmd.dms1.v1.req.auth.lodge")
        .map(|m| {
            dm_proto::bus::v1::Lodge::decode(m.payload.as_slice())
                .unwrap()
                .delegation
                .unwrap()
                .session_id
        })
        .collect();
    assert!(!lodged_sessions.iter().any(|s| s == UNKNOWN_SESSION));
    assert_eq!(
        lodged_sessions
            .iter()
            .filter(|s| **s == sessions[1])
            .count(),
        1,
        "{lodged_sessions:?}"
    );
    assert!(fetches >= 4 * sessions.len(), "{fetches} fetch requests");
    println!(
        "searched {} bus messages ({bus_bytes} payload bytes; {kv_puts} key-value writes, {audits} audit \
         records, {lodges} lodge and {fetches} fetch requests), {} bytes of trace logs, {} admin answers \
         for {} secrets in {} forms: {} hits",
        seen.len(),
        log_text.len(),
        admin_answers.len(),
        secrets.len(),
        patterns.len(),
        found.len()
    );
    // Each hit names the secret and the form, never its value.
    assert!(found.is_empty(), "secrets found: {found:#?}");
    // The search itself finds what it looks for.
    let probe = format!("xx{}yy", URL_SAFE_NO_PAD.encode(&secrets[0].1));
    assert!(!hits(probe.as_bytes()).is_empty());
    assert!(audits > 0 && kv_puts > 0);
    let _ = std::fs::remove_dir_all(&dir);
}
