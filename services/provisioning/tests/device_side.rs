//! Steps 4-5 and 7-8 over real HTTP on loopback: two provisioning services (DMS-1 and DMS-2), the package
//! #0 channel, and the simulated DM 1.2 client fleet. Every wait is on an outcome, with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dm_client::{DefaultAccount, Device, Fleet, SessionConfig};
use dm_notification::{ChannelError, HttpPushChannel, Package0Channel, ServerCredential};
use dm_protocol::auth;
use dm_protocol::codes::{AlertCode, StatusCode};
use dm_protocol::delegation::{self, DelType};
use dm_protocol::dmacc::{DmAccount, Secret};
use dm_protocol::syncml::{
    self, Alert, Command, Item, ItemCommand, Location, Meta, SyncBody, SyncHdr, SyncMl,
};
use dm_protocol::tnds;
use dm_protocol::tree::DmTree;
use dm_protocol::types::{DmUri, UtcTime};
use dm_provisioning::{
    Config, DeviceCredentials, Job, JobFailure, JobOutcome, JobSuccess, Provisioning, Rotation,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedReceiver;

const D1: &str = "dms1.operator.example";
const D2: &str = "dms2.enterprise.example";
const DEV: &str = "IMEI:490154203237518";
const DEADLINE: Duration = Duration::from_secs(20);

struct Server {
    prov: Provisioning,
    outcomes: UnboundedReceiver<JobOutcome>,
}

impl Server {
    async fn start(server_id: &str, fleet_url: &str) -> Self {
        let channel: Arc<dyn Package0Channel> = Arc::new(HttpPushChannel::new(fleet_url));
        Self::with_channel(server_id, channel, dm_provisioning::DEFAULT_SESSION_TIMEOUT).await
    }

    async fn with_channel(
        server_id: &str,
        channel: Arc<dyn Package0Channel>,
        session_timeout: Duration,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/dm", listener.local_addr().unwrap());
        let mut config = Config::new(server_id, url);
        config.session_timeout = session_timeout;
        let (prov, outcomes) = Provisioning::new(config, channel);
        tokio::spawn(prov.clone().serve(listener, std::future::pending()));
        Self { prov, outcomes }
    }

    /// The next outcome, within the deadline.
    async fn outcome(&mut self) -> JobOutcome {
        tokio::time::timeout(DEADLINE, self.outcomes.recv())
            .await
            .expect("an outcome in time")
            .expect("outcome channel open")
    }

    fn url(&self) -> String {
        self.prov.config().public_url.clone()
    }

    /// Queues a job and waits for its outcome.
    async fn run(&mut self, job: Job) -> Result<JobSuccess, JobFailure> {
        let id = self.prov.enqueue(DEV, job).await.unwrap();
        loop {
            let outcome = tokio::time::timeout(DEADLINE, self.outcomes.recv())
                .await
                .expect("the job's outcome in time")
                .expect("outcome channel open");
            if outcome.job_id == id {
                return outcome.result;
            }
        }
    }

    async fn commands(&mut self, commands: Vec<Command>) -> Vec<(String, u16)> {
        match self.run(Job::Commands(commands)).await {
            Ok(JobSuccess::Commands { statuses, .. }) => statuses,
            other => panic!("commands job: {other:?}"),
        }
    }
}

struct World {
    fleet: Fleet,
    fleet_url: String,
    dms1: Server,
    dms2: Server,
}

fn dms1_account(addr: &str) -> DefaultAccount {
    DefaultAccount {
        server_id: D1.into(),
        addr: addr.into(),
        server_secret: "dms1-server-secret".into(),
        server_nonce_b64: auth::encode_nonce(b"dms1-server-nonce"),
        client_name: DEV.into(),
        client_secret: "device-secret-for-dms1".into(),
        client_nonce_b64: auth::encode_nonce(b"dms1-client-nonce"),
    }
}

impl World {
    async fn start() -> Self {
        Self::with_fleet(Fleet::new()).await
    }

    async fn with_fleet(fleet: Fleet) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fleet_url = format!("http://{}", listener.local_addr().unwrap());
        let serving = fleet.clone();
        tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
        let dms1 = Server::start(D1, &fleet_url).await;
        let dms2 = Server::start(D2, &fleet_url).await;
        let account = dms1_account(&dms1.url());
        let device = Device::with_default_tree(DEV, &account).unwrap();
        assert!(fleet.insert(device));
        dms1.prov.register_device(
            DEV,
            DeviceCredentials {
                server_secret: account.server_secret.clone(),
                server_nonce_b64: account.server_nonce_b64.clone(),
                client_name: account.client_name.clone(),
                client_secret: account.client_secret.clone(),
                client_nonce_b64: account.client_nonce_b64.clone(),
                ..Default::default()
            },
        );
        Self {
            fleet,
            fleet_url,
            dms1,
            dms2,
        }
    }

    fn export(&self) -> tnds::MgmtTree {
        self.fleet.export(DEV).unwrap()
    }

    /// DMS-2's DM Account as DELEGATION_START carries it (examples/start.xml, pointed at this DMS-2).
    fn dms2_account(&self) -> DmAccount {
        let xml = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/start.xml"
        ))
        .unwrap();
        let delegation::Body::Start(start) = delegation::decode(&xml).unwrap().body else {
            panic!("examples/start.xml is a DELEGATION_START");
        };
        let mut account = DmAccount::from_tnds(&start.dm_acc).unwrap();
        account.app_addrs[0].addr = self.dms2.url();
        account.app_addrs[0].ports.clear();
        account
    }

    fn request(&self, del_type: DelType, scope: &[&str]) -> dm_provisioning::PlanRequest {
        dm_provisioning::PlanRequest {
            account_key: "dms2".into(),
            account: self.dms2_account(),
            delegating: D1.into(),
            delegated: D2.into(),
            del_type,
            scope: scope.iter().map(|s| s.parse().unwrap()).collect(),
            not_after: (del_type == DelType::Temporary)
                .then(|| "2030-01-01T00:00:00Z".parse::<UtcTime>().unwrap()),
            temp_key_b64: Secret::new(TEMP_KEY),
        }
    }

    /// Steps 4-5, then DMS-2 learns what DELEGATION_PREPARED tells it, then steps 7-8.
    async fn delegate(&mut self, del_type: DelType, scope: &[&str]) -> String {
        let request = self.request(del_type, scope);
        let applied = self
            .dms1
            .run(Job::Apply {
                plan_id: "delegation-1".into(),
                request: Box::new(request),
            })
            .await
            .expect("the plan applies");
        let JobSuccess::Applied {
            account_uri,
            server_nonce_b64,
            ..
        } = applied
        else {
            panic!("not an apply outcome: {applied:?}")
        };
        let account = self.dms2_account();
        let client = account.client_credential().unwrap();
        self.dms2.prov.register_device(
            DEV,
            DeviceCredentials {
                server_secret: TEMP_KEY.into(),
                server_nonce_b64: server_nonce_b64.clone(),
                client_name: client.name.clone().unwrap(),
                client_secret: client.secret.as_ref().unwrap().expose().to_string(),
                client_nonce_b64: client.data.clone().unwrap(),
                ..Default::default()
            },
        );
        account_uri
    }

    async fn first_session(&mut self, account_uri: &str) {
        let rotated = self
            .dms2
            .run(Job::FirstSession(Rotation {
                account_uri: account_uri.into(),
                server_cred_key: "srvcred".into(),
                client_cred_key: "clcred".into(),
            }))
            .await;
        assert_eq!(rotated, Ok(JobSuccess::Rotated));
    }

    async fn push(
        &self,
        server_id: &str,
        secret: &str,
        nonce_b64: &str,
        tamper: bool,
    ) -> Result<(), ChannelError> {
        let cred = ServerCredential {
            name: server_id.into(),
            secret: secret.into(),
            nonce: auth::decode_nonce(nonce_b64).unwrap(),
        };
        let mut bytes = dm_notification::build(server_id, 0x0102, &cred).unwrap();
        if tamper {
            bytes[3] ^= 0x01;
        }
        HttpPushChannel::new(&self.fleet_url)
            .deliver(DEV, bytes)
            .await
    }
}

const TEMP_KEY: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";

fn replace(uri: &str, value: &str) -> Command {
    Command::Replace(ItemCommand::new(
        "0",
        vec![Item::target(uri).with_data(value)],
    ))
}

fn add_leaf(uri: &str, value: &str) -> Command {
    Command::Add(ItemCommand::new(
        "0",
        vec![
            Item::target(uri)
                .with_meta(Meta {
                    format: Some("chr".into()),
                    ..Meta::default()
                })
                .with_data(value),
        ],
    ))
}

fn delete(uri: &str) -> Command {
    Command::Delete(ItemCommand::new("0", vec![Item::target(uri)]))
}

fn codes(statuses: &[(String, u16)]) -> Vec<u16> {
    statuses.iter().map(|(_, c)| *c).collect()
}

/// The export as text with the nonces of the accounts that existed before blanked (B.7), and without
/// the subtrees given: what must not change.
fn comparable(tree: &tnds::MgmtTree, without: &[&str]) -> String {
    let mut t = DmTree::from_tnds(tree).unwrap();
    for uri in without {
        let uri: DmUri = uri.parse().unwrap();
        if t.get(&uri).is_ok() {
            t.delete(&uri).unwrap();
        }
    }
    for cred in ["SRVCRED", "CLCRED"] {
        let key = dms1_account("").account_key();
        let nonce: DmUri = format!("./DMAcc/{key}/AppAuth/{cred}/AAuthData")
            .parse()
            .unwrap();
        if t.get(&nonce).is_ok() {
            t.replace_value(&nonce, "").unwrap();
        }
    }
    tnds::encode(&t.to_tnds())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_type_moves_authority_and_restore_puts_the_device_back() {
    for (del_type, scope, inside, outside) in [
        (
            DelType::Partial,
            vec!["./Vendor/Acme/Apps"],
            "./Vendor/Acme/Apps/App1/Version",
            "./Vendor/Acme/Settings/Volume",
        ),
        (
            DelType::Full,
            vec!["."],
            "./Vendor/Acme/Apps/App1/Version",
            "./DevInfo/Lang",
        ),
        (
            DelType::Final,
            vec!["./Vendor/Acme"],
            "./Vendor/Acme/Settings/Volume",
            "./Vendor/Other/Info",
        ),
        (
            DelType::Temporary,
            vec!["./Vendor/Acme/Settings"],
            "./Vendor/Acme/Settings/Volume",
            "./Vendor/Acme/Apps/App1/Version",
        ),
    ] {
        let mut w = World::start().await;
        let before = w.export();
        let account_uri = w.delegate(del_type, &scope).await;
        assert_eq!(account_uri, "./DMAcc/dms2");
        w.first_session(&account_uri).await;
        let label = format!("{del_type:?} over {scope:?}");

        // DMS-2 manages the scope: Replace and Add inside it (the value put back, the node removed, so
        // that only authority differs afterwards).
        let value = w
            .fleet
            .with_device(DEV, |d| {
                d.tree().value(&inside.parse().unwrap()).map(String::from)
            })
            .unwrap()
            .unwrap();
        let parent = inside.rsplit_once('/').unwrap().0;
        let statuses = w
            .dms2
            .commands(vec![
                replace(inside, "changed-by-dms2"),
                replace(inside, &value),
                add_leaf(&format!("{parent}/AddedByDms2"), "x"),
                delete(&format!("{parent}/AddedByDms2")),
            ])
            .await;
        assert_eq!(
            codes(&statuses),
            [200, 200, 200, 200],
            "{label}: DMS-2 inside the scope"
        );
        // DMS-1 can no longer change data in the scope.
        let statuses = w
            .dms1
            .commands(vec![replace(inside, "changed-by-dms1")])
            .await;
        assert_eq!(codes(&statuses), [425], "{label}: DMS-1 inside the scope");
        // DMS-2 has no authority outside it; DMS-1 still has.
        let statuses = w.dms2.commands(vec![replace(outside, "x")]).await;
        assert_eq!(codes(&statuses), [425], "{label}: DMS-2 outside the scope");
        let original = w
            .fleet
            .with_device(DEV, |d| {
                d.tree().value(&outside.parse().unwrap()).map(String::from)
            })
            .unwrap()
            .unwrap();
        let statuses = w.dms1.commands(vec![replace(outside, &original)]).await;
        assert_eq!(codes(&statuses), [200], "{label}: DMS-1 outside the scope");

        // Nothing outside the scope (and DMS-2's account) changed.
        let during = w.export();
        let mut moved: Vec<&str> = vec!["./DMAcc/dms2"];
        if del_type == DelType::Full {
            moved.push("./Vendor");
        } else {
            moved.extend(scope.iter().copied());
        }
        assert_eq!(
            comparable(&during, &moved),
            comparable(&before, &moved),
            "{label}: outside the scope"
        );

        // Restore: the export is the one before, byte for byte but for the nonces (B.7).
        let restored = w
            .dms1
            .run(Job::Restore {
                plan_id: "delegation-1".into(),
            })
            .await;
        assert_eq!(restored, Ok(JobSuccess::Restored), "{label}");
        assert_eq!(
            comparable(&w.export(), &[]),
            comparable(&before, &[]),
            "{label}: after restore"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_command_rolls_back_the_whole_plan_and_reports_507_with_the_command() {
    // DMS-1 may not add accounts on this device: the plan's first Add is refused.
    let mut w = World::start().await;
    w.fleet
        .with_device_mut(DEV, |d| {
            let acl = format!("Get={D1}&Replace={D1}").parse().unwrap();
            d.tree_mut()
                .set_acl(&"./DMAcc".parse().unwrap(), acl)
                .unwrap();
        })
        .unwrap();
    let before = w.export();
    let request = w.request(DelType::Partial, &["./Vendor/Acme/Apps"]);
    let failed = w
        .dms1
        .run(Job::Apply {
            plan_id: "refused".into(),
            request: Box::new(request),
        })
        .await
        .unwrap_err();
    assert_eq!(failed.status, 507, "{failed:?}");
    assert_eq!(failed.command, "Add ./DMAcc/dms2", "{failed:?}");
    assert_eq!(
        comparable(&w.export(), &[]),
        comparable(&before, &[]),
        "rolled back"
    );
}

/// An apply run again (its command came back after the replica that ran it died before reporting) finds
/// the plan on the device: it reports it applied, and neither sends it again nor undoes it; a device
/// without the plan gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_run_again_does_not_undo_what_the_first_run_did() {
    let mut w = World::start().await;
    let apply = |w: &World| Job::Apply {
        plan_id: "again".into(),
        request: Box::new(w.request(DelType::Partial, &["./Vendor/Acme/Apps"])),
    };
    let job = apply(&w);
    let first = w.dms1.run(job).await.unwrap();
    let after_first = w.export();
    let job = apply(&w);
    let second = w.dms1.run(job).await.unwrap();
    assert_eq!(format!("{first:?}"), format!("{second:?}"));
    assert_eq!(comparable(&w.export(), &[]), comparable(&after_first, &[]));
    let sessions = w
        .fleet
        .wait_for_sessions(DEV, 2, std::time::Duration::from_secs(20))
        .await
        .unwrap();
    assert!(sessions[1].changes.is_empty(), "{:?}", sessions[1]);
    // The plan undone on the device meanwhile: the next run applies it again.
    let undo = w
        .dms1
        .run(Job::Restore {
            plan_id: "again".into(),
        })
        .await
        .unwrap();
    assert_eq!(undo, JobSuccess::Restored);
    let job = apply(&w);
    w.dms1.run(job).await.unwrap();
    assert!(
        w.fleet
            .with_device(DEV, |d| d.account_uri(D2).is_some())
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_key_works_once_then_the_rotated_credentials_do() {
    let mut w = World::start().await;
    let account_uri = w.delegate(DelType::Partial, &["./Vendor/Acme/Apps"]).await;
    let creds = w.dms2.prov.credentials(DEV).unwrap();
    // A wrong key and a tampered package #0 are refused by the device.
    assert_eq!(
        w.push(D2, "not-the-temp-key", &creds.server_nonce_b64, false)
            .await,
        Err(ChannelError::Refused(401))
    );
    assert_eq!(
        w.push(D2, TEMP_KEY, &creds.server_nonce_b64, true).await,
        Err(ChannelError::Refused(401))
    );
    let sessions_before = w.fleet.sessions(DEV).unwrap().len();
    // The first session with the TEMP key replaces both credentials.
    w.first_session(&account_uri).await;
    let rotated = w.dms2.prov.credentials(DEV).unwrap();
    assert_ne!(rotated.server_secret, TEMP_KEY);
    assert_ne!(rotated.client_secret, creds.client_secret);
    // The TEMP key no longer works; the new server credential does, and a session with it succeeds.
    assert_eq!(
        w.push(D2, TEMP_KEY, &rotated.server_nonce_b64, false).await,
        Err(ChannelError::Refused(401))
    );
    let statuses = w
        .dms2
        .commands(vec![replace("./Vendor/Acme/Apps/App1/Version", "2.0")])
        .await;
    assert_eq!(codes(&statuses), [200]);
    // Both sessions (rotation, then management with the new credentials) completed on the device.
    let sessions = w
        .fleet
        .wait_for_sessions(DEV, sessions_before + 2, DEADLINE)
        .await
        .unwrap();
    assert!(
        sessions
            .iter()
            .skip(sessions_before)
            .all(|s| s.outcome == dm_client::Outcome::Completed),
        "{sessions:?}"
    );
}

// ------------------------------------------------------------------------------------------------
// A hand-written client, channels that misbehave
// ------------------------------------------------------------------------------------------------

/// Posts `body` to an `http://host:port/path` URL over one plain TCP connection (HTTP/1.1); returns the
/// status, the `Content-Type` and the body of the answer.
async fn post_raw(url: &str, content_type: &str, body: &str) -> (u16, String, Vec<u8>) {
    let (host, path) = url
        .strip_prefix("http://")
        .unwrap()
        .split_once('/')
        .unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(response[..split].to_vec()).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, response[split + 4..].to_vec())
}

/// Package #1 of a client-initiated session, as the C client of B.6 writes it.
fn package1(session_id: &str, msg_id: &str, target: &str, cred: Option<syncml::Cred>) -> String {
    let mut hdr = SyncHdr::new(
        session_id,
        msg_id,
        Location::new(target),
        Location::new(DEV),
    );
    hdr.cred = cred;
    let devinfo = [
        ("DevId", DEV),
        ("Man", "Acme"),
        ("Mod", "X100"),
        ("DmV", "1.0"),
        ("Lang", "en-US"),
    ]
    .into_iter()
    .map(|(n, v)| Item::source(format!("./DevInfo/{n}")).with_data(v))
    .collect();
    syncml::encode(&SyncMl {
        hdr,
        body: SyncBody {
            commands: vec![
                Command::Alert(Alert::new("1", AlertCode::ClientInitiatedMgmt)),
                Command::Replace(ItemCommand::new("2", devinfo)),
            ],
            final_: true,
        },
    })
}

/// Posts a message with the DS content type the C client uses; the answer must be a 200 with SyncML
/// of the same type.
async fn exchange(url: &str, body: &str) -> SyncMl {
    let (status, content_type, answer) = post_raw(url, syncml::CONTENT_TYPE_DS_XML, body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(content_type, syncml::CONTENT_TYPE_DS_XML);
    syncml::decode(&answer).unwrap()
}

/// The status for the device's header in a server message: (code, the Chal's type and NextNonce).
fn header_status(msg: &SyncMl) -> (u16, Option<(String, Vec<u8>)>) {
    let s = msg
        .body
        .commands
        .iter()
        .find_map(|c| match c {
            Command::Status(s) if s.cmd_ref == "0" => Some(s),
            _ => None,
        })
        .expect("a status for the header");
    let chal = s.chal.as_ref().map(|c| {
        (
            c.meta.type_.clone().unwrap_or_default(),
            auth::decode_nonce(c.meta.next_nonce.as_deref().unwrap_or_default()).unwrap(),
        )
    });
    (s.data.code(), chal)
}

/// The codes of the statuses a server message gives the device's commands.
fn command_statuses(msg: &SyncMl) -> Vec<u16> {
    msg.body
        .commands
        .iter()
        .filter_map(|c| match c {
            Command::Status(s) if s.cmd_ref != "0" => Some(s.data.code()),
            _ => None,
        })
        .collect()
}

fn management(msg: &SyncMl) -> Vec<&Command> {
    msg.body
        .commands
        .iter()
        .filter(|c| !matches!(c, Command::Status(_) | Command::Results(_)))
        .collect()
}

/// A channel that takes every package #0 and delivers none: a device that never comes.
struct NullChannel;

impl Package0Channel for NullChannel {
    fn deliver<'a>(
        &'a self,
        _: &'a str,
        _: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), ChannelError>> + Send + 'a>> {
        Box::pin(async { Ok(()) })
    }
}

/// A channel that loses the first package #0 (and says it delivered it), then delivers.
/// A channel that loses the first `lose` package #0s (reports them delivered) and records the digest
/// nonce of each one it passes on as the zero nonce or not.
struct LosesFirst {
    inner: HttpPushChannel,
    sent: AtomicUsize,
    lose: usize,
}

impl Package0Channel for LosesFirst {
    fn deliver<'a>(
        &'a self,
        dev_id: &'a str,
        package0: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), ChannelError>> + Send + 'a>> {
        Box::pin(async move {
            if self.sent.fetch_add(1, Ordering::SeqCst) < self.lose {
                return Ok(());
            }
            self.inner.deliver(dev_id, package0).await
        })
    }
}

/// A channel whose device is gone (404); the first delivery waits until released.
struct Gone {
    entered: Notify,
    release: Notify,
    first: Mutex<bool>,
}

impl Package0Channel for Gone {
    fn deliver<'a>(
        &'a self,
        _: &'a str,
        _: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), ChannelError>> + Send + 'a>> {
        Box::pin(async move {
            let first = std::mem::replace(&mut *self.first.lock().unwrap(), false);
            if first {
                self.entered.notify_one();
                self.release.notified().await;
            }
            Err(ChannelError::Refused(404))
        })
    }
}

fn raw_credentials() -> DeviceCredentials {
    DeviceCredentials {
        server_secret: "server-secret".into(),
        server_nonce_b64: auth::encode_nonce(b"server-nonce-0"),
        client_name: DEV.into(),
        client_secret: "client-secret".into(),
        client_nonce_b64: auth::encode_nonce(b"client-nonce-0"),
        ..Default::default()
    }
}

// ------------------------------------------------------------------------------------------------
// B.1 / B.6 authentication with a real client's behaviour
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_basic_credential_gets_401_with_an_md5_chal_and_the_md5_retry_is_accepted() {
    let mut server = Server::with_channel(
        D1,
        Arc::new(NullChannel),
        dm_provisioning::DEFAULT_SESSION_TIMEOUT,
    )
    .await;
    server.prov.register_device(DEV, raw_credentials());
    // An operator's Add of an interior node without Data: B.6, the server sends <Data/>.
    let job = server
        .prov
        .enqueue(
            DEV,
            Job::Commands(vec![Command::Add(ItemCommand::new(
                "0",
                vec![Item::target("./Vendor/Acme/New").with_meta(Meta {
                    format: Some("node".into()),
                    ..Meta::default()
                })],
            ))]),
        )
        .await
        .unwrap();
    let url = server.url();

    // 1. The right password, but auth-basic: 401 and an auth-md5 Chal; the commands are not taken.
    let reply = exchange(
        &url,
        &package1("7", "1", &url, Some(auth::cred_basic(DEV, "client-secret"))),
    )
    .await;
    assert!(
        auth::verify_cred(
            reply.hdr.cred.as_ref().unwrap(),
            D1,
            "server-secret",
            b"server-nonce-0"
        )
        .is_ok()
    );
    let (code, chal) = header_status(&reply);
    assert_eq!(code, 401);
    let (chal_type, nonce) = chal.expect("a Chal");
    assert_eq!(chal_type, auth::AUTH_MD5);
    assert_eq!(command_statuses(&reply), [401, 401]);
    assert!(management(&reply).is_empty());

    // 2. auth-md5 over the challenged nonce: 212 with a new Chal, and the job's command.
    let md5 = auth::cred_md5(DEV, "client-secret", &nonce);
    let reply = exchange(&url, &package1("7", "2", &url, Some(md5.clone()))).await;
    let (code, chal) = header_status(&reply);
    assert_eq!(code, 212);
    assert_ne!(chal.unwrap().1, nonce);
    assert_eq!(command_statuses(&reply), [200, 200]);
    let commands = management(&reply);
    assert_eq!(commands.len(), 1);
    let add_id = commands[0].cmd_id().to_string();
    assert_eq!(commands[0].items()[0].data.as_deref(), Some(""));
    // CmdIDs are numbers, unique in the message.
    let mut ids: Vec<u64> = reply
        .body
        .commands
        .iter()
        .map(|c| c.cmd_id().parse().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), reply.body.commands.len());

    // 3. The same md5 credential again: 401, the nonce was single-use. A package #1 without any
    //    credential, and a message naming another session: 407. None of them ends the session.
    let replay = exchange(&url, &package1("7", "1", &url, Some(md5))).await;
    assert_eq!(header_status(&replay).0, 401);
    let anonymous = exchange(&url, &package1("7", "1", &url, None)).await;
    assert_eq!(header_status(&anonymous).0, 407);
    assert!(management(&anonymous).is_empty());
    let mut hdr = SyncHdr::new("8", "3", Location::new(&url), Location::new(DEV));
    hdr.cred = None;
    let answer = |hdr: SyncHdr| {
        let mut status = syncml::Status::new("1", "2", &add_id, "Add", StatusCode::Ok);
        status.target_refs.push("./Vendor/Acme/New".into());
        syncml::encode(&SyncMl {
            hdr,
            body: SyncBody {
                commands: vec![Command::Status(status)],
                final_: true,
            },
        })
    };
    let other_session = exchange(&url, &answer(hdr)).await;
    assert_eq!(header_status(&other_session).0, 407);

    // 4. The device's answer in its own session ends the job.
    let hdr = SyncHdr::new("7", "3", Location::new(&url), Location::new(DEV));
    let last = exchange(&url, &answer(hdr)).await;
    assert_eq!(header_status(&last).0, 200);
    assert!(management(&last).is_empty());
    let outcome = server.outcome().await;
    assert_eq!(outcome.job_id, job);
    let Ok(JobSuccess::Commands { statuses, .. }) = outcome.result else {
        panic!("{outcome:?}")
    };
    assert_eq!(codes(&statuses), [200]);
}

// ------------------------------------------------------------------------------------------------
// Robustness: a device that never comes, a session cut off, a device that cannot be reached
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cut_off_mid_way_fails_its_job_with_408_and_the_queue_goes_on() {
    let mut server =
        Server::with_channel(D1, Arc::new(NullChannel), Duration::from_millis(300)).await;
    server.prov.register_device(DEV, raw_credentials());
    let first = server
        .prov
        .enqueue(DEV, Job::Commands(vec![replace("./DevInfo/Lang", "de")]))
        .await
        .unwrap();
    let second = server
        .prov
        .enqueue(DEV, Job::Commands(vec![replace("./DevInfo/Lang", "fr")]))
        .await
        .unwrap();
    assert_ne!(first, second);
    let url = server.url();
    let md5 = auth::cred_md5(DEV, "client-secret", b"client-nonce-0");
    let reply = exchange(&url, &package1("9", "1", &url, Some(md5))).await;
    assert_eq!(management(&reply).len(), 1);
    // What comes next is not a SyncML message: refused, and nothing else happens.
    for body in ["<SyncML><SyncHdr>", "\u{0}\u{1}", ""] {
        let (status, _, _) = post_raw(&url, syncml::CONTENT_TYPE_XML, body).await;
        assert_eq!(status, 400, "{body:?}");
    }
    let (status, _, _) = post_raw(&url, "text/plain", "hello").await;
    assert_eq!(status, 415);
    // The device never answers: the job fails, the next one is woken (and, its device never coming,
    // fails in turn). Nothing waits forever.
    let outcome = server.outcome().await;
    assert_eq!(outcome.job_id, first);
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.status, 408, "{failure:?}");
    assert!(
        failure.reason.contains("left its DM session"),
        "{failure:?}"
    );
    let outcome = server.outcome().await;
    assert_eq!(outcome.job_id, second);
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.status, 408, "{failure:?}");
    assert!(failure.reason.contains("did not open"), "{failure:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_package0_is_sent_again_with_the_zero_nonce_and_the_job_runs() {
    // B.1: a package #0 that got no session is sent once more digested with the zero nonce; the device
    // checks it against its stored nonce, then the zero nonce, and opens the session.
    let fleet = Fleet::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fleet_url = format!("http://{}", listener.local_addr().unwrap());
    let serving = fleet.clone();
    tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
    let channel = Arc::new(LosesFirst {
        inner: HttpPushChannel::new(&fleet_url),
        sent: AtomicUsize::new(0),
        lose: 1,
    });
    let mut dms1 = Server::with_channel(D1, channel.clone(), Duration::from_millis(300)).await;
    let account = dms1_account(&dms1.url());
    fleet.insert(Device::with_default_tree(DEV, &account).unwrap());
    dms1.prov.register_device(DEV, credentials_of(&account));
    let job = dms1
        .prov
        .enqueue(DEV, Job::Commands(vec![replace("./DevInfo/Lang", "de")]))
        .await
        .unwrap();
    let outcome = dms1.outcome().await;
    assert_eq!(outcome.job_id, job);
    assert!(outcome.result.is_ok(), "{outcome:?}");
    assert_eq!(channel.sent.load(Ordering::SeqCst), 2);
    let sessions = fleet.wait_for_sessions(DEV, 1, DEADLINE).await.unwrap();
    assert!(sessions.last().unwrap().zero_nonce, "{sessions:?}");
    // The session that followed replaced this server's secret (a zero nonce is guessable): the server
    // signs with the new one, and the device holds it.
    let secret = dms1.prov.credentials(DEV).unwrap().server_secret;
    assert_ne!(secret, account.server_secret);
    let held = fleet
        .with_device(DEV, |d| {
            d.server_credential(D1).unwrap().secret().to_string()
        })
        .unwrap();
    assert_eq!(held, secret);
}

fn credentials_of(account: &DefaultAccount) -> DeviceCredentials {
    DeviceCredentials {
        server_secret: account.server_secret.clone(),
        server_nonce_b64: account.server_nonce_b64.clone(),
        client_name: account.client_name.clone(),
        client_secret: account.client_secret.clone(),
        client_nonce_b64: account.client_nonce_b64.clone(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package0_lost_twice_fails_its_job_with_408_and_the_next_job_runs() {
    let fleet = Fleet::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fleet_url = format!("http://{}", listener.local_addr().unwrap());
    let serving = fleet.clone();
    tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
    let channel = Arc::new(LosesFirst {
        inner: HttpPushChannel::new(&fleet_url),
        sent: AtomicUsize::new(0),
        lose: 2,
    });
    let mut dms1 = Server::with_channel(D1, channel, Duration::from_millis(300)).await;
    let account = dms1_account(&dms1.url());
    fleet.insert(Device::with_default_tree(DEV, &account).unwrap());
    dms1.prov.register_device(
        DEV,
        DeviceCredentials {
            server_secret: account.server_secret.clone(),
            server_nonce_b64: account.server_nonce_b64.clone(),
            client_name: account.client_name.clone(),
            client_secret: account.client_secret.clone(),
            client_nonce_b64: account.client_nonce_b64.clone(),
            ..Default::default()
        },
    );
    let lost = dms1
        .prov
        .enqueue(DEV, Job::Commands(vec![replace("./DevInfo/Lang", "de")]))
        .await
        .unwrap();
    let next = dms1
        .prov
        .enqueue(DEV, Job::Commands(vec![replace("./DevInfo/Lang", "fr")]))
        .await
        .unwrap();
    let outcome = dms1.outcome().await;
    assert_eq!(outcome.job_id, lost);
    assert_eq!(outcome.result.unwrap_err().status, 408);
    let outcome = dms1.outcome().await;
    assert_eq!(outcome.job_id, next);
    assert!(outcome.result.is_ok(), "{outcome:?}");
    let lang = fleet
        .with_device(DEV, |d| {
            d.tree()
                .value(&"./DevInfo/Lang".parse().unwrap())
                .map(String::from)
        })
        .unwrap()
        .unwrap();
    assert_eq!(lang, "fr");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_package0_is_refused_the_jobs_queued_behind_it_are_tried_too() {
    let channel = Arc::new(Gone {
        entered: Notify::new(),
        release: Notify::new(),
        first: Mutex::new(true),
    });
    let mut server = Server::with_channel(
        D1,
        channel.clone(),
        dm_provisioning::DEFAULT_SESSION_TIMEOUT,
    )
    .await;
    server.prov.register_device(DEV, raw_credentials());
    let prov = server.prov.clone();
    let first = tokio::spawn(async move {
        prov.enqueue(DEV, Job::Commands(vec![replace("./DevInfo/Lang", "de")]))
            .await
            .unwrap()
    });
    channel.entered.notified().await;
    // Queued while the first package #0 is on its way: no package #0 of its own.
    let second = server
        .prov
        .enqueue(DEV, Job::Commands(vec![replace("./DevInfo/Lang", "fr")]))
        .await
        .unwrap();
    channel.release.notify_one();
    let first = first.await.unwrap();
    for id in [first, second] {
        let outcome = server.outcome().await;
        assert_eq!(outcome.job_id, id);
        assert_eq!(outcome.result.unwrap_err().status, 404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_get_their_own_ids() {
    let server = Server::with_channel(
        D1,
        Arc::new(NullChannel),
        dm_provisioning::DEFAULT_SESSION_TIMEOUT,
    )
    .await;
    server.prov.register_device(DEV, raw_credentials());
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let prov = server.prov.clone();
            tokio::spawn(async move { prov.enqueue(DEV, Job::Commands(Vec::new())).await.unwrap() })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 64, "{ids:?}");
}

// ------------------------------------------------------------------------------------------------
// The plan with a client like the one of B.6, and with deep explicit ACLs
// ------------------------------------------------------------------------------------------------

fn b6_fleet() -> Fleet {
    Fleet::with_config(SessionConfig {
        b6_client: true,
        ..SessionConfig::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_atomic_that_starts_with_basic_gets_the_whole_delegation() {
    // Basic first (401 + md5 Chal, then md5), the DS content type, no status for the Atomic: the
    // read-back decides. Then the first session of DMS-2, its management, and the restore.
    let mut w = World::with_fleet(b6_fleet()).await;
    let before = w.export();
    let account_uri = w.delegate(DelType::Partial, &["./Vendor/Acme/Apps"]).await;
    w.first_session(&account_uri).await;
    let statuses = w
        .dms2
        .commands(vec![replace("./Vendor/Acme/Apps/App1/Version", "2.0")])
        .await;
    assert_eq!(codes(&statuses), [200]);
    let statuses = w
        .dms1
        .commands(vec![replace("./Vendor/Acme/Apps/App1/Version", "3.0")])
        .await;
    assert_eq!(codes(&statuses), [425]);
    let restored = w
        .dms1
        .run(Job::Restore {
            plan_id: "delegation-1".into(),
        })
        .await;
    assert_eq!(restored, Ok(JobSuccess::Restored));
    // Authority is back; the value DMS-2 set stays (A.6: authority, not data).
    let now = w.export();
    let mut expected = DmTree::from_tnds(&before).unwrap();
    expected
        .replace_value(&"./Vendor/Acme/Apps/App1/Version".parse().unwrap(), "2.0")
        .unwrap();
    assert_eq!(comparable(&now, &[]), comparable(&expected.to_tnds(), &[]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_without_atomic_a_refused_plan_is_undone_and_the_tree_is_as_before() {
    // No Add on ./DMAcc for DMS-1: the account is refused, but this client goes on with the rest of
    // the plan (the scope's ACLs change). The server finds the failure, puts back what the device
    // did, and reports 507 with the refused command.
    let mut w = World::with_fleet(b6_fleet()).await;
    w.fleet
        .with_device_mut(DEV, |d| {
            let acl = format!("Get={D1}&Replace={D1}").parse().unwrap();
            d.tree_mut()
                .set_acl(&"./DMAcc".parse().unwrap(), acl)
                .unwrap();
        })
        .unwrap();
    let before = w.export();
    let request = w.request(DelType::Partial, &["./Vendor/Acme/Apps"]);
    let failed = w
        .dms1
        .run(Job::Apply {
            plan_id: "refused".into(),
            request: Box::new(request),
        })
        .await
        .unwrap_err();
    assert_eq!(failed.status, 507, "{failed:?}");
    assert_eq!(failed.command, "Add ./DMAcc/dms2", "{failed:?}");
    assert_eq!(
        comparable(&w.export(), &[]),
        comparable(&before, &[]),
        "put back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_explicit_acls_naming_d1_move_and_come_back() {
    // Below the scope root: App1 `Get=D1` (interior), its leaf Version `Get=D1&Replace=D1` (a leaf's
    // own Replace does not cover its ACL), Cfg `Get=D1&Replace=D1` (interior) and its leaf Mode.
    let mut w = World::start().await;
    w.fleet
        .with_device_mut(DEV, |d| {
            let t = d.tree_mut();
            t.add_interior(&"./Vendor/Acme/Apps/App1/Cfg".parse().unwrap())
                .unwrap();
            t.add_leaf(
                &"./Vendor/Acme/Apps/App1/Cfg/Mode".parse().unwrap(),
                "auto",
                None,
                None,
            )
            .unwrap();
            for (at, acl) in [
                ("./Vendor/Acme/Apps/App1", format!("Get={D1}")),
                (
                    "./Vendor/Acme/Apps/App1/Version",
                    format!("Get={D1}&Replace={D1}"),
                ),
                (
                    "./Vendor/Acme/Apps/App1/Cfg",
                    format!("Get={D1}&Replace={D1}"),
                ),
                ("./Vendor/Acme/Apps/App1/Cfg/Mode", format!("Get={D1}")),
            ] {
                t.set_acl(&at.parse().unwrap(), acl.parse().unwrap())
                    .unwrap();
            }
        })
        .unwrap();
    let before = w.export();
    let account_uri = w.delegate(DelType::Partial, &["./Vendor/Acme/Apps"]).await;
    w.first_session(&account_uri).await;
    let version = "./Vendor/Acme/Apps/App1/Version";
    let statuses = w
        .dms2
        .commands(vec![replace(version, "2.0"), replace(version, "1.0.0")])
        .await;
    assert_eq!(codes(&statuses), [200, 200]);
    let statuses = w.dms1.commands(vec![replace(version, "x")]).await;
    assert_eq!(codes(&statuses), [425]);
    let restored = w
        .dms1
        .run(Job::Restore {
            plan_id: "delegation-1".into(),
        })
        .await;
    assert_eq!(restored, Ok(JobSuccess::Restored));
    assert_eq!(comparable(&w.export(), &[]), comparable(&before, &[]));
}

// ------------------------------------------------------------------------------------------------
// B.1 / B.6 field habits, scripted byte by byte
// ------------------------------------------------------------------------------------------------

/// A device message of session `session_id` (no `Cred`): a status for the server's header (`code`,
/// with a Chal carrying `next_nonce` when given), then `rest`.
fn device_message(
    session_id: &str,
    msg_id: &str,
    target: &str,
    server_msg: &SyncMl,
    code: StatusCode,
    next_nonce: Option<&[u8]>,
    rest: Vec<Command>,
) -> String {
    let hdr = SyncHdr::new(
        session_id,
        msg_id,
        Location::new(target),
        Location::new(DEV),
    );
    let mut status = syncml::Status::new("1", &server_msg.hdr.msg_id, "0", "SyncHdr", code);
    status.chal = next_nonce.map(|n| syncml::Chal {
        meta: Meta {
            next_nonce: Some(auth::encode_nonce(n)),
            ..Meta::format_type(auth::FORMAT_B64, auth::AUTH_MD5)
        },
    });
    let mut commands = vec![Command::Status(status)];
    commands.extend(rest);
    syncml::encode(&SyncMl {
        hdr,
        body: SyncBody {
            commands,
            final_: true,
        },
    })
}

/// Statuses `code` for every management command of a server message.
fn statuses_for(server_msg: &SyncMl, code: StatusCode) -> Vec<Command> {
    management(server_msg)
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut s = syncml::Status::new(
                (i + 2).to_string(),
                &server_msg.hdr.msg_id,
                c.cmd_id(),
                c.name(),
                code,
            );
            s.target_refs = c
                .items()
                .iter()
                .filter_map(|i| i.target.as_ref().map(|t| t.loc_uri.clone()))
                .collect();
            Command::Status(s)
        })
        .collect()
}

/// Posts with the DS type and checks that nothing follows the answer's root (B.6).
async fn exchange_exact(url: &str, body: &str) -> SyncMl {
    let (status, _, answer) = post_raw(url, syncml::CONTENT_TYPE_DS_XML, body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert!(
        answer.ends_with(b"</SyncML>"),
        "bytes after the root: {:?}",
        String::from_utf8_lossy(&answer[answer.len().saturating_sub(12)..])
    );
    syncml::decode(&answer).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenged_server_credential_is_resent_with_the_new_nonce_at_most_twice() {
    let mut server = Server::with_channel(
        D1,
        Arc::new(NullChannel),
        dm_provisioning::DEFAULT_SESSION_TIMEOUT,
    )
    .await;
    server.prov.register_device(DEV, raw_credentials());
    let url = server.url();
    let verifies = |msg: &SyncMl, secret: &str, nonce: &[u8]| {
        auth::verify_cred(msg.hdr.cred.as_ref().unwrap(), D1, secret, nonce).is_ok()
    };

    // A device that lost the server nonce: it challenges the server's credential (B.1), and the
    // server resends it, computed with the new nonce, with the same commands.
    let job = server
        .prov
        .enqueue(DEV, Job::Commands(vec![replace("./DevInfo/Lang", "de")]))
        .await
        .unwrap();
    let md5 = auth::cred_md5(DEV, "client-secret", b"client-nonce-0");
    let first = exchange_exact(&url, &package1("9", "1", &url, Some(md5))).await;
    assert_eq!(header_status(&first).0, 212);
    assert_eq!(management(&first).len(), 1);
    let mut msg_ids = vec![first.hdr.msg_id.clone()];
    let mut last = first.clone();
    for (attempt, nonce) in [b"nonce-one".as_slice(), b"nonce-two"]
        .into_iter()
        .enumerate()
    {
        // White space and a BOM before the declaration, as a client that kept them (B.6).
        let body = format!(
            "\r\n\u{feff}{}",
            device_message(
                "9",
                &(attempt + 2).to_string(),
                &url,
                &last,
                StatusCode::InvalidCredentials,
                Some(nonce),
                statuses_for(&last, StatusCode::InvalidCredentials),
            )
        );
        let again = exchange_exact(&url, &body).await;
        assert!(
            verifies(&again, "server-secret", nonce),
            "attempt {attempt}"
        );
        assert_eq!(header_status(&again).0, 200);
        let resent = management(&again);
        assert_eq!(resent.len(), 1, "attempt {attempt}");
        assert_eq!(resent[0].items()[0].data.as_deref(), Some("de"));
        msg_ids.push(again.hdr.msg_id.clone());
        last = again;
    }
    // A third refusal: the job fails with 401, the session ends, the last nonce is kept.
    let body = device_message(
        "9",
        "4",
        &url,
        &last,
        StatusCode::InvalidCredentials,
        Some(b"nonce-three"),
        statuses_for(&last, StatusCode::InvalidCredentials),
    );
    let end = exchange_exact(&url, &body).await;
    assert!(management(&end).is_empty());
    msg_ids.push(end.hdr.msg_id.clone());
    let outcome = server.outcome().await;
    assert_eq!(outcome.job_id, job);
    assert_eq!(outcome.result.unwrap_err().status, 401);
    assert_eq!(
        server.prov.credentials(DEV).unwrap().server_nonce_b64,
        auth::encode_nonce(b"nonce-three")
    );
    // Every server message of the session had its own MsgID (B.6), the 401 answers included.
    let mut unique = msg_ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), msg_ids.len(), "{msg_ids:?}");

    // The next session uses the stored nonce, and a challenge answered once lets the job finish.
    let job = server
        .prov
        .enqueue(DEV, Job::Commands(vec![replace("./DevInfo/Lang", "fr")]))
        .await
        .unwrap();
    let (_, chal) = header_status(&end);
    let client_nonce = chal.map(|c| c.1);
    let client_nonce = match client_nonce {
        Some(n) => n,
        None => {
            auth::decode_nonce(&server.prov.credentials(DEV).unwrap().client_nonce_b64).unwrap()
        }
    };
    let md5 = auth::cred_md5(DEV, "client-secret", &client_nonce);
    let first = exchange_exact(&url, &package1("10", "1", &url, Some(md5))).await;
    assert!(verifies(&first, "server-secret", b"nonce-three"));
    assert_eq!(first.hdr.msg_id, "1", "a new session counts from 1");
    let body = device_message(
        "10",
        "2",
        &url,
        &first,
        StatusCode::InvalidCredentials,
        Some(b"nonce-four"),
        statuses_for(&first, StatusCode::InvalidCredentials),
    );
    let again = exchange_exact(&url, &body).await;
    assert!(verifies(&again, "server-secret", b"nonce-four"));
    assert_eq!(again.hdr.msg_id, "2");
    let body = device_message(
        "10",
        "3",
        &url,
        &again,
        StatusCode::AuthenticationAccepted,
        Some(b"nonce-five"),
        statuses_for(&again, StatusCode::Ok),
    );
    let done = exchange_exact(&url, &body).await;
    assert!(management(&done).is_empty());
    assert_eq!(done.hdr.msg_id, "3");
    let outcome = server.outcome().await;
    assert_eq!(outcome.job_id, job);
    assert!(outcome.result.is_ok(), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_device_message_fails_the_job_at_once_with_the_reason_and_offset() {
    let mut server = Server::with_channel(
        D1,
        Arc::new(NullChannel),
        dm_provisioning::DEFAULT_SESSION_TIMEOUT,
    )
    .await;
    server.prov.register_device(DEV, raw_credentials());
    let url = server.url();

    // Not even a header to read: 400 over HTTP, and no job is touched.
    let (status, _, body) = post_raw(&url, syncml::CONTENT_TYPE_XML, "<SyncML").await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));

    let job = server
        .prov
        .enqueue(
            DEV,
            Job::Commands(vec![Command::Get(ItemCommand::new(
                "0",
                vec![Item::target("./Vendor")],
            ))]),
        )
        .await
        .unwrap();
    let md5 = auth::cred_md5(DEV, "client-secret", b"client-nonce-0");
    let first = exchange_exact(&url, &package1("5", "1", &url, Some(md5))).await;
    let get = management(&first)[0];
    // The child list ends with a NUL (B.6): not XML.
    let results = Command::Results(syncml::Results {
        cmd_id: "3".into(),
        msg_ref: Some(first.hdr.msg_id.clone()),
        cmd_ref: get.cmd_id().to_string(),
        meta: None,
        target_refs: Vec::new(),
        source_refs: Vec::new(),
        items: vec![Item::source("./Vendor").with_data("Acme/OtherNUL")],
    });
    let mut rest = statuses_for(&first, StatusCode::Ok);
    rest.push(results);
    let body = device_message(
        "5",
        "2",
        &url,
        &first,
        StatusCode::AuthenticationAccepted,
        Some(b"n"),
        rest,
    )
    .replace("OtherNUL", "Other\0");
    let at = body.find('\0').unwrap();
    let started = std::time::Instant::now();
    let answer = exchange_exact(&url, &body).await;
    // Told in DM terms: the header was a bad request, and the session is aborted.
    assert_eq!(header_status(&answer).0, 400);
    assert!(answer.body.commands.iter().any(|c| matches!(
        c,
        Command::Alert(a) if a.data.code() == AlertCode::SessionAbort.code()
    )));
    let outcome = server.outcome().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(outcome.job_id, job);
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.status, 400, "{failure:?}");
    assert!(failure.reason.contains("U+0000"), "{failure:?}");
    assert!(
        failure.reason.contains(&format!("byte {at}")),
        "{failure:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_synchdr_in_a_session_fails_the_job_at_once() {
    let mut server = Server::with_channel(
        D1,
        Arc::new(NullChannel),
        dm_provisioning::DEFAULT_SESSION_TIMEOUT,
    )
    .await;
    server.prov.register_device(DEV, raw_credentials());
    let url = server.url();
    let job = server
        .prov
        .enqueue(DEV, Job::Commands(vec![replace("./DevInfo/Lang", "de")]))
        .await
        .unwrap();
    let md5 = auth::cred_md5(DEV, "client-secret", b"client-nonce-0");
    let first = exchange_exact(&url, &package1("6", "1", &url, Some(md5))).await;
    let body = device_message(
        "6",
        "2",
        &url,
        &first,
        StatusCode::AuthenticationAccepted,
        Some(b"n"),
        statuses_for(&first, StatusCode::Ok),
    )
    .replace("<VerProto>DM/1.2</VerProto>", "<VerProto>DM/1.1</VerProto>");
    let answer = exchange_exact(&url, &body).await;
    assert_eq!(header_status(&answer).0, 400);
    let outcome = server.outcome().await;
    assert_eq!(outcome.job_id, job);
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.status, 400, "{failure:?}");
    assert!(failure.reason.contains("VerProto"), "{failure:?}");
}
