//! One device's DM session on the server side: authentication both ways (docs/device-side.md), and the job
//! being carried out, round by round. Pure with respect to IO: `handle` takes a decoded message and the
//! service's state and returns the answer; the HTTP handler does the rest.

use std::collections::HashMap;

use dm_protocol::acl::{Acl, AclCommand};
use dm_protocol::auth::{self, AuthScheme};
use dm_protocol::codes::{AlertCode, StatusCode};
use dm_protocol::dmacc::Secret;
use dm_protocol::syncml::{
    Alert, Chal, Command, Container, Item, ItemCommand, Location, Meta, Status, SyncBody, SyncHdr,
    SyncMl,
};
use dm_protocol::types::DmUri;

use crate::plan::{self, Observed, PlanRequest, Snapshot};
use crate::{Config, DeviceEntry, Inner, Job, Rotation};

/// The most nodes a plan reads below its scope roots before giving up (413: the scope is too large).
const MAX_NODES: usize = 4096;

/// What a finished job produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSuccess {
    /// The plan is on the device: where the account went, every ACL changed (after), and the server nonce
    /// set for the delegated server (DELEGATION_PREPARED's `ServerCred/Nonce`).
    Applied {
        account_uri: String,
        acl_results: Vec<(String, String)>,
        server_nonce_b64: String,
    },
    Restored,
    /// The first session of the delegated server: both credentials replaced.
    Rotated,
    /// The device's statuses (code per command id) and results (items) of a `Commands` job.
    Commands {
        statuses: Vec<(String, u16)>,
        results: Vec<Item>,
    },
}

/// Why a job failed: the DM status code, the command it came from (when known) and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    pub status: u32,
    pub command: String,
    pub reason: String,
}

pub type JobResult = Result<JobSuccess, JobFailure>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub job_id: u64,
    pub dev_id: String,
    pub result: JobResult,
}

/// Not a DM status (those fit in 16 bits; a status a device left out is read as 0): the job was given up
/// because another replica took its device over. No outcome is published for it (see
/// `Provisioning::fence`).
pub const SUPERSEDED: u32 = u32::MAX;

impl JobOutcome {
    pub(crate) fn superseded(job_id: u64, dev_id: &str) -> Self {
        Self {
            job_id,
            dev_id: dev_id.to_string(),
            result: Err(JobFailure {
                status: SUPERSEDED,
                command: String::new(),
                reason: "another replica took the device over".into(),
            }),
        }
    }

    /// Whether the job was given up to another replica (nothing to report).
    pub fn is_superseded(&self) -> bool {
        matches!(&self.result, Err(f) if f.status == SUPERSEDED)
    }
}

/// The answer to a device message, with what else the service must do.
#[derive(Debug)]
pub struct Handled {
    pub answer: SyncMl,
    pub outcomes: Vec<JobOutcome>,
    /// Work is still queued for this device: wake it again.
    pub wake_again: Option<String>,
    /// The plan whose snapshot this message's answer is built on, taken just now: stored before the
    /// answer goes out.
    pub snapshot_taken: Option<String>,
    /// The plan of the apply or restore that ended with this message.
    pub plan_done: Option<String>,
}

/// A message refused outright, without a SyncML answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("device {0} is not known to this server")]
    UnknownDevice(String),
}

impl Refusal {
    pub fn http_status(&self) -> axum::http::StatusCode {
        match self {
            Refusal::UnknownDevice(_) => axum::http::StatusCode::FORBIDDEN,
        }
    }
}

/// Why a command was sent, to read its answer.
#[derive(Debug, Clone)]
enum Purpose {
    ReadAcl(DmUri),
    ReadNode(DmUri),
    Change,
    /// An `Atomic` or `Sequence` of changes: a client that does not implement `Atomic` (B.6) gives it
    /// no status, so only a failing status counts.
    Container,
    CheckAcl(DmUri, Acl),
    CheckValue(DmUri, String),
    Raw,
}

/// The device's answers to the last round, by the command id they refer to.
#[derive(Debug, Default)]
struct Answers {
    statuses: HashMap<String, Vec<Status>>,
    results: HashMap<String, Vec<Item>>,
    order: Vec<(String, u16)>,
}

impl Answers {
    fn from_message(msg: &SyncMl) -> Self {
        let mut a = Answers::default();
        for c in &msg.body.commands {
            match c {
                Command::Status(s) if s.cmd_ref != "0" => {
                    a.order.push((s.cmd_ref.clone(), s.data.code()));
                    a.statuses
                        .entry(s.cmd_ref.clone())
                        .or_default()
                        .push(s.clone());
                }
                Command::Results(r) => a
                    .results
                    .entry(r.cmd_ref.clone())
                    .or_default()
                    .extend(r.items.iter().cloned()),
                _ => {}
            }
        }
        a
    }

    fn code(&self, cmd_id: &str) -> Option<u16> {
        self.statuses
            .get(cmd_id)
            .and_then(|s| s.first())
            .map(|s| s.data.code())
    }

    fn data(&self, cmd_id: &str) -> Option<&str> {
        self.results
            .get(cmd_id)
            .and_then(|items| items.first())
            .and_then(|i| i.data.as_deref())
    }
}

/// How many times a restore reads the scope and puts back what differs before giving up.
const MAX_RESTORE_PASSES: u8 = 3;

#[derive(Debug)]
enum Stage {
    Start,
    Discover,
    Applying,
    ReadingBack,
    /// A repeated apply reads back first: the plan (held here) goes only to a device that lacks it.
    Probing(Vec<(Command, Purpose)>),
    /// Putting the device back to the snapshot: a restore, or the compensation of a failed apply
    /// (`fault`). Each pass reads the scope (`writing` false), then sends what puts back what differs
    /// (`writing` true); a pass that finds nothing to put back ends it.
    Restore {
        fault: Option<JobFailure>,
        pass: u8,
        writing: bool,
    },
    Rotating {
        server_secret: Secret,
        client_secret: Secret,
    },
    Running,
}

#[derive(Debug)]
pub struct Session {
    job_id: u64,
    job: Job,
    /// The `SessionID` of the device's package #1: its later messages (which carry no `Cred`) must use
    /// the same one.
    session_id: String,
    stage: Stage,
    observed: Observed,
    /// Set once the plan is computed (or taken from the stored snapshot).
    snapshot: Option<Snapshot>,
    /// What the read-back of an apply compares: ACLs, and values of the account.
    expected: Vec<(Command, Purpose)>,
    /// ACLResults of an apply: every ACL the plan changed, after the change.
    acl_results: Vec<(String, String)>,
    next_cmd: u32,
    purposes: HashMap<String, Purpose>,
    /// The last round sent, as built: resent when the device challenges this server's credential.
    last_round: Vec<(Command, Purpose)>,
    /// How many times in a row the device refused this server's credential (B.1: resend at most twice).
    rechallenges: u8,
    /// This server's ServerID on the device.
    server_id: String,
    /// A session after a zero-nonce package #0 first replaces this server's secret on the device (B.1:
    /// a zero nonce is guessable).
    prelude: Option<Prelude>,
    /// The server secret the prelude put on the device: from now on this server signs with it.
    new_server_secret: Option<Secret>,
    /// New secrets (server, client) the last round sends: they are stored as pending before it goes.
    sending_secrets: (Option<Secret>, Option<Secret>),
    /// The plan whose snapshot the last round took: it must be stored before the plan is sent.
    took_snapshot: Option<String>,
}

/// The steps of a resynchronised session's prelude: find this server's account and its SRVCRED, then
/// replace its `AAuthSecret`. Each variant is what the last round asked.
#[derive(Debug)]
enum Prelude {
    Start,
    Accounts,
    ServerIds,
    Credentials(DmUri),
    Levels,
    Replacing(Secret),
}

/// The MsgIDs of the server's messages in one DM session: unique in the session, whatever happens
/// (B.6: 401/407 answers and sessions with no work included).
#[derive(Debug)]
pub(crate) struct Exchange {
    session_id: String,
    next_msg: u32,
    /// This server sent the message that ends the session.
    ended: bool,
}

impl Exchange {
    /// The MsgID of the next answer to a message of `session_id`: a new session (another SessionID,
    /// or one this server ended) counts from 1.
    pub(crate) fn next(slot: &mut Option<Exchange>, session_id: &str) -> u32 {
        let current = slot
            .take()
            .filter(|x| !x.ended && x.session_id == session_id);
        let mut x = current.unwrap_or_else(|| Exchange {
            session_id: session_id.to_string(),
            next_msg: 1,
            ended: false,
        });
        let id = x.next_msg;
        x.next_msg = x.next_msg.saturating_add(1);
        *slot = Some(x);
        id
    }

    pub(crate) fn end(slot: &mut Option<Exchange>) {
        if let Some(x) = slot.as_mut() {
            x.ended = true;
        }
    }
}

/// What a job does next: send commands, or end.
enum Next {
    Send(Vec<(Command, Purpose)>),
    Done(JobResult),
}

fn get(uri: String) -> Command {
    Command::Get(ItemCommand::new("0", vec![Item::target(uri)]))
}

fn read_acl(uri: &DmUri) -> (Command, Purpose) {
    (
        get(format!("{uri}?prop=ACL")),
        Purpose::ReadAcl(uri.clone()),
    )
}

fn read_node(uri: &DmUri) -> (Command, Purpose) {
    (get(uri.to_string()), Purpose::ReadNode(uri.clone()))
}

fn failure(status: u32, command: impl Into<String>, reason: impl Into<String>) -> JobFailure {
    JobFailure {
        status,
        command: command.into(),
        reason: reason.into(),
    }
}

fn new_nonce() -> String {
    auth::encode_nonce(&rand::random::<[u8; 16]>())
}

fn new_secret() -> Secret {
    Secret::new(auth::encode_nonce(&rand::random::<[u8; 24]>()))
}

/// The first round of reads of a scope: the root (its children name a Full delegation's scope roots),
/// `./DMAcc` (which accounts exist), the ACLs of every scope root's ancestors, each scope root.
fn discovery_start(account_uri: &DmUri, scope: &[DmUri]) -> Vec<(Command, Purpose)> {
    let mut round = vec![read_node(&DmUri::root()), read_acl(&DmUri::root())];
    if let Some(dmacc) = account_uri.parent() {
        round.push(read_node(&dmacc));
        round.push(read_acl(&dmacc));
    }
    for root in scope {
        let mut at = root.clone();
        while let Some(parent) = at.parent() {
            round.push(read_acl(&parent));
            at = parent;
        }
        round.push(read_acl(root));
        round.push(read_node(root));
    }
    let mut seen = std::collections::HashSet::new();
    round.retain(|(_, purpose)| seen.insert(format!("{purpose:?}")));
    round
}

/// The command an answer refers to, as `Cmd target` (for failure reports).
fn named(answers: &Answers, id: &str) -> String {
    answers
        .statuses
        .get(id)
        .and_then(|s| s.first())
        .map(|s| {
            format!(
                "{} {}",
                s.cmd,
                s.target_refs.first().cloned().unwrap_or_default()
            )
        })
        .unwrap_or_default()
}

impl Session {
    fn new(job_id: u64, job: Job, session_id: String, server_id: &str) -> Self {
        Self {
            job_id,
            job,
            session_id,
            stage: Stage::Start,
            observed: Observed::default(),
            snapshot: None,
            expected: Vec::new(),
            acl_results: Vec::new(),
            next_cmd: 1,
            purposes: HashMap::new(),
            last_round: Vec::new(),
            rechallenges: 0,
            server_id: server_id.to_string(),
            prelude: None,
            new_server_secret: None,
            sending_secrets: (None, None),
            took_snapshot: None,
        }
    }

    /// A session after a zero-nonce package #0: this server's secret is replaced first. The delegated
    /// side's first session replaces it anyway (and may not read `./DMAcc`).
    fn resynchronised(mut self) -> Self {
        if !matches!(self.job, Job::FirstSession(_)) {
            self.prelude = Some(Prelude::Start);
        }
        self
    }

    /// The last round again, renumbered from `first`: the device refused the credential of the message
    /// that carried it, so it ran none of it.
    fn resend(&mut self, first: u32) -> Vec<Command> {
        let round = std::mem::take(&mut self.last_round);
        self.number(round, first)
    }

    /// Reads and values the device reported for the `Get`s of the last round, by URI.
    fn reads(&self, answers: &Answers) -> HashMap<DmUri, (Option<u16>, String)> {
        self.purposes
            .iter()
            .filter_map(|(id, p)| match p {
                Purpose::ReadNode(uri) => Some((
                    uri.clone(),
                    (
                        answers.code(id),
                        answers.data(id).unwrap_or_default().trim().to_string(),
                    ),
                )),
                _ => None,
            })
            .collect()
    }

    /// One step of the prelude of a resynchronised session; `None` when it is over (done, or given up
    /// with a warning: the session is authenticated, the job goes on).
    fn advance_prelude(
        &mut self,
        step: Prelude,
        answers: &Answers,
    ) -> Option<Vec<(Command, Purpose)>> {
        let dmacc = DmUri::root().join("DMAcc").ok()?;
        let reads = self.reads(answers);
        let children = |uri: &DmUri| -> Vec<DmUri> {
            reads
                .get(uri)
                .filter(|(code, _)| *code == Some(200))
                .map(|(_, list)| {
                    list.split('/')
                        .filter(|n| !n.is_empty())
                        .filter_map(|n| uri.join(n).ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        // The reads of `leaf` below each child of `uri`.
        let read_leaf_of_children = |uri: &DmUri, leaf: &str| -> Vec<(Command, Purpose)> {
            children(uri)
                .iter()
                .filter_map(|c| c.join(leaf).ok())
                .map(|u| read_node(&u))
                .collect()
        };
        // The node whose leaf was read with the value `value`.
        let parent_of_leaf_read_as = |value: &str| -> Option<DmUri> {
            reads
                .iter()
                .find(|(_, (code, v))| *code == Some(200) && v.as_str() == value)
                .and_then(|(uri, _)| uri.parent())
        };
        let give_up = |why: &str| {
            tracing::warn!(
                server_id = %self.server_id, session_id = %self.session_id,
                "after a zero-nonce package #0 the server secret could not be replaced: {why}"
            );
            None
        };
        let (next, round): (Prelude, Vec<(Command, Purpose)>) = match step {
            Prelude::Start => (Prelude::Accounts, vec![read_node(&dmacc)]),
            Prelude::Accounts => {
                let round = read_leaf_of_children(&dmacc, "ServerID");
                if round.is_empty() {
                    return give_up("./DMAcc cannot be read");
                }
                (Prelude::ServerIds, round)
            }
            Prelude::ServerIds => {
                let Some(account) = parent_of_leaf_read_as(&self.server_id) else {
                    return give_up("no account with this ServerID");
                };
                let app_auth = account.join("AppAuth").ok()?;
                (
                    Prelude::Credentials(app_auth.clone()),
                    vec![read_node(&app_auth)],
                )
            }
            Prelude::Credentials(app_auth) => {
                let round = read_leaf_of_children(&app_auth, "AAuthLevel");
                if round.is_empty() {
                    return give_up("the account has no AppAuth");
                }
                (Prelude::Levels, round)
            }
            Prelude::Levels => {
                let Some(target) = parent_of_leaf_read_as("SRVCRED")
                    .and_then(|cred| cred.join("AAuthSecret").ok())
                else {
                    return give_up("the account has no SRVCRED");
                };
                let secret = new_secret();
                let replace = Command::Replace(ItemCommand::new(
                    "0",
                    vec![Item::target(target.as_str()).with_data(secret.expose().to_string())],
                ));
                self.sending_secrets.0 = Some(secret.clone());
                (Prelude::Replacing(secret), vec![(replace, Purpose::Change)])
            }
            Prelude::Replacing(secret) => {
                let done = self
                    .purposes
                    .iter()
                    .any(|(id, p)| matches!(p, Purpose::Change) && answers.code(id) == Some(200));
                if !done {
                    return give_up("the device refused the new secret");
                }
                tracing::info!(
                    server_id = %self.server_id, session_id = %self.session_id,
                    "server secret replaced after a zero-nonce package #0"
                );
                self.new_server_secret = Some(secret);
                return None;
            }
        };
        self.prelude = Some(next);
        Some(round)
    }

    /// Gives each command (and the commands inside an Atomic) a fresh id from `first` on, remembers its
    /// purpose, and gives every `Add`/`Replace` item a `Data` element (B.6: a real client crashes on
    /// one without).
    fn number(&mut self, round: Vec<(Command, Purpose)>, first: u32) -> Vec<Command> {
        self.purposes.clear();
        self.next_cmd = first;
        self.last_round = round.clone();
        let mut out = Vec::new();
        for (mut cmd, purpose) in round {
            self.renumber(&mut cmd, &purpose);
            out.push(cmd);
        }
        out
    }

    fn renumber(&mut self, cmd: &mut Command, purpose: &Purpose) {
        let id = self.next_cmd.to_string();
        self.next_cmd += 1;
        match cmd {
            Command::Add(c) | Command::Replace(c) => {
                for item in &mut c.items {
                    item.data.get_or_insert_with(String::new);
                }
                c.cmd_id = id.clone();
            }
            Command::Delete(c) | Command::Get(c) | Command::Copy(c) => c.cmd_id = id.clone(),
            Command::Atomic(c) | Command::Sequence(c) => {
                c.cmd_id = id.clone();
                let container = match purpose {
                    Purpose::Change => Purpose::Container,
                    other => other.clone(),
                };
                self.purposes.insert(id, container);
                for inner in &mut c.commands {
                    self.renumber(inner, purpose);
                }
                return;
            }
            Command::Alert(a) => a.cmd_id = id.clone(),
            Command::Exec(e) => e.cmd_id = id.clone(),
            Command::Status(_) | Command::Results(_) => {}
        }
        self.purposes.insert(id, purpose.clone());
    }

    /// Reads the answers to the last round and decides the next one.
    fn advance(
        &mut self,
        answers: &Answers,
        inner_snapshots: &mut HashMap<String, Snapshot>,
    ) -> Next {
        if let Some(step) = self.prelude.take() {
            if let Some(round) = self.advance_prelude(step, answers) {
                return Next::Send(round);
            }
            // The job starts now: the answers were the prelude's.
            return self.advance_job(&Answers::default(), inner_snapshots);
        }
        self.advance_job(answers, inner_snapshots)
    }

    fn advance_job(
        &mut self,
        answers: &Answers,
        inner_snapshots: &mut HashMap<String, Snapshot>,
    ) -> Next {
        let job = self.job.clone();
        match job {
            Job::Apply { plan_id, request } => {
                self.advance_apply(&plan_id, &request, answers, inner_snapshots)
            }
            Job::Restore { plan_id } => self.advance_restore(&plan_id, answers, inner_snapshots),
            Job::FirstSession(rotation) => self.advance_rotation(&rotation, answers),
            Job::Commands(cmds) => match self.stage {
                Stage::Start => {
                    self.stage = Stage::Running;
                    Next::Send(cmds.into_iter().map(|c| (c, Purpose::Raw)).collect())
                }
                _ => Next::Done(Ok(JobSuccess::Commands {
                    statuses: answers.order.clone(),
                    results: answers.results.values().flatten().cloned().collect(),
                })),
            },
        }
    }

    /// Records the answers to a round of reads; returns the interior nodes read. An ACL the device
    /// reports that does not follow the grammar fails the job: it cannot be put back if not understood.
    fn record_reads(&mut self, answers: &Answers) -> Result<Vec<DmUri>, JobFailure> {
        let mut interior = Vec::new();
        for (id, purpose) in &self.purposes {
            let code = answers.code(id);
            match purpose {
                Purpose::ReadAcl(uri) if code == Some(200) => {
                    let text = answers.data(id).unwrap_or_default();
                    let acl = text.parse::<Acl>().map_err(|_| {
                        failure(
                            500,
                            format!("Get {uri}?prop=ACL"),
                            format!("the device reported an ACL for {uri} that is not one"),
                        )
                    })?;
                    self.observed.unreadable.remove(uri);
                    self.observed.acls.insert(uri.clone(), acl);
                }
                Purpose::ReadAcl(uri) if code != Some(404) => {
                    self.observed.unreadable.insert(uri.clone());
                }
                Purpose::ReadNode(uri) if code == Some(200) => {
                    let Some(item) = answers.results.get(id).and_then(|items| items.first()) else {
                        continue;
                    };
                    let is_node = item
                        .meta
                        .as_ref()
                        .and_then(|m| m.format.as_deref())
                        .is_some_and(|f| f == "node");
                    if is_node {
                        let names: Vec<String> = item
                            .data
                            .as_deref()
                            .unwrap_or_default()
                            .split('/')
                            .filter(|n| !n.is_empty())
                            .map(String::from)
                            .collect();
                        self.observed.children.insert(uri.clone(), names);
                        interior.push(uri.clone());
                    }
                }
                _ => {}
            }
        }
        Ok(interior)
    }

    /// The next round of reads below `roots` (the children of the interior nodes just read, not at or
    /// below a node of `skip`), or `None` when everything there is read.
    fn frontier(
        &self,
        interior: &[DmUri],
        roots: &[DmUri],
        skip: &std::collections::BTreeSet<DmUri>,
    ) -> Result<Option<Vec<(Command, Purpose)>>, JobFailure> {
        let mut frontier = Vec::new();
        for uri in interior {
            for name in self.observed.children.get(uri).into_iter().flatten() {
                let Ok(child) = uri.join(name) else { continue };
                let wanted = roots.iter().any(|r| r.contains(&child))
                    && !skip.iter().any(|s| s.contains(&child))
                    && !self.observed.acls.contains_key(&child)
                    && !self.observed.unreadable.contains(&child);
                if wanted {
                    frontier.push(child);
                }
            }
        }
        if self.observed.acls.len() + frontier.len() > MAX_NODES {
            return Err(failure(
                413,
                "",
                "the scope holds too many nodes to delegate",
            ));
        }
        Ok((!frontier.is_empty()).then(|| {
            frontier
                .iter()
                .flat_map(|u| [read_acl(u), read_node(u)])
                .collect()
        }))
    }

    fn advance_apply(
        &mut self,
        plan_id: &str,
        req: &PlanRequest,
        answers: &Answers,
        snapshots: &mut HashMap<String, Snapshot>,
    ) -> Next {
        let account_uri = match req.account_uri() {
            Ok(u) => u,
            Err(e) => return Next::Done(Err(failure(e.status, "", e.reason))),
        };
        match std::mem::replace(&mut self.stage, Stage::Start) {
            Stage::Start => {
                // Taken once per plan: a repeated apply reuses the snapshot and its nonce. It may follow a
                // run that reached the device (a replica died before reporting it): the device is read
                // back first, and gets the plan only if it lacks it (a second run would fail on the
                // nodes the first added, and its compensation would undo the first).
                if let Some(snapshot) = snapshots.get(plan_id).cloned() {
                    self.snapshot = Some(snapshot);
                    return match self.send_plan(req, &account_uri) {
                        Next::Send(plan) => {
                            self.stage = Stage::Probing(plan);
                            Next::Send(self.read_back_round())
                        }
                        done => done,
                    };
                }
                self.stage = Stage::Discover;
                Next::Send(discovery_start(&account_uri, &req.scope))
            }
            Stage::Discover => {
                let interior = match self.record_reads(answers) {
                    Ok(i) => i,
                    Err(f) => return Next::Done(Err(f)),
                };
                // The scope roots of a Full delegation are known once the root's children are.
                let roots = plan::scope_roots(req, &self.observed);
                match self.frontier(&interior, &roots, &Default::default()) {
                    Err(f) => return Next::Done(Err(f)),
                    Ok(Some(round)) => {
                        self.stage = Stage::Discover;
                        return Next::Send(round);
                    }
                    Ok(None) => {}
                }
                let changes = match plan::acl_changes(req, &self.observed) {
                    Ok(c) => c,
                    Err(e) => return Next::Done(Err(failure(e.status, "", e.reason))),
                };
                let snapshot = Snapshot {
                    account_uri: account_uri.clone(),
                    acls: changes,
                    server_nonce_b64: new_nonce(),
                    delegating: req.delegating.clone(),
                    roots,
                    before: std::mem::take(&mut self.observed),
                };
                snapshots.insert(plan_id.to_string(), snapshot.clone());
                self.took_snapshot = Some(plan_id.to_string());
                self.snapshot = Some(snapshot);
                self.send_plan(req, &account_uri)
            }
            Stage::Applying => {
                // Every change must report 200. An Atomic (or Sequence) may report nothing (B.6: a
                // client without Atomic), never a failure; the read-back decides in the end.
                let atomic_ok = self.purposes.iter().all(|(id, p)| match p {
                    Purpose::Change => answers.code(id) == Some(200),
                    Purpose::Container => matches!(answers.code(id), None | Some(200)),
                    _ => true,
                });
                if atomic_ok {
                    return self.read_back();
                }
                // The first command inside the Atomic that failed (not rolled back with 216) names the
                // failure; the Atomic's own 507 only says that something did.
                let is_container = |id: &String| {
                    matches!(self.purposes.get(id), Some(Purpose::Container))
                        || answers
                            .statuses
                            .get(id)
                            .and_then(|s| s.first())
                            .is_some_and(|s| matches!(s.cmd.as_str(), "Atomic" | "Sequence"))
                };
                let failed = answers
                    .order
                    .iter()
                    .find(|(id, code)| !matches!(code, 200 | 216) && !is_container(id))
                    .or_else(|| {
                        answers
                            .order
                            .iter()
                            .find(|(_, code)| !matches!(code, 200 | 216))
                    })
                    .map(|(id, code)| (named(answers, id), *code));
                let reason = match &failed {
                    Some((_, code)) => format!("the device refused the plan (status {code})"),
                    None => "the device did not report on every command of the plan".to_string(),
                };
                let (command, _) = failed.unwrap_or_default();
                self.compensate(failure(507, command, reason))
            }
            Stage::Probing(plan) => {
                if self.first_difference(answers).is_some() {
                    self.stage = Stage::Applying;
                    return Next::Send(plan);
                }
                tracing::info!(
                    plan_id,
                    "the plan was on the device already (an earlier run); not sent again"
                );
                self.applied(&account_uri)
            }
            Stage::ReadingBack => {
                if let Some(diff) = self.first_difference(answers) {
                    return self.compensate(failure(507, "", diff));
                }
                self.applied(&account_uri)
            }
            Stage::Restore {
                fault,
                pass,
                writing,
            } => self.restore_step(fault, pass, writing, answers),
            other => {
                self.stage = other;
                Next::Done(Err(failure(500, "", "unexpected stage")))
            }
        }
    }

    fn send_plan(&mut self, req: &PlanRequest, account_uri: &DmUri) -> Next {
        let Some(snapshot) = self.snapshot.clone() else {
            return Next::Done(Err(failure(500, "", "no snapshot")));
        };
        let account = plan::account_node(req, &snapshot.server_nonce_b64);
        let account_acls = plan::account_acls(req, &account, account_uri);
        // The scope's changes, in an order the device allows D1 (computed on what was read before).
        let mut model = snapshot.before.model();
        let (scope, touched) = match plan::sequence_acls(
            &mut model,
            &req.delegating,
            &plan::apply_order(&snapshot.acls),
        ) {
            Ok(s) => s,
            Err(e) => return Next::Done(Err(failure(e.status, "", e.reason))),
        };
        let final_acl = |uri: &DmUri| model.acl(uri).cloned().unwrap_or_default();
        self.acl_results = account_acls
            .iter()
            .map(|(u, a)| (u.to_string(), a.to_string()))
            .chain(
                snapshot
                    .acls
                    .iter()
                    .map(|c| (c.uri.to_string(), final_acl(&c.uri).to_string())),
            )
            .collect();
        // The read-back: every ACL set (parents lent Replace for a while included: they must be back),
        // and every value of the account a device gives out.
        self.expected = account_acls
            .iter()
            .cloned()
            .chain(touched.iter().map(|u| (u.clone(), final_acl(u))))
            .map(|(uri, acl)| (get(format!("{uri}?prop=ACL")), Purpose::CheckAcl(uri, acl)))
            .chain(
                plan::account_values(&account, account_uri)
                    .into_iter()
                    .map(|(uri, value)| (get(uri.to_string()), Purpose::CheckValue(uri, value))),
            )
            .collect();
        let commands = plan::plan_commands(&account, account_uri, &account_acls, scope);
        let atomic = Command::Atomic(Container::new("0", commands));
        self.stage = Stage::Applying;
        Next::Send(vec![(atomic, Purpose::Change)])
    }

    /// The plan is on the device as planned.
    fn applied(&self, account_uri: &DmUri) -> Next {
        let server_nonce_b64 = self
            .snapshot
            .as_ref()
            .map(|s| s.server_nonce_b64.clone())
            .unwrap_or_default();
        Next::Done(Ok(JobSuccess::Applied {
            account_uri: account_uri.to_string(),
            acl_results: self.acl_results.clone(),
            server_nonce_b64,
        }))
    }

    fn read_back(&mut self) -> Next {
        self.stage = Stage::ReadingBack;
        Next::Send(self.read_back_round())
    }

    fn read_back_round(&self) -> Vec<(Command, Purpose)> {
        let mut round = self.expected.clone();
        if round.is_empty() {
            round.push(read_node(&DmUri::root()));
        }
        round
    }

    /// The first difference between the plan and what the device reports, if any (B.6: never trust
    /// the Atomic's status alone).
    fn first_difference(&self, answers: &Answers) -> Option<String> {
        let mut ids: Vec<&String> = self.purposes.keys().collect();
        ids.sort_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
        for id in ids {
            match self.purposes.get(id) {
                Some(Purpose::CheckAcl(uri, expected)) => {
                    // An ACL that gives D1 no Get cannot be read by D1: 425 is that ACL in force
                    // (one a client chose, `Get=*` say, would be readable, and differ).
                    let unreadable_as_planned = answers.code(id) == Some(425)
                        && !expected.allows(AclCommand::Get, &self.server_id);
                    let same = unreadable_as_planned
                        || answers.code(id) == Some(200)
                            && answers
                                .data(id)
                                .unwrap_or_default()
                                .parse::<Acl>()
                                .is_ok_and(|acl| plan::same_acl(&acl, expected));
                    if !same {
                        return Some(format!("read-back of {uri}?prop=ACL differs from the plan"));
                    }
                }
                Some(Purpose::CheckValue(uri, expected)) => {
                    let same = answers.code(id) == Some(200)
                        && answers.data(id).unwrap_or_default().trim() == expected.trim();
                    if !same {
                        return Some(format!("read-back of {uri} differs from the plan"));
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// A failed apply: put the device back (reading it first, since what the device did is not known
    /// for sure), then fail with `fault`.
    fn compensate(&mut self, fault: JobFailure) -> Next {
        if self.snapshot.is_none() {
            return Next::Done(Err(fault));
        }
        self.restore_pass(Some(fault), 0)
    }

    /// Starts a pass of a restore: read the scope as the device holds it now.
    fn restore_pass(&mut self, fault: Option<JobFailure>, pass: u8) -> Next {
        let Some(snapshot) = self.snapshot.as_ref() else {
            return Next::Done(Err(failure(500, "", "no snapshot")));
        };
        let round = discovery_start(&snapshot.account_uri, &snapshot.roots);
        self.observed = Observed::default();
        self.stage = Stage::Restore {
            fault,
            pass,
            writing: false,
        };
        Next::Send(round)
    }

    /// One step of a restore: after the commands of a pass, read again; after the reads, put back what
    /// differs from the snapshot, or end when nothing does.
    fn restore_step(
        &mut self,
        fault: Option<JobFailure>,
        pass: u8,
        writing: bool,
        answers: &Answers,
    ) -> Next {
        let Some(snapshot) = self.snapshot.clone() else {
            return Next::Done(Err(failure(500, "", "no snapshot")));
        };
        let give_up = |fault: Option<JobFailure>, why: String| match fault {
            Some(f) => Next::Done(Err(failure(
                f.status,
                f.command,
                format!(
                    "{}; the restore that followed is incomplete: {why}",
                    f.reason
                ),
            ))),
            None => Next::Done(Err(failure(500, "", format!("restore incomplete: {why}")))),
        };
        if writing {
            return self.restore_pass(fault, pass);
        }
        let interior = match self.record_reads(answers) {
            Ok(i) => i,
            Err(f) => return give_up(fault, f.reason),
        };
        match self.frontier(&interior, &snapshot.roots, &snapshot.before.unreadable) {
            Err(f) => return give_up(fault, f.reason),
            Ok(Some(round)) => {
                self.stage = Stage::Restore {
                    fault,
                    pass,
                    writing: false,
                };
                return Next::Send(round);
            }
            Ok(None) => {}
        }
        let commands = match plan::restore_commands(&snapshot, &self.observed) {
            Ok(c) => c,
            Err(e) => return give_up(fault, e.reason),
        };
        if commands.is_empty() {
            return Next::Done(match fault {
                None => Ok(JobSuccess::Restored),
                Some(f) => Err(f),
            });
        }
        if pass >= MAX_RESTORE_PASSES {
            let why = match plan::restore_targets(&snapshot, &self.observed).first() {
                Some((uri, _)) => format!("the ACL of {uri} is not the one before"),
                None => format!("{} is still on the device", snapshot.account_uri),
            };
            return give_up(fault, why);
        }
        self.stage = Stage::Restore {
            fault,
            pass: pass + 1,
            writing: true,
        };
        Next::Send(commands.into_iter().map(|c| (c, Purpose::Change)).collect())
    }

    fn advance_restore(
        &mut self,
        plan_id: &str,
        answers: &Answers,
        snapshots: &HashMap<String, Snapshot>,
    ) -> Next {
        let Some(snapshot) = snapshots.get(plan_id).cloned() else {
            // The plan never reached the device: nothing to put back.
            return Next::Done(Ok(JobSuccess::Restored));
        };
        self.snapshot = Some(snapshot);
        match std::mem::replace(&mut self.stage, Stage::Start) {
            Stage::Start => self.restore_pass(None, 0),
            Stage::Restore {
                fault,
                pass,
                writing,
            } => self.restore_step(fault, pass, writing, answers),
            other => {
                self.stage = other;
                Next::Done(Err(failure(500, "", "unexpected stage")))
            }
        }
    }

    fn advance_rotation(&mut self, rotation: &Rotation, answers: &Answers) -> Next {
        match std::mem::replace(&mut self.stage, Stage::Start) {
            Stage::Start => {
                let server_secret = new_secret();
                let client_secret = new_secret();
                let leaf =
                    |key: &str| format!("{}/AppAuth/{key}/AAuthSecret", rotation.account_uri);
                let replace = |uri: String, value: &Secret| {
                    Command::Replace(ItemCommand::new(
                        "0",
                        vec![Item::target(uri).with_data(value.expose().to_string())],
                    ))
                };
                let atomic = Command::Atomic(Container::new(
                    "0",
                    vec![
                        replace(leaf(&rotation.server_cred_key), &server_secret),
                        replace(leaf(&rotation.client_cred_key), &client_secret),
                    ],
                ));
                self.sending_secrets = (Some(server_secret.clone()), Some(client_secret.clone()));
                self.stage = Stage::Rotating {
                    server_secret,
                    client_secret,
                };
                Next::Send(vec![(atomic, Purpose::Change)])
            }
            Stage::Rotating {
                server_secret,
                client_secret,
            } => {
                let failed = self
                    .purposes
                    .iter()
                    .filter(|(id, p)| {
                        !(matches!(p, Purpose::Container) && answers.code(id).is_none())
                    })
                    .map(|(id, _)| (id, answers.code(id).unwrap_or(0)))
                    .find(|(_, code)| *code != 200);
                match failed {
                    None => {
                        self.stage = Stage::Rotating {
                            server_secret,
                            client_secret,
                        };
                        Next::Done(Ok(JobSuccess::Rotated))
                    }
                    Some((id, code)) => Next::Done(Err(failure(
                        u32::from(code),
                        named(answers, id),
                        "the device refused the credential rotation",
                    ))),
                }
            }
            other => {
                self.stage = other;
                Next::Done(Err(failure(500, "", "unexpected stage")))
            }
        }
    }
}

fn chal(next_nonce: &str) -> Chal {
    Chal {
        meta: Meta {
            format: Some(auth::FORMAT_B64.into()),
            type_: Some(auth::AUTH_MD5.into()),
            next_nonce: Some(next_nonce.to_string()),
            ..Meta::default()
        },
    }
}

/// How many of the device's commands the answer gives a status (all but its `Status` and `Results`).
fn device_commands(msg: &SyncMl) -> u32 {
    let n = msg
        .body
        .commands
        .iter()
        .filter(|c| !matches!(c, Command::Status(_) | Command::Results(_)))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The header of a message to the device `dev_id`, signed with this server's credential over the nonce
/// the device gave it.
fn server_header(
    config: &Config,
    entry: &DeviceEntry,
    session_id: &str,
    msg_id: u32,
    dev_id: &str,
) -> SyncHdr {
    let mut hdr = SyncHdr::new(
        session_id,
        msg_id.to_string(),
        Location::new(dev_id),
        Location::new(config.public_url.clone()),
    );
    let nonce = auth::decode_nonce(&entry.creds.server_nonce_b64).unwrap_or_default();
    hdr.cred = Some(auth::cred_md5(
        &config.server_id,
        &entry.creds.server_secret,
        &nonce,
    ));
    hdr
}

/// Builds the answer: our header with our credential, the header status (CmdID 1), a status `code` for
/// each of the device's commands (CmdIDs 2, 3, …), then `commands` (numbered after them), and `Final`.
fn answer(
    config: &Config,
    entry: &DeviceEntry,
    msg: &SyncMl,
    header_status: Status,
    commands: Vec<Command>,
    msg_id: u32,
    code: StatusCode,
) -> SyncMl {
    let hdr = server_header(
        config,
        entry,
        &msg.hdr.session_id,
        msg_id,
        &msg.hdr.source.loc_uri,
    );
    let mut body = vec![Command::Status(header_status)];
    let mut status_id = 2u32;
    for c in &msg.body.commands {
        if matches!(c, Command::Status(_) | Command::Results(_)) {
            continue;
        }
        let mut s = Status::new(
            status_id.to_string(),
            msg.hdr.msg_id.clone(),
            c.cmd_id(),
            c.name(),
            code,
        );
        s.target_refs = c
            .items()
            .iter()
            .filter_map(|i| i.target.as_ref().map(|t| t.loc_uri.clone()))
            .collect();
        body.push(Command::Status(s));
        status_id = status_id.saturating_add(1);
    }
    body.extend(commands);
    SyncMl {
        hdr,
        body: SyncBody {
            commands: body,
            final_: true,
        },
    }
}

fn is_session_start(msg: &SyncMl) -> bool {
    msg.body.commands.iter().any(|c| {
        matches!(c, Command::Alert(Alert { data, .. })
            if matches!(data.code(), 1200 | 1201))
    })
}

/// The nonce of B.1's resynchronisation: four zero bytes.
pub(crate) const ZERO_NONCE: [u8; 4] = [0; 4];

/// A short account of a device message's statuses for the debug log: `code×count` per code.
fn status_summary(msg: &SyncMl) -> String {
    let mut counts: std::collections::BTreeMap<u16, usize> = Default::default();
    for c in &msg.body.commands {
        if let Command::Status(s) = c {
            *counts.entry(s.data.code()).or_default() += 1;
        }
    }
    counts
        .iter()
        .map(|(code, n)| format!("{code}x{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn log_outcome(dev_id: &str, session_id: &str, job_id: u64, result: &JobResult) {
    match result {
        Ok(success) => tracing::info!(
            dev_id,
            session_id,
            job_id,
            outcome = success.kind(),
            "DM session ended: job done"
        ),
        Err(f) => tracing::info!(
            dev_id, session_id, job_id, status = f.status, command = %f.command, reason = %f.reason,
            "DM session ended: job failed"
        ),
    }
}

impl JobSuccess {
    /// What kind of job succeeded, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            JobSuccess::Applied { .. } => "applied",
            JobSuccess::Restored => "restored",
            JobSuccess::Rotated => "rotated",
            JobSuccess::Commands { .. } => "commands",
        }
    }
}

/// Handles one device message against the service's state.
pub(crate) fn handle(config: &Config, inner: &mut Inner, msg: &SyncMl) -> Result<Handled, Refusal> {
    let dev_id = msg.hdr.source.loc_uri.clone();
    let session_id = msg.hdr.session_id.clone();
    let Inner {
        devices, snapshots, ..
    } = inner;
    let Some(entry) = devices.get_mut(&dev_id) else {
        tracing::warn!(
            dev_id,
            session_id,
            "DM message refused: the device is not known to this server"
        );
        return Err(Refusal::UnknownDevice(dev_id));
    };
    entry.activity += 1;
    let mut outcomes = Vec::new();
    let starts = is_session_start(msg);
    let msg_id = Exchange::next(&mut entry.exchange, &session_id);
    tracing::debug!(
        dev_id, session_id, msg_id = %msg.hdr.msg_id, commands = msg.body.commands.len(),
        statuses = %status_summary(msg), "DM message received"
    );

    // 1. The device's credential: package #1 (or its retry after a 401) carries one; a later message
    //    of the session carries none and must name the session's SessionID.
    let mut header_status =
        Status::new("1", msg.hdr.msg_id.clone(), "0", "SyncHdr", StatusCode::Ok);
    header_status.target_refs = vec![msg.hdr.target.loc_uri.clone()];
    header_status.source_refs = vec![msg.hdr.source.loc_uri.clone()];
    let mut over_zero_nonce = false;
    let code = match &msg.hdr.cred {
        Some(cred) => {
            let nonce = auth::decode_nonce(&entry.creds.client_nonce_b64).unwrap_or_default();
            // Only auth-md5 authenticates (B.1, B.6): a basic credential, even a right one, gets 401
            // with an auth-md5 Chal, and the client resends with auth-md5.
            let verifies = |secret: &str, nonce: &[u8]| {
                matches!(
                    auth::verify_cred(cred, &entry.creds.client_name, secret, nonce),
                    Ok(AuthScheme::Md5)
                )
            };
            // The current secret, then one sent to the device that it may have applied unseen.
            let mut candidates = vec![entry.creds.client_secret.clone()];
            candidates.extend(entry.creds.pending_client_secret.clone());
            let mut ok = false;
            for (i, secret) in candidates.iter().enumerate() {
                ok = verifies(secret, &nonce);
                // B.1: after a zero-nonce package #0 (and only then) the device may sign over that nonce.
                if !ok && starts && entry.zero_nonce_sent {
                    over_zero_nonce = verifies(secret, &ZERO_NONCE);
                    ok = over_zero_nonce;
                }
                if ok {
                    if i > 0 {
                        // The device proved it holds the pending secret: it is the current one now.
                        entry.creds.client_secret = secret.clone();
                        entry.creds.pending_client_secret = None;
                    }
                    break;
                }
            }
            // Nonces are single-use: a fresh one for the device's next credential, either way.
            entry.creds.client_nonce_b64 = new_nonce();
            header_status.chal = Some(chal(&entry.creds.client_nonce_b64));
            if ok {
                StatusCode::AuthenticationAccepted
            } else {
                StatusCode::InvalidCredentials
            }
        }
        None => {
            let continues = !starts
                && entry
                    .session
                    .as_ref()
                    .is_some_and(|s| s.session_id == msg.hdr.session_id);
            if continues {
                StatusCode::Ok
            } else {
                entry.creds.client_nonce_b64 = new_nonce();
                header_status.chal = Some(chal(&entry.creds.client_nonce_b64));
                StatusCode::MissingCredentials
            }
        }
    };
    header_status.data = code;
    if !code.is_success() {
        tracing::warn!(
            dev_id,
            session_id,
            status = code.code(),
            "DM message refused: the device's credential is wrong or missing"
        );
        // Nothing the message asks is done. A session in progress stays: a stray message does not end
        // it (the service's watchdog ends one the device has left).
        let reply = answer(config, entry, msg, header_status, Vec::new(), msg_id, code);
        return Ok(Handled {
            answer: reply,
            outcomes,
            wake_again: None,
            snapshot_taken: None,
            plan_done: None,
        });
    }

    // 2. The device's verdict on our credential, and the nonce it wants next.
    let device_header_status = msg.body.commands.iter().find_map(|c| match c {
        Command::Status(s) if s.cmd_ref == "0" => Some(s.clone()),
        _ => None,
    });
    let mut resend = None;
    if let Some(s) = &device_header_status {
        let next_nonce = s.chal.as_ref().and_then(|c| c.meta.next_nonce.clone());
        if let Some(nonce) = &next_nonce {
            // B.1: the new nonce holds at once, for this session, the next one and package #0.
            entry.creds.server_nonce_b64 = nonce.clone();
        }
        let refused = matches!(s.data.code(), 401 | 407);
        match entry.session.as_mut() {
            // B.1: resend our credential with the new nonce, at most twice; the device ran nothing.
            Some(session)
                if refused && next_nonce.is_some() && session.rechallenges < 2 && !starts =>
            {
                session.rechallenges += 1;
                tracing::info!(
                    dev_id,
                    session_id,
                    status = s.data.code(),
                    attempt = session.rechallenges,
                    "the device challenged this server's credential; resending with its nonce"
                );
                resend = Some(session.resend(device_commands(msg).saturating_add(2)));
            }
            Some(_) if refused => {
                if let Some(session) = entry.session.take() {
                    entry.queue.pop_front();
                    let result = Err(failure(
                        401,
                        "SyncHdr",
                        "the device refused this server's credentials",
                    ));
                    log_outcome(&dev_id, &session_id, session.job_id, &result);
                    outcomes.push(JobOutcome {
                        job_id: session.job_id,
                        dev_id: dev_id.clone(),
                        result,
                    });
                }
                Exchange::end(&mut entry.exchange);
                let reply = answer(
                    config,
                    entry,
                    msg,
                    header_status,
                    Vec::new(),
                    msg_id,
                    StatusCode::Ok,
                );
                return Ok(Handled {
                    answer: reply,
                    outcomes,
                    wake_again: (!entry.queue.is_empty()).then(|| dev_id.clone()),
                    snapshot_taken: None,
                    plan_done: None,
                });
            }
            Some(session) => session.rechallenges = 0,
            None => {}
        }
    }
    if let Some(commands) = resend {
        let reply = answer(
            config,
            entry,
            msg,
            header_status,
            commands,
            msg_id,
            StatusCode::Ok,
        );
        return Ok(Handled {
            answer: reply,
            outcomes,
            wake_again: None,
            snapshot_taken: None,
            plan_done: None,
        });
    }

    // 3. A new session takes the job at the head of the queue (a session cut off mid-way starts its job
    //    again: every job is safe to repeat, and a plan's snapshot is never retaken).
    if starts {
        let resync = std::mem::take(&mut entry.zero_nonce_sent);
        let initiated = if msg
            .body
            .commands
            .iter()
            .any(|c| matches!(c, Command::Alert(Alert { data, .. }) if data.code() == 1200))
        {
            "server"
        } else {
            "client"
        };
        entry.session = entry.queue.front().map(|(id, job)| {
            let session = Session::new(*id, job.clone(), session_id.clone(), &config.server_id);
            // A restore of a plan that never reached the device has nothing to do there: it ends
            // at once, without reading the device first.
            let idle = matches!(job, Job::Restore { plan_id } if !snapshots.contains_key(plan_id));
            if resync && !idle {
                session.resynchronised()
            } else {
                session
            }
        });
        tracing::info!(
            dev_id,
            session_id,
            initiated,
            zero_nonce = over_zero_nonce,
            resync,
            job_id = entry.session.as_ref().map(|s| s.job_id),
            "DM session started"
        );
    }
    let mut commands = Vec::new();
    let mut wake_again = None;
    let mut snapshot_taken = None;
    if let Some(session) = entry.session.as_mut() {
        let answers = Answers::from_message(msg);
        match session.advance(&answers, snapshots) {
            Next::Send(round) => {
                commands = session.number(round, device_commands(msg).saturating_add(2));
            }
            Next::Done(result) => {
                if let (
                    Ok(JobSuccess::Rotated),
                    Stage::Rotating {
                        server_secret,
                        client_secret,
                    },
                ) = (&result, &session.stage)
                {
                    // From now on the device knows this server, and itself, by the new secrets.
                    entry.creds.server_secret = server_secret.expose().to_string();
                    entry.creds.client_secret = client_secret.expose().to_string();
                    entry.creds.pending_server_secret = None;
                    entry.creds.pending_client_secret = None;
                }
                log_outcome(&dev_id, &session_id, session.job_id, &result);
                outcomes.push(JobOutcome {
                    job_id: session.job_id,
                    dev_id: dev_id.clone(),
                    result,
                });
            }
        }
        snapshot_taken = session.took_snapshot.take();
        if let Some(secret) = session.new_server_secret.take() {
            // The device holds it since the command that just reported 200: sign with it now.
            entry.creds.server_secret = secret.expose().to_string();
            entry.creds.pending_server_secret = None;
        }
        // Written ahead: the answer carrying them goes only once they are stored (the device may apply
        // them and this replica die before it hears so).
        let (server, client) = std::mem::take(&mut session.sending_secrets);
        if let Some(secret) = server {
            entry.creds.pending_server_secret = Some(secret.expose().to_string());
        }
        if let Some(secret) = client {
            entry.creds.pending_client_secret = Some(secret.expose().to_string());
        }
    }
    let mut plan_done = None;
    if commands.is_empty() {
        if entry.session.take().is_some() {
            if let Some((_, Job::Apply { plan_id, .. } | Job::Restore { plan_id })) =
                entry.queue.pop_front()
            {
                plan_done = Some(plan_id);
            }
            if !entry.queue.is_empty() {
                wake_again = Some(dev_id.clone());
            }
        } else if starts {
            tracing::info!(
                dev_id,
                session_id,
                "DM session ended: no work for the device"
            );
        }
        Exchange::end(&mut entry.exchange);
    }
    let reply = answer(
        config,
        entry,
        msg,
        header_status,
        commands,
        msg_id,
        StatusCode::Ok,
    );
    Ok(Handled {
        answer: reply,
        outcomes,
        wake_again,
        snapshot_taken,
        plan_done,
    })
}

/// What a message that does not decode says about where it comes from, read leniently from its raw
/// bytes: `SessionID`, `MsgID` and the `Source` of its `SyncHdr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderGuess {
    pub session_id: String,
    pub msg_id: String,
    pub source: String,
}

/// Reads the header of a message the decoder refused (`<SyncHdr>` … `</SyncHdr>`, any prefix). Only
/// used to end the session that message belongs to; `None` when the header itself cannot be found.
pub fn guess_header(input: &[u8]) -> Option<HeaderGuess> {
    // The header comes first: the body (tens of KB in a read-back's answer) is not looked at.
    let end = input
        .windows(8)
        .position(|w| w == b"SyncBody")
        .unwrap_or(input.len());
    let text = String::from_utf8_lossy(&input[..end]);
    let start = text.find("SyncHdr")?;
    let hdr = &text[start..];
    let hdr = &hdr[..hdr[1..].find("SyncHdr").map_or(hdr.len(), |end| end + 1)];
    let value = |name: &str, within: &str| -> Option<String> {
        let open = within.find(&format!("{name}>"))? + name.len() + 1;
        let rest = &within[open..];
        let value = rest[..rest.find('<')?].trim();
        (!value.is_empty()).then(|| value.to_string())
    };
    let source_at = hdr.find("Source>")?;
    Some(HeaderGuess {
        session_id: value("SessionID", hdr)?,
        msg_id: value("MsgID", hdr).unwrap_or_default(),
        source: value("LocURI", &hdr[source_at..])?,
    })
}

/// A device message that cannot be decoded, in a session in progress: its job fails at once with the
/// reason (byte offset included), the session ends, and the device is told so in DM terms (header
/// status 400 and `Alert` 1223, session abort). `None`: it belongs to no session in progress.
pub(crate) fn undecodable(
    config: &Config,
    inner: &mut Inner,
    guess: &HeaderGuess,
    error: &dm_protocol::DecodeError,
) -> Option<Handled> {
    let entry = inner.devices.get_mut(&guess.source)?;
    let in_session = entry
        .session
        .as_ref()
        .is_some_and(|s| s.session_id == guess.session_id);
    if !in_session {
        return None;
    }
    entry.activity += 1;
    let session = entry.session.take()?;
    entry.queue.pop_front();
    let result = Err(failure(
        400,
        "",
        format!("the device sent a message that cannot be decoded: {error}"),
    ));
    log_outcome(&guess.source, &guess.session_id, session.job_id, &result);
    let msg_id = Exchange::next(&mut entry.exchange, &guess.session_id);
    Exchange::end(&mut entry.exchange);
    let hdr = server_header(config, entry, &guess.session_id, msg_id, &guess.source);
    let mut status = Status::new(
        "1",
        guess.msg_id.clone(),
        "0",
        "SyncHdr",
        StatusCode::BadRequest,
    );
    status.source_refs = vec![guess.source.clone()];
    let answer = SyncMl {
        hdr,
        body: SyncBody {
            commands: vec![
                Command::Status(status),
                Command::Alert(Alert::new("2", AlertCode::SessionAbort)),
            ],
            final_: true,
        },
    };
    Some(Handled {
        answer,
        outcomes: vec![JobOutcome {
            job_id: session.job_id,
            dev_id: guess.source.clone(),
            result,
        }],
        wake_again: (!entry.queue.is_empty()).then(|| guess.source.clone()),
        snapshot_taken: None,
        plan_done: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use dm_protocol::delegation::DelType;
    use dm_protocol::dmacc::DmAccount;
    use dm_protocol::tree::DmTree;

    const D1: &str = "dms1";

    #[test]
    fn the_header_guess_reads_the_header_and_never_the_body() {
        let message = |body: &str| {
            format!(
                "<SyncML xmlns=\"SYNCML:SYNCML1.2\"><SyncHdr><VerDTD>1.2</VerDTD>\
                 <VerProto>DM/1.2</VerProto><SessionID> 1A </SessionID><MsgID>3</MsgID>\
                 <Target><LocURI>http://dms1/dm</LocURI></Target>\
                 <Source><LocURI>IMEI:1</LocURI></Source></SyncHdr>\
                 <SyncBody>{body}<Final/></SyncBody></SyncML>"
            )
        };
        let guess = guess_header(
            message("<Results><Item><Data>SessionID>9</Data></Item></Results>").as_bytes(),
        )
        .unwrap();
        assert_eq!(
            (
                guess.session_id.as_str(),
                guess.msg_id.as_str(),
                guess.source.as_str()
            ),
            ("1A", "3", "IMEI:1")
        );
        // No header source: no guess, whatever the body says.
        let no_source = message("<Source><LocURI>IMEI:2</LocURI></Source>")
            .replace("<Source><LocURI>IMEI:1</LocURI></Source>", "");
        assert!(guess_header(no_source.as_bytes()).is_none());
    }

    #[test]
    fn only_a_job_given_up_to_another_replica_is_superseded() {
        assert!(JobOutcome::superseded(1, "dev").is_superseded());
        // A status the device left out reads as 0; any DM status fits in 16 bits: real failures.
        for status in [0, 400, 408, 500, u32::from(u16::MAX)] {
            let failed = JobOutcome {
                job_id: 1,
                dev_id: "dev".into(),
                result: Err(failure(status, "", "failed")),
            };
            assert!(!failed.is_superseded(), "{status}");
        }
    }

    fn uri(s: &str) -> DmUri {
        s.parse().unwrap()
    }

    fn device() -> DmTree {
        let account = dm_client::DefaultAccount {
            server_id: D1.into(),
            addr: "http://127.0.0.1:1/dm".into(),
            server_secret: "s".into(),
            server_nonce_b64: "bg==".into(),
            client_name: "c".into(),
            client_secret: "c".into(),
            client_nonce_b64: "bg==".into(),
        };
        dm_client::Device::with_default_tree("IMEI:1", &account)
            .unwrap()
            .tree()
            .clone()
    }

    fn request() -> PlanRequest {
        let xml = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/start.xml"
        ))
        .unwrap();
        let dm_protocol::delegation::Body::Start(start) =
            dm_protocol::delegation::decode(&xml).unwrap().body
        else {
            panic!("examples/start.xml is a DELEGATION_START")
        };
        PlanRequest {
            account_key: "dms2".into(),
            account: DmAccount::from_tnds(&start.dm_acc).unwrap(),
            delegating: D1.into(),
            delegated: "dms2.enterprise.example".into(),
            del_type: DelType::Partial,
            scope: vec![uri("./Vendor/Acme/Apps")],
            not_after: None,
            temp_key_b64: Secret::new("a2V5"),
        }
    }

    /// Drives a session against `tree` with the simulated client's executor as D1; `after` may change
    /// the tree or the answers after each round (a device that misbehaves).
    fn drive(
        job: Job,
        tree: &mut DmTree,
        snapshots: &mut HashMap<String, Snapshot>,
        mut after: impl FnMut(usize, &mut DmTree, &mut Vec<Command>),
    ) -> JobResult {
        let mut session = Session::new(1, job, "1".into(), D1);
        let mut answers = Answers::default();
        for round in 0..200 {
            match session.advance(&answers, snapshots) {
                Next::Done(result) => return result,
                Next::Send(commands) => {
                    let commands = session.number(commands, 2);
                    let mut responses = dm_client::execute(tree, D1, "2", &commands, 2).responses;
                    after(round, tree, &mut responses);
                    let msg = SyncMl {
                        hdr: SyncHdr::new("1", "3", Location::new("s"), Location::new("d")),
                        body: SyncBody {
                            commands: responses,
                            final_: true,
                        },
                    };
                    answers = Answers::from_message(&msg);
                }
            }
        }
        panic!("the job never ended")
    }

    fn apply() -> Job {
        Job::Apply {
            plan_id: "p".into(),
            request: Box::new(request()),
        }
    }

    #[test]
    fn the_plan_applies_and_reads_back_against_the_client() {
        let mut tree = device();
        let result = drive(apply(), &mut tree, &mut HashMap::new(), |_, _, _| {});
        let Ok(JobSuccess::Applied { acl_results, .. }) = result else {
            panic!("{result:?}")
        };
        assert!(acl_results.iter().any(|(u, _)| u == "./Vendor/Acme/Apps"));
        assert_eq!(
            tree.value(&uri("./DMAcc/dms2/AppAuth/srvcred/AAuthName"))
                .unwrap(),
            "dms2.enterprise.example"
        );
    }

    #[test]
    fn a_value_that_reads_back_wrong_fails_the_plan_and_the_device_is_put_back() {
        // The device answers 200 to everything but stores another ServerID (B.6: never trust the
        // statuses alone): the read-back of values finds it, the plan is undone.
        let mut tree = device();
        let before = tree.clone();
        let mut atomic_round = None;
        let result = drive(
            apply(),
            &mut tree,
            &mut HashMap::new(),
            |round, tree, responses| {
                let atomic = responses
                    .iter()
                    .any(|c| matches!(c, Command::Status(s) if s.cmd == "Atomic"));
                if atomic && atomic_round.is_none() {
                    atomic_round = Some(round);
                    tree.replace_value(&uri("./DMAcc/dms2/ServerID"), "someone-else")
                        .unwrap();
                }
            },
        );
        let failure = result.unwrap_err();
        assert_eq!(failure.status, 507, "{failure:?}");
        assert!(
            failure.reason.contains("./DMAcc/dms2/ServerID"),
            "{failure:?}"
        );
        assert_eq!(tree.first_difference(&before, &[]), None);
    }

    #[test]
    fn an_acl_the_device_reports_that_is_not_one_fails_the_plan() {
        // It used to count as "no value" (inherit), and restore would then have emptied that ACL.
        let mut tree = device();
        let before = tree.clone();
        let result = drive(
            apply(),
            &mut tree,
            &mut HashMap::new(),
            |_, _, responses| {
                for r in responses.iter_mut() {
                    if let Command::Results(r) = r {
                        for item in &mut r.items {
                            let source = item.source.as_ref().map(|s| s.loc_uri.as_str());
                            if source == Some("./Vendor?prop=ACL") {
                                item.data = Some("Replace dms1".into());
                            }
                        }
                    }
                }
            },
        );
        let failure = result.unwrap_err();
        assert_eq!(failure.status, 500, "{failure:?}");
        assert_eq!(failure.command, "Get ./Vendor?prop=ACL");
        assert_eq!(tree.first_difference(&before, &[]), None);
    }

    #[test]
    fn debug_never_shows_the_rotated_secrets() {
        let mut tree = device();
        let mut session = Session::new(
            1,
            Job::FirstSession(Rotation {
                account_uri: "./DMAcc/dms1".into(),
                server_cred_key: "SRVCRED".into(),
                client_cred_key: "CLCRED".into(),
            }),
            "1".into(),
            D1,
        );
        let Next::Send(round) = session.advance(&Answers::default(), &mut HashMap::new()) else {
            panic!("the rotation sends its commands")
        };
        let commands = session.number(round, 2);
        dm_client::execute(&mut tree, D1, "2", &commands, 2);
        let secret = tree
            .value(&uri("./DMAcc/dms1/AppAuth/SRVCRED/AAuthSecret"))
            .unwrap()
            .to_string();
        assert_ne!(secret, "s");
        let shown = format!("{session:?} {commands:?}");
        assert!(!shown.contains(&secret), "{shown}");
    }
}
