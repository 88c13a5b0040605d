//! The gateway: this DM Server's face to its peers (ARCHITECTURE.md, PROTOCOL.md A.2).
//!
//! - **Inbound**: an HTTPS endpoint with mutual TLS. The handshake accepts a client certificate that chains
//!   to a configured CA or whose SubjectPublicKeyInfo SHA-256 is pinned, and nothing else. Each request is
//!   checked in the order of A.2 — 415 content type, 405 method, 413 size, 400 decoding, 403 identity (asked
//!   of auth on `req.auth.identity`) — then the secret-free message goes to the orchestrator
//!   (`req.orchestrator.peer`) with the secret of DELEGATION_START (the account, as TNDS) or
//!   DELEGATION_PREPARED (the TEMP_DELEGATION_KEY) sealed for auth with the bus key (the orchestrator
//!   lodges it with auth only if its decision accepts the message), and its answer — given after the
//!   decision was committed — is the HTTP answer (202, or the status with a `<DelegationError>` body:
//!   duplicates get the first answer, 404, 409, …). 503 when auth or the orchestrator do not answer in time.
//! - **Outbound**: the saga's `Send` commands (`cmd.gateway.send`) become messages POSTed to the peer with
//!   this server's client certificate; secrets are fetched from auth at send time, sealed with the bus key; network errors and 503
//!   are retried with exponential back-off and the same MsgID until the send deadline; per delegation a
//!   message goes out only after the previous one got its final answer. Connections to a peer are pooled
//!   (HTTP/1.1 keep-alive; each new one does the full mutual-TLS handshake), and the inbound endpoint
//!   keeps them open until they idle past `timeouts.read`.
//!
//! Nothing secret travels the bus in clear, and no key, account secret or private key reaches a log, an error or a
//! `Debug` output (ARCHITECTURE rule 7).
//!
//! - **Guards** (`guard.rs`): a message whose `Timestamp` is outside `timestamp_window_secs` of this
//!   server's clock is a 400 (after the identity check, before anything of it is kept); past a peer's
//!   rate or in-progress limit (`[peer.limits]`) the answer is 503 with `Retry-After`, before any bus
//!   request. The sender stamps every attempt with the time it goes out and honours a `Retry-After`.
//!
//! Configuration (TOML, [`Config::from_toml`]); times in milliseconds; `path`, `max_body_bytes`,
//! `timestamp_window_secs`, `[[peer]]` and `[timeouts]` are optional (`gateway.example.toml` in this crate):
//!
//! ```toml
#![doc = include_str!("../gateway.example.toml")]
//! ```

mod ask;
mod config;
mod convert;
#[doc(hidden)]
pub mod fuzzing;
mod guard;
mod inbound;
mod outbound;
mod pool;
mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dm_bus::{Area, Bus, BusError, Names};
use rustls::pki_types::ServerName;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub use ask::{TRACE_HEADERS, TYPE_HEADER, VERSION_HEADER};
pub use config::{
    Config, ConfigError, DEFAULT_MAX_BODY_BYTES, DEFAULT_PATH, Peer, RawTimeouts, Timeouts,
    TlsFiles, Trust, TrustedCa, window_of_secs,
};
pub use convert::{SERVER_CRED_AUTH_TYPE, peer_message};
pub use guard::{DEFAULT_TIMESTAMP_WINDOW, PeerLimits};
pub use tls::{PeerIdentity, install_crypto_provider, spki_sha256_hex};

use config::Endpoint;
use inbound::Inbound;
use outbound::{Outbound, PeerTarget};

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the outbound sender stopped: {0}")]
    Outbound(String),
}

/// A gateway whose configuration was checked and whose listener is bound; [`Gateway::serve`] runs it.
pub struct Gateway {
    listener: TcpListener,
    local_addr: SocketAddr,
    acceptor: TlsAcceptor,
    verifier: Arc<tls::TrustVerifier>,
    inbound: Arc<Inbound>,
    outbound: Arc<Outbound>,
    drain: Duration,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("local_addr", &self.local_addr)
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Checks the configuration and every file it names, prepares the bus, then binds the listener.
    pub async fn bind(config: Config, bus: Bus) -> Result<Gateway, GatewayError> {
        Self::bind_with(config, bus, None).await
    }

    /// Like [`Gateway::bind`], on a listener the caller bound already: `dmd demo` and tests bind port 0
    /// first, to write the peers' endpoints into each other's configuration.
    pub async fn bind_on(
        config: Config,
        bus: Bus,
        listener: TcpListener,
    ) -> Result<Gateway, GatewayError> {
        Self::bind_with(config, bus, Some(listener)).await
    }

    async fn bind_with(
        config: Config,
        bus: Bus,
        bound: Option<TcpListener>,
    ) -> Result<Gateway, GatewayError> {
        install_crypto_provider();
        config.validate()?;
        let bus_key = config.bus_key.clone().ok_or_else(|| {
            ConfigError::invalid(
                "bus_key",
                "the gateway needs the deployment's master key ([auth] master_key_file or \
                 master_key_env): secrets cross the bus sealed with a key derived from it",
            )
        })?;
        let names = Names::new(&config.deployment)
            .map_err(|e| ConfigError::invalid("deployment", e.to_string()))?;
        let material = tls::load(&config)?;
        let mut connectors: HashMap<String, Arc<rustls::ClientConfig>> =
            material.clients.into_iter().collect();
        let mut peers = HashMap::new();
        for (i, peer) in config.peers.iter().enumerate() {
            let endpoint = Endpoint::parse(&peer.endpoint)
                .map_err(|reason| ConfigError::invalid(format!("peer[{i}].endpoint"), reason))?;
            let server_name = ServerName::try_from(endpoint.host.clone()).map_err(|_| {
                ConfigError::invalid(
                    format!("peer[{i}].endpoint"),
                    format!(
                        "'{}' is neither a DNS name nor an IP address",
                        endpoint.host
                    ),
                )
            })?;
            let client = connectors.remove(&peer.server_id).ok_or_else(|| {
                ConfigError::invalid(format!("peer[{i}]"), "has no TLS client configuration")
            })?;
            peers.insert(
                peer.server_id.clone(),
                PeerTarget {
                    endpoint,
                    server_name,
                    connector: TlsConnector::from(client),
                    pool: pool::Pool::default(),
                },
            );
        }
        bus.ensure_work_queue(&names.work_queue(Area::Cmd)).await?;
        let inbound = Inbound::new(
            bus.clone(),
            &names,
            config.path.clone(),
            config.max_body_bytes,
            config.timeouts,
        )?
        .with_guard(guard::Guard::new(&config))
        .with_bus_key(bus_key.clone());
        let outbound = Outbound {
            sent: bus.kv(&names.bucket("sent")?, 1).await?,
            sent_here: Default::default(),
            fetch_subject: names.subject(Area::Req, "auth.fetch")?,
            bus_key,
            bus,
            names,
            server_id: config.server_id.clone(),
            peers,
            timeouts: config.timeouts,
        };
        let listener = match bound {
            Some(listener) => listener,
            None => {
                TcpListener::bind(config.listen)
                    .await
                    .map_err(|source| GatewayError::Bind {
                        addr: config.listen,
                        source,
                    })?
            }
        };
        let local_addr = listener.local_addr().map_err(|source| GatewayError::Bind {
            addr: config.listen,
            source,
        })?;
        tracing::info!(%local_addr, path = %config.path, server_id = %config.server_id, "gateway listening");
        Ok(Gateway {
            listener,
            local_addr,
            acceptor: TlsAcceptor::from(material.server),
            verifier: material.verifier,
            inbound: Arc::new(inbound),
            outbound: Arc::new(outbound),
            drain: config.timeouts.drain,
        })
    }

    /// The address the endpoint listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves inbound connections and outbound commands until `shutdown`; then stops accepting, lets open
    /// requests finish for the drain time, and leaves unfinished sends unacknowledged (they are delivered
    /// again and sent with the same MsgID).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), GatewayError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut outbound = tokio::spawn(self.outbound.clone().run(stop_rx.clone()));
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        let mut failure = None;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, remote)) => {
                        let _ = tcp.set_nodelay(true);
                        connections.spawn(self.inbound.clone().connection(
                            tcp,
                            remote,
                            self.acceptor.clone(),
                            self.verifier.clone(),
                            stop_rx.clone(),
                        ));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                ended = &mut outbound => {
                    failure = Some(match ended {
                        Ok(Ok(())) => GatewayError::Outbound("the command stream ended".into()),
                        Ok(Err(e)) => GatewayError::Bus(e),
                        Err(e) => GatewayError::Outbound(e.to_string()),
                    });
                    break;
                }
            }
        }
        let _ = stop_tx.send(true);
        drop(self.listener);
        let drained = tokio::time::timeout(self.drain, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            connections.abort_all();
        }
        if failure.is_none() {
            match tokio::time::timeout(self.drain, &mut outbound).await {
                Ok(Ok(Err(e))) => failure = Some(GatewayError::Bus(e)),
                Ok(_) => {}
                Err(_) => outbound.abort(),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Resolves once `rx` says stop (or its sender is gone). Holds no borrow across an await, so the futures
/// that wait on it stay `Send`.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Runs a gateway until `shutdown`: [`Gateway::bind`] (which fails with a clear message on any bad
/// setting or file, before anything listens), then [`Gateway::serve`].
pub async fn run(
    config: Config,
    bus: Bus,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    Gateway::bind(config, bus).await?.serve(shutdown).await
}
