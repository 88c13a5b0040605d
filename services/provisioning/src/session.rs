//! One device's DM session on the server side: authentication both ways (docs/device-side.md), and the job
//! being carried out, round by round. Pure with respect to IO: `handle` takes a decoded message and the
//! service's state and returns the answer; the HTTP handler does the rest.

use std::collections::HashMap;

use dm_protocol::acl::Acl;
use dm_protocol::auth;
use dm_protocol::codes::StatusCode;
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

/// The answer to a device message, with what else the service must do.
#[derive(Debug)]
pub struct Handled {
    pub answer: SyncMl,
    pub outcomes: Vec<JobOutcome>,
    /// Work is still queued for this device: wake it again.
    pub wake_again: Option<String>,
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
    CheckAcl(DmUri, Acl),
    CheckAbsent(DmUri),
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
}

#[derive(Debug)]
enum Stage {
    Start,
    Discover,
    Applying,
    ReadingBack,
    Compensating(JobFailure),
    Restoring,
    CheckingRestore,
    Rotating {
        server_secret: String,
        client_secret: String,
    },
    Running,
}

#[derive(Debug)]
pub struct Session {
    job_id: u64,
    job: Job,
    stage: Stage,
    observed: Observed,
    /// Set once the plan is computed (or taken from the stored snapshot).
    snapshot: Option<Snapshot>,
    expected: Vec<(DmUri, Acl)>,
    next_cmd: u32,
    next_msg: u32,
    purposes: HashMap<String, Purpose>,
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

fn new_secret() -> String {
    auth::encode_nonce(&rand::random::<[u8; 24]>())
}

impl Session {
    fn new(job_id: u64, job: Job) -> Self {
        Self {
            job_id,
            job,
            stage: Stage::Start,
            observed: Observed::default(),
            snapshot: None,
            expected: Vec::new(),
            next_cmd: 1,
            next_msg: 1,
            purposes: HashMap::new(),
        }
    }

    /// Gives each command (and the commands inside an Atomic) a fresh id and remembers its purpose.
    fn number(&mut self, round: Vec<(Command, Purpose)>) -> Vec<Command> {
        self.purposes.clear();
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
        self.purposes.insert(id.clone(), purpose.clone());
        match cmd {
            Command::Add(c)
            | Command::Replace(c)
            | Command::Delete(c)
            | Command::Get(c)
            | Command::Copy(c) => c.cmd_id = id,
            Command::Atomic(c) | Command::Sequence(c) => {
                c.cmd_id = id;
                for inner in &mut c.commands {
                    self.renumber(inner, purpose);
                }
            }
            Command::Alert(a) => a.cmd_id = id,
            Command::Exec(e) => e.cmd_id = id,
            Command::Status(_) | Command::Results(_) => {}
        }
    }

    /// Reads the answers to the last round and decides the next one.
    fn advance(
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

    fn record_reads(&mut self, answers: &Answers) -> Vec<DmUri> {
        let mut interior = Vec::new();
        for (id, purpose) in &self.purposes {
            let ok = answers.code(id) == Some(200);
            match purpose {
                Purpose::ReadAcl(uri) if ok => {
                    let text = answers
                        .results
                        .get(id)
                        .and_then(|items| items.first())
                        .and_then(|i| i.data.clone())
                        .unwrap_or_default();
                    let acl = text.parse::<Acl>().unwrap_or_default();
                    self.observed.acls.insert(uri.clone(), acl);
                }
                Purpose::ReadNode(uri) if ok => {
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
        interior
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
                // Taken once per plan: a repeated apply reuses the snapshot and its nonce.
                if let Some(snapshot) = snapshots.get(plan_id).cloned() {
                    self.snapshot = Some(snapshot);
                    return self.send_plan(req, &account_uri);
                }
                let mut round = vec![read_node(&DmUri::root()), read_acl(&DmUri::root())];
                if let Some(dmacc) = account_uri.parent() {
                    round.push(read_node(&dmacc));
                    round.push(read_acl(&dmacc));
                }
                for root in &req.scope {
                    let mut at = root.clone();
                    while let Some(parent) = at.parent() {
                        round.push(read_acl(&parent));
                        at = parent;
                    }
                    round.push(read_acl(root));
                    round.push(read_node(root));
                }
                round.dedup_by(|a, b| format!("{:?}", a.1) == format!("{:?}", b.1));
                self.stage = Stage::Discover;
                Next::Send(round)
            }
            Stage::Discover => {
                let interior = self.record_reads(answers);
                // The scope roots of a Full delegation are known once the root's children are.
                let roots = plan::scope_roots(req, &self.observed);
                let mut frontier = Vec::new();
                for uri in interior {
                    for name in self
                        .observed
                        .children
                        .get(&uri)
                        .cloned()
                        .unwrap_or_default()
                    {
                        let Ok(child) = uri.join(&name) else { continue };
                        let wanted = roots.iter().any(|r| r.contains(&child))
                            && !self.observed.acls.contains_key(&child);
                        if wanted {
                            frontier.push(child);
                        }
                    }
                }
                if self.observed.acls.len() + frontier.len() > MAX_NODES {
                    return Next::Done(Err(failure(
                        413,
                        "",
                        "the scope holds too many nodes to delegate",
                    )));
                }
                if !frontier.is_empty() {
                    let round = frontier
                        .iter()
                        .flat_map(|u| [read_acl(u), read_node(u)])
                        .collect();
                    self.stage = Stage::Discover;
                    return Next::Send(round);
                }
                let changes = match plan::acl_changes(req, &self.observed) {
                    Ok(c) => c,
                    Err(e) => return Next::Done(Err(failure(e.status, "", e.reason))),
                };
                let snapshot = Snapshot {
                    account_uri: account_uri.clone(),
                    acls: changes,
                    server_nonce_b64: new_nonce(),
                };
                snapshots.insert(plan_id.to_string(), snapshot.clone());
                self.snapshot = Some(snapshot);
                self.send_plan(req, &account_uri)
            }
            Stage::Applying => {
                let atomic_ok = self
                    .purposes
                    .iter()
                    .filter(|(_, p)| matches!(p, Purpose::Change))
                    .all(|(id, _)| matches!(answers.code(id), Some(200)));
                if atomic_ok {
                    return self.read_back();
                }
                // The first command inside the Atomic that failed (not rolled back with 216) names the
                // failure; the Atomic's own 507 only says that something did.
                let is_container = |id: &String| {
                    answers
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
                    .map(|(id, code)| {
                        let cmd = answers
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
                            .unwrap_or_default();
                        (cmd, *code)
                    });
                let (command, code) = failed.unwrap_or_default();
                let reason = format!("the device refused the plan (status {code})");
                self.compensate(failure(507, command, reason))
            }
            Stage::ReadingBack => {
                if let Some(diff) = self.first_difference(answers) {
                    return self.compensate(failure(507, "", diff));
                }
                let snapshot = self.snapshot.clone().unwrap_or_else(|| Snapshot {
                    account_uri: account_uri.clone(),
                    acls: Vec::new(),
                    server_nonce_b64: String::new(),
                });
                Next::Done(Ok(JobSuccess::Applied {
                    account_uri: account_uri.to_string(),
                    acl_results: self
                        .expected
                        .iter()
                        .map(|(u, a)| (u.to_string(), a.to_string()))
                        .collect(),
                    server_nonce_b64: snapshot.server_nonce_b64,
                }))
            }
            Stage::Compensating(fault) => Next::Done(Err(fault)),
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
        self.expected = plan::expected_after(&account_acls, &snapshot.acls);
        let commands = plan::plan_commands(&account, account_uri, &account_acls, &snapshot.acls);
        let atomic = Command::Atomic(Container::new("0", commands));
        self.stage = Stage::Applying;
        Next::Send(vec![(atomic, Purpose::Change)])
    }

    fn read_back(&mut self) -> Next {
        let mut round: Vec<(Command, Purpose)> = self
            .expected
            .iter()
            .map(|(uri, acl)| {
                (
                    get(format!("{uri}?prop=ACL")),
                    Purpose::CheckAcl(uri.clone(), acl.clone()),
                )
            })
            .collect();
        if round.is_empty() {
            round.push(read_node(&DmUri::root()));
        }
        self.stage = Stage::ReadingBack;
        Next::Send(round)
    }

    /// The first difference between the plan and what the device reports, if any.
    fn first_difference(&self, answers: &Answers) -> Option<String> {
        for (id, purpose) in &self.purposes {
            match purpose {
                Purpose::CheckAcl(uri, expected) => {
                    let got = answers
                        .results
                        .get(id)
                        .and_then(|i| i.first())
                        .and_then(|i| i.data.clone())
                        .unwrap_or_default();
                    let same = answers.code(id) == Some(200)
                        && got
                            .parse::<Acl>()
                            .is_ok_and(|acl| plan::same_acl(&acl, expected));
                    if !same {
                        return Some(format!("read-back of {uri}?prop=ACL differs from the plan"));
                    }
                }
                Purpose::CheckAbsent(uri) if answers.code(id) != Some(404) => {
                    return Some(format!("{uri} is still on the device"));
                }
                _ => {}
            }
        }
        None
    }

    fn compensate(&mut self, fault: JobFailure) -> Next {
        let Some(snapshot) = self.snapshot.clone() else {
            return Next::Done(Err(fault));
        };
        self.stage = Stage::Compensating(fault);
        Next::Send(
            plan::restore_commands(&snapshot)
                .into_iter()
                .map(|c| (c, Purpose::Change))
                .collect(),
        )
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
        match std::mem::replace(&mut self.stage, Stage::Start) {
            Stage::Start => {
                self.stage = Stage::Restoring;
                Next::Send(
                    plan::restore_commands(&snapshot)
                        .into_iter()
                        .map(|c| (c, Purpose::Change))
                        .collect(),
                )
            }
            Stage::Restoring => {
                let mut round: Vec<(Command, Purpose)> = snapshot
                    .acls
                    .iter()
                    .map(|c| {
                        (
                            get(format!("{}?prop=ACL", c.uri)),
                            Purpose::CheckAcl(c.uri.clone(), c.before.clone()),
                        )
                    })
                    .collect();
                round.push((
                    get(snapshot.account_uri.to_string()),
                    Purpose::CheckAbsent(snapshot.account_uri.clone()),
                ));
                self.stage = Stage::CheckingRestore;
                Next::Send(round)
            }
            Stage::CheckingRestore => match self.first_difference(answers) {
                None => Next::Done(Ok(JobSuccess::Restored)),
                Some(diff) => {
                    Next::Done(Err(failure(500, "", format!("restore incomplete: {diff}"))))
                }
            },
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
                let replace = |uri: String, value: &str| {
                    Command::Replace(ItemCommand::new(
                        "0",
                        vec![Item::target(uri).with_data(value.to_string())],
                    ))
                };
                let atomic = Command::Atomic(Container::new(
                    "0",
                    vec![
                        replace(leaf(&rotation.server_cred_key), &server_secret),
                        replace(leaf(&rotation.client_cred_key), &client_secret),
                    ],
                ));
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
                let failed = answers.order.iter().find(|(_, code)| *code != 200);
                match failed {
                    None => {
                        self.stage = Stage::Rotating {
                            server_secret,
                            client_secret,
                        };
                        Next::Done(Ok(JobSuccess::Rotated))
                    }
                    Some((id, code)) => {
                        let cmd = answers
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
                            .unwrap_or_default();
                        Next::Done(Err(failure(
                            u32::from(*code),
                            cmd,
                            "the device refused the credential rotation",
                        )))
                    }
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

/// Builds the answer: our header with our credential, the header status, statuses for the device's
/// commands, then `commands`, and `Final`.
fn answer(
    config: &Config,
    entry: &DeviceEntry,
    msg: &SyncMl,
    header_status: Status,
    commands: Vec<Command>,
    msg_id: u32,
) -> SyncMl {
    let mut hdr = SyncHdr::new(
        msg.hdr.session_id.clone(),
        msg_id.to_string(),
        Location::new(msg.hdr.source.loc_uri.clone()),
        Location::new(config.public_url.clone()),
    );
    let nonce = auth::decode_nonce(&entry.creds.server_nonce_b64).unwrap_or_default();
    hdr.cred = Some(auth::cred_md5(
        &config.server_id,
        &entry.creds.server_secret,
        &nonce,
    ));
    let mut body = vec![Command::Status(header_status)];
    let mut status_id = 2u32;
    for c in &msg.body.commands {
        if matches!(c, Command::Status(_) | Command::Results(_)) {
            continue;
        }
        let mut s = Status::new(
            format!("s{status_id}"),
            msg.hdr.msg_id.clone(),
            c.cmd_id(),
            c.name(),
            StatusCode::Ok,
        );
        s.target_refs = c
            .items()
            .iter()
            .filter_map(|i| i.target.as_ref().map(|t| t.loc_uri.clone()))
            .collect();
        body.push(Command::Status(s));
        status_id += 1;
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

/// Handles one device message against the service's state.
pub(crate) fn handle(config: &Config, inner: &mut Inner, msg: &SyncMl) -> Result<Handled, Refusal> {
    let dev_id = msg.hdr.source.loc_uri.clone();
    let Inner {
        devices, snapshots, ..
    } = inner;
    let entry = devices
        .get_mut(&dev_id)
        .ok_or_else(|| Refusal::UnknownDevice(dev_id.clone()))?;
    let mut outcomes = Vec::new();

    // 1. The device's credential (package #1, or its retry after a 401).
    let mut header_status =
        Status::new("1", msg.hdr.msg_id.clone(), "0", "SyncHdr", StatusCode::Ok);
    header_status.target_refs = vec![msg.hdr.target.loc_uri.clone()];
    header_status.source_refs = vec![msg.hdr.source.loc_uri.clone()];
    let authenticated = match &msg.hdr.cred {
        Some(cred) => {
            let nonce = auth::decode_nonce(&entry.creds.client_nonce_b64).unwrap_or_default();
            let ok = auth::verify_cred(
                cred,
                &entry.creds.client_name,
                &entry.creds.client_secret,
                &nonce,
            )
            .is_ok();
            // Nonces are single-use: a fresh one for the device's next credential, either way.
            entry.creds.client_nonce_b64 = new_nonce();
            header_status.chal = Some(chal(&entry.creds.client_nonce_b64));
            header_status.data = if ok {
                StatusCode::AuthenticationAccepted
            } else {
                StatusCode::InvalidCredentials
            };
            ok
        }
        None => entry.session.is_some(),
    };
    if !authenticated {
        if msg.hdr.cred.is_none() {
            entry.creds.client_nonce_b64 = new_nonce();
            header_status.chal = Some(chal(&entry.creds.client_nonce_b64));
            header_status.data = StatusCode::MissingCredentials;
        }
        entry.session = None;
        let reply = answer(config, entry, msg, header_status, Vec::new(), 1);
        return Ok(Handled {
            answer: reply,
            outcomes,
            wake_again: None,
        });
    }

    // 2. The device's verdict on our credential, and the nonce it wants next.
    let device_header_status = msg.body.commands.iter().find_map(|c| match c {
        Command::Status(s) if s.cmd_ref == "0" => Some(s.clone()),
        _ => None,
    });
    if let Some(s) = &device_header_status {
        if let Some(nonce) = s.chal.as_ref().and_then(|c| c.meta.next_nonce.clone()) {
            entry.creds.server_nonce_b64 = nonce;
        }
        if matches!(s.data.code(), 401 | 407)
            && let Some(session) = entry.session.take()
        {
            entry.queue.pop_front();
            outcomes.push(JobOutcome {
                job_id: session.job_id,
                dev_id: dev_id.clone(),
                result: Err(failure(
                    401,
                    "SyncHdr",
                    "the device refused this server's credentials",
                )),
            });
            let reply = answer(config, entry, msg, header_status, Vec::new(), 1);
            return Ok(Handled {
                answer: reply,
                outcomes,
                wake_again: (!entry.queue.is_empty()).then(|| dev_id.clone()),
            });
        }
    }

    // 3. A new session takes the job at the head of the queue (a session cut off mid-way starts its job
    //    again: every job is safe to repeat, and a plan's snapshot is never retaken).
    if is_session_start(msg) {
        entry.session = entry
            .queue
            .front()
            .map(|(id, job)| Session::new(*id, job.clone()));
    }
    let mut commands = Vec::new();
    let mut wake_again = None;
    let msg_id = match entry.session.as_mut() {
        None => 1,
        Some(session) => {
            let answers = Answers::from_message(msg);
            match session.advance(&answers, snapshots) {
                Next::Send(round) => commands = session.number(round),
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
                        entry.creds.server_secret = server_secret.clone();
                        entry.creds.client_secret = client_secret.clone();
                    }
                    outcomes.push(JobOutcome {
                        job_id: session.job_id,
                        dev_id: dev_id.clone(),
                        result,
                    });
                }
            }
            session.next_msg += 1;
            session.next_msg
        }
    };
    if commands.is_empty() && entry.session.is_some() {
        entry.session = None;
        entry.queue.pop_front();
        if !entry.queue.is_empty() {
            wake_again = Some(dev_id.clone());
        }
    }
    let reply = answer(config, entry, msg, header_status, commands, msg_id);
    Ok(Handled {
        answer: reply,
        outcomes,
        wake_again,
    })
}
