//! What the provisioning tests set up alike: the simulated fleet on a real port, the device endpoint's
//! address, one device with simple credentials, and a front between the device and the service that
//! can act before each device message (take a lease over, kill nats-server).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::response::IntoResponse as _;
use bytes::Bytes;
use dm_client::{DefaultAccount, Device, Fleet};
use dm_notification::{HttpPushChannel, Package0Channel};
use dm_protocol::auth;
use dm_provisioning::{DeviceCredentials, Provisioning};

/// A fleet served over HTTP on a port of its own, and its address (package #0s go there).
pub async fn serve_fleet() -> (Fleet, String) {
    let fleet = Fleet::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let serving = fleet.clone();
    tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
    (fleet, url)
}

/// A listener for a device endpoint, and the address devices post to.
pub async fn dm_listener() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dm", listener.local_addr().unwrap());
    (listener, url)
}

/// The package #0 channel to the fleet at `fleet_url`.
pub fn push(fleet_url: &str) -> Arc<dyn Package0Channel> {
    Arc::new(HttpPushChannel::new(fleet_url))
}

/// The device's account for `server_id` at `addr`, with secrets "s" and "c".
pub fn account(dev_id: &str, server_id: &str, addr: &str) -> DefaultAccount {
    DefaultAccount {
        server_id: server_id.into(),
        addr: addr.into(),
        server_secret: "s".into(),
        server_nonce_b64: auth::encode_nonce(b"sn"),
        client_name: dev_id.into(),
        client_secret: "c".into(),
        client_nonce_b64: auth::encode_nonce(b"cn"),
    }
}

/// Adds device `dev_id` to the fleet with one [`account`], and returns what the server knows of it.
pub fn add_device(fleet: &Fleet, dev_id: &str, server_id: &str, addr: &str) -> DeviceCredentials {
    let account = account(dev_id, server_id, addr);
    assert!(fleet.insert(Device::with_default_tree(dev_id, &account).unwrap()));
    DeviceCredentials {
        server_secret: account.server_secret.clone(),
        server_nonce_b64: account.server_nonce_b64.clone(),
        client_name: dev_id.into(),
        client_secret: account.client_secret.clone(),
        client_nonce_b64: account.client_nonce_b64.clone(),
        ..Default::default()
    }
}

/// A device endpoint in front of `prov` on `listener`: before the device's message number `n` (from 0)
/// reaches the service, `before(n)` runs. Returns how many messages it passed on so far.
pub fn serve_front<F, Fut>(
    listener: tokio::net::TcpListener,
    prov: Provisioning,
    before: F,
) -> Arc<AtomicUsize>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    type Front = (
        Provisioning,
        Arc<AtomicUsize>,
        Arc<dyn Fn(usize) -> BoxedUnit + Send + Sync>,
    );
    type BoxedUnit = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;
    async fn pass(
        State((prov, seen, before)): State<Front>,
        headers: axum::http::HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        before(seen.fetch_add(1, Ordering::SeqCst)).await;
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let answer = prov.route_device(content_type, body).await;
        (
            axum::http::StatusCode::from_u16(answer.status).unwrap(),
            [("content-type", answer.content_type)],
            answer.body,
        )
            .into_response()
    }
    let seen = Arc::new(AtomicUsize::new(0));
    let before: Arc<dyn Fn(usize) -> BoxedUnit + Send + Sync> =
        Arc::new(move |n| Box::pin(before(n)) as BoxedUnit);
    let app = axum::Router::new()
        .route("/dm", axum::routing::post(pass))
        .with_state((prov, seen.clone(), before));
    tokio::spawn(async move { axum::serve(listener, app).await });
    seen
}

/// Queues `job` for `dev_id` and returns its outcome, which must come within `within`.
pub async fn run_job(
    prov: &Provisioning,
    outcomes: &mut tokio::sync::mpsc::UnboundedReceiver<dm_provisioning::JobOutcome>,
    dev_id: &str,
    job: dm_provisioning::Job,
    within: std::time::Duration,
) -> dm_provisioning::JobOutcome {
    let id = prov.enqueue(dev_id, job).await.unwrap();
    let outcome = tokio::time::timeout(within, outcomes.recv())
        .await
        .expect("the job's outcome in time")
        .unwrap();
    assert_eq!(outcome.job_id, id);
    outcome
}
