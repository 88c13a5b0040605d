//! Request/reply on the bus with typed protobuf payloads (docs/bus.md: `dmd-type`, `dmd-version`, trace
//! context headers).

use std::time::Duration;

use bytes::Bytes;
use dm_bus::{Bus, BusError, Headers};

/// Header naming the protobuf type of a payload.
pub const TYPE_HEADER: &str = "dmd-type";
/// Header carrying the payload's schema version.
pub const VERSION_HEADER: &str = "dmd-version";
/// W3C trace context headers, carried from HTTP to the bus and back.
pub const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Why a request got no usable answer. None of these carries a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    #[error("no answer: {0}")]
    Bus(#[from] BusError),
    #[error("answer of {0} cannot be decoded")]
    Undecodable(&'static str),
}

/// Headers of a typed payload, with the trace context of the caller.
pub(crate) fn typed_headers(type_name: &str, trace: &[(String, String)]) -> Headers {
    let mut h = Headers::new();
    h.insert(TYPE_HEADER, type_name);
    h.insert(VERSION_HEADER, "1");
    for (name, value) in trace {
        h.insert(name, value.clone());
    }
    h
}

/// Sends `request` and decodes the answer as `A`.
pub(crate) async fn ask<A: prost::Message + Default>(
    bus: &Bus,
    subject: &str,
    request: &impl prost::Message,
    type_name: &str,
    answer_name: &'static str,
    trace: &[(String, String)],
    timeout: Duration,
) -> Result<A, AskError> {
    let answer = bus
        .request(
            subject,
            typed_headers(type_name, trace),
            Bytes::from(request.encode_to_vec()),
            timeout,
        )
        .await?;
    A::decode(answer.payload).map_err(|_| AskError::Undecodable(answer_name))
}
