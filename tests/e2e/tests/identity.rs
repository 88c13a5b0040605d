//! A.2 item 4 end to end: a certificate from an unknown CA cannot even complete the handshake with DMS-2's
//! gateway, and a known peer (DMS-1's real certificate) claiming another DMServerID gets 403. Either way
//! nothing changes at DMS-2.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use dm_bus::Bus;
use dm_bus::testing::NatsServer;
use dmd::demo::{D1, World};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Like a peer does (A.2): POSTs, and while the answer is 503 (the services are not ready yet), tries again
/// until a deadline.
async fn post(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    body: &str,
) -> Result<u16, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let answer = post_once(addr, ca, cert, key, body).await;
        if answer != Ok(503) || tokio::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POSTs `body` to DMS-2's gateway with the client certificate `cert`/`key`; the HTTP status, or the
/// TLS/IO error.
async fn post_once(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    body: &str,
) -> Result<u16, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_file(cert).unwrap()];
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let request = format!(
        "POST /delegation HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/vnd.dm.delegation+xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_certificates_and_false_identities_get_nowhere() {
    let server = NatsServer::start().unwrap();
    let dir = std::env::temp_dir().join(format!("dmd-e2e-identity-{}", std::process::id()));
    let w = World::start(&dir, Bus::connect(server.url()).await.unwrap(), 2)
        .await
        .unwrap();
    let gateway = w.dms2.gateway_addr.unwrap();
    let rogue = dmd::pki::generate(&dir.join("rogue"), &["rogue.example"]).unwrap();
    let rogue_files = rogue.files("rogue.example").unwrap();
    let ca = dir.join("ca.pem");
    // The shipped example, stamped now: its own Timestamp is older than the gateway's window.
    let mut example = dm_protocol::delegation::decode(
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/notif.xml"
        ))
        .unwrap()
        .as_bytes(),
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    example.timestamp = dm_protocol::types::UtcTime::from_unix(i64::try_from(now).unwrap());
    let notif = dm_protocol::delegation::encode(&example);
    assert!(notif.contains(&format!("<DMServerID>{D1}</DMServerID>")));

    // A certificate from a CA nobody trusts: the handshake fails, nothing reaches the orchestrator.
    let unknown = post(gateway, &ca, &rogue_files.cert, &rogue_files.key, &notif).await;
    assert!(unknown.is_err() || unknown == Ok(403), "{unknown:?}");

    // DMS-1's own certificate, but the message claims to come from another server: 403.
    let claim = notif.replace(
        &format!("<DMServerID>{D1}</DMServerID>"),
        "<DMServerID>dms3.other.example</DMServerID>",
    );
    let d1 = (dir.join(format!("{D1}.pem")), dir.join(format!("{D1}.key")));
    assert_eq!(post(gateway, &ca, &d1.0, &d1.1, &claim).await, Ok(403));
    // Nothing changed at DMS-2.
    assert!(
        w.dms2
            .orchestrator()
            .unwrap()
            .list()
            .await
            .unwrap()
            .is_empty()
    );

    // The same certificate with its own identity is taken (the control: the request itself was fine).
    assert_eq!(post(gateway, &ca, &d1.0, &d1.1, &notif).await, Ok(202));
    assert_eq!(
        w.dms2.orchestrator().unwrap().list().await.unwrap().len(),
        1
    );
    w.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
