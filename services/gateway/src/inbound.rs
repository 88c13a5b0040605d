//! The peer-facing endpoint: mutually authenticated TLS connections, kept alive for many HTTP/1.1
//! exchanges one after the other, each request checked in the order of PROTOCOL.md A.2:
//! 415 content type, 405 method, 413 size, 400 decoding, 403 identity (auth), then hand the message to the
//! orchestrator, whose answer (duplicate → same answer, 404, 409, 202) is passed on; 503 when auth or the
//! orchestrator do not answer in time. The secret of a START (the account) or a PREPARED (the key) goes
//! along sealed for auth: the orchestrator lodges it with auth only once its decision accepted the message
//! and before it commits, so a refused message (404, 409) leaves no secret on the bus or in the store.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dm_bus::{Area, Bus, Names};
use dm_proto::bus::v1::{
    DelegationRef, IdentityAnswer, IdentityCheck, InboundAnswer, InboundPeerMessage, Lodge, lodge,
};
use dm_protocol::delegation::{self, Body, DelegationError, Limits, Message};
use dm_saga::pb;
use http_body_util::{BodyExt, Full};
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::ask::{AskError, TRACE_HEADERS, ask};
use crate::config::Timeouts;
use crate::convert::peer_message;
use crate::guard::{Busy, Guard};
use crate::tls::{PeerIdentity, TrustVerifier};

pub(crate) struct Inbound {
    pub bus: Bus,
    pub path: String,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub identity_subject: String,
    pub peer_subject: String,
    /// For the metrics' `deployment` label.
    pub deployment: String,
    /// The `Timestamp` window and the per-peer limits.
    pub guard: Guard,
    /// Seals the secret of a START or a PREPARED for auth.
    pub bus_key: Option<dm_seal::BusKey>,
    /// Auth's recent yes to an identity check (the check's bytes: certificate and DMServerID), with when
    /// it was given. Auth's answer depends on nothing else (its trust registry is its configuration), and a
    /// peer sends every message of a delegation with the same certificate and DMServerID: asked once per
    /// [`IDENTITY_REUSE`], not for each message. A refusal is never kept.
    allowed: std::sync::Mutex<HashMap<Vec<u8>, std::time::Instant>>,
}

/// How long auth's yes to an identity check is reused: a peer removed from auth's registry (by a restart
/// of auth with a new configuration) is refused by every gateway within this time.
pub(crate) const IDENTITY_REUSE: Duration = Duration::from_secs(10);

/// Identity answers kept at most (one per certificate and DMServerID seen in the last [`IDENTITY_REUSE`]).
const IDENTITY_KEPT: usize = 4096;

impl Inbound {
    pub(crate) fn new(
        bus: Bus,
        names: &Names,
        path: String,
        max_body_bytes: usize,
        timeouts: Timeouts,
    ) -> Result<Self, dm_bus::BusError> {
        Ok(Self {
            bus,
            path,
            limits: Limits {
                max_bytes: max_body_bytes,
                ..Limits::default()
            },
            timeouts,
            identity_subject: names.subject(Area::Req, "auth.identity")?,
            peer_subject: names.subject(Area::Req, "orchestrator.peer")?,
            deployment: names.deployment().to_string(),
            guard: Guard::off(),
            bus_key: None,
            allowed: std::sync::Mutex::default(),
        })
    }

    /// Whether auth allowed this identity check within [`IDENTITY_REUSE`].
    fn recently_allowed(&self, check: &[u8]) -> bool {
        let allowed = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        allowed
            .get(check)
            .is_some_and(|at| at.elapsed() < IDENTITY_REUSE)
    }

    fn remember_allowed(&self, check: Vec<u8>) {
        let mut allowed = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        if allowed.len() >= IDENTITY_KEPT {
            allowed.retain(|_, at| at.elapsed() < IDENTITY_REUSE);
            if allowed.len() >= IDENTITY_KEPT {
                allowed.clear();
            }
        }
        allowed.insert(check, std::time::Instant::now());
    }

    /// The same endpoint, sealing the secrets of inbound messages with `key` (without one, a START or a
    /// PREPARED gets 503: its secret cannot be handed on).
    pub(crate) fn with_bus_key(mut self, key: dm_seal::BusKey) -> Self {
        self.bus_key = Some(key);
        self
    }

    /// The same endpoint with these guards (none by default).
    pub(crate) fn with_guard(mut self, guard: Guard) -> Self {
        self.guard = guard;
        self
    }
}

type HttpResponse = Response<Full<Bytes>>;

/// An error answer with a `<DelegationError>` body.
pub(crate) fn error_response(status: u16, reason: &str) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = if reason.is_empty() {
        status.canonical_reason().unwrap_or("error")
    } else {
        reason
    };
    let body = delegation::encode_error(&DelegationError {
        status_code: status.as_u16(),
        reason: reason.to_string(),
    });
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = format!("{}; charset=utf-8", delegation::CONTENT_TYPE).parse() {
        response.headers_mut().insert(CONTENT_TYPE, v);
    }
    response
}

fn unavailable(reason: &str) -> HttpResponse {
    let mut response = error_response(503, reason);
    response
        .headers_mut()
        .insert(RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
    response
}

/// 503 for a message past one of its sender's limits, with the wait it needs.
fn over_limit(busy: &Busy) -> HttpResponse {
    let mut response = error_response(503, &busy.reason);
    response.headers_mut().insert(
        RETRY_AFTER,
        hyper::header::HeaderValue::from(busy.retry_after_secs),
    );
    response
}

/// `application/vnd.dm.delegation+xml`, any case, with optional parameters; a `charset` must be UTF-8.
pub(crate) fn content_type_ok(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut parts = value.split(';');
    let media = parts.next().unwrap_or_default().trim();
    if !media.eq_ignore_ascii_case(delegation::CONTENT_TYPE) {
        return false;
    }
    parts.all(|param| match param.split_once('=') {
        Some((name, value)) if name.trim().eq_ignore_ascii_case("charset") => {
            let v = value.trim().trim_matches('"');
            v.eq_ignore_ascii_case("utf-8") || v.eq_ignore_ascii_case("utf8")
        }
        Some(_) => true,
        None => param.trim().is_empty(),
    })
}

enum BodyError {
    TooLarge,
    Broken,
}

/// Reads the body, keeping at most `limit` bytes: one byte more and it stops with `TooLarge`.
async fn read_limited<B>(mut body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyError::Broken)?;
        if let Ok(data) = frame.into_data() {
            if buf.len().saturating_add(data.len()) > limit {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn trace_of(headers: &HeaderMap) -> Vec<(String, String)> {
    TRACE_HEADERS
        .iter()
        .filter_map(|name| {
            let v = headers.get(*name)?.to_str().ok()?;
            Some((name.to_string(), v.to_string()))
        })
        .collect()
}

/// The span of an inbound peer message (when spans are exported).
fn receive_span(message: &Message, trace: &[(String, String)]) -> tracing::Span {
    if !dm_telemetry::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        parent: None,
        "dmd.gateway.receive",
        otel.name = %format!("receive {}", message.body.name()),
        otel.kind = "server",
        http.request.method = "POST",
        http.response.status_code = tracing::field::Empty,
        dmd.message = message.body.name(),
        dmd.sender = %message.dm_server_id,
        dmd.session_id = %message.session_id,
        dmd.msg_id = %message.msg_id,
    );
    let get = |name: &str| {
        trace
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    dm_telemetry::follow(&span, get("traceparent"), get("tracestate"));
    span
}

fn bus_trouble(what: &str, e: &AskError) -> HttpResponse {
    tracing::warn!(error = %e, "{what} did not answer; answering 503");
    unavailable("the system cannot take messages now; retry later")
}

impl Inbound {
    /// One request, answered in the order of A.2, and counted by message type and status.
    /// Generic over the body so that the fuzz target can drive it without a connection (`fuzzing`).
    pub(crate) async fn handle<B>(&self, req: Request<B>, peer: &PeerIdentity) -> HttpResponse
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
    {
        let metrics = dm_metrics::global();
        let _in_flight = metrics.peer_in_flight(&self.deployment, "in");
        let mut kind = "unreadable";
        let response = self.answer(req, peer, &mut kind).await;
        metrics.peer_received(&self.deployment, kind, response.status().as_u16());
        response
    }

    /// [`Inbound::handle`]; `kind` becomes the message's type once it decoded.
    async fn answer<B>(
        &self,
        req: Request<B>,
        peer: &PeerIdentity,
        kind: &mut &'static str,
    ) -> HttpResponse
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
    {
        if req.uri().path() != self.path {
            return error_response(404, "no delegation endpoint at this path");
        }
        if !content_type_ok(req.headers()) {
            return error_response(
                415,
                &format!("Content-Type must be {} (UTF-8)", delegation::CONTENT_TYPE),
            );
        }
        if req.method() != Method::POST {
            let mut response = error_response(405, "only POST is allowed");
            response
                .headers_mut()
                .insert(ALLOW, hyper::header::HeaderValue::from_static("POST"));
            return response;
        }
        let limit = self.limits.max_bytes;
        let too_large = || {
            error_response(
                413,
                &format!("the body is larger than the limit of {limit} bytes"),
            )
        };
        if declared_length(req.headers()).is_some_and(|n| n > limit as u64) {
            return too_large();
        }
        let trace = trace_of(req.headers());
        let body =
            match tokio::time::timeout(self.timeouts.read, read_limited(req.into_body(), limit))
                .await
            {
                Ok(Ok(body)) => body,
                Ok(Err(BodyError::TooLarge)) => return too_large(),
                Ok(Err(BodyError::Broken)) => {
                    return error_response(400, "the body could not be read");
                }
                Err(_) => return error_response(408, "the body did not arrive in time"),
            };
        let message = match delegation::decode_with_limits(&body, &self.limits) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(error = %e, "inbound message refused");
                let answer = DelegationError::from_decode_error(&e);
                return error_response(answer.status_code, &answer.reason);
            }
        };
        *kind = message.body.name();
        // Limits before any bus request is made for the message.
        let _permit = match self.guard.limiter.admit(&message.dm_server_id) {
            Ok(permit) => permit,
            Err(busy) => {
                tracing::info!(sender = %message.dm_server_id, reason = %busy.reason, "inbound message over its sender's limit; answering 503");
                return over_limit(&busy);
            }
        };
        // The server span of this hop: child of the peer's context, parent of the requests it makes.
        let span = receive_span(&message, &trace);
        let mut trace = trace;
        if let Some(own) = dm_telemetry::traceparent(&span) {
            trace.retain(|(name, _)| name != "traceparent");
            trace.push(("traceparent".to_string(), own));
        }
        let response =
            tracing::Instrument::instrument(self.take(&message, peer, &trace), span.clone()).await;
        span.record("http.response.status_code", response.status().as_u16());
        tracing::info!(
            msg_id = %message.msg_id,
            session_id = %message.session_id,
            sender = %message.dm_server_id,
            message = message.body.name(),
            status = response.status().as_u16(),
            "inbound message answered"
        );
        response
    }

    /// From a decoded message to the answer: identity, secrets, decision.
    async fn take(
        &self,
        message: &Message,
        peer: &PeerIdentity,
        trace: &[(String, String)],
    ) -> HttpResponse {
        let check = IdentityCheck {
            spki_sha256: peer.spki_sha256.clone(),
            subject_alt_names: peer.subject_alt_names.clone(),
            issuer_ca: peer.issuer_ca.clone(),
            dm_server_id: message.dm_server_id.clone(),
        };
        let check_bytes = check.encode_to_vec();
        let identity: IdentityAnswer = if self.recently_allowed(&check_bytes) {
            IdentityAnswer {
                allowed: true,
                reason: String::new(),
            }
        } else {
            match ask::<IdentityAnswer>(
                &self.bus,
                &self.identity_subject,
                &check,
                "dmd.bus.v1.IdentityCheck",
                "IdentityAnswer",
                trace,
                self.timeouts.auth,
            )
            .await
            {
                Ok(a) => {
                    if a.allowed {
                        self.remember_allowed(check_bytes);
                    }
                    a
                }
                Err(e) => return bus_trouble("auth (identity)", &e),
            }
        };
        if !identity.allowed {
            tracing::warn!(
                sender = %message.dm_server_id,
                spki_sha256 = %peer.spki_sha256,
                reason = %identity.reason,
                "certificate may not speak as this DMServerID"
            );
            let reason = if identity.reason.is_empty() {
                "the client certificate does not belong to this DMServerID".to_string()
            } else {
                identity.reason
            };
            return error_response(403, &reason);
        }
        // An authenticated sender's message, checked for age. A stale one goes on without its secret:
        // the orchestrator answers a copy of a message it has seen as the first copy was answered (a
        // peer may retry with the same bytes until the step's deadline, A.2) and refuses any other
        // with 400, so nothing of it is ever kept.
        let stale = self.guard.stale(message.timestamp);
        let lodge = match &stale {
            Some(reason) => {
                tracing::info!(sender = %message.dm_server_id, msg_id = %message.msg_id, %reason, "inbound message outside the Timestamp window");
                None
            }
            None => match self.sealed_secret(message) {
                Ok(lodge) => lodge,
                Err(_) => {
                    return unavailable("the message's secret could not be stored; retry later");
                }
            },
        };
        let mut forwarded = peer_message(message);
        forwarded.stale = stale.unwrap_or_default();
        let inbound = InboundPeerMessage {
            message: Some(forwarded),
            lodge,
        };
        let answer: InboundAnswer = match ask(
            &self.bus,
            &self.peer_subject,
            &inbound,
            "dmd.bus.v1.InboundPeerMessage",
            "InboundAnswer",
            trace,
            self.timeouts.orchestrator,
        )
        .await
        {
            Ok(a) => a,
            Err(e) => return bus_trouble("the orchestrator", &e),
        };
        match answer.http_status {
            202 => {
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = StatusCode::ACCEPTED;
                response
            }
            503 => unavailable(&answer.reason),
            status @ 400..=599 => {
                error_response(u16::try_from(status).unwrap_or(500), &answer.reason)
            }
            other => {
                tracing::error!(
                    status = other,
                    "the orchestrator answered an unknown status"
                );
                error_response(500, "internal failure")
            }
        }
    }

    /// The secret part of START (the account) or PREPARED (the key), sealed for auth with the bus key:
    /// bound to the delegation, the field and the direction. `Err`: it cannot be sealed (503).
    fn sealed_secret(&self, message: &Message) -> Result<Option<Lodge>, dm_seal::SealError> {
        // The receiver of START is the delegating server, the receiver of PREPARED the delegated one.
        let (role, field, plain) = match &message.body {
            Body::Start(start) => (
                pb::Role::Delegating,
                dm_seal::field::PEER_ACCOUNT,
                dm_seal::Zeroizing::new(dm_protocol::tnds::encode(&start.dm_acc).into_bytes()),
            ),
            Body::Prepared(p) => (
                pb::Role::Delegated,
                dm_seal::field::TEMP_KEY,
                dm_seal::Zeroizing::new(p.temp_delegation_key.to_base64().into_bytes()),
            ),
            _ => return Ok(None),
        };
        let Some(bus_key) = &self.bus_key else {
            tracing::error!("no bus key: the message's secret cannot be handed on; answering 503");
            return Err(dm_seal::SealError);
        };
        let record = dm_bus::subjects::delegation_key(
            &message.dm_server_id,
            &message.session_id.to_string(),
        );
        let sealed = bus_key.seal(&record, field, dm_seal::Direction::ToAuth, &plain)?;
        let secret = match &message.body {
            Body::Start(_) => lodge::Secret::SealedStartAccount(sealed),
            _ => lodge::Secret::SealedTempDelegationKey(sealed),
        };
        let mut delegation = DelegationRef {
            peer_server_id: message.dm_server_id.clone(),
            session_id: message.session_id.to_string(),
            ..Default::default()
        };
        delegation.set_role(role);
        Ok(Some(Lodge {
            delegation: Some(delegation),
            secret: Some(secret),
        }))
    }

    /// Serves one accepted TCP connection: the mutual-TLS handshake, then HTTP/1.1 requests until the peer
    /// closes, the connection idles past `timeouts.read`, or `shutdown` turns true.
    pub(crate) async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        acceptor: TlsAcceptor,
        verifier: Arc<TrustVerifier>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let tls = match tokio::time::timeout(self.timeouts.handshake, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::info!(%remote, error = %e, "TLS handshake refused");
                return;
            }
            Err(_) => {
                tracing::info!(%remote, "TLS handshake timed out");
                return;
            }
        };
        let identity = match tls.get_ref().1.peer_certificates() {
            Some(chain) => verifier.identify(chain),
            None => Err("no client certificate".to_string()),
        };
        let identity = match identity {
            Ok(identity) => Arc::new(identity),
            Err(e) => {
                tracing::info!(%remote, error = %e, "client certificate not usable");
                return;
            }
        };
        let this = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let this = this.clone();
            let identity = identity.clone();
            // Boxed so that the connection can be polled without shutting its IO down (see below).
            Box::pin(async move { Ok::<_, Infallible>(this.handle(req, &identity).await) })
                as Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>
        });
        // Keep-alive: a peer's gateway sends every message of every delegation over the few connections it
        // pools. The header read timeout also runs while a connection waits for its next request, so an
        // idle connection is closed after `timeouts.read` (the sender's pool lets go of its idle ones
        // before the default 30 s).
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(self.timeouts.read);
        let mut conn = builder.serve_connection(TokioIo::new(tls), service);
        let mut draining = false;
        let result = loop {
            tokio::select! {
                result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break result,
                _ = crate::stopped(&mut shutdown), if !draining => {
                    Pin::new(&mut conn).graceful_shutdown();
                    draining = true;
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%remote, error = %e, "connection ended with an error");
            return;
        }
        let tls = conn.into_parts().io.into_inner();
        lingering_close(tls).await;
    }
}

/// How long, and how much, a closing connection may still be read and discarded.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// Closes a connection whose client may still be sending a body we answered without reading (415, 405,
/// 413): the answer and close_notify go out first, then what still arrives is read and discarded for a
/// short while. Closing a socket with unread input makes the kernel send a reset, which can destroy the
/// answer before the client reads it (the "lingering close" of HTTP servers).
async fn lingering_close(mut tls: tokio_rustls::server::TlsStream<TcpStream>) {
    if tls.shutdown().await.is_err() {
        return;
    }
    let (mut tcp, _) = tls.into_inner();
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut total = 0usize;
        while total < LINGER_BYTES {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, ct.parse().unwrap());
        h
    }

    #[test]
    fn content_types() {
        for ok in [
            "application/vnd.dm.delegation+xml",
            "application/vnd.dm.delegation+xml; charset=UTF-8",
            "Application/VND.DM.Delegation+XML;charset=\"utf-8\"",
            "application/vnd.dm.delegation+xml; profile=x",
        ] {
            assert!(content_type_ok(&headers(ok)), "{ok}");
        }
        for bad in [
            "application/xml",
            "text/xml; charset=utf-8",
            "application/vnd.dm.delegation+xml; charset=iso-8859-1",
            "application/vnd.dm.delegation+xmlx",
        ] {
            assert!(!content_type_ok(&headers(bad)), "{bad}");
        }
        assert!(!content_type_ok(&HeaderMap::new()));
    }

    #[test]
    fn error_bodies_decode() {
        let r = error_response(409, "not now");
        assert_eq!(r.status(), 409);
        let _ = r;
        let body = delegation::encode_error(&DelegationError {
            status_code: 409,
            reason: "not now".into(),
        });
        let back = delegation::decode_error(body.as_bytes()).unwrap();
        assert_eq!(back.status_code, 409);
    }
}
