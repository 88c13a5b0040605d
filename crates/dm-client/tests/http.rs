//! The fleet over real HTTP on loopback, against a tiny DM server written here with axum (a test double
//! of the SERVER side only: the devices, their sessions and their package #0 endpoint are the real ones).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use dm_client::{
    AuthSide, DefaultAccount, Device, Fleet, Outcome, SessionConfig, SessionRecord, Trigger,
};
use dm_protocol::auth::{self, decode_nonce, encode_nonce};
use dm_protocol::codes::{AlertCode, StatusCode};
use dm_protocol::package0::{self, Notification};
use dm_protocol::syncml::{
    self, Chal, Command, Container, Item, ItemCommand, Location, Meta, Status, SyncBody, SyncHdr,
    SyncMl,
};
use dm_protocol::tnds;
use dm_protocol::tree::same_tree;
use dm_protocol::types::DmUri;

const S1: &str = "dms1.example";
const S1_SECRET: &str = "s1-password";
const CLIENT: &str = "client-1";
const CLIENT_SECRET: &str = "c1-password";
const WAIT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------------
// The DM server double
// ------------------------------------------------------------------------------------------------

/// What the test server knows and does. It follows docs/device-side.md for the server side.
struct ServerState {
    server_id: String,
    /// The password it puts in its `Cred` (a wrong one in the negative test).
    srv_secret: String,
    /// The SRVCRED nonce it must use next (updated from the device's `Chal`s).
    srv_nonce: Vec<u8>,
    cli_name: String,
    cli_secret: String,
    /// The CLCRED nonce it expects in package #1 (it hands a new one in each header status).
    cli_nonce: Vec<u8>,
    /// Batches of management commands, one per server message after a successful package #1.
    script: VecDeque<Vec<Command>>,
    /// Every device message, in order.
    received: Vec<SyncMl>,
    /// Every server nonce the device handed over, in order.
    handed_by_device: Vec<Vec<u8>>,
    nonce_counter: u32,
    url: String,
    /// Keep using the first server nonce whatever the device hands over (a replaying server).
    ignore_handed_nonces: bool,
    /// Every device message as posted (the bytes before the XML declaration and NUL bytes included).
    raw: Vec<Vec<u8>>,
    /// What the server puts after the root end of its messages, by message (none past the list).
    trailers: Vec<Vec<u8>>,
    /// How many of its first messages carry a `Cred` over a wrong password.
    wrong_creds: u32,
}

impl ServerState {
    fn new(server_id: &str, srv_secret: &str, srv_nonce: &[u8], cli_nonce: &[u8]) -> Self {
        Self {
            server_id: server_id.into(),
            srv_secret: srv_secret.into(),
            srv_nonce: srv_nonce.to_vec(),
            cli_name: CLIENT.into(),
            cli_secret: CLIENT_SECRET.into(),
            cli_nonce: cli_nonce.to_vec(),
            script: VecDeque::new(),
            received: Vec::new(),
            handed_by_device: Vec::new(),
            nonce_counter: 0,
            url: String::new(),
            ignore_handed_nonces: false,
            raw: Vec::new(),
            trailers: Vec::new(),
            wrong_creds: 0,
        }
    }

    fn fresh_client_nonce(&mut self) -> Vec<u8> {
        self.nonce_counter += 1;
        format!("client-nonce-{}", self.nonce_counter).into_bytes()
    }

    /// The server's answer to one device message.
    fn answer(&mut self, msg: SyncMl) -> SyncMl {
        let is_package1 = msg.body.commands.iter().any(
            |c| matches!(c, Command::Alert(a) if a.data.code() == 1200 || a.data.code() == 1201),
        );
        // The device hands the server nonce over in its header status.
        for c in &msg.body.commands {
            if let Command::Status(s) = c
                && s.cmd == "SyncHdr"
                && let Some(n) = s.chal.as_ref().and_then(|c| c.meta.next_nonce.as_deref())
            {
                let nonce = decode_nonce(n).unwrap();
                if !self.ignore_handed_nonces {
                    self.srv_nonce = nonce.clone();
                }
                self.handed_by_device.push(nonce);
            }
        }
        let mut commands = Vec::new();
        let mut id = 0u32;
        let mut next_id = || {
            id += 1;
            id.to_string()
        };
        if is_package1 {
            let ok = msg
                .hdr
                .cred
                .as_ref()
                .map(|c| auth::verify_cred(c, &self.cli_name, &self.cli_secret, &self.cli_nonce))
                .is_some_and(|r| r.is_ok());
            let nonce = self.fresh_client_nonce();
            self.cli_nonce = nonce.clone();
            let mut hdr_status = Status::new(
                next_id(),
                msg.hdr.msg_id.clone(),
                "0",
                "SyncHdr",
                if ok {
                    StatusCode::AuthenticationAccepted
                } else {
                    StatusCode::InvalidCredentials
                },
            );
            hdr_status.chal = Some(Chal {
                meta: Meta {
                    next_nonce: Some(encode_nonce(&nonce)),
                    ..Meta::format_type("b64", auth::AUTH_MD5)
                },
            });
            commands.push(Command::Status(hdr_status));
            if ok {
                for c in &msg.body.commands {
                    commands.push(Command::Status(Status::new(
                        next_id(),
                        msg.hdr.msg_id.clone(),
                        c.cmd_id(),
                        c.name(),
                        StatusCode::Ok,
                    )));
                }
                commands.extend(self.script.pop_front().unwrap_or_default());
            }
        } else {
            commands.push(Command::Status(Status::new(
                next_id(),
                msg.hdr.msg_id.clone(),
                "0",
                "SyncHdr",
                StatusCode::Ok,
            )));
            commands.extend(self.script.pop_front().unwrap_or_default());
        }
        let mut hdr = SyncHdr::new(
            msg.hdr.session_id.clone(),
            (self.received.len() + 1).to_string(),
            Location::new(msg.hdr.source.loc_uri.clone()),
            Location::new(self.url.clone()),
        );
        let secret = if self.wrong_creds > 0 {
            self.wrong_creds -= 1;
            "not-the-server-password"
        } else {
            self.srv_secret.as_str()
        };
        hdr.cred = Some(auth::cred_md5(&self.server_id, secret, &self.srv_nonce));
        self.received.push(msg);
        SyncMl {
            hdr,
            body: SyncBody {
                commands,
                final_: true,
            },
        }
    }
}

type Shared = Arc<Mutex<ServerState>>;

async fn dm_endpoint(State(state): State<Shared>, body: Bytes) -> axum::response::Response {
    // Tolerant of the quirks: bytes before the first '<' and NUL bytes are dropped before decoding.
    let start = body.iter().position(|b| *b == b'<').unwrap_or(0);
    let clean: Vec<u8> = body[start..].iter().copied().filter(|b| *b != 0).collect();
    let Ok(msg) = syncml::decode(&clean) else {
        return (axum::http::StatusCode::BAD_REQUEST, "not SyncML").into_response();
    };
    let mut state = state.lock().unwrap();
    state.raw.push(body.to_vec());
    let trailer = state
        .trailers
        .get(state.raw.len() - 1)
        .cloned()
        .unwrap_or_default();
    let answer = state.answer(msg);
    // Exactly the trailer after the root's end tag, whatever the encoder ends with.
    let mut out = syncml::encode(&answer).into_bytes();
    let end = out.iter().rposition(|b| *b == b'>').unwrap() + 1;
    out.truncate(end);
    out.extend_from_slice(&trailer);
    ([(header::CONTENT_TYPE, syncml::CONTENT_TYPE_XML)], out).into_response()
}

/// Starts the server double; returns its state and its DM URL.
async fn start_server(state: ServerState) -> (Shared, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dm", listener.local_addr().unwrap());
    let shared = Arc::new(Mutex::new(state));
    shared.lock().unwrap().url = url.clone();
    let app = Router::new()
        .route("/dm", post(dm_endpoint))
        .with_state(shared.clone());
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (shared, url)
}

/// Starts the fleet's HTTP interface; returns its base URL.
async fn start_fleet(fleet: &Fleet) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let fleet = fleet.clone();
    tokio::spawn(async move {
        fleet
            .serve(listener, std::future::pending::<()>())
            .await
            .unwrap();
    });
    base
}

fn account(addr: &str) -> DefaultAccount {
    DefaultAccount {
        server_id: S1.into(),
        addr: addr.into(),
        server_secret: S1_SECRET.into(),
        server_nonce_b64: encode_nonce(b"srv-nonce-0"),
        client_name: CLIENT.into(),
        client_secret: CLIENT_SECRET.into(),
        client_nonce_b64: encode_nonce(b"cli-nonce-0"),
    }
}

fn dev_uri(s: &str) -> DmUri {
    s.parse().unwrap()
}

fn get(id: &str, target: &str) -> Command {
    Command::Get(ItemCommand::new(id, vec![Item::target(target)]))
}

fn replace(id: &str, target: &str, value: &str) -> Command {
    Command::Replace(ItemCommand::new(
        id,
        vec![Item::target(target).with_data(value)],
    ))
}

fn add_leaf(id: &str, target: &str, value: &str) -> Command {
    Command::Add(ItemCommand::new(
        id,
        vec![Item::target(target).with_data(value)],
    ))
}

fn add_node(id: &str, target: &str) -> Command {
    Command::Add(ItemCommand::new(
        id,
        vec![Item::target(target).with_data("").with_meta(Meta {
            format: Some("node".into()),
            ..Meta::default()
        })],
    ))
}

fn delete(id: &str, target: &str) -> Command {
    Command::Delete(ItemCommand::new(id, vec![Item::target(target)]))
}

/// (Cmd, CmdRef, code) of the statuses of a device message, header status first.
fn statuses(msg: &SyncMl) -> Vec<(String, String, u16)> {
    msg.body
        .commands
        .iter()
        .filter_map(|c| match c {
            Command::Status(s) => Some((s.cmd.clone(), s.cmd_ref.clone(), s.data.code())),
            _ => None,
        })
        .collect()
}

fn value(fleet: &Fleet, dev: &str, uri: &str) -> Option<String> {
    fleet.with_device(dev, |d| {
        d.tree().value(&dev_uri(uri)).ok().map(String::from)
    })?
}

fn nonce_of(fleet: &Fleet, dev: &str, uri: &str) -> Vec<u8> {
    decode_nonce(&value(fleet, dev, uri).unwrap()).unwrap()
}

fn package0_bytes(server: &str, session_id: u16, secret: &str, nonce: &[u8]) -> Vec<u8> {
    package0::encode(
        &Notification::new(server, session_id),
        server,
        secret,
        nonce,
    )
    .unwrap()
}

async fn post_package0(base: &str, dev: &str, body: Vec<u8>) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/devices/{dev}/package0"))
        .header("content-type", package0::CONTENT_TYPE)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

const SRVCRED_DATA: &str = "./DMAcc/dms1.example/AppAuth/SRVCRED/AAuthData";
const CLCRED_DATA: &str = "./DMAcc/dms1.example/AppAuth/CLCRED/AAuthData";

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn server_initiated_session_executes_commands_and_hands_nonces_over() {
    let mut state = ServerState::new(S1, S1_SECRET, b"srv-nonce-0", b"cli-nonce-0");
    state.script.push_back(vec![
        get("10", "./DevInfo/Man"),
        replace("11", "./Vendor/Acme/Settings/Volume", "7"),
        Command::Atomic(Container::new(
            "12",
            vec![
                add_node("13", "./Vendor/Acme/Apps/App2"),
                add_leaf("14", "./Vendor/Acme/Apps/App2/Version", "2.0"),
                replace(
                    "15",
                    "./Vendor/Acme/Apps/App2?prop=ACL",
                    "Get=dms1.example+dms2.example&Replace=dms1.example",
                ),
            ],
        )),
        get("16", "./DMAcc/dms1.example/AppAuth/SRVCRED/AAuthSecret"),
        get("17", "./Vendor/Acme/Apps/App2?prop=ACL"),
    ]);
    state.script.push_back(vec![Command::Atomic(Container::new(
        "20",
        vec![
            replace("21", "./Vendor/Acme/Settings/Brightness", "1"),
            delete("22", "./Vendor/Nope"),
        ],
    ))]);
    let (server, url) = start_server(state).await;
    let fleet = Fleet::new();
    let dev = "IMEI:350000000000001";
    assert!(fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap()));
    let base = start_fleet(&fleet).await;

    let body = package0_bytes(S1, 0xAB, S1_SECRET, b"srv-nonce-0");
    assert_eq!(post_package0(&base, dev, body).await, 202);
    let sessions = fleet.wait_for_sessions(dev, 1, WAIT).await.unwrap();
    assert_eq!(sessions.len(), 1);
    let record = &sessions[0];
    assert_eq!(record.outcome, Outcome::Completed, "{record:?}");
    assert_eq!(record.server, S1);
    assert_eq!(record.alert, 1200);
    assert_eq!(record.session_id, "00AB");
    assert_eq!(record.messages_sent, 3);
    assert_eq!(record.commands_executed, 9);
    assert_eq!(record.trailing_bytes, 0);
    assert!(!record.zero_nonce);

    {
        let server = server.lock().unwrap();
        assert_eq!(server.received.len(), 3);
        // Package #1.
        let p1 = &server.received[0];
        assert_eq!(p1.hdr.ver_dtd, "1.2");
        assert_eq!(p1.hdr.ver_proto, "DM/1.2");
        assert_eq!(p1.hdr.session_id, "00AB");
        assert_eq!(p1.hdr.msg_id, "1");
        assert_eq!(p1.hdr.target.loc_uri, url);
        assert_eq!(p1.hdr.source.loc_uri, dev);
        let cred = p1.hdr.cred.as_ref().unwrap();
        assert_eq!(cred.meta.type_.as_deref(), Some(auth::AUTH_MD5));
        assert_eq!(cred.meta.format.as_deref(), Some("b64"));
        assert!(p1.hdr.meta.as_ref().unwrap().max_msg_size.is_some());
        assert!(p1.body.final_);
        let Command::Alert(alert) = &p1.body.commands[0] else {
            panic!("package #1 starts with an Alert")
        };
        assert_eq!(alert.data, AlertCode::ServerInitiatedMgmt);
        let Command::Replace(devinfo) = &p1.body.commands[1] else {
            panic!("then a Replace of ./DevInfo")
        };
        let reported: Vec<(String, String)> = devinfo
            .items
            .iter()
            .map(|i| {
                (
                    i.source.as_ref().unwrap().loc_uri.clone(),
                    i.data.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            reported,
            vec![
                ("./DevInfo/DevId".to_string(), dev.to_string()),
                ("./DevInfo/Man".to_string(), "Acme".to_string()),
                ("./DevInfo/Mod".to_string(), "X100".to_string()),
                ("./DevInfo/DmV".to_string(), "1.2".to_string()),
                ("./DevInfo/Lang".to_string(), "en-US".to_string()),
            ]
        );

        // The answer to the first batch.
        let a1 = &server.received[1];
        assert_eq!(a1.hdr.msg_id, "2");
        assert_eq!(a1.hdr.session_id, "00AB");
        assert!(
            a1.hdr.cred.is_none(),
            "only package #1 carries the device's Cred"
        );
        assert_eq!(
            statuses(a1),
            vec![
                ("SyncHdr".into(), "0".into(), 212),
                ("Get".into(), "10".into(), 200),
                ("Replace".into(), "11".into(), 200),
                ("Atomic".into(), "12".into(), 200),
                ("Add".into(), "13".into(), 200),
                ("Add".into(), "14".into(), 200),
                ("Replace".into(), "15".into(), 200),
                ("Get".into(), "16".into(), 405),
                ("Get".into(), "17".into(), 200),
            ]
        );
        let Command::Status(hdr_status) = &a1.body.commands[0] else {
            panic!()
        };
        let chal = hdr_status.chal.as_ref().expect("212 carries a Chal");
        assert_eq!(chal.meta.type_.as_deref(), Some(auth::AUTH_MD5));
        let results: Vec<(String, String, String)> = a1
            .body
            .commands
            .iter()
            .filter_map(|c| match c {
                Command::Results(r) => Some(r),
                _ => None,
            })
            .flat_map(|r| r.items.iter())
            .map(|i| {
                (
                    i.source.as_ref().unwrap().loc_uri.clone(),
                    i.meta.as_ref().unwrap().format.clone().unwrap(),
                    i.data.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            results,
            vec![
                ("./DevInfo/Man".into(), "chr".into(), "Acme".into()),
                (
                    "./Vendor/Acme/Apps/App2?prop=ACL".into(),
                    "chr".into(),
                    "Get=dms1.example+dms2.example&Replace=dms1.example".into()
                ),
            ]
        );
        assert!(!format!("{:?}", server.received).contains(S1_SECRET));

        // The answer to the failing Atomic: rolled back.
        let a2 = &server.received[2];
        assert_eq!(a2.hdr.msg_id, "3");
        assert_eq!(
            statuses(a2),
            vec![
                ("SyncHdr".into(), "0".into(), 212),
                ("Atomic".into(), "20".into(), 507),
                ("Replace".into(), "21".into(), 216),
                ("Delete".into(), "22".into(), 404),
            ]
        );

        // Nonce handover: the device handed a fresh server nonce in each answer, the server used each in
        // its next Cred (else the device would have refused it); the device keeps the last one. The client
        // nonce is the last one the server handed.
        assert_eq!(server.handed_by_device.len(), 2);
        assert_ne!(server.handed_by_device[0], server.handed_by_device[1]);
        assert_eq!(server.handed_by_device[1].len(), 16);
        assert_eq!(nonce_of(&fleet, dev, SRVCRED_DATA), server.srv_nonce);
        assert_eq!(nonce_of(&fleet, dev, CLCRED_DATA), server.cli_nonce);
        assert_eq!(server.cli_nonce, b"client-nonce-1");

        // The tree changed as commanded.
        assert_eq!(
            value(&fleet, dev, "./Vendor/Acme/Settings/Volume").unwrap(),
            "7"
        );
        assert_eq!(
            value(&fleet, dev, "./Vendor/Acme/Apps/App2/Version").unwrap(),
            "2.0"
        );
        assert_eq!(
            value(&fleet, dev, "./Vendor/Acme/Settings/Brightness").unwrap(),
            "80"
        );
    }

    // Inspection over HTTP.
    let http = reqwest::Client::new();
    let ids: Vec<String> = serde_json::from_slice(
        &http
            .get(format!("{base}/devices"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(ids, vec![dev.to_string()]);
    let resp = http
        .get(format!("{base}/devices/{dev}/tree"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        tnds::CONTENT_TYPE
    );
    let text = resp.text().await.unwrap();
    assert!(!text.contains(S1_SECRET) && !text.contains(CLIENT_SECRET));
    let doc = tnds::decode(text.as_bytes()).unwrap();
    let tree = dm_protocol::tree::DmTree::from_tnds(&doc).unwrap();
    assert_eq!(
        tree.acl(&dev_uri("./Vendor/Acme/Apps/App2"))
            .unwrap()
            .to_string(),
        "Get=dms1.example+dms2.example&Replace=dms1.example"
    );
    let full = http
        .get(format!("{base}/devices/{dev}/tree?secrets=true"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let full = tnds::decode(full.as_bytes()).unwrap();
    assert!(same_tree(&full, &fleet.export(dev).unwrap(), &[]).is_ok());
    let sessions: serde_json::Value = serde_json::from_slice(
        &http
            .get(format!("{base}/devices/{dev}/sessions"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(sessions[0]["outcome"], "completed");
    assert_eq!(sessions[0]["server"], S1);
    assert_eq!(sessions[0]["alert"], 1200);
    assert_eq!(sessions[0]["commands_executed"], 9);
    let missing = http
        .get(format!("{base}/devices/nope/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
}

#[tokio::test]
async fn wrong_client_nonce_is_retried_once_with_the_challenge() {
    // The server expects another client nonce than the device holds: 401 + Chal, then a retry.
    let mut state = ServerState::new(S1, S1_SECRET, b"srv-nonce-0", b"something-else");
    state
        .script
        .push_back(vec![replace("5", "./DevInfo/Lang", "de-DE")]);
    let (server, url) = start_server(state).await;
    let fleet = Fleet::new();
    let dev = "IMEI:2";
    fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
    let base = start_fleet(&fleet).await;
    let body = package0_bytes(S1, 7, S1_SECRET, b"srv-nonce-0");
    assert_eq!(post_package0(&base, dev, body).await, 202);
    let record = fleet.wait_for_sessions(dev, 1, WAIT).await.unwrap()[0].clone();
    assert_eq!(record.outcome, Outcome::Completed, "{record:?}");
    assert_eq!(record.messages_sent, 3);
    let server = server.lock().unwrap();
    let ids: Vec<&str> = server
        .received
        .iter()
        .map(|m| m.hdr.msg_id.as_str())
        .collect();
    assert_eq!(ids, vec!["1", "2", "3"]);
    assert!(
        matches!(&server.received[1].body.commands[1], Command::Alert(a) if a.data.code() == 1200)
    );
    assert_eq!(value(&fleet, dev, "./DevInfo/Lang").unwrap(), "de-DE");
    assert_eq!(nonce_of(&fleet, dev, CLCRED_DATA), server.cli_nonce);
    assert_eq!(server.cli_nonce, b"client-nonce-2");
    // The resent package #1 answers the server's header first (212) with a fresh server nonce: the one
    // the server's 401 answer used is never accepted again.
    assert_eq!(
        statuses(&server.received[1]),
        vec![("SyncHdr".to_string(), "0".to_string(), 212)]
    );
    assert_eq!(server.handed_by_device.len(), 2);
    assert_ne!(server.handed_by_device[0], b"srv-nonce-0");
}

#[tokio::test]
async fn the_server_nonce_of_a_401_answer_is_not_accepted_twice() {
    // A server that keeps using the nonce of its 401 answer after the device handed over a new one.
    let mut state = ServerState::new(S1, S1_SECRET, b"srv-nonce-0", b"something-else");
    state.ignore_handed_nonces = true;
    state
        .script
        .push_back(vec![replace("5", "./DevInfo/Lang", "de-DE")]);
    let (_server, url) = start_server(state).await;
    let fleet = Fleet::new();
    let dev = "IMEI:2b";
    fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
    let record = fleet
        .run_session(dev, S1, dm_client::Trigger::Client)
        .await
        .unwrap();
    assert_eq!(
        record.outcome,
        Outcome::AuthFailed {
            code: 401,
            side: AuthSide::Server
        },
        "{record:?}"
    );
    assert_eq!(record.commands_executed, 0);
    assert_eq!(value(&fleet, dev, "./DevInfo/Lang").unwrap(), "en-US");
}

#[tokio::test]
async fn a_refused_client_credential_ends_the_session_after_one_retry() {
    let mut state = ServerState::new(S1, S1_SECRET, b"srv-nonce-0", b"cli-nonce-0");
    state.cli_secret = "not-the-device-password".into();
    state
        .script
        .push_back(vec![replace("5", "./DevInfo/Lang", "de-DE")]);
    let (server, url) = start_server(state).await;
    let fleet = Fleet::new();
    let dev = "IMEI:3";
    fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
    let record = fleet
        .run_session(dev, S1, dm_client::Trigger::Client)
        .await
        .unwrap();
    assert_eq!(
        record.outcome,
        Outcome::AuthFailed {
            code: 401,
            side: AuthSide::Client
        }
    );
    assert_eq!(record.messages_sent, 2);
    assert_eq!(record.commands_executed, 0);
    assert_eq!(server.lock().unwrap().received.len(), 2);
    assert_eq!(value(&fleet, dev, "./DevInfo/Lang").unwrap(), "en-US");
}

#[tokio::test]
async fn package0_answers() {
    let (server, url) = start_server(ServerState::new(
        S1,
        S1_SECRET,
        b"srv-nonce-0",
        b"cli-nonce-0",
    ))
    .await;
    let fleet = Fleet::new();
    let dev = "IMEI:4";
    fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
    let base = start_fleet(&fleet).await;
    let valid = package0_bytes(S1, 0x1234, S1_SECRET, b"srv-nonce-0");

    // A tampered byte in the digest or the header is a 401 and nothing happens. (A tampered server
    // identifier names another server: 404, no account for it.)
    for at in [0, 15, 17, 22] {
        let mut tampered = valid.clone();
        tampered[at] ^= 0x01;
        assert_eq!(post_package0(&base, dev, tampered).await, 401, "byte {at}");
    }
    // Signed with a wrong key, or a stale nonce.
    let wrong_key = package0_bytes(S1, 0x1234, "not-the-key", b"srv-nonce-0");
    assert_eq!(post_package0(&base, dev, wrong_key).await, 401);
    let stale = package0_bytes(S1, 0x1234, S1_SECRET, b"old");
    assert_eq!(post_package0(&base, dev, stale).await, 401);
    // Unknown device, unknown server, not a package #0.
    assert_eq!(
        post_package0(&base, "IMEI:nobody", valid.clone()).await,
        404
    );
    let other = package0_bytes("dms9.example", 1, S1_SECRET, b"srv-nonce-0");
    assert_eq!(post_package0(&base, dev, other).await, 404);
    let mut renamed = valid.clone();
    *renamed.last_mut().unwrap() ^= 0x01;
    assert_eq!(post_package0(&base, dev, renamed).await, 404);
    assert_eq!(post_package0(&base, dev, b"hello".to_vec()).await, 400);
    assert_eq!(post_package0(&base, dev, Vec::new()).await, 400);
    // None of these started a session (each was refused before anything was spawned).
    assert_eq!(fleet.sessions(dev).unwrap(), Vec::<SessionRecord>::new());
    assert!(server.lock().unwrap().received.is_empty());

    // The valid one: 202 and a session.
    assert_eq!(post_package0(&base, dev, valid).await, 202);
    let sessions = fleet.wait_for_sessions(dev, 1, WAIT).await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].outcome, Outcome::Completed);
    assert_eq!(sessions[0].session_id, "1234");
    assert_eq!(server.lock().unwrap().received.len(), 1);

    // A percent-encoded id reaches the same device.
    let encoded = package0_bytes(S1, 2, S1_SECRET, &nonce_of(&fleet, dev, SRVCRED_DATA));
    assert_eq!(post_package0(&base, "IMEI%3A4", encoded).await, 202);
    fleet.wait_for_sessions(dev, 2, WAIT).await.unwrap();
}

#[tokio::test]
async fn a_wrong_server_credential_gets_401_and_nothing_is_executed() {
    let mut state = ServerState::new(S1, "an-impostor-password", b"srv-nonce-0", b"cli-nonce-0");
    state.script.push_back(vec![
        replace("5", "./Vendor/Acme/Settings/Volume", "9"),
        Command::Atomic(Container::new("6", vec![delete("7", "./Vendor/Other")])),
        get("8", "./DevInfo/Man"),
    ]);
    let (server, url) = start_server(state).await;
    let fleet = Fleet::new();
    let dev = "IMEI:5";
    fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
    let before = fleet.export(dev).unwrap();
    let base = start_fleet(&fleet).await;
    // The package #0 itself is right (the impostor only fails inside the session).
    let body = package0_bytes(S1, 9, S1_SECRET, b"srv-nonce-0");
    assert_eq!(post_package0(&base, dev, body).await, 202);
    let record = fleet.wait_for_sessions(dev, 1, WAIT).await.unwrap()[0].clone();
    assert_eq!(
        record.outcome,
        Outcome::AuthFailed {
            code: 401,
            side: AuthSide::Server
        }
    );
    assert_eq!(record.commands_executed, 0);
    // B.1: the device answers 401 + Chal and reads on; the server may resend its credential twice;
    // its third refused message ends the session unanswered.
    assert_eq!(record.messages_sent, 3);
    let server = server.lock().unwrap();
    assert_eq!(server.received.len(), 3);
    let ids: Vec<&str> = server
        .received
        .iter()
        .map(|m| m.hdr.msg_id.as_str())
        .collect();
    assert_eq!(ids, vec!["1", "2", "3"]);
    let answer = &server.received[1];
    assert_eq!(
        statuses(answer),
        vec![
            ("SyncHdr".into(), "0".into(), 401),
            ("Replace".into(), "5".into(), 401),
            ("Atomic".into(), "6".into(), 401),
            ("Delete".into(), "7".into(), 401),
            ("Get".into(), "8".into(), 401),
        ]
    );
    // The server's second message (no commands) is refused the same way.
    assert_eq!(
        statuses(&server.received[2]),
        vec![("SyncHdr".into(), "0".into(), 401)]
    );
    for answer in &server.received[1..] {
        assert!(
            !answer
                .body
                .commands
                .iter()
                .any(|c| matches!(c, Command::Results(_)))
        );
        let Command::Status(hdr) = &answer.body.commands[0] else {
            panic!()
        };
        assert!(hdr.chal.is_some(), "the 401 carries a Chal");
    }
    // Nothing changed but the server nonce, which the device handed over in its Chals (B.7 ignores it).
    let after = fleet.export(dev).unwrap();
    assert!(same_tree(&before, &after, &[dev_uri("./DMAcc/dms1.example")]).is_ok());
    assert!(same_tree(&before, &after, &[]).is_err());
    assert_eq!(server.handed_by_device.len(), 2);
    assert_ne!(server.handed_by_device[0], server.handed_by_device[1]);
    assert_eq!(
        nonce_of(&fleet, dev, SRVCRED_DATA),
        server.handed_by_device[1]
    );
}

#[tokio::test]
async fn client_initiated_sessions_and_auto_connect() {
    let (server, url) = start_server(ServerState::new(
        S1,
        S1_SECRET,
        b"srv-nonce-0",
        b"cli-nonce-0",
    ))
    .await;
    let fleet = Fleet::new();
    let dev = "IMEI:6";
    fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
    let base = start_fleet(&fleet).await;
    let http = reqwest::Client::new();
    let connect = |server: &str| {
        let url = format!("{base}/devices/{dev}/connect?server={server}");
        let http = http.clone();
        async move { http.post(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(connect(S1).await, 202);
    let record = fleet.wait_for_sessions(dev, 1, WAIT).await.unwrap()[0].clone();
    assert_eq!(record.alert, 1201);
    assert_eq!(record.outcome, Outcome::Completed);
    assert_eq!(record.session_id.len(), 4);
    assert!(matches!(
        &server.lock().unwrap().received[0].body.commands[0],
        Command::Alert(a) if a.data == AlertCode::ClientInitiatedMgmt
    ));
    assert_eq!(connect("dms9.example").await, 404);
    let no_server = http
        .post(format!("{base}/devices/{dev}/connect"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_server.status().as_u16(), 400);
    let unknown = http
        .post(format!("{base}/devices/IMEI:none/connect?server={S1}"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);

    // A delegation record with AutoConnect=false: the device never connects by itself.
    fleet
        .with_device_mut(dev, |d| {
            let t = d.tree_mut();
            t.add_interior(&dev_uri("./DMAcc/dms1.example/Ext"))
                .unwrap();
            t.add_interior(&dev_uri("./DMAcc/dms1.example/Ext/Delegation"))
                .unwrap();
            t.add_leaf(
                &dev_uri("./DMAcc/dms1.example/Ext/Delegation/AutoConnect"),
                "false",
                None,
                None,
            )
            .unwrap();
        })
        .unwrap();
    assert_eq!(connect(S1).await, 409);
    assert_eq!(fleet.sessions(dev).unwrap().len(), 1);
}

#[tokio::test]
async fn an_unreachable_server_is_a_transport_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dm", listener.local_addr().unwrap());
    drop(listener);
    let fleet = Fleet::new();
    fleet.insert(Device::with_default_tree("IMEI:7", &account(&url)).unwrap());
    let record = fleet
        .run_session("IMEI:7", S1, dm_client::Trigger::Server { session_id: 1 })
        .await
        .unwrap();
    assert!(
        matches!(record.outcome, Outcome::TransportError { .. }),
        "{record:?}"
    );
    let err = fleet
        .wait_for_sessions("IMEI:7", 2, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(err.sessions.len(), 1);
}

/// DMS-1 provisions an account for DMS-2 (TEMP key as its server credential, AutoConnect=false, ACLs
/// of the scope handed over), then DMS-2 sends a package #0 signed with the TEMP key and manages the
/// scope, while it cannot touch what was not delegated.
#[tokio::test]
async fn a_delegated_server_gets_its_own_sessions() {
    const S2: &str = "dms2.example";
    const TEMP_KEY: &str = "dGVtcC1kZWxlZ2F0aW9uLWtleS0zMi1ieXRlcy4uLi4=";
    let s2_nonce = b"s2-nonce-0";
    let (server2, url2) = start_server({
        let mut s = ServerState::new(S2, TEMP_KEY, s2_nonce, b"s2-cli-nonce");
        s.cli_name = "client-for-s2".into();
        s.cli_secret = "s2-client-pw".into();
        s.script.push_back(vec![
            replace("11", "./Vendor/Acme/Apps/App1/Version", "9.9"),
            replace("12", "./Vendor/Acme/Settings/Volume", "0"),
            get("13", "./DevInfo/Man"),
        ]);
        s
    })
    .await;
    let mut s1 = ServerState::new(S1, S1_SECRET, b"srv-nonce-0", b"cli-nonce-0");
    let acc = "./DMAcc/dms2";
    let leaf = |id: &str, name: &str, v: &str| add_leaf(id, &format!("{acc}/{name}"), v);
    s1.script.push_back(vec![Command::Atomic(Container::new(
        "100",
        vec![
            add_node("101", acc),
            leaf("102", "AppID", "w7"),
            leaf("103", "ServerID", S2),
            add_node("104", &format!("{acc}/AppAddr")),
            add_node("105", &format!("{acc}/AppAddr/1")),
            leaf("106", "AppAddr/1/Addr", &url2),
            leaf("107", "AppAddr/1/AddrType", "URI"),
            add_node("108", &format!("{acc}/AppAuth")),
            add_node("109", &format!("{acc}/AppAuth/srv")),
            leaf("110", "AppAuth/srv/AAuthLevel", "SRVCRED"),
            leaf("111", "AppAuth/srv/AAuthType", "DIGEST"),
            leaf("112", "AppAuth/srv/AAuthName", S2),
            leaf("113", "AppAuth/srv/AAuthSecret", TEMP_KEY),
            leaf("114", "AppAuth/srv/AAuthData", &encode_nonce(s2_nonce)),
            add_node("115", &format!("{acc}/AppAuth/cli")),
            leaf("116", "AppAuth/cli/AAuthLevel", "CLCRED"),
            leaf("117", "AppAuth/cli/AAuthType", "DIGEST"),
            leaf("118", "AppAuth/cli/AAuthName", "client-for-s2"),
            leaf("119", "AppAuth/cli/AAuthSecret", "s2-client-pw"),
            leaf(
                "120",
                "AppAuth/cli/AAuthData",
                &encode_nonce(b"s2-cli-nonce"),
            ),
            add_node("121", &format!("{acc}/Ext")),
            add_node("122", &format!("{acc}/Ext/Delegation")),
            leaf("123", "Ext/Delegation/AutoConnect", "false"),
            replace(
                "124",
                &format!("{acc}?prop=ACL"),
                &format!("Add={S1}&Delete={S1}&Get={S1}+{S2}&Replace={S1}"),
            ),
            replace(
                "125",
                "./Vendor/Acme/Apps?prop=ACL",
                &format!("Add={S2}&Delete={S2}&Exec={S2}&Get={S2}+{S1}&Replace={S2}"),
            ),
        ],
    ))]);
    let (server1, url1) = start_server(s1).await;
    let fleet = Fleet::new();
    let dev = "IMEI:8";
    fleet.insert(Device::with_default_tree(dev, &account(&url1)).unwrap());
    let base = start_fleet(&fleet).await;

    assert_eq!(
        post_package0(&base, dev, package0_bytes(S1, 1, S1_SECRET, b"srv-nonce-0")).await,
        202
    );
    let first = fleet.wait_for_sessions(dev, 1, WAIT).await.unwrap();
    assert_eq!(first[0].outcome, Outcome::Completed);
    let codes: Vec<u16> = statuses(&server1.lock().unwrap().received[1])
        .into_iter()
        .map(|s| s.2)
        .collect();
    assert!(codes.iter().all(|c| *c == 200 || *c == 212), "{codes:?}");

    // The device may not connect to DMS-2 by itself.
    let http = reqwest::Client::new();
    let refused = http
        .post(format!("{base}/devices/{dev}/connect?server={S2}"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 409);
    // A package #0 from DMS-2 signed with the TEMP key starts a session with DMS-2.
    assert_eq!(
        post_package0(&base, dev, package0_bytes(S2, 2, S1_SECRET, s2_nonce)).await,
        401
    );
    assert_eq!(
        post_package0(&base, dev, package0_bytes(S2, 2, TEMP_KEY, s2_nonce)).await,
        202
    );
    let both = fleet.wait_for_sessions(dev, 2, WAIT).await.unwrap();
    assert_eq!(both[1].server, S2);
    assert_eq!(both[1].outcome, Outcome::Completed, "{:?}", both[1]);
    let server2 = server2.lock().unwrap();
    assert_eq!(
        statuses(&server2.received[1]),
        vec![
            ("SyncHdr".into(), "0".into(), 212),
            ("Replace".into(), "11".into(), 200),
            ("Replace".into(), "12".into(), 425),
            ("Get".into(), "13".into(), 200),
        ]
    );
    assert_eq!(
        value(&fleet, dev, "./Vendor/Acme/Apps/App1/Version").unwrap(),
        "9.9"
    );
    assert_eq!(
        value(&fleet, dev, "./Vendor/Acme/Settings/Volume").unwrap(),
        "5"
    );
    // DMS-2's nonces live in its own account; DMS-1's are untouched by that session.
    assert_eq!(
        nonce_of(&fleet, dev, "./DMAcc/dms2/AppAuth/srv/AAuthData"),
        server2.srv_nonce
    );
    assert_eq!(
        nonce_of(&fleet, dev, "./DMAcc/dms2/AppAuth/cli/AAuthData"),
        server2.cli_nonce
    );
    assert_eq!(
        nonce_of(&fleet, dev, SRVCRED_DATA),
        server1.lock().unwrap().srv_nonce
    );
}

// ------------------------------------------------------------------------------------------------
// Re-challenge, nonce resynchronisation and the field quirks (PROTOCOL.md B.1, B.6)
// ------------------------------------------------------------------------------------------------

const ZERO: [u8; 4] = [0; 4];

fn quirky_fleet(quirks: &str) -> Fleet {
    Fleet::with_config(SessionConfig {
        quirks: quirks.parse().unwrap(),
        ..SessionConfig::default()
    })
}

#[tokio::test]
async fn a_server_that_resends_its_credential_over_the_new_nonce_goes_on() {
    for wrong in [1usize, 2] {
        let mut state = ServerState::new(S1, S1_SECRET, b"srv-nonce-0", b"cli-nonce-0");
        state.wrong_creds = wrong as u32;
        for _ in 0..wrong {
            state
                .script
                .push_back(vec![replace("5", "./DevInfo/Lang", "xx")]);
        }
        state
            .script
            .push_back(vec![replace("6", "./Vendor/Acme/Settings/Volume", "7")]);
        let (server, url) = start_server(state).await;
        let fleet = Fleet::new();
        let dev = "IMEI:rc";
        fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
        let base = start_fleet(&fleet).await;
        let body = package0_bytes(S1, 3, S1_SECRET, b"srv-nonce-0");
        assert_eq!(post_package0(&base, dev, body).await, 202);
        let record = fleet.wait_for_sessions(dev, 1, WAIT).await.unwrap()[0].clone();
        assert_eq!(record.outcome, Outcome::Completed, "{wrong}: {record:?}");
        // Package #1, one 401 answer per refused message, the answer to the commands.
        assert_eq!(record.messages_sent as usize, wrong + 2);
        assert_eq!(record.commands_executed, 1);
        let server = server.lock().unwrap();
        let ids: Vec<String> = server
            .received
            .iter()
            .map(|m| m.hdr.msg_id.clone())
            .collect();
        let want: Vec<String> = (1..=wrong + 2).map(|i| i.to_string()).collect();
        assert_eq!(ids, want);
        for refusal in &server.received[1..=wrong] {
            assert_eq!(
                statuses(refusal),
                vec![
                    ("SyncHdr".into(), "0".into(), 401),
                    ("Replace".into(), "5".into(), 401)
                ]
            );
            let Command::Status(hdr) = &refusal.body.commands[0] else {
                panic!()
            };
            assert!(hdr.chal.is_some(), "the 401 carries a Chal");
        }
        // The message whose Cred used the device's new nonce was executed.
        assert_eq!(
            statuses(&server.received[wrong + 1]),
            vec![
                ("SyncHdr".into(), "0".into(), 212),
                ("Replace".into(), "6".into(), 200)
            ]
        );
        assert_eq!(server.handed_by_device.len(), wrong + 1);
        assert_eq!(
            value(&fleet, dev, "./Vendor/Acme/Settings/Volume").unwrap(),
            "7"
        );
        assert_eq!(value(&fleet, dev, "./DevInfo/Lang").unwrap(), "en-US");
        assert_eq!(nonce_of(&fleet, dev, SRVCRED_DATA), server.srv_nonce);
    }
}

#[tokio::test]
async fn a_package0_that_verifies_only_with_the_zero_nonce_opens_a_zero_nonce_session() {
    // The server expects package #1's Cred over the zero nonce.
    let (server, url) = start_server(ServerState::new(S1, S1_SECRET, b"srv-nonce-0", &ZERO)).await;
    let fleet = Fleet::new();
    let dev = "IMEI:z";
    fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
    let base = start_fleet(&fleet).await;
    // Wrong with the stored nonce and with the zero nonce: 401, nothing happens.
    let stale = package0_bytes(S1, 1, S1_SECRET, b"stale");
    assert_eq!(post_package0(&base, dev, stale).await, 401);
    let wrong_key = package0_bytes(S1, 1, "not-the-key", &ZERO);
    assert_eq!(post_package0(&base, dev, wrong_key).await, 401);
    assert!(fleet.sessions(dev).unwrap().is_empty());

    let zero = package0_bytes(S1, 2, S1_SECRET, &ZERO);
    assert_eq!(post_package0(&base, dev, zero).await, 202);
    let record = fleet.wait_for_sessions(dev, 1, WAIT).await.unwrap()[0].clone();
    assert_eq!(record.outcome, Outcome::Completed, "{record:?}");
    assert!(record.zero_nonce);
    {
        let server = server.lock().unwrap();
        let cred = server.received[0].hdr.cred.as_ref().unwrap();
        assert!(auth::verify_cred(cred, CLIENT, CLIENT_SECRET, &ZERO).is_ok());
        assert!(auth::verify_cred(cred, CLIENT, CLIENT_SECRET, b"cli-nonce-0").is_err());
    }

    // With the stored nonce again: a normal session, Cred over the stored CLCRED nonce.
    let stored = nonce_of(&fleet, dev, SRVCRED_DATA);
    let accepted = fleet
        .package0(dev, &package0_bytes(S1, 3, S1_SECRET, &stored))
        .unwrap();
    assert!(!accepted.zero_nonce);
    let record = fleet.wait_for_sessions(dev, 2, WAIT).await.unwrap()[1].clone();
    assert_eq!(record.outcome, Outcome::Completed, "{record:?}");
    assert!(!record.zero_nonce);
    let server = server.lock().unwrap();
    let cred = server.received[1].hdr.cred.as_ref().unwrap();
    assert!(auth::verify_cred(cred, CLIENT, CLIENT_SECRET, b"client-nonce-1").is_ok());
}

#[tokio::test]
async fn forget_nonce_loses_the_server_nonce_and_the_zero_nonce_brings_the_server_back() {
    let mut state = ServerState::new(S1, S1_SECRET, b"srv-nonce-0", b"cli-nonce-0");
    // Session 1: one batch, then the end. Session 2: the server's first message uses the nonce the
    // device forgot (refused), the second the nonce of the device's Chal.
    state
        .script
        .push_back(vec![replace("5", "./Vendor/Acme/Settings/Volume", "7")]);
    state.script.push_back(Vec::new());
    for _ in 0..2 {
        state
            .script
            .push_back(vec![replace("6", "./Vendor/Acme/Settings/Brightness", "1")]);
    }
    let (server, url) = start_server(state).await;
    let fleet = quirky_fleet("forget-nonce");
    let dev = "IMEI:f";
    fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
    let base = start_fleet(&fleet).await;
    let body = package0_bytes(S1, 1, S1_SECRET, b"srv-nonce-0");
    assert_eq!(post_package0(&base, dev, body).await, 202);
    let first = fleet.wait_for_sessions(dev, 1, WAIT).await.unwrap()[0].clone();
    assert_eq!(first.outcome, Outcome::Completed, "{first:?}");
    assert!(!first.zero_nonce);

    // The device no longer holds the nonce it handed the server.
    let known = server.lock().unwrap().srv_nonce.clone();
    let held = nonce_of(&fleet, dev, SRVCRED_DATA);
    assert_eq!(known, server.lock().unwrap().handed_by_device[0]);
    assert_ne!(held, known);
    assert_eq!(held.len(), 16);
    let refused = package0_bytes(S1, 2, S1_SECRET, &known);
    assert_eq!(post_package0(&base, dev, refused).await, 401);

    // Resynchronisation: the zero nonce opens a session, and the server's credential is challenged.
    server.lock().unwrap().cli_nonce = ZERO.to_vec();
    let zero = package0_bytes(S1, 3, S1_SECRET, &ZERO);
    assert_eq!(post_package0(&base, dev, zero).await, 202);
    let second = fleet.wait_for_sessions(dev, 2, WAIT).await.unwrap()[1].clone();
    assert_eq!(second.outcome, Outcome::Completed, "{second:?}");
    assert!(second.zero_nonce);
    assert_eq!(second.messages_sent, 3);
    assert_eq!(second.commands_executed, 1);
    assert_eq!(
        value(&fleet, dev, "./Vendor/Acme/Settings/Brightness").unwrap(),
        "1"
    );
    let server = server.lock().unwrap();
    assert_eq!(
        statuses(&server.received[3])[0],
        ("SyncHdr".into(), "0".into(), 401)
    );
    // Forgotten again at the end of that session.
    assert_ne!(nonce_of(&fleet, dev, SRVCRED_DATA), server.srv_nonce);
}

#[tokio::test]
async fn without_forget_nonce_the_device_keeps_the_nonce_it_handed_over() {
    let (server, url) = start_server(ServerState::new(
        S1,
        S1_SECRET,
        b"srv-nonce-0",
        b"cli-nonce-0",
    ))
    .await;
    let fleet = Fleet::new();
    let dev = "IMEI:k";
    fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
    let record = fleet.run_session(dev, S1, Trigger::Client).await.unwrap();
    assert_eq!(record.outcome, Outcome::Completed);
    // Only package #1 was answered (nothing to do): the server still uses its first nonce.
    assert_eq!(nonce_of(&fleet, dev, SRVCRED_DATA), b"srv-nonce-0");
    assert_eq!(server.lock().unwrap().srv_nonce, b"srv-nonce-0");
    // With the quirk, even a session without a single command loses it.
    let (_server, url) = start_server(ServerState::new(
        S1,
        S1_SECRET,
        b"srv-nonce-0",
        b"cli-nonce-0",
    ))
    .await;
    let fleet = quirky_fleet("forget-nonce");
    fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
    let record = fleet.run_session(dev, S1, Trigger::Client).await.unwrap();
    assert_eq!(record.outcome, Outcome::Completed);
    assert_eq!(record.messages_sent, 1);
    assert_ne!(nonce_of(&fleet, dev, SRVCRED_DATA), b"srv-nonce-0");
}

#[tokio::test]
async fn trailing_bytes_are_counted_and_the_quirk_puts_the_last_ones_before_the_next_message() {
    for quirk in [false, true] {
        let mut state = ServerState::new(S1, S1_SECRET, b"srv-nonce-0", b"cli-nonce-0");
        // Three server messages: "\n" after the first, nothing after the second, " \t\n" after the
        // third.
        state.trailers = vec![b"\n".to_vec(), Vec::new(), b" \t\n".to_vec()];
        state.script.push_back(vec![get("5", "./DevInfo/Man")]);
        state.script.push_back(vec![get("6", "./DevInfo/Mod")]);
        let (server, url) = start_server(state).await;
        let fleet = quirky_fleet(if quirk { "trailing-bytes" } else { "" });
        let dev = "IMEI:t";
        fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
        let record = fleet.run_session(dev, S1, Trigger::Client).await.unwrap();
        assert_eq!(record.outcome, Outcome::Completed, "{record:?}");
        assert_eq!(record.trailing_bytes, 4);
        assert_eq!(record.commands_executed, 2);
        let server = server.lock().unwrap();
        assert_eq!(server.raw.len(), 3);
        assert!(server.raw[0].starts_with(b"<?xml"));
        if quirk {
            // The first message's "\n" before the second device message; nothing (not an old
            // leftover) before the third.
            assert!(server.raw[1].starts_with(b"\n<?xml"), "{quirk}");
            assert!(server.raw[2].starts_with(b"<?xml"), "{quirk}");
        } else {
            assert!(server.raw[1].starts_with(b"<?xml"), "{quirk}");
            assert!(server.raw[2].starts_with(b"<?xml"), "{quirk}");
        }
    }
}

#[tokio::test]
async fn nul_in_lists_ends_a_child_list_with_a_nul_byte() {
    for quirk in [false, true] {
        let mut state = ServerState::new(S1, S1_SECRET, b"srv-nonce-0", b"cli-nonce-0");
        state.script.push_back(vec![
            get("5", "./Vendor"),
            get("6", "./Vendor/Acme/Settings/Volume"),
        ]);
        let (server, url) = start_server(state).await;
        let fleet = quirky_fleet(if quirk { "nul-in-lists" } else { "" });
        let dev = "IMEI:n";
        fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
        let record = fleet.run_session(dev, S1, Trigger::Client).await.unwrap();
        assert_eq!(record.outcome, Outcome::Completed, "{record:?}");
        let server = server.lock().unwrap();
        let raw = &server.raw[1];
        let contains = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
        let nuls = raw.iter().filter(|b| **b == 0).count();
        if quirk {
            assert!(contains(b"<Data>Acme/Other\0</Data>"));
            assert_eq!(nuls, 1, "only the child list");
            assert!(contains(b"<Data>5</Data>"));
            // NUL is not XML: a strict reader refuses the message.
            assert!(syncml::decode(raw).is_err());
        } else {
            assert!(contains(b"<Data>Acme/Other</Data>"));
            assert_eq!(nuls, 0);
            assert!(syncml::decode(raw).is_ok());
        }
    }
}

#[tokio::test]
async fn text_nonce_uses_a_text_aauthdata_verbatim_and_a_b64_one_as_bytes() {
    const S2: &str = "dms2.example";
    const S2_SECRET: &str = "s2-password";
    let s2_data = "./DMAcc/dms2/AppAuth/srv/AAuthData";
    for quirk in [false, true] {
        let mut s1 = ServerState::new(S1, S1_SECRET, b"srv-nonce-0", b"cli-nonce-0");
        let acc = "./DMAcc/dms2";
        let leaf = |id: &str, name: &str, v: &str| add_leaf(id, &format!("{acc}/{name}"), v);
        // Session 1: DMS-2's account, its nonce sent as text ("abcd" is valid base64 too).
        s1.script.push_back(vec![
            add_node("10", acc),
            leaf("11", "AppID", "w7"),
            leaf("12", "ServerID", S2),
            add_node("13", &format!("{acc}/AppAddr")),
            add_node("14", &format!("{acc}/AppAddr/1")),
            // Nothing listens there: a session this test starts with DMS-2 ends at once.
            leaf("15", "AppAddr/1/Addr", "http://127.0.0.1:1/dm"),
            leaf("16", "AppAddr/1/AddrType", "URI"),
            add_node("17", &format!("{acc}/AppAuth")),
            add_node("18", &format!("{acc}/AppAuth/srv")),
            leaf("19", "AppAuth/srv/AAuthLevel", "SRVCRED"),
            leaf("20", "AppAuth/srv/AAuthType", "DIGEST"),
            leaf("21", "AppAuth/srv/AAuthName", S2),
            leaf("22", "AppAuth/srv/AAuthSecret", S2_SECRET),
            leaf("23", "AppAuth/srv/AAuthData", "abcd"),
        ]);
        s1.script.push_back(Vec::new());
        // Session 2: the nonce replaced by base64 bytes with Format b64.
        s1.script.push_back(vec![Command::Replace(ItemCommand::new(
            "30",
            vec![
                Item::target(s2_data)
                    .with_data(encode_nonce(b"bytes\x00nonce"))
                    .with_meta(Meta {
                        format: Some("b64".into()),
                        ..Meta::default()
                    }),
            ],
        ))]);
        let (_server, url) = start_server(s1).await;
        let fleet = quirky_fleet(if quirk { "text-nonce" } else { "" });
        let dev = "IMEI:tn";
        fleet.insert(Device::with_default_tree(dev, &account(&url)).unwrap());
        let base = start_fleet(&fleet).await;
        let record = fleet.run_session(dev, S1, Trigger::Client).await.unwrap();
        assert_eq!(record.outcome, Outcome::Completed, "{record:?}");
        assert_eq!(value(&fleet, dev, s2_data).unwrap(), "abcd");

        let over = |nonce: &[u8]| package0_bytes(S2, 7, S2_SECRET, nonce);
        let as_text = post_package0(&base, dev, over(b"abcd")).await;
        let decoded = post_package0(&base, dev, over(&decode_nonce("abcd").unwrap())).await;
        if quirk {
            assert_eq!((as_text, decoded), (202, 401));
        } else {
            assert_eq!((as_text, decoded), (401, 202));
        }

        let record = fleet.run_session(dev, S1, Trigger::Client).await.unwrap();
        assert_eq!(record.outcome, Outcome::Completed, "{record:?}");
        // Format b64: the bytes, quirk or not; never the base64 text.
        assert_eq!(
            post_package0(&base, dev, over(b"bytes\x00nonce")).await,
            202,
            "{quirk}"
        );
        let text = encode_nonce(b"bytes\x00nonce");
        assert_eq!(post_package0(&base, dev, over(text.as_bytes())).await, 401);
        let format = fleet
            .with_device(dev, |d| d.tree().get(&dev_uri(s2_data)).unwrap().format())
            .unwrap();
        assert_eq!(format, Some(tnds::Format::B64));
    }
}
