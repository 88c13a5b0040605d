//! Many simulated devices in one process, their package #0 endpoint and their sessions.
//!
//! HTTP interface ([`Fleet::router`]):
//!
//! | route | answer |
//! |---|---|
//! | `POST /devices/{dev_id}/package0` | 202 (a session starts), 400 not a package #0, 401 digest wrong with the stored server nonce and with the zero nonce (nothing happens), 404 unknown device or no account for that server |
//! | `POST /devices/{dev_id}/connect?server=S` | 202 (a client-initiated session starts), 400 no `server`, 404 unknown device or account, 409 the account's delegation record says `AutoConnect` = `false` |
//! | `GET /devices` | JSON array of the device ids, sorted |
//! | `GET /devices/{dev_id}/tree` | the TNDS export with ACLs (`application/vnd.syncml.dmtnds+xml`); `AAuthSecret` values are shown as `<redacted>` unless `?secrets=true` |
//! | `GET /devices/{dev_id}/sessions` | JSON array of [`SessionRecord`]s, oldest first |
//!
//! Sessions of one device run one at a time (a later one waits for the running one to end); the
//! device's tree is locked only while one message is built or executed.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dm_protocol::package0;
use dm_protocol::tnds::{self, MgmtTree, Node, NodeContent, SECRET_NODE_NAMES};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::device::Device;
use crate::session::{self, SessionConfig, SessionRecord, Trigger, ZERO_NONCE};

/// One device and what belongs to it.
struct Slot {
    device: Mutex<Device>,
    /// Held for a whole session: sessions of one device run one after the other.
    session_lock: tokio::sync::Mutex<()>,
    sessions: Mutex<Vec<SessionRecord>>,
}

struct Inner {
    devices: RwLock<HashMap<String, Arc<Slot>>>,
    http: reqwest::Client,
    /// Woken whenever a session record is added.
    recorded: Notify,
    config: SessionConfig,
}

/// A fleet of simulated devices. Cheap to clone (shared).
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("devices", &self.len())
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a package #0 was not accepted; [`Package0Error::http_status`] is the HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Package0Error {
    #[error("no such device")]
    UnknownDevice,
    #[error("not a package #0: {0}")]
    NotPackage0(String),
    #[error("the device has no account with a server credential for that server")]
    UnknownServer,
    #[error("the digest does not verify")]
    BadDigest,
    #[error("no runtime to run the session on")]
    Unavailable,
}

impl Package0Error {
    pub fn http_status(&self) -> u16 {
        match self {
            Package0Error::UnknownDevice | Package0Error::UnknownServer => 404,
            Package0Error::NotPackage0(_) => 400,
            Package0Error::BadDigest => 401,
            Package0Error::Unavailable => 503,
        }
    }
}

/// Why a client-initiated session was not started; [`ConnectError::http_status`] is the HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("no such device")]
    UnknownDevice,
    #[error("the device has no account for that server")]
    UnknownServer,
    #[error("the account's delegation record says AutoConnect=false")]
    AutoConnectDisabled,
    #[error("no runtime to run the session on")]
    Unavailable,
}

impl ConnectError {
    pub fn http_status(&self) -> u16 {
        match self {
            ConnectError::UnknownDevice | ConnectError::UnknownServer => 404,
            ConnectError::AutoConnectDisabled => 409,
            ConnectError::Unavailable => 503,
        }
    }
}

/// A package #0 the device accepted: the session it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub server: String,
    pub session_id: u16,
    /// The digest verified only with the zero nonce (B.1 resynchronisation): package #1's `Cred` is
    /// computed over it.
    pub zero_nonce: bool,
}

/// [`Fleet::wait_for_sessions`] gave up: what was recorded by then.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timed out waiting for {wanted} session(s) of {dev_id}: {} recorded", sessions.len())]
pub struct Timeout {
    pub dev_id: String,
    pub wanted: usize,
    pub sessions: Vec<SessionRecord>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fleet {
    /// An empty fleet with the default session settings.
    pub fn new() -> Self {
        Self::with_config(SessionConfig::default())
    }

    pub fn with_config(config: SessionConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                devices: RwLock::new(HashMap::new()),
                http: session::http_client(),
                recorded: Notify::new(),
                config,
            }),
        }
    }

    fn slot(&self, dev_id: &str) -> Option<Arc<Slot>> {
        let devices = self
            .inner
            .devices
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        devices.get(dev_id).cloned()
    }

    /// Adds a device. False (and nothing changes) when a device with that id is already there.
    pub fn insert(&self, device: Device) -> bool {
        let mut devices = self
            .inner
            .devices
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if devices.contains_key(device.dev_id()) {
            return false;
        }
        let id = device.dev_id().to_string();
        devices.insert(
            id,
            Arc::new(Slot {
                device: Mutex::new(device),
                session_lock: tokio::sync::Mutex::new(()),
                sessions: Mutex::new(Vec::new()),
            }),
        );
        true
    }

    /// Makes room for `additional` more devices.
    pub fn reserve(&self, additional: usize) {
        self.inner
            .devices
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .reserve(additional);
    }

    pub fn len(&self) -> usize {
        self.inner
            .devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device ids, sorted.
    pub fn device_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .inner
            .devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// Reads a device (locked for the duration of `f`).
    pub fn with_device<R>(&self, dev_id: &str, f: impl FnOnce(&Device) -> R) -> Option<R> {
        let slot = self.slot(dev_id)?;
        let device = lock(&slot.device);
        Some(f(&device))
    }

    /// Changes a device directly, without DM commands (test set-up, operator tools).
    pub fn with_device_mut<R>(&self, dev_id: &str, f: impl FnOnce(&mut Device) -> R) -> Option<R> {
        let slot = self.slot(dev_id)?;
        let mut device = lock(&slot.device);
        Some(f(&mut device))
    }

    /// The TNDS export of a device's whole tree, with ACLs and every value (secrets included).
    pub fn export(&self, dev_id: &str) -> Option<MgmtTree> {
        self.with_device(dev_id, Device::export)
    }

    /// The sessions a device has finished, oldest first.
    pub fn sessions(&self, dev_id: &str) -> Option<Vec<SessionRecord>> {
        let slot = self.slot(dev_id)?;
        let sessions = lock(&slot.sessions).clone();
        Some(sessions)
    }

    /// Waits until the device has finished at least `count` sessions, at most `timeout`; returns them
    /// all. Woken by each recorded session (no polling).
    pub async fn wait_for_sessions(
        &self,
        dev_id: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<SessionRecord>, Timeout> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.recorded.notified();
            tokio::pin!(notified);
            // Registered before the check, so a record added in between still wakes us.
            notified.as_mut().enable();
            let sessions = self.sessions(dev_id).unwrap_or_default();
            if sessions.len() >= count {
                return Ok(sessions);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Timeout {
                    dev_id: dev_id.to_string(),
                    wanted: count,
                    sessions: self.sessions(dev_id).unwrap_or_default(),
                });
            }
        }
    }

    /// Handles a package #0 for a device (docs/device-side.md): decodes it, finds the account whose
    /// ServerID is the notification's, checks the digest with that account's SRVCRED, and on success
    /// starts the session in the background. A digest that fails with the stored nonce is checked again
    /// with the zero nonce (B.1 resynchronisation); if that verifies, the session's package #1 `Cred`
    /// is computed over the zero nonce.
    pub fn package0(&self, dev_id: &str, bytes: &[u8]) -> Result<Accepted, Package0Error> {
        let slot = self.slot(dev_id).ok_or(Package0Error::UnknownDevice)?;
        let (_, notification) =
            package0::decode(bytes).map_err(|e| Package0Error::NotPackage0(e.to_string()))?;
        let server = notification.server_id;
        let zero_nonce = {
            let device = lock(&slot.device);
            let cred = device
                .server_credential_with(&server, self.inner.config.quirks.text_nonce)
                .ok_or(Package0Error::UnknownServer)?;
            let verifies =
                |nonce: &[u8]| package0::verify(bytes, &cred.name, cred.secret(), nonce).is_ok();
            if cred.nonce.as_deref().is_some_and(verifies) {
                false
            } else if verifies(&ZERO_NONCE) {
                true
            } else {
                return Err(Package0Error::BadDigest);
            }
        };
        let session_id = notification.session_id;
        tracing::info!(dev_id, server = %server, session_id, zero_nonce, "package #0 accepted");
        self.spawn_session(
            slot,
            server.clone(),
            Trigger::Server { session_id },
            zero_nonce,
            Package0Error::Unavailable,
        )?;
        Ok(Accepted {
            server,
            session_id,
            zero_nonce,
        })
    }

    /// Starts a client-initiated session (`Alert` 1201) in the background, unless the account's
    /// delegation record forbids it (`AutoConnect` = `false`).
    pub fn connect(&self, dev_id: &str, server: &str) -> Result<(), ConnectError> {
        let slot = self.slot(dev_id).ok_or(ConnectError::UnknownDevice)?;
        {
            let device = lock(&slot.device);
            if device.account_uri(server).is_none() {
                return Err(ConnectError::UnknownServer);
            }
            if device.auto_connect_disabled(server) {
                return Err(ConnectError::AutoConnectDisabled);
            }
        }
        self.spawn_session(
            slot,
            server.to_string(),
            Trigger::Client,
            false,
            ConnectError::Unavailable,
        )
    }

    /// Runs a session to its end and returns its record (also recorded in the device's list). `None`
    /// for an unknown device. No check of `AutoConnect` or package #0: the caller decides.
    pub async fn run_session(
        &self,
        dev_id: &str,
        server: &str,
        trigger: Trigger,
    ) -> Option<SessionRecord> {
        let slot = self.slot(dev_id)?;
        Some(self.session_on(&slot, server, trigger, false).await)
    }

    fn spawn_session<E>(
        &self,
        slot: Arc<Slot>,
        server: String,
        trigger: Trigger,
        zero_nonce: bool,
        unavailable: E,
    ) -> Result<(), E> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| unavailable)?;
        let fleet = self.clone();
        handle.spawn(async move {
            fleet.session_on(&slot, &server, trigger, zero_nonce).await;
        });
        Ok(())
    }

    async fn session_on(
        &self,
        slot: &Slot,
        server: &str,
        trigger: Trigger,
        zero_nonce: bool,
    ) -> SessionRecord {
        let _one_at_a_time = slot.session_lock.lock().await;
        let record = session::run_session_with(
            &self.inner.http,
            &slot.device,
            server,
            trigger,
            zero_nonce,
            &self.inner.config,
        )
        .await;
        lock(&slot.sessions).push(record.clone());
        self.inner.recorded.notify_waiters();
        record
    }

    /// The HTTP interface (see the module documentation).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/devices", get(list_devices))
            .route("/devices/{dev_id}/package0", post(package0_handler))
            .route("/devices/{dev_id}/connect", post(connect_handler))
            .route("/devices/{dev_id}/tree", get(tree_handler))
            .route("/devices/{dev_id}/sessions", get(sessions_handler))
            .with_state(self.clone())
    }

    /// Serves [`Fleet::router`] on `listener` until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

fn plain(status: u16, text: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, text).into_response()
}

async fn list_devices(State(fleet): State<Fleet>) -> Response {
    axum::Json(fleet.device_ids()).into_response()
}

async fn package0_handler(
    State(fleet): State<Fleet>,
    Path(dev_id): Path<String>,
    body: Bytes,
) -> Response {
    match fleet.package0(&dev_id, &body) {
        Ok(_) => StatusCode::ACCEPTED.into_response(),
        Err(e) => {
            tracing::info!(dev_id, error = %e, "package #0 refused");
            plain(e.http_status(), e.to_string())
        }
    }
}

#[derive(Debug, Deserialize)]
struct ConnectQuery {
    server: Option<String>,
}

async fn connect_handler(
    State(fleet): State<Fleet>,
    Path(dev_id): Path<String>,
    Query(query): Query<ConnectQuery>,
) -> Response {
    let Some(server) = query.server.filter(|s| !s.is_empty()) else {
        return plain(400, "the query parameter 'server' is required".to_string());
    };
    match fleet.connect(&dev_id, &server) {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(e) => plain(e.http_status(), e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct TreeQuery {
    #[serde(default)]
    secrets: bool,
}

/// Replaces the values of secret nodes (`AAuthSecret`) with `<redacted>`.
fn redact(nodes: &mut [Node]) {
    for node in nodes {
        let secret = SECRET_NODE_NAMES.contains(&node.name.as_str());
        match &mut node.content {
            NodeContent::Value(v) if secret => *v = "<redacted>".to_string(),
            NodeContent::Value(_) => {}
            NodeContent::Children(children) => redact(children),
        }
    }
}

async fn tree_handler(
    State(fleet): State<Fleet>,
    Path(dev_id): Path<String>,
    Query(query): Query<TreeQuery>,
) -> Response {
    let Some(mut doc) = fleet.export(&dev_id) else {
        return plain(404, "no such device".to_string());
    };
    if !query.secrets {
        redact(&mut doc.nodes);
    }
    (
        [(header::CONTENT_TYPE, tnds::CONTENT_TYPE)],
        tnds::encode(&doc),
    )
        .into_response()
}

async fn sessions_handler(State(fleet): State<Fleet>, Path(dev_id): Path<String>) -> Response {
    match fleet.sessions(&dev_id) {
        Some(sessions) => axum::Json(sessions).into_response(),
        None => plain(404, "no such device".to_string()),
    }
}
