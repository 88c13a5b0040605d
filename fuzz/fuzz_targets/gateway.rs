//! The gateway's inbound handling (`dm_gateway::fuzzing::Endpoint`: the code a request runs after the
//! mutual-TLS handshake), fed a request without a network. The input is a request line and headers, a
//! blank line (`\r\n\r\n`) and the body; an input without a blank line is a body POSTed with the right
//! content type. Auth and the orchestrator are stand-ins that accept everything, so whatever decodes goes
//! the whole way. Checked for every input:
//! - an answer, never a panic and never 500;
//! - 202 has no body and is the only answer after which the orchestrator got the message; any other
//!   answer carries a `<DelegationError>` with the same status;
//! - the message handed to the orchestrator carries no secret of the request (the TEMP_DELEGATION_KEY
//!   raw, base64 or hex; the account's `AAuthSecret` values).

#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use dm_gateway::DEFAULT_PATH;
use dm_gateway::fuzzing::Endpoint;
use dm_protocol::delegation::{self, Body};
use dm_protocol::tnds::{Node, NodeContent, SECRET_NODE_NAMES};
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;

/// The body limit of the endpoint: small, so that the fuzzer also reaches 413.
const MAX_BODY: usize = 16 * 1024;

fn endpoint() -> &'static (Runtime, Endpoint) {
    static ENDPOINT: OnceLock<(Runtime, Endpoint)> = OnceLock::new();
    ENDPOINT.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a Tokio runtime");
        let endpoint = rt
            .block_on(Endpoint::start(MAX_BODY))
            .expect("the endpoint on an in-process bus");
        (rt, endpoint)
    })
}

fn trim(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// The request an input stands for.
fn request(data: &[u8]) -> Request<Full<Bytes>> {
    let default = |body: &[u8]| {
        Request::post(DEFAULT_PATH)
            .header(CONTENT_TYPE, delegation::CONTENT_TYPE)
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("a valid request")
    };
    let Some(split) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        return default(data);
    };
    let (head, body) = (&data[..split], &data[split + 4..]);
    let mut lines = head.split(|&b| b == b'\n').map(trim);
    let mut builder = Request::builder();
    if let Some(first) = lines.next() {
        let mut parts = first.splitn(2, |&b| b == b' ');
        if let Some(method) = parts.next().and_then(|m| Method::from_bytes(m).ok()) {
            builder = builder.method(method);
        }
        if let Some(uri) = parts.next().and_then(|u| Uri::try_from(trim(u)).ok()) {
            builder = builder.uri(uri);
        }
    }
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(trim(&line[..colon])),
            HeaderValue::from_bytes(trim(&line[colon + 1..])),
        ) else {
            continue;
        };
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap_or_else(|_| default(body))
}

fn secret_values(nodes: &[Node], out: &mut Vec<Vec<u8>>) {
    for node in nodes {
        match &node.content {
            NodeContent::Value(v) if SECRET_NODE_NAMES.contains(&node.name.as_str()) => {
                out.push(v.as_bytes().to_vec());
            }
            NodeContent::Value(_) => {}
            NodeContent::Children(children) => secret_values(children, out),
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn occurrences(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fuzz_target!(|data: &[u8]| {
    let (rt, endpoint) = endpoint();
    let request = request(data);
    let body = request.body().clone();
    let response = rt.block_on(endpoint.handle(request));
    let status = response.status().as_u16();
    let seen = endpoint.take_seen();
    let answer = rt
        .block_on(response.into_body().collect())
        .expect("a full body")
        .to_bytes();
    assert_ne!(
        status,
        500,
        "internal failure: {}",
        String::from_utf8_lossy(&answer)
    );
    if status == 202 {
        assert!(answer.is_empty(), "202 with a body");
        assert_eq!(seen.orchestrator.len(), 1, "202 without the orchestrator");
    } else {
        assert!(
            seen.orchestrator.is_empty(),
            "{status} after the orchestrator got the message"
        );
        match delegation::decode_error(&answer) {
            Ok(e) => assert_eq!(e.status_code, status, "status line and body disagree"),
            Err(e) => panic!("{status} without a readable <DelegationError>: {e}"),
        }
    }
    // No secret of the request on the way to the orchestrator. A value is searched only where it is
    // distinctive: long enough, and written once in the request (not also as, say, the ServerID).
    let raw = rt
        .block_on(body.collect())
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let Ok(message) = delegation::decode_with_limits(
        &raw,
        &delegation::Limits {
            max_bytes: MAX_BODY,
            ..Default::default()
        },
    ) else {
        return;
    };
    let mut secrets = Vec::new();
    match &message.body {
        Body::Prepared(p) => {
            let key = p.temp_delegation_key.expose();
            secrets.push(key.to_vec());
            secrets.push(B64.encode(key).into_bytes());
            secrets.push(
                key.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
                    .into_bytes(),
            );
        }
        Body::Start(s) => secret_values(&s.dm_acc.nodes, &mut secrets),
        _ => {}
    }
    for secret in secrets
        .iter()
        .filter(|s| s.len() >= 8 && occurrences(&raw, s) <= 1)
    {
        for payload in &seen.orchestrator {
            assert!(
                !contains(payload, secret),
                "a secret of the request reached the orchestrator"
            );
        }
    }
});
