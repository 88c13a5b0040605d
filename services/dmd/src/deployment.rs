//! One deployment (one DM Server): the five services started on one bus, in this process. `dmd all`,
//! `dmd demo` and the end-to-end tests build their deployments here, so that they run the same code.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dm_bus::{Bus, Names};
use dm_notification::policy::AcceptancePolicy;
use dm_notification::{HttpPushChannel, Package0Channel};
use dm_orchestrator::Orchestrator;
use dm_provisioning::Provisioning;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Everything one deployment needs.
#[derive(Debug)]
pub struct DeploymentSpec {
    pub name: String,
    pub server_id: String,
    pub auth: dm_auth::Config,
    pub gateway: dm_gateway::Config,
    /// Bound by the caller (port 0 in demos and tests), or `None` to bind the configured address.
    pub gateway_listener: Option<TcpListener>,
    pub acceptance: AcceptancePolicy,
    pub provisioning: dm_provisioning::Config,
    pub provisioning_listener: TcpListener,
    /// Where package #0 notifications are pushed (the simulated fleet, or a push gateway).
    pub push_url: String,
    pub saga: dm_saga::Config,
    /// The operator API: where it listens and the token it requires.
    pub admin: Option<(TcpListener, String)>,
}

/// A running deployment. Dropping it does not stop it; call [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    pub name: String,
    pub server_id: String,
    pub orchestrator: Orchestrator,
    pub provisioning: Provisioning,
    pub gateway_addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    tasks: JoinSet<anyhow::Result<()>>,
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Starts the services of one deployment on `bus`.
pub async fn start(spec: DeploymentSpec, bus: Bus) -> anyhow::Result<Running> {
    let names = Names::new(&spec.name).context("deployment name")?;
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let orchestrator = Orchestrator::new(
        dm_orchestrator::Config {
            names: names.clone(),
            server_id: spec.server_id.clone(),
            saga: spec.saga.clone(),
            ack_wait: Duration::from_secs(30),
        },
        bus.clone(),
    )
    .await
    .context("orchestrator")?;
    {
        let o = orchestrator.clone();
        let s = stopped(stop_rx.clone());
        tasks.spawn(async move { o.run(s).await.context("orchestrator") });
    }
    if let Some((listener, token)) = spec.admin {
        let svc = dm_orchestrator::admin::server(orchestrator.clone(), token);
        let s = stopped(stop_rx.clone());
        tasks.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    s,
                )
                .await
                .context("admin API")
        });
    }

    {
        let b = bus.clone();
        let s = stopped(stop_rx.clone());
        let auth = spec.auth;
        tasks.spawn(async move { dm_auth::run(auth, b, s).await.context("auth") });
    }
    {
        let b = bus.clone();
        let n = names.clone();
        let s = stopped(stop_rx.clone());
        let policy = spec.acceptance;
        tasks.spawn(async move {
            dm_notification::acceptance::run(policy, b, n, s)
                .await
                .context("notification")
        });
    }

    let channel: Arc<dyn Package0Channel> = Arc::new(HttpPushChannel::new(spec.push_url));
    let (provisioning, outcomes) = Provisioning::new(spec.provisioning, channel);
    {
        let p = provisioning.clone();
        let s = stopped(stop_rx.clone());
        let listener = spec.provisioning_listener;
        tasks.spawn(async move { p.serve(listener, s).await.context("provisioning endpoint") });
    }
    {
        let p = provisioning.clone();
        let b = bus.clone();
        let n = names.clone();
        let s = stopped(stop_rx.clone());
        tasks.spawn(async move {
            dm_provisioning::service::run(p, outcomes, b, n, s)
                .await
                .context("provisioning")
        });
    }

    let gateway = match spec.gateway_listener {
        Some(listener) => dm_gateway::Gateway::bind_on(spec.gateway, bus.clone(), listener).await,
        None => dm_gateway::Gateway::bind(spec.gateway, bus.clone()).await,
    }
    .context("gateway")?;
    let gateway_addr = gateway.local_addr();
    {
        let s = stopped(stop_rx.clone());
        tasks.spawn(async move { gateway.serve(s).await.context("gateway") });
    }

    Ok(Running {
        name: spec.name,
        server_id: spec.server_id,
        orchestrator,
        provisioning,
        gateway_addr,
        stop,
        tasks,
    })
}

impl Running {
    /// Asks every service to stop and waits for them; the first error, if any.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let mut first = Ok(());
        while let Some(done) = self.tasks.join_next().await {
            let result = done.map_err(anyhow::Error::from).and_then(|r| r);
            if first.is_ok() {
                first = result;
            }
        }
        first
    }

    /// Waits until a service ends by itself (an error, usually), or forever.
    pub async fn failed(&mut self) -> anyhow::Result<()> {
        match self.tasks.join_next().await {
            Some(done) => done.map_err(anyhow::Error::from).and_then(|r| r),
            None => std::future::pending().await,
        }
    }
}
