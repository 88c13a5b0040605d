//! The admin API over TLS (issue 13, "Channels"; ARCHITECTURE rule 12), served as `dmd` serves it from
//! its configuration file and called with the `dmdctl` binary: an operator's client certificate from the
//! operator CA is enough; the token over TLS works; a certificate from another CA is refused in the
//! handshake; a wrong token is refused; the audit names the certificate's subject.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use dm_bus::{Area, Bus, ConsumerConfig, Names};

const TOKEN: &str = "admin-tls-test-token";

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn dmdctl(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_dmdctl"))
        .args(args)
        .env_remove("DMD_ADMIN_TOKEN")
        .env_remove("DMD_ADMIN_URL")
        .env_remove("DMD_ADMIN_CA")
        .env_remove("DMD_ADMIN_CERT")
        .env_remove("DMD_ADMIN_KEY")
        .output()
        .await
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

#[tokio::test]
async fn admin_api_over_tls_with_client_certificates_or_the_token() {
    let dir = Dir(std::env::temp_dir().join(format!("dmdctl-admin-tls-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    // The operator CA: the API's certificate (SAN localhost, 127.0.0.1) and an operator's.
    let pki = dmd::pki::generate(&dir.0.join("ops"), &["localhost", "operator-alice"]).unwrap();
    // Another CA, whose certificates the API must not take.
    let stranger = dmd::pki::generate(&dir.0.join("other"), &["operator-mallory"]).unwrap();
    let server = pki.files("localhost").unwrap();
    let alice = pki.files("operator-alice").unwrap();
    let mallory = stranger.files("operator-mallory").unwrap();
    std::fs::write(dir.0.join("token"), format!("{TOKEN}\n")).unwrap();
    let file = dir.0.join("dmd.toml");
    std::fs::write(
        &file,
        format!(
            "[deployment]\nname = \"dms1\"\nserver_id = \"dms1.example\"\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"token\"\n\
             cert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            p(&server.cert),
            p(&server.key),
            p(&pki.ca_cert)
        ),
    )
    .unwrap();
    let text_of_file = std::fs::read_to_string(&file).unwrap();
    let config = dmd::config::parse(
        &text_of_file,
        &dmd::config::ProcessEnvironment::for_file(&file),
    )
    .unwrap();
    let spec = dmd::serve::spec(None, config).await.unwrap();
    let port = spec.admin.as_ref().unwrap().0.local_addr().unwrap().port();
    let bus = Bus::in_process();
    let _running = dmd::deployment::start(spec, bus.clone()).await.unwrap();
    let url = format!("https://127.0.0.1:{port}");
    let ca = p(&pki.ca_cert);

    // The operator's certificate, no token.
    let o = dmdctl(&[
        "--endpoint",
        &url,
        "--ca",
        &ca,
        "--cert",
        &p(&alice.cert),
        "--key",
        &p(&alice.key),
        "--json",
        "list",
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    // The token over TLS, no certificate.
    let o = dmdctl(&[
        "--endpoint",
        &url,
        "--ca",
        &ca,
        "--token",
        TOKEN,
        "--json",
        "list",
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    // A wrong token, no certificate: refused by the API (exit 4), the token not repeated.
    let o = dmdctl(&[
        "--endpoint",
        &url,
        "--ca",
        &ca,
        "--token",
        "not-the-token",
        "list",
    ])
    .await;
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(!text(&o).contains("not-the-token"), "{}", text(&o));
    // A certificate from another CA: the handshake fails, nothing is called (exit 1).
    let o = dmdctl(&[
        "--endpoint",
        &url,
        "--ca",
        &ca,
        "--cert",
        &p(&mallory.cert),
        "--key",
        &p(&mallory.key),
        "list",
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // In clear against the TLS listener: no answer that works.
    let o = dmdctl(&[
        "--endpoint",
        &format!("http://127.0.0.1:{port}"),
        "--token",
        TOKEN,
        "list",
    ])
    .await;
    assert!(!o.status.success(), "{}", text(&o));
    // TLS without the CA of the API's certificate: said before connecting (usage, exit 2).
    let o = dmdctl(&["--endpoint", &url, "--token", TOKEN, "list"]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // The audit names the certificate's subject and the token's fingerprint, never the token.
    let names = Names::new("dms1").unwrap();
    let mut consumer = bus
        .consumer(&ConsumerConfig {
            stream: names.stream(Area::Audit),
            durable: "admin-tls-test".into(),
            filter: names.area_wildcard(Area::Audit),
            ack_wait: Duration::from_secs(30),
        })
        .await
        .unwrap();
    let token_id = dm_orchestrator::admin::token_id(TOKEN);
    let mut callers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(callers.contains(&"cert:CN=operator-alice".to_string())
        && callers.contains(&token_id)
        && callers.contains(&"unauthenticated".to_string()))
    {
        assert!(Instant::now() < deadline, "audit callers: {callers:?}");
        if let Ok(Ok(Some(d))) = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
        {
            assert!(!String::from_utf8_lossy(&d.message.payload).contains(TOKEN));
            let e = <dm_proto::bus::v1::AuditEvent as prost::Message>::decode(
                d.message.payload.clone(),
            )
            .unwrap();
            callers.push(e.record.unwrap().caller);
            d.ack().await.unwrap();
        }
    }
}
