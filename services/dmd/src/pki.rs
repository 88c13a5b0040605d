//! A throw-away PKI for `dmd demo` and the end-to-end tests: one CA and, per DM Server, a certificate for
//! both ends of mutual TLS (serverAuth and clientAuth), its SAN naming the ServerID, `localhost` and
//! 127.0.0.1. Written as PEM files into a directory the caller owns.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Where one server's files are.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The CA file and the servers' files.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub servers: Vec<(String, ServerFiles)>,
}

impl Pki {
    pub fn files(&self, server_id: &str) -> Option<&ServerFiles> {
        self.servers
            .iter()
            .find(|(s, _)| s == server_id)
            .map(|(_, f)| f)
    }
}

/// Makes a CA and one certificate per ServerID under `dir`.
pub fn generate(dir: &Path, server_ids: &[&str]) -> anyhow::Result<Pki> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca_key = KeyPair::generate().context("CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "dmd demo CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).context("CA certificate")?;
    let issuer = Issuer::new(ca_params, ca_key);
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).context("writing the CA")?;
    let mut servers = Vec::new();
    for id in server_ids {
        let key = KeyPair::generate().context("server key")?;
        let mut params = CertificateParams::new(vec![id.to_string(), "localhost".to_string()])
            .context("server parameters")?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        params.distinguished_name.push(DnType::CommonName, *id);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &issuer)
            .context("server certificate")?;
        let files = ServerFiles {
            cert: dir.join(format!("{id}.pem")),
            key: dir.join(format!("{id}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).context("writing a certificate")?;
        std::fs::write(&files.key, key.serialize_pem()).context("writing a key")?;
        servers.push((id.to_string(), files));
    }
    Ok(Pki {
        ca_cert: ca_path,
        servers,
    })
}
