//! The device inventory at rest: one entry per device in the `devices` bucket (key: the encoded device
//! id), its credentials sealed with the deployment's master key and bound to the device id. Provisioning
//! reads and writes it as sessions rotate nonces and secrets; the admin API adds, lists and removes
//! devices through the same type, so that both seal the same way. Presence of a key is what "this server
//! manages the device" means (step 1 checks it without opening anything).

use bytes::Bytes;
use dm_bus::{BusError, Kv};

use crate::DeviceCredentials;

/// What a device's sealed credentials are bound to.
const DEVICE_PURPOSE: &str = "device-credentials";

/// The devices' credentials at rest, sealed.
pub struct DeviceStore {
    pub(crate) kv: Kv,
    key: dm_seal::MasterKey,
}

impl std::fmt::Debug for DeviceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStore").finish_non_exhaustive()
    }
}

/// What adding a device did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Added,
    Replaced,
    /// The device was there and replacing was not asked for: nothing written.
    Exists,
}

/// A stored device as an operator may see it: no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDevice {
    pub dev_id: String,
    /// `None`: the record does not open with this master key (another key, or tampering).
    pub client_name: Option<String>,
    /// A new secret went to the device and its acceptance was not seen yet.
    pub secret_pending: bool,
}

impl DeviceStore {
    /// The store in `kv` (the deployment's `devices` bucket), sealing with `key`.
    pub fn new(kv: Kv, key: dm_seal::MasterKey) -> Self {
        Self { kv, key }
    }

    pub(crate) fn seal(&self, dev_id: &str, creds: &DeviceCredentials) -> Result<Bytes, BusError> {
        let unsealable = || BusError::InvalidName("device credentials".into());
        let plain = serde_json::to_vec(creds).map_err(|_| unsealable())?;
        let sealed = self
            .key
            .seal(dev_id, DEVICE_PURPOSE, &plain)
            .map_err(|_| unsealable())?;
        Ok(Bytes::from(sealed))
    }

    /// The credentials sealed for `dev_id`; `None` for another master key, or tampering.
    pub(crate) fn open(&self, dev_id: &str, sealed: &[u8]) -> Option<DeviceCredentials> {
        let plain = self.key.open(dev_id, DEVICE_PURPOSE, sealed).ok()?;
        serde_json::from_slice(&plain).ok()
    }

    /// Adds a device (created only if absent, unless `replace`).
    pub async fn add(
        &self,
        dev_id: &str,
        creds: &DeviceCredentials,
        replace: bool,
    ) -> Result<Added, BusError> {
        let key = dm_bus::subjects::encode_key(dev_id);
        let sealed = self.seal(dev_id, creds)?;
        match self.kv.create(&key, sealed.clone()).await {
            Ok(_) => return Ok(Added::Added),
            Err(BusError::Conflict(_)) if !replace => return Ok(Added::Exists),
            Err(BusError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
        crate::put(&self.kv, &key, sealed).await?;
        Ok(Added::Replaced)
    }

    /// Removes a device; false when there was none.
    pub async fn remove(&self, dev_id: &str) -> Result<bool, BusError> {
        let key = dm_bus::subjects::encode_key(dev_id);
        if self.kv.get(&key).await?.is_none() {
            return Ok(false);
        }
        self.kv.delete(&key).await?;
        Ok(true)
    }

    /// Whether the device is in the inventory (nothing is opened).
    pub async fn contains(&self, dev_id: &str) -> Result<bool, BusError> {
        Ok(self
            .kv
            .get(&dm_bus::subjects::encode_key(dev_id))
            .await?
            .is_some())
    }

    /// Every stored device, by id.
    pub async fn list(&self) -> Result<Vec<StoredDevice>, BusError> {
        let mut out = Vec::new();
        for key in self.kv.keys().await? {
            let (Some(dev_id), Some(entry)) =
                (dm_bus::subjects::decode_key(&key), self.kv.get(&key).await?)
            else {
                continue;
            };
            let creds = self.open(&dev_id, &entry.value);
            out.push(StoredDevice {
                client_name: creds.as_ref().map(|c| c.client_name.clone()),
                secret_pending: creds.as_ref().is_some_and(|c| {
                    c.pending_server_secret.is_some() || c.pending_client_secret.is_some()
                }),
                dev_id,
            });
        }
        Ok(out)
    }
}

/// Why a device record cannot be added; the text never holds a secret.
pub fn check_record(dev_id: &str, creds: &DeviceCredentials) -> Result<(), String> {
    if dev_id.trim().is_empty() {
        return Err("dev_id is empty".into());
    }
    if dev_id.trim() != dev_id || dev_id.chars().any(char::is_control) {
        return Err("dev_id has surrounding white space or control characters".into());
    }
    if dev_id.len() > 256 {
        return Err("dev_id is longer than 256 bytes".into());
    }
    for (field, value) in [
        ("server_secret", &creds.server_secret),
        ("client_name", &creds.client_name),
        ("client_secret", &creds.client_secret),
    ] {
        if value.is_empty() {
            return Err(format!("{field} is empty"));
        }
    }
    for (field, value) in [
        ("server_nonce_b64", &creds.server_nonce_b64),
        ("client_nonce_b64", &creds.client_nonce_b64),
    ] {
        if dm_protocol::auth::decode_nonce(value).is_err() {
            return Err(format!("{field} is not base64"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn creds() -> DeviceCredentials {
        DeviceCredentials {
            server_secret: "s3cret".into(),
            server_nonce_b64: "bm9uY2U=".into(),
            client_name: "IMEI:1".into(),
            client_secret: "c1ient".into(),
            client_nonce_b64: "bm9uY2U=".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn add_refuses_to_overwrite_unless_asked_and_remove_forgets() {
        let bus = dm_bus::Bus::in_process();
        let kv = bus.kv("dmd_t_devices", 1).await.unwrap();
        let store = DeviceStore::new(kv.clone(), dm_seal::MasterKey::random());
        assert_eq!(
            store.add("IMEI:1", &creds(), false).await.unwrap(),
            Added::Added
        );
        let mut other = creds();
        other.server_secret = "another".into();
        assert_eq!(
            store.add("IMEI:1", &other, false).await.unwrap(),
            Added::Exists
        );
        let stored = kv.get("IMEI=3A1").await.unwrap().unwrap();
        assert_eq!(store.open("IMEI:1", &stored.value), Some(creds()));
        // Sealed, bound to the device: no secret in clear, and another id does not open it.
        assert!(!String::from_utf8_lossy(&stored.value).contains("s3cret"));
        assert_eq!(store.open("IMEI:2", &stored.value), None);
        assert_eq!(
            store.add("IMEI:1", &other, true).await.unwrap(),
            Added::Replaced
        );
        let listed = store.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].client_name.as_deref(), Some("IMEI:1"));
        assert!(store.contains("IMEI:1").await.unwrap());
        assert!(store.remove("IMEI:1").await.unwrap());
        assert!(!store.remove("IMEI:1").await.unwrap());
        assert!(!store.contains("IMEI:1").await.unwrap());
        // Added again after removal.
        assert_eq!(
            store.add("IMEI:1", &creds(), false).await.unwrap(),
            Added::Added
        );
    }

    #[test]
    fn records_are_checked_without_quoting_secrets() {
        assert!(check_record("IMEI:1", &creds()).is_ok());
        assert!(check_record("", &creds()).is_err());
        let mut bad = creds();
        bad.server_nonce_b64 = "not base64 s3cret!".into();
        let e = check_record("IMEI:1", &bad).unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
        bad = creds();
        bad.client_secret.clear();
        assert_eq!(
            check_record("IMEI:1", &bad).unwrap_err(),
            "client_secret is empty"
        );
    }
}
