//! `dmd`: the one binary of the delegation system: the services (`dmd all`, `dmd <service>`), the demo,
//! the load benchmark (`dmd bench`) and the protocol document checker (`dmd validate FILE`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dm_protocol::document;

/// mimalloc instead of glibc malloc: under load glibc's malloc, free and chunk consolidation were a third
/// of this process's CPU (many small, short-lived allocations freed on other threads).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "dmd",
    version,
    about = "OMA DM server delegation: services and tools"
)]
struct Cli {
    /// How log lines on stderr are written: `text` for people, `json` (one object per line) for log
    /// shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "DMD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Configuration files: `dmd config check FILE` reads one as a service would, resolving every
    /// reference (variables, secret and certificate files), and reports each error with the file's line
    /// and column.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Check a delegation message, DelegationError, TNDS document, SyncML DM message or package #0.
    ///
    /// Prints a one-line summary and exits 0 when the file is valid; prints where and why it is
    /// not (with the status code a receiver would answer) and exits 1 otherwise.
    Validate {
        /// The file to check.
        file: PathBuf,
        /// Print the decoded structure as JSON (secrets are redacted).
        #[arg(long)]
        json: bool,
    },
    /// Two DM Servers and a simulated fleet in one process: a delegation of every type with both
    /// initiators, a revocation, an expiry and a refused request. Exits 0 only if every outcome is the
    /// expected one. Always ephemeral.
    Demo,
    /// The load benchmark (issue 9): both deployments and the fleet, N delegations with C in flight
    /// (one per device, Partial, DMS-1 initiates), until Active on both sides. Prints throughput overall
    /// and per tenth, latency percentiles, failures, CPU, stored bytes and memory per delegation and the
    /// floors of the bus; the last line is `bench: <ok> delegations, <rate>/s, p50 <a> ms, p99 <b> ms,
    /// failures <f>`. Exits 1 when a target of issue 9 is missed (unless `--no-targets`).
    Bench {
        /// How many delegations (and devices).
        #[arg(long, default_value_t = 5000)]
        delegations: usize,
        /// How many delegations are in progress at once.
        #[arg(long, default_value_t = 200)]
        in_flight: usize,
        /// Use this NATS server (JetStream enabled, best a fresh one) instead of starting one
        /// (`NATS_SERVER_BIN` or `nats-server` on `PATH`).
        #[arg(long, value_name = "URL", conflicts_with = "in_process")]
        nats: Option<String>,
        /// Use the in-process bus instead of NATS.
        #[arg(long)]
        in_process: bool,
        /// A delegation not Active on both sides after this many seconds counts as a failure ("timeout").
        #[arg(long, default_value_t = 60)]
        deadline_secs: u64,
        /// Print the figures as one JSON object (the last line stays the `bench:` line).
        #[arg(long)]
        json: bool,
        /// Exit 0 whenever the run itself completes, targets met or not (smoke runs).
        #[arg(long)]
        no_targets: bool,
    },
    /// The fault program (issue 10): nats-server and every service of both deployments as separate
    /// processes, two replicas each, the simulated fleet; N delegations of every type while a random
    /// process is killed (SIGKILL) every few hundred milliseconds and started again. Prints a table; the
    /// last line is `chaos: <n> delegations, <k> kills, stuck <a>, inconsistent <b>, twice <c>`. Exits 1
    /// unless stuck, inconsistent and twice are all 0.
    Chaos {
        /// How many delegations (and devices).
        #[arg(long, default_value_t = 1000)]
        delegations: usize,
        /// How many processes are killed in all.
        #[arg(long, default_value_t = 200)]
        kills: usize,
        /// Seeds the kill schedule (which process, and when).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How many delegations are in progress at once.
        #[arg(long, default_value_t = 50)]
        in_flight: usize,
        /// After the kills, how long every delegation has to settle before it counts as stuck.
        #[arg(long, default_value_t = 300)]
        settle_secs: u64,
        /// Keep the working directory (configurations, logs, NATS store) even when all went well.
        #[arg(long)]
        keep: bool,
        /// Never kill nats-server (only the services).
        #[arg(long)]
        spare_nats: bool,
    },
    /// Every service of a deployment in this process: on NATS when `[deployment] nats_url` is set,
    /// otherwise on the in-process bus (nothing is kept across a restart).
    All {
        #[arg(long, env = "DMD_CONFIG")]
        config: PathBuf,
    },
    /// The orchestrator (and the admin API when `[admin]` is set), on NATS.
    Orchestrator {
        #[arg(long, env = "DMD_CONFIG")]
        config: PathBuf,
    },
    /// The auth service, on NATS.
    Auth {
        #[arg(long, env = "DMD_CONFIG")]
        config: PathBuf,
    },
    /// The gateway, on NATS.
    Gateway {
        #[arg(long, env = "DMD_CONFIG")]
        config: PathBuf,
    },
    /// The notification service (acceptance policy), on NATS.
    Notification {
        #[arg(long, env = "DMD_CONFIG")]
        config: PathBuf,
    },
    /// The provisioning service (the DM endpoint devices connect to), on NATS.
    Provisioning {
        #[arg(long, env = "DMD_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Exits 0 and prints a summary when the file can be used; prints `FILE:LINE:COLUMN: why` and
    /// exits 1 otherwise.
    Check { file: PathBuf },
    /// Prints the deployment's bus key (base64), derived from the master key the file's `[auth]` names:
    /// the secret for `[gateway] bus_key_file`/`bus_key_env`, so that a gateway host holds no master key.
    BusKey { file: PathBuf },
}

fn config_bus_key(file: &PathBuf) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    match dmd::config::parse(&text, &dmd::config::ProcessEnvironment::for_file(file)) {
        Ok(c) => match c.auth {
            Some(a) if !a.master_key.is_ephemeral() => {
                println!("{}", a.master_key.bus_key().to_base64().as_str());
                Ok(ExitCode::SUCCESS)
            }
            _ => {
                eprintln!(
                    "{}: no master key: the [auth] table with master_key_file or master_key_env is needed",
                    file.display()
                );
                Ok(ExitCode::FAILURE)
            }
        },
        Err(e) => {
            eprintln!("{}:{}:{}: {}", file.display(), e.line, e.column, e.message);
            Ok(ExitCode::FAILURE)
        }
    }
}

fn config_check(file: &PathBuf) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    match dmd::config::parse(&text, &dmd::config::ProcessEnvironment::for_file(file)) {
        Ok(c) => {
            let services: Vec<&str> = [
                ("orchestrator", true),
                ("auth", c.auth.is_some()),
                ("gateway", c.gateway.is_some()),
                ("notification", c.acceptance.is_some()),
                ("provisioning", c.provisioning.is_some()),
            ]
            .into_iter()
            .filter_map(|(name, present)| present.then_some(name))
            .collect();
            let admin = c.admin.as_ref().map_or_else(String::new, |a| {
                let how = match &a.tls {
                    Some(t) if t.client_ca.is_some() => "TLS, client certificates",
                    Some(_) => "TLS",
                    None => "in clear",
                };
                format!(", admin {} ({how})", a.listen)
            });
            println!(
                "{}: ok: deployment {} ({}), bus {}{}, peers [{}], services {}{admin}",
                file.display(),
                c.name,
                c.server_id,
                c.nats_url
                    .as_deref()
                    .map_or("in-process".to_string(), dmd::serve::without_credentials),
                dmd::serve::nats_protection(&c.nats_security),
                c.peers.join(", "),
                services.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}:{}:{}: {}", file.display(), e.line, e.column, e.message);
            Ok(ExitCode::FAILURE)
        }
    }
}

fn validate(file: &PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    match document::inspect(&bytes) {
        Ok(doc) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("valid {}", doc.summary());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            let kind = document::sniff(&bytes).map_or("document", |k| k.describe());
            eprintln!("invalid {kind}: {}", err.error);
            if json {
                println!("{}", serde_json::to_string_pretty(&err)?);
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn demo() -> anyhow::Result<ExitCode> {
    runtime()?.block_on(dmd::demo::run(dmd::demo::DemoOptions::default()))?;
    Ok(ExitCode::SUCCESS)
}

fn bench(options: dmd::bench::BenchOptions, json: bool, targets: bool) -> anyhow::Result<ExitCode> {
    let report = runtime()?.block_on(dmd::bench::run(options))?;
    if json {
        println!("{}", serde_json::to_string(&report.json())?);
    } else {
        println!("{}", report.text());
    }
    println!("{}", report.last_line());
    let missed = report.missed_targets();
    if targets && !missed.is_empty() {
        eprintln!("dmd bench: targets missed: {}", missed.join("; "));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn chaos(options: dmd::chaos::ChaosOptions) -> anyhow::Result<ExitCode> {
    let report = runtime()?.block_on(dmd::chaos::run(options))?;
    println!("{}", report.text());
    println!("{}", report.last_line());
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(only: Option<dmd::serve::Service>, config: &PathBuf) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read the configuration {}", config.display()))?;
    runtime()?.block_on(dmd::serve::run(only, &text, config))?;
    Ok(ExitCode::SUCCESS)
}

/// The default log filter of the services: what each process serves and its warnings.
const SERVICE_FILTER: &str = "warn,dmd=info";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The fault program's fleet runs in this process: the failures of its devices' sessions are the
    // point of the run, not news. A service says at start what it serves (dmd, info) and why any
    // delegation failed (warn); the tools print their own reports.
    let (default_filter, service) = match cli.command {
        Command::Chaos { .. } => ("warn,dm_client=error", None),
        Command::All { .. } => (SERVICE_FILTER, Some("dmd")),
        Command::Orchestrator { .. } => (SERVICE_FILTER, Some("dmd-orchestrator")),
        Command::Auth { .. } => (SERVICE_FILTER, Some("dmd-auth")),
        Command::Gateway { .. } => (SERVICE_FILTER, Some("dmd-gateway")),
        Command::Notification { .. } => (SERVICE_FILTER, Some("dmd-notification")),
        Command::Provisioning { .. } => (SERVICE_FILTER, Some("dmd-provisioning")),
        _ => ("warn", None),
    };
    // Spans are exported (OTLP over gRPC) when the standard OTEL_* variables name a collector; only the
    // services export.
    let otlp = service
        .and_then(|name| dm_telemetry::OtlpConfig::from_env(|k| std::env::var(k).ok(), name));
    let format = match cli.log_format {
        LogFormat::Text => dm_telemetry::LogFormat::Text,
        LogFormat::Json => dm_telemetry::LogFormat::Json,
    };
    // Logs go to stderr, filtered by RUST_LOG (default: the one above).
    let mut telemetry = match dm_telemetry::init(format, default_filter, otlp.as_ref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dmd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(o) = &otlp {
        tracing::info!(endpoint = %o.endpoint, service_name = %o.service_name, "exporting spans (OTLP/gRPC)");
    }
    let result = match &cli.command {
        Command::Validate { file, json } => validate(file, *json),
        Command::Config {
            action: ConfigAction::Check { file },
        } => config_check(file),
        Command::Config {
            action: ConfigAction::BusKey { file },
        } => config_bus_key(file),
        Command::Demo => demo(),
        Command::Bench {
            delegations,
            in_flight,
            nats,
            in_process,
            deadline_secs,
            json,
            no_targets,
        } => bench(
            dmd::bench::BenchOptions {
                delegations: *delegations,
                in_flight: *in_flight,
                bus: match (nats, in_process) {
                    (_, true) => dmd::bench::BusChoice::InProcess,
                    (Some(url), false) => dmd::bench::BusChoice::Url(url.clone()),
                    (None, false) => dmd::bench::BusChoice::Spawn,
                },
                deadline: std::time::Duration::from_secs(*deadline_secs),
            },
            *json,
            !*no_targets,
        ),
        Command::Chaos {
            delegations,
            kills,
            seed,
            in_flight,
            settle_secs,
            keep,
            spare_nats,
        } => chaos(dmd::chaos::ChaosOptions {
            delegations: *delegations,
            kills: *kills,
            seed: *seed,
            in_flight: *in_flight,
            settle: std::time::Duration::from_secs(*settle_secs),
            keep: *keep,
            spare_nats: *spare_nats,
            ..Default::default()
        }),
        Command::All { config } => serve(None, config),
        Command::Orchestrator { config } => serve(Some(dmd::serve::Service::Orchestrator), config),
        Command::Auth { config } => serve(Some(dmd::serve::Service::Auth), config),
        Command::Gateway { config } => serve(Some(dmd::serve::Service::Gateway), config),
        Command::Notification { config } => serve(Some(dmd::serve::Service::Notification), config),
        Command::Provisioning { config } => serve(Some(dmd::serve::Service::Provisioning), config),
    };
    // Spans still queued go out before the process ends.
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dmd: {e:#}");
            ExitCode::from(2)
        }
    }
}
