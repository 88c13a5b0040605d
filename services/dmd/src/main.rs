//! `dmd`: the one binary of the delegation system. For now it checks protocol documents
//! (`dmd validate FILE`); the services will be started by sub-commands of this same binary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dm_protocol::document;

#[derive(Debug, Parser)]
#[command(
    name = "dmd",
    version,
    about = "OMA DM server delegation: services and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(only: Option<dmd::serve::Service>, config: &PathBuf) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read the configuration {}", config.display()))?;
    runtime()?.block_on(dmd::serve::run(only, &text))?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // Logs go to stderr, filtered by RUST_LOG (default: warnings).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not for log collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Validate { file, json } => validate(file, *json),
        Command::Demo => demo(),
        Command::All { config } => serve(None, config),
        Command::Orchestrator { config } => serve(Some(dmd::serve::Service::Orchestrator), config),
        Command::Auth { config } => serve(Some(dmd::serve::Service::Auth), config),
        Command::Gateway { config } => serve(Some(dmd::serve::Service::Gateway), config),
        Command::Notification { config } => serve(Some(dmd::serve::Service::Notification), config),
        Command::Provisioning { config } => serve(Some(dmd::serve::Service::Provisioning), config),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dmd: {e:#}");
            ExitCode::from(2)
        }
    }
}
