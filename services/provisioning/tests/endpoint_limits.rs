//! The device endpoint's limits over real HTTP on loopback: a body over the limit is 413, a request whose
//! head or body does not arrive in time is cut off (408), an answer that is not ready in time is 503, and
//! past the messages in progress per device or in all the answer is 503 with `Retry-After`.
//!
//! To keep a message in progress, the device's owner (the `device_owners` bucket) is another "replica" on
//! the in-process bus that holds the forwarded messages until the test lets them go.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dm_bus::{Area, Bus, Headers, Names};
use dm_notification::{HttpPushChannel, Package0Channel};
use dm_provisioning::{Config, DeviceLimits, Provisioning};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(20);
const DM_TYPE: &str = "application/vnd.syncml.dm+xml";

/// A provisioning replica with `limits`, sharing the device channel over `bus`.
async fn endpoint(bus: &Bus, limits: DeviceLimits) -> (Provisioning, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let channel: Arc<dyn Package0Channel> = Arc::new(HttpPushChannel::new("http://127.0.0.1:9"));
    let config = Config {
        limits,
        ..Config::new("dms1.example", format!("http://{addr}/dm"))
    };
    let (p, _outcomes) = Provisioning::new(config, channel);
    let p = p
        .with_forwarding(bus.clone(), Names::new("dms1").unwrap())
        .await
        .unwrap();
    tokio::spawn(p.clone().serve(listener, std::future::pending()));
    (p, addr)
}

type Held = Arc<Mutex<Vec<dm_bus::Request>>>;

/// Another replica, `other`, owning `devices`: it holds every message forwarded to it.
async fn owner_that_holds(bus: &Bus, devices: &[&str]) -> Held {
    let names = Names::new("dms1").unwrap();
    let owners = bus
        .kv(&names.bucket("device_owners").unwrap(), 1)
        .await
        .unwrap();
    for dev in devices {
        owners
            .create(
                &dm_bus::subjects::encode_key(dev),
                Bytes::from_static(b"other"),
            )
            .await
            .unwrap();
    }
    let mut requests = bus
        .serve(
            &names
                .subject(Area::Req, "provisioning.device.other")
                .unwrap(),
            &names.queue_group("provisioning_other").unwrap(),
        )
        .await
        .unwrap();
    let held: Held = Arc::default();
    let keep = held.clone();
    tokio::spawn(async move {
        while let Some(r) = requests.next().await {
            keep.lock().unwrap().push(r);
        }
    });
    held
}

/// Answers every held message 200 (lets them go).
async fn release(held: &Held) {
    let all: Vec<_> = std::mem::take(&mut *held.lock().unwrap());
    for r in all {
        let mut h = Headers::new();
        h.insert("dmd-http-status", "200");
        h.insert("content-type", DM_TYPE);
        r.respond(h, Bytes::new()).await.unwrap();
    }
}

async fn wait_for_held(held: &Held, n: usize) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while held.lock().unwrap().len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} forwarded messages never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A DM message's header from `dev_id` (enough to route it; the decoder's verdict does not matter here).
fn message(dev_id: &str) -> String {
    format!(
        "<SyncML xmlns=\"SYNCML:SYNCML1.2\"><SyncHdr><VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto>\
         <SessionID>1</SessionID><MsgID>1</MsgID><Target><LocURI>http://dm/dm</LocURI></Target>\
         <Source><LocURI>{dev_id}</LocURI></Source></SyncHdr><SyncBody><Final/></SyncBody></SyncML>"
    )
}

/// What came back on one connection: the status and the raw answer.
struct Answer {
    status: u16,
    text: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        let head = self.text.split("\r\n\r\n").next().unwrap_or_default();
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Writes `head` and `body` on a new connection and reads until the server closes it.
async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> Answer {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer))
        .await
        .expect("the server neither answered nor closed")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Answer { status, text }
}

async fn post(addr: SocketAddr, body: &str) -> Answer {
    let head = format!(
        "POST /dm HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {DM_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    raw(addr, &head, body.as_bytes()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413() {
    let bus = Bus::in_process();
    let (_p, addr) = endpoint(
        &bus,
        DeviceLimits {
            max_body_bytes: 1024,
            ..DeviceLimits::default()
        },
    )
    .await;
    // Declared larger: refused before a byte of the body is read.
    let head = format!(
        "POST /dm HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {DM_TYPE}\r\nContent-Length: 1025\r\nConnection: close\r\n\r\n"
    );
    let a = raw(addr, &head, b"").await;
    assert_eq!(a.status, 413, "{}", a.text);
    assert!(a.text.contains("limit of 1024 bytes"), "{}", a.text);
    // Within the limit: not a 413 (an unknown device's message is refused for what it says).
    let small = message("IMEI:1");
    assert!(small.len() < 1024);
    let a = post(addr, &small).await;
    assert_ne!(a.status, 413, "{}", a.text);
    assert_ne!(a.status, 0, "{}", a.text);
    // The default is 2 MiB, checked the same way.
    assert_eq!(DeviceLimits::default().max_body_bytes, 2 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_does_not_arrive_or_is_not_answered_in_time_is_cut_off() {
    let bus = Bus::in_process();
    let held = owner_that_holds(&bus, &["IMEI:slow"]).await;
    let (_p, addr) = endpoint(
        &bus,
        DeviceLimits {
            request_timeout: Duration::from_millis(300),
            ..DeviceLimits::default()
        },
    )
    .await;
    // A body that stops halfway: 408 once the time is up.
    let head = format!(
        "POST /dm HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {DM_TYPE}\r\nContent-Length: 100\r\n\r\n"
    );
    let a = raw(addr, &head, b"<SyncML>").await;
    assert_eq!(a.status, 408, "{}", a.text);
    assert!(a.text.contains("did not arrive in time"), "{}", a.text);
    // A head that never ends: the connection is closed (hyper answers 408 or just closes).
    let a = raw(addr, "POST /dm HTTP/1.1\r\nHost: x\r\n", b"").await;
    assert!(a.status == 408 || a.text.is_empty(), "{}", a.text);
    // An answer that is not ready in time (the device's owner holds it): 503 with Retry-After.
    let a = post(addr, &message("IMEI:slow")).await;
    assert_eq!(a.status, 503, "{}", a.text);
    assert!(a.text.contains("not ready in time"), "{}", a.text);
    assert_eq!(a.header("retry-after").as_deref(), Some("1"), "{}", a.text);
    assert_eq!(held.lock().unwrap().len(), 1);
    release(&held).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_progress_per_device_and_in_all_are_capped_with_503_and_retry_after() {
    let bus = Bus::in_process();
    let held = owner_that_holds(&bus, &["IMEI:a", "IMEI:b", "IMEI:c"]).await;
    let (_p, addr) = endpoint(
        &bus,
        DeviceLimits {
            max_requests_per_device: 2,
            max_requests: 3,
            ..DeviceLimits::default()
        },
    )
    .await;
    let spawn_post =
        |dev: &'static str| tokio::spawn(async move { post(addr, &message(dev)).await });
    // Two of device a are in progress: a third of it must wait.
    let a1 = spawn_post("IMEI:a");
    let a2 = spawn_post("IMEI:a");
    wait_for_held(&held, 2).await;
    let a = post(addr, &message("IMEI:a")).await;
    assert_eq!(a.status, 503, "{}", a.text);
    assert!(
        a.text
            .contains("more than 2 messages of this device in progress"),
        "{}",
        a.text
    );
    assert_eq!(a.header("retry-after").as_deref(), Some("1"), "{}", a.text);
    // Device b has places of its own; then all three places are taken and device c must wait.
    let b1 = spawn_post("IMEI:b");
    wait_for_held(&held, 3).await;
    let c = post(addr, &message("IMEI:c")).await;
    assert_eq!(c.status, 503, "{}", c.text);
    assert!(
        c.text.contains("more than 3 device messages in progress"),
        "{}",
        c.text
    );
    assert_eq!(c.header("retry-after").as_deref(), Some("1"), "{}", c.text);
    // Once answered, the places are given back.
    release(&held).await;
    for h in [a1, a2, b1] {
        assert_eq!(h.await.unwrap().status, 200);
    }
    let c = spawn_post("IMEI:c");
    wait_for_held(&held, 1).await;
    release(&held).await;
    assert_eq!(c.await.unwrap().status, 200);
}
