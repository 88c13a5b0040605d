//! `dmdctl`: the operator's command line over the admin API (gRPC) of a deployment: delegations (start,
//! get, list, watch, revoke, release) and the device inventory (import, add, list, remove). Tables for
//! people, `--json` for programs, a live step view with `--watch`, and exit codes by outcome (see
//! [`exit`] and docs/operations.md).

mod records;
mod view;

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use dm_proto::admin::v1::admin_client::AdminClient;
use dm_proto::admin::v1::{
    AddDevicesRequest, AddOutcome, DelegationId, DeviceRecord, ListDelegationsRequest,
    ListDevicesRequest, RemoveDeviceRequest, StartDelegationRequest,
};
use dm_proto::saga::v1::{DelType, DelegationState, Device, Phase, Role};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Exit statuses: what a script can tell apart without reading the output.
mod exit {
    /// Done; a followed delegation reached what the command aimed at (Active; Revoked for `revoke`,
    /// Released for `release`).
    pub const OK: u8 = 0;
    /// The admin API could not be reached, or failed (unavailable, internal error).
    pub const API: u8 = 1;
    /// The command line is wrong (clap's own status), or no token was given.
    pub const USAGE: u8 = 2;
    /// The API refused the request (400, 404, 405, 409, no inventory): the message says why.
    pub const REFUSED: u8 = 3;
    /// The operator token is missing or wrong.
    pub const UNAUTHENTICATED: u8 = 4;
    /// An import (or add) left some devices out: invalid, or present already without `--replace`.
    pub const PARTIAL: u8 = 5;
    /// A followed delegation ended otherwise: declined at step 1, failed, revoked, expired, released.
    pub const DECLINED: u8 = 10;
    pub const FAILED: u8 = 11;
    pub const REVOKED: u8 = 12;
    pub const EXPIRED: u8 = 13;
    pub const RELEASED: u8 = 14;
    /// `--timeout` passed before the followed delegation settled.
    pub const TIMEOUT: u8 = 15;
}

#[derive(Debug, Parser)]
#[command(
    name = "dmdctl",
    version,
    about = "Operate delegations and the device inventory of a DM Server deployment",
    after_help = "Exit status: 0 ok (a followed delegation reached its aim), 1 API unreachable or failed, \
2 usage, 3 refused by the API, 4 token missing or wrong, 5 some devices not added, 10 declined, \
11 failed, 12 revoked, 13 expired, 14 released, 15 timeout."
)]
struct Cli {
    /// The admin API of the deployment.
    #[arg(
        long,
        env = "DMD_ADMIN_URL",
        default_value = "http://127.0.0.1:7443",
        global = true
    )]
    endpoint: String,
    /// The operator token (not needed with a client certificate the API accepts).
    #[arg(long, env = "DMD_ADMIN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// PEM file of the CA the admin API's certificate chains to (an https:// endpoint needs it).
    #[arg(long, env = "DMD_ADMIN_CA", global = true)]
    ca: Option<std::path::PathBuf>,
    /// This operator's client certificate (PEM), with --key: mutual TLS.
    #[arg(long, env = "DMD_ADMIN_CERT", global = true, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "DMD_ADMIN_KEY", global = true, requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// Machine output: one JSON document (one per line while following a delegation).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Delegating,
    Delegated,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TypeArg {
    Partial,
    Full,
    Final,
    Temporary,
}

/// Following a delegation after the command.
#[derive(Debug, Clone, clap::Args)]
struct Follow {
    /// Follow the delegation with a live step view until it settles; the exit status tells the outcome.
    #[arg(long)]
    watch: bool,
    /// Give up following after this many seconds (exit status 15).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a delegation of a device with a peer DM Server.
    Start {
        #[arg(long, value_enum)]
        role: RoleArg,
        #[arg(long)]
        peer: String,
        #[arg(long)]
        device: String,
        #[arg(long = "type", value_enum)]
        del_type: TypeArg,
        /// Scope URIs (`.` for Full).
        #[arg(long, required = true, num_args = 1..)]
        scope: Vec<String>,
        /// Temporary: the end, in milliseconds since the epoch.
        #[arg(long)]
        not_after_ms: Option<i64>,
        #[command(flatten)]
        follow: Follow,
    },
    /// Show one delegation.
    Get { peer: String, session: String },
    /// List delegations (of one device).
    List {
        #[arg(long)]
        device: Option<String>,
    },
    /// Follow a delegation with a live step view until it is Active or ended.
    Watch {
        peer: String,
        session: String,
        /// Go on past Active until the delegation ends (revoked, released, expired).
        #[arg(long)]
        until_end: bool,
        /// Give up after this many seconds (exit status 15).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Take authority back (delegating side).
    Revoke {
        peer: String,
        session: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Hand authority back (delegated side).
    Release {
        peer: String,
        session: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// The device inventory: the devices this server manages.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Print a shell completion script (e.g. `dmdctl completions bash > /etc/bash_completion.d/dmdctl`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Add the devices of a CSV file (header row: dev_id, server_secret, server_nonce_b64, client_name,
    /// client_secret, client_nonce_b64) or a JSON file (an array of objects with those fields).
    Import {
        file: PathBuf,
        /// Overwrite devices that are there (their rotated secrets and nonces are lost).
        #[arg(long)]
        replace: bool,
        /// Devices per request.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
        batch: u16,
    },
    /// Add one device. Prefer the environment for the secrets: a command line is visible to others.
    Add {
        dev_id: String,
        /// The device's name toward this server (CLCRED AAuthName); the device id by default.
        #[arg(long)]
        client_name: Option<String>,
        /// The nonce this server must use next (SRVCRED AAuthData), base64.
        #[arg(long)]
        server_nonce_b64: String,
        /// The nonce the device must use next (CLCRED AAuthData), base64.
        #[arg(long)]
        client_nonce_b64: String,
        /// This server's password on the device (SRVCRED AAuthSecret).
        #[arg(long, env = "DMD_DEVICE_SERVER_SECRET", hide_env_values = true)]
        server_secret: String,
        /// The device's password toward this server (CLCRED AAuthSecret).
        #[arg(long, env = "DMD_DEVICE_CLIENT_SECRET", hide_env_values = true)]
        client_secret: String,
        /// Overwrite the device if it is there.
        #[arg(long)]
        replace: bool,
    },
    /// List the devices (never their secrets).
    List,
    /// Remove a device (refused while a delegation holds it).
    Remove { dev_id: String },
}

fn authorized<T>(token: &str, body: T) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(body);
    // No token: the client certificate speaks for the operator.
    if token.is_empty() {
        return Ok(r);
    }
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("the token is not valid header text")?,
    );
    Ok(r)
}

/// A usage error found after parsing (exit status 2).
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

struct Api {
    client: AdminClient<Channel>,
    token: String,
    json: bool,
}

impl Api {
    fn req<T>(&self, body: T) -> anyhow::Result<tonic::Request<T>> {
        authorized(&self.token, body)
    }

    fn show(&self, s: &DelegationState) {
        if self.json {
            println!("{}", view::delegation_json(s));
        } else {
            print!("{}", view::delegations_table(std::slice::from_ref(s)));
        }
    }
}

async fn connect(cli: &Cli) -> anyhow::Result<Api> {
    let token = match cli.token.clone().filter(|t| !t.is_empty()) {
        Some(t) => t,
        None if cli.cert.is_some() => String::new(),
        None => {
            return Err(Usage(
                "the operator token is needed: --token or DMD_ADMIN_TOKEN (or a client certificate: --cert and --key)"
                    .into(),
            )
            .into());
        }
    };
    let mut endpoint = Channel::from_shared(cli.endpoint.clone())
        .map_err(|_| Usage(format!("the endpoint '{}' is not a URL", cli.endpoint)))?;
    let https = cli.endpoint.starts_with("https://");
    if https && cli.ca.is_none() {
        return Err(Usage(
            "an https:// endpoint needs --ca (DMD_ADMIN_CA): the CA of the admin API's certificate"
                .into(),
        )
        .into());
    }
    if !https && (cli.ca.is_some() || cli.cert.is_some()) {
        return Err(Usage(
            "--ca, --cert and --key are for TLS: the endpoint must be https://".into(),
        )
        .into());
    }
    if https {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| Usage(format!("cannot read {}: {e}", path.display())))
        };
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &cli.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Usage(format!("TLS settings: {e}")))?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the admin API at {}", cli.endpoint))?;
    Ok(Api {
        client: AdminClient::new(channel),
        token,
        json: cli.json,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// The exit status for a delegation that settled in `phase` when the command aimed at `aim`.
fn outcome(phase: Phase, aim: Phase) -> u8 {
    if phase == aim {
        return exit::OK;
    }
    match phase {
        Phase::Active => exit::OK,
        Phase::Declined => exit::DECLINED,
        Phase::Failed => exit::FAILED,
        Phase::Revoked => exit::REVOKED,
        Phase::Expired => exit::EXPIRED,
        Phase::Released => exit::RELEASED,
        _ => exit::TIMEOUT,
    }
}

fn is_terminal_phase(p: Phase) -> bool {
    matches!(
        p,
        Phase::Declined | Phase::Failed | Phase::Revoked | Phase::Expired | Phase::Released
    )
}

/// Draws a followed delegation: redrawn in place on a terminal, one line per change otherwise, one JSON
/// document per change with `--json`.
struct Live {
    json: bool,
    terminal: bool,
    drawn_lines: usize,
}

impl Live {
    fn new(json: bool) -> Self {
        Self {
            json,
            terminal: !json && std::io::stdout().is_terminal(),
            drawn_lines: 0,
        }
    }

    fn changed(&mut self, s: &DelegationState) {
        if self.json {
            println!("{}", view::delegation_json(s));
        } else if self.terminal {
            self.redraw(s);
        } else {
            let fault = s
                .fault
                .as_ref()
                .map(|f| format!(" {} at step {}: {}", f.status_code, f.step, f.reason))
                .unwrap_or_default();
            println!(
                "{:>7.1}s {}{fault}",
                (now_ms() - s.created_ms).max(0) as f64 / 1000.0,
                view::phase_name(s)
            );
        }
        let _ = std::io::stdout().flush();
    }

    /// On a terminal, the elapsed time goes on between changes.
    fn tick(&mut self, s: &DelegationState) {
        if self.terminal {
            self.redraw(s);
        }
    }

    fn redraw(&mut self, s: &DelegationState) {
        let text = view::step_view(s, now_ms() - s.created_ms);
        let mut out = std::io::stdout().lock();
        if self.drawn_lines > 0 {
            // Up to the first line drawn, and clear from there down.
            let _ = write!(out, "\x1b[{}A\x1b[J", self.drawn_lines);
        }
        let _ = write!(out, "{text}");
        let _ = out.flush();
        self.drawn_lines = text.lines().count();
    }
}

/// Follows a delegation until it ends (or is Active, when `stop_at_active`), showing every change;
/// the exit status tells how it settled against `aim`.
async fn follow(
    api: &mut Api,
    id: DelegationId,
    stop_at_active: bool,
    aim: Phase,
    timeout: Option<u64>,
) -> anyhow::Result<u8> {
    let request = api.req(id)?;
    let mut stream = api.client.watch_delegation(request).await?.into_inner();
    let mut live = Live::new(api.json);
    let deadline = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last: Option<DelegationState> = None;
    loop {
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            reply = stream.next() => {
                let Some(reply) = reply else { break };
                let Some(s) = reply?.state else { continue };
                live.changed(&s);
                let phase = s.phase();
                last = Some(s);
                if is_terminal_phase(phase) || (stop_at_active && phase == Phase::Active) {
                    return Ok(outcome(phase, aim));
                }
            }
            _ = tick.tick() => {
                if let Some(s) = &last {
                    live.tick(s);
                }
            }
            _ = expired => {
                eprintln!("dmdctl: gave up following after {}s", timeout.unwrap_or_default());
                return Ok(exit::TIMEOUT);
            }
        }
    }
    // The API ended the stream: the last state seen tells.
    Ok(last.map_or(exit::API, |s| outcome(s.phase(), aim)))
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "dmdctl",
            &mut std::io::stdout(),
        );
        return Ok(exit::OK);
    }
    let mut api = connect(&cli).await?;
    let id = |peer: String, session: String| DelegationId {
        peer_server_id: peer,
        session_id: session,
    };
    match cli.command {
        Command::Completions { .. } => Ok(exit::OK),
        Command::Start {
            role,
            peer,
            device,
            del_type,
            scope,
            not_after_ms,
            follow: f,
        } => {
            let mut r = StartDelegationRequest {
                peer_server_id: peer,
                device: Some(Device {
                    dev_id: device,
                    ..Default::default()
                }),
                scope,
                not_after_ms,
                ..Default::default()
            };
            r.set_role(match role {
                RoleArg::Delegating => Role::Delegating,
                RoleArg::Delegated => Role::Delegated,
            });
            r.set_del_type(match del_type {
                TypeArg::Partial => DelType::Partial,
                TypeArg::Full => DelType::Full,
                TypeArg::Final => DelType::Final,
                TypeArg::Temporary => DelType::Temporary,
            });
            let request = api.req(r)?;
            let state = api
                .client
                .start_delegation(request)
                .await?
                .into_inner()
                .state;
            let Some(s) = state else {
                return Ok(exit::API);
            };
            if !f.watch {
                api.show(&s);
                return Ok(exit::OK);
            }
            follow(
                &mut api,
                id(s.peer_server_id, s.session_id),
                true,
                Phase::Active,
                f.timeout,
            )
            .await
        }
        Command::Get { peer, session } => {
            let request = api.req(id(peer, session))?;
            if let Some(s) = api.client.get_delegation(request).await?.into_inner().state {
                api.show(&s);
            }
            Ok(exit::OK)
        }
        Command::List { device } => {
            let request = api.req(ListDelegationsRequest {
                dev_id: device.unwrap_or_default(),
            })?;
            let states = api
                .client
                .list_delegations(request)
                .await?
                .into_inner()
                .delegations;
            if api.json {
                let all: Vec<_> = states.iter().map(view::delegation_json).collect();
                println!("{}", serde_json::Value::Array(all));
            } else {
                print!("{}", view::delegations_table(&states));
            }
            Ok(exit::OK)
        }
        Command::Watch {
            peer,
            session,
            until_end,
            timeout,
        } => {
            follow(
                &mut api,
                id(peer, session),
                !until_end,
                Phase::Active,
                timeout,
            )
            .await
        }
        Command::Revoke {
            peer,
            session,
            follow: f,
        } => {
            let request = api.req(id(peer.clone(), session.clone()))?;
            let state = api
                .client
                .revoke_delegation(request)
                .await?
                .into_inner()
                .state;
            if !f.watch {
                if let Some(s) = state {
                    api.show(&s);
                }
                return Ok(exit::OK);
            }
            follow(
                &mut api,
                id(peer, session),
                false,
                Phase::Revoked,
                f.timeout,
            )
            .await
        }
        Command::Release {
            peer,
            session,
            follow: f,
        } => {
            let request = api.req(id(peer.clone(), session.clone()))?;
            let state = api
                .client
                .release_delegation(request)
                .await?
                .into_inner()
                .state;
            if !f.watch {
                if let Some(s) = state {
                    api.show(&s);
                }
                return Ok(exit::OK);
            }
            follow(
                &mut api,
                id(peer, session),
                false,
                Phase::Released,
                f.timeout,
            )
            .await
        }
        Command::Devices(command) => devices(&mut api, command).await,
    }
}

async fn devices(api: &mut Api, command: DevicesCommand) -> anyhow::Result<u8> {
    match command {
        DevicesCommand::Import {
            file,
            replace,
            batch,
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Usage(format!("cannot read {}: {e}", file.display())))?;
            let records = records::parse(&file.to_string_lossy(), &text)
                .map_err(|e| Usage(format!("{}: {e}", file.display())))?;
            import(api, records, replace, usize::from(batch)).await
        }
        DevicesCommand::Add {
            dev_id,
            client_name,
            server_nonce_b64,
            client_nonce_b64,
            server_secret,
            client_secret,
            replace,
        } => {
            let record = DeviceRecord {
                client_name: client_name.unwrap_or_else(|| dev_id.clone()),
                dev_id,
                server_secret,
                server_nonce_b64,
                client_secret,
                client_nonce_b64,
            };
            let request = api.req(AddDevicesRequest {
                devices: vec![record],
                replace,
            })?;
            let results = api.client.add_devices(request).await?.into_inner().results;
            let Some(r) = results.first() else {
                return Ok(exit::API);
            };
            let word = outcome_word(r.outcome());
            if api.json {
                println!(
                    "{}",
                    serde_json::json!({"dev_id": r.dev_id, "outcome": word, "reason": r.reason})
                );
            } else if r.reason.is_empty() {
                println!("{} {word}", r.dev_id);
            } else {
                println!("{} {word}: {}", r.dev_id, r.reason);
            }
            Ok(match r.outcome() {
                AddOutcome::Added | AddOutcome::Replaced => exit::OK,
                _ => exit::REFUSED,
            })
        }
        DevicesCommand::List => {
            let request = api.req(ListDevicesRequest {})?;
            let devices = api.client.list_devices(request).await?.into_inner().devices;
            if api.json {
                let all: Vec<_> = devices.iter().map(view::device_json).collect();
                println!("{}", serde_json::Value::Array(all));
            } else {
                print!("{}", view::devices_table(&devices));
            }
            Ok(exit::OK)
        }
        DevicesCommand::Remove { dev_id } => {
            let request = api.req(RemoveDeviceRequest {
                dev_id: dev_id.clone(),
            })?;
            let removed = api
                .client
                .remove_device(request)
                .await?
                .into_inner()
                .removed;
            if api.json {
                println!(
                    "{}",
                    serde_json::json!({"dev_id": dev_id, "removed": removed})
                );
            } else if removed {
                println!("{dev_id} removed");
            } else {
                eprintln!("dmdctl: 404: no device {dev_id} in the inventory");
            }
            Ok(if removed { exit::OK } else { exit::REFUSED })
        }
    }
}

fn outcome_word(o: AddOutcome) -> &'static str {
    match o {
        AddOutcome::Added => "added",
        AddOutcome::Replaced => "replaced",
        AddOutcome::Exists => "exists",
        AddOutcome::Invalid => "invalid",
        AddOutcome::Unspecified => "unknown",
    }
}

/// One line on stderr, redrawn: `[#####.....] 500/1000 devices`.
fn progress(done: usize, total: usize) {
    const WIDTH: usize = 30;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    eprint!(
        "\r[{}{}] {done}/{total} devices",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled)
    );
    let _ = std::io::stderr().flush();
}

async fn import(
    api: &mut Api,
    records: Vec<records::Located>,
    replace: bool,
    batch: usize,
) -> anyhow::Result<u8> {
    let total = records.len();
    let bar = std::io::stderr().is_terminal();
    // (where, dev_id, outcome, reason) of every record, in file order.
    let mut results: Vec<(String, String, AddOutcome, String)> = Vec::with_capacity(total);
    let mut seen = HashSet::new();
    let mut to_send = Vec::with_capacity(total);
    for r in records {
        if seen.insert(r.record.dev_id.clone()) {
            to_send.push(r);
        } else {
            results.push((
                r.at,
                r.record.dev_id,
                AddOutcome::Invalid,
                "the device is in the file twice".into(),
            ));
        }
    }
    let mut done = results.len();
    if bar {
        progress(done, total);
    }
    for chunk in to_send.chunks(batch) {
        let request = api.req(AddDevicesRequest {
            devices: chunk.iter().map(|r| r.record.clone()).collect(),
            replace,
        })?;
        let answer = api.client.add_devices(request).await;
        let answer = match answer {
            Ok(a) => a.into_inner().results,
            Err(e) => {
                if bar {
                    eprintln!();
                }
                eprintln!(
                    "dmdctl: the import stopped after {done} of {total} devices (the rest was not sent)"
                );
                return Err(e.into());
            }
        };
        for (r, result) in chunk.iter().zip(answer) {
            results.push((
                r.at.clone(),
                result.dev_id.clone(),
                result.outcome(),
                result.reason.clone(),
            ));
        }
        done += chunk.len();
        if bar {
            progress(done, total);
        }
    }
    if bar {
        eprintln!();
    }
    let count = |o: AddOutcome| results.iter().filter(|r| r.2 == o).count();
    let (added, replaced, exists, invalid) = (
        count(AddOutcome::Added),
        count(AddOutcome::Replaced),
        count(AddOutcome::Exists),
        count(AddOutcome::Invalid),
    );
    let left_out: Vec<_> = results
        .iter()
        .filter(|r| !matches!(r.2, AddOutcome::Added | AddOutcome::Replaced))
        .collect();
    if api.json {
        let items: Vec<_> = left_out
            .iter()
            .map(|(at, dev_id, o, reason)| {
                serde_json::json!({"at": at, "dev_id": dev_id, "outcome": outcome_word(*o), "reason": reason})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "total": total, "added": added, "replaced": replaced,
                "exists": exists, "invalid": invalid, "left_out": items,
            })
        );
    } else {
        println!(
            "{total} devices: {added} added, {replaced} replaced, {exists} already there, {invalid} invalid"
        );
        if !left_out.is_empty() {
            let rows: Vec<Vec<String>> = left_out
                .iter()
                .map(|(at, dev_id, o, reason)| {
                    vec![
                        at.clone(),
                        dev_id.clone(),
                        outcome_word(*o).to_string(),
                        reason.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                view::table(&["WHERE", "DEVICE", "OUTCOME", "REASON"], &rows)
            );
        }
    }
    Ok(if left_out.is_empty() {
        exit::OK
    } else {
        exit::PARTIAL
    })
}

fn status_exit(status: &tonic::Status) -> u8 {
    use tonic::Code;
    match status.code() {
        Code::Unauthenticated => exit::UNAUTHENTICATED,
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::OutOfRange => exit::REFUSED,
        _ => exit::API,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if let Some(status) = e.downcast_ref::<tonic::Status>() {
                eprintln!("dmdctl: {}", status.message());
                ExitCode::from(status_exit(status))
            } else if e.downcast_ref::<Usage>().is_some() {
                eprintln!("dmdctl: {e}");
                ExitCode::from(exit::USAGE)
            } else {
                eprintln!("dmdctl: {e:#}");
                ExitCode::from(exit::API)
            }
        }
    }
}
