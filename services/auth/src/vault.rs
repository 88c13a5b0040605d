//! The secrets of the delegations, one record per delegation in the key-value bucket `secrets` (history 1),
//! keyed by (peer ServerID, SessionID). A record holds the delegation's data key wrapped with the master
//! key, the secrets sealed with the data key, when the TEMP key was made, and the commands already carried
//! out (by `outbox_id`, with their outcome) so that a redelivered command has no second effect.
//!
//! Every change is one compare-and-set write of the whole record, retried on a lost race, so replicas of
//! the service can share the bucket.
//!
//! Purge leaves a tombstone: no data key, no secrets, `purged` set, so that a late retry of a peer message
//! cannot lodge secrets again for a delegation that ended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use dm_bus::{BusError, Kv};
use dm_proto::saga::v1::{Work, WorkResult};
use prost::Message as _;

use dm_seal::Zeroizing;
use dm_seal::{DataKey, MasterKey, SealError};

/// How many handled commands a record remembers.
const DONE_KEPT: usize = 32;
/// Compare-and-set attempts before giving up (another replica keeps winning).
const CAS_ATTEMPTS: usize = 16;

/// The stored form of one delegation's secrets. Only ciphertext and bookkeeping: its `Debug` shows
/// nothing readable.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Record {
    /// The data key, sealed with the master key; empty before the first secret and after a purge.
    #[prost(bytes = "vec", tag = "1")]
    pub wrapped_key: Vec<u8>,
    #[prost(bool, tag = "2")]
    pub purged: bool,
    /// The peer's DM Account from DELEGATION_START (TNDS), sealed.
    #[prost(bytes = "vec", tag = "3")]
    pub peer_account: Vec<u8>,
    /// This server's DM Account for DELEGATION_START (TNDS), sealed.
    #[prost(bytes = "vec", tag = "4")]
    pub own_account: Vec<u8>,
    /// The TEMP_DELEGATION_KEY (base64 text), sealed.
    #[prost(bytes = "vec", tag = "5")]
    pub temp_key: Vec<u8>,
    #[prost(int64, tag = "6")]
    pub temp_key_at_ms: i64,
    /// The key was forgotten or expired: a late lodge of it is not kept again.
    #[prost(bool, tag = "7")]
    pub temp_key_retired: bool,
    /// When the peer was verified (step 2); 0 when not.
    #[prost(int64, tag = "8")]
    pub verified_at_ms: i64,
    #[prost(message, repeated, tag = "9")]
    pub done: Vec<Done>,
    #[prost(int64, tag = "10")]
    pub purged_at_ms: i64,
}

/// A command carried out, and its outcome (none for commands without one).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Done {
    #[prost(string, tag = "1")]
    pub outbox_id: String,
    #[prost(message, optional, tag = "2")]
    pub result: Option<WorkResult>,
}

/// The secrets of one stored record of the `secrets` bucket, opened with the master key (`None`: not
/// held). For an operator's look into the store, and for the tests that search every output of the
/// system for secrets. `Debug` shows which are held, never their values.
#[derive(Default)]
pub struct OpenedRecord {
    pub peer_account: Option<Zeroizing<Vec<u8>>>,
    pub own_account: Option<Zeroizing<Vec<u8>>>,
    pub temp_key: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for OpenedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedRecord")
            .field("peer_account", &self.peer_account.is_some())
            .field("own_account", &self.own_account.is_some())
            .field("temp_key", &self.temp_key.is_some())
            .finish()
    }
}

/// A stored record that does not decode or open with the master key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the stored record does not decode or open with this master key")]
pub struct RecordError;

/// Opens the stored value `stored` of the record under `record_key` (a delegation key) with `master`.
pub fn open_stored_record(
    master: &MasterKey,
    record_key: &str,
    stored: &[u8],
) -> Result<OpenedRecord, RecordError> {
    let r = Record::decode(stored).map_err(|_| RecordError)?;
    let mut opened = OpenedRecord::default();
    if r.wrapped_key.is_empty() {
        return Ok(opened);
    }
    let data_key = master
        .unwrap_key(record_key, &r.wrapped_key)
        .map_err(|_| RecordError)?;
    let open = |kind: Kind, sealed: &[u8]| -> Result<Option<Zeroizing<Vec<u8>>>, RecordError> {
        if sealed.is_empty() {
            return Ok(None);
        }
        data_key
            .open(record_key, kind.field(), sealed)
            .map(Some)
            .map_err(|_| RecordError)
    };
    opened.peer_account = open(Kind::PeerAccount, &r.peer_account)?;
    opened.own_account = open(Kind::OwnAccount, &r.own_account)?;
    opened.temp_key = open(Kind::TempKey, &r.temp_key)?;
    Ok(opened)
}

/// Which secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    PeerAccount,
    OwnAccount,
    TempKey,
}

impl Kind {
    /// The purpose bound into the ciphertext, at rest and in bus envelopes.
    pub(crate) fn field(self) -> &'static str {
        match self {
            Kind::PeerAccount => dm_seal::field::PEER_ACCOUNT,
            Kind::OwnAccount => dm_seal::field::OWN_ACCOUNT,
            Kind::TempKey => dm_seal::field::TEMP_KEY,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::PeerAccount => "the peer's DM Account",
            Kind::OwnAccount => "this server's DM Account",
            Kind::TempKey => "the TEMP_DELEGATION_KEY",
        }
    }

    fn slot(self, r: &mut Record) -> &mut Vec<u8> {
        match self {
            Kind::PeerAccount => &mut r.peer_account,
            Kind::OwnAccount => &mut r.own_account,
            Kind::TempKey => &mut r.temp_key,
        }
    }
}

/// What went wrong with the bucket or the ciphertext. Messages name the delegation's record key (a
/// ServerID and a SessionID), never a secret.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VaultError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("the stored record {0} cannot be read")]
    Corrupt(String),
    #[error(
        "the secrets of {0} do not open with this master key (another master key, or tampered)"
    )]
    Open(String),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("gave up on {0} after repeated write conflicts")]
    Contention(String),
}

/// The outcome of a lodge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lodged {
    Stored,
    /// The same secret was there already (a retried message).
    AlreadyStored,
    /// Accepted but not kept (the delegation was purged, or its key already retired).
    NotKept(&'static str),
    /// A different secret is there already.
    Conflict(&'static str),
}

/// The outcome of a fetch. The secret is wiped from memory when dropped; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Fetched {
    Found(Zeroizing<Vec<u8>>),
    Missing(String),
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fetched::Found(_) => f.write_str("Found(<redacted>)"),
            Fetched::Missing(reason) => f.debug_tuple("Missing").field(reason).finish(),
        }
    }
}

enum Step<T> {
    Keep(T),
    Write(Record, T),
}

/// The secrets bucket.
#[derive(Debug, Clone)]
pub(crate) struct Vault {
    kv: Kv,
    master: MasterKey,
    temp_key_ttl_ms: i64,
    /// Per delegation, the record this replica wrote last, at its revision: the next change made here
    /// starts from it instead of reading it back (the compare-and-set on the revision refuses it when
    /// another replica wrote since, and the record is read then). A decision to write nothing is taken
    /// again on the stored record. Only changes use it, never a fetch.
    written: Arc<Mutex<HashMap<String, (u64, Record)>>>,
}

/// Records kept in [`Vault::written`] before it is emptied: a delegation's changes come within its
/// setup, so this covers the delegations in progress; a miss costs one read.
const WRITTEN_KEPT: usize = 1024;

fn result(work: Work, ok: bool, status_code: u32, reason: impl Into<String>) -> WorkResult {
    let mut r = WorkResult {
        ok,
        status_code,
        reason: reason.into(),
        ..Default::default()
    };
    r.set_work(work);
    r
}

impl Record {
    fn done(&self, outbox_id: &str) -> Option<&Done> {
        self.done.iter().find(|d| d.outbox_id == outbox_id)
    }

    fn remember(&mut self, outbox_id: &str, result: Option<WorkResult>) {
        self.done.push(Done {
            outbox_id: outbox_id.to_string(),
            result,
        });
        if self.done.len() > DONE_KEPT {
            let extra = self.done.len() - DONE_KEPT;
            self.done.drain(..extra);
        }
    }
}

impl Vault {
    pub(crate) fn new(kv: Kv, master: MasterKey, temp_key_ttl: Duration) -> Self {
        Self {
            kv,
            master,
            temp_key_ttl_ms: i64::try_from(temp_key_ttl.as_millis()).unwrap_or(i64::MAX),
            written: Arc::default(),
        }
    }

    fn written_last(&self, key: &str) -> Option<(u64, Record)> {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn remember_written(&self, key: &str, revision: u64, record: Record) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if record.purged {
            written.remove(key);
            return;
        }
        if written.len() >= WRITTEN_KEPT {
            written.clear();
        }
        written.insert(key.to_string(), (revision, record));
    }

    fn expired(&self, r: &Record, now_ms: i64) -> bool {
        !r.temp_key.is_empty() && now_ms.saturating_sub(r.temp_key_at_ms) >= self.temp_key_ttl_ms
    }

    /// Reads the record (if any), lets `f` decide, writes with compare-and-set; retries on a lost race.
    /// With `from_written`, the first attempt starts from the record this replica wrote last, if any.
    async fn modify<T>(
        &self,
        key: &str,
        from_written: bool,
        mut f: impl FnMut(Option<Record>) -> Result<Step<T>, VaultError>,
    ) -> Result<T, VaultError> {
        let mut cached = if from_written {
            self.written_last(key)
        } else {
            None
        };
        for _ in 0..CAS_ATTEMPTS {
            let from_cache = cached.is_some();
            let (record, revision) = match cached.take() {
                Some((revision, record)) => (Some(record), Some(revision)),
                None => match self.kv.get(key).await? {
                    Some(e) => (
                        Some(
                            Record::decode(e.value)
                                .map_err(|_| VaultError::Corrupt(key.to_string()))?,
                        ),
                        Some(e.revision),
                    ),
                    None => (None, None),
                },
            };
            let (record, out) = match f(record)? {
                // Nothing written proves a remembered record current: decided again on the stored one.
                Step::Keep(_) if from_cache => continue,
                Step::Keep(out) => return Ok(out),
                Step::Write(record, out) => (record, out),
            };
            let bytes = Bytes::from(record.encode_to_vec());
            let written = match revision {
                Some(rev) => self.kv.update(key, bytes, rev).await,
                None => self.kv.create(key, bytes).await,
            };
            match written {
                Ok(revision) => {
                    self.remember_written(key, revision, record);
                    return Ok(out);
                }
                Err(BusError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(VaultError::Contention(key.to_string()))
    }

    /// The record's data key; a new one (wrapped into the record) when it has none.
    fn data_key(&self, key: &str, r: &mut Record) -> Result<DataKey, VaultError> {
        if r.wrapped_key.is_empty() {
            let data_key = DataKey::random();
            r.wrapped_key = self.master.wrap(key, &data_key)?;
            Ok(data_key)
        } else {
            self.master
                .unwrap_key(key, &r.wrapped_key)
                .map_err(|_| VaultError::Open(key.to_string()))
        }
    }

    fn open(
        &self,
        key: &str,
        r: &mut Record,
        kind: Kind,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let data_key = self.data_key(key, r)?;
        let sealed = kind.slot(r).clone();
        data_key
            .open(key, kind.field(), &sealed)
            .map_err(|_| VaultError::Open(key.to_string()))
    }

    fn put(
        &self,
        key: &str,
        r: &mut Record,
        kind: Kind,
        plaintext: &[u8],
    ) -> Result<(), VaultError> {
        let data_key = self.data_key(key, r)?;
        *kind.slot(r) = data_key.seal(key, kind.field(), plaintext)?;
        Ok(())
    }

    /// Keeps a secret received from the peer (the gateway's lodge). Set once: the same value again is
    /// fine, a different one is a conflict.
    pub(crate) async fn lodge(
        &self,
        key: &str,
        kind: Kind,
        secret: &[u8],
        now_ms: i64,
    ) -> Result<Lodged, VaultError> {
        self.modify(key, true, |record| {
            let mut r = record.unwrap_or_default();
            if r.purged {
                return Ok(Step::Keep(Lodged::NotKept(
                    "the delegation's secrets were purged; nothing was kept",
                )));
            }
            if kind == Kind::TempKey && r.temp_key_retired {
                return Ok(Step::Keep(Lodged::NotKept(
                    "the delegation's key was already used or expired; it is not kept again",
                )));
            }
            if !kind.slot(&mut r).is_empty() {
                let present = self.open(key, &mut r, kind)?;
                return Ok(Step::Keep(if present.as_slice() == secret {
                    Lodged::AlreadyStored
                } else {
                    Lodged::Conflict(match kind {
                        Kind::TempKey => "a different TEMP_DELEGATION_KEY was already lodged",
                        _ => "a different DM Account was already lodged",
                    })
                }));
            }
            self.put(key, &mut r, kind, secret)?;
            if kind == Kind::TempKey {
                r.temp_key_at_ms = now_ms;
            }
            Ok(Step::Write(r, Lodged::Stored))
        })
        .await
    }

    /// A secret, decrypted. An expired TEMP key is deleted and refused. `make_own` builds this server's
    /// account the first time it is asked for (then it is kept, so every fetch gives the same).
    pub(crate) async fn fetch(
        &self,
        key: &str,
        kind: Kind,
        now_ms: i64,
        make_own: Option<&(dyn Fn() -> Zeroizing<Vec<u8>> + Sync)>,
    ) -> Result<Fetched, VaultError> {
        self.modify(key, false, |record| {
            let Some(mut r) = record else {
                if let (Kind::OwnAccount, Some(make)) = (kind, make_own) {
                    let mut r = Record::default();
                    let account = make();
                    self.put(key, &mut r, kind, &account)?;
                    return Ok(Step::Write(r, Fetched::Found(account)));
                }
                return Ok(Step::Keep(Fetched::Missing(format!(
                    "{} is not known for this delegation",
                    kind.what()
                ))));
            };
            if r.purged {
                return Ok(Step::Keep(Fetched::Missing(
                    "the delegation's secrets were purged".into(),
                )));
            }
            if kind == Kind::TempKey && self.expired(&r, now_ms) {
                r.temp_key.clear();
                r.temp_key_retired = true;
                return Ok(Step::Write(
                    r,
                    Fetched::Missing("the TEMP_DELEGATION_KEY expired unused".into()),
                ));
            }
            if kind.slot(&mut r).is_empty() {
                if let (Kind::OwnAccount, Some(make)) = (kind, make_own) {
                    let account = make();
                    self.put(key, &mut r, kind, &account)?;
                    return Ok(Step::Write(r, Fetched::Found(account)));
                }
                return Ok(Step::Keep(Fetched::Missing(format!(
                    "{} is not known for this delegation",
                    kind.what()
                ))));
            }
            Ok(Step::Keep(Fetched::Found(self.open(key, &mut r, kind)?)))
        })
        .await
    }

    /// `create_key`: 32 random bytes, base64; a delegation that has a live key keeps it.
    pub(crate) async fn create_key(
        &self,
        key: &str,
        outbox_id: &str,
        now_ms: i64,
    ) -> Result<WorkResult, VaultError> {
        self.modify(key, true, |record| {
            let mut r = record.unwrap_or_default();
            if let Some(done) = r.done(outbox_id) {
                return Ok(Step::Keep(done.result.clone().unwrap_or_default()));
            }
            let outcome = if r.purged {
                result(
                    Work::CreateKey,
                    false,
                    410,
                    "the delegation's secrets were purged",
                )
            } else {
                if r.temp_key.is_empty() || self.expired(&r, now_ms) {
                    let text = B64.encode(rand::random::<[u8; 32]>());
                    self.put(key, &mut r, Kind::TempKey, text.as_bytes())?;
                    r.temp_key_at_ms = now_ms;
                    r.temp_key_retired = false;
                }
                result(Work::CreateKey, true, 0, "")
            };
            r.remember(outbox_id, Some(outcome.clone()));
            Ok(Step::Write(r, outcome))
        })
        .await
    }

    /// `verify_peer`: keeps the verdict (decided from the registry by the caller) under the command.
    pub(crate) async fn record_verification(
        &self,
        key: &str,
        outbox_id: &str,
        verdict: WorkResult,
        now_ms: i64,
    ) -> Result<WorkResult, VaultError> {
        self.modify(key, true, |record| {
            let mut r = record.unwrap_or_default();
            if let Some(done) = r.done(outbox_id) {
                return Ok(Step::Keep(done.result.clone().unwrap_or_default()));
            }
            if verdict.ok {
                r.verified_at_ms = now_ms;
            }
            r.remember(outbox_id, Some(verdict.clone()));
            Ok(Step::Write(r, verdict.clone()))
        })
        .await
    }

    /// `forget_key`: the TEMP key is deleted (it was used, or the delegation moved on).
    pub(crate) async fn forget_key(&self, key: &str, outbox_id: &str) -> Result<(), VaultError> {
        self.modify(key, true, |record| {
            let mut r = record.unwrap_or_default();
            if r.done(outbox_id).is_some() {
                return Ok(Step::Keep(()));
            }
            r.temp_key.clear();
            r.temp_key_retired = true;
            r.remember(outbox_id, None);
            Ok(Step::Write(r, ()))
        })
        .await
    }

    /// `purge`: the data key and every secret are destroyed; a tombstone stays.
    pub(crate) async fn purge(
        &self,
        key: &str,
        outbox_id: &str,
        now_ms: i64,
    ) -> Result<(), VaultError> {
        self.modify(key, true, |record| {
            let r = record.unwrap_or_default();
            if r.done(outbox_id).is_some() || r.purged {
                return Ok(Step::Keep(()));
            }
            let mut tomb = Record {
                purged: true,
                purged_at_ms: now_ms,
                temp_key_retired: true,
                verified_at_ms: r.verified_at_ms,
                done: r.done,
                ..Record::default()
            };
            tomb.remember(outbox_id, None);
            Ok(Step::Write(tomb, ()))
        })
        .await
    }

    /// Deletes every TEMP key that expired unused; returns how many.
    pub(crate) async fn sweep(&self, now_ms: i64) -> Result<usize, VaultError> {
        let mut removed = 0;
        for key in self.kv.keys().await? {
            let swept = self
                .modify(&key, false, |record| match record {
                    Some(mut r) if self.expired(&r, now_ms) => {
                        r.temp_key.clear();
                        r.temp_key_retired = true;
                        Ok(Step::Write(r, true))
                    }
                    _ => Ok(Step::Keep(false)),
                })
                .await;
            match swept {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "an expired key could not be swept"),
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use dm_bus::Bus;

    const KEY: &str = "dms2.example/9d2f";
    const TTL: Duration = Duration::from_secs(3600);

    async fn vault(master: MasterKey) -> (Vault, Kv) {
        let bus = Bus::in_process();
        let kv = bus.kv("dmd_test_secrets", 1).await.unwrap();
        (Vault::new(kv.clone(), master, TTL), kv)
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn the_bucket_holds_only_ciphertext() {
        let (v, kv) = vault(MasterKey::random()).await;
        let account = b"<MgmtTree><AAuthSecret>client-password-123</AAuthSecret></MgmtTree>";
        assert_eq!(
            v.lodge(KEY, Kind::PeerAccount, account, 0).await.unwrap(),
            Lodged::Stored
        );
        let key_text = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        assert_eq!(
            v.lodge(KEY, Kind::TempKey, key_text.as_bytes(), 0)
                .await
                .unwrap(),
            Lodged::Stored
        );
        let stored = kv.get(KEY).await.unwrap().unwrap().value;
        assert!(!contains(&stored, b"client-password-123"));
        assert!(!contains(&stored, key_text.as_bytes()));
        assert!(!contains(&stored, b"AAECAwQF"));
        // …and reads back.
        assert_eq!(
            v.fetch(KEY, Kind::PeerAccount, 0, None).await.unwrap(),
            Fetched::Found(Zeroizing::new(account.to_vec()))
        );
        assert_eq!(
            v.fetch(KEY, Kind::TempKey, 1, None).await.unwrap(),
            Fetched::Found(Zeroizing::new(key_text.as_bytes().to_vec()))
        );
        // Lodged again: the same is fine, a different one is refused and the first stays.
        assert_eq!(
            v.lodge(KEY, Kind::PeerAccount, account, 0).await.unwrap(),
            Lodged::AlreadyStored
        );
        assert!(matches!(
            v.lodge(KEY, Kind::PeerAccount, b"other", 0).await.unwrap(),
            Lodged::Conflict(_)
        ));
        assert_eq!(
            v.fetch(KEY, Kind::PeerAccount, 0, None).await.unwrap(),
            Fetched::Found(Zeroizing::new(account.to_vec()))
        );
        // A created key is base64 of 32 bytes and not in the bucket either.
        let created = "dms2.example/other";
        assert!(v.create_key(created, "o:1:0", 0).await.unwrap().ok);
        let Fetched::Found(text) = v.fetch(created, Kind::TempKey, 0, None).await.unwrap() else {
            panic!("no key");
        };
        assert_eq!(B64.decode(&text).unwrap().len(), 32);
        let stored = kv.get(created).await.unwrap().unwrap().value;
        assert!(!contains(&stored, &text));
    }

    /// A replica's next change starts from the record it wrote last; another replica's write since is
    /// never undone (the compare-and-set refuses the remembered record, which is read again), and a
    /// purge made elsewhere is seen.
    #[tokio::test]
    async fn a_change_from_the_record_written_last_never_undoes_another_replicas_write() {
        let master = MasterKey::random();
        let (a, kv) = vault(master.clone()).await;
        let b = Vault::new(kv.clone(), master, TTL);
        assert!(a.create_key(KEY, "o:1:0", 0).await.unwrap().ok);
        assert!(a.written_last(KEY).is_some());
        // B drops the key; A, remembering the record with the key, records a verification.
        b.forget_key(KEY, "o:2:0").await.unwrap();
        let verdict = result(Work::VerifyPeer, true, 200, "");
        a.record_verification(KEY, "o:3:0", verdict, 5)
            .await
            .unwrap();
        let stored = Record::decode(kv.get(KEY).await.unwrap().unwrap().value).unwrap();
        assert!(
            stored.temp_key.is_empty() && stored.temp_key_retired,
            "B's write undone"
        );
        assert_eq!(stored.verified_at_ms, 5);
        assert!(stored.done("o:2:0").is_some() && stored.done("o:3:0").is_some());
        // B purges; A's remembered record still holds secrets, but A's next change keeps the tombstone.
        b.purge(KEY, "o:4:0", 0).await.unwrap();
        assert!(matches!(
            a.lodge(KEY, Kind::PeerAccount, b"account", 0)
                .await
                .unwrap(),
            Lodged::NotKept(_)
        ));
        let stored = Record::decode(kv.get(KEY).await.unwrap().unwrap().value).unwrap();
        assert!(stored.purged && stored.peer_account.is_empty());
    }

    #[tokio::test]
    async fn purge_makes_fetch_fail_and_leaves_a_tombstone() {
        let (v, kv) = vault(MasterKey::random()).await;
        v.lodge(KEY, Kind::PeerAccount, b"account", 0)
            .await
            .unwrap();
        assert!(v.create_key(KEY, "o:1:0", 0).await.unwrap().ok);
        v.purge(KEY, "o:2:0", 0).await.unwrap();
        for kind in [Kind::PeerAccount, Kind::TempKey, Kind::OwnAccount] {
            assert!(matches!(
                v.fetch(KEY, kind, 0, Some(&|| Zeroizing::new(b"own".to_vec())))
                    .await
                    .unwrap(),
                Fetched::Missing(_)
            ));
        }
        let tomb = Record::decode(kv.get(KEY).await.unwrap().unwrap().value).unwrap();
        assert!(tomb.purged && tomb.wrapped_key.is_empty());
        assert!(tomb.peer_account.is_empty() && tomb.temp_key.is_empty());
        // A late lodge is not kept; a late create_key fails.
        assert!(matches!(
            v.lodge(KEY, Kind::PeerAccount, b"account", 0)
                .await
                .unwrap(),
            Lodged::NotKept(_)
        ));
        let late = v.create_key(KEY, "o:3:0", 0).await.unwrap();
        assert!(!late.ok);
        assert_eq!(late.status_code, 410);
        // A redelivered create_key from before the purge gets its first answer, nothing more.
        assert!(v.create_key(KEY, "o:1:0", 0).await.unwrap().ok);
        assert!(matches!(
            v.fetch(KEY, Kind::TempKey, 0, None).await.unwrap(),
            Fetched::Missing(_)
        ));
    }

    #[tokio::test]
    async fn another_master_key_cannot_decrypt() {
        let (v, kv) = vault(MasterKey::random()).await;
        v.lodge(KEY, Kind::PeerAccount, b"account", 0)
            .await
            .unwrap();
        let other = Vault::new(kv.clone(), MasterKey::random(), TTL);
        let e = other
            .fetch(KEY, Kind::PeerAccount, 0, None)
            .await
            .unwrap_err();
        assert!(matches!(e, VaultError::Open(_)), "{e}");
        assert!(!e.to_string().contains("account"));
        // The same master key (another replica) can.
        let master = MasterKey::from_bytes([7; 32]);
        let (a, kv) = vault(master.clone()).await;
        a.lodge(KEY, Kind::PeerAccount, b"account", 0)
            .await
            .unwrap();
        let b = Vault::new(kv.clone(), master.clone(), TTL);
        assert_eq!(
            b.fetch(KEY, Kind::PeerAccount, 0, None).await.unwrap(),
            Fetched::Found(Zeroizing::new(b"account".to_vec()))
        );
        // What an operator (or a test) opens of a stored record: with the key, under its own key only.
        let stored = kv.get(KEY).await.unwrap().unwrap().value;
        let opened = open_stored_record(&master, KEY, &stored).unwrap();
        assert_eq!(
            opened.peer_account.as_deref().map(Vec::as_slice),
            Some(&b"account"[..])
        );
        assert!(opened.temp_key.is_none() && opened.own_account.is_none());
        assert!(!format!("{opened:?}").contains("account\""));
        assert!(open_stored_record(&MasterKey::random(), KEY, &stored).is_err());
        assert!(open_stored_record(&master, "p/other", &stored).is_err());
        assert!(open_stored_record(&master, KEY, b"junk").is_err());
    }

    #[tokio::test]
    async fn create_key_is_idempotent_and_keys_expire() {
        let (v, kv) = vault(MasterKey::random()).await;
        assert!(v.create_key(KEY, "o:1:0", 0).await.unwrap().ok);
        let Fetched::Found(first) = v.fetch(KEY, Kind::TempKey, 10, None).await.unwrap() else {
            panic!("no key");
        };
        // The same command again, and another create_key: the first key stays.
        assert!(v.create_key(KEY, "o:1:0", 20).await.unwrap().ok);
        assert!(v.create_key(KEY, "o:5:0", 20).await.unwrap().ok);
        assert_eq!(
            v.fetch(KEY, Kind::TempKey, 30, None).await.unwrap(),
            Fetched::Found(first.clone())
        );
        // forget_key, and its redelivery after a new key was made, leaves the new key alone.
        v.forget_key(KEY, "o:6:0").await.unwrap();
        assert!(matches!(
            v.fetch(KEY, Kind::TempKey, 30, None).await.unwrap(),
            Fetched::Missing(_)
        ));
        assert!(v.create_key(KEY, "o:7:0", 40).await.unwrap().ok);
        v.forget_key(KEY, "o:6:0").await.unwrap();
        let Fetched::Found(second) = v.fetch(KEY, Kind::TempKey, 50, None).await.unwrap() else {
            panic!("no key");
        };
        assert_ne!(first, second);
        // Unused for the whole TTL: refused and deleted.
        let ttl_ms = i64::try_from(TTL.as_millis()).unwrap();
        let Fetched::Missing(reason) = v
            .fetch(KEY, Kind::TempKey, 40 + ttl_ms, None)
            .await
            .unwrap()
        else {
            panic!("an expired key was handed out");
        };
        assert!(reason.contains("expired"), "{reason}");
        let r = Record::decode(kv.get(KEY).await.unwrap().unwrap().value).unwrap();
        assert!(r.temp_key.is_empty());
        // The sweep deletes expired keys of other delegations.
        v.lodge("p/2", Kind::TempKey, b"k2", 0).await.unwrap();
        v.lodge("p/3", Kind::TempKey, b"k3", ttl_ms).await.unwrap();
        assert_eq!(v.sweep(ttl_ms + 1).await.unwrap(), 1);
        assert!(matches!(
            v.fetch("p/2", Kind::TempKey, 0, None).await.unwrap(),
            Fetched::Missing(_)
        ));
        assert_eq!(
            v.fetch("p/3", Kind::TempKey, ttl_ms + 1, None)
                .await
                .unwrap(),
            Fetched::Found(Zeroizing::new(b"k3".to_vec()))
        );
        // A retired key lodged again (a late retry) is not kept.
        assert!(matches!(
            v.lodge("p/2", Kind::TempKey, b"k2", 0).await.unwrap(),
            Lodged::NotKept(_)
        ));
    }

    #[tokio::test]
    async fn the_own_account_is_made_once() {
        let (v, _) = vault(MasterKey::random()).await;
        let counter = std::sync::atomic::AtomicUsize::new(0);
        let make = || {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Zeroizing::new(format!("account {n}").into_bytes())
        };
        let a = v
            .fetch(KEY, Kind::OwnAccount, 0, Some(&make))
            .await
            .unwrap();
        let b = v
            .fetch(KEY, Kind::OwnAccount, 0, Some(&make))
            .await
            .unwrap();
        assert_eq!(a, Fetched::Found(Zeroizing::new(b"account 0".to_vec())));
        assert_eq!(a, b);
    }
}
