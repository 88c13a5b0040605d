//! What the device channel logs (issue 8, item 7): a session's start and end at info, each package at
//! debug, every refused device message at warn with its reason. Its own test binary: the subscriber is
//! process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use dm_notification::{ChannelError, Package0Channel};
use dm_protocol::auth;
use dm_protocol::codes::AlertCode;
use dm_protocol::syncml::{
    self, Alert, Command, Item, ItemCommand, Location, SyncBody, SyncHdr, SyncMl,
};
use dm_provisioning::{Config, DeviceCredentials, Job, Provisioning};

const D1: &str = "dms1.operator.example";
const DEV: &str = "IMEI:490154203237518";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(String::from)
            .collect()
    }
}

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

fn package1(dev: &str, target: &str, cred: Option<syncml::Cred>) -> String {
    let mut hdr = SyncHdr::new("42", "1", Location::new(target), Location::new(dev));
    hdr.cred = cred;
    syncml::encode(&SyncMl {
        hdr,
        body: SyncBody {
            commands: vec![
                Command::Alert(Alert::new("1", AlertCode::ServerInitiatedMgmt)),
                Command::Replace(ItemCommand::new(
                    "2",
                    vec![Item::source("./DevInfo/DevId").with_data(dev)],
                )),
            ],
            final_: true,
        },
    })
}

async fn post(url: &str, body: String) -> u16 {
    dm_client::session::http_client()
        .post(url)
        .header("content-type", syncml::CONTENT_TYPE_XML)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_packages_and_refusals_are_logged() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dm", listener.local_addr().unwrap());
    let (prov, mut outcomes) =
        Provisioning::new(Config::new(D1, url.clone()), Arc::new(NullChannel));
    tokio::spawn(prov.clone().serve(listener, std::future::pending()));
    prov.register_device(
        DEV,
        DeviceCredentials {
            server_secret: "server-secret".into(),
            server_nonce_b64: auth::encode_nonce(b"s"),
            client_name: DEV.into(),
            client_secret: "client-secret".into(),
            client_nonce_b64: auth::encode_nonce(b"c"),
            ..Default::default()
        },
    );

    // Refused: not decodable, unknown device, wrong credential.
    assert_eq!(post(&url, "<SyncML><SyncHdr>".into()).await, 400);
    assert_eq!(post(&url, package1("IMEI:0", &url, None)).await, 403);
    let wrong = auth::cred_md5(DEV, "not-the-secret", b"c");
    assert_eq!(post(&url, package1(DEV, &url, Some(wrong))).await, 200);
    // A session with work: it starts, and ends at once when the device's message is one it cannot
    // use (a second package #1 is fine too; here the job is a no-op restore).
    prov.enqueue(
        DEV,
        Job::Restore {
            plan_id: "none".into(),
        },
    )
    .await
    .unwrap();
    let nonce = auth::decode_nonce(&prov.credentials(DEV).unwrap().client_nonce_b64).unwrap();
    let right = auth::cred_md5(DEV, "client-secret", &nonce);
    assert_eq!(post(&url, package1(DEV, &url, Some(right))).await, 200);
    outcomes.recv().await.unwrap().result.unwrap();

    let lines = captured.lines();
    let has = |level: &str, needles: &[&str]| {
        lines
            .iter()
            .any(|l| l.contains(level) && needles.iter().all(|n| l.contains(n)))
    };
    assert!(has("WARN", &["refused (400)", "byte"]), "{lines:#?}");
    assert!(has("WARN", &["not known", "IMEI:0"]), "{lines:#?}");
    assert!(
        has("WARN", &["credential is wrong or missing", "status=401"]),
        "{lines:#?}"
    );
    assert!(
        has("INFO", &["DM session started", DEV, "initiated=\"server\""]),
        "{lines:#?}"
    );
    assert!(has("INFO", &["DM session ended", "restored"]), "{lines:#?}");
    assert!(
        has("DEBUG", &["DM package received", "size="]),
        "{lines:#?}"
    );
    assert!(has("DEBUG", &["DM package sent", "size="]), "{lines:#?}");
    // No secret in any line.
    for secret in ["server-secret", "client-secret", "not-the-secret"] {
        assert!(!lines.iter().any(|l| l.contains(secret)), "{secret}");
    }
}
