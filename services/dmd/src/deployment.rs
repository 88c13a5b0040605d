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

/// Everything one deployment needs; a service whose part is `None` is not started here (it runs in
/// another process on the same NATS bus).
#[derive(Debug)]
pub struct DeploymentSpec {
    pub name: String,
    pub server_id: String,
    /// The orchestrator's deadlines; `None`: no orchestrator here.
    pub saga: Option<dm_saga::Config>,
    /// How long an event may stay unsettled with the orchestrator before it is delivered again.
    pub orchestrator_ack_wait: Duration,
    /// The operator API (needs the orchestrator): where it listens and the token it requires.
    pub admin: Option<(TcpListener, dm_protocol::dmacc::Secret)>,
    /// TLS of the operator API (`None`: in clear, which the configuration allows on loopback only).
    pub admin_tls: Option<crate::config::AdminTls>,
    /// The master key the admin API seals device credentials with before it stores them (the one
    /// provisioning opens them with); `None`: the admin API serves no device calls.
    pub inventory_key: Option<dm_auth::MasterKey>,
    pub auth: Option<dm_auth::Config>,
    /// The gateway, on a listener the caller bound (port 0 in demos and tests) or on its configured address.
    pub gateway: Option<(dm_gateway::Config, Option<TcpListener>)>,
    pub acceptance: Option<AcceptancePolicy>,
    pub provisioning: Option<ProvisioningSpec>,
}

/// The provisioning service's part.
#[derive(Debug)]
pub struct ProvisioningSpec {
    pub config: dm_provisioning::Config,
    pub listener: TcpListener,
    /// Where package #0 notifications are pushed (the simulated fleet, or a push gateway).
    pub push_url: String,
    /// The devices this server manages and their credentials: they seed the device store (credentials
    /// stored since, rotated secrets and nonces, win).
    pub devices: Vec<(String, dm_provisioning::DeviceCredentials)>,
    /// Seals the devices' credentials at rest (the deployment's master key).
    pub master_key: dm_auth::MasterKey,
}

/// A running deployment. Dropping it does not stop it; call [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    pub name: String,
    pub server_id: String,
    pub orchestrator: Option<Orchestrator>,
    pub provisioning: Option<Provisioning>,
    pub gateway_addr: Option<std::net::SocketAddr>,
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

/// Waits until someone answers on `subject` (an empty request gets a refusal, which is enough).
async fn wait_until_answered(bus: &Bus, subject: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let answer = bus
            .request(
                subject,
                dm_bus::Headers::new(),
                bytes::Bytes::new(),
                Duration::from_secs(2),
            )
            .await;
        match answer {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(anyhow::anyhow!("{subject} is not answered: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Starts the services of one deployment on `bus`.
pub async fn start(spec: DeploymentSpec, bus: Bus) -> anyhow::Result<Running> {
    let names = Names::new(&spec.name).context("deployment name")?;
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let mut orchestrator = None;
    if let Some(saga) = spec.saga {
        let o = Orchestrator::new(
            dm_orchestrator::Config {
                names: names.clone(),
                server_id: spec.server_id.clone(),
                saga,
                ack_wait: spec.orchestrator_ack_wait,
            },
            bus.clone(),
        )
        .await
        .context("orchestrator")?;
        let runner = o.clone();
        let s = stopped(stop_rx.clone());
        tasks.spawn(async move { runner.run(s).await.context("orchestrator") });
        if let Some((listener, token)) = spec.admin {
            let inventory = match spec.inventory_key {
                Some(key) => Some(Arc::new(
                    crate::inventory::DeviceInventory::open(&bus, &names, key)
                        .await
                        .context("device inventory")?,
                )
                    as Arc<dyn dm_orchestrator::admin::Inventory>),
                None => None,
            };
            let svc = dm_orchestrator::admin::server_with_inventory(
                o.clone(),
                token.expose().to_string(),
                inventory,
            );
            let s = stopped(stop_rx.clone());
            let mut server = tonic::transport::Server::builder();
            if let Some(tls) = &spec.admin_tls {
                server = server.tls_config(admin_tls(tls)?).context("[admin] TLS")?;
            }
            tasks.spawn(async move {
                server
                    .add_service(svc)
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        s,
                    )
                    .await
                    .context("admin API")
            });
        }
        orchestrator = Some(o);
    }

    let auth_started = spec.auth.is_some();
    if let Some(auth) = spec.auth {
        let b = bus.clone();
        let s = stopped(stop_rx.clone());
        tasks.spawn(async move { dm_auth::run(auth, b, s).await.context("auth") });
    }
    if let Some(policy) = spec.acceptance {
        let b = bus.clone();
        let n = names.clone();
        let s = stopped(stop_rx.clone());
        tasks.spawn(async move {
            dm_notification::acceptance::run(policy, b, n, s)
                .await
                .context("notification")
        });
    }

    let mut provisioning = None;
    if let Some(p) = spec.provisioning {
        let channel: Arc<dyn Package0Channel> = Arc::new(HttpPushChannel::new(p.push_url));
        let (service, outcomes) = Provisioning::new(p.config, channel);
        // Snapshots outlive this process (ARCHITECTURE rule 1).
        let store = bus
            .kv(&names.bucket("snapshots")?, 1)
            .await
            .context("snapshot bucket")?;
        let devices = bus
            .kv(&names.bucket("devices")?, 1)
            .await
            .context("device bucket")?;
        let service = service
            .with_snapshot_store(store)
            .with_bus_key(p.master_key.bus_key())
            .with_device_store(devices, p.master_key)
            // Replicas share the device channel: a device may post to any of them.
            .with_forwarding(bus.clone(), names.clone())
            .await
            .context("device channel forwarding")?;
        // The devices' nonces and secrets outlive this process (a restart must not lose them).
        let loaded = service.load_devices().await.context("device bucket")?;
        tracing::info!(devices = loaded, "device credentials loaded");
        for (dev_id, creds) in p.devices {
            service
                .seed_device(&dev_id, creds)
                .await
                .context("device bucket")?;
        }
        {
            let endpoint = service.clone();
            let s = stopped(stop_rx.clone());
            let listener = p.listener;
            tasks.spawn(async move {
                endpoint
                    .serve(listener, s)
                    .await
                    .context("provisioning endpoint")
            });
        }
        {
            let worker = service.clone();
            let b = bus.clone();
            let n = names.clone();
            let s = stopped(stop_rx.clone());
            tasks.spawn(async move {
                dm_provisioning::service::run(worker, outcomes, b, n, s)
                    .await
                    .context("provisioning")
            });
        }
        provisioning = Some(service);
    }

    let mut gateway_addr = None;
    if let Some((config, listener)) = spec.gateway {
        let gateway = match listener {
            Some(listener) => dm_gateway::Gateway::bind_on(config, bus.clone(), listener).await,
            None => dm_gateway::Gateway::bind(config, bus.clone()).await,
        }
        .context("gateway")?;
        gateway_addr = Some(gateway.local_addr());
        let s = stopped(stop_rx.clone());
        tasks.spawn(async move { gateway.serve(s).await.context("gateway") });
    }

    // Ready when the request handlers answer: a peer's first message then gets a decision, not a 503.
    let mut probes = Vec::new();
    if orchestrator.is_some() {
        probes.push(names.subject(dm_bus::Area::Req, "orchestrator.peer")?);
    }
    if auth_started {
        probes.push(names.subject(dm_bus::Area::Req, "auth.identity")?);
    }
    for subject in probes {
        wait_until_answered(&bus, &subject).await?;
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
    /// The orchestrator, when this process runs it.
    pub fn orchestrator(&self) -> anyhow::Result<&Orchestrator> {
        self.orchestrator
            .as_ref()
            .context("the orchestrator does not run in this process")
    }

    /// The provisioning service, when this process runs it.
    pub fn provisioning(&self) -> anyhow::Result<&Provisioning> {
        self.provisioning
            .as_ref()
            .context("the provisioning service does not run in this process")
    }

    /// A deployment with nothing running (a placeholder while one is restarted).
    pub fn stopped(name: &str, server_id: &str) -> Self {
        Self {
            name: name.to_string(),
            server_id: server_id.to_string(),
            orchestrator: None,
            provisioning: None,
            gateway_addr: None,
            stop: watch::channel(true).0,
            tasks: JoinSet::new(),
        }
    }

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

/// The admin listener's TLS: its certificate, and with a client CA, client certificates verified against
/// it but optional (a caller without one must then bring the token; the API refuses it otherwise).
fn admin_tls(tls: &crate::config::AdminTls) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    // rustls's provider is ring, as everywhere (STACK.md).
    dm_gateway::install_crypto_provider();
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("[admin] cannot read {}", path.display()))
    };
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    if let Some(ca) = &tls.client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(read(ca)?))
            .client_auth_optional(true);
    }
    Ok(config)
}
