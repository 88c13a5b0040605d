//! Outbound connections to one peer, kept for reuse: HTTP/1.1 keep-alive over mutual TLS.
//!
//! A new TCP connection with a full mutual-TLS handshake per message cost 7–11% of the CPU under load
//! (issue 9). A request now takes an idle connection of its peer when one is open and ready, and opens a
//! new one (TCP, full handshake verified by the peer's `TlsConnector`, HTTP/1.1) only when none is. A
//! connection goes back to the pool only after a complete answer; one that failed, was cut short or is
//! too old is dropped. HTTP/1.1 carries one request at a time, so concurrent sends to one peer use as many
//! connections as there are requests in flight; at most [`MAX_IDLE`] of them stay open when idle.
//!
//! A pooled connection the peer closed meanwhile (idle timeout, restart) is usually seen as closed before
//! it is taken. When the failure shows only on use and the request was provably not written (hyper hands
//! it back), the request is sent again once, on a fresh connection. Any other failure goes to the caller,
//! which retries with back-off and the same MsgID (A.2).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use tokio::time::Instant;

use crate::outbound::AttemptError;

/// Idle connections kept per peer; more are closed, the least recently used first.
pub(crate) const MAX_IDLE: usize = 32;
/// An idle connection is closed after this long. Below the 30 s a gateway keeps an idle connection
/// open by default (its header read timeout, `timeouts.read`), so that the peer rarely closes a
/// connection just as it is taken.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(25);
/// A connection is not reused past this age: a new one verifies both certificates again (expiry,
/// rotation) even when the peer is never idle.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(10 * 60);

pub(crate) type Sender = SendRequest<Full<Bytes>>;

/// A peer's answer: the status, the body (up to the limit) and the wait a `Retry-After` asks for.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
    pub retry_after: Option<Duration>,
}

/// `Retry-After` in delta-seconds (RFC 9110 10.2.3). The HTTP-date form is not read: the caller's
/// back-off applies then.
fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    let text = headers
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    text.parse::<u64>().ok().map(Duration::from_secs)
}

/// One open connection: its request handle (the connection task runs apart) and when it was made.
pub(crate) struct Conn {
    sender: Sender,
    opened: Instant,
}

impl Conn {
    pub(crate) fn new(sender: Sender) -> Self {
        Self {
            sender,
            opened: Instant::now(),
        }
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The idle connections to one peer, most recently used last.
pub(crate) struct Pool {
    idle: Mutex<VecDeque<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    max_age: Duration,
    /// Requests sent again after a pooled connection turned out closed.
    #[cfg(test)]
    stale_retries: std::sync::atomic::AtomicUsize,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new(MAX_IDLE, IDLE_TIMEOUT, MAX_AGE)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.idle_count())
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration, max_age: Duration) -> Self {
        Self {
            idle: Mutex::new(VecDeque::new()),
            max_idle,
            idle_timeout,
            max_age,
            #[cfg(test)]
            stale_retries: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // The queue is valid whatever a panicking holder did: take it back.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn usable(&self, idle: &Idle, now: Instant) -> bool {
        !idle.conn.sender.is_closed()
            && now.saturating_duration_since(idle.since) < self.idle_timeout
            && now.saturating_duration_since(idle.conn.opened) < self.max_age
    }

    /// The most recently used idle connection that is still open and young enough; the ones passed over
    /// are closed (dropping the handle ends the connection task).
    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some(entry) = idle.pop_back() {
            if self.usable(&entry, now) {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Back into the pool after a complete answer, unless closed or too old.
    fn checkin(&self, conn: Conn) {
        let now = Instant::now();
        if conn.sender.is_closed() || now.saturating_duration_since(conn.opened) >= self.max_age {
            return;
        }
        let mut idle = self.lock();
        idle.push_back(Idle { conn, since: now });
        while idle.len() > self.max_idle {
            idle.pop_front();
        }
    }

    /// Closes idle connections that timed out or were closed by the peer.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.lock();
        idle.retain(|entry| self.usable(entry, now));
    }

    /// Closes every idle connection (on stop).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    pub(crate) fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// Sends `request` on a pooled connection, or on a new one from `connect`, and reads the answer (at
    /// most `max_answer` bytes of body; a longer or broken body reads as empty and the connection is not
    /// reused). `ready_wait` bounds the wait for a pooled connection to take a request.
    pub(crate) async fn exchange<C, F>(
        &self,
        request: Request<Full<Bytes>>,
        max_answer: usize,
        ready_wait: Duration,
        connect: C,
    ) -> Result<Answer, AttemptError>
    where
        C: FnOnce() -> F,
        F: Future<Output = Result<Sender, AttemptError>>,
    {
        let mut request = request;
        while let Some(mut conn) = self.checkout() {
            // Just back from the previous answer, the connection task may not want the next request yet.
            match tokio::time::timeout(ready_wait, conn.sender.ready()).await {
                Ok(Ok(())) => {}
                // Closed meanwhile, or stuck: drop it and look further.
                _ => continue,
            }
            match conn.sender.try_send_request(request).await {
                Ok(response) => return self.answer(conn, response, max_answer).await,
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        // Stale, and the request never left: once more, on a fresh connection.
                        tracing::debug!(error = %e.error(), "pooled connection was closed; reconnecting");
                        request = unsent;
                        #[cfg(test)]
                        self.stale_retries
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        break;
                    }
                    None => return Err(AttemptError::Http(e.into_error().to_string())),
                },
            }
        }
        let mut conn = Conn::new(connect().await?);
        let response = conn
            .sender
            .send_request(request)
            .await
            .map_err(|e| AttemptError::Http(e.to_string()))?;
        self.answer(conn, response, max_answer).await
    }

    async fn answer(
        &self,
        conn: Conn,
        response: hyper::Response<hyper::body::Incoming>,
        max_answer: usize,
    ) -> Result<Answer, AttemptError> {
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let body = match Limited::new(response.into_body(), max_answer)
            .collect()
            .await
        {
            Ok(body) => {
                self.checkin(conn);
                body.to_bytes()
            }
            // The status is the answer; the connection is in an unknown state and is dropped.
            Err(_) => Bytes::new(),
        };
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::Response;
    use hyper::header::HOST;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;

    /// A plain HTTP/1.1 server answering 202 "ok" with keep-alive; counts the connections it accepted and
    /// the requests it answered.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let (a, n) = (accepted.clone(), answered.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let n = n.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        n.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *r.status_mut() = StatusCode::ACCEPTED;
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (addr, accepted, answered)
    }

    async fn connect(addr: SocketAddr) -> Result<Sender, AttemptError> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| AttemptError::Connect(e.to_string()))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| AttemptError::Http(e.to_string()))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    fn request(addr: SocketAddr) -> Request<Full<Bytes>> {
        Request::post("/")
            .header(HOST, addr.to_string())
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap()
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (addr, accepted, answered) = server().await;
        let pool = Pool::default();
        for _ in 0..10 {
            let Answer { status, body, .. } = pool
                .exchange(request(addr), 1024, WAIT, || connect(addr))
                .await
                .unwrap();
            assert_eq!(status, StatusCode::ACCEPTED);
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(answered.load(Ordering::SeqCst), 10);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_stay_open() {
        let (addr, accepted, _) = server().await;
        let pool = Pool::new(2, IDLE_TIMEOUT, MAX_AGE);
        for _ in 0..5 {
            pool.checkin(Conn::new(connect(addr).await.unwrap()));
        }
        assert_eq!(pool.idle_count(), 2);
        // The most recently used ones are kept and reused: no sixth connection. (The server took all
        // five in order, so an answer on the fifth means the count is final.)
        for _ in 0..3 {
            pool.exchange(request(addr), 1024, WAIT, || connect(addr))
                .await
                .unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn idle_and_old_connections_are_not_reused() {
        let (addr, accepted, _) = server().await;
        let idle_out = Pool::new(MAX_IDLE, Duration::ZERO, MAX_AGE);
        let too_old = Pool::new(MAX_IDLE, IDLE_TIMEOUT, Duration::ZERO);
        for pool in [&idle_out, &too_old] {
            for _ in 0..2 {
                pool.exchange(request(addr), 1024, WAIT, || connect(addr))
                    .await
                    .unwrap();
            }
            pool.sweep();
            assert_eq!(pool.idle_count(), 0);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_connection_closed_by_the_peer_is_replaced() {
        // A server that answers one request per connection and then closes it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        let pool = Pool::default();
        for _ in 0..3 {
            let Answer { status, .. } = pool
                .exchange(request(addr), 1024, WAIT, || connect(addr))
                .await
                .unwrap();
            assert_eq!(status, StatusCode::OK);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// A client stream that can be made to look closed by the peer (EOF on read, broken pipe on write)
    /// without waking its connection task: the state of a pooled connection whose peer went away unseen.
    struct Breakable {
        tcp: tokio::net::TcpStream,
        broken: Arc<std::sync::atomic::AtomicBool>,
    }

    impl tokio::io::AsyncRead for Breakable {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.broken.load(Ordering::SeqCst) {
                return std::task::Poll::Ready(Ok(()));
            }
            std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Breakable {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if self.broken.load(Ordering::SeqCst) {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
        }
    }

    // Single-threaded on purpose: the connection task runs only when this test awaits, so the pooled
    // connection is taken and used before its task can notice that it is broken.
    #[tokio::test(flavor = "current_thread")]
    async fn a_request_not_written_on_a_stale_connection_is_sent_once_more_on_a_new_one() {
        let (addr, accepted, answered) = server().await;
        let pool = Pool::default();
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connect_breakable = |broken: Arc<std::sync::atomic::AtomicBool>| async move {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| AttemptError::Connect(e.to_string()))?;
            let io = TokioIo::new(Breakable { tcp, broken });
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| AttemptError::Http(e.to_string()))?;
            tokio::spawn(conn);
            Ok(sender)
        };
        pool.exchange(request(addr), 1024, WAIT, || {
            connect_breakable(broken.clone())
        })
        .await
        .unwrap();
        // Let the connection task come back to idle, wanting the next request.
        let deadline = Instant::now() + WAIT;
        while !pool.lock().back().is_some_and(|i| i.conn.sender.is_ready()) {
            assert!(
                Instant::now() < deadline,
                "the pooled connection never got ready"
            );
            tokio::task::yield_now().await;
        }
        broken.store(true, Ordering::SeqCst);
        let fresh = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let Answer { status, .. } = pool
            .exchange(request(addr), 1024, WAIT, || connect_breakable(fresh))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(pool.stale_retries.load(Ordering::SeqCst), 1);
        assert_eq!(answered.load(Ordering::SeqCst), 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
