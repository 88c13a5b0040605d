//! One DM session of a device with a server, over HTTP (docs/device-side.md, "One DM session").
//!
//! 1. Package #1 to the account's `Addr`: `Alert` 1200 (server-initiated) or 1201, `Replace` of
//!    `./DevInfo`, `Final`, with the CLCRED `Cred` (`syncml:auth-md5`) and `Meta/MaxMsgSize`. After a
//!    package #0 that verified only with the zero nonce (B.1 resynchronisation), that `Cred` is computed
//!    over the nonce `0x00000000`.
//! 2. Every server message's `Cred` is checked against the SRVCRED of the device's tree (auth-md5 only).
//!    Wrong or missing: the device answers `401` + `Chal` (a fresh server nonce) for the header and
//!    `401` for every command, executes nothing, and reads the server's reply, which may carry a `Cred`
//!    over the new nonce (B.1: resent at most twice). The third refused message in a row ends the
//!    session unanswered.
//! 3. The server's `Status` for the device's `SyncHdr`: a `Chal`'s `NextNonce` is stored in CLCRED
//!    `AAuthData`; a 401/407 answer to package #1 makes the device resend package #1 once (next `MsgID`),
//!    with `212` + `Chal` for the server's header first: the server's nonce was used by that answer and is
//!    never accepted twice.
//! 4. Commands are executed as the account's ServerID; the answer starts with `212` + `Chal` carrying a
//!    fresh server nonce, stored in SRVCRED `AAuthData` after the commands ran (so that it is the value in
//!    force, whatever the commands wrote there).
//! 5. A server message with no management command and `Final` ends the session unanswered.
//!
//! The quirks of [`SessionConfig::quirks`] change this as [`Quirks`] describes (`trailing-bytes`,
//! `forget-nonce` and the `Cred` checks of `text-nonce` here, the others in the executor).
//!
//! The device is locked only while a message is built or executed, never across a network await.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dm_protocol::auth::{self, AuthScheme, decode_nonce, encode_nonce};
use dm_protocol::codes::{AlertCode, StatusCode};
use dm_protocol::syncml::{
    self, Alert, Chal, Command, Item, ItemCommand, Location, Meta, Status, SyncBody, SyncHdr,
    SyncMl,
};
use serde::Serialize;

use crate::device::Device;
use crate::executor::{self, ExecOptions};
use crate::quirks::Quirks;

/// The `MaxMsgSize` the device announces.
pub const MAX_MSG_SIZE: u64 = 65_536;
/// The largest server message body the device reads (bigger ones end the session).
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// The nonce of package #0 resynchronisation (B.1): four zero bytes.
pub const ZERO_NONCE: [u8; 4] = [0; 4];
/// Server messages refused in a row (wrong or missing `Cred`) that end a session: the server gets two
/// chances to resend its credential over the device's new nonce (B.1).
pub const MAX_REFUSED: u32 = 3;

/// Who asked for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// A valid package #0 with this session id: `Alert` 1200.
    Server { session_id: u16 },
    /// The device itself: `Alert` 1201, a random session id.
    Client,
}

impl Trigger {
    pub fn alert(self) -> AlertCode {
        match self {
            Trigger::Server { .. } => AlertCode::ServerInitiatedMgmt,
            Trigger::Client => AlertCode::ClientInitiatedMgmt,
        }
    }

    /// The `SessionID` of package #1: the package #0 session id in upper-case hex, four digits
    /// (`0x00AB` → `00AB`); client-initiated: a random one in the same form.
    pub fn session_id(self) -> String {
        let id = match self {
            Trigger::Server { session_id } => session_id,
            Trigger::Client => u16::from_be_bytes(rand::random::<[u8; 2]>()),
        };
        format!("{id:04X}")
    }
}

/// Whose credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthSide {
    /// The server refused the device's credential (its status for the device's `SyncHdr`).
    Client,
    /// The device refused the server's credential (and answered 401).
    Server,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The server sent a message without management commands and with `Final`.
    Completed,
    /// Authentication failed: `code` is the status the refusing side gave (401, 407, 403, …).
    AuthFailed { code: u16, side: AuthSide },
    /// The server could not be reached, or answered with an HTTP status other than 200.
    TransportError { reason: String },
    /// The server's message could not be used (not SyncML, no header status for package #1, too many
    /// messages), or the device has no usable account for that server.
    ProtocolError { reason: String },
    /// The server sent `Alert` 1223 (session abort).
    Aborted,
}

/// What a session did, as recorded by the fleet. Carries no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionRecord {
    /// The ServerID of the account the session ran for.
    pub server: String,
    /// 1200 (server-initiated) or 1201 (client-initiated).
    pub alert: u16,
    /// The `SessionID` the device used.
    pub session_id: String,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Item operations run on the tree (see [`executor::Execution::executed`]).
    pub commands_executed: usize,
    /// Messages the device posted (package #1 and its retry included).
    pub messages_sent: u32,
    /// Bytes the server sent after the end of its messages' root element (after the last `>` of each
    /// HTTP body), in the whole session. A server should send none (B.6).
    pub trailing_bytes: usize,
    /// The session followed a package #0 that verified only with the zero nonce (B.1): package #1's
    /// `Cred` was computed over `0x00000000`.
    pub zero_nonce: bool,
    /// The changes that stayed on the tree, in order (see [`executor::Execution::changes`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
}

/// Settings of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The most messages a device posts in one session before giving up (protocol error).
    pub max_messages: u32,
    /// Behave like the open-source C client of PROTOCOL.md B.6, to test servers against it: post with
    /// `application/vnd.syncml+xml`, authenticate with `syncml:auth-basic` until the server answers
    /// package #1 with 401 and an auth-md5 `Chal`, and do not implement `Atomic` (no status for it, its
    /// commands run one by one, nothing is rolled back).
    pub b6_client: bool,
    /// The field quirks of PROTOCOL.md B.6 the devices reproduce (default: none).
    pub quirks: Quirks,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_messages: 64,
            b6_client: false,
            quirks: Quirks::NONE,
        }
    }
}

/// The HTTP client the sessions share: plain `http://`, a 30 s timeout per request.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

fn lock(device: &Mutex<Device>) -> MutexGuard<'_, Device> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An HTTP error with its causes (`error sending request: connection refused`), without the URL.
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn fresh_nonce() -> [u8; 16] {
    rand::random::<[u8; 16]>()
}

fn md5_chal(nonce: &[u8]) -> Chal {
    Chal {
        meta: Meta {
            next_nonce: Some(encode_nonce(nonce)),
            ..Meta::format_type(auth::FORMAT_B64, auth::AUTH_MD5)
        },
    }
}

/// Whether a status challenges with `syncml:auth-md5`.
fn md5_challenge(status: &Status) -> bool {
    status
        .chal
        .as_ref()
        .and_then(|c| c.meta.type_.as_deref())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(auth::AUTH_MD5))
}

fn protocol(reason: impl Into<String>) -> Outcome {
    Outcome::ProtocolError {
        reason: reason.into(),
    }
}

struct Session<'a> {
    http: &'a reqwest::Client,
    device: &'a Mutex<Device>,
    server: &'a str,
    trigger: Trigger,
    b6_client: bool,
    quirks: Quirks,
    zero_nonce: bool,
    session_id: String,
    dev_id: String,
    url: String,
    msg_id: u32,
    sent: u32,
    executed: usize,
    changes: Vec<String>,
    trailing_bytes: usize,
    /// `trailing-bytes`: what followed the root end of the server's last message, to put in front of
    /// the device's next one.
    carried: Vec<u8>,
}

/// Runs a whole session of `device` with the server whose ServerID is `server`. Never panics; every
/// ending is an [`Outcome`] in the returned record.
pub async fn run_session(
    http: &reqwest::Client,
    device: &Mutex<Device>,
    server: &str,
    trigger: Trigger,
    config: &SessionConfig,
) -> SessionRecord {
    run_session_with(http, device, server, trigger, false, config).await
}

/// [`run_session`]; with `zero_nonce` (a package #0 that verified only with [`ZERO_NONCE`], B.1),
/// package #1's `Cred` is computed over the zero nonce instead of the stored CLCRED nonce.
pub async fn run_session_with(
    http: &reqwest::Client,
    device: &Mutex<Device>,
    server: &str,
    trigger: Trigger,
    zero_nonce: bool,
    config: &SessionConfig,
) -> SessionRecord {
    let (dev_id, url) = {
        let d = lock(device);
        (d.dev_id().to_string(), d.address(server))
    };
    let mut session = Session {
        http,
        device,
        server,
        trigger,
        b6_client: config.b6_client,
        quirks: config.quirks,
        zero_nonce,
        session_id: trigger.session_id(),
        dev_id,
        url: url.unwrap_or_default(),
        msg_id: 0,
        sent: 0,
        executed: 0,
        changes: Vec::new(),
        trailing_bytes: 0,
        carried: Vec::new(),
    };
    let outcome = match session.run(config).await {
        Ok(()) => Outcome::Completed,
        Err(o) => o,
    };
    if config.quirks.forget_nonce {
        // As after a reset: the server nonce is lost, the server cannot know the new one. (No account
        // left: nothing to forget.)
        let _ = lock(device).store_server_nonce(server, &fresh_nonce());
    }
    match &outcome {
        Outcome::Completed => tracing::info!(
            dev_id = %session.dev_id, server, executed = session.executed, "DM session completed"
        ),
        other => {
            tracing::warn!(dev_id = %session.dev_id, server, outcome = ?other, "DM session failed")
        }
    }
    SessionRecord {
        server: server.to_string(),
        alert: trigger.alert().code(),
        session_id: session.session_id,
        outcome,
        commands_executed: session.executed,
        messages_sent: session.sent,
        trailing_bytes: session.trailing_bytes,
        zero_nonce,
        changes: session.changes,
    }
}

impl Session<'_> {
    fn header(&mut self) -> SyncHdr {
        self.msg_id += 1;
        SyncHdr::new(
            self.session_id.clone(),
            self.msg_id.to_string(),
            Location::new(self.url.clone()),
            Location::new(self.dev_id.clone()),
        )
    }

    /// Package #1 with the current CLCRED nonce, or `nonce` when given (`syncml:auth-basic` when
    /// `basic`), after `first` (the status for the server's header when package #1 is resent).
    fn package1(
        &mut self,
        first: Option<Command>,
        basic: bool,
        nonce: Option<&[u8]>,
    ) -> Result<Vec<u8>, Outcome> {
        let mut hdr = self.header();
        let d = lock(self.device);
        let cred = d
            .client_credential_with(self.server, self.quirks.text_nonce)
            .ok_or_else(|| protocol("the account has no CLCRED credential"))?;
        let nonce = nonce
            .or(cred.nonce.as_deref())
            .ok_or_else(|| protocol("the CLCRED AAuthData is not valid base64"))?;
        hdr.cred = Some(if basic {
            auth::cred_basic(&cred.name, cred.secret())
        } else {
            auth::cred_md5(&cred.name, cred.secret(), nonce)
        });
        hdr.meta = Some(Box::new(Meta {
            max_msg_size: Some(MAX_MSG_SIZE),
            ..Meta::default()
        }));
        let items = d
            .dev_info()
            .into_iter()
            .map(|(name, value)| Item::source(format!("./DevInfo/{name}")).with_data(value))
            .collect();
        drop(d);
        let first_id = u32::from(first.is_some()) + 1;
        let body = SyncBody {
            commands: first
                .into_iter()
                .chain([
                    Command::Alert(Alert::new(first_id.to_string(), self.trigger.alert())),
                    Command::Replace(ItemCommand::new((first_id + 1).to_string(), items)),
                ])
                .collect(),
            final_: true,
        };
        Ok(self.encode(&SyncMl { hdr, body }))
    }

    /// The message's bytes: [`syncml::encode`], with NUL bytes for `nul-in-lists`.
    fn encode(&self, msg: &SyncMl) -> Vec<u8> {
        let text = syncml::encode(msg);
        if self.quirks.nul_in_lists {
            executor::with_nul_bytes(&text)
        } else {
            text.into_bytes()
        }
    }

    /// Posts a device message and reads the server's answer; counts (and for `trailing-bytes` keeps)
    /// what the answer has after its root element's end.
    async fn post(&mut self, mut body: Vec<u8>) -> Result<Vec<u8>, Outcome> {
        self.sent += 1;
        if !self.carried.is_empty() {
            // The quirk: the last answer's leftovers go before the XML declaration.
            let mut with = std::mem::take(&mut self.carried);
            with.extend_from_slice(&body);
            body = with;
        }
        let transport = |reason: String| Outcome::TransportError { reason };
        let mut response = self
            .http
            .post(self.url.as_str())
            .header(
                reqwest::header::CONTENT_TYPE,
                if self.b6_client {
                    syncml::CONTENT_TYPE_DS_XML
                } else {
                    syncml::CONTENT_TYPE_XML
                },
            )
            .body(body)
            .send()
            .await
            .map_err(|e| transport(describe(e)))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(transport(format!("HTTP {}", response.status().as_u16())));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| transport(describe(e)))? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(protocol("the server's message is larger than 4 MiB"));
            }
            bytes.extend_from_slice(&chunk);
        }
        let trailing = trailing_bytes(&bytes);
        self.trailing_bytes += trailing.len();
        if self.quirks.trailing_bytes {
            self.carried = trailing.to_vec();
        }
        Ok(bytes)
    }

    /// Whether the server's `Cred` verifies (auth-md5) against the SRVCRED of the tree.
    fn server_verified(&self, msg: &SyncMl) -> bool {
        let Some(cred) = msg.hdr.cred.as_ref() else {
            return false;
        };
        let d = lock(self.device);
        let Some(srv) = d.server_credential_with(self.server, self.quirks.text_nonce) else {
            return false;
        };
        let Some(nonce) = srv.nonce.as_deref() else {
            return false;
        };
        matches!(
            auth::verify_cred(cred, &srv.name, srv.secret(), nonce),
            Ok(AuthScheme::Md5)
        )
    }

    /// The status for the device's header: `code` and a `Chal` with a fresh server nonce, which is
    /// stored as SRVCRED `AAuthData` (the caller does that once the commands ran).
    fn header_status(&self, msg: &SyncMl, code: StatusCode, nonce: &[u8]) -> Command {
        let mut status = Status::new("1", msg.hdr.msg_id.clone(), "0", "SyncHdr", code);
        status.target_refs.push(msg.hdr.target.loc_uri.clone());
        status.source_refs.push(msg.hdr.source.loc_uri.clone());
        status.chal = Some(md5_chal(nonce));
        Command::Status(status)
    }

    fn answer(&mut self, commands: Vec<Command>) -> Vec<u8> {
        let hdr = self.header();
        self.encode(&SyncMl {
            hdr,
            body: SyncBody {
                commands,
                final_: true,
            },
        })
    }

    async fn run(&mut self, config: &SessionConfig) -> Result<(), Outcome> {
        if self.url.is_empty() {
            return Err(protocol("the device has no URI address for this server"));
        }
        let zero = self.zero_nonce.then_some(&ZERO_NONCE[..]);
        let mut body = self.package1(None, self.b6_client, zero)?;
        let mut in_package1 = true;
        let mut retried = false;
        let mut refused = 0;
        loop {
            if self.sent >= config.max_messages {
                return Err(protocol("too many messages in one session"));
            }
            let reply = self.post(body).await?;
            let msg = syncml::decode(&reply)
                .map_err(|e| protocol(format!("the server's message is not SyncML DM: {e}")))?;
            if !self.server_verified(&msg) {
                refused += 1;
                if refused >= MAX_REFUSED {
                    return Err(Outcome::AuthFailed {
                        code: StatusCode::InvalidCredentials.code(),
                        side: AuthSide::Server,
                    });
                }
                body = self.refusal(&msg);
                continue;
            }
            refused = 0;
            // Only a verified server may redirect the device's next messages.
            if let Some(resp_uri) = msg.hdr.resp_uri.as_deref().map(str::trim)
                && !resp_uri.is_empty()
            {
                self.url = resp_uri.to_string();
            }

            let hdr_status = msg.body.commands.iter().find_map(|c| match c {
                Command::Status(s) if s.cmd_ref.trim() == "0" && s.cmd.trim() == "SyncHdr" => {
                    Some(s)
                }
                _ => None,
            });
            if let Some(next) = hdr_status
                .and_then(|s| s.chal.as_ref())
                .and_then(|c| c.meta.next_nonce.as_deref())
            {
                match decode_nonce(next) {
                    Ok(nonce) => {
                        // The account may be gone if the server deleted it: nothing to store then.
                        let _ = lock(self.device).store_client_nonce(self.server, &nonce);
                    }
                    Err(_) => tracing::warn!(
                        dev_id = %self.dev_id, server = self.server,
                        "the server's NextNonce is not valid base64; ignored"
                    ),
                }
            }
            if in_package1 {
                let Some(status) = hdr_status else {
                    return Err(protocol("no Status for the device's SyncHdr"));
                };
                let code = status.data;
                if matches!(
                    code,
                    StatusCode::InvalidCredentials | StatusCode::MissingCredentials
                ) && !retried
                {
                    retried = true;
                    // The server's credential in this answer used its nonce: a fresh one for the next.
                    let nonce = fresh_nonce();
                    let _ = lock(self.device).store_server_nonce(self.server, &nonce);
                    let accepted =
                        self.header_status(&msg, StatusCode::AuthenticationAccepted, &nonce);
                    // B.6: the basic client switches to auth-md5 only when challenged with it.
                    let basic = self.b6_client && !md5_challenge(status);
                    body = self.package1(Some(accepted), basic, None)?;
                    continue;
                }
                if !code.is_success() {
                    return Err(Outcome::AuthFailed {
                        code: code.code(),
                        side: AuthSide::Client,
                    });
                }
                in_package1 = false;
            }

            let management = msg
                .body
                .commands
                .iter()
                .any(|c| !matches!(c, Command::Status(_) | Command::Results(_)));
            if !management && msg.body.final_ {
                return Ok(());
            }

            let nonce = fresh_nonce();
            let execution = {
                let mut d = lock(self.device);
                let options = ExecOptions {
                    without_atomic: self.b6_client,
                    quirks: self.quirks,
                };
                let execution = executor::execute_with_options(
                    d.tree_mut(),
                    self.server,
                    &msg.hdr.msg_id,
                    &msg.body.commands,
                    2,
                    options,
                );
                // Stored after the commands ran: this nonce is what the server is told to use next.
                let _ = d.store_server_nonce(self.server, &nonce);
                execution
            };
            self.executed += execution.executed;
            self.changes.extend(execution.changes);
            if execution.abort {
                return Err(Outcome::Aborted);
            }
            let mut commands = Vec::with_capacity(execution.responses.len() + 2);
            commands.push(self.header_status(&msg, StatusCode::AuthenticationAccepted, &nonce));
            let next_id = execution.responses.len() + 2;
            commands.extend(execution.responses);
            if !management {
                // The server's package is not complete: ask for the next message.
                commands.push(Command::Alert(Alert::new(
                    next_id.to_string(),
                    AlertCode::NextMessage,
                )));
            }
            body = self.answer(commands);
        }
    }

    /// The answer to a server message whose credential is wrong or missing: 401 + `Chal` (a fresh server
    /// nonce, stored: the server's next `Cred` must use it) for the header, 401 for every command.
    fn refusal(&mut self, msg: &SyncMl) -> Vec<u8> {
        let nonce = fresh_nonce();
        let _ = lock(self.device).store_server_nonce(self.server, &nonce);
        let mut commands = vec![self.header_status(msg, StatusCode::InvalidCredentials, &nonce)];
        commands.extend(executor::refuse_all(
            &msg.hdr.msg_id,
            &msg.body.commands,
            StatusCode::InvalidCredentials,
            2,
        ));
        self.answer(commands)
    }
}

/// What follows the root element's end in a message: everything after its last `>` (nothing when
/// there is no `>`).
fn trailing_bytes(body: &[u8]) -> &[u8] {
    match body.iter().rposition(|b| *b == b'>') {
        Some(at) => body.get(at + 1..).unwrap_or_default(),
        None => &[],
    }
}
