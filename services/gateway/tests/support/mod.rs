//! Test support: certificates made at test time (rcgen), a private directory for their PEM files, an
//! HTTPS client with or without a client certificate, and stand-ins on the bus for auth and the
//! orchestrator of a deployment.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dm_bus::{Area, Bus, Headers, Names};
use dm_gateway::{Config, Peer, Timeouts, TlsFiles, Trust, TrustedCa};
use dm_proto::bus::v1::{
    Fetch, FetchAnswer, IdentityAnswer, IdentityCheck, InboundAnswer, InboundPeerMessage, Lodge,
    LodgeAnswer, fetch, lodge,
};
use dm_saga::pb;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prost::Message as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub const DEADLINE: Duration = Duration::from_secs(20);

/// The bus key of the tests' deployments (from a fixed master key).
pub fn bus_key() -> dm_seal::BusKey {
    dm_seal::MasterKey::from_bytes([9; 32]).bus_key()
}

/// A lodged secret opened as auth opens it: the secret's field and its clear bytes.
pub fn opened(l: &Lodge) -> (&'static str, Vec<u8>) {
    let d = l.delegation.clone().unwrap_or_default();
    let key = dm_bus::subjects::delegation_key(&d.peer_server_id, &d.session_id);
    let (field, sealed) = match l.secret.as_ref().unwrap() {
        lodge::Secret::SealedStartAccount(b) => (dm_seal::field::PEER_ACCOUNT, b),
        lodge::Secret::SealedTempDelegationKey(b) => (dm_seal::field::TEMP_KEY, b),
    };
    let plain = bus_key()
        .open(&key, field, dm_seal::Direction::ToAuth, sealed)
        .unwrap();
    (field, plain.to_vec())
}
pub const CONTENT_TYPE: &str = "application/vnd.dm.delegation+xml";

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "dm-gateway-test-{}-{nanos}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA that issues certificates.
pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for both TLS roles, with DNS/IP SANs and one URI SAN.
    pub fn leaf(&self, cn: &str, sans: &[&str], uri: Option<&str>) -> Leaf {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// A self-signed leaf (trusted by its pin only).
pub fn self_signed(cn: &str) -> Leaf {
    let mut params = CertificateParams::new(vec![cn.to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Leaf {
    pub fn pin(&self) -> String {
        dm_gateway::spki_sha256_hex(&self.der).unwrap()
    }
}

/// The PKI of a test: one partner CA for the gateways and known peers, a rogue CA nobody trusts, and a
/// pinned self-signed client.
pub struct Pki {
    pub dir: TempDir,
    pub ca: Ca,
    pub ca_file: PathBuf,
    pub rogue: Ca,
    pub dms1: Leaf,
    pub dms2: Leaf,
    pub dms3: Leaf,
    pub pinned: Leaf,
    pub intruder: Leaf,
}

impl Pki {
    pub fn new() -> Self {
        let dir = TempDir::new();
        let ca = Ca::new("Partners CA");
        let ca_file = dir.write("partners-ca.pem", &ca.pem());
        let rogue = Ca::new("Rogue CA");
        let sans = |id: &'static str| vec!["127.0.0.1", "localhost", id];
        let dms1 = ca.leaf("dms1", &sans("dms1.example"), Some("urn:dmd:dms1"));
        let dms2 = ca.leaf("dms2", &sans("dms2.example"), Some("urn:dmd:dms2"));
        let dms3 = ca.leaf("dms3", &sans("dms3.example"), None);
        let intruder = rogue.leaf("dms1", &sans("dms1.example"), None);
        let pinned = self_signed("pinned.example");
        Self {
            dir,
            ca,
            ca_file,
            rogue,
            dms1,
            dms2,
            dms3,
            pinned,
            intruder,
        }
    }

    /// A gateway configuration for `server_id` with the partner CA and the pinned certificate trusted.
    pub fn config(
        &self,
        deployment: &str,
        server_id: &str,
        leaf: &Leaf,
        peers: Vec<Peer>,
    ) -> Config {
        let cert = self.dir.write(&format!("{deployment}.crt"), &leaf.cert_pem);
        let key = self.dir.write(&format!("{deployment}.key"), &leaf.key_pem);
        Config {
            deployment: deployment.into(),
            server_id: server_id.into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            path: "/delegation".into(),
            max_body_bytes: 64 * 1024,
            timestamp_window: Some(dm_gateway::DEFAULT_TIMESTAMP_WINDOW),
            tls: TlsFiles { cert, key },
            trust: Trust {
                cas: vec![TrustedCa {
                    name: Some("partners".into()),
                    pem: self.ca_file.clone(),
                }],
                pins: vec![self.pinned.pin()],
            },
            peers,
            timeouts: Timeouts {
                auth: Duration::from_secs(2),
                orchestrator: Duration::from_secs(2),
                send_deadline: Duration::from_secs(15),
                retry_min: Duration::from_millis(20),
                retry_max: Duration::from_millis(200),
                ack_wait: Duration::from_secs(30),
                drain: Duration::from_secs(1),
                ..Timeouts::default()
            },
            bus_key: Some(bus_key()),
        }
    }

    pub fn peer(&self, server_id: &str, addr: SocketAddr) -> Peer {
        Peer {
            server_id: server_id.into(),
            endpoint: format!("https://{addr}/delegation"),
            ca: self.ca_file.clone(),
            limits: dm_gateway::PeerLimits::default(),
        }
    }
}

/// An HTTPS client presenting `leaf` (or no certificate), trusting the partner CA for the server.
pub struct Client {
    config: Arc<rustls::ClientConfig>,
}

impl Client {
    pub fn new(pki: &Pki, leaf: Option<&Leaf>) -> Self {
        dm_gateway::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca.pem().as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = match leaf {
            Some(leaf) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Self {
            config: Arc::new(config),
        }
    }

    /// One request on a fresh connection: `(status, body)`, or why there is no answer.
    pub async fn send(
        &self,
        addr: SocketAddr,
        method: &str,
        content_type: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Result<(u16, Bytes), String> {
        self.exchange(addr, method, content_type, body)
            .await
            .map(|(status, _, body)| (status, body))
    }

    /// One POST of a delegation message: `(status, headers, body)`.
    pub async fn post_full(
        &self,
        addr: SocketAddr,
        body: impl Into<Bytes>,
    ) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
        self.exchange(addr, "POST", Some(CONTENT_TYPE), body).await
    }

    async fn exchange(
        &self,
        addr: SocketAddr,
        method: &str,
        content_type: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = connector
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("http: {e}"))?;
        let driver = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("https://{addr}/delegation"))
            .header("host", addr.to_string());
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let result = async {
            let response = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok((status, headers, body))
        }
        .await;
        driver.abort();
        result
    }

    /// Writes `request` as it is (after the handshake) and reads the answer until the server closes.
    pub async fn raw(&self, addr: SocketAddr, request: &[u8]) -> Result<String, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let mut tls = connector
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        tls.flush().await.map_err(|e| format!("flush: {e}"))?;
        let mut answer = Vec::new();
        tokio::time::timeout(DEADLINE, tls.read_to_end(&mut answer))
            .await
            .map_err(|_| "no end of the answer".to_string())?
            .map_err(|e| format!("read: {e}"))?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    pub async fn post(
        &self,
        addr: SocketAddr,
        body: impl Into<Bytes>,
    ) -> Result<(u16, Bytes), String> {
        self.send(addr, "POST", Some(CONTENT_TYPE), body).await
    }
}

/// The `<DelegationError>` of an answer body.
pub fn error_of(body: &[u8]) -> dm_protocol::delegation::DelegationError {
    dm_protocol::delegation::decode_error(body).unwrap_or_else(|e| {
        panic!(
            "not a DelegationError ({e}): {}",
            String::from_utf8_lossy(body)
        )
    })
}

// ---- a relay that counts connections ------------------------------------------------------------------

/// A TCP relay in front of a gateway: every connection it accepts is relayed on one connection of its own
/// to the upstream, so it counts the connections the gateway behind it accepts. It can cut every open
/// connection at once (a peer that went away) and be pointed at another upstream (the peer restarted).
pub struct Relay {
    pub addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    open: Arc<std::sync::atomic::AtomicUsize>,
    upstream: Arc<Mutex<SocketAddr>>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let upstream = Arc::new(Mutex::new(upstream));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let task = {
            let (accepted, open, upstream, cut) = (
                accepted.clone(),
                open.clone(),
                upstream.clone(),
                cut.clone(),
            );
            tokio::spawn(async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    accepted.fetch_add(1, SeqCst);
                    open.fetch_add(1, SeqCst);
                    let to = *upstream.lock().unwrap();
                    let mut cut = cut.subscribe();
                    let open = open.clone();
                    tokio::spawn(async move {
                        if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                                _ = cut.changed() => {}
                            }
                        }
                        // Both ends closed before the count says so.
                        drop(down);
                        open.fetch_sub(1, SeqCst);
                    });
                }
            })
        };
        Self {
            addr,
            accepted,
            open,
            upstream,
            cut,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// New connections go to `addr`.
    pub fn point_at(&self, addr: SocketAddr) {
        *self.upstream.lock().unwrap() = addr;
    }

    /// Closes every open connection, both ends.
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- stand-ins on the bus --------------------------------------------------------------------------

/// What auth's stand-in saw, and what it hands out.
#[derive(Default)]
pub struct AuthState {
    /// SPKI SHA-256 → the ServerID that certificate may speak as.
    pub registry: HashMap<String, String>,
    pub checks: Vec<IdentityCheck>,
    pub lodged: Vec<Lodge>,
    /// (session, what) → value, for fetch.
    pub secrets: HashMap<(String, i32), Vec<u8>>,
    pub fetches: Vec<Fetch>,
}

pub type Shared<T> = Arc<Mutex<T>>;

/// Auth's stand-in: identity by pin, lodge into memory, fetch from memory.
pub async fn stand_in_auth(bus: &Bus, names: &Names, state: Shared<AuthState>) {
    let group = names.queue_group("auth").unwrap();
    let mut identity = bus
        .serve(&names.subject(Area::Req, "auth.identity").unwrap(), &group)
        .await
        .unwrap();
    let mut lodge = bus
        .serve(&names.subject(Area::Req, "auth.lodge").unwrap(), &group)
        .await
        .unwrap();
    let mut fetch_requests = bus
        .serve(&names.subject(Area::Req, "auth.fetch").unwrap(), &group)
        .await
        .unwrap();
    let s = state.clone();
    tokio::spawn(async move {
        while let Some(r) = identity.next().await {
            let check = IdentityCheck::decode(r.message.payload.clone()).unwrap();
            let allowed = {
                let mut st = s.lock().unwrap();
                st.checks.push(check.clone());
                st.registry.get(&check.spki_sha256) == Some(&check.dm_server_id)
            };
            let answer = IdentityAnswer {
                allowed,
                reason: if allowed {
                    String::new()
                } else {
                    format!("certificate is not registered for '{}'", check.dm_server_id)
                },
            };
            let _ = r
                .respond(Headers::new(), Bytes::from(answer.encode_to_vec()))
                .await;
        }
    });
    let s = state.clone();
    tokio::spawn(async move {
        while let Some(r) = lodge.next().await {
            let l = Lodge::decode(r.message.payload.clone()).unwrap();
            s.lock().unwrap().lodged.push(l);
            let answer = LodgeAnswer {
                ok: true,
                reason: String::new(),
            };
            let _ = r
                .respond(Headers::new(), Bytes::from(answer.encode_to_vec()))
                .await;
        }
    });
    let s = state;
    tokio::spawn(async move {
        while let Some(r) = fetch_requests.next().await {
            let f = Fetch::decode(r.message.payload.clone()).unwrap();
            let d = f.delegation.clone().unwrap_or_default();
            let value = {
                let mut st = s.lock().unwrap();
                st.fetches.push(f.clone());
                st.secrets.get(&(d.session_id.clone(), f.what)).cloned()
            };
            // Sealed as auth seals what it hands out.
            let field = match f.what() {
                fetch::What::OwnAccount => dm_seal::field::OWN_ACCOUNT,
                fetch::What::PeerAccount => dm_seal::field::PEER_ACCOUNT,
                _ => dm_seal::field::TEMP_KEY,
            };
            let key = dm_bus::subjects::delegation_key(&d.peer_server_id, &d.session_id);
            let answer = FetchAnswer {
                found: value.is_some(),
                sealed_value: value
                    .map(|v| {
                        bus_key()
                            .seal(&key, field, dm_seal::Direction::FromAuth, &v)
                            .unwrap()
                    })
                    .unwrap_or_default(),
                reason: String::new(),
            };
            let _ = r
                .respond(Headers::new(), Bytes::from(answer.encode_to_vec()))
                .await;
        }
    });
}

pub fn what(w: fetch::What) -> i32 {
    w as i32
}

/// What the orchestrator's stand-in saw.
#[derive(Default)]
pub struct OrchestratorState {
    /// Raw payloads as they travelled on the bus.
    pub payloads: Vec<Bytes>,
    pub messages: Vec<pb::PeerMessage>,
    /// (sender, session) known.
    pub delegations: HashSet<(String, String)>,
    /// (sender, msg_id) → answer given.
    pub answers: HashMap<(String, String), u32>,
    /// Answer 503 to this many requests first (the system is busy).
    pub busy: u32,
    /// Never answer (to test the gateway's timeout).
    pub silent: bool,
}

/// The orchestrator's stand-in: a small model of A.2 items 5-8 (dedupe, a stale message's 400, 404, 409, 202). Like the real
/// one, it hands a message's sealed secret to auth only when it accepts the message.
pub async fn stand_in_orchestrator(bus: &Bus, names: &Names, state: Shared<OrchestratorState>) {
    let lodge_subject = names.subject(Area::Req, "auth.lodge").unwrap();
    let bus = bus.clone();
    let mut requests = bus
        .serve(
            &names.subject(Area::Req, "orchestrator.peer").unwrap(),
            &names.queue_group("orchestrator").unwrap(),
        )
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(r) = requests.next().await {
            let inbound = InboundPeerMessage::decode(r.message.payload.clone()).unwrap();
            let m = inbound.message.unwrap();
            let mut accepted_lodge = None;
            let answer = {
                let mut st = state.lock().unwrap();
                st.payloads.push(r.message.payload.clone());
                st.messages.push(m.clone());
                if st.silent {
                    None
                } else if st.busy > 0 {
                    st.busy -= 1;
                    Some((503, "busy".to_string()))
                } else if let Some(first) = st.answers.get(&(m.sender.clone(), m.msg_id.clone())) {
                    Some((*first, String::new()))
                } else if !m.stale.is_empty() {
                    // Outside the gateway's Timestamp window and not a copy of a message seen.
                    Some((400, m.stale.clone()))
                } else {
                    let key = (m.sender.clone(), m.session_id.clone());
                    let (status, reason) = match m.body {
                        Some(pb::peer_message::Body::Notif(_)) if st.delegations.contains(&key) => {
                            (409, "a delegation with this SessionID exists".to_string())
                        }
                        Some(pb::peer_message::Body::Notif(_)) => {
                            st.delegations.insert(key);
                            (202, String::new())
                        }
                        _ if !st.delegations.contains(&key) => {
                            (404, "unknown SessionID".to_string())
                        }
                        _ => (202, String::new()),
                    };
                    if status == 202 {
                        accepted_lodge = inbound.lodge.clone();
                    }
                    st.answers
                        .insert((m.sender.clone(), m.msg_id.clone()), status);
                    Some((status, reason))
                }
            };
            if let Some(l) = accepted_lodge {
                let lodged = bus
                    .request(
                        &lodge_subject,
                        Headers::new(),
                        Bytes::from(l.encode_to_vec()),
                        Duration::from_secs(2),
                    )
                    .await
                    .ok()
                    .and_then(|a| LodgeAnswer::decode(a.payload).ok());
                assert!(
                    lodged.is_some_and(|a| a.ok),
                    "auth's stand-in kept the secret"
                );
            }
            match answer {
                Some((http_status, reason)) => {
                    let a = InboundAnswer {
                        http_status,
                        reason,
                    };
                    let _ = r
                        .respond(Headers::new(), Bytes::from(a.encode_to_vec()))
                        .await;
                }
                None => held.push(r),
            }
        }
    });
}

/// Waits until `check` holds, or fails the test after [`DEADLINE`].
pub async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- messages ----------------------------------------------------------------------------------------

pub const SESSION: &str = "9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11";

/// The `n`th of a series of sessions (SESSION's form).
pub fn session(n: u64) -> String {
    format!("9d2f0f7e-2b8a-4d6e-8a51-{n:012x}")
}

pub fn msg_id(n: u64) -> String {
    dm_saga::message_id(SESSION, pb::Role::Delegating, n)
}

/// This machine's clock as a message `Timestamp`.
pub fn now_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    dm_protocol::types::UtcTime::from_unix(i64::try_from(secs).unwrap()).to_string()
}

/// A message sent now.
fn envelope(msg_id: &str, session: &str, sender: &str, body: &str) -> String {
    envelope_at(msg_id, session, sender, &now_stamp(), body)
}

/// A message stamped `timestamp`.
pub fn envelope_at(
    msg_id: &str,
    session: &str,
    sender: &str,
    timestamp: &str,
    body: &str,
) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<DelegationMessage xmlns="urn:oma:xml:dm:delegation:1.0" Version="1.0">
  <MsgID>{msg_id}</MsgID>
  <SessionID>{session}</SessionID>
  <DMServerID>{sender}</DMServerID>
  <Timestamp>{timestamp}</Timestamp>
  {body}
</DelegationMessage>"#
    )
}

pub fn notif(msg_id: &str, session: &str, sender: &str) -> String {
    envelope(
        msg_id,
        session,
        sender,
        r#"<DELEGATION_NOTIF>
    <Del_Type>Partial</Del_Type>
    <Del_Info>
      <SenderRole>Delegating</SenderRole>
      <Client><DevID>IMEI:490154203237518</DevID><Man>Acme</Man></Client>
      <Scope><URI>./Vendor/Acme/Apps</URI></Scope>
    </Del_Info>
  </DELEGATION_NOTIF>"#,
    )
}

pub fn confirm(msg_id: &str, session: &str, sender: &str) -> String {
    envelope(
        msg_id,
        session,
        sender,
        "<DELEGATION_CONFIRM><SessionEstablished>2026-11-21T22:40:12.250Z</SessionEstablished></DELEGATION_CONFIRM>",
    )
}

/// The account secret inside [`account_tnds`].
pub const ACCOUNT_SECRET: &str = "c2VjcmV0LWNsaWVudC1wYXNzd29yZC0xMjM0";

/// A DM Account for `server_id`, as TNDS, with a client secret.
pub fn account_tnds(server_id: &str) -> String {
    format!(
        r#"<MgmtTree xmlns="syncml:dmddf1.2">
  <VerDTD>1.2</VerDTD>
  <Node>
    <NodeName>acc</NodeName>
    <Path>./DMAcc</Path>
    <Node><NodeName>AppID</NodeName><Value>w7</Value></Node>
    <Node><NodeName>ServerID</NodeName><Value>{server_id}</Value></Node>
    <Node>
      <NodeName>AppAddr</NodeName>
      <Node>
        <NodeName>srv</NodeName>
        <Node><NodeName>Addr</NodeName><Value>https://dm.example/dm</Value></Node>
        <Node><NodeName>AddrType</NodeName><Value>URI</Value></Node>
      </Node>
    </Node>
    <Node>
      <NodeName>AppAuth</NodeName>
      <Node>
        <NodeName>clcred</NodeName>
        <Node><NodeName>AAuthLevel</NodeName><Value>CLCRED</Value></Node>
        <Node><NodeName>AAuthType</NodeName><Value>DIGEST</Value></Node>
        <Node><NodeName>AAuthName</NodeName><Value>IMEI:490154203237518</Value></Node>
        <Node><NodeName>AAuthSecret</NodeName><Value>{ACCOUNT_SECRET}</Value></Node>
      </Node>
    </Node>
  </Node>
</MgmtTree>"#
    )
}

pub fn start(msg_id: &str, session: &str, sender: &str) -> String {
    envelope(
        msg_id,
        session,
        sender,
        &format!(
            "<DELEGATION_START><DMAcc>{}</DMAcc></DELEGATION_START>",
            account_tnds(sender)
        ),
    )
}

/// A TEMP_DELEGATION_KEY (base64 of 32 bytes) that is easy to spot.
pub const TEMP_KEY: &str = "c3VwZXItc2VjcmV0LXRlbXAta2V5LTMyLWJ5dGVzISE=";

pub fn prepared(msg_id: &str, session: &str, sender: &str) -> String {
    envelope(
        msg_id,
        session,
        sender,
        &format!(
            r#"<DELEGATION_PREPARED>
    <Del_Type>Partial</Del_Type>
    <AccountURI>./DMAcc/dms2</AccountURI>
    <TEMP_DELEGATION_KEY>{TEMP_KEY}</TEMP_DELEGATION_KEY>
    <ServerCred><AAuthName>dms2.example</AAuthName><AAuthType>DIGEST</AAuthType><Nonce>bm9uY2U=</Nonce></ServerCred>
    <ACLResults><ACL><URI>./Vendor/Acme/Apps</URI><Value>Add=dms2.example&amp;Get=dms2.example+dms1.example</Value></ACL></ACLResults>
  </DELEGATION_PREPARED>"#
        ),
    )
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
