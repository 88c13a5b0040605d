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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Validate { file, json } => validate(file, *json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dmd: {e:#}");
            ExitCode::from(2)
        }
    }
}
