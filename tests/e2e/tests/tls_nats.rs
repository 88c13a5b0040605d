//! A whole delegation over a NATS server that asks for mutual TLS and an nkey (issue 13, "Channels"):
//! every service of both deployments on a bus connected with the `[nats]` settings `dmd` passes, the
//! delegation reaches Active on both sides.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use dm_bus::testing::{NatsServer, ServerAuth, ServerSecurity, ServerTls, user_nkey};
use dm_bus::{Bus, BusOptions, NatsCredentials, NatsSecurity};
use dm_saga::pb::{DelType, Phase};
use dmd::demo::{D1, D2, World, device_id};

const STEP: Duration = Duration::from_secs(30);

struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegation_over_nats_with_mutual_tls_and_an_nkey() {
    let dir = Dir(std::env::temp_dir().join(format!("dmd-tls-nats-{}", std::process::id())));
    // The NATS server's certificate and the deployments' client certificate, from one CA.
    let pki = dmd::pki::generate(&dir.0.join("nats-pki"), &["localhost", "dmd"]).unwrap();
    let (seed, public) = user_nkey();
    let server = pki.files("localhost").unwrap();
    let nats = NatsServer::start_secured(ServerSecurity {
        tls: Some(ServerTls {
            cert: server.cert.clone(),
            key: server.key.clone(),
            client_ca: Some(pki.ca_cert.clone()),
        }),
        auth: Some(ServerAuth::Nkey(public)),
    })
    .expect("a nats-server for the tests (scripts/test installs one)");
    let client = pki.files("dmd").unwrap();
    let bus = Bus::connect_with(
        nats.url(),
        BusOptions {
            replicas: 1,
            security: NatsSecurity {
                require_tls: true,
                ca: Some(pki.ca_cert.clone()),
                client_cert: Some((client.cert.clone(), client.key.clone())),
                credentials: Some(NatsCredentials::NkeySeed(seed)),
            },
        },
    )
    .await
    .unwrap();
    let w = World::start(&dir.0.join("world"), bus, 1).await.unwrap();
    let session = w
        .start_delegation(
            D1,
            &device_id(0),
            DelType::Partial,
            &["./Vendor/Acme"],
            None,
        )
        .await
        .unwrap();
    w.wait_for(D1, &session, Phase::Active, STEP).await.unwrap();
    w.wait_for(D2, &session, Phase::Active, STEP).await.unwrap();
    w.stop().await.unwrap();
}
