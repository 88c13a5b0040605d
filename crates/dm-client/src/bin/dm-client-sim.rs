//! `dm-client-sim`: a fleet of simulated OMA DM 1.2 devices behind one HTTP listener.
//!
//! ```text
//! dm-client-sim --listen 127.0.0.1:8700 --devices 1000 --id-prefix IMEI:35000000000 \
//!     --server-id dms1.operator.example --server-addr http://127.0.0.1:8080/dm
//! dm-client-sim --devices 10000 --report-memory
//! dm-client-sim --dev-id IMEI:356938035643809 --quirks trailing-bytes,text-nonce \
//!     --server-id dms1.operator.example --server-addr http://127.0.0.1:8080/dm
//! dm-client-sim --devices 100 --quirks all
//! ```
//!
//! `--quirks` takes a comma-separated list of `trailing-bytes`, `nul-in-lists`, `acl-on-add`,
//! `text-nonce`, `forget-nonce` (or `all`): every device then behaves like the client of PROTOCOL.md B.6
//! in those ways (docs/device-side.md). `--dev-id` simulates exactly one device with that id.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use dm_client::{DefaultAccount, Device, Fleet, Quirks, SessionConfig};
use dm_protocol::auth::decode_nonce;
use dm_protocol::tnds;

#[derive(Parser)]
#[command(
    name = "dm-client-sim",
    version,
    about = "A fleet of simulated OMA DM 1.2 clients (package #0 over HTTP, DM sessions, node ACLs)"
)]
struct Cli {
    /// Address to listen on for package #0, connect and inspection requests.
    #[arg(long, default_value = "127.0.0.1:8700")]
    listen: String,
    /// How many devices to simulate.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Simulate exactly one device with this id (any string) instead of the numbered fleet.
    #[arg(long, value_name = "ID")]
    dev_id: Option<String>,
    /// Field quirks every device reproduces, comma-separated: trailing-bytes, nul-in-lists,
    /// acl-on-add, text-nonce, forget-nonce, or all (PROTOCOL.md B.6). Default: none.
    #[arg(long, value_name = "LIST")]
    quirks: Option<Quirks>,
    /// Device ids are this prefix followed by the device number, zero-padded to at least 4 digits.
    #[arg(long, default_value = "IMEI:35000000000")]
    id_prefix: String,
    /// A TNDS document (the whole tree) every device starts from; without it, the default tree.
    #[arg(long)]
    tree: Option<PathBuf>,
    /// Default tree: the ServerID of its one DM account.
    #[arg(long, default_value = "dms1.operator.example")]
    server_id: String,
    /// Default tree: where the devices post their DM messages (the account's Addr).
    #[arg(long, default_value = "http://127.0.0.1:8080/dm")]
    server_addr: String,
    /// Default tree: the server's password (SRVCRED AAuthSecret).
    #[arg(
        long,
        env = "DM_SIM_SERVER_SECRET",
        default_value = "server-secret",
        hide_default_value = true,
        hide_env_values = true
    )]
    server_secret: String,
    /// Default tree: base64 of the nonce the server must use first (SRVCRED AAuthData).
    #[arg(long, default_value = "c2VydmVyLW5vbmNl")]
    server_nonce: String,
    /// Default tree: the devices' name towards the server (CLCRED AAuthName); default: the device id.
    #[arg(long)]
    client_name: Option<String>,
    /// Default tree: the devices' password (CLCRED AAuthSecret).
    #[arg(
        long,
        env = "DM_SIM_CLIENT_SECRET",
        default_value = "client-secret",
        hide_default_value = true,
        hide_env_values = true
    )]
    client_secret: String,
    /// Default tree: base64 of the nonce the devices must use first (CLCRED AAuthData).
    #[arg(long, default_value = "Y2xpZW50LW5vbmNl")]
    client_nonce: String,
    /// Create the devices, print the resident memory per idle device (from /proc/self/statm), exit.
    #[arg(long)]
    report_memory: bool,
}

/// The page size, read from the auxiliary vector (`AT_PAGESZ`), else 4096.
fn page_size() -> u64 {
    const AT_PAGESZ: u64 = 6;
    let Ok(auxv) = std::fs::read("/proc/self/auxv") else {
        return 4096;
    };
    auxv.chunks_exact(16)
        .filter_map(|pair| {
            let (key, value) = pair.split_at(8);
            let key = u64::from_ne_bytes(key.try_into().ok()?);
            let value = u64::from_ne_bytes(value.try_into().ok()?);
            (key == AT_PAGESZ).then_some(value)
        })
        .next()
        .unwrap_or(4096)
}

/// Resident memory in bytes (second field of /proc/self/statm, in pages).
fn resident_bytes() -> anyhow::Result<u64> {
    let statm =
        std::fs::read_to_string("/proc/self/statm").context("cannot read /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("unexpected /proc/self/statm")?
        .parse()
        .context("unexpected /proc/self/statm")?;
    Ok(pages * page_size())
}

/// The device ids: `--dev-id`, else the prefix followed by the device number, zero-padded to at least
/// 4 digits.
fn device_ids(cli: &Cli) -> Vec<String> {
    if let Some(id) = &cli.dev_id {
        return vec![id.clone()];
    }
    let width = cli.devices.saturating_sub(1).to_string().len().max(4);
    let prefix = &cli.id_prefix;
    (0..cli.devices)
        .map(|i| format!("{prefix}{i:0width$}"))
        .collect()
}

/// Builds the fleet's devices.
fn populate(cli: &Cli, fleet: &Fleet) -> anyhow::Result<()> {
    let ids = device_ids(cli);
    let Some(first) = ids.first() else {
        return Ok(());
    };
    fleet.reserve(ids.len());
    if let Some(path) = &cli.tree {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let doc = tnds::decode(&bytes).with_context(|| format!("{}", path.display()))?;
        let template = Device::from_tnds(first.clone(), &doc)?;
        for id in ids {
            fleet.insert(template.clone_with_id(id));
        }
        return Ok(());
    }
    for (what, nonce) in [
        ("--server-nonce", &cli.server_nonce),
        ("--client-nonce", &cli.client_nonce),
    ] {
        if decode_nonce(nonce).is_err() {
            bail!("{what} must be base64");
        }
    }
    let account = |client_name: String| DefaultAccount {
        server_id: cli.server_id.clone(),
        addr: cli.server_addr.clone(),
        server_secret: cli.server_secret.clone(),
        server_nonce_b64: cli.server_nonce.clone(),
        client_name,
        client_secret: cli.client_secret.clone(),
        client_nonce_b64: cli.client_nonce.clone(),
    };
    match &cli.client_name {
        Some(name) => {
            let template = Device::with_default_tree(first.clone(), &account(name.clone()))?;
            for id in ids {
                fleet.insert(template.clone_with_id(id));
            }
        }
        None => {
            for id in ids {
                fleet.insert(Device::with_default_tree(id.clone(), &account(id))?);
            }
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.dev_id.is_some() && cli.devices > 1 {
        bail!(
            "--dev-id simulates exactly one device: it cannot be combined with --devices {}",
            cli.devices
        );
    }
    let quirks = cli.quirks.unwrap_or_default();
    let fleet = Fleet::with_config(SessionConfig {
        quirks,
        ..SessionConfig::default()
    });
    if cli.report_memory {
        let before = resident_bytes()?;
        populate(&cli, &fleet)?;
        let after = resident_bytes()?;
        let n = fleet.len().max(1) as u64;
        let per_device = after.saturating_sub(before) / n;
        let tree_estimate = fleet
            .device_ids()
            .first()
            .and_then(|id| fleet.with_device(id, |d| d.tree().approx_heap_bytes()))
            .unwrap_or(0);
        println!("devices: {}", fleet.len());
        println!("resident before: {before} bytes, after: {after} bytes");
        println!(
            "resident per idle device: {per_device} bytes ({:.1} KiB); tree estimate: {tree_estimate} bytes",
            per_device as f64 / 1024.0
        );
        return Ok(());
    }
    populate(&cli, &fleet)?;
    let listener = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let local = listener.local_addr()?;
    let quirks = if quirks.is_empty() {
        String::new()
    } else {
        format!(", quirks {quirks}")
    };
    eprintln!(
        "dm-client-sim: {} devices{quirks}, listening on http://{local}",
        fleet.len()
    );
    fleet
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dm-client-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
