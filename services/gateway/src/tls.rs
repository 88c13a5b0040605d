//! TLS of the gateway: the inbound server config with a client-certificate verifier that accepts a chain
//! to a configured CA **or** a pinned SubjectPublicKeyInfo (the trust registry of A.2), the outbound client
//! configs per peer, and what a verified peer certificate says about its holder (SPKI pin, SANs, CA).
//!
//! Every config is built with the ring provider explicitly (STACK.md: one provider everywhere).

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use sha2::{Digest, Sha256};

use crate::config::{Config, ConfigError, parse_pin};

/// The crypto provider of every TLS config of the gateway.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default provider, once; a provider installed before (by this or
/// another service of the same process) is left as it is.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of the DER SubjectPublicKeyInfo of a certificate, as lower-case hex: the pin of a certificate
/// (what `trust.pins` holds and what the identity check carries).
pub fn spki_sha256_hex(cert_der: &[u8]) -> Result<String, String> {
    spki_sha256(&CertificateDer::from(cert_der)).map(|d| hex(&d))
}

fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], String> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let spki = parsed.subject_public_key_info();
    Ok(Sha256::digest(spki.as_ref()).into())
}

/// What the verified client certificate of a connection says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, lower-case hex.
    pub spki_sha256: String,
    /// The certificate's DNS and URI subject alternative names.
    pub subject_alt_names: Vec<String>,
    /// The name of the configured CA the certificate chains to; empty when it was accepted by its pin.
    pub issuer_ca: String,
}

/// A configured CA: its name and a verifier that trusts only it.
struct CaVerifier {
    name: String,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// Accepts a client certificate that chains to one of the configured CAs (with the clientAuth usage and
/// a valid time) or whose SPKI SHA-256 is pinned; refuses every other one in the handshake.
pub struct TrustVerifier {
    cas: Vec<CaVerifier>,
    pins: HashSet<[u8; 32]>,
    hints: Vec<DistinguishedName>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for TrustVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustVerifier")
            .field(
                "cas",
                &self.cas.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            )
            .field("pins", &self.pins.len())
            .finish()
    }
}

impl TrustVerifier {
    /// `cas`: (name, trust anchors) per configured CA; `pins`: SPKI SHA-256 digests.
    pub(crate) fn new(
        cas: Vec<(String, Vec<CertificateDer<'static>>)>,
        pins: HashSet<[u8; 32]>,
    ) -> Result<Self, String> {
        let provider = provider();
        let mut verifiers = Vec::new();
        let mut hints = Vec::new();
        for (name, certs) in cas {
            let mut roots = RootCertStore::empty();
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("CA '{name}' is not a usable trust anchor: {e}"))?;
            }
            hints.extend(roots.subjects());
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("CA '{name}': {e}"))?;
            verifiers.push(CaVerifier { name, verifier });
        }
        Ok(Self {
            cas: verifiers,
            pins,
            hints,
            algs: provider.signature_verification_algorithms,
        })
    }

    /// The first configured CA the chain verifies against at `now`.
    fn chained_ca(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<&str, rustls::Error> {
        let mut first_error = None;
        for ca in &self.cas {
            match ca
                .verifier
                .verify_client_cert(end_entity, intermediates, now)
            {
                Ok(_) => return Ok(&ca.name),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )))
    }

    fn pinned(&self, end_entity: &CertificateDer<'_>) -> bool {
        spki_sha256(end_entity).is_ok_and(|d| self.pins.contains(&d))
    }

    /// Describes the (already verified) certificate chain of a connection.
    pub fn identify(&self, chain: &[CertificateDer<'_>]) -> Result<PeerIdentity, String> {
        let (end_entity, intermediates) = chain
            .split_first()
            .ok_or_else(|| "no client certificate".to_string())?;
        let parsed = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let mut subject_alt_names: Vec<String> =
            parsed.valid_dns_names().map(str::to_string).collect();
        subject_alt_names.extend(parsed.valid_uri_names().map(str::to_string));
        let spki = Sha256::digest(parsed.subject_public_key_info().as_ref());
        let issuer_ca = match self.chained_ca(end_entity, intermediates, UnixTime::now()) {
            Ok(name) => name.to_string(),
            Err(e) => {
                if !self.pinned(end_entity) {
                    return Err(format!("certificate no longer verifies: {e}"));
                }
                String::new()
            }
        };
        Ok(PeerIdentity {
            spki_sha256: hex(&spki),
            subject_alt_names,
            issuer_ca,
        })
    }
}

impl ClientCertVerifier for TrustVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // With pins configured, a certificate from any issuer may be acceptable: hint nothing, so clients
        // send what they have.
        if self.pins.is_empty() {
            &self.hints
        } else {
            &[]
        }
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.chained_ca(end_entity, intermediates, now) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(_) if self.pinned(end_entity) => Ok(ClientCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Reads every certificate of a PEM file.
pub(crate) fn load_certs(
    key: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| ConfigError::file(key, path, pem_reason(&e, "certificate")))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::file(key, path, pem_reason(&e, "certificate")))?;
    if certs.is_empty() {
        return Err(ConfigError::file(
            key,
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    for cert in &certs {
        webpki::EndEntityCert::try_from(cert).map_err(|e| {
            ConfigError::file(key, path, format!("holds an unreadable certificate: {e}"))
        })?;
    }
    Ok(certs)
}

/// Reads the private key of a PEM file. Errors never quote the file's content.
fn load_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| ConfigError::file(key, path, pem_reason(&e, "private key")))
}

fn pem_reason(e: &rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot be read: {io}"),
        Error::NoItemsFound => format!("holds no PEM {what}"),
        _ => format!("is not a valid PEM {what} file"),
    }
}

/// The TLS material of a gateway, read from the files of its configuration.
pub(crate) struct Material {
    pub server: Arc<rustls::ServerConfig>,
    pub verifier: Arc<TrustVerifier>,
    /// Per peer ServerID: the client config verifying that peer's server certificate.
    pub clients: Vec<(String, Arc<rustls::ClientConfig>)>,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("verifier", &self.verifier)
            .field(
                "peers",
                &self
                    .clients
                    .iter()
                    .map(|(p, _)| p.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Reads and checks every file the configuration names and builds the TLS configs.
pub(crate) fn load(config: &Config) -> Result<Material, ConfigError> {
    let chain = load_certs("tls.cert", &config.tls.cert)?;
    let key = load_key("tls.key", &config.tls.key)?;
    let mut cas = Vec::new();
    for (i, ca) in config.trust.cas.iter().enumerate() {
        let field = format!("trust.ca[{i}].pem");
        let certs = load_certs(&field, &ca.pem)?;
        let name = match &ca.name {
            Some(name) => name.clone(),
            None => {
                let first = certs
                    .first()
                    .ok_or_else(|| ConfigError::file(&field, &ca.pem, "holds no certificate"))?;
                let digest =
                    spki_sha256(first).map_err(|e| ConfigError::file(&field, &ca.pem, e))?;
                format!("sha256:{}", hex(&digest))
            }
        };
        cas.push((name, certs));
    }
    let mut pins = HashSet::new();
    for (i, pin) in config.trust.pins.iter().enumerate() {
        let digest = parse_pin(pin)
            .map_err(|reason| ConfigError::invalid(format!("trust.pins[{i}]"), reason))?;
        pins.insert(digest);
    }
    let verifier = Arc::new(
        TrustVerifier::new(cas, pins).map_err(|reason| ConfigError::invalid("trust.ca", reason))?,
    );
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::invalid("tls", e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            ConfigError::file(
                "tls.key",
                &config.tls.key,
                format!("does not fit tls.cert: {e}"),
            )
        })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut clients = Vec::new();
    for (i, peer) in config.peers.iter().enumerate() {
        let field = format!("peer[{i}].ca");
        let mut roots = RootCertStore::empty();
        for cert in load_certs(&field, &peer.ca)? {
            roots.add(cert).map_err(|e| {
                ConfigError::file(
                    &field,
                    &peer.ca,
                    format!("is not a usable trust anchor: {e}"),
                )
            })?;
        }
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::invalid("tls", e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| {
                ConfigError::file(
                    "tls.key",
                    &config.tls.key,
                    format!("does not fit tls.cert: {e}"),
                )
            })?;
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Connections are pooled and new ones are rare: each does the full handshake, so the peer's
        // certificate is verified again (expiry, rotation) instead of trusted from a resumed session.
        client.resumption = rustls::client::Resumption::disabled();
        clients.push((peer.server_id.clone(), Arc::new(client)));
    }
    Ok(Material {
        server: Arc::new(server),
        verifier,
        clients,
    })
}
