//! The auth service driven through the bus, on the in-process bus and on a real nats-server: identity
//! checks (pin, CA + SAN), lodge and fetch, the service's own DM Account, commands with their outcomes on
//! `evt.auth.*`, redelivery, forget_key and purge. Secrets in the bucket are ciphertext only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use dm_auth::{Config, EVT_KEY_CREATED, EVT_PEER_VERIFIED};
use dm_bus::testing::NatsServer;
use dm_bus::{Area, Bus, BusError, Consumer, ConsumerConfig, Headers, Names};
use dm_proto::bus::v1::{
    CommandEnvelope, DelegationRef, EventEnvelope, Fetch, FetchAnswer, IdentityAnswer,
    IdentityCheck, Lodge, LodgeAnswer, fetch, lodge,
};
use dm_proto::saga::v1::{self as pb, DelType, Role, Work, command, event};
use dm_protocol::dmacc::{APP_ID, AddrType, AppAddr, AppAuth, AuthLevel, DmAccount, Secret};
use dm_protocol::tnds;
use dm_seal::{Direction, field};
use prost::Message as _;

const DEADLINE: Duration = Duration::from_secs(20);
const PIN: &str = "3b1f0d6c2a4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";
const SESSION: &str = "9D2F0F7E-2B8A-4D6E-8A51-2A7E6B0C4D11";
const PEER_SECRET: &str = "peer-client-secret-4711";

fn config(deployment: &str) -> Config {
    Config::from_toml(&format!(
        r#"
deployment = "{deployment}"
server_id = "dms1.example"
dm_address = "http://127.0.0.1:9/dm"
master_key = "{}"
ack_wait_secs = 5

[[peer]]
server_id = "dms2.example"
endpoint = "https://dms2.example/delegation"
spki_sha256 = "{PIN}"
allowed_types = ["Partial", "Final", "Temporary"]
allowed_scopes = ["./Vendor/Acme"]
max_temporary_secs = 86400

[[peer]]
server_id = "dms3.example"
endpoint = "https://dms3.example/delegation"
ca = "partners"
subject_alt_name = "dms3.example"
allowed_types = ["Full"]
allowed_scopes = ["."]
"#,
        B64.encode([42u8; 32])
    ))
    .unwrap()
}

fn master_key() -> dm_auth::MasterKey {
    dm_auth::MasterKey::from_bytes([42u8; 32])
}

/// A secret as the gateway read it from a peer's message, before it is sealed.
enum Clear {
    Account(Vec<u8>),
    Key(String),
}

/// A fetch answer, its secret opened with the bus key.
#[derive(Debug)]
struct Opened {
    found: bool,
    value: Vec<u8>,
    reason: String,
}

fn reference(peer: &str, session: &str) -> DelegationRef {
    let mut d = DelegationRef {
        peer_server_id: peer.into(),
        session_id: session.into(),
        dev_id: "IMEI:490154203237518".into(),
        ..Default::default()
    };
    d.set_role(Role::Delegating);
    d
}

/// A request, retried while auth is not yet serving.
async fn ask<A: prost::Message + Default>(bus: &Bus, subject: &str, payload: Vec<u8>) -> A {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match bus
            .request(
                subject,
                Headers::new(),
                Bytes::from(payload.clone()),
                Duration::from_secs(5),
            )
            .await
        {
            Ok(m) => return A::decode(m.payload).unwrap(),
            Err(BusError::NoResponders(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("request on {subject}: {e}"),
        }
    }
}

struct Client {
    bus: Bus,
    names: Names,
    /// Made once auth is up (it creates the event stream).
    events: Option<Consumer>,
}

impl Client {
    async fn identity(&self, pin: &str, sans: &[&str], ca: &str, server: &str) -> IdentityAnswer {
        let check = IdentityCheck {
            spki_sha256: pin.into(),
            subject_alt_names: sans.iter().map(|s| s.to_string()).collect(),
            issuer_ca: ca.into(),
            dm_server_id: server.into(),
        };
        ask(
            &self.bus,
            &self.names.subject(Area::Req, "auth.identity").unwrap(),
            check.encode_to_vec(),
        )
        .await
    }

    /// Lodges a secret as the orchestrator hands it over: sealed by the gateway with the bus key.
    async fn lodge(&self, d: DelegationRef, secret: Clear) -> LodgeAnswer {
        let key = dm_auth::delegation_key(&d.peer_server_id, &d.session_id);
        let bus_key = master_key().bus_key();
        let seal =
            |name: &str, plain: &[u8]| bus_key.seal(&key, name, Direction::ToAuth, plain).unwrap();
        let secret = match secret {
            Clear::Account(tnds) => {
                lodge::Secret::SealedStartAccount(seal(field::PEER_ACCOUNT, &tnds))
            }
            Clear::Key(text) => {
                lodge::Secret::SealedTempDelegationKey(seal(field::TEMP_KEY, text.as_bytes()))
            }
        };
        self.lodge_sealed(d, secret).await
    }

    async fn lodge_sealed(&self, d: DelegationRef, secret: lodge::Secret) -> LodgeAnswer {
        let l = Lodge {
            delegation: Some(d),
            secret: Some(secret),
        };
        ask(
            &self.bus,
            &self.names.subject(Area::Req, "auth.lodge").unwrap(),
            l.encode_to_vec(),
        )
        .await
    }

    /// Fetches a secret and opens it as the gateway or provisioning does.
    async fn fetch(&self, d: DelegationRef, what: fetch::What) -> Opened {
        let key = dm_auth::delegation_key(&d.peer_server_id, &d.session_id);
        let answer = self.fetch_sealed(d, what).await;
        let name = match what {
            fetch::What::OwnAccount => field::OWN_ACCOUNT,
            fetch::What::PeerAccount => field::PEER_ACCOUNT,
            _ => field::TEMP_KEY,
        };
        let value = if answer.found {
            master_key()
                .bus_key()
                .open(&key, name, Direction::FromAuth, &answer.sealed_value)
                .unwrap()
                .to_vec()
        } else {
            Vec::new()
        };
        Opened {
            found: answer.found,
            value,
            reason: answer.reason,
        }
    }

    async fn fetch_sealed(&self, d: DelegationRef, what: fetch::What) -> FetchAnswer {
        let mut f = Fetch {
            delegation: Some(d),
            ..Default::default()
        };
        f.set_what(what);
        ask(
            &self.bus,
            &self.names.subject(Area::Req, "auth.fetch").unwrap(),
            f.encode_to_vec(),
        )
        .await
    }

    /// Publishes a command as the orchestrator does; `bus_msg_id` differs from the outbox id only to play
    /// a redelivery the stream's dedupe would otherwise drop.
    async fn command(
        &self,
        d: DelegationRef,
        kind: command::Kind,
        outbox_id: &str,
        bus_msg_id: &str,
        t: DelType,
        scope: &[&str],
    ) {
        let verb = match kind {
            command::Kind::VerifyPeer(_) => "verify_peer",
            command::Kind::CreateTempKey(_) => "create_key",
            command::Kind::ForgetTempKey(_) => "forget_key",
            command::Kind::Purge(_) => "purge",
            _ => panic!("not an auth command"),
        };
        let mut env = CommandEnvelope {
            delegation: Some(d),
            command: Some(pb::Command { kind: Some(kind) }),
            scope: scope.iter().map(|s| s.to_string()).collect(),
            outbox_id: outbox_id.into(),
            ..Default::default()
        };
        env.set_del_type(t);
        let mut h = Headers::new();
        h.insert("dmd-type", "dmd.bus.v1.CommandEnvelope");
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        self.bus
            .publish(
                &self
                    .names
                    .subject(Area::Cmd, &format!("auth.{verb}"))
                    .unwrap(),
                h,
                Bytes::from(env.encode_to_vec()),
                bus_msg_id,
            )
            .await
            .unwrap();
    }

    /// The next outcome auth published.
    async fn outcome(&mut self) -> (String, Headers, pb::WorkResult) {
        let events = self.events.as_mut().expect("no observer yet");
        let d = tokio::time::timeout(DEADLINE, events.next())
            .await
            .expect("no outcome in time")
            .unwrap()
            .unwrap();
        let env = EventEnvelope::decode(d.message.payload.clone()).unwrap();
        let (subject, headers) = (d.message.subject.clone(), d.message.headers.clone());
        d.ack().await.unwrap();
        let Some(event::Kind::Work(w)) = env.event.and_then(|e| e.kind) else {
            panic!("not a WorkResult");
        };
        (subject, headers, w)
    }

    /// Waits until `fetch` says the secret is gone.
    async fn until_gone(&self, d: &DelegationRef, what: fetch::What) -> Opened {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let a = self.fetch(d.clone(), what).await;
            if !a.found {
                return a;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what:?} never went away"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn peer_account_tnds() -> Vec<u8> {
    let account = DmAccount {
        app_id: APP_ID.into(),
        server_id: "dms2.example".into(),
        name: None,
        pref_con_ref: None,
        app_addrs: vec![AppAddr {
            key: "1".into(),
            addr: "https://dm.dms2.example/dm".into(),
            addr_type: AddrType::Uri,
            ports: vec![],
        }],
        aauth_pref: None,
        app_auths: vec![AppAuth {
            key: "cli".into(),
            level: AuthLevel::Clcred,
            auth_type: "DIGEST".into(),
            name: Some("IMEI:490154203237518".into()),
            secret: Some(Secret::new(PEER_SECRET)),
            data: Some("bm9uY2U=".into()),
        }],
        ext: None,
    };
    tnds::encode(&account.to_tnds("dms2")).into_bytes()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn auth_over(bus: Bus, deployment: &str) {
    let config = config(deployment);
    let names = config.names.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(dm_auth::run(config, bus.clone(), async {
        let _ = stopped.await;
    }));

    // ---- identity (A.2) ----
    // The first answer also tells that auth is up (its streams exist from then on).
    let mut c = Client {
        bus: bus.clone(),
        names: names.clone(),
        events: None,
    };
    let a = c.identity(PIN, &[], "", "dms2.example").await;
    assert!(a.allowed, "{a:?}");
    let a = c
        .identity(&PIN.to_uppercase(), &[], "", "dms3.example")
        .await;
    assert!(!a.allowed);
    assert!(a.reason.contains("dms3.example"), "{a:?}");
    let a = c
        .identity("", &["dms3.example"], "partners", "dms3.example")
        .await;
    assert!(a.allowed, "{a:?}");
    let a = c
        .identity("", &["dms3.example"], "partners", "dms2.example")
        .await;
    assert!(!a.allowed);
    let a = c
        .identity("", &["dms3.example"], "strangers", "dms3.example")
        .await;
    assert!(!a.allowed && a.reason.contains("no entry"), "{a:?}");

    // ---- lodge and fetch ----
    let d = reference("dms2.example", SESSION);
    let account = peer_account_tnds();
    let a = c.lodge(d.clone(), Clear::Account(account.clone())).await;
    assert!(a.ok, "{a:?}");
    // A retry is fine; a different account for the same delegation is refused.
    assert!(c.lodge(d.clone(), Clear::Account(account.clone())).await.ok);
    let other = String::from_utf8(account.clone())
        .unwrap()
        .replace(PEER_SECRET, "another-secret");
    assert!(
        !c.lodge(d.clone(), Clear::Account(other.into_bytes()))
            .await
            .ok
    );
    // An account of another server, or garbage, is refused.
    let mut of_other = d.clone();
    of_other.peer_server_id = "dms3.example".into();
    assert!(!c.lodge(of_other, Clear::Account(account.clone())).await.ok);
    let f = c.fetch(d.clone(), fetch::What::PeerAccount).await;
    assert!(f.found, "{}", f.reason);
    assert_eq!(f.value, account);
    // On the bus the answer is an envelope: the peer's secret is not in it, in any form.
    let raw = c.fetch_sealed(d.clone(), fetch::What::PeerAccount).await;
    assert!(raw.found && !raw.sealed_value.is_empty());
    let raw_bytes = raw.encode_to_vec();
    for form in [
        PEER_SECRET.as_bytes().to_vec(),
        B64.encode(PEER_SECRET).into_bytes(),
    ] {
        assert!(!raw_bytes.windows(form.len()).any(|w| w == form.as_slice()));
    }
    // An envelope sealed for another delegation, another field or the other direction is refused,
    // and so is one sealed with another master key.
    let key = dm_auth::delegation_key(&d.peer_server_id, &d.session_id);
    let bus_key = master_key().bus_key();
    let mut elsewhere = d.clone();
    elsewhere.session_id = "0b6a7e0c-5d1e-4c41-9b0e-3d3f3c2b1a10".into();
    for (to, sealed) in [
        (
            elsewhere,
            bus_key
                .seal(&key, field::PEER_ACCOUNT, Direction::ToAuth, &account)
                .unwrap(),
        ),
        (
            d.clone(),
            bus_key
                .seal(&key, field::TEMP_KEY, Direction::ToAuth, &account)
                .unwrap(),
        ),
        (d.clone(), raw.sealed_value.clone()),
        (
            d.clone(),
            dm_auth::MasterKey::from_bytes([1; 32])
                .bus_key()
                .seal(&key, field::PEER_ACCOUNT, Direction::ToAuth, &account)
                .unwrap(),
        ),
    ] {
        let refused = c
            .lodge_sealed(to, lodge::Secret::SealedStartAccount(sealed))
            .await;
        assert!(!refused.ok);
        assert!(refused.reason.contains("does not open"), "{refused:?}");
    }
    // The SessionID is case-insensitive.
    let mut lower = d.clone();
    lower.session_id = SESSION.to_lowercase();
    assert_eq!(
        c.fetch(lower, fetch::What::PeerAccount).await.value,
        account
    );
    // The TEMP key of DELEGATION_PREPARED (delegated side).
    let d_prepared = reference("dms2.example", "1c9a6e55-3f0b-4f4e-9d2a-6a1b7c8d9e01");
    let key_text = B64.encode([0x5au8; 32]);
    assert!(
        c.lodge(d_prepared.clone(), Clear::Key(key_text.clone()))
            .await
            .ok
    );
    assert!(
        !c.lodge(d_prepared.clone(), Clear::Key("c2hvcnQ=".into()))
            .await
            .ok
    );
    let f = c.fetch(d_prepared.clone(), fetch::What::TempKey).await;
    assert_eq!(f.value, key_text.as_bytes());
    // This server's own account: built once, with this server's ServerID and a client secret.
    let own = c.fetch(d.clone(), fetch::What::OwnAccount).await;
    assert!(own.found, "{}", own.reason);
    let acc = DmAccount::from_tnds(&tnds::decode(&own.value).unwrap()).unwrap();
    assert_eq!(acc.server_id, "dms1.example");
    assert_eq!(acc.address(), Some("http://127.0.0.1:9/dm"));
    assert!(acc.server_credential().unwrap().secret.is_none());
    let client_secret = acc
        .client_credential()
        .unwrap()
        .secret
        .clone()
        .unwrap()
        .expose()
        .to_string();
    assert_eq!(
        c.fetch(d.clone(), fetch::What::OwnAccount).await.value,
        own.value
    );
    // Unknown things are not found.
    let nobody = reference("dms2.example", "00000000-0000-0000-0000-000000000000");
    assert!(!c.fetch(nobody, fetch::What::TempKey).await.found);

    // ---- commands ----
    c.events = Some(observer(&bus, &names).await);
    let d_key = reference("dms2.example", "5e0c1d2b-8f6a-4c3e-9b7d-1a2b3c4d5e6f");
    let create = command::Kind::CreateTempKey(pb::CreateTempKey {});
    c.command(
        d_key.clone(),
        create.clone(),
        "k:3:0",
        "k:3:0",
        DelType::Partial,
        &["./Vendor/Acme/Apps"],
    )
    .await;
    let (subject, headers, w) = c.outcome().await;
    assert_eq!(subject, names.subject(Area::Evt, EVT_KEY_CREATED).unwrap());
    assert_eq!(headers.get("dmd-type"), Some("dmd.bus.v1.EventEnvelope"));
    assert_eq!(
        headers.get("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(w.work(), Work::CreateKey);
    assert!(w.ok, "{w:?}");
    let first = c.fetch(d_key.clone(), fetch::What::TempKey).await;
    assert!(first.found, "{}", first.reason);
    let decoded = B64.decode(&first.value).unwrap();
    assert_eq!(decoded.len(), 32);
    assert_eq!(B64.encode(&decoded).as_bytes(), first.value);

    // The same command delivered again (same outbox id) keeps the key. verify_peer commands after it
    // tell when it was handled (one consumer, in order).
    c.command(
        d_key.clone(),
        create.clone(),
        "k:3:0",
        "k:3:0:again",
        DelType::Partial,
        &["./Vendor/Acme/Apps"],
    )
    .await;
    let verify = command::Kind::VerifyPeer(pb::VerifyPeer {});
    c.command(
        d_key.clone(),
        verify.clone(),
        "k:4:0",
        "k:4:0",
        DelType::Partial,
        &["./Vendor/Acme/Apps"],
    )
    .await;
    let (subject, _, w) = c.outcome().await;
    assert_eq!(
        subject,
        names.subject(Area::Evt, EVT_PEER_VERIFIED).unwrap()
    );
    assert_eq!(w.work(), Work::VerifyPeer);
    assert!(w.ok, "{w:?}");
    assert_eq!(
        c.fetch(d_key.clone(), fetch::What::TempKey).await.value,
        first.value
    );
    // verify_peer: outside the policy (403), not in the registry (401).
    c.command(
        d_key.clone(),
        verify.clone(),
        "k:5:0",
        "k:5:0",
        DelType::Full,
        &["."],
    )
    .await;
    let (_, _, w) = c.outcome().await;
    assert!(!w.ok);
    assert_eq!(w.status_code, 403, "{w:?}");
    c.command(
        reference("dms9.example", SESSION),
        verify.clone(),
        "x:1:0",
        "x:1:0",
        DelType::Partial,
        &["./Vendor/Acme"],
    )
    .await;
    let (_, _, w) = c.outcome().await;
    assert!(!w.ok);
    assert_eq!(w.status_code, 401, "{w:?}");
    assert!(w.reason.contains("dms9.example"), "{w:?}");

    // forget_key: the key goes away.
    c.command(
        d_key.clone(),
        command::Kind::ForgetTempKey(pb::ForgetTempKey {}),
        "k:6:0",
        "k:6:0",
        DelType::Partial,
        &["./Vendor/Acme/Apps"],
    )
    .await;
    let gone = c.until_gone(&d_key, fetch::What::TempKey).await;
    assert!(gone.value.is_empty(), "{}", gone.reason);

    // ---- the bucket holds ciphertext only ----
    let kv = bus.kv(&names.bucket("secrets").unwrap(), 1).await.unwrap();
    let keys = kv.keys().await.unwrap();
    assert!(keys.len() >= 3, "{keys:?}");
    for k in &keys {
        let v = kv.get(k).await.unwrap().unwrap().value;
        for plain in [
            PEER_SECRET.as_bytes(),
            key_text.as_bytes(),
            client_secret.as_bytes(),
            first.value.as_slice(),
            b"MgmtTree".as_slice(),
        ] {
            assert!(!contains(&v, plain), "plaintext in the bucket under {k}");
        }
    }

    // ---- purge: every secret of the delegation is gone, and stays gone ----
    c.command(
        d.clone(),
        create.clone(),
        "p:7:0",
        "p:7:0",
        DelType::Partial,
        &["./Vendor/Acme/Apps"],
    )
    .await;
    assert!(c.outcome().await.2.ok);
    assert!(c.fetch(d.clone(), fetch::What::TempKey).await.found);
    c.command(
        d.clone(),
        command::Kind::Purge(pb::Purge {}),
        "p:8:0",
        "p:8:0",
        DelType::Partial,
        &["./Vendor/Acme/Apps"],
    )
    .await;
    let gone = c.until_gone(&d, fetch::What::PeerAccount).await;
    assert!(gone.reason.contains("purged"), "{gone:?}");
    for what in [fetch::What::TempKey, fetch::What::OwnAccount] {
        assert!(!c.fetch(d.clone(), what).await.found);
    }
    // A late retry of DELEGATION_START is taken but nothing is kept.
    let late = c.lodge(d.clone(), Clear::Account(account.clone())).await;
    assert!(late.ok && !late.reason.is_empty(), "{late:?}");
    assert!(!c.fetch(d.clone(), fetch::What::PeerAccount).await.found);

    // ---- shutdown ----
    stop.send(()).unwrap();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("auth did not stop")
        .unwrap()
        .unwrap();
}

/// A consumer of every event of the deployment (auth is the only publisher here).
async fn observer(bus: &Bus, names: &Names) -> Consumer {
    bus.consumer(&ConsumerConfig {
        stream: names.stream(Area::Evt),
        durable: names.consumer("observer").unwrap(),
        filter: names.area_wildcard(Area::Evt),
        ack_wait: Duration::from_secs(5),
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_serves_on_the_in_process_bus() {
    auth_over(Bus::in_process(), "dms1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_serves_on_nats() {
    let server = NatsServer::start().unwrap();
    auth_over(Bus::connect(server.url()).await.unwrap(), "dms1").await;
}
