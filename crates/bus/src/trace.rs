//! Trace spans of bus hops (when spans are exported, see `dm_telemetry::enabled`): a `send <subject>`
//! span around every publish and request, whose context replaces the message's `traceparent`, and a
//! `process <subject>` span where a message is handled, child of the context the message carries. With
//! export off both are `Span::none()` and the headers are left as the sender made them.

use tracing::Span;

use crate::{Headers, Message};

/// The span of sending `subject`, child of the current span when that is on the trace `headers` carry
/// (or they carry none), else of the carried context; `headers` get the span's own context.
pub fn send_span(subject: &str, headers: &mut Headers) -> Span {
    if !dm_telemetry::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: "dm_bus",
        "dmd.bus.send",
        otel.name = %format!("send {subject}"),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "send",
        messaging.destination.name = %subject,
        dmd.deployment = crate::subjects::deployment_of(subject).unwrap_or_default(),
        dmd.message.type = headers.get("dmd-type").unwrap_or_default(),
    );
    let carried = headers.get("traceparent").map(str::to_string);
    let current = dm_telemetry::trace_id(&Span::current());
    if let Some(tp) = carried.as_deref()
        && current.as_deref() != dm_telemetry::trace_id_of(tp)
    {
        dm_telemetry::follow(&span, Some(tp), headers.get("tracestate"));
    }
    if let Some(own) = dm_telemetry::traceparent(&span) {
        headers.insert("traceparent", own);
    }
    span
}

/// The span of handling `message` in `service`, child of the context the message carries.
pub fn process_span(service: &str, message: &Message) -> Span {
    if !dm_telemetry::enabled() {
        return Span::none();
    }
    let subject = message.subject.as_str();
    let span = tracing::info_span!(
        target: "dm_bus",
        parent: None,
        "dmd.bus.process",
        otel.name = %format!("process {subject}"),
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = %subject,
        dmd.service = %service,
        dmd.deployment = crate::subjects::deployment_of(subject).unwrap_or_default(),
        dmd.message.type = message.headers.get("dmd-type").unwrap_or_default(),
    );
    dm_telemetry::follow(
        &span,
        message.headers.get("traceparent"),
        message.headers.get("tracestate"),
    );
    span
}
