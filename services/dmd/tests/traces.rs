//! Issue 11 item 3: spans exported over OTLP/gRPC to a receiver running in this test. One delegation across
//! both deployments (in-process bus, real mutual TLS between the gateways, real DM sessions) is one trace,
//! a tree with one root, with step spans and bus hops on both deployments, and no attribute holds a secret
//! (raw, base64 or hex). Its own test binary: it installs the process's subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use dm_bus::Bus;
use dm_protocol::tnds::{Node, NodeContent};
use dm_saga::pb::{DelType, Phase};
use dmd::demo::{D1, D2, World, device_id};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use tracing_subscriber::layer::SubscriberExt;

/// One received span and the `service.name` of its resource.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    span: Span,
}

#[derive(Debug, Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a KeyValue> {
    attrs.iter().find(|kv| kv.key == key)
}

fn attr_text(span: &Span, key: &str) -> Option<String> {
    attr(&span.attributes, key).map(|kv| text(kv.value.as_ref()))
}

/// Every text of a span an exporter ships: its name, attributes, events and their attributes.
fn texts(span: &Span) -> Vec<String> {
    let mut out = vec![span.name.clone(), span.trace_state.clone()];
    for kv in &span.attributes {
        out.push(kv.key.clone());
        out.push(text(kv.value.as_ref()));
    }
    for e in &span.events {
        out.push(e.name.clone());
        for kv in &e.attributes {
            out.push(kv.key.clone());
            out.push(text(kv.value.as_ref()));
        }
    }
    out
}

/// The values of every `AAuthSecret` on a device's tree.
fn tree_secrets(nodes: &[Node], out: &mut BTreeSet<String>) {
    for n in nodes {
        match &n.content {
            NodeContent::Value(v) if n.name == "AAuthSecret" && !v.is_empty() => {
                out.insert(v.clone());
            }
            NodeContent::Children(c) => tree_secrets(c, out),
            NodeContent::Value(_) => {}
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A secret as it might leak: raw, base64 (both alphabets), hex (both cases); a base64 secret (the
/// TEMP_DELEGATION_KEY's form on the device) also as the hex of its bytes.
fn leak_forms(secret: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut forms = vec![
        secret.to_string(),
        b64.encode(secret),
        url.encode(secret),
        hex(secret.as_bytes()),
        hex(secret.as_bytes()).to_ascii_uppercase(),
    ];
    if let Ok(raw) = b64.decode(secret)
        && raw.len() >= 8
    {
        forms.push(hex(&raw));
        forms.push(hex(&raw).to_ascii_uppercase());
        forms.push(url.encode(&raw));
    }
    forms
}

#[test]
fn one_delegation_is_one_trace_across_both_deployments_with_no_secret() {
    let received = Receiver::default();
    // The receiver and the exporter each run on a runtime of their own.
    let receiver_rt = tokio::runtime::Runtime::new().unwrap();
    let endpoint = receiver_rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(received.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    });
    let exporter_rt = dm_telemetry::exporter_runtime().unwrap();
    let provider = {
        let _entered = exporter_rt.enter();
        dm_telemetry::tracer_provider(&dm_telemetry::OtlpConfig {
            endpoint,
            service_name: "dmd-test".into(),
        })
        .unwrap()
    };
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(dm_telemetry::otel_layer(&provider)),
    )
    .unwrap();
    assert!(dm_telemetry::enabled());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("dmd-traces-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let device = device_id(0);
    let (state, mut secrets) = rt.block_on(async {
        let w = World::start(&dir, Bus::in_process(), 2).await.unwrap();
        // Every AAuthSecret the device ever holds during the delegation (DMS-1's, the TEMP key as
        // DMS-2's first credential, DMS-2's rotated ones), watched from the side.
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let watching = {
            let seen = seen.clone();
            let fleet = w.fleet.clone();
            let device = device.clone();
            tokio::spawn(async move {
                loop {
                    if let Some(tree) = fleet.export(&device) {
                        tree_secrets(&tree.nodes, &mut seen.lock().unwrap());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let session = w
            .start_delegation(D1, &device, DelType::Partial, &["./Vendor/Acme"], None)
            .await
            .unwrap();
        let step = Duration::from_secs(60);
        let d1 = w.wait_for(D1, &session, Phase::Active, step).await.unwrap();
        w.wait_for(D2, &session, Phase::Active, step).await.unwrap();
        watching.abort();
        w.stop().await.unwrap();
        let seen = seen.lock().unwrap().clone();
        (d1, seen)
    });
    let _ = std::fs::remove_dir_all(&dir);
    // The secrets the demo configures for the device.
    secrets.insert("dms1-secret-0".into());
    secrets.insert("device-secret-0".into());
    assert!(
        secrets.len() >= 4,
        "the device held DMS-1's and DMS-2's credentials: {} secrets seen",
        secrets.len()
    );

    provider.force_flush().unwrap();
    let trace_hex = state.trace_id.clone();
    // The batch goes out from the exporter's thread; wait until the last step (Active on both) is in.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans: Vec<Got> = loop {
        let got = received.0.lock().unwrap().clone();
        let mine: Vec<Got> = got
            .into_iter()
            .filter(|g| hex(&g.span.trace_id) == trace_hex)
            .collect();
        let deployments: HashSet<String> = mine
            .iter()
            .filter(|g| g.span.name.starts_with("step "))
            .filter_map(|g| attr_text(&g.span, "dmd.deployment"))
            .collect();
        if deployments.len() == 2 || Instant::now() > deadline {
            break mine;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !spans.is_empty(),
        "no span of trace {trace_hex} was received"
    );
    eprintln!(
        "{} spans of the delegation, {} secrets searched; span names: {:?}",
        spans.len(),
        secrets.len(),
        spans
            .iter()
            .map(|g| g.span.name.as_str())
            .collect::<BTreeSet<_>>()
    );
    assert!(spans.iter().all(|g| g.service == "dmd-test"));

    // One trace per delegation: every span naming the delegation is on its trace.
    let all = received.0.lock().unwrap().clone();
    for g in &all {
        if attr_text(&g.span, "dmd.session_id").as_deref() == Some(state.session_id.as_str()) {
            assert_eq!(hex(&g.span.trace_id), trace_hex, "span {}", g.span.name);
        }
    }

    // A tree: one root, every other span's parent received.
    let ids: HashSet<Vec<u8>> = spans.iter().map(|g| g.span.span_id.clone()).collect();
    let roots: Vec<&Got> = spans
        .iter()
        .filter(|g| g.span.parent_span_id.is_empty())
        .collect();
    let names_of = |gs: &[&Got]| gs.iter().map(|g| g.span.name.clone()).collect::<Vec<_>>();
    assert_eq!(roots.len(), 1, "roots: {:?}", names_of(&roots));
    assert_eq!(roots[0].span.name, "step operator_start");
    let orphans: Vec<&Got> = spans
        .iter()
        .filter(|g| !g.span.parent_span_id.is_empty() && !ids.contains(&g.span.parent_span_id))
        .collect();
    assert!(
        orphans.is_empty(),
        "spans whose parent is missing: {:?}",
        names_of(&orphans)
    );

    // Steps and bus hops on both deployments, on every service that took part.
    let mut seen: HashMap<&str, BTreeSet<String>> = HashMap::new();
    for g in &spans {
        let deployment = attr_text(&g.span, "dmd.deployment").unwrap_or_default();
        let what = if g.span.name.starts_with("step ") {
            "orchestrator".to_string()
        } else if g.span.name.starts_with("process ") {
            attr_text(&g.span, "dmd.service").unwrap_or_default()
        } else {
            continue;
        };
        let side = if deployment == "dms1" { "dms1" } else { "dms2" };
        seen.entry(side).or_default().insert(what);
    }
    for side in ["dms1", "dms2"] {
        let services = seen.get(side).cloned().unwrap_or_default();
        for wanted in ["orchestrator", "auth", "gateway", "provisioning"] {
            assert!(
                services.contains(wanted),
                "{side}: no span of {wanted}; spans of {services:?}"
            );
        }
    }
    assert!(
        spans.iter().any(|g| g.span.name.starts_with("send ")),
        "no send span"
    );
    assert!(spans.iter().any(|g| g.span.name.starts_with("POST ")));
    assert!(spans.iter().any(|g| g.span.name.starts_with("receive ")));
    for step in ["step peer notif", "step peer prepared", "step peer confirm"] {
        assert!(spans.iter().any(|g| g.span.name == step), "no span {step}");
    }

    // No secret in any span of the run, in any form.
    for secret in &secrets {
        for form in leak_forms(secret) {
            for g in &all {
                for t in texts(&g.span) {
                    assert!(
                        !t.contains(&form),
                        "span {} holds a secret (form {form:?} of one of {} secrets)",
                        g.span.name,
                        secrets.len()
                    );
                }
            }
        }
    }
    let _ = provider.shutdown();
    exporter_rt.shutdown_background();
}
