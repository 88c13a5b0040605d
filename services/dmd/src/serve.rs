//! `dmd all` and `dmd <service>`: a deployment's services from its configuration file, until SIGTERM or
//! Ctrl-C (then they drain and stop).

use anyhow::{Context, bail};
use dm_bus::Bus;
use tokio::net::TcpListener;

use crate::config::{self, FileConfig};
use crate::deployment::{self, DeploymentSpec, ProvisioningSpec};

/// One service of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Orchestrator,
    Auth,
    Gateway,
    Notification,
    Provisioning,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Orchestrator => "orchestrator",
            Service::Auth => "auth",
            Service::Gateway => "gateway",
            Service::Notification => "notification",
            Service::Provisioning => "provisioning",
        }
    }
}

fn wanted(only: Option<Service>, s: Service) -> bool {
    only.is_none_or(|o| o == s)
}

/// Builds what `only` (or every service) needs from the file; a missing table is an error only for a
/// service asked for by name.
pub async fn spec(only: Option<Service>, c: FileConfig) -> anyhow::Result<DeploymentSpec> {
    let required = |present: bool, s: Service, table: &str| -> anyhow::Result<()> {
        if !present && only == Some(s) {
            bail!(
                "`dmd {}` needs the [{table}] table in the configuration",
                s.name()
            );
        }
        Ok(())
    };
    required(c.auth.is_some(), Service::Auth, "auth")?;
    required(c.gateway.is_some(), Service::Gateway, "gateway")?;
    required(c.acceptance.is_some(), Service::Notification, "acceptance")?;
    required(
        c.provisioning.is_some(),
        Service::Provisioning,
        "provisioning",
    )?;
    let admin = match (&c.admin, wanted(only, Service::Orchestrator)) {
        (Some(a), true) => Some((
            TcpListener::bind(a.listen)
                .await
                .with_context(|| format!("[admin] listen {}", a.listen))?,
            dm_protocol::dmacc::Secret::new(a.token.clone()),
        )),
        _ => None,
    };
    // Device credentials are sealed with the deployment's master key, the one auth has.
    let master_key = c
        .auth
        .as_ref()
        .map(|a| a.master_key.clone())
        .unwrap_or_else(dm_auth::MasterKey::random);
    let provisioning = match (c.provisioning, wanted(only, Service::Provisioning)) {
        (Some(p), true) => Some(ProvisioningSpec {
            config: dm_provisioning::Config {
                session_timeout: p.session_timeout,
                command_ack_wait: p.command_ack_wait,
                limits: p.limits,
                ..dm_provisioning::Config::new(&c.server_id, p.public_url)
            },
            listener: TcpListener::bind(p.listen)
                .await
                .with_context(|| format!("[provisioning] listen {}", p.listen))?,
            push_url: p.push_url,
            devices: p.devices,
            master_key,
        }),
        _ => None,
    };
    Ok(DeploymentSpec {
        name: c.name,
        server_id: c.server_id,
        saga: wanted(only, Service::Orchestrator).then(|| c.orchestrator.saga.clone()),
        orchestrator_ack_wait: c.orchestrator.ack_wait,
        admin,
        admin_tls: c.admin.as_ref().and_then(|a| a.tls.clone()),
        // The admin API seals devices added through it with the same key (none: no device calls).
        inventory_key: c.auth.as_ref().map(|a| a.master_key.clone()),
        auth: c.auth.filter(|_| wanted(only, Service::Auth)),
        gateway: c
            .gateway
            .filter(|_| wanted(only, Service::Gateway))
            .map(|g| (g, None)),
        acceptance: c.acceptance.filter(|_| wanted(only, Service::Notification)),
        provisioning,
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `/livez` (the process runs) and `/readyz` (every service started and not stopping), for probes, and
/// `/metrics`: the process's Prometheus metrics (docs/operations.md, "Metrics").
pub async fn serve_health(
    listener: TcpListener,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/livez", get(|| async { StatusCode::OK }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    if ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, dm_metrics::CONTENT_TYPE)],
                    dm_metrics::encode(),
                )
            }),
        );
    axum::serve(listener, app).await.context("health endpoint")
}

/// NATS URLs (one, or several separated by commas) as they may be printed: `nats://user:pass@host`
/// shows as `nats://…@host`.
pub fn without_credentials(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}…{}", &url[..scheme + 3], &url[at..])
            }
            _ => url.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// How the NATS connection is protected, for the summary lines: ` (TLS, client certificate, nkey)`;
/// nothing when nothing is asked. Names kinds, never values.
pub fn nats_protection(s: &dm_bus::NatsSecurity) -> String {
    let mut parts = Vec::new();
    if s.require_tls {
        parts.push("TLS");
    }
    if s.client_cert.is_some() {
        parts.push("client certificate");
    }
    parts.push(match &s.credentials {
        None => "",
        Some(dm_bus::NatsCredentials::CredsFile(_)) => "creds file",
        Some(dm_bus::NatsCredentials::NkeySeed(_)) => "nkey",
        Some(dm_bus::NatsCredentials::Token(_)) => "token",
        Some(dm_bus::NatsCredentials::UserPassword { .. }) => "user and password",
    });
    parts.retain(|p| !p.is_empty());
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// Runs until a signal (then drains) or until a service fails.
pub async fn run(only: Option<Service>, text: &str, file: &std::path::Path) -> anyhow::Result<()> {
    let c = config::parse(text, &config::ProcessEnvironment::for_file(file))
        .map_err(|e| anyhow::anyhow!("configuration, {e}"))?;
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(addr) = c.health {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("[health] listen {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "health endpoints listening");
        tokio::spawn(serve_health(listener, ready.clone()));
    }
    let health = c.health;
    let bus_shown = c.nats_url.as_deref().map_or_else(
        || "in-process".to_string(),
        |url| without_credentials(url) + &nats_protection(&c.nats_security),
    );
    let bus = match (&c.nats_url, only) {
        (Some(url), _) => Bus::connect_with(
            url,
            dm_bus::BusOptions {
                replicas: c.nats_replicas,
                security: c.nats_security.clone(),
            },
        )
        .await
        .with_context(|| format!("cannot connect to NATS at {}", without_credentials(url)))?,
        (None, None) => {
            eprintln!(
                "WARNING: no [deployment] nats_url: running on the in-process bus. Nothing is kept across a \
                 restart; devices changed by a delegation in flight would be left as they are. For trying, not for keeping."
            );
            Bus::in_process()
        }
        (None, Some(s)) => bail!(
            "`dmd {}` alone needs [deployment] nats_url; `dmd all` runs every service in one process",
            s.name()
        ),
    };
    let spec = spec(only, c).await?;
    let services = [
        (Service::Orchestrator, spec.saga.is_some()),
        (Service::Auth, spec.auth.is_some()),
        (Service::Gateway, spec.gateway.is_some()),
        (Service::Notification, spec.acceptance.is_some()),
        (Service::Provisioning, spec.provisioning.is_some()),
    ]
    .into_iter()
    .filter_map(|(s, on)| on.then_some(s.name()))
    .collect::<Vec<_>>()
    .join(",");
    let shown =
        |addr: Option<std::net::SocketAddr>| addr.map_or_else(|| "-".into(), |a| a.to_string());
    let admin = shown(spec.admin.as_ref().and_then(|(l, _)| l.local_addr().ok()));
    let devices = shown(
        spec.provisioning
            .as_ref()
            .and_then(|p| p.listener.local_addr().ok()),
    );
    let mut running = deployment::start(spec, bus).await?;
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    // What this process serves, in one line (issue 11: the default level says so).
    tracing::info!(
        deployment = %running.name,
        server_id = %running.server_id,
        services = %services,
        peer_endpoint = %shown(running.gateway_addr),
        device_endpoint = %devices,
        admin_api = %admin,
        health = %shown(health),
        bus = %bus_shown,
        "serving"
    );
    let ended = tokio::select! {
        _ = shutdown_signal() => None,
        ended = running.failed() => Some(ended),
    };
    ready.store(false, std::sync::atomic::Ordering::SeqCst);
    match ended {
        None => {
            tracing::info!("stopping");
            running.stop().await
        }
        // One service ended by itself: stop the others in order too, and say why.
        Some(ended) => {
            let stopped = running.stop().await;
            ended.and_then(|()| Err(anyhow::anyhow!("a service stopped unexpectedly")))?;
            stopped
        }
    }
}
