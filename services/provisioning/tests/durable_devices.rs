//! A restart is a non-event for the device channel (issue 10): the devices' credentials and the nonces in
//! force live sealed in the key-value store, so a restarted service opens its next session with a device
//! at once (no resynchronisation), and the configuration's seed does not overwrite what was rotated since.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dm_bus::Bus;
use dm_client::{DefaultAccount, Device, Fleet};
use dm_notification::{HttpPushChannel, Package0Channel};
use dm_protocol::auth;
use dm_protocol::syncml::{Command, Item, ItemCommand};
use dm_provisioning::{Config, DeviceCredentials, Job, JobOutcome, Provisioning};
use dm_seal::MasterKey;
use tokio::sync::mpsc::UnboundedReceiver;

const D1: &str = "dms1.operator.example";
const DEV: &str = "IMEI:490154203237518";
const DEADLINE: Duration = Duration::from_secs(20);

struct Instance {
    p: Provisioning,
    outcomes: UnboundedReceiver<JobOutcome>,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(addr: SocketAddr, fleet_url: &str, devices: dm_bus::Kv, key: MasterKey) -> Instance {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let url = format!("http://{addr}/dm");
    let channel: Arc<dyn Package0Channel> = Arc::new(HttpPushChannel::new(fleet_url));
    let (p, outcomes) = Provisioning::new(Config::new(D1, url), channel);
    let p = p.with_device_store(devices, key);
    p.load_devices().await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(p.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    Instance {
        p,
        outcomes,
        stop,
        served,
    }
}

fn replace(uri: &str, value: &str) -> Command {
    Command::Replace(ItemCommand::new(
        "0",
        vec![Item::target(uri).with_data(value)],
    ))
}

async fn run(i: &mut Instance, value: &str) {
    let id =
        i.p.enqueue(DEV, Job::Commands(vec![replace("./DevInfo/Lang", value)]))
            .await
            .unwrap();
    let outcome = tokio::time::timeout(DEADLINE, i.outcomes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome.job_id, id);
    assert!(outcome.result.is_ok(), "{outcome:?}");
}

/// A device store, a fleet serving one device whose account has these secrets, and the address the
/// device channel keeps across restarts (as a deployment's does).
struct Setup {
    devices: dm_bus::Kv,
    key: MasterKey,
    fleet: Fleet,
    fleet_url: String,
    addr: SocketAddr,
    account: DefaultAccount,
}

async fn setup(server_secret: &str, client_secret: &str) -> Setup {
    let bus = Bus::in_process();
    let devices = bus.kv("dmd_dms1_devices", 1).await.unwrap();
    let fleet = Fleet::new();
    let fleet_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fleet_url = format!("http://{}", fleet_listener.local_addr().unwrap());
    let serving = fleet.clone();
    tokio::spawn(async move { serving.serve(fleet_listener, std::future::pending()).await });
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let account = DefaultAccount {
        server_id: D1.into(),
        addr: format!("http://{addr}/dm"),
        server_secret: server_secret.into(),
        server_nonce_b64: auth::encode_nonce(b"sn"),
        client_name: DEV.into(),
        client_secret: client_secret.into(),
        client_nonce_b64: auth::encode_nonce(b"cn"),
    };
    fleet.insert(Device::with_default_tree(DEV, &account).unwrap());
    Setup {
        devices,
        key: MasterKey::random(),
        fleet,
        fleet_url,
        addr,
        account,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_service_reaches_its_devices_with_the_nonces_in_force() {
    let Setup {
        devices,
        key,
        fleet,
        fleet_url,
        addr,
        account,
    } = setup("server-secret-value", "client-secret-value").await;
    let seed = DeviceCredentials {
        server_secret: account.server_secret.clone(),
        server_nonce_b64: account.server_nonce_b64.clone(),
        client_name: DEV.into(),
        client_secret: account.client_secret.clone(),
        client_nonce_b64: account.client_nonce_b64.clone(),
        ..Default::default()
    };

    let mut first = start(addr, &fleet_url, devices.clone(), key.clone()).await;
    first.p.seed_device(DEV, seed.clone()).await.unwrap();
    run(&mut first, "de").await;
    let in_force = first.p.credentials(DEV).unwrap();
    assert_ne!(in_force, seed, "the session moved the nonces on");
    let _ = first.stop.send(());
    first.served.await.unwrap().unwrap();

    // Restarted: what was stored wins over the configuration's seed.
    let mut second = start(addr, &fleet_url, devices.clone(), key.clone()).await;
    second.p.seed_device(DEV, seed).await.unwrap();
    assert_eq!(second.p.credentials(DEV).unwrap(), in_force);
    run(&mut second, "fr").await;
    let sessions = fleet.wait_for_sessions(DEV, 2, DEADLINE).await.unwrap();
    assert!(
        sessions.iter().all(|s| !s.zero_nonce),
        "no resynchronisation was needed: {sessions:?}"
    );

    // At rest the credentials are sealed, and open only with this master key.
    let stored = devices
        .get(&dm_bus::subjects::encode_key(DEV))
        .await
        .unwrap()
        .unwrap()
        .value;
    for secret in ["server-secret-value", "client-secret-value"] {
        assert!(!stored.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
    let (other, _) = Provisioning::new(
        Config::new(D1, "http://127.0.0.1:1/dm"),
        Arc::new(HttpPushChannel::new(&fleet_url)),
    );
    let other = other.with_device_store(devices, MasterKey::random());
    assert_eq!(other.load_devices().await.unwrap(), 0);
    assert!(other.credentials(DEV).is_none());
}

/// A replica sent the device new secrets (a resynchronisation's server secret, a delegated server's
/// rotation) and died before it heard that the device applied them: the secrets were stored as pending
/// before they went, so a replica that takes over reaches the device with them (package #0 over the
/// pending server secret, package #1 checked against the pending client secret) and makes them current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_sent_but_never_confirmed_still_reach_the_device() {
    // The device already holds the new secrets.
    let Setup {
        devices,
        key,
        fleet: _fleet,
        fleet_url,
        addr,
        account,
    } = setup("new-server-secret", "new-client-secret").await;
    let stored = DeviceCredentials {
        server_secret: "old-server-secret".into(),
        server_nonce_b64: account.server_nonce_b64.clone(),
        client_name: DEV.into(),
        client_secret: "old-client-secret".into(),
        client_nonce_b64: account.client_nonce_b64.clone(),
        pending_server_secret: Some("new-server-secret".into()),
        pending_client_secret: Some("new-client-secret".into()),
    };
    let mut replica = start(addr, &fleet_url, devices.clone(), key.clone()).await;
    replica.p.seed_device(DEV, stored).await.unwrap();
    run(&mut replica, "de").await;
    let now = replica.p.credentials(DEV).unwrap();
    assert_eq!(now.server_secret, "new-server-secret");
    assert_eq!(now.client_secret, "new-client-secret");
    assert_eq!(
        (now.pending_server_secret, now.pending_client_secret),
        (None, None)
    );
    // And it is what the store says too: the next replica starts from there.
    let _ = replica.stop.send(());
    replica.served.await.unwrap().unwrap();
    let mut next = start(addr, &fleet_url, devices, key).await;
    assert_eq!(
        next.p.credentials(DEV).unwrap().server_secret,
        "new-server-secret"
    );
    run(&mut next, "fr").await;
}
