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
//! device runs one job at a time, in order, so a restore can never overtake its apply. A job whose device
//! does not connect after its package #0, or leaves its session, for [`Config::session_timeout`] fails
//! with 408 and the device's next job goes on.

pub mod inventory;
mod limits;
mod plan;
pub mod service;
mod session;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use dm_notification::{Package0Channel, ServerCredential};
use dm_protocol::syncml;
use tokio::sync::mpsc;

pub use inventory::{Added, DeviceStore, StoredDevice};
pub use limits::{DEFAULT_MAX_BODY_BYTES, DeviceLimits};
pub use plan::{AclChange, Observed, PlanError, PlanRequest, Snapshot};
pub use session::{JobFailure, JobOutcome, JobResult, JobSuccess};

/// How long a device may stay silent, after its package #0 or between two of its messages, before its
/// job fails with 408.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(120);

/// What this server is, as devices know it.
#[derive(Debug, Clone)]
pub struct Config {
    /// This server's ServerID on the devices.
    pub server_id: String,
    /// The URL devices post to (their DMAcc `Addr` for this server), e.g. `http://host:port/dm`.
    pub public_url: String,
    /// How long a device may stay silent, after its package #0 or between two of its messages, before
    /// its job fails with 408 (the session is cut off, or the device never came).
    pub session_timeout: Duration,
    /// How long a command may go unreported before the bus gives it to another replica: while a job runs
    /// it is reported in progress every third of this.
    pub command_ack_wait: Duration,
    /// Size, time and count limits of the device endpoint.
    pub limits: DeviceLimits,
}

impl Config {
    /// A configuration with [`DEFAULT_SESSION_TIMEOUT`].
    pub fn new(server_id: impl Into<String>, public_url: impl Into<String>) -> Self {
        Self {
            server_id: server_id.into(),
            public_url: public_url.into(),
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            command_ack_wait: Duration::from_secs(60),
            limits: DeviceLimits::default(),
        }
    }
}

/// What this server and one device know of each other (docs/device-side.md). Kept sealed in the
/// `devices` bucket when the service has a device store; `Debug` hides the secrets.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// A new server secret sent to the device whose acceptance this server has not seen yet: stored
    /// before it goes (the device may hold it even if the replica that sent it died), tried when the
    /// current one is refused, and made current once the device proves it holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_server_secret: Option<String>,
    /// The same for the device's own secret (CLCRED), rotated by a delegated server's first session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_client_secret: Option<String>,
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
    /// Counts package #0s sent and messages received: a watchdog armed at one value fires only if
    /// nothing happened since.
    activity: u64,
    /// The MsgIDs of the DM session in progress.
    exchange: Option<session::Exchange>,
    /// A package #0 digested with the zero nonce was sent (B.1 resynchronisation) and no session
    /// followed yet: the next one may sign over that nonce, and replaces this server's secret.
    zero_nonce_sent: bool,
    /// This replica holds the device's lease (its record in `device_owners`): it alone talks to the
    /// device until it lets go.
    leased: bool,
    /// The revision of the lease record this replica wrote last: letting go is a compare-and-set on it,
    /// so that it never clears a lease taken again since.
    lease_revision: u64,
    /// Nonces moved during the DM session in progress and not stored yet (written when it ends).
    nonces_unsaved: bool,
    /// The revision of the device's record in the device store as this replica last read or wrote it
    /// (0: not known): storing the credentials is then one compare-and-set, without a read before it.
    stored_revision: u64,
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
    /// The device messages in progress, against the endpoint's limits.
    gate: Arc<limits::Gate>,
    inner: Arc<Mutex<Inner>>,
    channel: Arc<dyn Package0Channel>,
    outcomes: mpsc::UnboundedSender<JobOutcome>,
    /// Where snapshots are kept across restarts (ARCHITECTURE rule 1); `None`: in memory only.
    store: Option<dm_bus::Kv>,
    /// Where the devices' credentials and nonces are kept, sealed; `None`: in memory only.
    devices: Option<Arc<DeviceStore>>,
    /// Replicas hand each other device messages: `None` for a lone replica.
    forward: Option<Arc<Forwarding>>,
    /// Opens the secrets auth hands out for plans and first sessions (the deployment's bus key).
    bus_key: Option<dm_seal::BusKey>,
    /// The session watchdog's armed deadlines.
    watchdog: Arc<Mutex<Watchdog>>,
}

/// The deadlines the session watchdog was armed with, in arming order. Every arm waits the same session
/// timeout, so arming order is deadline order: one task serves the queue front to back, instead of a
/// task per device message asleep for the whole timeout (which held a copy of the service each, and
/// under load numbered rate × messages × timeout). Each entry still fires on its own, as each task did.
#[derive(Default)]
struct Watchdog {
    armed: VecDeque<(tokio::time::Instant, u64, Box<str>)>,
    /// A task is serving the queue (it ends when the queue is empty; the next arm starts another).
    serving: bool,
}

/// How replicas of the service share the device channel: a device posts to whichever replica its
/// address reaches; the replica that queued the device's job (its owner, in the `device_owners` bucket)
/// carries the session, and any other replica forwards the messages to it over the bus.
struct Forwarding {
    bus: dm_bus::Bus,
    names: dm_bus::Names,
    /// This replica's id (fresh at every start: an owner that is gone answers nobody, and its commands
    /// come back to a live replica, which becomes the owner).
    me: String,
    owners: dm_bus::Kv,
    /// Seals what crosses the bus (the deployment's bus key).
    key: dm_seal::BusKey,
}

/// The header naming the device of a forwarded message (bound into its envelope).
const DEVICE_HEADER: &str = "dmd-device";

/// What a forwarded message and its answer are bound to: the replica that answers, and the device.
fn forwarded_envelope(owner: &str, dev_id: &str) -> String {
    format!("{owner}/{dev_id}")
}

/// The owner's answer, sealed for the replica that forwarded the message; an empty one stays empty.
fn seal_answer(key: &dm_seal::BusKey, envelope: &str, body: &Bytes) -> Bytes {
    if body.is_empty() {
        return Bytes::new();
    }
    match key.seal(
        envelope,
        dm_seal::field::DEVICE_MESSAGE,
        dm_seal::Direction::FromDeviceOwner,
        body,
    ) {
        Ok(sealed) => Bytes::from(sealed),
        Err(_) => Bytes::new(),
    }
}

/// The key, in the snapshots bucket, saying that a restore of the plan was queued.
fn undone_key(plan_id: &str) -> String {
    dm_bus::subjects::encode_key(&format!("{plan_id}/undone"))
}

/// How long a replica waits for the owner of a device to answer a forwarded message.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// A forwarded request with this header only asks whether the replica is alive.
const PING_HEADER: &str = "dmd-ping";
/// How long a replica waits before it asks a lease's silent owner once more whether it is alive: long
/// enough for a live owner to reconnect and subscribe again after a NATS outage.
const OWNER_RECONNECT: Duration = Duration::from_secs(3);
/// How long a replica with work for a device waits before it asks for the device's lease again.
const LEASE_RETRY: Duration = Duration::from_millis(250);

/// A device message's answer: HTTP status, content type, body.
#[derive(Debug, Clone)]
pub struct DeviceAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
}

impl DeviceAnswer {
    fn text(status: StatusCode, text: impl Into<String>) -> Self {
        Self {
            status: status.as_u16(),
            content_type: "text/plain; charset=utf-8".into(),
            body: Bytes::from(text.into()),
        }
    }
}

impl IntoResponse for DeviceAnswer {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(header::CONTENT_TYPE, self.content_type)],
            self.body,
        )
            .into_response()
    }
}

/// Who holds a device's lease (its record in `device_owners`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// No record, or one let go (empty).
    Nobody,
    /// This replica.
    Me,
    /// Another replica.
    Another,
}

/// Whether `after` holds a pending secret that `before` did not: a new secret about to go to the device.
fn gives_new_secret(before: Option<&DeviceCredentials>, after: Option<&DeviceCredentials>) -> bool {
    let Some(after) = after else {
        return false;
    };
    let fresh =
        |now: &Option<String>, was: Option<&Option<String>>| now.is_some() && was != Some(now);
    fresh(
        &after.pending_server_secret,
        before.map(|b| &b.pending_server_secret),
    ) || fresh(
        &after.pending_client_secret,
        before.map(|b| &b.pending_client_secret),
    )
}

/// Writes `value` under `key` whatever revision it is at (retried on a concurrent write); nothing is
/// written when the key holds that value already. Returns the revision that holds it.
async fn put(kv: &dm_bus::Kv, key: &str, value: Bytes) -> Result<u64, dm_bus::BusError> {
    for _ in 0..8 {
        let written = match kv.get(key).await? {
            Some(entry) if entry.value == value => return Ok(entry.revision),
            Some(entry) => kv.update(key, value.clone(), entry.revision).await,
            None => kv.create(key, value.clone()).await,
        };
        match written {
            Ok(revision) => return Ok(revision),
            Err(dm_bus::BusError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(dm_bus::BusError::Conflict(key.to_string()))
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
    /// The snapshot store could not be read: the job must wait (a restore that ran without the
    /// snapshot would put nothing back).
    #[error("the snapshot store cannot be read: {0}")]
    SnapshotStore(String),
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
                gate: limits::Gate::new(config.limits),
                config: Arc::new(config),
                inner: Arc::default(),
                channel,
                outcomes,
                store: None,
                devices: None,
                forward: None,
                bus_key: None,
                watchdog: Arc::default(),
            },
            rx,
        )
    }

    /// Keeps every snapshot in `store` (a key-value bucket) before the plan it belongs to reaches the
    /// device, so that a restore works after a restart of this service.
    pub fn with_snapshot_store(mut self, store: dm_bus::Kv) -> Self {
        self.store = Some(store);
        self
    }

    /// Brings the stored snapshot of `plan_id`, if there is one, into memory (unless it is there).
    async fn fetch_snapshot(&self, plan_id: &str) -> Result<(), String> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        if self.lock().snapshots.contains_key(plan_id) {
            return Ok(());
        }
        let key = dm_bus::subjects::encode_key(plan_id);
        let Some(entry) = store.get(&key).await.map_err(|e| e.to_string())? else {
            return Ok(());
        };
        let snapshot = serde_json::from_slice::<Snapshot>(&entry.value)
            .map_err(|e| format!("the stored snapshot of {plan_id} cannot be read: {e}"))?;
        self.lock()
            .snapshots
            .entry(plan_id.to_string())
            .or_insert(snapshot);
        Ok(())
    }

    /// Records, before a restore of `plan_id` is queued, that the plan is being undone: an apply of it
    /// that comes later (its command delivered again after a NATS outage or a replica's death, once the
    /// saga had already ordered the restore) must not put the plan back on the device after the restore.
    async fn mark_undone(&self, plan_id: &str) -> Result<(), String> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        put(store, &undone_key(plan_id), Bytes::from_static(b"undone"))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Whether a restore of `plan_id` was queued (see [`Provisioning::mark_undone`]); `None` when the
    /// store cannot be read.
    async fn undone(&self, plan_id: &str) -> Option<bool> {
        let store = self.store.as_ref()?;
        match store.get(&undone_key(plan_id)).await {
            Ok(entry) => Some(entry.is_some()),
            Err(e) => {
                tracing::warn!(plan_id, error = %e, "the snapshot store cannot be read");
                None
            }
        }
    }

    /// Gives up the applies at the head of the device's queue whose plan is being undone (their
    /// commands are stale: the saga has moved on, so no outcome is published for them). Called by the
    /// replica that holds the device's lease, right before it wakes the device: a restore is queued
    /// only after its mark is written, so an apply checked here either runs before that restore
    /// (which then undoes it) or not at all.
    async fn drop_undone_applies(&self, dev_id: &str) {
        loop {
            let head = self
                .lock()
                .devices
                .get(dev_id)
                .filter(|d| d.session.is_none())
                .and_then(|d| match d.queue.front() {
                    Some((id, Job::Apply { plan_id, .. })) => Some((*id, plan_id.clone())),
                    _ => None,
                });
            let Some((job_id, plan_id)) = head else {
                return;
            };
            if self.undone(&plan_id).await != Some(true) {
                return;
            }
            let popped = {
                let mut inner = self.lock();
                inner.devices.get_mut(dev_id).and_then(|d| {
                    (d.session.is_none() && d.queue.front().is_some_and(|(id, _)| *id == job_id))
                        .then(|| d.queue.pop_front())
                        .flatten()
                })
            };
            if popped.is_none() {
                return;
            }
            tracing::warn!(
                dev_id,
                job_id,
                plan_id,
                "an apply of a plan already being undone is given up (its command came again)"
            );
            let _ = self.outcomes.send(JobOutcome::superseded(job_id, dev_id));
        }
    }

    /// Writes the snapshots `handle` just took; on failure forgets them (their plans were not sent yet).
    async fn persist(&self, created: Vec<(String, Snapshot)>) -> Result<(), String> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        for (plan_id, snapshot) in created {
            let key = dm_bus::subjects::encode_key(&plan_id);
            let bytes = serde_json::to_vec(&snapshot).map_err(|e| e.to_string())?;
            // A plan's snapshot is taken once: created without a read first (one there already, from a
            // replica that took it before a restart, is written over).
            let bytes = Bytes::from(bytes);
            let written = match store.create(&key, bytes.clone()).await {
                Err(dm_bus::BusError::Conflict(_)) => put(store, &key, bytes).await,
                other => other,
            };
            if let Err(e) = written {
                self.lock().snapshots.remove(&plan_id);
                return Err(e.to_string());
            }
        }
        Ok(())
    }

    /// Opens the secrets fetched from auth with `key` (the deployment's bus key, `MasterKey::bus_key`).
    /// Without one, a command that needs a secret fails with that reason.
    pub fn with_bus_key(mut self, key: dm_seal::BusKey) -> Self {
        self.bus_key = Some(key);
        self
    }

    pub(crate) fn bus_key(&self) -> Option<&dm_seal::BusKey> {
        self.bus_key.as_ref()
    }

    /// Keeps every device's credentials in `kv`, sealed with `key` (the deployment's master key).
    pub fn with_device_store(mut self, kv: dm_bus::Kv, key: dm_seal::MasterKey) -> Self {
        self.devices = Some(Arc::new(DeviceStore::new(kv, key)));
        self
    }

    /// Loads the devices kept in the device store (at start); they replace what is known in memory.
    /// Returns how many there are.
    pub async fn load_devices(&self) -> Result<usize, dm_bus::BusError> {
        let Some(store) = &self.devices else {
            return Ok(0);
        };
        let mut loaded = 0;
        for key in store.kv.keys().await? {
            let Some(entry) = store.kv.get(&key).await? else {
                continue;
            };
            let Some(dev_id) = dm_bus::subjects::decode_key(&key) else {
                continue;
            };
            let Some(creds) = store.open(&dev_id, &entry.value) else {
                // Another master key, or tampered: the device is not usable; say which, never why.
                tracing::warn!(
                    dev_id,
                    "stored credentials of a device cannot be opened; skipped"
                );
                continue;
            };
            self.register_device(&dev_id, creds);
            loaded += 1;
        }
        Ok(loaded)
    }

    /// Reads a device's credentials again from the device store (unless a session of it runs here).
    async fn refresh_device(&self, dev_id: &str) {
        let Some(store) = &self.devices else {
            return;
        };
        let entry = match store.kv.get(&dm_bus::subjects::encode_key(dev_id)).await {
            Ok(Some(entry)) => entry,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(dev_id, error = %e, "the device store cannot be read; using what is known here");
                return;
            }
        };
        let Some(creds) = store.open(dev_id, &entry.value) else {
            return;
        };
        let mut inner = self.lock();
        if let Some(d) = inner.devices.get_mut(dev_id)
            && d.session.is_none()
        {
            d.creds = creds;
            d.stored_revision = entry.revision;
        }
    }

    /// Brings what the inventory says of a device into memory before work is queued for it: a device
    /// added since this replica loaded the store (by the admin API, or by another replica) is loaded now;
    /// one removed from it is forgotten here unless something of it is still running. A store that cannot
    /// be read leaves what is known here as it is.
    async fn find_device(&self, dev_id: &str) {
        let Some(store) = &self.devices else {
            return;
        };
        match store.kv.get(&dm_bus::subjects::encode_key(dev_id)).await {
            Ok(Some(entry)) => {
                if self.lock().devices.contains_key(dev_id) {
                    // `wake` refreshes its credentials when it is this replica's turn.
                    return;
                }
                match store.open(dev_id, &entry.value) {
                    Some(creds) => {
                        tracing::info!(dev_id, "device added to the inventory; loaded");
                        let mut inner = self.lock();
                        let d = inner.devices.entry(dev_id.to_string()).or_default();
                        d.creds = creds;
                        d.stored_revision = entry.revision;
                    }
                    None => tracing::warn!(
                        dev_id,
                        "stored credentials of a device cannot be opened; skipped"
                    ),
                }
            }
            Ok(None) => {
                let mut inner = self.lock();
                let idle = inner
                    .devices
                    .get(dev_id)
                    .is_some_and(|d| d.session.is_none() && d.queue.is_empty() && !d.leased);
                if idle {
                    tracing::info!(dev_id, "device removed from the inventory; forgotten");
                    inner.devices.remove(dev_id);
                }
            }
            Err(e) => {
                tracing::warn!(dev_id, error = %e, "the device store cannot be read; using what is known here");
            }
        }
    }

    /// Makes a device known and keeps its credentials in the device store.
    pub async fn register_device_durably(
        &self,
        dev_id: &str,
        creds: DeviceCredentials,
    ) -> Result<(), dm_bus::BusError> {
        self.register_device(dev_id, creds);
        self.store_device(dev_id).await
    }

    /// Makes a device known unless it is already (a configuration's device list seeds the store; what
    /// was stored since, rotated secrets and nonces, wins).
    pub async fn seed_device(
        &self,
        dev_id: &str,
        creds: DeviceCredentials,
    ) -> Result<(), dm_bus::BusError> {
        if self.credentials(dev_id).is_some() {
            return Ok(());
        }
        self.register_device_durably(dev_id, creds).await
    }

    /// Writes what is known of a device's credentials now to the device store.
    async fn store_device(&self, dev_id: &str) -> Result<(), dm_bus::BusError> {
        let (Some(store), Some(creds)) = (&self.devices, self.credentials(dev_id)) else {
            return Ok(());
        };
        let sealed = store.seal(dev_id, &creds)?;
        let key = dm_bus::subjects::encode_key(dev_id);
        let known = self
            .lock()
            .devices
            .get(dev_id)
            .map_or(0, |d| d.stored_revision);
        let revision = match known {
            0 => put(&store.kv, &key, sealed).await?,
            known => match store.kv.update(&key, sealed.clone(), known).await {
                Ok(revision) => revision,
                // Written elsewhere since (the inventory, another replica): read, then written over.
                Err(dm_bus::BusError::Conflict(_)) => put(&store.kv, &key, sealed).await?,
                Err(e) => return Err(e),
            },
        };
        if let Some(d) = self.lock().devices.get_mut(dev_id) {
            d.stored_revision = revision;
        }
        Ok(())
    }

    /// Shares the device channel with the other replicas on `bus`: answers the device messages they
    /// forward for devices whose jobs this replica holds, and forwards those it gets for others' devices.
    pub async fn with_forwarding(
        mut self,
        bus: dm_bus::Bus,
        names: dm_bus::Names,
    ) -> Result<Self, dm_bus::BusError> {
        let me = format!("{:032x}", rand::random::<u128>());
        // Device messages carry secrets (the accounts the server writes): they cross the bus sealed.
        let key = match &self.bus_key {
            Some(key) => key.clone(),
            None => {
                tracing::warn!(
                    "no bus key: device messages forwarded to other replicas will not open there"
                );
                dm_seal::MasterKey::random().bus_key()
            }
        };
        let owners = bus.kv(&names.bucket("device_owners")?, 1).await?;
        let subject = names.subject(dm_bus::Area::Req, &format!("provisioning.device.{me}"))?;
        let mut requests = bus
            .serve(&subject, &names.queue_group(&format!("provisioning_{me}"))?)
            .await?;
        self.forward = Some(Arc::new(Forwarding {
            bus,
            names,
            me: me.clone(),
            owners,
            key: key.clone(),
        }));
        let p = self.clone();
        tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let p = p.clone();
                let (me, key) = (me.clone(), key.clone());
                tokio::spawn(async move {
                    if request.message.headers.get(PING_HEADER).is_some() {
                        // Another replica asks whether this one is alive (to take a lease over).
                        let _ = request.respond(dm_bus::Headers::new(), Bytes::new()).await;
                        return;
                    }
                    let content_type = request
                        .message
                        .headers
                        .get("content-type")
                        .unwrap_or_default()
                        .to_string();
                    let dev_id = request
                        .message
                        .headers
                        .get(DEVICE_HEADER)
                        .unwrap_or_default()
                        .to_string();
                    let envelope = forwarded_envelope(&me, &dev_id);
                    let mut headers = dm_bus::Headers::new();
                    let body = match key.open(
                        &envelope,
                        dm_seal::field::DEVICE_MESSAGE,
                        dm_seal::Direction::ToDeviceOwner,
                        &request.message.payload,
                    ) {
                        Ok(plain) => {
                            let answer = p
                                .answer_device(&content_type, Bytes::from(plain.to_vec()))
                                .await;
                            headers.insert("content-type", answer.content_type);
                            headers.insert("dmd-http-status", answer.status.to_string());
                            seal_answer(&key, &envelope, &answer.body)
                        }
                        Err(_) => {
                            tracing::warn!(dev_id, "a forwarded device message does not open");
                            headers.insert("dmd-http-status", "400");
                            Bytes::new()
                        }
                    };
                    if let Err(e) = request.respond(headers, body).await {
                        tracing::warn!(error = %e, "a forwarded device message could not be answered");
                    }
                });
            }
        });
        Ok(self)
    }

    /// Stores the nonces a session that ended without its last message (cut off by the watchdog) moved.
    async fn store_unsaved_nonces(&self, dev_id: &str) {
        let unsaved = self
            .lock()
            .devices
            .get_mut(dev_id)
            .is_some_and(|d| d.session.is_none() && std::mem::take(&mut d.nonces_unsaved));
        if unsaved && !self.may_write_credentials(dev_id).await {
            tracing::info!(
                dev_id,
                "another replica holds the device: its nonces are not stored here"
            );
            return;
        }
        if unsaved && let Err(e) = self.store_device(dev_id).await {
            tracing::warn!(dev_id, error = %e, "a device's new nonces could not be stored");
        }
    }

    /// Whether this replica may write what a session moved of the device's credentials: yes when it
    /// holds the device's lease, or nobody does. A replica answers a device whose lease another holds
    /// when that one does not answer the forwarded message (gone, or cut off); what it knows of the
    /// device may then be older than what the holder stored, and writing it would undo a secret the
    /// device already has. A lease that cannot be read: no (a lost nonce is recovered, B.1).
    async fn may_write_credentials(&self, dev_id: &str) -> bool {
        if self.forward.is_none() || self.lock().devices.get(dev_id).is_some_and(|d| d.leased) {
            return true;
        }
        matches!(
            self.lease_holder(dev_id).await,
            Ok(Holder::Nobody | Holder::Me)
        )
    }

    /// Who holds the device's lease, as stored now (no replicas: this one).
    async fn lease_holder(&self, dev_id: &str) -> Result<Holder, dm_bus::BusError> {
        let Some(f) = &self.forward else {
            return Ok(Holder::Me);
        };
        Ok(
            match f.owners.get(&dm_bus::subjects::encode_key(dev_id)).await? {
                None => Holder::Nobody,
                Some(e) if e.value.is_empty() => Holder::Nobody,
                Some(e) if e.value == f.me.as_bytes() => Holder::Me,
                Some(_) => Holder::Another,
            },
        )
    }

    /// Whether this replica talks to the device now (a session, or the device's lease). A replica may
    /// also answer a device it holds no lease of, when the holder does not answer the forwarded message.
    fn holds(&self, dev_id: &str) -> bool {
        self.lock()
            .devices
            .get(dev_id)
            .is_some_and(|d| d.session.is_some() || d.leased)
    }

    /// Takes the device's lease: one replica at a time talks to a device (two sessions at once would
    /// each rotate its secrets and nonces under the other). Free, already this replica's, or held by a
    /// replica that no longer answers: taken (compare-and-set). Held by a live replica: false.
    async fn claim(&self, dev_id: &str) -> bool {
        let Some(f) = &self.forward else {
            return true;
        };
        let key = dm_bus::subjects::encode_key(dev_id);
        let me = Bytes::from(f.me.clone());
        let taken = loop {
            let written = match f.owners.get(&key).await {
                Ok(None) => f.owners.create(&key, me.clone()).await,
                // Already this replica's: written again, so that a letting-go still under way (at the
                // older revision) fails instead of clearing the lease just taken.
                Ok(Some(e)) if e.value == me => f.owners.update(&key, me.clone(), e.revision).await,
                Ok(Some(e)) if e.value.is_empty() || !f.alive(&e.value).await => {
                    f.owners.update(&key, me.clone(), e.revision).await
                }
                Ok(Some(_)) => break None,
                Err(e) => {
                    tracing::warn!(dev_id, error = %e, "the device's lease cannot be read");
                    break None;
                }
            };
            match written {
                Ok(revision) => break Some(revision),
                Err(dm_bus::BusError::Conflict(_)) => continue,
                Err(e) => {
                    tracing::warn!(dev_id, error = %e, "the device's lease cannot be written");
                    break None;
                }
            }
        };
        let Some(revision) = taken else {
            return false;
        };
        if let Some(d) = self.lock().devices.get_mut(dev_id) {
            d.leased = true;
            d.lease_revision = revision;
        }
        true
    }

    /// Before this replica answers a device it holds the lease of (the answer may carry a plan's
    /// commands): the lease must still be its own. Another replica takes a lease over only when it
    /// believes this one dead (its liveness ping found nobody, e.g. while this replica was reconnecting
    /// after a NATS outage); from then on that replica talks to the device, and this one gives the
    /// device's session and jobs up: two sessions at once could complete a plan after its restore.
    /// A lease that cannot be read is not answered on (503): nothing goes to the device unfenced.
    async fn fence(&self, dev_id: &str) -> Result<(), DeviceAnswer> {
        match self.lease_lost(dev_id).await {
            Ok(false) => Ok(()),
            Ok(true) => {
                self.give_up_device(dev_id);
                Err(DeviceAnswer::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "another replica took this device over; try again later",
                ))
            }
            Err(e) => {
                tracing::warn!(dev_id, error = %e, "the device's lease cannot be read; not answering");
                Err(DeviceAnswer::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "try again later",
                ))
            }
        }
    }

    /// Whether this replica held the device's lease and another one holds it now (never, without
    /// replicas or when this replica holds no lease of the device).
    async fn lease_lost(&self, dev_id: &str) -> Result<bool, dm_bus::BusError> {
        if self.forward.is_none() || !self.lock().devices.get(dev_id).is_some_and(|d| d.leased) {
            return Ok(false);
        }
        Ok(self.lease_holder(dev_id).await? != Holder::Me)
    }

    /// The device's lease went to another replica: its session here ends and its jobs are settled as
    /// superseded (no outcome: the replica that took the device has the command again, or the step's
    /// deadline fails the delegation; running it here again could apply a plan after its restore).
    fn give_up_device(&self, dev_id: &str) {
        let jobs: Vec<u64> = {
            let mut inner = self.lock();
            let Some(d) = inner.devices.get_mut(dev_id) else {
                return;
            };
            d.leased = false;
            d.session = None;
            d.exchange = None;
            // The new holder reads the device's credentials from the store; nothing here is written.
            d.nonces_unsaved = false;
            d.zero_nonce_sent = false;
            // Disarms the watchdog: nothing is left to time out here.
            d.activity += 1;
            d.queue.drain(..).map(|(id, _)| id).collect()
        };
        tracing::warn!(
            dev_id,
            jobs = jobs.len(),
            "another replica took the device's lease over; its session and jobs are given up here"
        );
        for job_id in jobs {
            let _ = self.outcomes.send(JobOutcome::superseded(job_id, dev_id));
        }
    }

    /// Lets the device's lease go once this replica has nothing more for it.
    async fn release_if_idle(&self, dev_id: &str) {
        let idle = {
            let mut inner = self.lock();
            match inner.devices.get_mut(dev_id) {
                Some(d) if d.leased && d.session.is_none() && d.queue.is_empty() => {
                    d.leased = false;
                    Some(d.lease_revision)
                }
                _ => None,
            }
        };
        let (Some(f), Some(revision)) = (self.forward.as_ref(), idle) else {
            return;
        };
        let key = dm_bus::subjects::encode_key(dev_id);
        let f = f.clone();
        let dev_id = dev_id.to_string();
        // In the background, and again until it is written, however long the bus is away: a lease left
        // behind while this replica lives would keep every other replica from the device for good (it
        // answers their pings).
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(50);
            for attempt in 1u32.. {
                // At the revision this replica wrote: a conflict means the lease was taken again since
                // (by this replica or another), which is what letting go allows.
                match f.owners.update(&key, Bytes::new(), revision).await {
                    Ok(_) | Err(dm_bus::BusError::Conflict(_)) => return,
                    Err(e) => {
                        if attempt == 60 {
                            tracing::warn!(dev_id, error = %e, "the device's lease cannot be let go yet; trying on");
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }

    /// The answer to a device message, from the replica that holds the device (this one, or the owner
    /// the message is forwarded to).
    pub async fn route_device(&self, content_type: &str, body: Bytes) -> DeviceAnswer {
        if let Some(f) = &self.forward {
            // A scan of the header is enough to route (decoding the whole message twice is not).
            let dev_id = session::guess_header(&body).map(|g| g.source);
            if let Some(dev_id) = dev_id
                && !self.holds(&dev_id)
                && let Some(answer) = f.forward(&dev_id, content_type, &body).await
            {
                return answer;
            }
        }
        self.answer_device(content_type, body).await
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
        let id = self.reserve_job_id();
        self.enqueue_as(dev_id, id, job).await.map(|()| id)
    }

    /// An id for [`Provisioning::enqueue_as`]: a caller that must know the id before the job can end
    /// (to match its outcome) takes one first.
    pub fn reserve_job_id(&self) -> u64 {
        let mut inner = self.lock();
        inner.next_job += 1;
        inner.next_job
    }

    /// [`Provisioning::enqueue`] under an id from [`Provisioning::reserve_job_id`].
    pub async fn enqueue_as(&self, dev_id: &str, id: u64, job: Job) -> Result<(), EnqueueError> {
        if let Job::Apply { plan_id, .. } | Job::Restore { plan_id } = &job {
            // Another replica may have taken the plan's snapshot (or this one, before a restart).
            self.fetch_snapshot(plan_id)
                .await
                .map_err(EnqueueError::SnapshotStore)?;
        }
        if let Job::Restore { plan_id } = &job {
            self.mark_undone(plan_id)
                .await
                .map_err(EnqueueError::SnapshotStore)?;
        }
        // A first session's device was registered (and stored) by the caller just now: a read of the
        // store may not see that write yet (a cluster electing leaders), and must not forget it.
        if !matches!(job, Job::FirstSession(_)) {
            self.find_device(dev_id).await;
        }
        let wake = {
            let mut inner = self.lock();
            let entry = inner
                .devices
                .get_mut(dev_id)
                .ok_or_else(|| EnqueueError::UnknownDevice(dev_id.to_string()))?;
            entry.queue.push_back((id, job));
            entry.session.is_none() && entry.queue.len() == 1
        };
        if wake {
            self.wake(dev_id).await;
        }
        Ok(())
    }

    /// Sends the device a package #0 for this server, and arms the watchdog. A device that refuses its
    /// digest (401) gets it once more digested with the zero nonce (B.1 resynchronisation: it may have
    /// lost the server nonce); one that cannot be reached fails the job at the head of its queue with the
    /// channel's status (503 unreachable, 401 refused digest), and the next job is tried.
    async fn wake(&self, dev_id: &str) {
        // One replica at a time talks to the device: wait while another one has a session with it.
        while !self.claim(dev_id).await {
            tokio::time::sleep(LEASE_RETRY).await;
            let waiting = self
                .lock()
                .devices
                .get(dev_id)
                .is_some_and(|d| d.session.is_none() && !d.queue.is_empty());
            if !waiting {
                return;
            }
        }
        // Another replica may have run the device's last session: take the nonces in force from the store.
        self.refresh_device(dev_id).await;
        self.drop_undone_applies(dev_id).await;
        // The head job's snapshot, if it left memory meanwhile (a plan that ended while a restore of it
        // was being queued): a restore must never start without it.
        let head_plan = self
            .lock()
            .devices
            .get(dev_id)
            .and_then(|d| match d.queue.front() {
                Some((_, Job::Apply { plan_id, .. } | Job::Restore { plan_id })) => {
                    Some(plan_id.clone())
                }
                _ => None,
            });
        if let Some(plan_id) = head_plan
            && let Err(e) = self.fetch_snapshot(&plan_id).await
        {
            tracing::warn!(dev_id, plan_id, error = %e, "a plan's snapshot cannot be read");
        }
        if self
            .lock()
            .devices
            .get(dev_id)
            .is_some_and(|d| d.session.is_none() && d.queue.is_empty())
        {
            self.release_if_idle(dev_id).await;
            return;
        }
        // Whether the pending server secret was tried (swapped with the current one) in this wake.
        let mut swapped = false;
        loop {
            let Some((creds, zero)) = ({
                let inner = self.lock();
                inner
                    .devices
                    .get(dev_id)
                    .map(|d| (d.creds.clone(), d.zero_nonce_sent))
            }) else {
                return;
            };
            let nonce = if zero {
                session::ZERO_NONCE.to_vec()
            } else {
                dm_protocol::auth::decode_nonce(&creds.server_nonce_b64).unwrap_or_default()
            };
            // B.6: the digest's name is the SRVCRED AAuthName, which the plan keeps equal to the ServerID.
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
            let e = match result {
                Ok(()) => {
                    tracing::debug!(
                        dev_id,
                        session_id,
                        zero_nonce = zero,
                        "package #0 delivered"
                    );
                    self.arm(dev_id);
                    // The device verified the digest: it holds the secret used, not the other one.
                    if self.settle_pending_server_secret(dev_id)
                        && let Err(e) = self.store_device(dev_id).await
                    {
                        tracing::warn!(dev_id, error = %e, "a device's credentials could not be stored");
                    }
                    return;
                }
                Err(e) => e,
            };
            if e.status() == 401 && !zero && self.start_resync(dev_id) {
                tracing::info!(
                    dev_id,
                    "the device refused the package #0 digest; sending it with the zero nonce"
                );
                continue;
            }
            if e.status() == 401 && !swapped && self.swap_pending_server_secret(dev_id) {
                // A replica sent the device a new secret and died before it heard back: the device may
                // hold that one.
                swapped = true;
                tracing::info!(
                    dev_id,
                    "the device refused the package #0 digest; trying the secret it was last sent"
                );
                continue;
            }
            let failed = {
                let mut inner = self.lock();
                inner
                    .devices
                    .get_mut(dev_id)
                    // The device may have connected in the meantime (the answer got lost, not the
                    // notification): then its session carries the job on.
                    .filter(|d| d.session.is_none())
                    .and_then(|d| {
                        d.zero_nonce_sent = false;
                        d.queue.pop_front().map(|job| (job, !d.queue.is_empty()))
                    })
            };
            let Some(((job_id, _), more)) = failed else {
                return;
            };
            let reason = format!("package #0 not delivered: {e}");
            tracing::warn!(dev_id, job_id, status = e.status(), reason, "job failed");
            let _ = self.outcomes.send(JobOutcome {
                job_id,
                dev_id: dev_id.to_string(),
                result: Err(session::JobFailure {
                    status: e.status(),
                    command: String::new(),
                    reason,
                }),
            });
            if !more {
                self.release_if_idle(dev_id).await;
                return;
            }
        }
    }

    /// Marks the device's next package #0 as a zero-nonce one, unless it already was or a session is
    /// in progress. Returns whether it did.
    /// Makes the pending server secret the current one (and the current one pending), and starts the
    /// package #0 attempts again. False when there is no pending secret or the device has a session.
    fn swap_pending_server_secret(&self, dev_id: &str) -> bool {
        let mut inner = self.lock();
        match inner.devices.get_mut(dev_id) {
            Some(d) if d.session.is_none() && d.creds.pending_server_secret.is_some() => {
                let pending = d.creds.pending_server_secret.take().unwrap_or_default();
                let current = std::mem::replace(&mut d.creds.server_secret, pending);
                d.creds.pending_server_secret = Some(current);
                d.zero_nonce_sent = false;
                true
            }
            _ => false,
        }
    }

    /// Forgets the pending server secret once the device accepted a digest made with the current one.
    /// True when something changed.
    fn settle_pending_server_secret(&self, dev_id: &str) -> bool {
        let mut inner = self.lock();
        inner
            .devices
            .get_mut(dev_id)
            .is_some_and(|d| d.creds.pending_server_secret.take().is_some())
    }

    fn start_resync(&self, dev_id: &str) -> bool {
        let mut inner = self.lock();
        match inner.devices.get_mut(dev_id) {
            Some(d) if !d.zero_nonce_sent && d.session.is_none() => {
                d.zero_nonce_sent = true;
                true
            }
            _ => false,
        }
    }

    /// Arms the watchdog of a device with work: unless the device does something within the session
    /// timeout, the job at the head of its queue fails with 408 and the next one goes on.
    fn arm(&self, dev_id: &str) {
        let token = {
            let mut inner = self.lock();
            let Some(entry) = inner.devices.get_mut(dev_id) else {
                return;
            };
            if entry.queue.is_empty() {
                return;
            }
            entry.activity += 1;
            entry.activity
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + self.config.session_timeout;
        let start = {
            let mut watchdog = self.watchdog.lock().unwrap_or_else(|e| e.into_inner());
            watchdog.armed.push_back((deadline, token, dev_id.into()));
            !std::mem::replace(&mut watchdog.serving, true)
        };
        if start {
            let p = self.clone();
            runtime.spawn(async move { p.serve_watchdog().await });
        }
    }

    /// Fires the armed deadlines as they fall due, until none is left. An entry whose device moved on
    /// since (the usual case) costs a look at its token; a current one is expired on a task of its own.
    async fn serve_watchdog(&self) {
        // A task dropped with its runtime leaves the queue to the next arm's task.
        struct Serving(Option<Arc<Mutex<Watchdog>>>);
        impl Drop for Serving {
            fn drop(&mut self) {
                if let Some(w) = self.0.take() {
                    w.lock().unwrap_or_else(|e| e.into_inner()).serving = false;
                }
            }
        }
        let mut serving = Serving(Some(self.watchdog.clone()));
        loop {
            let next = {
                let mut watchdog = self.watchdog.lock().unwrap_or_else(|e| e.into_inner());
                match watchdog.armed.front() {
                    Some((at, _, _)) => *at,
                    None => {
                        watchdog.serving = false;
                        // Let go under the lock: a new arm may start a task as soon as it is released.
                        serving.0 = None;
                        return;
                    }
                }
            };
            tokio::time::sleep_until(next).await;
            let now = tokio::time::Instant::now();
            let due: Vec<(u64, Box<str>)> = {
                let mut watchdog = self.watchdog.lock().unwrap_or_else(|e| e.into_inner());
                let mut due = Vec::new();
                while watchdog.armed.front().is_some_and(|(at, _, _)| *at <= now) {
                    if let Some((_, token, dev_id)) = watchdog.armed.pop_front() {
                        due.push((token, dev_id));
                    }
                }
                due
            };
            for (token, dev_id) in due {
                let current = {
                    let inner = self.lock();
                    inner
                        .devices
                        .get(&*dev_id)
                        .is_some_and(|entry| entry.activity == token)
                };
                if current {
                    let p = self.clone();
                    tokio::spawn(async move { p.expire(&dev_id, token).await });
                }
            }
        }
    }

    /// The watchdog armed at `token` fired: if nothing happened since, a package #0 that got no session
    /// is sent once more with the zero nonce (B.1: the device may have lost the server nonce and said
    /// nothing); otherwise the head job fails with 408.
    async fn expire(&self, dev_id: &str, token: u64) {
        {
            let inner = self.lock();
            match inner.devices.get(dev_id) {
                Some(entry) if entry.activity == token => {}
                _ => return,
            }
        }
        // A replica that lost the device's lease (cut off from NATS while another took the command over)
        // reports nothing: its 408 could reach the saga before the other replica's outcome.
        // A lease that cannot be read: the watchdog goes on as it would without replicas.
        if self.lease_lost(dev_id).await.unwrap_or(false) {
            self.give_up_device(dev_id);
            return;
        }
        if self.start_resync(dev_id) {
            tracing::info!(
                dev_id,
                "no session followed the package #0; sending it with the zero nonce"
            );
            self.wake(dev_id).await;
            return;
        }
        let (failed, more) = {
            let mut inner = self.lock();
            let Some(entry) = inner.devices.get_mut(dev_id) else {
                return;
            };
            if entry.activity != token {
                return;
            }
            entry.zero_nonce_sent = false;
            let in_session = entry.session.take().is_some();
            let Some((job_id, _)) = entry.queue.pop_front() else {
                return;
            };
            let reason = if in_session {
                "the device left its DM session before the job ended"
            } else {
                "the device did not open a DM session after its package #0"
            };
            tracing::warn!(dev_id, job_id, status = 408, reason, "job failed");
            (
                JobOutcome {
                    job_id,
                    dev_id: dev_id.to_string(),
                    result: Err(session::JobFailure {
                        status: 408,
                        command: String::new(),
                        reason: reason.to_string(),
                    }),
                },
                !entry.queue.is_empty(),
            )
        };
        let _ = self.outcomes.send(failed);
        self.store_unsaved_nonces(dev_id).await;
        if more {
            self.wake(dev_id).await;
        } else {
            self.release_if_idle(dev_id).await;
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
        let head_timeout = self.config.limits.request_timeout;
        limits::serve(self.router(), listener, head_timeout, shutdown).await
    }

    /// Handles one message of a device; returns the answer and, when a job ended, its outcome, and
    /// whether the device must be woken again for queued work.
    fn handle(
        &self,
        msg: &syncml::SyncMl,
    ) -> Result<(session::Handled, Vec<(String, Snapshot)>), session::Refusal> {
        let mut inner = self.lock();
        let handled = session::handle(&self.config, &mut inner, msg)?;
        // A snapshot taken in this message goes to the store before its plan goes to the device.
        let created = handled
            .snapshot_taken
            .as_ref()
            .and_then(|id| inner.snapshots.get(id).map(|s| (id.clone(), s.clone())))
            .into_iter()
            .collect();
        // A plan whose apply or restore ended needs its snapshot in memory no more: it is in the store,
        // and a later job of the plan reads it from there (memory stays bounded by the jobs in hand).
        if let (Some(_), Some(plan_id)) = (&self.store, &handled.plan_done) {
            // A plan belongs to one device: only that device's queue may still need it.
            let queued = inner.devices.get(&msg.hdr.source.loc_uri).is_some_and(|d| {
                d.queue.iter().any(|(_, job)| {
                    matches!(job, Job::Apply { plan_id: p, .. } | Job::Restore { plan_id: p } if p == plan_id)
                })
            });
            if !queued {
                inner.snapshots.remove(plan_id);
            }
        }
        Ok((handled, created))
    }
}

async fn dm_message(State(p): State<Provisioning>, request: axum::extract::Request) -> Response {
    p.limited(request).await
}

impl Provisioning {
    /// The answer of this replica to a device message.
    pub async fn answer_device(&self, content_type: &str, body: Bytes) -> DeviceAnswer {
        let p = self;
        // The answer has the type the device posted with (B.6: a client may use the DS type).
        let answer_type = if content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .eq_ignore_ascii_case(syncml::CONTENT_TYPE_DS_XML)
        {
            syncml::CONTENT_TYPE_DS_XML
        } else {
            syncml::CONTENT_TYPE_XML
        };
        let refused_type = match syncml::content_type_encoding(content_type) {
            Some(syncml::Encoding::Xml) => None,
            Some(syncml::Encoding::Wbxml) => Some("WBXML is not supported; use XML"),
            None => Some("expected application/vnd.syncml.dm+xml"),
        };
        if let Some(reason) = refused_type {
            tracing::warn!(
                content_type,
                size = body.len(),
                "DM message refused (415): {reason}"
            );
            return DeviceAnswer::text(StatusCode::UNSUPPORTED_MEDIA_TYPE, reason);
        }
        let msg = match syncml::decode(&body).and_then(check_versions) {
            Ok(m) => m,
            Err(e) => return p.undecodable(&body, &e, answer_type).await,
        };
        tracing::debug!(
            dev_id = %msg.hdr.source.loc_uri, session_id = %msg.hdr.session_id, size = body.len(),
            "DM package received"
        );
        let dev_id = msg.hdr.source.loc_uri.clone();
        if let Err(answer) = p.fence(&dev_id).await {
            return answer;
        }
        let creds_before = p.credentials(&dev_id);
        let (handled, created) = match p.handle(&msg) {
            Ok(h) => h,
            Err(refusal) => return DeviceAnswer::text(refusal.http_status(), refusal.to_string()),
        };
        // Nonces and secrets given out in this answer are kept before it goes (a restart must not lose
        // them). A store that fails is not fatal: the device's challenge and the zero-nonce resync (B.1)
        // recover a lost nonce.
        let creds_after = p.credentials(&dev_id);
        let mut broken_off = None;
        // Nonces alone that move in the middle of a session are stored when it ends: one write per
        // session instead of one per message (a replica that dies mid-session loses them, which the
        // device's challenge and the zero-nonce resynchronisation recover, as for a failed store).
        let only_nonces =
            creds_after
                .as_ref()
                .zip(creds_before.as_ref())
                .is_some_and(|(after, before)| {
                    after.server_secret == before.server_secret
                        && after.client_secret == before.client_secret
                        && after.pending_server_secret == before.pending_server_secret
                        && after.pending_client_secret == before.pending_client_secret
                });
        let changed = creds_after != creds_before;
        let store_now = {
            let mut inner = p.lock();
            match inner.devices.get_mut(&dev_id) {
                Some(d) if d.session.is_some() && changed && only_nonces => {
                    d.nonces_unsaved = true;
                    false
                }
                // Stored whole: nonces held back so far go with it.
                Some(d) if changed => {
                    d.nonces_unsaved = false;
                    true
                }
                Some(d) if d.session.is_none() => std::mem::take(&mut d.nonces_unsaved),
                _ => false,
            }
        };
        let new_secret = |c: &Option<DeviceCredentials>| {
            c.as_ref().map(|c| {
                (
                    c.pending_server_secret.clone(),
                    c.pending_client_secret.clone(),
                )
            })
        };
        if store_now && !p.may_write_credentials(&dev_id).await {
            // Another replica holds the device: nothing is stored, and no new secret goes out (a pending
            // one settled, the device having shown it holds it, is no new secret).
            tracing::info!(
                dev_id,
                "another replica holds the device: its credentials are not stored here"
            );
            if gives_new_secret(creds_before.as_ref(), creds_after.as_ref()) {
                broken_off = Some("a new secret goes out only from the replica holding the device");
            }
        } else if store_now && let Err(e) = p.store_device(&dev_id).await {
            tracing::warn!(dev_id, error = %e, "a device's new credentials could not be stored");
            if new_secret(&creds_after) != new_secret(&creds_before) {
                // A new secret goes to the device only once it is stored: the session breaks off here.
                broken_off = Some("a device's new secret could not be stored");
            }
        }
        if broken_off.is_none()
            && let Err(e) = p.persist(created).await
        {
            tracing::warn!(error = %e, "a snapshot could not be stored; the plan is held back");
            broken_off = Some("a snapshot could not be stored");
        }
        // What the device reported is true whether or not this answer reaches it.
        for outcome in handled.outcomes {
            let _ = p.outcomes.send(outcome);
        }
        // Also when the answer is broken off (the device gets none and leaves its session): the job in
        // progress must still end, by the watchdog armed here (this message moved the device's activity
        // past the one armed before), and work queued behind a job that just ended gets its package #0.
        match handled.wake_again {
            Some(dev_id) => {
                let p = p.clone();
                tokio::spawn(async move { p.wake(&dev_id).await });
            }
            None => {
                p.arm(&dev_id);
                // The session ended with nothing more to do: another replica may talk to the device.
                p.release_if_idle(&dev_id).await;
            }
        }
        if let Some(reason) = broken_off {
            tracing::debug!(dev_id, reason, "the device's session is broken off");
            return DeviceAnswer::text(StatusCode::SERVICE_UNAVAILABLE, "try again later");
        }
        let encoded = syncml::encode(&handled.answer);
        tracing::debug!(
            dev_id = %msg.hdr.source.loc_uri, session_id = %msg.hdr.session_id,
            msg_id = %handled.answer.hdr.msg_id, size = encoded.len(),
            commands = handled.answer.body.commands.len(), "DM package sent"
        );
        DeviceAnswer {
            status: 200,
            content_type: answer_type.to_string(),
            body: Bytes::from(encoded),
        }
    }
}

impl Forwarding {
    /// Whether the replica `owner` still answers (one that died has no subscription: nobody responds).
    async fn alive(&self, owner: &[u8]) -> bool {
        let Ok(subject) = self.names.subject(
            dm_bus::Area::Req,
            &format!("provisioning.device.{}", String::from_utf8_lossy(owner)),
        ) else {
            return false;
        };
        let ping = || async {
            let mut headers = dm_bus::Headers::new();
            headers.insert(PING_HEADER, "1");
            !matches!(
                self.bus
                    .request(&subject, headers, Bytes::new(), Duration::from_secs(2))
                    .await,
                Err(dm_bus::BusError::NoResponders(_))
            )
        };
        if ping().await {
            return true;
        }
        // Nobody answers also for a while after a NATS outage, until the owner has reconnected and
        // subscribed again: asked once more after that, a live owner answers.
        tokio::time::sleep(OWNER_RECONNECT).await;
        ping().await
    }

    /// The owner's answer, when another replica owns the device and answers.
    async fn forward(
        &self,
        dev_id: &str,
        content_type: &str,
        body: &Bytes,
    ) -> Option<DeviceAnswer> {
        let owner = self
            .owners
            .get(&dm_bus::subjects::encode_key(dev_id))
            .await
            .ok()
            .flatten()
            .and_then(|e| String::from_utf8(e.value.to_vec()).ok())?;
        if owner == self.me {
            return None;
        }
        let subject = self
            .names
            .subject(dm_bus::Area::Req, &format!("provisioning.device.{owner}"))
            .ok()?;
        let mut headers = dm_bus::Headers::new();
        headers.insert("content-type", content_type);
        headers.insert(DEVICE_HEADER, dev_id);
        let envelope = forwarded_envelope(&owner, dev_id);
        let sealed = self
            .key
            .seal(
                &envelope,
                dm_seal::field::DEVICE_MESSAGE,
                dm_seal::Direction::ToDeviceOwner,
                body,
            )
            .ok()?;
        match self
            .bus
            .request(&subject, headers, Bytes::from(sealed), FORWARD_TIMEOUT)
            .await
        {
            Ok(reply) => {
                // An empty answer is empty (a sealed one never is).
                let body = if reply.payload.is_empty() {
                    Bytes::new()
                } else {
                    let opened = self.key.open(
                        &envelope,
                        dm_seal::field::DEVICE_MESSAGE,
                        dm_seal::Direction::FromDeviceOwner,
                        &reply.payload,
                    );
                    match opened {
                        Ok(plain) => Bytes::from(plain.to_vec()),
                        Err(_) => {
                            tracing::warn!(dev_id, "the owner's answer does not open");
                            return None;
                        }
                    }
                };
                Some(DeviceAnswer {
                    status: reply
                        .headers
                        .get("dmd-http-status")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(500),
                    content_type: reply
                        .headers
                        .get("content-type")
                        .unwrap_or_default()
                        .to_string(),
                    body,
                })
            }
            Err(e) => {
                // The owner is gone: whatever it held comes back to a live replica; answer here.
                tracing::debug!(dev_id, error = %e, "the device's owner does not answer");
                None
            }
        }
    }
}

/// A SyncML DM 1.2 header, or the error that says which of its versions is not (a wrong `SyncHdr` is
/// refused like a message that does not decode).
fn check_versions(msg: syncml::SyncMl) -> Result<syncml::SyncMl, dm_protocol::DecodeError> {
    let wrong = |field: &str, value: &str, wanted: &str| {
        dm_protocol::DecodeError::new(
            dm_protocol::ErrorKind::UnsupportedVersion,
            format!("SyncML/SyncHdr/{field}"),
            format!("'{value}' is not {wanted}"),
        )
    };
    if msg.hdr.ver_dtd.trim() != syncml::VER_DTD {
        return Err(wrong("VerDTD", &msg.hdr.ver_dtd, syncml::VER_DTD));
    }
    if !msg
        .hdr
        .ver_proto
        .trim()
        .eq_ignore_ascii_case(syncml::VER_PROTO)
    {
        return Err(wrong("VerProto", &msg.hdr.ver_proto, syncml::VER_PROTO));
    }
    Ok(msg)
}

impl Provisioning {
    /// A device message that does not decode: refused with the reason. When its header names a session
    /// in progress, that session's job fails now (not at its deadline) and the device is told, in DM
    /// terms, that the session is over; otherwise the answer is HTTP 400.
    async fn undecodable(
        &self,
        body: &[u8],
        error: &dm_protocol::DecodeError,
        answer_type: &'static str,
    ) -> DeviceAnswer {
        let guess = session::guess_header(body);
        if let Some(g) = &guess
            && let Err(answer) = self.fence(&g.source).await
        {
            return answer;
        }
        let handled = guess.as_ref().and_then(|g| {
            let mut inner = self.lock();
            session::undecodable(&self.config, &mut inner, g, error)
        });
        tracing::warn!(
            dev_id = guess.as_ref().map(|g| g.source.as_str()),
            session_id = guess.as_ref().map(|g| g.session_id.as_str()),
            size = body.len(),
            in_session = handled.is_some(),
            "DM message refused (400): {error}"
        );
        let Some(handled) = handled else {
            return DeviceAnswer::text(StatusCode::BAD_REQUEST, error.to_string());
        };
        for outcome in handled.outcomes {
            let _ = self.outcomes.send(outcome);
        }
        if let Some(g) = &guess {
            // The session ended here: what it moved is stored, and the device's lease let go (or its
            // next job woken) as at any session's end.
            self.store_unsaved_nonces(&g.source).await;
            match handled.wake_again {
                Some(dev_id) => {
                    let p = self.clone();
                    tokio::spawn(async move { p.wake(&dev_id).await });
                }
                None => self.release_if_idle(&g.source).await,
            }
        }
        DeviceAnswer {
            status: 200,
            content_type: answer_type.to_string(),
            body: Bytes::from(syncml::encode(&handled.answer)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    struct Unreachable;

    impl Package0Channel for Unreachable {
        fn deliver<'a>(
            &'a self,
            _dev_id: &'a str,
            _package0: Vec<u8>,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<(), dm_notification::ChannelError>> + Send + 'a>,
        > {
            Box::pin(async { Err(dm_notification::ChannelError::Unreachable("test".into())) })
        }
    }

    #[test]
    fn only_a_pending_secret_not_there_before_is_a_new_one() {
        let with = |server: Option<&str>, client: Option<&str>| DeviceCredentials {
            pending_server_secret: server.map(String::from),
            pending_client_secret: client.map(String::from),
            ..DeviceCredentials::default()
        };
        let none = with(None, None);
        assert!(gives_new_secret(Some(&none), Some(&with(Some("s"), None))));
        assert!(gives_new_secret(
            Some(&with(Some("s"), None)),
            Some(&with(Some("s"), Some("c")))
        ));
        assert!(gives_new_secret(
            Some(&with(Some("s"), None)),
            Some(&with(Some("t"), None))
        ));
        // Settled (the device showed it holds it) or unchanged: nothing new goes out.
        assert!(!gives_new_secret(Some(&with(Some("s"), None)), Some(&none)));
        assert!(!gives_new_secret(
            Some(&with(Some("s"), Some("c"))),
            Some(&with(Some("s"), Some("c")))
        ));
        assert!(!gives_new_secret(Some(&none), None));
    }

    /// The watchdog keeps a queue of deadlines served by one task, not a task per device message; each
    /// arm still fires on its own, so the head job fails with 408 once the device fell silent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_arms_take_one_task_and_the_last_one_fails_the_head_job() {
        let mut config = Config::new("DMS-1", "http://127.0.0.1:1/dm");
        config.session_timeout = Duration::from_millis(300);
        let (p, mut outcomes) = Provisioning::new(config, Arc::new(Unreachable));
        {
            let mut inner = p.lock();
            let entry = inner.devices.entry("IMEI:1".into()).or_default();
            entry.queue.push_back((
                7,
                Job::Restore {
                    plan_id: "p".into(),
                },
            ));
            // The package #0 was sent again already: the next expiry fails the job.
            entry.zero_nonce_sent = true;
        }
        let tasks_before = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        for _ in 0..1000 {
            p.arm("IMEI:1");
        }
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(
            tasks,
            tasks_before + 1,
            "one task serves every armed deadline"
        );
        assert_eq!(p.watchdog.lock().unwrap().armed.len(), 1000);

        let outcome = tokio::time::timeout(Duration::from_secs(10), outcomes.recv())
            .await
            .expect("the head job fails within the deadline")
            .expect("an outcome");
        assert_eq!(outcome.job_id, 7);
        assert_eq!(outcome.result.as_ref().map_err(|f| f.status), Err(408));
        // Only the deadline armed last was current: the 999 before it fired into nothing.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while p.watchdog.lock().unwrap().serving {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the watchdog never let go"
            );
            tokio::task::yield_now().await;
        }
        assert!(p.watchdog.lock().unwrap().armed.is_empty());
        assert!(outcomes.try_recv().is_err(), "one outcome only");
    }
}
