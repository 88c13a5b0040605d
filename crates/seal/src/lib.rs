//! Encryption at rest and on the bus (ARCHITECTURE rule 7), shared by the services that keep secrets:
//! every record (a delegation's secrets in auth) has its own random 256-bit data key; the data key is
//! stored wrapped (encrypted) with the deployment's master key, the secrets encrypted with the data key.
//! Small records (a device's credentials in provisioning) may be sealed with the master key directly.
//! XChaCha20-Poly1305 with a random 192-bit nonce per encryption; the associated data binds each
//! ciphertext to its delegation and to its purpose, so a ciphertext moved to another key or field does not
//! open. Destroying a delegation's wrapped data key makes its secrets unreadable.
//!
//! A secret that must cross the bus (from the gateway to auth, from auth to the gateway or provisioning)
//! travels sealed with the [`BusKey`], derived from the master key with HKDF-SHA256: a reader of the bus
//! without the master key learns nothing, and the envelope's associated data names the delegation, the
//! field and the direction, so an envelope replayed into another delegation, field or direction does not
//! open.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroize;
/// A value wiped from memory when dropped (secrets opened from an envelope or a record).
pub use zeroize::Zeroizing;

const NONCE_LEN: usize = 24;
/// Versions the layout of what is sealed (nonce ‖ ciphertext ‖ tag).
const AAD_PREFIX: &str = "dmd-auth/v1";
/// The same for bus envelopes (another key, another prefix).
const BUS_AAD_PREFIX: &str = "dmd-bus/v1";
/// The HKDF `info` of the bus key: changing it changes the key.
const BUS_KEY_INFO: &[u8] = b"dmd bus envelope key v1";

/// Encryption failed (only possible for absurdly long inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a secret could not be encrypted")]
pub struct SealError;

/// A ciphertext that does not open: another master key, another delegation, or tampering. Carries no
/// detail on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a ciphertext does not open with this key (another master key, or tampered)")]
pub struct OpenError;

/// The deployment's master key (32 bytes). `Debug` never shows it.
#[derive(Clone)]
pub struct MasterKey {
    key: [u8; 32],
    ephemeral: bool,
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            key: bytes,
            ephemeral: false,
        }
    }

    /// A fresh random key from a CSPRNG (the embedded default: nothing sealed with it can be read by
    /// another process, or after a restart).
    pub fn random() -> Self {
        Self {
            key: rand::random::<[u8; 32]>(),
            ephemeral: true,
        }
    }

    /// Made by [`MasterKey::random`], not configured.
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    /// Reads padded standard base64 of exactly 32 bytes. The error names the rule, not the value.
    pub fn from_base64(text: &str) -> Result<Self, &'static str> {
        let bytes = B64
            .decode(text.trim())
            .map_err(|_| "must be padded standard base64 of exactly 32 bytes")?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "must be base64 of exactly 32 bytes")?;
        Ok(Self::from_bytes(key))
    }

    /// Encrypts a small record stored under `record_key` for the purpose `purpose` directly with the
    /// master key (no data key: nothing to destroy separately).
    pub fn seal(
        &self,
        record_key: &str,
        purpose: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        seal(&self.key, &aad(purpose, record_key), plaintext)
    }

    /// Opens what [`MasterKey::seal`] sealed under the same record key and purpose.
    pub fn open(
        &self,
        record_key: &str,
        purpose: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        open(&self.key, &aad(purpose, record_key), sealed)
    }

    /// Encrypts a fresh data key for the delegation stored under `record_key`.
    pub fn wrap(&self, record_key: &str, data_key: &DataKey) -> Result<Vec<u8>, SealError> {
        seal(&self.key, &aad("data-key", record_key), &data_key.0)
    }

    pub fn unwrap_key(&self, record_key: &str, wrapped: &[u8]) -> Result<DataKey, OpenError> {
        let bytes = open(&self.key, &aad("data-key", record_key), wrapped)?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| OpenError)?;
        Ok(DataKey(key))
    }

    /// The deployment's bus envelope key: HKDF-SHA256 of the master key with a fixed label. Every
    /// process of the deployment with the same master key derives the same key; the master key itself
    /// need not stay in a process that only seals or opens envelopes.
    pub fn bus_key(&self) -> BusKey {
        let mut key = [0u8; 32];
        let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(None, &self.key);
        // 32 bytes is far below HKDF-SHA256's limit (255 × 32): the expansion cannot fail.
        if hkdf.expand(BUS_KEY_INFO, &mut key).is_err() {
            key = [0; 32];
        }
        BusKey(key)
    }
}

/// Compared in constant time.
impl PartialEq for MasterKey {
    fn eq(&self, other: &Self) -> bool {
        self.key
            .iter()
            .zip(other.key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for MasterKey {}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// Which way a bus envelope goes: bound into its associated data, so that what auth hands out cannot be
/// passed back to it as something to keep, and the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// To auth, to be kept (`req.auth.lodge`).
    ToAuth,
    /// From auth, for a send or a device plan (`req.auth.fetch`).
    FromAuth,
    /// A device's message, from the provisioning replica it reached to the one that holds its session.
    ToDeviceOwner,
    /// The answer to it, back from that replica.
    FromDeviceOwner,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::ToAuth => "to-auth",
            Direction::FromAuth => "from-auth",
            Direction::ToDeviceOwner => "to-device-owner",
            Direction::FromDeviceOwner => "from-device-owner",
        }
    }
}

/// The names of the secrets that cross the bus, bound into their envelopes.
pub mod field {
    /// The peer's DM Account received in DELEGATION_START (TNDS).
    pub const PEER_ACCOUNT: &str = "peer-account";
    /// This server's DM Account sent in DELEGATION_START (TNDS).
    pub const OWN_ACCOUNT: &str = "own-account";
    /// The TEMP_DELEGATION_KEY (base64 text).
    pub const TEMP_KEY: &str = "temp-key";
    /// A device's SyncML message or the answer to it, forwarded between provisioning replicas (the
    /// server's commands carry the accounts' secrets it writes on the device).
    pub const DEVICE_MESSAGE: &str = "device-message";
}

/// The key that seals secrets crossing the bus ([`MasterKey::bus_key`]). `Debug` never shows it.
#[derive(Clone)]
pub struct BusKey([u8; 32]);

impl BusKey {
    /// Reads padded standard base64 of exactly 32 bytes (what [`BusKey::to_base64`] writes): the bus key
    /// given to a process that must not hold the master key. The error names the rule, not the value.
    pub fn from_base64(text: &str) -> Result<Self, &'static str> {
        let bytes = Zeroizing::new(
            B64.decode(text.trim())
                .map_err(|_| "must be padded standard base64 of exactly 32 bytes")?,
        );
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| "must be base64 of exactly 32 bytes")?;
        Ok(Self(key))
    }

    /// The key as padded standard base64, for a secret file of a process that needs only the bus key.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(self.0))
    }

    /// Seals one secret of the delegation stored under `record_key` (its field `field`), for `direction`.
    pub fn seal(
        &self,
        record_key: &str,
        field: &str,
        direction: Direction,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        seal(&self.0, &bus_aad(record_key, field, direction), plaintext)
    }

    /// Opens what [`BusKey::seal`] sealed for the same delegation, field and direction. The plaintext is
    /// wiped from memory when dropped.
    pub fn open(
        &self,
        record_key: &str,
        field: &str,
        direction: Direction,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        open(&self.0, &bus_aad(record_key, field, direction), sealed)
    }
}

/// Compared in constant time.
impl PartialEq for BusKey {
    fn eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for BusKey {}

impl std::fmt::Debug for BusKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BusKey(<redacted>)")
    }
}

impl Drop for BusKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

fn bus_aad(record_key: &str, field: &str, direction: Direction) -> Vec<u8> {
    format!(
        "{BUS_AAD_PREFIX}/{}/{field}/{record_key}",
        direction.as_str()
    )
    .into_bytes()
}

/// One delegation's data key.
pub struct DataKey([u8; 32]);

impl DataKey {
    pub fn random() -> Self {
        Self(rand::random::<[u8; 32]>())
    }

    /// Encrypts one secret of the delegation under `record_key`, for the purpose `field`.
    pub fn seal(
        &self,
        record_key: &str,
        field: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        seal(&self.0, &aad(field, record_key), plaintext)
    }

    pub fn open(
        &self,
        record_key: &str,
        field: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        open(&self.0, &aad(field, record_key), sealed)
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

fn aad(purpose: &str, record_key: &str) -> Vec<u8> {
    format!("{AAD_PREFIX}/{purpose}/{record_key}").into_bytes()
}

fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let nonce_bytes = rand::random::<[u8; NONCE_LEN]>();
    let nonce = XNonce::from(nonce_bytes);
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| SealError)?;
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(&sealed);
    Ok(out)
}

fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    let (nonce_bytes, ciphertext) = sealed.split_at_checked(NONCE_LEN).ok_or(OpenError)?;
    let nonce_bytes: [u8; NONCE_LEN] = nonce_bytes.try_into().map_err(|_| OpenError)?;
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(
            &XNonce::from(nonce_bytes),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| OpenError)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_keys_and_context() {
        let master = MasterKey::random();
        let data = DataKey::random();
        let wrapped = master.wrap("dms2/abc", &data).unwrap();
        let sealed = data
            .seal("dms2/abc", "temp-key", b"the secret value")
            .unwrap();
        assert!(
            !sealed
                .windows(b"the secret value".len())
                .any(|w| w == b"the secret value")
        );
        let again = master.unwrap_key("dms2/abc", &wrapped).unwrap();
        assert_eq!(
            again
                .open("dms2/abc", "temp-key", &sealed)
                .unwrap()
                .as_slice(),
            b"the secret value"
        );
        // Another master key, another delegation, another field, a flipped bit: nothing opens.
        assert_eq!(
            MasterKey::random()
                .unwrap_key("dms2/abc", &wrapped)
                .unwrap_err(),
            OpenError
        );
        assert!(master.unwrap_key("dms2/abd", &wrapped).is_err());
        assert!(again.open("dms2/abc", "peer-account", &sealed).is_err());
        let mut flipped = sealed.clone();
        if let Some(b) = flipped.last_mut() {
            *b ^= 1;
        }
        assert!(again.open("dms2/abc", "temp-key", &flipped).is_err());
        assert!(again.open("dms2/abc", "temp-key", &sealed[..10]).is_err());
        // Two seals of one value differ (fresh nonces).
        assert_ne!(
            data.seal("k", "f", b"x").unwrap(),
            data.seal("k", "f", b"x").unwrap()
        );
    }

    #[test]
    fn bus_envelopes_open_only_for_their_delegation_field_and_direction() {
        let master = MasterKey::from_bytes([7; 32]);
        let bus = master.bus_key();
        // The same master key gives the same bus key (another process of the deployment opens it).
        let again = MasterKey::from_bytes([7; 32]).bus_key();
        let sealed = bus
            .seal(
                "dms2/abc",
                "temp-key",
                Direction::ToAuth,
                b"the secret value",
            )
            .unwrap();
        assert!(
            !sealed
                .windows(b"the secret value".len())
                .any(|w| w == b"the secret value")
        );
        assert_eq!(
            again
                .open("dms2/abc", "temp-key", Direction::ToAuth, &sealed)
                .unwrap()
                .as_slice(),
            b"the secret value"
        );
        // Another delegation, field, direction or master key: nothing opens.
        assert!(
            bus.open("dms2/abd", "temp-key", Direction::ToAuth, &sealed)
                .is_err()
        );
        assert!(
            bus.open("dms2/abc", "peer-account", Direction::ToAuth, &sealed)
                .is_err()
        );
        assert!(
            bus.open("dms2/abc", "temp-key", Direction::FromAuth, &sealed)
                .is_err()
        );
        assert!(
            MasterKey::from_bytes([8; 32])
                .bus_key()
                .open("dms2/abc", "temp-key", Direction::ToAuth, &sealed)
                .is_err()
        );
        // The bus key is not the master key: an envelope does not open as a record sealed at rest.
        assert!(master.open("dms2/abc", "temp-key", &sealed).is_err());
        assert_eq!(format!("{bus:?}"), "BusKey(<redacted>)");
        // Given to a process as base64, it is the same key.
        assert_eq!(BusKey::from_base64(&bus.to_base64()).unwrap(), bus);
        assert!(BusKey::from_base64("AAEC").is_err());
    }

    #[test]
    fn master_key_from_base64() {
        let k = MasterKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let mut expected = [0u8; 32];
        for (i, b) in expected.iter_mut().enumerate() {
            *b = u8::try_from(i).unwrap();
        }
        assert_eq!(k, MasterKey::from_bytes(expected));
        assert_eq!(format!("{k:?}"), "MasterKey(<redacted>)");
        assert!(MasterKey::from_base64("AAEC").is_err());
        assert!(MasterKey::from_base64("not base64").is_err());
    }
}
