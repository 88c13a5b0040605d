//! `dmd chaos`: the fault program of issue 10. Real processes: a nats-server with JetStream on disk, and
//! `dmd <service>` for each of the five services of both deployments, two replicas each (twenty
//! processes), behind one address per deployment for the peer endpoint and one for the device endpoint
//! (a small TCP balancer here plays the part of a Kubernetes Service). The simulated fleet runs in this
//! process, so that every device tree can be read at the end.
//!
//! N delegations of every type, both initiators, C in flight; every fifth non-Final one that becomes
//! Active is revoked. Meanwhile a seeded schedule kills a random process with SIGKILL every few hundred
//! milliseconds (nats-server included) and a supervisor starts it again, as an orchestrator would. At the
//! end every delegation is classified from both sides' admin APIs and the device: Active on both sides
//! with the device as A.6 says; ended on both sides with the device restored exactly (B.7); stuck (not
//! settled after the settle time); inconsistent (the sides disagree, or the device matches neither);
//! twice (a change reached a device more than once). The last line is
//! `chaos: <n> delegations, <k> kills, stuck <a>, inconsistent <b>, twice <c>`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dm_client::{DefaultAccount, Device, Fleet};
use dm_proto::admin::v1::admin_client::AdminClient;
use dm_proto::admin::v1::{DelegationId, StartDelegationRequest};
use dm_protocol::acl::AclCommand;
use dm_protocol::auth;
use dm_protocol::tnds::MgmtTree;
use dm_protocol::types::Uuid;
use dm_saga::pb::{self, DelType, Phase, Role};
use rand::{RngExt, SeedableRng};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tonic::transport::Channel;

use crate::demo::{D1, D2, device_id};
use crate::pki;

const TOKEN_ENV: &str = "DMD_CHAOS_TOKEN";
const SERVICES: [&str; 5] = [
    "orchestrator",
    "auth",
    "gateway",
    "notification",
    "provisioning",
];
const REPLICAS: usize = 2;

/// What the fault program is asked to do.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub delegations: usize,
    pub in_flight: usize,
    /// How many processes are killed in all (kills stop earlier when every delegation has settled).
    pub kills: usize,
    pub seed: u64,
    /// The pause between two kills is drawn from this range (milliseconds).
    pub kill_every_ms: (u64, u64),
    /// After the last kill, how long every delegation has to settle before it counts as stuck.
    pub settle: Duration,
    /// Keep the working directory (configurations, logs, the NATS store) even when all went well.
    pub keep: bool,
    /// Never kill nats-server (only the services).
    pub spare_nats: bool,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        Self {
            delegations: 1000,
            in_flight: 50,
            kills: 200,
            seed: 1,
            kill_every_ms: (200, 600),
            settle: Duration::from_secs(300),
            keep: false,
            spare_nats: false,
        }
    }
}

/// How one delegation ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Active on both sides, the device as A.6 says.
    Active,
    /// Ended on both sides (the phase of the initiator), the device restored exactly.
    Ended(i32),
    /// Never started: every start was refused (counted apart, not a fault of the system's state).
    NotStarted,
    Stuck,
    Inconsistent,
}

/// The outcome of a run.
#[derive(Debug)]
pub struct ChaosReport {
    pub delegations: usize,
    pub kills: usize,
    pub kills_by_process: BTreeMap<String, usize>,
    pub verdicts: BTreeMap<Verdict, usize>,
    pub twice: usize,
    /// Up to a few lines about each stuck, inconsistent or twice delegation.
    pub details: Vec<String>,
    pub elapsed: Duration,
    pub dir: PathBuf,
}

impl ChaosReport {
    fn count(&self, v: Verdict) -> usize {
        self.verdicts.get(&v).copied().unwrap_or(0)
    }

    pub fn stuck(&self) -> usize {
        self.count(Verdict::Stuck)
    }

    pub fn inconsistent(&self) -> usize {
        self.count(Verdict::Inconsistent)
    }

    pub fn passed(&self) -> bool {
        self.stuck() == 0 && self.inconsistent() == 0 && self.twice == 0
    }

    /// The table, for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{} delegations, {} kills in {:.0} s (working directory {})\n",
            self.delegations,
            self.kills,
            self.elapsed.as_secs_f64(),
            self.dir.display()
        ));
        out.push_str("| outcome | delegations |\n|---|---|\n");
        for (verdict, n) in &self.verdicts {
            let label = match verdict {
                Verdict::Active => "Active on both sides, device as A.6 says".to_string(),
                Verdict::Ended(p) => format!(
                    "{} on both sides, device restored exactly (B.7)",
                    phase_name(*p)
                ),
                Verdict::NotStarted => "start refused (nothing happened)".to_string(),
                Verdict::Stuck => "stuck past its deadline".to_string(),
                Verdict::Inconsistent => {
                    "inconsistent (sides disagree, or the device matches neither)".to_string()
                }
            };
            out.push_str(&format!("| {label} | {n} |\n"));
        }
        out.push_str(&format!(
            "| device changes applied twice | {} |\n",
            self.twice
        ));
        out.push_str("\nkills: ");
        out.push_str(
            &self
                .kills_by_process
                .iter()
                .map(|(p, n)| format!("{p} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        out.push('\n');
        for d in &self.details {
            out.push_str(d);
            out.push('\n');
        }
        out
    }

    pub fn last_line(&self) -> String {
        format!(
            "chaos: {} delegations, {} kills, stuck {}, inconsistent {}, twice {}",
            self.delegations,
            self.kills,
            self.stuck(),
            self.inconsistent(),
            self.twice
        )
    }
}

fn phase_name(p: i32) -> String {
    Phase::try_from(p)
        .map(|p| {
            let name = p.as_str_name().trim_start_matches("PHASE_").to_lowercase();
            let mut c = name.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .unwrap_or_else(|_| format!("phase {p}"))
}

fn terminal(p: Phase) -> bool {
    matches!(
        p,
        Phase::Declined | Phase::Failed | Phase::Revoked | Phase::Expired | Phase::Released
    )
}

/// A free loopback port (bound, then let go: the process that will use it binds it again, maybe
/// after several restarts). Chosen below the kernel's ephemeral range: a port from that range is
/// soon the source port of some outbound connection (to NATS, to a peer), and the process that
/// owns the port could then not start again. Never the same port twice in one run.
fn free_port() -> anyhow::Result<u16> {
    static TAKEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, first_ephemeral.saturating_sub(1).max(10_001));
    let mut rng = rand::rng();
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = rng.random_range(low..=high);
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return Ok(port);
        }
    }
    bail!("no free loopback port between {low} and {high}")
}

/// One supervised process: started again whenever it ends, until the run stops.
struct Proc {
    label: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    kill: Notify,
    /// Health endpoint (`/readyz`), for the `dmd` processes.
    health: Option<SocketAddr>,
    /// The NATS port, for nats-server.
    port: Option<u16>,
}

async fn supervise(p: Arc<Proc>, stopping: Arc<AtomicBool>) {
    loop {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log);
        let mut cmd = tokio::process::Command::new(&p.program);
        cmd.args(&p.args)
            .env(TOKEN_ENV, "chaos-operator-token")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        match log {
            Ok(f) => {
                cmd.stderr(f);
            }
            Err(_) => {
                cmd.stderr(std::process::Stdio::null());
            }
        }
        match cmd.spawn() {
            Ok(mut child) => {
                tokio::select! {
                    _ = child.wait() => {}
                    _ = p.kill.notified() => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                    }
                }
            }
            Err(e) => eprintln!("chaos: cannot start {}: {e}", p.label),
        }
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        // As an orchestrator restarts a container: soon, but not in a tight loop.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Plays a Kubernetes Service: every connection goes to the first backend (round robin) that accepts.
async fn balance(listener: TcpListener, backends: Vec<SocketAddr>) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        let backends = backends.clone();
        let next = next.clone();
        tokio::spawn(async move {
            let first = next.fetch_add(1, Ordering::Relaxed);
            for i in 0..backends.len() {
                let to = backends[(first + i) % backends.len()];
                let Ok(Ok(mut outbound)) =
                    tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(to)).await
                else {
                    continue;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                return;
            }
        });
    }
}

/// The addresses of one deployment.
struct Side {
    name: &'static str,
    me: &'static str,
    peer: &'static str,
    gateway_front: u16,
    device_front: u16,
    gateways: [u16; REPLICAS],
    endpoints: [u16; REPLICAS],
    admins: [u16; REPLICAS],
    /// The deployment's master key, in a file as a secret would be mounted.
    master_key_file: PathBuf,
}

impl Side {
    fn new(
        dir: &std::path::Path,
        name: &'static str,
        me: &'static str,
        peer: &'static str,
    ) -> anyhow::Result<Side> {
        let ports = || -> anyhow::Result<[u16; REPLICAS]> { Ok([free_port()?, free_port()?]) };
        let master_key_file = dir.join(format!("{name}-master-key"));
        std::fs::write(
            &master_key_file,
            auth::encode_nonce(&rand::random::<[u8; 32]>()),
        )?;
        Ok(Side {
            name,
            me,
            peer,
            gateway_front: free_port()?,
            device_front: free_port()?,
            gateways: ports()?,
            endpoints: ports()?,
            admins: ports()?,
            master_key_file,
        })
    }

    fn device_url(&self) -> String {
        format!("http://127.0.0.1:{}/dm", self.device_front)
    }

    fn peer_endpoint(&self, sides: &[Side; 2]) -> String {
        let peer = sides.iter().find(|s| s.me == self.peer).unwrap_or(self);
        format!(
            "https://127.0.0.1:{}{}",
            peer.gateway_front,
            dm_gateway::DEFAULT_PATH
        )
    }
}

/// The configuration of one process: every table (each process reads only its own service's), with this
/// replica's addresses. Short deadlines and ack waits: a killed holder's work comes back in seconds.
fn config_text(
    side: &Side,
    sides: &[Side; 2],
    replica: usize,
    health: u16,
    nats_port: u16,
    pki: &pki::Pki,
    devices: &[(String, DefaultAccount)],
) -> anyhow::Result<String> {
    let files = pki.files(side.me).context("certificates")?;
    let peer_endpoint = side.peer_endpoint(sides);
    let types = r#"["Partial", "Full", "Final", "Temporary"]"#;
    let mut t = format!(
        r#"[deployment]
name = "{name}"
server_id = "{me}"
nats_url = "nats://127.0.0.1:{nats_port}"

[health]
listen = "127.0.0.1:{health}"

[admin]
listen = "127.0.0.1:{admin}"
token_env = "{TOKEN_ENV}"

[orchestrator]
ack_wait_secs = 5
retry_min_secs = 2
retry_max_secs = 10
[orchestrator.deadlines]
await_res = 60
decide = 60
verify = 30
await_start = 60
await_prepared = 120
create_key = 30
apply = 120
await_confirm = 120
first_session = 120
await_release = 60

[tls]
cert = "{cert}"
key = "{key}"

[[peer]]
server_id = "{peer}"
endpoint = "{peer_endpoint}"
ca = "{ca}"
types = {types}
scopes = ["."]
max_temporary_secs = 86400

[auth]
dm_address = "{device_url}"
master_key_file = "{master_key_file}"
ack_wait_secs = 5

[gateway]
listen = "127.0.0.1:{gateway}"
[gateway.timeouts]
send_deadline_ms = 30000
ack_wait_ms = 35000

[acceptance]
offered_types = {types}

[provisioning]
listen = "127.0.0.1:{endpoint}"
public_url = "{device_url}"
push_url = "{push_url}"
session_timeout_secs = 10
command_ack_wait_secs = 5
"#,
        name = side.name,
        me = side.me,
        peer = side.peer,
        admin = side.admins[replica],
        gateway = side.gateways[replica],
        endpoint = side.endpoints[replica],
        device_url = side.device_url(),
        master_key_file = side.master_key_file.display(),
        cert = files.cert.display(),
        key = files.key.display(),
        ca = pki.ca_cert.display(),
        push_url = "{push_url}",
    );
    for (dev_id, a) in devices {
        t.push_str(&format!(
            "[[provisioning.device]]\ndev_id = \"{dev_id}\"\nserver_secret = \"{}\"\nserver_nonce_b64 = \"{}\"\nclient_name = \"{}\"\nclient_secret = \"{}\"\nclient_nonce_b64 = \"{}\"\n",
            a.server_secret,
            a.server_nonce_b64,
            a.client_name,
            a.client_secret,
            a.client_nonce_b64
        ));
    }
    Ok(t)
}

/// One planned delegation.
#[derive(Debug, Clone)]
struct Planned {
    device: String,
    del_type: DelType,
    initiator: &'static str,
    session: String,
    revoke: bool,
    /// The device's tree before the delegation.
    before: MgmtTree,
}

fn plan(i: usize, before: MgmtTree) -> Planned {
    let del_type = [
        DelType::Partial,
        DelType::Full,
        DelType::Final,
        DelType::Temporary,
    ][i % 4];
    Planned {
        device: device_id(i),
        del_type,
        initiator: if (i / 4).is_multiple_of(2) { D1 } else { D2 },
        session: Uuid::from_random_bytes(rand::random()).to_string(),
        revoke: del_type != DelType::Final && (i / 4).is_multiple_of(5),
        before,
    }
}

fn scope_of(t: DelType) -> &'static str {
    if t == DelType::Full {
        "."
    } else {
        "./Vendor/Acme"
    }
}

/// The admin APIs of one side (both orchestrator replicas): a call goes to the first that answers.
#[derive(Clone)]
struct Admin {
    clients: Vec<AdminClient<Channel>>,
    peer: &'static str,
}

fn authorized<T>(body: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    if let Ok(v) = "Bearer chaos-operator-token".parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r.set_timeout(Duration::from_secs(5));
    r
}

/// An answer that says something about the delegation (not about the reachability of the API).
fn definite(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::NotFound
            | tonic::Code::AlreadyExists
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition
    )
}

impl Admin {
    fn new(side: &Side) -> anyhow::Result<Admin> {
        let mut clients = Vec::new();
        for port in side.admins {
            let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
                .connect_timeout(Duration::from_secs(1))
                .connect_lazy();
            clients.push(AdminClient::new(channel));
        }
        Ok(Admin {
            clients,
            peer: side.peer,
        })
    }

    /// The state of a delegation (`None`: not stored), asking replicas in turn until one answers.
    async fn get(&self, session: &str, until: Instant) -> Option<Option<pb::DelegationState>> {
        let mut i = 0;
        loop {
            let mut c = self.clients[i % self.clients.len()].clone();
            i += 1;
            let id = DelegationId {
                peer_server_id: self.peer.to_string(),
                session_id: session.to_string(),
            };
            match c.get_delegation(authorized(id)).await {
                Ok(r) => return Some(r.into_inner().state),
                Err(s) if s.code() == tonic::Code::NotFound => return Some(None),
                Err(_) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(_) => return None,
            }
        }
    }

    async fn start(&self, p: &Planned, until: Instant) -> Result<(), String> {
        let role = if p.initiator == D1 {
            Role::Delegating
        } else {
            Role::Delegated
        };
        let mut r = StartDelegationRequest {
            peer_server_id: self.peer.to_string(),
            device: Some(pb::Device {
                dev_id: p.device.clone(),
                ..Default::default()
            }),
            scope: vec![scope_of(p.del_type).to_string()],
            not_after_ms: (p.del_type == DelType::Temporary).then(|| now_ms() + 3_600_000),
            session_id: p.session.clone(),
            ..Default::default()
        };
        r.set_role(role);
        r.set_del_type(p.del_type);
        self.call(until, |mut c| {
            let r = r.clone();
            async move { c.start_delegation(authorized(r)).await.map(|_| ()) }
        })
        .await
    }

    async fn revoke(&self, session: &str, until: Instant) -> Result<(), String> {
        let id = DelegationId {
            peer_server_id: self.peer.to_string(),
            session_id: session.to_string(),
        };
        self.call(until, |mut c| {
            let id = id.clone();
            async move { c.revoke_delegation(authorized(id)).await.map(|_| ()) }
        })
        .await
    }

    /// A call retried on the other replica and again until a definite answer or `until`.
    async fn call<F, Fut>(&self, until: Instant, f: F) -> Result<(), String>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>>,
    {
        let mut i = 0;
        loop {
            let c = self.clients[i % self.clients.len()].clone();
            i += 1;
            match f(c).await {
                Ok(()) => return Ok(()),
                // A retried call whose first try went through.
                Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
                Err(s) if definite(&s) => return Err(s.message().to_string()),
                Err(s) if Instant::now() >= until => return Err(s.message().to_string()),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Drives one delegation until its initiator has it Active (revoked when planned) or ended.
async fn drive(p: &Planned, admins: &[Admin; 2], until: Instant) -> bool {
    let (init, d1) = (side_admin(admins, p.initiator), &admins[0]);
    if init.start(p, until).await.is_err() {
        // A refused start changed nothing; a start that timed out may still have been stored.
        return init
            .get(&p.session, until)
            .await
            .is_some_and(|s| s.is_some());
    }
    let mut revoked = false;
    while Instant::now() < until {
        if let Some(Some(s)) = init.get(&p.session, until).await {
            let phase = s.phase();
            if terminal(phase) {
                return true;
            }
            if phase == Phase::Active {
                if !p.revoke || revoked {
                    return true;
                }
                revoked = d1.revoke(&p.session, until).await.is_ok();
                if !revoked {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    true
}

fn side_admin<'a>(admins: &'a [Admin; 2], server_id: &str) -> &'a Admin {
    if server_id == D1 {
        &admins[0]
    } else {
        &admins[1]
    }
}

/// Whether both sides have settled (`Some(verdict)`), or not yet (`None`).
fn judge(
    p: &Planned,
    started: bool,
    d1: Option<&pb::DelegationState>,
    d2: Option<&pb::DelegationState>,
    fleet: &Fleet,
) -> (Option<Verdict>, String) {
    let phase = |s: Option<&pb::DelegationState>| s.map(|s| s.phase());
    let (p1, p2) = (phase(d1), phase(d2));
    let shown = format!(
        "{} {:?} by {} session {}: DMS-1 {:?}, DMS-2 {:?}",
        p.device, p.del_type, p.initiator, p.session, p1, p2
    );
    if !started && p1.is_none() && p2.is_none() {
        return (Some(Verdict::NotStarted), shown);
    }
    let settled = |p: Option<Phase>| p.is_none_or(terminal);
    match (p1, p2) {
        (Some(Phase::Active), Some(Phase::Active)) => {
            let root = if p.del_type == DelType::Full {
                "./Vendor"
            } else {
                "./Vendor/Acme"
            };
            let ok = fleet
                .with_device(&p.device, |d| {
                    let Ok(uri) = root.parse() else { return false };
                    let Ok(acl) = d.tree().effective_acl(&uri) else {
                        return false;
                    };
                    d.account_uri(D2).is_some()
                        && acl.allows(AclCommand::Replace, D2)
                        && !acl.allows(AclCommand::Replace, D1)
                })
                .unwrap_or(false);
            if ok {
                (Some(Verdict::Active), shown)
            } else {
                (
                    Some(Verdict::Inconsistent),
                    format!("{shown}: the device is not as A.6 says"),
                )
            }
        }
        (a, b) if settled(a) && settled(b) => {
            let ended = p1.or(p2).map(|p| p as i32).unwrap_or_default();
            let restored = fleet
                .with_device(&p.device, |d| restored_exactly(&p.before, d))
                .unwrap_or(Ok(()));
            match restored {
                Ok(()) => (Some(Verdict::Ended(ended)), shown),
                Err(diff) => (
                    Some(Verdict::Inconsistent),
                    format!("{shown}: the device was not restored ({diff})"),
                ),
            }
        }
        (a, b)
            if (a == Some(Phase::Active) && settled(b))
                || (b == Some(Phase::Active) && settled(a)) =>
        {
            (
                Some(Verdict::Inconsistent),
                format!("{shown}: the sides disagree"),
            )
        }
        _ => (None, shown),
    }
}

/// B.7 on the device: the tree as it was before the delegation. DMS-1's own credentials are not
/// compared: their nonces change at every session, and a resynchronisation (B.1) may have rotated its
/// server secret; neither is a trace of the delegation.
fn restored_exactly(
    before: &MgmtTree,
    device: &Device,
) -> Result<(), dm_protocol::tree::Difference> {
    let mut now = device.tree().clone();
    let own: Vec<_> = device.account_uri(D1).into_iter().collect();
    if let (Ok(then), Some(account)) = (dm_protocol::tree::DmTree::from_tnds(before), own.first()) {
        for cred in ["SRVCRED", "CLCRED"] {
            let Ok(uri) = format!("{account}/AppAuth/{cred}/AAuthSecret").parse() else {
                continue;
            };
            if let Ok(value) = then.value(&uri) {
                let _ = now.replace_value(&uri, value.to_string());
            }
        }
    }
    dm_protocol::tree::same_tree(before, &now.to_tnds(), &own)
}

/// The device's sessions in short: server, outcome, changes.
fn sessions_of(fleet: &Fleet, dev_id: &str) -> String {
    let sessions = fleet.sessions(dev_id).unwrap_or_default();
    let shown: Vec<String> = sessions
        .iter()
        .map(|s| {
            // The first changes by target (their data only as the digest's first digits).
            let first: Vec<&str> = s
                .changes
                .iter()
                .take(3)
                .map(|c| c.rsplit_once(' ').map_or(c.as_str(), |(t, _)| t))
                .collect();
            format!(
                "{} {:?} {} changes {first:?}",
                s.server.split('.').next().unwrap_or_default(),
                s.outcome,
                s.changes.len()
            )
        })
        .collect();
    format!("device sessions: [{}]", shown.join("; "))
}

/// A change that reached the device twice: the same command, target and data from the same server again,
/// while nothing else changed that node in between (a Delete of it or of a node above it counts as a
/// change). A change undone and then done again (a plan re-run after its restore) is not one: the device
/// ends as the second run left it. Over every session the device had, in order.
fn changed_twice(fleet: &Fleet, dev_id: &str) -> Option<String> {
    twice_in(&fleet.sessions(dev_id)?).map(|line| format!("{dev_id}: {line}"))
}

fn twice_in(sessions: &[dm_client::SessionRecord]) -> Option<String> {
    // Per target: the last change to it (server and change line).
    let mut last: std::collections::HashMap<String, (String, String)> =
        std::collections::HashMap::new();
    for s in sessions {
        for change in &s.changes {
            let mut parts = change.splitn(3, ' ');
            let (Some(cmd), Some(target)) = (parts.next(), parts.next()) else {
                continue;
            };
            let now = (s.server.clone(), change.clone());
            if last.get(target) == Some(&now) {
                return Some(format!("{change} applied twice by {}", s.server));
            }
            if cmd == "Delete" {
                // The node and everything below it (its ACL property included) are gone.
                last.retain(|t, _| {
                    !(t == target
                        || t.strip_prefix(target)
                            .is_some_and(|rest| rest.starts_with('/') || rest.starts_with('?')))
                });
            }
            last.insert(target.to_string(), now);
        }
    }
    None
}

async fn wait_ready(procs: &[Arc<Proc>], deadline: Instant) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    for p in procs {
        loop {
            let ready = match (p.health, p.port) {
                (Some(h), _) => http
                    .get(format!("http://{h}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
                (None, Some(port)) => TcpStream::connect(("127.0.0.1", port)).await.is_ok(),
                (None, None) => true,
            };
            if ready {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} is not ready (its log: {})", p.label, p.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Runs the fault program.
pub async fn run(options: ChaosOptions) -> anyhow::Result<ChaosReport> {
    dm_gateway::install_crypto_provider();
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("dmd-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs"))?;
    let nats_bin = dm_bus::testing::find_binary().context(
        "no nats-server: set NATS_SERVER_BIN or put nats-server on PATH (scripts/test installs one)",
    )?;
    let dmd_bin = std::env::current_exe().context("the path of this program")?;
    let pki = pki::generate(&dir.join("pki"), &[D1, D2])?;

    // The fleet, in this process; devices managed by DMS-1.
    let fleet = Fleet::new();
    let fleet_listener = TcpListener::bind("127.0.0.1:0").await?;
    let push_url = format!("http://{}", fleet_listener.local_addr()?);
    {
        let serving = fleet.clone();
        tokio::spawn(async move { serving.serve(fleet_listener, std::future::pending()).await });
    }
    let sides = [
        Side::new(&dir, "dms1", D1, D2)?,
        Side::new(&dir, "dms2", D2, D1)?,
    ];
    let mut accounts = Vec::new();
    let mut planned = Vec::new();
    for i in 0..options.delegations {
        let dev_id = device_id(i);
        let account = DefaultAccount {
            server_id: D1.into(),
            addr: sides[0].device_url(),
            server_secret: format!("dms1-secret-{i}"),
            server_nonce_b64: auth::encode_nonce(format!("sn-{i}").as_bytes()),
            client_name: dev_id.clone(),
            client_secret: format!("device-secret-{i}"),
            client_nonce_b64: auth::encode_nonce(format!("cn-{i}").as_bytes()),
        };
        let device = Device::with_default_tree(&dev_id, &account)?;
        planned.push(plan(i, device.export()));
        fleet.insert(device);
        accounts.push((dev_id, account));
    }

    // The processes.
    let nats_port = free_port()?;
    let stopping = Arc::new(AtomicBool::new(false));
    let mut procs = vec![Arc::new(Proc {
        label: "nats-server".into(),
        program: nats_bin,
        args: vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            nats_port.to_string(),
            "-js".into(),
            "-sd".into(),
            dir.join("nats").display().to_string(),
        ],
        log: dir.join("logs/nats-server.log"),
        kill: Notify::new(),
        health: None,
        port: Some(nats_port),
    })];
    for side in &sides {
        for service in SERVICES {
            for replica in 0..REPLICAS {
                let label = format!("{}-{service}-{replica}", side.name);
                let health = free_port()?;
                let devices: &[(String, DefaultAccount)] =
                    if side.me == D1 && service == "provisioning" {
                        &accounts
                    } else {
                        &[]
                    };
                let text = config_text(side, &sides, replica, health, nats_port, &pki, devices)?
                    .replace("{push_url}", &push_url);
                let config = dir.join(format!("{label}.toml"));
                std::fs::write(&config, text)?;
                procs.push(Arc::new(Proc {
                    label: label.clone(),
                    program: dmd_bin.clone(),
                    args: vec![
                        service.to_string(),
                        "--config".into(),
                        config.display().to_string(),
                    ],
                    log: dir.join(format!("logs/{label}.log")),
                    kill: Notify::new(),
                    health: Some(SocketAddr::from(([127, 0, 0, 1], health))),
                    port: None,
                }));
            }
        }
    }
    let mut supervisors = Vec::new();
    // NATS first: a service that finds no bus exits and is started again, but that only costs time.
    supervisors.push(tokio::spawn(supervise(procs[0].clone(), stopping.clone())));
    wait_ready(&procs[..1], Instant::now() + Duration::from_secs(30)).await?;
    for p in &procs[1..] {
        supervisors.push(tokio::spawn(supervise(p.clone(), stopping.clone())));
    }
    for side in &sides {
        let front = |port: u16, backends: [u16; REPLICAS]| async move {
            let l = TcpListener::bind(("127.0.0.1", port)).await?;
            let to = backends
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect();
            tokio::spawn(balance(l, to));
            anyhow::Ok(())
        };
        front(side.gateway_front, side.gateways).await?;
        front(side.device_front, side.endpoints).await?;
    }
    let ready = wait_ready(&procs, Instant::now() + Duration::from_secs(120)).await;
    let shutdown = |stopping: Arc<AtomicBool>, procs: Vec<Arc<Proc>>| async move {
        stopping.store(true, Ordering::SeqCst);
        for p in &procs {
            p.kill.notify_one();
        }
    };
    if let Err(e) = ready {
        shutdown(stopping.clone(), procs.clone()).await;
        return Err(e);
    }
    eprintln!(
        "chaos: {} processes ready after {:.1} s; {} delegations, {} in flight, up to {} kills, seed {}",
        procs.len(),
        started.elapsed().as_secs_f64(),
        options.delegations,
        options.in_flight,
        options.kills,
        options.seed
    );

    let admins = [Admin::new(&sides[0])?, Admin::new(&sides[1])?];
    // The kills, on a seeded schedule, while delegations are driven.
    let driving_done = Arc::new(AtomicBool::new(false));
    let killer = {
        let procs = procs.clone();
        let done = driving_done.clone();
        let options = options.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
            let mut by_process: BTreeMap<String, usize> = BTreeMap::new();
            let mut kills = 0;
            while kills < options.kills && !done.load(Ordering::SeqCst) {
                let pause = rng.random_range(options.kill_every_ms.0..=options.kill_every_ms.1);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                // procs[0] is nats-server.
                let first = usize::from(options.spare_nats);
                let victim = &procs[rng.random_range(first..procs.len())];
                victim.kill.notify_one();
                *by_process.entry(victim.label.clone()).or_default() += 1;
                kills += 1;
            }
            (kills, by_process)
        })
    };
    let slots = Arc::new(Semaphore::new(options.in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, p) in planned.iter().enumerate() {
        let permit = slots.clone().acquire_owned().await?;
        let p = p.clone();
        let admins = admins.clone();
        // Each delegation has the settle time to reach Active or an end; the last look is after the
        // kills.
        let until = Instant::now() + options.settle;
        tasks.spawn(async move {
            let started = drive(&p, &admins, until).await;
            drop(permit);
            (i, started)
        });
    }
    let mut started_ok = vec![false; planned.len()];
    while let Some(done) = tasks.join_next().await {
        let (i, s) = done?;
        started_ok[i] = s;
    }
    driving_done.store(true, Ordering::SeqCst);
    let (kills, kills_by_process) = killer.await?;
    // Every process back (a killed one is being started again).
    let _ = wait_ready(&procs, Instant::now() + Duration::from_secs(60)).await;

    // Settle: wait until every delegation is settled on both sides, or the settle time is over.
    let settle_until = Instant::now() + options.settle;
    let mut verdicts: Vec<Option<(Verdict, String)>> = vec![None; planned.len()];
    loop {
        let mut open = 0;
        for (i, p) in planned.iter().enumerate() {
            if verdicts[i].is_some() {
                continue;
            }
            let until = Instant::now() + Duration::from_secs(10);
            let (Some(s1), Some(s2)) = (
                admins[0].get(&p.session, until).await,
                admins[1].get(&p.session, until).await,
            ) else {
                open += 1;
                continue;
            };
            match judge(p, started_ok[i], s1.as_ref(), s2.as_ref(), &fleet) {
                (Some(v), text) => verdicts[i] = Some((v, text)),
                (None, _) => open += 1,
            }
        }
        if open == 0 || Instant::now() >= settle_until {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut details = Vec::new();
    let mut counts: BTreeMap<Verdict, usize> = BTreeMap::new();
    for (i, p) in planned.iter().enumerate() {
        let (v, text) = match verdicts[i].take() {
            Some(v) => v,
            None => {
                let until = Instant::now() + Duration::from_secs(10);
                let (s1, s2) = (
                    admins[0].get(&p.session, until).await.flatten(),
                    admins[1].get(&p.session, until).await.flatten(),
                );
                (
                    Verdict::Stuck,
                    judge(p, started_ok[i], s1.as_ref(), s2.as_ref(), &fleet).1,
                )
            }
        };
        if matches!(v, Verdict::Stuck | Verdict::Inconsistent) && details.len() < 20 {
            details.push(format!("{v:?}: {text}; {}", sessions_of(&fleet, &p.device)));
        }
        *counts.entry(v).or_default() += 1;
    }
    let mut twice = 0;
    for p in &planned {
        if let Some(line) = changed_twice(&fleet, &p.device) {
            twice += 1;
            if details.len() < 30 {
                details.push(format!(
                    "Twice: {line} ({:?} by {}); {}",
                    p.del_type,
                    p.initiator,
                    sessions_of(&fleet, &p.device)
                ));
            }
        }
    }
    shutdown(stopping.clone(), procs.clone()).await;
    for s in supervisors {
        let _ = s.await;
    }
    let report = ChaosReport {
        delegations: planned.len(),
        kills,
        kills_by_process,
        verdicts: counts,
        twice,
        details,
        elapsed: started.elapsed(),
        dir: dir.clone(),
    };
    if report.passed() && !options.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(server: &str, changes: &[&str]) -> dm_client::SessionRecord {
        dm_client::SessionRecord {
            server: server.into(),
            alert: 1200,
            session_id: "1".into(),
            outcome: dm_client::Outcome::Completed,
            commands_executed: changes.len(),
            messages_sent: 2,
            trailing_bytes: 0,
            zero_nonce: false,
            changes: changes.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn a_change_done_again_is_twice_unless_it_was_undone_in_between() {
        let add = "Add ./DMAcc/d2/AppID 1";
        let acl = "Replace ./Vendor?prop=ACL 2";
        // The same Add twice (a duplicate delivery): twice, across sessions too.
        assert!(twice_in(&[session(D1, &[add]), session(D1, &[add])]).is_some());
        assert!(twice_in(&[session(D1, &[acl, acl])]).is_some());
        // Undone by a Delete of the node above, then done again (a plan re-run after its restore).
        let undo = "Delete ./DMAcc/d2 3";
        assert!(
            twice_in(&[
                session(D1, &[add, acl]),
                session(D1, &[undo]),
                session(D1, &[add])
            ])
            .is_none()
        );
        // A value changed in between; another server's change is not a repetition.
        let other = "Replace ./Vendor?prop=ACL 4";
        assert!(twice_in(&[session(D1, &[acl, other, acl])]).is_none());
        assert!(twice_in(&[session(D1, &[acl]), session(D2, &[acl])]).is_none());
        // A Delete of a sibling whose name starts alike does not undo it.
        let sibling = "Delete ./DMAcc/d 5";
        assert!(twice_in(&[session(D1, &[add, sibling, add])]).is_some());
    }
}
