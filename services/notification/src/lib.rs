//! The notification service. This part is its device half: building a package #0 (PROTOCOL.md B.1) with
//! the right digest and delivering it over a pluggable channel. Deployments push it by WAP push or SMS
//! through a gateway; here an HTTP channel reaches the simulated clients. (The step-1 acceptance policy for
//! inbound DELEGATION_NOTIFs joins this crate with the bus, issue 5.)

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use dm_protocol::package0::{self, Notification, UiMode};

/// Why a package #0 did not reach the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The channel reached the device (or its gateway), which refused: e.g. 401 for a bad digest,
    /// 404 for an unknown device.
    #[error("the device refused the notification with status {0}")]
    Refused(u16),
    /// The device or gateway could not be reached; worth retrying.
    #[error("the device could not be reached: {0}")]
    Unreachable(String),
    /// The notification could not be built (e.g. a ServerID longer than 255 bytes).
    #[error("the notification could not be built: {0}")]
    Build(String),
}

impl ChannelError {
    /// The DM status code a delegation step reports for this failure (PROTOCOL.md A.4: 503 unreachable).
    pub fn status(&self) -> u32 {
        match self {
            ChannelError::Refused(401) => 401,
            ChannelError::Refused(404) => 404,
            ChannelError::Refused(_) | ChannelError::Unreachable(_) => 503,
            ChannelError::Build(_) => 500,
        }
    }
}

/// A way to get a package #0 to a device. Object safe, so deployments can choose one at start.
pub trait Package0Channel: Send + Sync {
    fn deliver<'a>(
        &'a self,
        dev_id: &'a str,
        package0: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), ChannelError>> + Send + 'a>>;
}

/// The server credential a package #0 is signed with: the SRVCRED of this server's account on the device
/// (`AAuthName`, `AAuthSecret`, and the nonce of `AAuthData`, decoded).
#[derive(Clone)]
pub struct ServerCredential {
    pub name: String,
    pub secret: String,
    pub nonce: Vec<u8>,
}

impl std::fmt::Debug for ServerCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCredential")
            .field("name", &self.name)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Builds the package #0 asking the device to open a session with `server_id` (DM 1.2, version 12,
/// server-initiated, background).
pub fn build(
    server_id: &str,
    session_id: u16,
    cred: &ServerCredential,
) -> Result<Vec<u8>, ChannelError> {
    let mut n = Notification::new(server_id, session_id);
    n.ui_mode = UiMode::Background;
    package0::encode(&n, &cred.name, &cred.secret, &cred.nonce)
        .map_err(|e| ChannelError::Build(e.to_string()))
}

/// How long one delivery may take before the device counts as unreachable.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Delivers package #0 by HTTP POST to `{base}/devices/{dev_id}/package0` (the simulated fleet's push
/// endpoint; an SMS or WAP push gateway with an HTTP API fits the same shape).
#[derive(Debug, Clone)]
pub struct HttpPushChannel {
    client: reqwest::Client,
    base_url: String,
}

impl HttpPushChannel {
    /// A channel whose deliveries give up after [`DEFAULT_DELIVERY_TIMEOUT`].
    pub fn new(base_url: impl Into<String>) -> Self {
        Self::with_timeout(base_url, DEFAULT_DELIVERY_TIMEOUT)
    }

    /// A channel whose deliveries give up after `timeout` (a gateway that never answers must not hold
    /// the device's work forever).
    pub fn with_timeout(base_url: impl Into<String>, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            client,
            base_url: base_url.into().trim_end_matches('/').to_string(),
        }
    }
}

/// Percent-encodes a path segment (device ids carry ':' and may carry anything).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Package0Channel for HttpPushChannel {
    fn deliver<'a>(
        &'a self,
        dev_id: &'a str,
        package0: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), ChannelError>> + Send + 'a>> {
        Box::pin(async move {
            let url = format!(
                "{}/devices/{}/package0",
                self.base_url,
                encode_segment(dev_id)
            );
            let response = self
                .client
                .post(url)
                .header("content-type", package0::CONTENT_TYPE)
                .body(package0)
                .send()
                .await
                .map_err(|e| ChannelError::Unreachable(e.without_url().to_string()))?;
            let status = response.status().as_u16();
            if (200..300).contains(&status) {
                Ok(())
            } else {
                Err(ChannelError::Refused(status))
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn cred() -> ServerCredential {
        ServerCredential {
            name: "dms1.example".into(),
            secret: "s3cret".into(),
            nonce: b"nonce-1".to_vec(),
        }
    }

    #[test]
    fn built_notifications_verify_with_the_same_credential_only() {
        let bytes = build("dms1.example", 0x1234, &cred()).unwrap();
        let n = package0::verify(&bytes, "dms1.example", "s3cret", b"nonce-1").unwrap();
        assert_eq!(n.session_id, 0x1234);
        assert_eq!(n.server_id, "dms1.example");
        assert_eq!(n.version, package0::VERSION_DM12);
        assert!(package0::verify(&bytes, "dms1.example", "other", b"nonce-1").is_err());
        assert!(format!("{:?}", cred()).contains("<redacted>"));
        assert!(!format!("{:?}", cred()).contains("s3cret"));
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_segment("IMEI:4901/5"), "IMEI%3A4901%2F5");
    }

    /// Real HTTP on loopback: the body arrives byte for byte at the device's push path; refusals and an
    /// unreachable device map to their errors.
    #[tokio::test]
    async fn http_push_posts_the_bytes_and_maps_refusals() {
        use axum::extract::Path;
        use axum::routing::post;
        type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
        let got: Received = Arc::default();
        let sink = got.clone();
        let app = axum::Router::new().route(
            "/devices/{id}/package0",
            post(move |Path(id): Path<String>, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let status = if id == "unknown" { 404 } else { 202 };
                    sink.lock().unwrap().push((id, body.to_vec()));
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let channel = HttpPushChannel::new(format!("http://{addr}/"));
        let bytes = build("dms1.example", 7, &cred()).unwrap();
        channel.deliver("IMEI:1", bytes.clone()).await.unwrap();
        assert_eq!(
            got.lock().unwrap()[0],
            ("IMEI:1".to_string(), bytes.clone())
        );
        let err = channel.deliver("unknown", bytes.clone()).await.unwrap_err();
        assert_eq!(err, ChannelError::Refused(404));
        assert_eq!(err.status(), 404);
        // Nothing listens on port 9 of loopback here: the device is unreachable.
        let down = HttpPushChannel::new("http://127.0.0.1:9");
        let err = down.deliver("IMEI:1", bytes).await.unwrap_err();
        assert!(matches!(err, ChannelError::Unreachable(_)), "{err:?}");
        assert_eq!(err.status(), 503);
    }

    /// A gateway that accepts the connection and never answers: the delivery gives up after its
    /// timeout as unreachable (it used to wait forever, holding the device's queue).
    #[tokio::test]
    async fn a_gateway_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let channel =
            HttpPushChannel::with_timeout(format!("http://{addr}"), Duration::from_millis(300));
        let bytes = build("dms1.example", 7, &cred()).unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), channel.deliver("IMEI:1", bytes))
            .await
            .expect("the delivery gives up by itself")
            .unwrap_err();
        assert!(matches!(err, ChannelError::Unreachable(_)), "{err:?}");
        assert_eq!(err.status(), 503);
    }
}

pub mod acceptance;
pub mod policy;
