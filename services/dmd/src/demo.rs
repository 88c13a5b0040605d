//! `dmd demo`: two DM Servers (DMS-1 and DMS-2, every service of each) and a small simulated fleet, in one
//! process on the in-process bus, with real HTTPS and mutual TLS between the gateways and real DM sessions
//! with the devices. It runs a delegation of each type with both initiators, one revocation, one refused
//! revocation (Final), one expiry and one refused request, prints the steps as they happen, and succeeds
//! only if every outcome is the expected one. Nothing is kept: it is always ephemeral.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dm_auth::{Peer as AuthPeer, PeerIdentity, PeerPolicy, TrustRegistry};
use dm_bus::{Bus, Names};
use dm_client::{DefaultAccount, Device, Fleet, SessionConfig};
use dm_notification::policy::{AcceptancePolicy, PeerPolicy as AcceptPeer};
use dm_protocol::auth;
use dm_protocol::delegation::DelType as WireDelType;
use dm_protocol::types::{DmUri, Uuid};
use dm_provisioning::DeviceCredentials;
use dm_saga::pb::{self, DelType, Phase, Role, event};
use tokio::net::TcpListener;

use crate::deployment::{self, DeploymentSpec, ProvisioningSpec, Running};
use crate::pki;

pub const D1: &str = "dms1.operator.example";
pub const D2: &str = "dms2.enterprise.example";
const CA_NAME: &str = "demo-ca";

/// What the demo is asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long to wait for any one outcome.
    pub step_timeout: Duration,
    /// How far ahead the Temporary delegation ends.
    pub temporary_for: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            step_timeout: Duration::from_secs(
                std::env::var("DMD_DEMO_STEP_SECS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(30),
            ),
            temporary_for: Duration::from_secs(6),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

fn all_types() -> Vec<WireDelType> {
    vec![
        WireDelType::Partial,
        WireDelType::Full,
        WireDelType::Final,
        WireDelType::Temporary,
    ]
}

/// The two deployments and the fleet, on one bus.
pub struct World {
    pub dms1: Running,
    pub dms2: Running,
    pub fleet: Fleet,
    started: Instant,
    /// What it takes to start a side again where it was (same addresses, same keys).
    pki: pki::Pki,
    bus: Bus,
    push_url: String,
    sides: [SideAt; 2],
}

/// Where one side listens and what it keeps its secrets with, across restarts.
#[derive(Debug, Clone)]
struct SideAt {
    gateway: std::net::SocketAddr,
    provisioning: std::net::SocketAddr,
    peer_endpoint: String,
    master_key: dm_auth::MasterKey,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World").finish_non_exhaustive()
    }
}

async fn bind() -> anyhow::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback port")
}

/// Where one side listens, and what it knows of the other.
struct SideSpec<'a> {
    name: &'a str,
    me: &'a str,
    peer: &'a str,
    peer_endpoint: &'a str,
    gateway_listener: TcpListener,
    provisioning_listener: TcpListener,
    master_key: dm_auth::MasterKey,
}

fn spec(side: SideSpec<'_>, pki: &pki::Pki, push_url: &str) -> anyhow::Result<DeploymentSpec> {
    let SideSpec {
        name,
        me,
        peer,
        peer_endpoint,
        gateway_listener,
        provisioning_listener,
        master_key,
    } = side;
    let names = Names::new(name)?;
    let provisioning_url = format!("http://{}/dm", provisioning_listener.local_addr()?);
    let registry = TrustRegistry::new(
        me,
        vec![AuthPeer {
            server_id: peer.to_string(),
            endpoint: peer_endpoint.to_string(),
            identity: PeerIdentity::CaSan {
                ca: CA_NAME.to_string(),
                subject_alt_name: peer.to_string(),
            },
            policy: PeerPolicy {
                allowed_types: all_types(),
                allowed_scopes: vec![DmUri::root()],
                max_temporary: Some(Duration::from_secs(86_400)),
            },
        }],
    )?;
    let mut auth = dm_auth::Config::new(names, registry, provisioning_url.clone())?;
    auth.master_key = master_key;
    let files = pki.files(me).context("certificates")?;
    let gateway_config = dm_gateway::Config {
        deployment: name.to_string(),
        server_id: me.to_string(),
        listen: gateway_listener.local_addr()?,
        path: dm_gateway::DEFAULT_PATH.to_string(),
        max_body_bytes: dm_gateway::DEFAULT_MAX_BODY_BYTES,
        timestamp_window: Some(dm_gateway::DEFAULT_TIMESTAMP_WINDOW),
        tls: dm_gateway::TlsFiles {
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        trust: dm_gateway::Trust {
            cas: vec![dm_gateway::TrustedCa {
                name: Some(CA_NAME.to_string()),
                pem: pki.ca_cert.clone(),
            }],
            pins: Vec::new(),
        },
        peers: vec![dm_gateway::Peer {
            server_id: peer.to_string(),
            endpoint: peer_endpoint.to_string(),
            ca: pki.ca_cert.clone(),
            limits: dm_gateway::PeerLimits::default(),
        }],
        // Shorter than a deployment's defaults (5 min to send, 6 min before a lost delivery comes
        // back): a send command handed out by a NATS node that dies is taken up again within a minute,
        // which the end-to-end tests of node loss wait for.
        timeouts: dm_gateway::Timeouts {
            send_deadline: Duration::from_secs(45),
            ack_wait: Duration::from_secs(60),
            ..dm_gateway::Timeouts::default()
        },
        bus_key: Some(auth.master_key.bus_key()),
    };
    let acceptance = AcceptancePolicy {
        offered_types: vec![
            "Partial".into(),
            "Full".into(),
            "Final".into(),
            "Temporary".into(),
        ],
        peers: BTreeMap::from([(
            peer.to_string(),
            AcceptPeer {
                types: vec![
                    "Partial".into(),
                    "Full".into(),
                    "Final".into(),
                    "Temporary".into(),
                ],
                scope_prefixes: vec![".".into()],
                max_temporary_secs: Some(86_400),
            },
        )]),
    };
    let master_key = auth.master_key.clone();
    Ok(DeploymentSpec {
        name: name.to_string(),
        server_id: me.to_string(),
        saga: Some(dm_saga::Config::default()),
        orchestrator_ack_wait: Duration::from_secs(30),
        admin: None,
        admin_tls: None,
        inventory_key: Some(master_key.clone()),
        auth: Some(auth),
        gateway: Some((gateway_config, Some(gateway_listener))),
        acceptance: Some(acceptance),
        provisioning: Some(ProvisioningSpec {
            config: dm_provisioning::Config::new(me, provisioning_url),
            listener: provisioning_listener,
            push_url: push_url.to_string(),
            devices: Vec::new(),
            master_key,
        }),
    })
}

impl World {
    /// Starts DMS-1, DMS-2 and a fleet of `devices` devices managed by DMS-1, with a PKI under `dir`.
    pub async fn start(dir: &Path, bus: Bus, devices: usize) -> anyhow::Result<World> {
        Self::start_with_fleet(dir, bus, devices, SessionConfig::default()).await
    }

    /// As [`World::start`], with devices that behave as `fleet` says (field habits, `Quirks`).
    pub async fn start_with_fleet(
        dir: &Path,
        bus: Bus,
        devices: usize,
        fleet: SessionConfig,
    ) -> anyhow::Result<World> {
        Self::start_with_fleet_on(dir, bus, devices, fleet, None).await
    }

    /// As [`World::start_with_fleet`], the simulated devices served (and their sessions run) on
    /// `fleet_runtime` when given: `dmd bench` keeps their CPU apart from the services'.
    pub async fn start_with_fleet_on(
        dir: &Path,
        bus: Bus,
        devices: usize,
        fleet: SessionConfig,
        fleet_runtime: Option<tokio::runtime::Handle>,
    ) -> anyhow::Result<World> {
        dm_gateway::install_crypto_provider();
        let pki = pki::generate(dir, &[D1, D2])?;
        let fleet = Fleet::with_config(fleet);
        let fleet_listener = bind().await?;
        let push_url = format!("http://{}", fleet_listener.local_addr()?);
        let serving = fleet.clone();
        match fleet_runtime {
            Some(runtime) => {
                // Registered again with the other runtime's reactor, from within it.
                let listener = fleet_listener.into_std()?;
                runtime.spawn(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let _ = serving.serve(listener, std::future::pending()).await;
                        }
                        Err(e) => tracing::error!(error = %e, "the fleet's listener"),
                    }
                });
            }
            None => {
                tokio::spawn(
                    async move { serving.serve(fleet_listener, std::future::pending()).await },
                );
            }
        }
        let gw1 = bind().await?;
        let gw2 = bind().await?;
        let endpoint = |l: &TcpListener| -> anyhow::Result<String> {
            Ok(format!(
                "https://{}{}",
                l.local_addr()?,
                dm_gateway::DEFAULT_PATH
            ))
        };
        let (e1, e2) = (endpoint(&gw1)?, endpoint(&gw2)?);
        let (p1, p2) = (bind().await?, bind().await?);
        let p1_url = format!("http://{}/dm", p1.local_addr()?);
        // In memory only: the embedded default keeps nothing across a process restart anyway.
        let sides = [
            SideAt {
                gateway: gw1.local_addr()?,
                provisioning: p1.local_addr()?,
                peer_endpoint: e2.clone(),
                master_key: dm_auth::MasterKey::random(),
            },
            SideAt {
                gateway: gw2.local_addr()?,
                provisioning: p2.local_addr()?,
                peer_endpoint: e1.clone(),
                master_key: dm_auth::MasterKey::random(),
            },
        ];
        let s1 = spec(
            SideSpec {
                name: "dms1",
                me: D1,
                peer: D2,
                peer_endpoint: &e2,
                gateway_listener: gw1,
                provisioning_listener: p1,
                master_key: sides[0].master_key.clone(),
            },
            &pki,
            &push_url,
        )?;
        let s2 = spec(
            SideSpec {
                name: "dms2",
                me: D2,
                peer: D1,
                peer_endpoint: &e1,
                gateway_listener: gw2,
                provisioning_listener: p2,
                master_key: sides[1].master_key.clone(),
            },
            &pki,
            &push_url,
        )?;
        let dms1 = deployment::start(s1, bus.clone()).await?;
        let dms2 = deployment::start(s2, bus.clone()).await?;
        for i in 0..devices {
            let dev_id = device_id(i);
            let account = DefaultAccount {
                server_id: D1.into(),
                addr: p1_url.clone(),
                server_secret: format!("dms1-secret-{i}"),
                server_nonce_b64: auth::encode_nonce(format!("sn-{i}").as_bytes()),
                client_name: dev_id.clone(),
                client_secret: format!("device-secret-{i}"),
                client_nonce_b64: auth::encode_nonce(format!("cn-{i}").as_bytes()),
            };
            fleet.insert(Device::with_default_tree(&dev_id, &account)?);
            dms1.provisioning()?
                .register_device_durably(
                    &dev_id,
                    DeviceCredentials {
                        server_secret: account.server_secret.clone(),
                        server_nonce_b64: account.server_nonce_b64.clone(),
                        client_name: dev_id.clone(),
                        client_secret: account.client_secret.clone(),
                        client_nonce_b64: account.client_nonce_b64.clone(),
                        ..Default::default()
                    },
                )
                .await?;
        }
        Ok(World {
            dms1,
            dms2,
            fleet,
            started: Instant::now(),
            pki,
            bus,
            push_url,
            sides,
        })
    }

    /// Stops every service of one side (`D1` or `D2`) and starts them again on the same addresses with
    /// the same keys: what the side knows must come from the store (a restart is a non-event, issue 10).
    pub async fn restart(mut self, server_id: &str) -> anyhow::Result<World> {
        let (index, name, me, peer) = if server_id == D1 {
            (0, "dms1", D1, D2)
        } else {
            (1, "dms2", D2, D1)
        };
        let at = self.sides[index].clone();
        let placeholder = |s: &mut Running| std::mem::replace(s, Running::stopped(name, me));
        let old = if index == 0 {
            placeholder(&mut self.dms1)
        } else {
            placeholder(&mut self.dms2)
        };
        old.stop().await?;
        let spec = spec(
            SideSpec {
                name,
                me,
                peer,
                peer_endpoint: &at.peer_endpoint,
                gateway_listener: TcpListener::bind(at.gateway)
                    .await
                    .context("binding the gateway's address again")?,
                provisioning_listener: TcpListener::bind(at.provisioning)
                    .await
                    .context("binding the device endpoint's address again")?,
                master_key: at.master_key.clone(),
            },
            &self.pki,
            &self.push_url,
        )?;
        let running = deployment::start(spec, self.bus.clone()).await?;
        if index == 0 {
            self.dms1 = running;
        } else {
            self.dms2 = running;
        }
        Ok(self)
    }

    fn side(&self, server_id: &str) -> &Running {
        if server_id == D1 {
            &self.dms1
        } else {
            &self.dms2
        }
    }

    /// Starts a delegation on `initiator` (D1 delegates, or D2 asks to be delegated to).
    pub async fn start_delegation(
        &self,
        initiator: &str,
        device: &str,
        t: DelType,
        scope: &[&str],
        not_after_ms: Option<i64>,
    ) -> anyhow::Result<String> {
        let (role, peer) = if initiator == D1 {
            (Role::Delegating, D2)
        } else {
            (Role::Delegated, D1)
        };
        let session = Uuid::from_random_bytes(rand::random()).to_string();
        let mut start = pb::OperatorStart {
            session_id: session.clone(),
            peer_server_id: peer.into(),
            device: Some(pb::Device {
                dev_id: device.into(),
                ..Default::default()
            }),
            scope: scope.iter().map(|s| s.to_string()).collect(),
            not_after_ms,
            ..Default::default()
        };
        start.set_role(role);
        start.set_del_type(t);
        let applied = self
            .side(initiator)
            .orchestrator()?
            .apply(
                peer,
                &session,
                &pb::Event {
                    kind: Some(event::Kind::OperatorStart(start)),
                },
            )
            .await?;
        if applied.answer != dm_saga::Answer::Accepted {
            bail!("the start was refused: {:?}", applied.answer);
        }
        Ok(session)
    }

    /// Waits until the delegation seen from `side` reaches `phase` (or ends elsewhere: an error).
    pub async fn wait_for(
        &self,
        side: &str,
        session: &str,
        phase: Phase,
        timeout: Duration,
    ) -> anyhow::Result<pb::DelegationState> {
        let running = self.side(side);
        let peer = if side == D1 { D2 } else { D1 };
        let mut changes = running.orchestrator()?.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = running.orchestrator()?.get(peer, session).await? {
                if s.phase() == phase {
                    return Ok(s);
                }
                let terminal = matches!(
                    s.phase(),
                    Phase::Declined
                        | Phase::Failed
                        | Phase::Revoked
                        | Phase::Expired
                        | Phase::Released
                );
                if terminal {
                    bail!(
                        "{side} ended {:?} instead of {phase:?} ({:?})",
                        s.phase(),
                        s.fault
                    );
                }
            }
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Ok(_) => {}
                Err(_) => {
                    let seen: Vec<String> = running
                        .orchestrator()?
                        .list()
                        .await?
                        .iter()
                        .map(|s| format!("{}/{} {:?}", s.peer_server_id, s.session_id, s.phase()))
                        .collect();
                    bail!(
                        "{side}: {phase:?} not reached within {timeout:?} (stored: {seen:?}, waiting for {peer}/{session})"
                    )
                }
            }
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The URL a device posts to for `server_id` (its DMAcc `Addr` for that server).
    pub fn device_endpoint(&self, server_id: &str) -> String {
        let index = usize::from(server_id != D1);
        format!("http://{}/dm", self.sides[index].provisioning)
    }

    /// The master key of one side (`D1` or `D2`): what its auth keeps secrets with, and what the key that
    /// seals secrets on its bus is derived from. For tests that open what the store holds.
    pub fn master_key(&self, server_id: &str) -> dm_auth::MasterKey {
        self.sides[usize::from(server_id != D1)].master_key.clone()
    }

    /// Serves the admin API of one side (with its device inventory) on a loopback port until the
    /// process ends; returns its URL.
    pub async fn serve_admin(&self, server_id: &str, token: &str) -> anyhow::Result<String> {
        let index = usize::from(server_id != D1);
        let name = if index == 0 { "dms1" } else { "dms2" };
        let names = Names::new(name)?;
        let inventory = crate::inventory::DeviceInventory::open(
            &self.bus,
            &names,
            self.sides[index].master_key.clone(),
        )
        .await
        .context("device inventory")?;
        let svc = dm_orchestrator::admin::server_with_inventory(
            self.side(server_id).orchestrator()?.clone(),
            token.to_string(),
            Some(std::sync::Arc::new(inventory)),
        );
        let listener = bind().await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(url)
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.dms1.stop().await?;
        self.dms2.stop().await
    }
}

pub fn device_id(i: usize) -> String {
    format!("IMEI:35000000000{i:04}")
}

/// Prints every phase change of both deployments as it happens.
fn print_timeline(world: &World) {
    for (label, running) in [("DMS-1", &world.dms1), ("DMS-2", &world.dms2)] {
        let Some(orchestrator) = running.orchestrator.as_ref() else {
            continue;
        };
        let mut changes = orchestrator.subscribe();
        let started = world.started;
        tokio::spawn(async move {
            let mut last: BTreeMap<String, i32> = BTreeMap::new();
            while let Ok(s) = changes.recv().await {
                let key = format!("{}/{}", s.peer_server_id, s.session_id);
                if last.insert(key, s.phase) == Some(s.phase) {
                    continue;
                }
                let device = s.device.as_ref().map(|d| d.dev_id.as_str()).unwrap_or("-");
                let fault = s
                    .fault
                    .as_ref()
                    .map(|f| format!("  ({} at step {}: {})", f.status_code, f.step, f.reason))
                    .unwrap_or_default();
                println!(
                    "{:>7.3}s  {label}  {device}  {:<9} {:<10} {}{fault}",
                    started.elapsed().as_secs_f64(),
                    format!("{:?}", s.del_type()),
                    format!("{:?}", s.role()),
                    s.phase().as_str_name().trim_start_matches("PHASE_"),
                );
            }
        });
    }
}

/// Runs the demo; `Ok` only if every outcome was the expected one.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("dmd-demo-{}", std::process::id()));
    let result = run_in(&dir, options).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &Path, options: DemoOptions) -> anyhow::Result<()> {
    println!(
        "dmd demo: two DM Servers ({D1}, {D2}) and a simulated fleet, in-process (nothing is kept)"
    );
    let world = World::start(dir, Bus::in_process(), 10).await?;
    print_timeline(&world);
    let t = options.step_timeout;
    let mut failures = Vec::new();
    let mut check = |what: &str, r: anyhow::Result<()>| match &r {
        Ok(()) => println!("  ok   {what}"),
        Err(e) => {
            println!("  FAIL {what}: {e:#}");
            failures.push(what.to_string());
        }
    };

    // Every type, both initiators, on its own device.
    let mut active = Vec::new();
    let mut n = 0;
    for del_type in [
        DelType::Partial,
        DelType::Full,
        DelType::Final,
        DelType::Temporary,
    ] {
        for initiator in [D1, D2] {
            let device = device_id(n);
            n += 1;
            let scope: &[&str] = if del_type == DelType::Full {
                &["."]
            } else {
                &["./Vendor/Acme"]
            };
            let not_after = (del_type == DelType::Temporary).then(|| {
                now_ms() + i64::try_from(options.temporary_for.as_millis()).unwrap_or(6000)
            });
            let what = format!(
                "{del_type:?} delegation of {device} initiated by {initiator} reaches Active on both sides"
            );
            let r = async {
                let session = world
                    .start_delegation(initiator, &device, del_type, scope, not_after)
                    .await?;
                world.wait_for(D1, &session, Phase::Active, t).await?;
                world.wait_for(D2, &session, Phase::Active, t).await?;
                anyhow::Ok(session)
            }
            .await;
            match r {
                Ok(session) => {
                    check(&what, Ok(()));
                    active.push((del_type, initiator, device, session));
                }
                Err(e) => check(&what, Err(e)),
            }
        }
    }

    // A revocation: DMS-1 takes a Partial delegation back; the device's authority returns to DMS-1.
    if let Some((_, _, device, session)) = active
        .iter()
        .find(|(t, i, _, _)| *t == DelType::Partial && *i == D1)
    {
        let r = async {
            let applied = world
                .dms1
                .orchestrator()?
                .apply(
                    D2,
                    session,
                    &pb::Event {
                        kind: Some(event::Kind::OperatorRevoke(pb::OperatorRevoke {})),
                    },
                )
                .await?;
            if applied.answer != dm_saga::Answer::Accepted {
                bail!("revoke refused: {:?}", applied.answer);
            }
            world.wait_for(D1, session, Phase::Revoked, t).await?;
            world.wait_for(D2, session, Phase::Revoked, t).await?;
            let still = world
                .fleet
                .with_device(device, |d| d.account_uri(D2).is_some())
                .unwrap_or(true);
            if still {
                bail!("DMS-2's account is still on {device}");
            }
            Ok(())
        }
        .await;
        check("revocation restores the device and ends both sides", r);
    }
    // Final cannot be revoked.
    if let Some((_, _, _, session)) = active.iter().find(|(t, _, _, _)| *t == DelType::Final) {
        let applied = world
            .dms1
            .orchestrator()?
            .apply(
                D2,
                session,
                &pb::Event {
                    kind: Some(event::Kind::OperatorRevoke(pb::OperatorRevoke {})),
                },
            )
            .await?;
        let r = if applied.answer.http_status() == 405 {
            Ok(())
        } else {
            Err(anyhow::anyhow!("answer {:?}", applied.answer))
        };
        check("a Final delegation refuses revocation with 405", r);
    }
    // Temporary delegations end by themselves at NotAfter.
    for (_, initiator, device, session) in active
        .iter()
        .filter(|(t, _, _, _)| *t == DelType::Temporary)
    {
        let r = async {
            world
                .wait_for(D1, session, Phase::Expired, t + options.temporary_for)
                .await?;
            world.wait_for(D2, session, Phase::Expired, t).await?;
            let still = world
                .fleet
                .with_device(device, |d| d.account_uri(D2).is_some())
                .unwrap_or(true);
            if still {
                bail!("DMS-2's account is still on {device}");
            }
            Ok(())
        }
        .await;
        check(
            &format!("the Temporary delegation initiated by {initiator} expires on both sides"),
            r,
        );
    }
    // A refused request: DMS-2 accepts Temporary delegations of a day at most.
    let r = async {
        let device = device_id(n);
        let session = world
            .start_delegation(
                D1,
                &device,
                DelType::Temporary,
                &["./Vendor/Acme"],
                Some(now_ms() + 10 * 86_400_000),
            )
            .await?;
        world.wait_for(D1, &session, Phase::Declined, t).await?;
        world.wait_for(D2, &session, Phase::Declined, t).await?;
        Ok(())
    }
    .await;
    check(
        "a Temporary delegation of ten days is refused (nack 403) and ends on both sides",
        r,
    );

    println!("finished in {:.1}s", world.elapsed().as_secs_f64());
    world.stop().await?;
    if failures.is_empty() {
        println!("every outcome was the expected one");
        Ok(())
    } else {
        bail!(
            "{} outcome(s) differed: {}",
            failures.len(),
            failures.join("; ")
        )
    }
}
