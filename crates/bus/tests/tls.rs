//! The bus over a NATS server that asks for TLS and credentials (issue 13, "Channels"): a real
//! `nats-server` with certificates made here, clients with the right settings connect and work, clients
//! with the wrong ones are refused with a clear error that repeats no secret.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use dm_bus::testing::{NatsServer, ServerAuth, ServerSecurity, ServerTls};
use dm_bus::{Bus, BusError, BusOptions, Headers, NatsCredentials, NatsSecurity};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The certificates of one test: a CA, the server's certificate and a client's, and a second CA
/// nobody trusts (with a client certificate of its own).
struct Pki {
    _dir: tempdir::Dir,
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    stranger_ca: PathBuf,
    stranger_client: (PathBuf, PathBuf),
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p = std::env::temp_dir()
                .join(format!("dm-bus-tls-{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn new_ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.pem())
}

fn leaf(
    dir: &Path,
    name: &str,
    issuer: &Issuer<'static, KeyPair>,
    usage: ExtendedKeyUsagePurpose,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn pki(tag: &str) -> Pki {
    let dir = tempdir::Dir::new(tag);
    let (issuer, ca_pem) = new_ca("test NATS CA");
    let ca = dir.0.join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let server = leaf(&dir.0, "nats", &issuer, ExtendedKeyUsagePurpose::ServerAuth);
    let client = leaf(&dir.0, "dmd", &issuer, ExtendedKeyUsagePurpose::ClientAuth);
    let (stranger, stranger_pem) = new_ca("stranger CA");
    let stranger_ca = dir.0.join("stranger-ca.pem");
    std::fs::write(&stranger_ca, stranger_pem).unwrap();
    let stranger_client = leaf(
        &dir.0,
        "stranger",
        &stranger,
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    Pki {
        _dir: dir,
        ca,
        server,
        client,
        stranger_ca,
        stranger_client,
    }
}

/// Starts the server (a missing nats-server fails the test, as in the other bus tests).
fn server(security: ServerSecurity) -> Option<NatsServer> {
    Some(
        NatsServer::start_secured(security)
            .expect("a nats-server for the tests (scripts/test installs one)"),
    )
}

fn options(security: NatsSecurity) -> BusOptions {
    BusOptions {
        replicas: 1,
        security,
    }
}

/// A round trip through JetStream and a key-value bucket: the connection works, not just the handshake.
async fn works(bus: &Bus) {
    let names = dm_bus::Names::new("tls").unwrap();
    let kv = bus.kv(&names.bucket("probe").unwrap(), 1).await.unwrap();
    kv.create("k", bytes::Bytes::from_static(b"v"))
        .await
        .unwrap();
    assert_eq!(
        kv.get("k").await.unwrap().map(|e| e.value),
        Some(bytes::Bytes::from_static(b"v"))
    );
    bus.ensure_work_queue(&names.work_queue(dm_bus::Area::Cmd))
        .await
        .unwrap();
    bus.publish(
        &names.subject(dm_bus::Area::Cmd, "probe").unwrap(),
        Headers::new(),
        bytes::Bytes::from_static(b"{}"),
        "probe-1",
    )
    .await
    .unwrap();
}

/// Connecting fails; the error says why and repeats none of `secrets`.
async fn refused(url: &str, security: NatsSecurity, secrets: &[&str], why: &str) -> BusError {
    let err = Bus::connect_with(url, options(security))
        .await
        .expect_err("connected with the wrong settings");
    let text = format!("{err} {err:?}");
    for s in secrets {
        assert!(!text.contains(s), "the error repeats a secret: {text}");
    }
    assert!(text.contains(why), "{text}");
    err
}

#[tokio::test]
async fn tls_and_nkey_connect_and_work_the_wrong_settings_are_refused() {
    let pki = pki("nkey");
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let Some(nats) = server(ServerSecurity {
        tls: Some(ServerTls {
            cert: pki.server.0.clone(),
            key: pki.server.1.clone(),
            client_ca: None,
        }),
        auth: Some(ServerAuth::Nkey(user.public_key())),
    }) else {
        return;
    };
    let right = NatsSecurity {
        require_tls: true,
        ca: Some(pki.ca.clone()),
        client_cert: None,
        credentials: Some(NatsCredentials::NkeySeed(seed.clone())),
    };
    let bus = Bus::connect_with(nats.url(), options(right.clone()))
        .await
        .unwrap();
    works(&bus).await;

    // The server's certificate does not chain to the CA given.
    refused(
        nats.url(),
        NatsSecurity {
            ca: Some(pki.stranger_ca.clone()),
            ..right.clone()
        },
        &[&seed],
        "TLS failed",
    )
    .await;
    // No CA at all: the system's roots do not know the test CA either.
    refused(
        nats.url(),
        NatsSecurity {
            ca: None,
            require_tls: false,
            ..right.clone()
        },
        &[&seed],
        "TLS failed",
    )
    .await;
    // Another user's seed.
    let other = nkeys::KeyPair::new_user().seed().unwrap();
    refused(
        nats.url(),
        NatsSecurity {
            credentials: Some(NatsCredentials::NkeySeed(other.clone())),
            ..right.clone()
        },
        &[&seed, &other],
        "refused the credentials",
    )
    .await;
    // No credentials.
    refused(
        nats.url(),
        NatsSecurity {
            credentials: None,
            ..right.clone()
        },
        &[&seed],
        "refused the credentials",
    )
    .await;
    // Not a seed at all: said before any connection, without repeating it.
    let garbage = "SUnot-a-seed-but-secret";
    let err = refused(
        nats.url(),
        NatsSecurity {
            credentials: Some(NatsCredentials::NkeySeed(garbage.into())),
            ..right
        },
        &[garbage],
        "nkey seed",
    )
    .await;
    assert!(matches!(err, BusError::InvalidOption(_)), "{err:?}");
}

#[tokio::test]
async fn mutual_tls_and_a_token() {
    let pki = pki("mtls");
    let token = "s3cret-nats-token";
    let Some(nats) = server(ServerSecurity {
        tls: Some(ServerTls {
            cert: pki.server.0.clone(),
            key: pki.server.1.clone(),
            client_ca: Some(pki.ca.clone()),
        }),
        auth: Some(ServerAuth::Token(token.into())),
    }) else {
        return;
    };
    let right = NatsSecurity {
        require_tls: true,
        ca: Some(pki.ca.clone()),
        client_cert: Some(pki.client.clone()),
        credentials: Some(NatsCredentials::Token(token.into())),
    };
    let bus = Bus::connect_with(nats.url(), options(right.clone()))
        .await
        .unwrap();
    works(&bus).await;

    // No client certificate: the server ends the handshake.
    refused(
        nats.url(),
        NatsSecurity {
            client_cert: None,
            ..right.clone()
        },
        &[token],
        "cannot connect",
    )
    .await;
    // A client certificate from a CA the server does not trust.
    refused(
        nats.url(),
        NatsSecurity {
            client_cert: Some(pki.stranger_client.clone()),
            ..right.clone()
        },
        &[token],
        "cannot connect",
    )
    .await;
    // The right certificate, the wrong token.
    refused(
        nats.url(),
        NatsSecurity {
            credentials: Some(NatsCredentials::Token("wrong-token".into())),
            ..right
        },
        &[token, "wrong-token"],
        "refused the credentials",
    )
    .await;
}

#[tokio::test]
async fn require_tls_refuses_a_server_in_clear_and_user_password_works() {
    let password = "pa55-w0rd-secret";
    let Some(nats) = server(ServerSecurity {
        tls: None,
        auth: Some(ServerAuth::UserPassword {
            user: "dmd".into(),
            password: password.into(),
        }),
    }) else {
        return;
    };
    let creds = NatsCredentials::UserPassword {
        user: "dmd".into(),
        password: password.into(),
    };
    // The password would go in clear: refused before it is sent.
    refused(
        nats.url(),
        NatsSecurity {
            require_tls: true,
            credentials: Some(creds.clone()),
            ..NatsSecurity::default()
        },
        &[password],
        "TLS",
    )
    .await;
    let bus = Bus::connect_with(
        nats.url(),
        options(NatsSecurity {
            credentials: Some(creds),
            ..NatsSecurity::default()
        }),
    )
    .await
    .unwrap();
    works(&bus).await;
    assert!(
        !format!("{:?}", NatsCredentials::Token(password.into())).contains(password),
        "Debug shows a secret"
    );
}
