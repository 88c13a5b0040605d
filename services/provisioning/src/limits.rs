//! Limits of the device endpoint: how large a device message may be (413), how long one request may take
//! from its first byte to its answer (408 while its head or body is still arriving, 503 when the answer is
//! not ready), and how many messages are handled at once, per device and in all (503 with `Retry-After`).
//!
//! A DM client sends one message at a time in its one session; a second message of the same device while
//! the first is still being handled is a client that gave up waiting (its retry) or someone posing as the
//! device. The device is the `LocURI` of the header's `Source`, read by a scan of the raw message before it
//! is decoded. An answer that is late is still worked out to its end (its task is not cut off halfway
//! through a session's state change), and the device's place is held until then.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::{DeviceAnswer, Provisioning, session};

/// The limits of the device endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// The largest device message; a larger one is answered 413.
    pub max_body_bytes: usize,
    /// One request, from the first byte of its head to its answer.
    pub request_timeout: Duration,
    /// Messages of one device handled at the same time.
    pub max_requests_per_device: u32,
    /// Device messages handled at the same time, all devices together.
    pub max_requests: u32,
}

/// 2 MiB: the largest message the endpoint took before it had a limit of its own (the HTTP framework's
/// default), enough for the results of a plan's read-back of [`crate::session`]'s 4096 nodes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

impl Default for DeviceLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            // Above the 30 s a message forwarded to the replica that owns the device may take.
            request_timeout: Duration::from_secs(60),
            // One, and the retry of a client that gave up waiting for the answer to it.
            max_requests_per_device: 2,
            max_requests: 512,
        }
    }
}

/// What is being handled now.
pub(crate) struct Gate {
    limits: DeviceLimits,
    all: Arc<Semaphore>,
    /// Messages in progress per device; a device leaves the map when it has none.
    devices: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub(crate) fn new(limits: DeviceLimits) -> Arc<Self> {
        let all = usize::try_from(limits.max_requests).unwrap_or(usize::MAX);
        Arc::new(Self {
            limits,
            all: Arc::new(Semaphore::new(all.min(Semaphore::MAX_PERMITS))),
            devices: Mutex::new(HashMap::new()),
        })
    }

    fn enter(self: &Arc<Self>, dev_id: &str) -> Option<DevicePlace> {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let count = devices.entry(dev_id.to_string()).or_insert(0);
        if *count >= self.limits.max_requests_per_device {
            return None;
        }
        *count += 1;
        Some(DevicePlace {
            gate: self.clone(),
            dev_id: dev_id.to_string(),
        })
    }
}

/// One message's place among its device's; given back when dropped.
struct DevicePlace {
    gate: Arc<Gate>,
    dev_id: String,
}

impl Drop for DevicePlace {
    fn drop(&mut self) {
        let mut devices = self.gate.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = devices.get_mut(&self.dev_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                devices.remove(&self.dev_id);
            }
        }
    }
}

fn plain(status: StatusCode, text: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

/// 503 with `Retry-After` (seconds).
fn busy(text: String) -> Response {
    let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, text);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

enum BodyError {
    TooLarge,
    Broken,
}

async fn read_limited(mut body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyError::Broken)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

impl Provisioning {
    /// One device request within the limits: the checks, then [`Provisioning::route_device`].
    pub(crate) async fn limited(&self, request: axum::extract::Request) -> Response {
        let gate = self.gate.clone();
        let limits = gate.limits;
        let deadline = Instant::now() + limits.request_timeout;
        let Ok(all) = gate.all.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = limits.max_requests,
                "device message refused (503): too many in progress"
            );
            return busy(format!(
                "more than {} device messages in progress; retry later",
                limits.max_requests
            ));
        };
        let too_large = || {
            plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the message is larger than the limit of {} bytes",
                    limits.max_body_bytes
                ),
            )
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
            return too_large();
        }
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = match tokio::time::timeout_at(
            deadline,
            read_limited(request.into_body(), limits.max_body_bytes),
        )
        .await
        {
            Ok(Ok(body)) => body,
            Ok(Err(BodyError::TooLarge)) => return too_large(),
            Ok(Err(BodyError::Broken)) => {
                return plain(StatusCode::BAD_REQUEST, "the body could not be read".into());
            }
            Err(_) => {
                return plain(
                    StatusCode::REQUEST_TIMEOUT,
                    "the message did not arrive in time".into(),
                );
            }
        };
        let place = match session::guess_header(&body) {
            Some(guess) => match gate.enter(&guess.source) {
                Some(place) => Some(place),
                None => {
                    tracing::warn!(
                        dev_id = %guess.source,
                        "device message refused (503): another one of this device is in progress"
                    );
                    return busy(format!(
                        "more than {} messages of this device in progress; retry later",
                        limits.max_requests_per_device
                    ));
                }
            },
            // Not a DM message: the decoder says why, no device to count.
            None => None,
        };
        let this = self.clone();
        let work = tokio::spawn(async move {
            let _held = (all, place);
            this.route_device(&content_type, body).await
        });
        match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(answer)) => answer.into_response(),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "a device message's handling failed");
                DeviceAnswer::text(StatusCode::INTERNAL_SERVER_ERROR, "internal failure")
                    .into_response()
            }
            Err(_) => {
                tracing::warn!("device message: the answer was not ready in time (503)");
                busy("the answer was not ready in time; retry later".into())
            }
        }
    }
}

/// Serves the device endpoint: HTTP/1.1, a request's head must arrive within the request time limit
/// (which also closes a connection idle that long), until `shutdown`; then open requests finish.
pub(crate) async fn serve(
    router: axum::Router,
    listener: tokio::net::TcpListener,
    head_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (tcp, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %e, "device endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let service = TowerToHyperService::new(router.clone());
                let mut stop = stop_rx.clone();
                connections.spawn(async move {
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(head_timeout)
                        .keep_alive(true);
                    let conn = builder.serve_connection(TokioIo::new(tcp), service);
                    tokio::pin!(conn);
                    let stopping = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = stopping => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    let _ = stop_tx.send(true);
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}
