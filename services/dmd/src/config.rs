//! The configuration of a deployment: one TOML file, one table per service. Each service's table has that
//! service's own format (see its crate); `deployment` and `server_id` are given once, in `[deployment]`,
//! and passed to every service. Secrets that must not sit in the file are named by environment variables.
//!
//! ```toml
//! [deployment]
//! name = "dms1"
//! server_id = "dms1.operator.example"
//! nats_url = "nats://nats:4222"        # absent: `dmd all` runs on the in-process bus (nothing is kept);
//!                                      # a cluster: "nats://n1:4222,nats://n2:4222,nats://n3:4222"
//! nats_replicas = 1                    # optional: copies of each stream and bucket (3 on a 3-node cluster)
//!
//! [admin]
//! listen = "0.0.0.0:7443"
//! token_env = "DMD_ADMIN_TOKEN"        # the operator token is read from this variable
//!
//! [auth]                               # dm-auth's format
//! dm_address = "https://dm.dms1.operator.example/dm"
//! [[auth.peer]]
//! server_id = "dms2.enterprise.example"
//! ...
//!
//! [gateway]                            # dm-gateway's format
//! listen = "0.0.0.0:8443"
//! [gateway.tls]
//! ...
//!
//! [acceptance]                         # dm-notification's policy
//! offered_types = ["Partial", "Temporary"]
//!
//! [orchestrator]                       # optional; the defaults are shown
//! ack_wait_secs = 30                   # an event not settled within this is delivered again
//! [orchestrator.deadlines]             # seconds each step may take (await_res, decide, verify,
//! apply = 1800                         # await_start, await_prepared, create_key, apply,
//!                                      # await_confirm, first_session, await_release)
//!
//! [provisioning]
//! listen = "0.0.0.0:8080"
//! public_url = "https://dm.dms1.operator.example/dm"
//! push_url = "http://push-gateway:8700"
//! session_timeout_secs = 120           # optional: a silent device fails its job with 408 after this
//! command_ack_wait_secs = 60           # optional: a replica that died lets its commands go after this
//! [[provisioning.device]]
//! dev_id = "IMEI:490154203237518"
//! ...
//! ```

use std::net::SocketAddr;

use anyhow::{Context, bail};
use dm_notification::policy::AcceptancePolicy;
use dm_provisioning::DeviceCredentials;
use serde::Deserialize;
use toml::Table;

/// What `dmd` read from the file, each service's part checked by that service's parser.
#[derive(Debug)]
pub struct FileConfig {
    pub name: String,
    pub server_id: String,
    /// One NATS URL, or the servers of a cluster separated by commas.
    pub nats_url: Option<String>,
    /// How many cluster nodes keep each stream and bucket the deployment creates (1 to 5).
    pub nats_replicas: u8,
    pub admin: Option<AdminConfig>,
    /// Where `/livez` and `/readyz` are served.
    pub health: Option<SocketAddr>,
    pub auth: Option<dm_auth::Config>,
    pub gateway: Option<dm_gateway::Config>,
    pub acceptance: Option<AcceptancePolicy>,
    pub provisioning: Option<ProvisioningConfig>,
    pub orchestrator: OrchestratorConfig,
}

#[derive(Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: String,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct ProvisioningConfig {
    pub listen: SocketAddr,
    pub public_url: String,
    pub push_url: String,
    pub devices: Vec<(String, DeviceCredentials)>,
    pub session_timeout: std::time::Duration,
    pub command_ack_wait: std::time::Duration,
}

/// The orchestrator's timing: the saga's step deadlines and how long an event may stay unsettled.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    pub saga: dm_saga::Config,
    pub ack_wait: std::time::Duration,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            saga: dm_saga::Config::default(),
            ack_wait: std::time::Duration::from_secs(30),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Orchestrator {
    #[serde(default)]
    ack_wait_secs: Option<u64>,
    #[serde(default)]
    deadlines: Deadlines,
}

/// Step deadlines in seconds; absent: the saga's default.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Deadlines {
    await_res: Option<u64>,
    decide: Option<u64>,
    verify: Option<u64>,
    await_start: Option<u64>,
    await_prepared: Option<u64>,
    create_key: Option<u64>,
    apply: Option<u64>,
    await_confirm: Option<u64>,
    first_session: Option<u64>,
    await_release: Option<u64>,
}

/// A positive number of seconds, or the error that names the key.
fn seconds(key: &str, value: u64) -> anyhow::Result<std::time::Duration> {
    if value == 0 {
        bail!("{key}: must be more than 0 seconds");
    }
    Ok(std::time::Duration::from_secs(value))
}

impl Orchestrator {
    fn resolve(self) -> anyhow::Result<OrchestratorConfig> {
        let mut out = OrchestratorConfig::default();
        if let Some(v) = self.ack_wait_secs {
            out.ack_wait = seconds("[orchestrator] ack_wait_secs", v)?;
        }
        let d = self.deadlines;
        let saga = &mut out.saga;
        for (name, value, field) in [
            ("await_res", d.await_res, &mut saga.await_res_ms),
            ("decide", d.decide, &mut saga.decide_ms),
            ("verify", d.verify, &mut saga.verify_ms),
            ("await_start", d.await_start, &mut saga.await_start_ms),
            (
                "await_prepared",
                d.await_prepared,
                &mut saga.await_prepared_ms,
            ),
            ("create_key", d.create_key, &mut saga.create_key_ms),
            ("apply", d.apply, &mut saga.apply_ms),
            ("await_confirm", d.await_confirm, &mut saga.await_confirm_ms),
            ("first_session", d.first_session, &mut saga.first_session_ms),
            ("await_release", d.await_release, &mut saga.await_release_ms),
        ] {
            if let Some(v) = value {
                let d = seconds(&format!("[orchestrator.deadlines] {name}"), v)?;
                *field = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            }
        }
        Ok(out)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deployment {
    name: String,
    server_id: String,
    #[serde(default)]
    nats_url: Option<String>,
    #[serde(default)]
    nats_replicas: Option<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Admin {
    listen: String,
    token_env: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Health {
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Provisioning {
    listen: String,
    public_url: String,
    push_url: String,
    #[serde(default)]
    session_timeout_secs: Option<u64>,
    #[serde(default)]
    command_ack_wait_secs: Option<u64>,
    #[serde(default)]
    device: Vec<Device>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Device {
    dev_id: String,
    server_secret: String,
    server_nonce_b64: String,
    client_name: String,
    client_secret: String,
    client_nonce_b64: String,
}

/// A service's table as the text its own parser reads, with the deployment's name and ServerID in it.
fn service_text(table: &Table, section: &str, d: &Deployment) -> anyhow::Result<Option<String>> {
    let Some(value) = table.get(section) else {
        return Ok(None);
    };
    let Some(mut t) = value.as_table().cloned() else {
        bail!("[{section}] must be a table");
    };
    t.insert("deployment".into(), d.name.clone().into());
    t.insert("server_id".into(), d.server_id.clone().into());
    Ok(Some(
        toml::to_string(&t).with_context(|| format!("[{section}]"))?,
    ))
}

fn part<T: serde::de::DeserializeOwned>(table: &Table, section: &str) -> anyhow::Result<Option<T>> {
    table
        .get(section)
        .map(|v| {
            v.clone()
                .try_into::<T>()
                .with_context(|| format!("[{section}]"))
        })
        .transpose()
}

/// Reads the whole file. `env` gives environment variables (injected, so tests never set any).
pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<FileConfig> {
    let table: Table = text
        .parse()
        .context("the configuration is not valid TOML")?;
    for key in table.keys() {
        if ![
            "deployment",
            "admin",
            "health",
            "auth",
            "gateway",
            "acceptance",
            "orchestrator",
            "provisioning",
        ]
        .contains(&key.as_str())
        {
            bail!(
                "unknown table [{key}]: expected deployment, admin, health, auth, gateway, acceptance, orchestrator, provisioning"
            );
        }
    }
    let deployment: Deployment = part(&table, "deployment")?.context("[deployment] is required")?;
    let nats_replicas = match (deployment.nats_replicas, &deployment.nats_url) {
        (None, _) => 1,
        (Some(_), None) => bail!("[deployment] nats_replicas: only with nats_url"),
        (Some(n @ 1..=5), Some(_)) => n,
        (Some(n), Some(_)) => bail!("[deployment] nats_replicas: {n}, JetStream keeps 1 to 5"),
    };
    let health = part::<Health>(&table, "health")?
        .map(|h| {
            h.listen
                .parse()
                .context("[health] listen: not an address:port")
        })
        .transpose()?;
    let admin = match part::<Admin>(&table, "admin")? {
        None => None,
        Some(a) => {
            let token = env(&a.token_env)
                .filter(|t| !t.is_empty())
                .with_context(|| {
                    format!("[admin] token_env: the variable {} is not set", a.token_env)
                })?;
            Some(AdminConfig {
                listen: a
                    .listen
                    .parse()
                    .context("[admin] listen: not an address:port")?,
                token,
            })
        }
    };
    let auth = service_text(&table, "auth", &deployment)?
        .map(|t| dm_auth::Config::from_toml(&t))
        .transpose()
        .context("[auth]")?;
    let gateway = service_text(&table, "gateway", &deployment)?
        .map(|t| dm_gateway::Config::from_toml(&t))
        .transpose()
        .context("[gateway]")?;
    let acceptance = match table.get("acceptance") {
        None => None,
        Some(v) => Some(
            AcceptancePolicy::from_toml(&toml::to_string(v).context("[acceptance]")?)
                .context("[acceptance]")?,
        ),
    };
    let provisioning = part::<Provisioning>(&table, "provisioning")?
        .map(|p| -> anyhow::Result<ProvisioningConfig> {
            Ok(ProvisioningConfig {
                listen: p
                    .listen
                    .parse()
                    .context("[provisioning] listen: not an address:port")?,
                public_url: p.public_url,
                push_url: p.push_url,
                session_timeout: match p.session_timeout_secs {
                    Some(v) => seconds("[provisioning] session_timeout_secs", v)?,
                    None => dm_provisioning::DEFAULT_SESSION_TIMEOUT,
                },
                command_ack_wait: match p.command_ack_wait_secs {
                    Some(v) => seconds("[provisioning] command_ack_wait_secs", v)?,
                    None => std::time::Duration::from_secs(60),
                },
                devices: p
                    .device
                    .into_iter()
                    .map(|d| {
                        (
                            d.dev_id,
                            DeviceCredentials {
                                server_secret: d.server_secret,
                                server_nonce_b64: d.server_nonce_b64,
                                client_name: d.client_name,
                                client_secret: d.client_secret,
                                client_nonce_b64: d.client_nonce_b64,
                                ..Default::default()
                            },
                        )
                    })
                    .collect(),
            })
        })
        .transpose()?;
    let orchestrator = part::<Orchestrator>(&table, "orchestrator")?
        .unwrap_or_default()
        .resolve()?;
    Ok(FileConfig {
        orchestrator,
        name: deployment.name,
        server_id: deployment.server_id,
        nats_url: deployment.nats_url,
        nats_replicas,
        admin,
        health,
        auth,
        gateway,
        acceptance,
        provisioning,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[deployment]
name = "dms1"
server_id = "dms1.operator.example"

[admin]
listen = "127.0.0.1:7443"
token_env = "TOKEN"

[auth]
dm_address = "https://dm.dms1.operator.example/dm"

[[auth.peer]]
server_id = "dms2.enterprise.example"
endpoint = "https://dms2.enterprise.example/delegation"
spki_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
allowed_types = ["Partial"]
allowed_scopes = ["./Vendor"]

[acceptance]
offered_types = ["Partial"]

[provisioning]
listen = "0.0.0.0:8080"
public_url = "http://dm.example/dm"
push_url = "http://push:8700"
"#;

    #[test]
    fn deadlines_and_ack_waits_are_configuration_with_defaults() {
        let c = parse(FILE, |k| (k == "TOKEN").then(|| "t0k3n".to_string())).unwrap();
        assert_eq!(c.orchestrator.saga, dm_saga::Config::default());
        assert_eq!(c.orchestrator.ack_wait, std::time::Duration::from_secs(30));
        let p = c.provisioning.unwrap();
        assert_eq!(p.session_timeout, dm_provisioning::DEFAULT_SESSION_TIMEOUT);
        assert_eq!(p.command_ack_wait, std::time::Duration::from_secs(60));

        let file = FILE.replace(
            "[provisioning]\n",
            "[orchestrator]\nack_wait_secs = 45\n[orchestrator.deadlines]\napply = 600\nawait_res = 90\n\n\
             [provisioning]\nsession_timeout_secs = 30\ncommand_ack_wait_secs = 20\n",
        );
        let c = parse(&file, |k| (k == "TOKEN").then(|| "t0k3n".to_string())).unwrap();
        assert_eq!(c.orchestrator.ack_wait, std::time::Duration::from_secs(45));
        assert_eq!(c.orchestrator.saga.apply_ms, 600_000);
        assert_eq!(c.orchestrator.saga.await_res_ms, 90_000);
        assert_eq!(
            c.orchestrator.saga.verify_ms,
            dm_saga::Config::default().verify_ms
        );
        let p = c.provisioning.unwrap();
        assert_eq!(p.session_timeout, std::time::Duration::from_secs(30));
        assert_eq!(p.command_ack_wait, std::time::Duration::from_secs(20));

        for (bad, says) in [
            (
                "[orchestrator.deadlines]\napply = 0\n",
                "apply: must be more than 0",
            ),
            ("[orchestrator.deadlines]\nsoon = 5\n", "soon"),
            ("[orchestrator]\nack_wait_secs = 0\n", "ack_wait_secs"),
        ] {
            let file = format!("{FILE}\n{bad}");
            let e = parse(&file, |k| (k == "TOKEN").then(|| "t0k3n".to_string())).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{bad}: {e:#}");
        }
    }

    #[test]
    fn every_service_reads_its_table() {
        let c = parse(FILE, |k| (k == "TOKEN").then(|| "t0k3n".to_string())).unwrap();
        assert_eq!(c.name, "dms1");
        assert!(c.nats_url.is_none());
        assert_eq!(c.nats_replicas, 1);
        assert_eq!(c.admin.unwrap().token, "t0k3n");
        assert!(c.auth.is_some());
        assert!(c.gateway.is_none());
        assert_eq!(c.acceptance.unwrap().offered_types, ["Partial"]);
        assert_eq!(c.provisioning.unwrap().push_url, "http://push:8700");
    }

    #[test]
    fn a_cluster_and_its_replicas() {
        let cluster = "[deployment]\nname = \"x\"\nserver_id = \"y\"\n\
                       nats_url = \"nats://n1:4222,nats://n2:4222,nats://n3:4222\"\nnats_replicas = 3\n";
        let c = parse(cluster, |_| None).unwrap();
        assert_eq!(c.nats_replicas, 3);
        assert_eq!(
            c.nats_url.as_deref(),
            Some("nats://n1:4222,nats://n2:4222,nats://n3:4222")
        );
        for (replicas, needs) in [("0", "1 to 5"), ("6", "1 to 5")] {
            let e = parse(
                &cluster.replace("nats_replicas = 3", &format!("nats_replicas = {replicas}")),
                |_| None,
            )
            .unwrap_err();
            assert!(format!("{e:#}").contains(needs), "{e:#}");
            assert!(format!("{e:#}").contains("nats_replicas"), "{e:#}");
        }
        let e = parse(
            "[deployment]\nname = \"x\"\nserver_id = \"y\"\nnats_replicas = 3\n",
            |_| None,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("only with nats_url"), "{e:#}");
    }

    #[test]
    fn errors_name_the_place() {
        let e = parse(FILE, |_| None).unwrap_err();
        assert!(format!("{e:#}").contains("TOKEN"), "{e:#}");
        let e = parse(
            "[deployment]\nname = \"x\"\nserver_id = \"y\"\n[oops]\n",
            |_| None,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("oops"));
        let bad = FILE.replace(
            "allowed_types = [\"Partial\"]",
            "allowed_types = [\"Whole\"]",
        );
        let e = parse(&bad, |_| Some("t".into())).unwrap_err();
        assert!(format!("{e:#}").contains("[auth]"), "{e:#}");
    }
}
