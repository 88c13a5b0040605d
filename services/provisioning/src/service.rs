//! The provisioning service on the bus (docs/bus.md): turns the saga's device commands into jobs for the
//! devices and their outcomes into events. Its outcome is published when the device is done, with the
//! msg-id `<outbox_id>:result`, and only then is the command acknowledged: a device session can outlast an
//! ack wait, so the command is reported in progress meanwhile, and a replica that dies mid-way lets it go
//! to another one after one ack wait (the job is safe to repeat: a plan's snapshot is kept in the store and
//! never retaken). A command delivered again while this replica runs its job is not run twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dm_bus::stack::Settle;
use dm_bus::{Area, Bus, BusError, ConsumerConfig, Headers, Names};
use dm_proto::bus::v1::{CommandEnvelope, DelegationRef, EventEnvelope, Fetch, FetchAnswer, fetch};
use dm_protocol::delegation::DelType as WireDelType;
use dm_protocol::dmacc::{AuthLevel, DmAccount, Secret};
use dm_protocol::types::{DmUri, UtcTime};
use dm_saga::pb::{self, DelType, Event, Work, WorkResult, command, event};
use dm_seal::{Direction, Zeroizing, field};
use prost::Message as _;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::{DeviceCredentials, Job, JobOutcome, JobSuccess, PlanRequest, Provisioning, Rotation};

/// How long a request to auth may take.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
struct Pending {
    outbox_id: String,
    delegation: DelegationRef,
    work: Work,
    /// The delegation's trace context, carried over to the outcome.
    trace: Vec<(String, String)>,
}

fn wire_type(t: DelType) -> Option<WireDelType> {
    match t {
        DelType::Partial => Some(WireDelType::Partial),
        DelType::Full => Some(WireDelType::Full),
        DelType::Final => Some(WireDelType::Final),
        DelType::Temporary => Some(WireDelType::Temporary),
        DelType::Unspecified => None,
    }
}

/// `<x>` of `./DMAcc/<x>` for a delegated server: its ServerID with every character a node name should not
/// have replaced by `_`.
pub fn account_key(server_id: &str) -> String {
    server_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The delegation's plan id: the same for its apply and its restore.
fn plan_id(d: &DelegationRef) -> String {
    format!("{}/{}", d.peer_server_id, d.session_id)
}

/// How a fetch failure that is only auth being away for a moment (not started yet, restarting) starts:
/// such a command is delivered again later instead of failing the delegation.
const AUTH_AWAY: &str = "auth is not answering";

/// How a failure to keep a device's credentials starts: the command is delivered again later.
const STORE_AWAY: &str = "the device store is not answering";

async fn fetch_secret(
    provisioning: &Provisioning,
    bus: &Bus,
    names: &Names,
    d: &DelegationRef,
    what: fetch::What,
) -> Result<Zeroizing<Vec<u8>>, String> {
    let Some(bus_key) = provisioning.bus_key() else {
        return Err("no bus key: the secrets auth hands out cannot be opened".into());
    };
    let mut request = Fetch {
        delegation: Some(d.clone()),
        ..Default::default()
    };
    request.set_what(what);
    let answer = bus
        .request(
            &names
                .subject(Area::Req, "auth.fetch")
                .map_err(|e| e.to_string())?,
            Headers::new(),
            Bytes::from(request.encode_to_vec()),
            AUTH_TIMEOUT,
        )
        .await
        .map_err(|e| match e {
            dm_bus::BusError::NoResponders(_) | dm_bus::BusError::TimedOut(_) => {
                format!("{AUTH_AWAY}: {e}")
            }
            other => other.to_string(),
        })?;
    let answer = FetchAnswer::decode(answer.payload).map_err(|e| e.to_string())?;
    if !answer.found {
        return Err(format!("auth has no such secret: {}", answer.reason));
    }
    let name = match what {
        fetch::What::OwnAccount => field::OWN_ACCOUNT,
        fetch::What::PeerAccount => field::PEER_ACCOUNT,
        _ => field::TEMP_KEY,
    };
    let record = dm_bus::subjects::delegation_key(&d.peer_server_id, &d.session_id);
    bus_key
        .open(&record, name, Direction::FromAuth, &answer.sealed_value)
        .map_err(|_| "the secret from auth does not open (another master key, or tampered)".into())
}

fn account_from_tnds(bytes: &[u8]) -> Result<DmAccount, String> {
    let tree = dm_protocol::tnds::decode(bytes).map_err(|e| e.to_string())?;
    DmAccount::from_tnds(&tree).map_err(|e| e.to_string())
}

/// Jobs queued on the device channel, by id: the handler of their command waits for the outcome.
type Waiters = Mutex<HashMap<u64, tokio::sync::oneshot::Sender<JobOutcome>>>;

/// Serves `cmd.provisioning.*` until `shutdown`. Commands go through the consumer stack (several devices at
/// once, one command at a time per device) and are acknowledged only once their outcome is published: the
/// work in between is reported in progress, so a replica that dies mid-session leaves the command to be
/// carried out again (a plan's snapshot is never retaken; every job is safe to repeat).
pub async fn run(
    provisioning: Provisioning,
    mut outcomes: UnboundedReceiver<JobOutcome>,
    bus: Bus,
    names: Names,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), BusError> {
    let waiters: Arc<Waiters> = Arc::default();
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Snapshots are read from the store when a job needs one (any replica may get any plan's restore).
    tracing::info!("provisioning serving");
    let router = {
        let waiters = waiters.clone();
        tokio::spawn(async move {
            while let Some(outcome) = outcomes.recv().await {
                let waiter = waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&outcome.job_id);
                if let Some(tx) = waiter {
                    let _ = tx.send(outcome);
                }
            }
        })
    };
    let mut config = dm_bus::stack::StackConfig::new(
        "provisioning",
        ConsumerConfig {
            stream: names.stream(Area::Cmd),
            durable: names.consumer("provisioning")?,
            filter: names.commands_for("provisioning")?,
            ack_wait: provisioning.config().command_ack_wait,
        },
    );
    config.dead_letter_subject = Some(names.subject(Area::Audit, "dead")?);
    config.deployment = names.deployment().to_string();
    config.progress_every = Some(provisioning.config().command_ack_wait / 3);
    // A lane is held for a whole device session: many lanes, so that devices rarely wait for each other.
    config.lanes = 4096;
    config.lane_depth = 4;
    let handler = {
        let (bus, names) = (bus.clone(), names.clone());
        move |message: dm_bus::Message, _attempt: u64| {
            let (provisioning, bus, names, waiters, running) = (
                provisioning.clone(),
                bus.clone(),
                names.clone(),
                waiters.clone(),
                running.clone(),
            );
            async move { command(&provisioning, &bus, &names, &waiters, &running, message).await }
        }
    };
    // One command at a time per device: an apply is carried out before the restore that follows it.
    let device = |m: &dm_bus::Message| {
        CommandEnvelope::decode(m.payload.clone())
            .ok()
            .and_then(|e| e.delegation)
            .map(|d| d.dev_id)
            .unwrap_or_default()
    };
    dm_bus::stack::consume(bus, config, device, handler, shutdown).await;
    router.abort();
    Ok(())
}

/// One command: its job carried out on the device (or its outcome known at once when there is nothing
/// to do there, or it cannot be done), and the outcome published; acknowledged then.
async fn command(
    provisioning: &Provisioning,
    bus: &Bus,
    names: &Names,
    waiters: &Waiters,
    running: &Mutex<HashSet<String>>,
    message: dm_bus::Message,
) -> Settle {
    let Ok(env) = CommandEnvelope::decode(message.payload.clone()) else {
        return Settle::Poison("undecodable provisioning command".into());
    };
    let trace: Vec<(String, String)> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|n| {
            message
                .headers
                .get(n)
                .map(|v| (n.to_string(), v.to_string()))
        })
        .collect();
    // A copy delivered while this replica still works on the command: it is settled by the first.
    if !running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(env.outbox_id.clone())
    {
        return Settle::Retry("the same command is being carried out".into());
    }
    let settle = carry_out(provisioning, bus, names, waiters, &env, trace).await;
    running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&env.outbox_id);
    settle
}

async fn carry_out(
    provisioning: &Provisioning,
    bus: &Bus,
    names: &Names,
    waiters: &Waiters,
    env: &CommandEnvelope,
    trace: Vec<(String, String)>,
) -> Settle {
    let started = std::time::Instant::now();
    let _in_progress = dm_metrics::global().device_job_in_progress(names.deployment());
    let delegation = env.delegation.clone().unwrap_or_default();
    let failed = |status: u32, reason: String| JobOutcome {
        job_id: 0,
        dev_id: delegation.dev_id.clone(),
        result: Err(crate::JobFailure {
            status,
            command: String::new(),
            reason,
        }),
    };
    let (p, outcome) = match job_for(provisioning, bus, names, env).await {
        Ok(Some((work, job))) => {
            let p = Pending {
                outbox_id: env.outbox_id.clone(),
                delegation: delegation.clone(),
                work,
                trace,
            };
            // Known before the job can end, so that its outcome finds its way here.
            let id = provisioning.reserve_job_id();
            let (tx, rx) = tokio::sync::oneshot::channel();
            waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, tx);
            let outcome = match provisioning.enqueue_as(&delegation.dev_id, id, job).await {
                Ok(()) => match rx.await {
                    Ok(outcome) => outcome,
                    Err(_) => return Settle::Retry("the job's outcome was lost".into()),
                },
                Err(e @ crate::EnqueueError::SnapshotStore(_)) => {
                    waiters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    return Settle::Retry(e.to_string());
                }
                Err(e) => {
                    waiters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    failed(404, e.to_string())
                }
            };
            (p, outcome)
        }
        // Done at once (nothing to do on the device).
        Ok(None) => match immediate(env, &trace) {
            Some(p) => {
                let ok = JobOutcome {
                    job_id: 0,
                    dev_id: delegation.dev_id.clone(),
                    result: Ok(JobSuccess::Restored),
                };
                (p, ok)
            }
            None => return Settle::Done,
        },
        Err((_, _, reason)) if reason.starts_with(AUTH_AWAY) || reason.starts_with(STORE_AWAY) => {
            return Settle::Retry(reason);
        }
        Err((work, status, reason)) => {
            let p = Pending {
                outbox_id: env.outbox_id.clone(),
                delegation: delegation.clone(),
                work,
                trace,
            };
            (p, failed(status, reason))
        }
    };
    if outcome.is_superseded() {
        // The replica that took the device over carries the command on (or its deadline fails it).
        tracing::warn!(
            outbox_id = %p.outbox_id, dev_id = %delegation.dev_id,
            "job given up: another replica took the device over; no outcome from here"
        );
        return Settle::Done;
    }
    record_job(names.deployment(), p.work, &outcome, started.elapsed());
    publish_until_done(bus, names, &p, outcome).await;
    Settle::Done
}

/// `dmd_device_jobs_total` and `dmd_device_job_duration_seconds` of one job's outcome.
fn record_job(deployment: &str, work: Work, outcome: &JobOutcome, took: Duration) {
    let work = match work {
        Work::ApplyPlan => "apply_plan",
        Work::Restore => "restore",
        Work::FirstSession => "first_session",
        Work::Finalize => "finalize",
        Work::Acceptance => "acceptance",
        Work::VerifyPeer => "verify_peer",
        Work::CreateKey => "create_key",
        Work::Unspecified => "unspecified",
    };
    let (result, status) = match &outcome.result {
        Ok(_) => ("ok", 200),
        Err(f) => ("failed", f.status),
    };
    dm_metrics::global().device_job(deployment, work, result, status, took);
}

/// Publishes an outcome, trying again with back-off until the bus takes it (the command stays reported in
/// progress meanwhile; a lost outcome would leave its delegation waiting for its deadline).
async fn publish_until_done(bus: &Bus, names: &Names, p: &Pending, outcome: JobOutcome) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match publish_outcome(bus, names, p, outcome.clone()).await {
            Ok(()) => return,
            Err(e) => {
                let pause = dm_bus::stack::backoff(
                    attempt,
                    Duration::from_millis(250),
                    Duration::from_secs(10),
                );
                tracing::warn!(error = %e, outbox_id = %p.outbox_id, ?pause, "an outcome could not be published; trying again");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Commands that complete without a device session: Final's finalize. DMS-1 holds `Replace` on the scope
/// roots' parents independently of the delegation (the plan required it beforehand), so no right is held
/// only for this delegation and nothing is removed; Final is kept by refusing revocation (A.6).
fn immediate(env: &CommandEnvelope, trace: &[(String, String)]) -> Option<Pending> {
    match env.command.as_ref()?.kind.as_ref()? {
        command::Kind::FinalizeDevice(_) => Some(Pending {
            outbox_id: env.outbox_id.clone(),
            delegation: env.delegation.clone().unwrap_or_default(),
            work: Work::Finalize,
            trace: trace.to_vec(),
        }),
        _ => None,
    }
}

type JobError = (Work, u32, String);

/// The job a command asks for, with the secrets it needs fetched from auth.
async fn job_for(
    provisioning: &Provisioning,
    bus: &Bus,
    names: &Names,
    env: &CommandEnvelope,
) -> Result<Option<(Work, Job)>, JobError> {
    let d = env.delegation.clone().unwrap_or_default();
    let Some(kind) = env.command.as_ref().and_then(|c| c.kind.as_ref()) else {
        return Ok(None);
    };
    match kind {
        command::Kind::ApplyPlan(plan) => {
            let fail = |status, reason: String| (Work::ApplyPlan, status, reason);
            let account = fetch_secret(provisioning, bus, names, &d, fetch::What::PeerAccount)
                .await
                .and_then(|b| account_from_tnds(&b))
                .map_err(|e| fail(500, e))?;
            let temp_key = fetch_secret(provisioning, bus, names, &d, fetch::What::TempKey)
                .await
                .and_then(|b| {
                    std::str::from_utf8(&b)
                        .map(str::to_string)
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| fail(500, e))?;
            let del_type =
                wire_type(plan.del_type()).ok_or_else(|| fail(400, "no delegation type".into()))?;
            let scope = plan
                .scope
                .iter()
                .map(|s| {
                    s.parse::<DmUri>()
                        .map_err(|e| fail(400, format!("scope: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let not_after = plan.not_after_ms.map(|ms| UtcTime {
                unix_seconds: ms.div_euclid(1000),
                nanos: 0,
            });
            let request = PlanRequest {
                account_key: account_key(&d.peer_server_id),
                account,
                delegating: provisioning.config().server_id.clone(),
                delegated: d.peer_server_id.clone(),
                del_type,
                scope,
                not_after,
                temp_key_b64: Secret::new(temp_key),
            };
            Ok(Some((
                Work::ApplyPlan,
                Job::Apply {
                    plan_id: plan_id(&d),
                    request: Box::new(request),
                },
            )))
        }
        command::Kind::RestoreDevice(_) => Ok(Some((
            Work::Restore,
            Job::Restore {
                plan_id: plan_id(&d),
            },
        ))),
        command::Kind::RunFirstSession(first) => {
            let fail = |status, reason: String| (Work::FirstSession, status, reason);
            let plan = first.plan.clone().unwrap_or_default();
            let temp_key = fetch_secret(provisioning, bus, names, &d, fetch::What::TempKey)
                .await
                .and_then(|b| {
                    std::str::from_utf8(&b)
                        .map(str::to_string)
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| fail(500, e))?;
            let own = fetch_secret(provisioning, bus, names, &d, fetch::What::OwnAccount)
                .await
                .and_then(|b| account_from_tnds(&b))
                .map_err(|e| fail(500, e))?;
            let server_key = own
                .credential(AuthLevel::Srvcred)
                .map(|c| c.key.clone())
                .unwrap_or_else(|| "srvcred".into());
            let client = own
                .credential(AuthLevel::Clcred)
                .ok_or_else(|| fail(500, "own account has no client credential".into()))?;
            provisioning
                .register_device_durably(
                    &d.dev_id,
                    DeviceCredentials {
                        server_secret: temp_key,
                        server_nonce_b64: plan.server_nonce_b64.clone(),
                        client_name: client.name.clone().unwrap_or_else(|| d.dev_id.clone()),
                        client_secret: client
                            .secret
                            .as_ref()
                            .map(|s| s.expose().to_string())
                            .unwrap_or_default(),
                        client_nonce_b64: client.data.clone().unwrap_or_default(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| fail(500, format!("{STORE_AWAY}: {e}")))?;
            Ok(Some((
                Work::FirstSession,
                Job::FirstSession(Rotation {
                    account_uri: plan.account_uri.clone(),
                    server_cred_key: server_key,
                    client_cred_key: client.key.clone(),
                }),
            )))
        }
        _ => Ok(None),
    }
}

async fn publish_outcome(
    bus: &Bus,
    names: &Names,
    p: &Pending,
    outcome: JobOutcome,
) -> Result<(), BusError> {
    let mut result = match outcome.result {
        Ok(success) => {
            let plan = match success {
                JobSuccess::Applied {
                    account_uri,
                    acl_results,
                    server_nonce_b64,
                } => Some(pb::PlanOutcome {
                    account_uri,
                    acl_results: acl_results
                        .into_iter()
                        .map(|(uri, value)| pb::AclResult { uri, value })
                        .collect(),
                    server_nonce_b64,
                }),
                _ => None,
            };
            WorkResult {
                ok: true,
                plan,
                ..Default::default()
            }
        }
        Err(f) => WorkResult {
            ok: false,
            status_code: f.status,
            failed_command: f.command,
            reason: f.reason,
            ..Default::default()
        },
    };
    result.set_work(p.work);
    let envelope = EventEnvelope {
        delegation: Some(p.delegation.clone()),
        event: Some(Event {
            kind: Some(event::Kind::Work(result)),
        }),
    };
    let mut headers = Headers::new();
    headers.insert("dmd-type", "dmd.bus.v1.EventEnvelope");
    for (name, value) in &p.trace {
        headers.insert(name, value.clone());
    }
    bus.publish(
        &names.subject(Area::Evt, "provisioning.done")?,
        headers,
        Bytes::from(envelope.encode_to_vec()),
        &format!("{}:result", p.outbox_id),
    )
    .await
}
