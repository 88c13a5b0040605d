//! This replica's index of the armed timers, rebuilt from the stored states at start and refreshed on every
//! write. The states are the truth: a timer fired from a stale index is ignored by the decider.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use dm_saga::pb::Timer;

#[derive(Debug, Default)]
pub(crate) struct Timers {
    inner: Mutex<Index>,
    /// Tells the run loop to look at the next due time again.
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Index {
    /// (due time, delegation key, timer id)
    due: BTreeSet<(i64, String, u64)>,
    by_key: HashMap<String, (i64, u64)>,
    /// The newest revision of each delegation indexed: the writes of all replicas arrive through a watch,
    /// possibly after this replica indexed a newer one of its own.
    revisions: HashMap<String, u64>,
}

impl Timers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the timer a delegation's state at `revision` holds (or that it holds none), unless a newer
    /// revision was indexed already.
    pub(crate) fn track_at(&self, key: &str, timer: Option<&Timer>, revision: u64) {
        {
            let mut index = self.lock();
            let newest = index.revisions.entry(key.to_string()).or_default();
            if *newest > revision {
                return;
            }
            *newest = revision;
        }
        self.track(key, timer);
    }

    /// Records the timer a delegation has armed now (or that it has none).
    pub(crate) fn track(&self, key: &str, timer: Option<&Timer>) {
        let mut index = self.lock();
        if let Some((at, id)) = index.by_key.remove(key) {
            index.due.remove(&(at, key.to_string(), id));
        }
        if let Some(t) = timer {
            index.due.insert((t.at_ms, key.to_string(), t.id));
            index.by_key.insert(key.to_string(), (t.at_ms, t.id));
        }
        drop(index);
        self.changed.notify_one();
    }

    /// Completes when a timer was tracked since the last call.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// When the next timer is due.
    pub(crate) fn next_due(&self) -> Option<i64> {
        self.lock().due.first().map(|(at, _, _)| *at)
    }

    /// Removes and returns the timers due at `now`.
    pub(crate) fn take_due(&self, now: i64) -> Vec<(String, u64)> {
        let mut index = self.lock();
        let mut out = Vec::new();
        while let Some((at, key, id)) = index.due.first().cloned() {
            if at > now {
                break;
            }
            index.due.remove(&(at, key.clone(), id));
            index.by_key.remove(&key);
            out.push((key, id));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn re_arming_replaces_and_due_timers_come_out_in_order() {
        let t = Timers::default();
        t.track(
            "a",
            Some(&Timer {
                id: 1,
                at_ms: 50,
                kind: 1,
            }),
        );
        t.track(
            "b",
            Some(&Timer {
                id: 1,
                at_ms: 20,
                kind: 1,
            }),
        );
        t.track(
            "a",
            Some(&Timer {
                id: 2,
                at_ms: 10,
                kind: 1,
            }),
        );
        assert_eq!(t.next_due(), Some(10));
        assert_eq!(
            t.take_due(30),
            vec![("a".to_string(), 2), ("b".to_string(), 1)]
        );
        assert_eq!(t.next_due(), None);
        t.track(
            "c",
            Some(&Timer {
                id: 1,
                at_ms: 5,
                kind: 1,
            }),
        );
        t.track("c", None);
        assert_eq!(t.next_due(), None);
    }
}
