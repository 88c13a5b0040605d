//! The admin API's device inventory: provisioning's sealed device store, opened in the orchestrator's
//! process with the deployment's master key (so credentials go from the operator's call to the store
//! sealed, never over the bus in clear), and the `device_owners` bucket to tell which devices a
//! provisioning replica is busy with.

use dm_bus::{BusError, Kv};
use dm_orchestrator::admin::{Inventory, InventoryError};
use dm_proto::admin::v1::{AddOutcome, DeviceInfo, DeviceRecord};
use dm_provisioning::{Added, DeviceCredentials, DeviceStore};

/// The inventory of one deployment.
#[derive(Debug)]
pub struct DeviceInventory {
    store: DeviceStore,
    owners: Kv,
}

impl DeviceInventory {
    /// The inventory in the deployment's `devices` and `device_owners` buckets on `bus`.
    pub async fn open(
        bus: &dm_bus::Bus,
        names: &dm_bus::Names,
        key: dm_auth::MasterKey,
    ) -> Result<Self, BusError> {
        let devices = bus.kv(&names.bucket("devices")?, 1).await?;
        let owners = bus.kv(&names.bucket("device_owners")?, 1).await?;
        Ok(Self {
            store: DeviceStore::new(devices, key),
            owners,
        })
    }
}

fn unavailable(e: BusError) -> InventoryError {
    InventoryError::Unavailable(e.to_string())
}

#[tonic::async_trait]
impl Inventory for DeviceInventory {
    async fn add(&self, d: &DeviceRecord, replace: bool) -> Result<AddOutcome, InventoryError> {
        let creds = DeviceCredentials {
            server_secret: d.server_secret.clone(),
            server_nonce_b64: d.server_nonce_b64.clone(),
            client_name: d.client_name.clone(),
            client_secret: d.client_secret.clone(),
            client_nonce_b64: d.client_nonce_b64.clone(),
            ..Default::default()
        };
        dm_provisioning::inventory::check_record(&d.dev_id, &creds)
            .map_err(InventoryError::Invalid)?;
        let added = self
            .store
            .add(&d.dev_id, &creds, replace)
            .await
            .map_err(unavailable)?;
        tracing::info!(dev_id = %d.dev_id, ?added, "device inventory: add");
        Ok(match added {
            Added::Added => AddOutcome::Added,
            Added::Replaced => AddOutcome::Replaced,
            Added::Exists => AddOutcome::Exists,
        })
    }

    async fn list(&self) -> Result<Vec<DeviceInfo>, InventoryError> {
        let stored = self.store.list().await.map_err(unavailable)?;
        let mut out = Vec::with_capacity(stored.len());
        for d in stored {
            // A replica's id while it holds the device; empty once it let go.
            let session_pending = self
                .owners
                .get(&dm_bus::subjects::encode_key(&d.dev_id))
                .await
                .map_err(unavailable)?
                .is_some_and(|e| !e.value.is_empty());
            out.push(DeviceInfo {
                unreadable: d.client_name.is_none(),
                client_name: d.client_name.unwrap_or_default(),
                session_pending,
                secret_pending: d.secret_pending,
                dev_id: d.dev_id,
            });
        }
        Ok(out)
    }

    async fn remove(&self, dev_id: &str) -> Result<bool, InventoryError> {
        let removed = self.store.remove(dev_id).await.map_err(unavailable)?;
        tracing::info!(dev_id, removed, "device inventory: remove");
        Ok(removed)
    }
}
