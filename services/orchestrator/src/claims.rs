//! Device claims (ARCHITECTURE rule 9): one delegation in progress per device, and no overlap with an
//! Active scope. A start writes its claim into a key-value entry per device with compare-and-set, so
//! checking it costs one read of that entry plus one read per delegation holding the same device — never
//! a scan of every stored delegation. What a holder holds (the whole device while in progress, its scope
//! while Active) comes from its stored state through the decider's own rule (`claim_of`); holders that
//! ended are dropped at the next write, and the orchestrator releases a claim when its delegation ends.

use bytes::Bytes;
use dm_bus::{BusError, Kv};
use dm_proto::bus::v1::{ClaimHolder, DeviceClaims, StoredDelegation};
use dm_saga::{Claim, claim_of, start_conflicts};
use prost::Message as _;

/// A holder whose state is not stored yet (its start is being decided, or its replica died in between)
/// keeps the device this long after it claimed it.
const PENDING_MS: i64 = 120_000;

/// How many times a claim or release is tried against concurrent writers of the same device.
const ATTEMPTS: usize = 32;

#[derive(Debug)]
pub(crate) struct Claims {
    /// Device → its holders.
    kv: Kv,
    /// The delegations, to read what each holder holds.
    delegations: Kv,
}

/// Whether the device was claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claimed {
    Yes,
    /// Another delegation holds the device, or a scope that overlaps.
    Conflict,
}

impl Claims {
    pub(crate) fn new(kv: Kv, delegations: Kv) -> Self {
        Self { kv, delegations }
    }

    async fn read(&self, key: &str) -> Result<(DeviceClaims, Option<u64>), BusError> {
        Ok(match self.kv.get(key).await? {
            // An entry that cannot be read holds nothing that can be checked: it is rewritten.
            Some(entry) => (
                DeviceClaims::decode(entry.value).unwrap_or_default(),
                Some(entry.revision),
            ),
            None => (DeviceClaims::default(), None),
        })
    }

    async fn write(
        &self,
        key: &str,
        claims: &DeviceClaims,
        revision: Option<u64>,
    ) -> Result<bool, BusError> {
        let bytes = Bytes::from(claims.encode_to_vec());
        let written = match revision {
            None => self.kv.create(key, bytes).await,
            Some(rev) => self.kv.update(key, bytes, rev).await,
        };
        match written {
            Ok(_) => Ok(true),
            Err(BusError::Conflict(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// What a holder holds now: `None` when it holds nothing (ended, or gone long ago).
    async fn held(
        &self,
        holder: &ClaimHolder,
        dev_id: &str,
        now: i64,
    ) -> Result<Option<Claim>, BusError> {
        let Some(entry) = self.delegations.get(&holder.delegation_key).await? else {
            return Ok(
                (now - holder.claimed_at_ms < PENDING_MS).then(|| Claim::Exclusive {
                    device: dev_id.to_string(),
                }),
            );
        };
        let state = StoredDelegation::decode(entry.value)
            .ok()
            .and_then(|s| s.state);
        Ok(state.map(|s| claim_of(&s)).filter(|c| *c != Claim::None))
    }

    /// Claims `dev_id` over `scope` for the delegation stored under `holder_key`, unless a live holder
    /// conflicts.
    pub(crate) async fn claim(
        &self,
        dev_id: &str,
        scope: &[String],
        holder_key: &str,
        now: i64,
    ) -> Result<Claimed, BusError> {
        let key = dm_bus::subjects::encode_key(dev_id);
        for _ in 0..ATTEMPTS {
            let (claims, revision) = self.read(&key).await?;
            let mut live = Vec::with_capacity(claims.holders.len() + 1);
            for holder in claims.holders {
                if holder.delegation_key == holder_key {
                    continue;
                }
                if let Some(claim) = self.held(&holder, dev_id, now).await? {
                    if start_conflicts([&claim], dev_id, scope) {
                        return Ok(Claimed::Conflict);
                    }
                    live.push(holder);
                }
            }
            live.push(ClaimHolder {
                delegation_key: holder_key.to_string(),
                claimed_at_ms: now,
            });
            if self
                .write(&key, &DeviceClaims { holders: live }, revision)
                .await?
            {
                return Ok(Claimed::Yes);
            }
        }
        Err(BusError::Conflict(key))
    }

    /// How many delegations hold `dev_id` now (in progress, or Active over a scope).
    pub(crate) async fn holders(&self, dev_id: &str, now: i64) -> Result<usize, BusError> {
        let (claims, _) = self.read(&dm_bus::subjects::encode_key(dev_id)).await?;
        let mut live = 0;
        for holder in &claims.holders {
            if self.held(holder, dev_id, now).await?.is_some() {
                live += 1;
            }
        }
        Ok(live)
    }

    /// Takes the delegation stored under `holder_key` off the device's claims.
    pub(crate) async fn release(&self, dev_id: &str, holder_key: &str) -> Result<(), BusError> {
        let key = dm_bus::subjects::encode_key(dev_id);
        for _ in 0..ATTEMPTS {
            let (mut claims, revision) = self.read(&key).await?;
            let before = claims.holders.len();
            claims.holders.retain(|h| h.delegation_key != holder_key);
            if claims.holders.len() == before {
                return Ok(());
            }
            if self.write(&key, &claims, revision).await? {
                return Ok(());
            }
        }
        Err(BusError::Conflict(key))
    }
}
