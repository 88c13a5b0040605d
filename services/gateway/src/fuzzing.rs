//! The inbound handling without a network, for the fuzz target `fuzz/fuzz_targets/gateway.rs`
//! (docs/security.md, "Fuzzing") and the test below. A request (method, path, headers, body) goes through
//! the same code as one that arrived over mutual TLS: the checks of A.2, the decoder, the identity
//! question, the guards, the sealing of secrets and the hand-over to the orchestrator. Auth and the
//! orchestrator are stand-ins on an in-process bus that accept everything, so that every message that
//! decodes travels the whole path; the stand-ins record what reached them so that the caller can check it.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use dm_bus::{Area, Bus, BusError, Headers, Names};
use dm_proto::bus::v1::{IdentityAnswer, InboundAnswer};
use http_body_util::Full;
use hyper::{Request, Response};
use prost::Message as _;

use crate::config::{DEFAULT_PATH, Timeouts};
use crate::guard::{Guard, Limiter, PeerLimits};
use crate::inbound::Inbound;
use crate::tls::PeerIdentity;

/// What the stand-ins received, raw, as it travelled on the bus.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Payloads of `req.auth.identity`.
    pub auth: Vec<Bytes>,
    /// Payloads of `req.orchestrator.peer`.
    pub orchestrator: Vec<Bytes>,
}

/// The gateway's inbound endpoint on an in-process bus, with accepting stand-ins for auth and the
/// orchestrator.
pub struct Endpoint {
    inbound: Inbound,
    peer: PeerIdentity,
    seen: Arc<Mutex<Seen>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").finish_non_exhaustive()
    }
}

/// Answers every request on `subject` with `answer`, recording the payload.
async fn stand_in(
    bus: &Bus,
    subject: &str,
    group: &str,
    answer: Bytes,
    record: impl Fn(&mut Seen, Bytes) + Send + 'static,
    seen: Arc<Mutex<Seen>>,
) -> Result<(), BusError> {
    let mut requests = bus.serve(subject, group).await?;
    tokio::spawn(async move {
        while let Some(r) = requests.next().await {
            record(
                &mut seen.lock().unwrap_or_else(PoisonError::into_inner),
                r.message.payload.clone(),
            );
            let _ = r.respond(Headers::new(), answer.clone()).await;
        }
    });
    Ok(())
}

/// The `DMServerID`s of the shipped examples and golden files, which seed the fuzz target's corpus.
const EXAMPLE_SENDERS: [&str; 3] = [
    "dms1.operator.example",
    "dms2.enterprise.example",
    "dms3.other.example",
];

impl Endpoint {
    /// Starts the stand-ins (call it inside a Tokio runtime). Requests are served at
    /// [`DEFAULT_PATH`] with a body limit of `max_body_bytes`.
    pub async fn start(max_body_bytes: usize) -> Result<Self, BusError> {
        let bus = Bus::in_process();
        let names = Names::new("fuzz")?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let auth = names.queue_group("auth")?;
        let allowed = IdentityAnswer {
            allowed: true,
            reason: String::new(),
        };
        let accepted = InboundAnswer {
            http_status: 202,
            reason: String::new(),
        };
        stand_in(
            &bus,
            &names.subject(Area::Req, "auth.identity")?,
            &auth,
            Bytes::from(allowed.encode_to_vec()),
            |s, p| s.auth.push(p),
            seen.clone(),
        )
        .await?;
        stand_in(
            &bus,
            &names.subject(Area::Req, "orchestrator.peer")?,
            &names.queue_group("orchestrator")?,
            Bytes::from(accepted.encode_to_vec()),
            |s, p| s.orchestrator.push(p),
            seen.clone(),
        )
        .await?;
        // No Timestamp window, and the senders of the shipped examples without limits (the others share
        // the default ones): the guards would stop nearly every input before the rest of the path.
        let unlimited = PeerLimits {
            rate_per_sec: f64::MAX,
            rate_burst: u32::MAX,
            max_in_flight: u32::MAX,
        };
        let guard = Guard {
            window: None,
            limiter: Limiter::new(EXAMPLE_SENDERS.iter().map(|s| (*s, unlimited))),
        };
        let inbound = Inbound::new(
            bus,
            &names,
            DEFAULT_PATH.to_string(),
            max_body_bytes,
            Timeouts::default(),
        )?
        .with_guard(guard)
        // Any key: the stand-in orchestrator never opens the sealed secret of a START or a PREPARED.
        .with_bus_key(dm_seal::MasterKey::random().bus_key());
        let peer = PeerIdentity {
            spki_sha256: "00".repeat(32),
            subject_alt_names: vec!["peer.fuzz.example".to_string()],
            issuer_ca: "fuzz".to_string(),
        };
        Ok(Self {
            inbound,
            peer,
            seen,
        })
    }

    /// Answers one request as the endpoint would.
    pub async fn handle(&self, request: Request<Full<Bytes>>) -> Response<Full<Bytes>> {
        self.inbound.handle(request, &self.peer).await
    }

    /// What the stand-ins received since the last call (and forgets it).
    pub fn take_seen(&self) -> Seen {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use dm_protocol::delegation;
    use dm_protocol::types::UtcTime;
    use http_body_util::BodyExt;
    use hyper::header::CONTENT_TYPE;

    fn post(body: &str) -> Request<Full<Bytes>> {
        Request::post(DEFAULT_PATH)
            .header(CONTENT_TYPE, delegation::CONTENT_TYPE)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    #[tokio::test]
    async fn a_shipped_example_travels_the_whole_path_and_junk_is_refused() {
        let endpoint = Endpoint::start(64 * 1024).await.unwrap();
        // A shipped example, stamped now (a Timestamp window would refuse the example's own time).
        let mut message =
            delegation::decode(include_bytes!("../../../examples/prepared.xml")).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        message.timestamp = UtcTime::from_unix(i64::try_from(now.as_secs()).unwrap());
        let answer = endpoint.handle(post(&delegation::encode(&message))).await;
        assert_eq!(answer.status(), 202);
        let seen = endpoint.take_seen();
        // The identity check; the key goes sealed with the message (the orchestrator lodges it).
        assert_eq!(seen.auth.len(), 1, "identity");
        assert_eq!(seen.orchestrator.len(), 1);
        let delegation::Body::Prepared(prepared) = &message.body else {
            panic!("prepared.xml holds a DELEGATION_PREPARED");
        };
        let key = prepared.temp_delegation_key.to_base64();
        assert!(
            !seen.orchestrator[0]
                .windows(key.len())
                .any(|w| w == key.as_bytes()),
            "the key went to the orchestrator in clear"
        );

        let answer = endpoint.handle(post("<not-a-message/>")).await;
        assert_eq!(answer.status(), 400);
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(delegation::decode_error(&body).unwrap().status_code, 400);
        let seen = endpoint.take_seen();
        assert!(seen.auth.is_empty() && seen.orchestrator.is_empty());
    }
}
