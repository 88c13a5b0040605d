//! The provisioning service: the DM 1.2 server endpoint that devices connect to (PROTOCOL.md Part B,
//! docs/device-side.md). It keeps a queue of work per device, wakes the device with a package #0 when
//! there is work, authenticates the session both ways, and carries the work out:
//!
//! - a delegation plan (A.6, steps 4-5): read what will change (the snapshot, taken once per plan), apply
//!   everything as one `Atomic`, read it back and compare; on any failure or difference, restore and fail;
//! - a restore of a plan's snapshot (failure, revocation, release, expiry);
//! - the delegated side's first session (steps 7-8): authenticated with the TEMP_DELEGATION_KEY, it
//!   replaces both credentials;
//! - any list of management commands (operators, tests).
//!
//! Outcomes (with the DM status code and the command it came from) are sent on a channel. Work for one
//! device runs one job at a time, in order, so a restore can never overtake its apply.

mod plan;
mod session;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use dm_notification::{Package0Channel, ServerCredential};
use dm_protocol::syncml;
use tokio::sync::mpsc;

pub use plan::{AclChange, Observed, PlanError, PlanRequest, Snapshot};
pub use session::{JobFailure, JobOutcome, JobResult, JobSuccess};

/// What this server is, as devices know it.
#[derive(Debug, Clone)]
pub struct Config {
    /// This server's ServerID on the devices.
    pub server_id: String,
    /// The URL devices post to (their DMAcc `Addr` for this server), e.g. `http://host:port/dm`.
    pub public_url: String,
}

/// What this server and one device know of each other (docs/device-side.md). Secrets stay in memory and
/// never reach logs: `Debug` hides them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DeviceCredentials {
    /// The server's password on the device (SRVCRED `AAuthSecret`; the TEMP_DELEGATION_KEY at first for a
    /// delegated server).
    pub server_secret: String,
    /// The nonce the server must use next (SRVCRED `AAuthData`), base64.
    pub server_nonce_b64: String,
    /// The device's name and password toward this server (CLCRED).
    pub client_name: String,
    pub client_secret: String,
    /// The nonce the device must use next (CLCRED `AAuthData`), base64.
    pub client_nonce_b64: String,
}

impl std::fmt::Debug for DeviceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCredentials")
            .field("client_name", &self.client_name)
            .finish_non_exhaustive()
    }
}

/// Where a delegated server's credentials sit in its account on the device, for the first session.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// `./DMAcc/<x>` of this server's account.
    pub account_uri: String,
    /// `<k>` of the SRVCRED and CLCRED entries under `AppAuth`.
    pub server_cred_key: String,
    pub client_cred_key: String,
}

/// Work for one device.
#[derive(Debug, Clone)]
pub enum Job {
    /// Steps 4-5 on the delegating side. `plan_id` names the plan (the delegation): its snapshot is taken
    /// once and kept under this id.
    Apply {
        plan_id: String,
        request: Box<PlanRequest>,
    },
    /// Put back what the plan `plan_id` changed.
    Restore { plan_id: String },
    /// Steps 7-8 on the delegated side.
    FirstSession(Rotation),
    /// Management commands, as they are (their results are returned).
    Commands(Vec<syncml::Command>),
}

#[derive(Debug, Default)]
struct DeviceEntry {
    creds: DeviceCredentials,
    queue: VecDeque<(u64, Job)>,
    session: Option<session::Session>,
}

#[derive(Debug, Default)]
struct Inner {
    devices: HashMap<String, DeviceEntry>,
    snapshots: HashMap<String, Snapshot>,
    next_job: u64,
}

/// The provisioning service of one DM server.
#[derive(Clone)]
pub struct Provisioning {
    config: Arc<Config>,
    inner: Arc<Mutex<Inner>>,
    channel: Arc<dyn Package0Channel>,
    outcomes: mpsc::UnboundedSender<JobOutcome>,
}

impl std::fmt::Debug for Provisioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioning")
            .field("server_id", &self.config.server_id)
            .finish_non_exhaustive()
    }
}

/// Why work could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    #[error("device {0} is not known to this server")]
    UnknownDevice(String),
}

impl Provisioning {
    /// A service with no device yet; outcomes of jobs arrive on the returned receiver.
    pub fn new(
        config: Config,
        channel: Arc<dyn Package0Channel>,
    ) -> (Self, mpsc::UnboundedReceiver<JobOutcome>) {
        let (outcomes, rx) = mpsc::unbounded_channel();
        (
            Self {
                config: Arc::new(config),
                inner: Arc::default(),
                channel,
                outcomes,
            },
            rx,
        )
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock means a panic elsewhere; the data is still consistent per operation.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a device known (or updates what is known of it).
    pub fn register_device(&self, dev_id: &str, creds: DeviceCredentials) {
        self.lock()
            .devices
            .entry(dev_id.to_string())
            .or_default()
            .creds = creds;
    }

    /// What this server currently knows of the device's credentials.
    pub fn credentials(&self, dev_id: &str) -> Option<DeviceCredentials> {
        self.lock().devices.get(dev_id).map(|d| d.creds.clone())
    }

    /// The snapshot kept for a plan, if it was taken.
    pub fn snapshot(&self, plan_id: &str) -> Option<Snapshot> {
        self.lock().snapshots.get(plan_id).cloned()
    }

    /// Queues a job for the device and wakes it with a package #0 if it is not in a session. Returns the
    /// job's id, which its outcome carries.
    pub async fn enqueue(&self, dev_id: &str, job: Job) -> Result<u64, EnqueueError> {
        let wake = {
            let mut inner = self.lock();
            inner.next_job += 1;
            let id = inner.next_job;
            let entry = inner
                .devices
                .get_mut(dev_id)
                .ok_or_else(|| EnqueueError::UnknownDevice(dev_id.to_string()))?;
            entry.queue.push_back((id, job));
            (entry.session.is_none() && entry.queue.len() == 1).then_some(id)
        };
        let id = match wake {
            Some(id) => {
                self.wake(dev_id).await;
                id
            }
            None => self.lock().next_job,
        };
        Ok(id)
    }

    /// Sends the device a package #0 for this server. A device that cannot be reached fails the job at
    /// the head of its queue with the channel's status (503 unreachable, 401 refused digest).
    async fn wake(&self, dev_id: &str) {
        let Some(creds) = self.credentials(dev_id) else {
            return;
        };
        let nonce = dm_protocol::auth::decode_nonce(&creds.server_nonce_b64).unwrap_or_default();
        let cred = ServerCredential {
            name: self.config.server_id.clone(),
            secret: creds.server_secret.clone(),
            nonce,
        };
        let session_id: u16 = rand::random();
        let result = match dm_notification::build(&self.config.server_id, session_id, &cred) {
            Ok(bytes) => self.channel.deliver(dev_id, bytes).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let failed = {
                let mut inner = self.lock();
                inner
                    .devices
                    .get_mut(dev_id)
                    .and_then(|d| d.queue.pop_front())
            };
            if let Some((job_id, _)) = failed {
                let _ = self.outcomes.send(JobOutcome {
                    job_id,
                    dev_id: dev_id.to_string(),
                    result: Err(session::JobFailure {
                        status: e.status(),
                        command: String::new(),
                        reason: format!("package #0 not delivered: {e}"),
                    }),
                });
            }
        }
    }

    /// The HTTP endpoint devices post their DM messages to (`POST /dm`).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/dm", post(dm_message))
            .with_state(self.clone())
    }

    /// Serves the endpoint on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Handles one message of a device; returns the answer and, when a job ended, its outcome, and
    /// whether the device must be woken again for queued work.
    fn handle(&self, msg: &syncml::SyncMl) -> Result<session::Handled, session::Refusal> {
        let mut inner = self.lock();
        session::handle(&self.config, &mut inner, msg)
    }
}

async fn dm_message(State(p): State<Provisioning>, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match syncml::content_type_encoding(content_type) {
        Some(syncml::Encoding::Xml) => {}
        Some(syncml::Encoding::Wbxml) => {
            return (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "WBXML is not supported; use XML",
            )
                .into_response();
        }
        None => {
            return (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected application/vnd.syncml.dm+xml",
            )
                .into_response();
        }
    }
    let msg = match syncml::decode(&body) {
        Ok(m) => m,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let handled = match p.handle(&msg) {
        Ok(h) => h,
        Err(refusal) => return (refusal.http_status(), refusal.to_string()).into_response(),
    };
    for outcome in handled.outcomes {
        let _ = p.outcomes.send(outcome);
    }
    if let Some(dev_id) = handled.wake_again {
        let p = p.clone();
        tokio::spawn(async move { p.wake(&dev_id).await });
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, syncml::CONTENT_TYPE_XML)],
        syncml::encode(&handled.answer),
    )
        .into_response()
}
