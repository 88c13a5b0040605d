//! Replay and abuse guards of the inbound endpoint: the `Timestamp` window, and per-peer rate and
//! concurrency limits.
//!
//! - **Timestamp window.** A message whose `Timestamp` is further than the window from this server's clock
//!   (either way) is refused with 400 and the reason. With it, a message can only be replayed while it is
//!   young, and the MsgIDs the saga keeps (for as long as the delegation's record exists, that is forever)
//!   answer such a replay as a duplicate. The sender stamps every attempt, retries included, with the time
//!   it goes out, so a message retried for minutes never ages out.
//! - **Limits per peer.** Each configured peer has a token bucket (`rate_per_sec`, `rate_burst`) and a
//!   ceiling on its messages in progress (`max_in_flight`); senders that are no configured peer share one
//!   set with the default limits. Past a limit the answer is 503 with `Retry-After` (A.2: the sender
//!   retries), before any bus request is made for the message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dm_protocol::types::UtcTime;
use serde::Deserialize;

/// The default `Timestamp` window: a message may be this much older or newer than this server's clock.
pub const DEFAULT_TIMESTAMP_WINDOW: Duration = Duration::from_secs(300);

/// How much one peer may send. The defaults leave `dmd bench` (about 150 delegations/s with 200 in
/// flight: about 450 messages/s into the delegating side, at most one in progress per delegation) well
/// below every limit.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerLimits {
    /// Messages per second, sustained (the bucket's refill rate; fractions allowed).
    pub rate_per_sec: f64,
    /// Messages that may arrive at once after a quiet period (the bucket's size).
    pub rate_burst: u32,
    /// Messages of this peer being handled at the same time.
    pub max_in_flight: u32,
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self {
            rate_per_sec: 1000.0,
            rate_burst: 2000,
            max_in_flight: 400,
        }
    }
}

impl PeerLimits {
    /// Why these limits cannot be used (`None`: they can).
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        if !self.rate_per_sec.is_finite() || self.rate_per_sec <= 0.0 {
            return Some(("rate_per_sec", "must be a number above 0"));
        }
        if self.rate_burst == 0 {
            return Some(("rate_burst", "must be at least 1"));
        }
        if self.max_in_flight == 0 {
            return Some(("max_in_flight", "must be at least 1"));
        }
        None
    }
}

/// The guards of one gateway, from its configuration.
#[derive(Debug)]
pub(crate) struct Guard {
    pub window: Option<Duration>,
    pub limiter: Limiter,
}

impl Guard {
    pub(crate) fn new(config: &crate::Config) -> Self {
        Self {
            window: config.timestamp_window,
            limiter: Limiter::new(
                config
                    .peers
                    .iter()
                    .map(|p| (p.server_id.as_str(), p.limits)),
            ),
        }
    }

    /// No window, default limits for everyone.
    pub(crate) fn off() -> Self {
        Self {
            window: None,
            limiter: Limiter::new([]),
        }
    }

    /// The refusal of a message whose `Timestamp` is outside the window.
    pub(crate) fn stale(&self, stamp: UtcTime) -> Option<String> {
        timestamp_refusal(stamp, SystemTime::now(), self.window?)
    }
}

/// Why a message's `Timestamp` is refused, or `None` when it is within `window` of `now`.
pub(crate) fn timestamp_refusal(
    stamp: UtcTime,
    now: SystemTime,
    window: Duration,
) -> Option<String> {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| i128::try_from(d.as_millis()).unwrap_or(i128::MAX))
        .unwrap_or_default();
    let stamp_ms = i128::from(stamp.unix_seconds) * 1000 + i128::from(stamp.nanos / 1_000_000);
    let skew_ms = stamp_ms - now_ms;
    let window_ms = i128::try_from(window.as_millis()).unwrap_or(i128::MAX);
    if skew_ms.abs() <= window_ms {
        return None;
    }
    let (secs, way) = if skew_ms < 0 {
        (-skew_ms / 1000, "behind")
    } else {
        (skew_ms / 1000, "ahead of")
    };
    Some(format!(
        "Timestamp {stamp} is {secs} s {way} this server's clock; at most {} s either way is accepted",
        window.as_secs()
    ))
}

/// The encoded message `wire` with its envelope's `Timestamp` set to `now`. The encoder writes the
/// envelope's `<Timestamp>` before the body, and any `<` inside a text value is escaped, so the first
/// such element is the envelope's. Unchanged when there is none.
pub(crate) fn restamp(wire: &bytes::Bytes, now: UtcTime) -> bytes::Bytes {
    const OPEN: &[u8] = b"<Timestamp>";
    const CLOSE: &[u8] = b"</Timestamp>";
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|i| i + from)
    };
    let Some(start) = find(wire, OPEN, 0).map(|i| i + OPEN.len()) else {
        return wire.clone();
    };
    let Some(end) = find(wire, CLOSE, start) else {
        return wire.clone();
    };
    let stamp = now.to_string();
    let mut out = Vec::with_capacity(wire.len() + stamp.len());
    out.extend_from_slice(&wire[..start]);
    out.extend_from_slice(stamp.as_bytes());
    out.extend_from_slice(&wire[end..]);
    bytes::Bytes::from(out)
}

/// A message refused by a limit: what to tell the sender and when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Busy {
    pub retry_after_secs: u64,
    pub reason: String,
}

/// One peer's bucket and in-progress count.
#[derive(Debug)]
struct Gate {
    limits: PeerLimits,
    /// Tokens left, as of the instant.
    bucket: Mutex<(f64, Instant)>,
    in_flight: AtomicU32,
}

impl Gate {
    fn new(limits: PeerLimits, now: Instant) -> Arc<Self> {
        Arc::new(Self {
            limits,
            bucket: Mutex::new((f64::from(limits.rate_burst), now)),
            in_flight: AtomicU32::new(0),
        })
    }
}

/// Held while a message is handled; lets go of its place when dropped.
#[derive(Debug)]
pub(crate) struct Permit(Arc<Gate>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The limits of every peer, by the `DMServerID` a message names.
#[derive(Debug)]
pub(crate) struct Limiter {
    peers: HashMap<String, Arc<Gate>>,
    /// Shared by every sender that is no configured peer (the identity check refuses them anyway).
    others: Arc<Gate>,
}

impl Limiter {
    pub(crate) fn new<'a>(peers: impl IntoIterator<Item = (&'a str, PeerLimits)>) -> Self {
        let now = Instant::now();
        Self {
            peers: peers
                .into_iter()
                .map(|(id, limits)| (id.to_string(), Gate::new(limits, now)))
                .collect(),
            others: Gate::new(PeerLimits::default(), now),
        }
    }

    /// A place for one message of `sender`, or why not now.
    pub(crate) fn admit(&self, sender: &str) -> Result<Permit, Busy> {
        self.admit_at(sender, Instant::now())
    }

    fn admit_at(&self, sender: &str, now: Instant) -> Result<Permit, Busy> {
        let gate = self.peers.get(sender).unwrap_or(&self.others);
        let limits = gate.limits;
        let before = gate.in_flight.fetch_add(1, Ordering::AcqRel);
        // From here the place is held: the permit gives it back, also on a refusal below.
        let permit = Permit(gate.clone());
        if before >= limits.max_in_flight {
            return Err(Busy {
                retry_after_secs: 1,
                reason: format!(
                    "more than {} messages of this sender in progress; retry later",
                    limits.max_in_flight
                ),
            });
        }
        let mut bucket = gate.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = *bucket;
        let elapsed = now.saturating_duration_since(at).as_secs_f64();
        let tokens = (tokens + elapsed * limits.rate_per_sec).min(f64::from(limits.rate_burst));
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now.max(at));
            return Ok(permit);
        }
        *bucket = (tokens, now.max(at));
        let wait = ((1.0 - tokens) / limits.rate_per_sec).ceil();
        Err(Busy {
            // Whole seconds (RFC 9110 delta-seconds), at least one.
            retry_after_secs: if wait.is_finite() && wait >= 1.0 {
                wait as u64
            } else {
                1
            },
            reason: format!(
                "more than {} messages per second from this sender; retry later",
                limits.rate_per_sec
            ),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(text: &str) -> UtcTime {
        text.parse().unwrap()
    }

    fn clock(text: &str) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(at(text).unix_seconds).unwrap())
    }

    #[test]
    fn the_window_holds_both_ways_inclusive() {
        let now = clock("2026-12-02T04:00:00Z");
        let w = DEFAULT_TIMESTAMP_WINDOW;
        for fine in [
            "2026-12-02T04:00:00Z",
            "2026-12-02T03:55:00Z",
            "2026-12-02T04:05:00Z",
            "2026-12-02T04:04:59.999Z",
        ] {
            assert_eq!(timestamp_refusal(at(fine), now, w), None, "{fine}");
        }
        let old = timestamp_refusal(at("2026-12-02T03:54:59Z"), now, w).unwrap();
        assert!(old.contains("301 s behind"), "{old}");
        assert!(old.contains("2026-12-02T03:54:59Z"), "{old}");
        assert!(old.contains("300 s"), "{old}");
        let ahead = timestamp_refusal(at("2026-12-02T04:05:01Z"), now, w).unwrap();
        assert!(ahead.contains("301 s ahead of"), "{ahead}");
        // PROTOCOL.md's example, ten days later.
        assert!(timestamp_refusal(at("2026-11-21T22:40:10Z"), now, w).is_some());
    }

    fn limits(rate_per_sec: f64, rate_burst: u32, max_in_flight: u32) -> PeerLimits {
        PeerLimits {
            rate_per_sec,
            rate_burst,
            max_in_flight,
        }
    }

    #[test]
    fn a_burst_past_the_bucket_waits_for_its_refill() {
        let l = Limiter::new([("p", limits(2.0, 3, 100))]);
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(l.admit_at("p", t0).unwrap());
        }
        let busy = l.admit_at("p", t0).unwrap_err();
        assert_eq!(busy.retry_after_secs, 1);
        assert!(busy.reason.contains("per second"), "{}", busy.reason);
        // Half a second refills one token at 2/s.
        drop(l.admit_at("p", t0 + Duration::from_millis(500)).unwrap());
        assert!(l.admit_at("p", t0 + Duration::from_millis(500)).is_err());
        // A long pause refills to the burst, no more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            drop(l.admit_at("p", later).unwrap());
        }
        assert!(l.admit_at("p", later).is_err());
        // A slow rate asks for a long wait.
        let slow = Limiter::new([("p", limits(0.01, 1, 100))]);
        drop(slow.admit_at("p", t0).unwrap());
        assert_eq!(slow.admit_at("p", t0).unwrap_err().retry_after_secs, 100);
    }

    #[test]
    fn messages_in_progress_are_capped_and_given_back() {
        let l = Limiter::new([("p", limits(1000.0, 1000, 2))]);
        let a = l.admit("p").unwrap();
        let b = l.admit("p").unwrap();
        let busy = l.admit("p").unwrap_err();
        assert!(busy.reason.contains("in progress"), "{}", busy.reason);
        assert_eq!(busy.retry_after_secs, 1);
        // Other peers are not affected.
        let _other = l.admit("q").unwrap();
        drop(a);
        let _c = l.admit("p").unwrap();
        assert!(l.admit("p").is_err());
        drop(b);
        assert!(l.admit("p").is_ok());
    }

    #[test]
    fn a_retry_is_restamped_and_nothing_else_changes() {
        use dm_protocol::delegation;
        let text = r#"<?xml version="1.0" encoding="UTF-8"?>
<DelegationMessage xmlns="urn:oma:xml:dm:delegation:1.0" Version="1.0">
  <MsgID>0b6a7e0c-5d1e-4c41-9b0e-3d3f3c2b1a10</MsgID>
  <SessionID>9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11</SessionID>
  <DMServerID>dms1.operator.example</DMServerID>
  <Timestamp>2026-11-21T22:40:10Z</Timestamp>
  <DELEGATION_CONFIRM><SessionEstablished>2026-11-21T22:40:12Z</SessionEstablished></DELEGATION_CONFIRM>
</DelegationMessage>"#;
        let before = delegation::decode(text.as_bytes()).unwrap();
        let now = at("2026-12-02T04:30:00Z");
        let again = restamp(&bytes::Bytes::from(text), now);
        let mut after = delegation::decode(&again).unwrap();
        assert_eq!(after.timestamp, now);
        after.timestamp = before.timestamp;
        assert_eq!(after, before);
        let none = bytes::Bytes::from_static(b"<x/>");
        assert_eq!(restamp(&none, now), none);
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(PeerLimits::default().problem(), None);
        assert_eq!(limits(0.0, 1, 1).problem().unwrap().0, "rate_per_sec");
        assert_eq!(limits(f64::NAN, 1, 1).problem().unwrap().0, "rate_per_sec");
        assert_eq!(limits(1.0, 0, 1).problem().unwrap().0, "rate_burst");
        assert_eq!(limits(1.0, 1, 0).problem().unwrap().0, "max_in_flight");
    }
}
