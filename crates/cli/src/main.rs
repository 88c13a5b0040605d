//! `dmdctl`: the operator's command line over the admin API (gRPC) of a deployment.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use dm_proto::admin::v1::admin_client::AdminClient;
use dm_proto::admin::v1::{DelegationId, ListDelegationsRequest, StartDelegationRequest};
use dm_proto::saga::v1::{DelType, DelegationState, Device, Role};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(
    name = "dmdctl",
    version,
    about = "Operate delegations of a DM Server deployment"
)]
struct Cli {
    /// The admin API of the deployment.
    #[arg(long, env = "DMD_ADMIN_URL", default_value = "http://127.0.0.1:7443")]
    endpoint: String,
    /// The operator token.
    #[arg(long, env = "DMD_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
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
    },
    /// Show one delegation.
    Get { peer: String, session: String },
    /// List delegations (of one device).
    List {
        #[arg(long)]
        device: Option<String>,
    },
    /// Follow a delegation until it ends.
    Watch { peer: String, session: String },
    /// Take authority back (delegating side).
    Revoke { peer: String, session: String },
    /// Hand authority back (delegated side).
    Release { peer: String, session: String },
}

fn line(s: &DelegationState) -> String {
    format!(
        "{} {} {:?} {:?} {} device={} scope={}{}",
        s.peer_server_id,
        s.session_id,
        s.role(),
        s.del_type(),
        s.phase().as_str_name().trim_start_matches("PHASE_"),
        s.device.as_ref().map(|d| d.dev_id.as_str()).unwrap_or("-"),
        s.scope.join(","),
        s.fault
            .as_ref()
            .map(|f| format!(" fault={} step {}: {}", f.status_code, f.step, f.reason))
            .unwrap_or_default()
    )
}

fn authorized<T>(token: &str, body: T) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(body);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("the token is not valid header text")?,
    );
    Ok(r)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let channel = Channel::from_shared(cli.endpoint.clone())
        .context("the endpoint is not a URL")?
        .connect()
        .await
        .with_context(|| format!("cannot reach the admin API at {}", cli.endpoint))?;
    let mut client = AdminClient::new(channel);
    let t = cli.token.as_str();
    let id = |peer: String, session: String| DelegationId {
        peer_server_id: peer,
        session_id: session,
    };
    match cli.command {
        Command::Start {
            role,
            peer,
            device,
            del_type,
            scope,
            not_after_ms,
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
            let state = client
                .start_delegation(authorized(t, r)?)
                .await?
                .into_inner()
                .state;
            if let Some(s) = state {
                println!("{}", line(&s));
            }
        }
        Command::Get { peer, session } => {
            if let Some(s) = client
                .get_delegation(authorized(t, id(peer, session))?)
                .await?
                .into_inner()
                .state
            {
                println!("{}", line(&s));
            }
        }
        Command::List { device } => {
            let r = ListDelegationsRequest {
                dev_id: device.unwrap_or_default(),
            };
            for s in client
                .list_delegations(authorized(t, r)?)
                .await?
                .into_inner()
                .delegations
            {
                println!("{}", line(&s));
            }
        }
        Command::Watch { peer, session } => {
            let mut stream = client
                .watch_delegation(authorized(t, id(peer, session))?)
                .await?
                .into_inner();
            while let Some(reply) = stream.next().await {
                if let Some(s) = reply?.state {
                    println!("{}", line(&s));
                }
            }
        }
        Command::Revoke { peer, session } => {
            if let Some(s) = client
                .revoke_delegation(authorized(t, id(peer, session))?)
                .await?
                .into_inner()
                .state
            {
                println!("{}", line(&s));
            }
        }
        Command::Release { peer, session } => {
            if let Some(s) = client
                .release_delegation(authorized(t, id(peer, session))?)
                .await?
                .into_inner()
                .state
            {
                println!("{}", line(&s));
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("dmdctl: {}", status.message()),
                None => eprintln!("dmdctl: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
