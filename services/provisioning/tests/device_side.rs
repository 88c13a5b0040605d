//! Steps 4-5 and 7-8 over real HTTP on loopback: two provisioning services (DMS-1 and DMS-2), the package
//! #0 channel, and the simulated DM 1.2 client fleet. Every wait is on an outcome, with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use dm_client::{DefaultAccount, Device, Fleet};
use dm_notification::{ChannelError, HttpPushChannel, Package0Channel, ServerCredential};
use dm_protocol::auth;
use dm_protocol::delegation::{self, DelType};
use dm_protocol::dmacc::{DmAccount, Secret};
use dm_protocol::syncml::{Command, Item, ItemCommand, Meta};
use dm_protocol::tnds;
use dm_protocol::tree::DmTree;
use dm_protocol::types::{DmUri, UtcTime};
use dm_provisioning::{
    Config, DeviceCredentials, Job, JobFailure, JobOutcome, JobSuccess, Provisioning, Rotation,
};
use tokio::sync::mpsc::UnboundedReceiver;

const D1: &str = "dms1.operator.example";
const D2: &str = "dms2.enterprise.example";
const DEV: &str = "IMEI:490154203237518";
const DEADLINE: Duration = Duration::from_secs(20);

struct Server {
    prov: Provisioning,
    outcomes: UnboundedReceiver<JobOutcome>,
}

impl Server {
    async fn start(server_id: &str, fleet_url: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/dm", listener.local_addr().unwrap());
        let channel: Arc<dyn Package0Channel> = Arc::new(HttpPushChannel::new(fleet_url));
        let (prov, outcomes) = Provisioning::new(
            Config {
                server_id: server_id.into(),
                public_url: url,
            },
            channel,
        );
        tokio::spawn(prov.clone().serve(listener, std::future::pending()));
        Self { prov, outcomes }
    }

    fn url(&self) -> String {
        self.prov.config().public_url.clone()
    }

    /// Queues a job and waits for its outcome.
    async fn run(&mut self, job: Job) -> Result<JobSuccess, JobFailure> {
        let id = self.prov.enqueue(DEV, job).await.unwrap();
        loop {
            let outcome = tokio::time::timeout(DEADLINE, self.outcomes.recv())
                .await
                .expect("the job's outcome in time")
                .expect("outcome channel open");
            if outcome.job_id == id {
                return outcome.result;
            }
        }
    }

    async fn commands(&mut self, commands: Vec<Command>) -> Vec<(String, u16)> {
        match self.run(Job::Commands(commands)).await {
            Ok(JobSuccess::Commands { statuses, .. }) => statuses,
            other => panic!("commands job: {other:?}"),
        }
    }
}

struct World {
    fleet: Fleet,
    fleet_url: String,
    dms1: Server,
    dms2: Server,
}

fn dms1_account(addr: &str) -> DefaultAccount {
    DefaultAccount {
        server_id: D1.into(),
        addr: addr.into(),
        server_secret: "dms1-server-secret".into(),
        server_nonce_b64: auth::encode_nonce(b"dms1-server-nonce"),
        client_name: DEV.into(),
        client_secret: "device-secret-for-dms1".into(),
        client_nonce_b64: auth::encode_nonce(b"dms1-client-nonce"),
    }
}

impl World {
    async fn start() -> Self {
        let fleet = Fleet::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fleet_url = format!("http://{}", listener.local_addr().unwrap());
        let serving = fleet.clone();
        tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
        let dms1 = Server::start(D1, &fleet_url).await;
        let dms2 = Server::start(D2, &fleet_url).await;
        let account = dms1_account(&dms1.url());
        let device = Device::with_default_tree(DEV, &account).unwrap();
        assert!(fleet.insert(device));
        dms1.prov.register_device(
            DEV,
            DeviceCredentials {
                server_secret: account.server_secret.clone(),
                server_nonce_b64: account.server_nonce_b64.clone(),
                client_name: account.client_name.clone(),
                client_secret: account.client_secret.clone(),
                client_nonce_b64: account.client_nonce_b64.clone(),
            },
        );
        Self {
            fleet,
            fleet_url,
            dms1,
            dms2,
        }
    }

    fn export(&self) -> tnds::MgmtTree {
        self.fleet.export(DEV).unwrap()
    }

    /// DMS-2's DM Account as DELEGATION_START carries it (examples/start.xml, pointed at this DMS-2).
    fn dms2_account(&self) -> DmAccount {
        let xml = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/start.xml"
        ))
        .unwrap();
        let delegation::Body::Start(start) = delegation::decode(&xml).unwrap().body else {
            panic!("examples/start.xml is a DELEGATION_START");
        };
        let mut account = DmAccount::from_tnds(&start.dm_acc).unwrap();
        account.app_addrs[0].addr = self.dms2.url();
        account.app_addrs[0].ports.clear();
        account
    }

    fn request(&self, del_type: DelType, scope: &[&str]) -> dm_provisioning::PlanRequest {
        dm_provisioning::PlanRequest {
            account_key: "dms2".into(),
            account: self.dms2_account(),
            delegating: D1.into(),
            delegated: D2.into(),
            del_type,
            scope: scope.iter().map(|s| s.parse().unwrap()).collect(),
            not_after: (del_type == DelType::Temporary)
                .then(|| "2030-01-01T00:00:00Z".parse::<UtcTime>().unwrap()),
            temp_key_b64: Secret::new(TEMP_KEY),
        }
    }

    /// Steps 4-5, then DMS-2 learns what DELEGATION_PREPARED tells it, then steps 7-8.
    async fn delegate(&mut self, del_type: DelType, scope: &[&str]) -> String {
        let request = self.request(del_type, scope);
        let applied = self
            .dms1
            .run(Job::Apply {
                plan_id: "delegation-1".into(),
                request: Box::new(request),
            })
            .await
            .expect("the plan applies");
        let JobSuccess::Applied {
            account_uri,
            server_nonce_b64,
            ..
        } = applied
        else {
            panic!("not an apply outcome: {applied:?}")
        };
        let account = self.dms2_account();
        let client = account.client_credential().unwrap();
        self.dms2.prov.register_device(
            DEV,
            DeviceCredentials {
                server_secret: TEMP_KEY.into(),
                server_nonce_b64: server_nonce_b64.clone(),
                client_name: client.name.clone().unwrap(),
                client_secret: client.secret.as_ref().unwrap().expose().to_string(),
                client_nonce_b64: client.data.clone().unwrap(),
            },
        );
        account_uri
    }

    async fn first_session(&mut self, account_uri: &str) {
        let rotated = self
            .dms2
            .run(Job::FirstSession(Rotation {
                account_uri: account_uri.into(),
                server_cred_key: "srvcred".into(),
                client_cred_key: "clcred".into(),
            }))
            .await;
        assert_eq!(rotated, Ok(JobSuccess::Rotated));
    }

    async fn push(
        &self,
        server_id: &str,
        secret: &str,
        nonce_b64: &str,
        tamper: bool,
    ) -> Result<(), ChannelError> {
        let cred = ServerCredential {
            name: server_id.into(),
            secret: secret.into(),
            nonce: auth::decode_nonce(nonce_b64).unwrap(),
        };
        let mut bytes = dm_notification::build(server_id, 0x0102, &cred).unwrap();
        if tamper {
            bytes[3] ^= 0x01;
        }
        HttpPushChannel::new(&self.fleet_url)
            .deliver(DEV, bytes)
            .await
    }
}

const TEMP_KEY: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";

fn replace(uri: &str, value: &str) -> Command {
    Command::Replace(ItemCommand::new(
        "0",
        vec![Item::target(uri).with_data(value)],
    ))
}

fn add_leaf(uri: &str, value: &str) -> Command {
    Command::Add(ItemCommand::new(
        "0",
        vec![
            Item::target(uri)
                .with_meta(Meta {
                    format: Some("chr".into()),
                    ..Meta::default()
                })
                .with_data(value),
        ],
    ))
}

fn delete(uri: &str) -> Command {
    Command::Delete(ItemCommand::new("0", vec![Item::target(uri)]))
}

fn codes(statuses: &[(String, u16)]) -> Vec<u16> {
    statuses.iter().map(|(_, c)| *c).collect()
}

/// The export as text with the nonces of the accounts that existed before blanked (B.7), and without
/// the subtrees given: what must not change.
fn comparable(tree: &tnds::MgmtTree, without: &[&str]) -> String {
    let mut t = DmTree::from_tnds(tree).unwrap();
    for uri in without {
        let uri: DmUri = uri.parse().unwrap();
        if t.get(&uri).is_ok() {
            t.delete(&uri).unwrap();
        }
    }
    for cred in ["SRVCRED", "CLCRED"] {
        let key = dms1_account("").account_key();
        let nonce: DmUri = format!("./DMAcc/{key}/AppAuth/{cred}/AAuthData")
            .parse()
            .unwrap();
        if t.get(&nonce).is_ok() {
            t.replace_value(&nonce, "").unwrap();
        }
    }
    tnds::encode(&t.to_tnds())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_type_moves_authority_and_restore_puts_the_device_back() {
    for (del_type, scope, inside, outside) in [
        (
            DelType::Partial,
            vec!["./Vendor/Acme/Apps"],
            "./Vendor/Acme/Apps/App1/Version",
            "./Vendor/Acme/Settings/Volume",
        ),
        (
            DelType::Full,
            vec!["."],
            "./Vendor/Acme/Apps/App1/Version",
            "./DevInfo/Lang",
        ),
        (
            DelType::Final,
            vec!["./Vendor/Acme"],
            "./Vendor/Acme/Settings/Volume",
            "./Vendor/Other/Info",
        ),
        (
            DelType::Temporary,
            vec!["./Vendor/Acme/Settings"],
            "./Vendor/Acme/Settings/Volume",
            "./Vendor/Acme/Apps/App1/Version",
        ),
    ] {
        let mut w = World::start().await;
        let before = w.export();
        let account_uri = w.delegate(del_type, &scope).await;
        assert_eq!(account_uri, "./DMAcc/dms2");
        w.first_session(&account_uri).await;
        let label = format!("{del_type:?} over {scope:?}");

        // DMS-2 manages the scope: Replace and Add inside it (the value put back, the node removed, so
        // that only authority differs afterwards).
        let value = w
            .fleet
            .with_device(DEV, |d| {
                d.tree().value(&inside.parse().unwrap()).map(String::from)
            })
            .unwrap()
            .unwrap();
        let parent = inside.rsplit_once('/').unwrap().0;
        let statuses = w
            .dms2
            .commands(vec![
                replace(inside, "changed-by-dms2"),
                replace(inside, &value),
                add_leaf(&format!("{parent}/AddedByDms2"), "x"),
                delete(&format!("{parent}/AddedByDms2")),
            ])
            .await;
        assert_eq!(
            codes(&statuses),
            [200, 200, 200, 200],
            "{label}: DMS-2 inside the scope"
        );
        // DMS-1 can no longer change data in the scope.
        let statuses = w
            .dms1
            .commands(vec![replace(inside, "changed-by-dms1")])
            .await;
        assert_eq!(codes(&statuses), [425], "{label}: DMS-1 inside the scope");
        // DMS-2 has no authority outside it; DMS-1 still has.
        let statuses = w.dms2.commands(vec![replace(outside, "x")]).await;
        assert_eq!(codes(&statuses), [425], "{label}: DMS-2 outside the scope");
        let original = w
            .fleet
            .with_device(DEV, |d| {
                d.tree().value(&outside.parse().unwrap()).map(String::from)
            })
            .unwrap()
            .unwrap();
        let statuses = w.dms1.commands(vec![replace(outside, &original)]).await;
        assert_eq!(codes(&statuses), [200], "{label}: DMS-1 outside the scope");

        // Nothing outside the scope (and DMS-2's account) changed.
        let during = w.export();
        let mut moved: Vec<&str> = vec!["./DMAcc/dms2"];
        if del_type == DelType::Full {
            moved.push("./Vendor");
        } else {
            moved.extend(scope.iter().copied());
        }
        assert_eq!(
            comparable(&during, &moved),
            comparable(&before, &moved),
            "{label}: outside the scope"
        );

        // Restore: the export is the one before, byte for byte but for the nonces (B.7).
        let restored = w
            .dms1
            .run(Job::Restore {
                plan_id: "delegation-1".into(),
            })
            .await;
        assert_eq!(restored, Ok(JobSuccess::Restored), "{label}");
        assert_eq!(
            comparable(&w.export(), &[]),
            comparable(&before, &[]),
            "{label}: after restore"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_command_rolls_back_the_whole_plan_and_reports_507_with_the_command() {
    // DMS-1 may not add accounts on this device: the plan's first Add is refused.
    let mut w = World::start().await;
    w.fleet
        .with_device_mut(DEV, |d| {
            let acl = format!("Get={D1}&Replace={D1}").parse().unwrap();
            d.tree_mut()
                .set_acl(&"./DMAcc".parse().unwrap(), acl)
                .unwrap();
        })
        .unwrap();
    let before = w.export();
    let request = w.request(DelType::Partial, &["./Vendor/Acme/Apps"]);
    let failed = w
        .dms1
        .run(Job::Apply {
            plan_id: "refused".into(),
            request: Box::new(request),
        })
        .await
        .unwrap_err();
    assert_eq!(failed.status, 507, "{failed:?}");
    assert_eq!(failed.command, "Add ./DMAcc/dms2", "{failed:?}");
    assert_eq!(
        comparable(&w.export(), &[]),
        comparable(&before, &[]),
        "rolled back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_key_works_once_then_the_rotated_credentials_do() {
    let mut w = World::start().await;
    let account_uri = w.delegate(DelType::Partial, &["./Vendor/Acme/Apps"]).await;
    let creds = w.dms2.prov.credentials(DEV).unwrap();
    // A wrong key and a tampered package #0 are refused by the device.
    assert_eq!(
        w.push(D2, "not-the-temp-key", &creds.server_nonce_b64, false)
            .await,
        Err(ChannelError::Refused(401))
    );
    assert_eq!(
        w.push(D2, TEMP_KEY, &creds.server_nonce_b64, true).await,
        Err(ChannelError::Refused(401))
    );
    let sessions_before = w.fleet.sessions(DEV).unwrap().len();
    // The first session with the TEMP key replaces both credentials.
    w.first_session(&account_uri).await;
    let rotated = w.dms2.prov.credentials(DEV).unwrap();
    assert_ne!(rotated.server_secret, TEMP_KEY);
    assert_ne!(rotated.client_secret, creds.client_secret);
    // The TEMP key no longer works; the new server credential does, and a session with it succeeds.
    assert_eq!(
        w.push(D2, TEMP_KEY, &rotated.server_nonce_b64, false).await,
        Err(ChannelError::Refused(401))
    );
    let statuses = w
        .dms2
        .commands(vec![replace("./Vendor/Acme/Apps/App1/Version", "2.0")])
        .await;
    assert_eq!(codes(&statuses), [200]);
    // Both sessions (rotation, then management with the new credentials) completed on the device.
    let sessions = w
        .fleet
        .wait_for_sessions(DEV, sessions_before + 2, DEADLINE)
        .await
        .unwrap();
    assert!(
        sessions
            .iter()
            .skip(sessions_before)
            .all(|s| s.outcome == dm_client::Outcome::Completed),
        "{sessions:?}"
    );
}
