//! The delegation system's Prometheus metrics. One process-wide registry ([`global`]) that every service of
//! the process records into, whatever deployment it belongs to: `dmd all` runs one deployment, the demo and
//! the end-to-end tests run two in one process, so every series that belongs to a deployment carries a
//! `deployment` label. [`encode`] is the text served on `/metrics` (OpenMetrics, which Prometheus reads).
//!
//! Recording is cheap on the hot path: a counter or histogram is an atomic add once its series is found;
//! finding a series with labels is a read lock on its family's map (series are created once). Labels are
//! low-cardinality by construction: enumerated values (`&'static str`), status codes and the deployment's
//! name, never a device, session or message id.
//!
//! Names follow Prometheus conventions: the `dmd_` prefix, `_total` on counters (added by the encoder),
//! `_seconds` on durations, base units. docs/operations.md ("Metrics") lists every one.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of the delegation and device durations: steps wait for a peer, a device or a person, from
/// milliseconds to minutes.
const STEP_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Buckets of bus operations: a NATS round trip is ~0.2 ms on loopback, seconds when the server is away.
const BUS_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DelegationLabels {
    deployment: String,
    role: &'static str,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndedLabels {
    deployment: String,
    role: &'static str,
    r#type: &'static str,
    outcome: &'static str,
    /// The fault's status code; empty when the delegation ended without one (revoked, expired, released).
    status_code: Option<u32>,
    /// The protocol step the fault happened at; empty without a fault.
    step: Option<u32>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    deployment: String,
    role: &'static str,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    deployment: String,
    message: &'static str,
    status: Status,
}

/// A peer's answer: an HTTP status code, or what stood for one when none came.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Status {
    Code(u16),
    /// No answer: the connection failed or the request timed out.
    Error,
}

impl prometheus_client::encoding::EncodeLabelValue for Status {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        match self {
            Status::Code(code) => {
                prometheus_client::encoding::EncodeLabelValue::encode(code, encoder)
            }
            Status::Error => {
                prometheus_client::encoding::EncodeLabelValue::encode(&"error", encoder)
            }
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    deployment: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceJobLabels {
    deployment: String,
    work: &'static str,
    outcome: &'static str,
    status_code: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkLabels {
    deployment: String,
    work: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabels {
    deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    deployment: String,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn step_histogram() -> Histogram {
    Histogram::new(STEP_BUCKETS)
}

fn bus_histogram() -> Histogram {
    Histogram::new(BUS_BUCKETS)
}

/// A bus operation, for its latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusOp {
    Publish,
    Request,
    KvGet,
    KvCreate,
    KvUpdate,
    KvDelete,
}

impl BusOp {
    const ALL: [BusOp; 6] = [
        BusOp::Publish,
        BusOp::Request,
        BusOp::KvGet,
        BusOp::KvCreate,
        BusOp::KvUpdate,
        BusOp::KvDelete,
    ];

    fn label(self) -> &'static str {
        match self {
            BusOp::Publish => "publish",
            BusOp::Request => "request",
            BusOp::KvGet => "kv_get",
            BusOp::KvCreate => "kv_create",
            BusOp::KvUpdate => "kv_update",
            BusOp::KvDelete => "kv_delete",
        }
    }
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    delegations_started: Family<DelegationLabels, Counter>,
    delegations_established: Family<DelegationLabels, Counter>,
    delegations_ended: Family<EndedLabels, Counter>,
    step_duration: HistogramFamily<PhaseLabels>,
    setup_duration: HistogramFamily<DelegationLabels>,
    peer_received: Family<PeerLabels, Counter>,
    peer_sent: Family<PeerLabels, Counter>,
    peer_in_flight: Family<DirectionLabels, Gauge>,
    device_jobs: Family<DeviceJobLabels, Counter>,
    device_job_duration: HistogramFamily<WorkLabels>,
    device_jobs_in_progress: Family<DeploymentLabels, Gauge>,
    consumer_redeliveries: Family<ConsumerLabels, Counter>,
    consumer_dead_letters: Family<ConsumerLabels, Counter>,
    consumer_in_flight: Family<ConsumerLabels, Gauge>,
    /// One histogram per [`BusOp`], made at start: recording takes no lock.
    bus_ops: Vec<Histogram>,
    bus_errors: Vec<Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        // One series per bus operation, made now and kept: recording takes no lock (the family encodes
        // the same atomics).
        let bus_ops: HistogramFamily<OpLabels> = Family::new_with_constructor(bus_histogram);
        let bus_errors: Family<OpLabels, Counter> = Family::default();
        let m = Metrics {
            delegations_started: Family::default(),
            delegations_established: Family::default(),
            delegations_ended: Family::default(),
            step_duration: Family::new_with_constructor(step_histogram),
            setup_duration: Family::new_with_constructor(step_histogram),
            peer_received: Family::default(),
            peer_sent: Family::default(),
            peer_in_flight: Family::default(),
            device_jobs: Family::default(),
            device_job_duration: Family::new_with_constructor(step_histogram),
            device_jobs_in_progress: Family::default(),
            consumer_redeliveries: Family::default(),
            consumer_dead_letters: Family::default(),
            consumer_in_flight: Family::default(),
            bus_ops: BusOp::ALL
                .iter()
                .map(|op| bus_ops.get_or_create_owned(&OpLabels { op: op.label() }))
                .collect(),
            bus_errors: BusOp::ALL
                .iter()
                .map(|op| bus_errors.get_or_create_owned(&OpLabels { op: op.label() }))
                .collect(),
            registry: Registry::default(),
        };
        registry.register(
            "dmd_delegations_started",
            "Delegations this deployment took part in from their start (an operator's start or a peer's DELEGATION_NOTIF)",
            m.delegations_started.clone(),
        );
        registry.register(
            "dmd_delegations_established",
            "Delegations that reached Active (authority moved on the device, confirmed by both sides)",
            m.delegations_established.clone(),
        );
        registry.register(
            "dmd_delegations_ended",
            "Delegations that came to a terminal phase, by outcome (declined, failed, revoked, expired, released) and the fault's status code and step",
            m.delegations_ended.clone(),
        );
        registry.register(
            "dmd_delegation_step_duration_seconds",
            "How long a delegation stayed in a phase (waiting for a peer, a service or a device) before it left it",
            m.step_duration.clone(),
        );
        registry.register(
            "dmd_delegation_setup_duration_seconds",
            "From a delegation's start to Active",
            m.setup_duration.clone(),
        );
        registry.register(
            "dmd_peer_messages_received",
            "Delegation messages received from peer DM Servers, by message and the HTTP status answered",
            m.peer_received.clone(),
        );
        registry.register(
            "dmd_peer_messages_sent",
            "Attempts to send a delegation message to a peer DM Server, by message and the peer's HTTP status (error: no answer)",
            m.peer_sent.clone(),
        );
        registry.register(
            "dmd_peer_messages_in_flight",
            "Peer messages being answered (direction in) or sent (direction out) now",
            m.peer_in_flight.clone(),
        );
        registry.register(
            "dmd_device_jobs",
            "Device work carried out in DM sessions (apply a plan, restore, first session, finalize), by outcome and DM or HTTP status code",
            m.device_jobs.clone(),
        );
        registry.register(
            "dmd_device_job_duration_seconds",
            "From a device job's command to its outcome (package #0, the device's DM session(s), the read-back)",
            m.device_job_duration.clone(),
        );
        registry.register(
            "dmd_device_jobs_in_progress",
            "Device jobs waiting for or in a DM session now",
            m.device_jobs_in_progress.clone(),
        );
        registry.register(
            "dmd_bus_redeliveries",
            "Work-queue messages delivered again (a retry after a back-off, or an ack wait that passed)",
            m.consumer_redeliveries.clone(),
        );
        registry.register(
            "dmd_bus_dead_letters",
            "Work-queue messages dropped as poison, each with a dead-letter record in the audit stream",
            m.consumer_dead_letters.clone(),
        );
        registry.register(
            "dmd_bus_messages_in_flight",
            "Work-queue messages being handled now",
            m.consumer_in_flight.clone(),
        );
        registry.register(
            "dmd_bus_operation_duration_seconds",
            "Bus operations (publish with its acknowledgement, request/reply, key-value get/create/update/delete), failed ones included",
            bus_ops,
        );
        registry.register(
            "dmd_bus_operation_errors",
            "Bus operations that failed (a compare-and-set conflict is not a failure)",
            bus_errors,
        );
        Metrics { registry, ..m }
    }

    /// A delegation was stored for the first time.
    pub fn delegation_started(&self, deployment: &str, role: &'static str, del_type: &'static str) {
        self.delegations_started
            .get_or_create(&DelegationLabels {
                deployment: deployment.to_string(),
                role,
                r#type: del_type,
            })
            .inc();
    }

    /// A delegation reached Active, `took` after its start.
    pub fn delegation_established(
        &self,
        deployment: &str,
        role: &'static str,
        del_type: &'static str,
        took: Duration,
    ) {
        let labels = DelegationLabels {
            deployment: deployment.to_string(),
            role,
            r#type: del_type,
        };
        self.delegations_established.get_or_create(&labels).inc();
        self.setup_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// A delegation came to a terminal phase; `fault` is its (status code, step), if it failed.
    pub fn delegation_ended(
        &self,
        deployment: &str,
        role: &'static str,
        del_type: &'static str,
        outcome: &'static str,
        fault: Option<(u32, u32)>,
    ) {
        self.delegations_ended
            .get_or_create(&EndedLabels {
                deployment: deployment.to_string(),
                role,
                r#type: del_type,
                outcome,
                status_code: fault.map(|f| f.0),
                step: fault.map(|f| f.1),
            })
            .inc();
    }

    /// A delegation left `phase` after `took` in it.
    pub fn step_done(
        &self,
        deployment: &str,
        role: &'static str,
        phase: &'static str,
        took: Duration,
    ) {
        self.step_duration
            .get_or_create(&PhaseLabels {
                deployment: deployment.to_string(),
                role,
                phase,
            })
            .observe(took.as_secs_f64());
    }

    /// A peer's message (`message`: its type, or `unreadable`) was answered with `status`.
    pub fn peer_received(&self, deployment: &str, message: &'static str, status: u16) {
        self.peer_received
            .get_or_create(&PeerLabels {
                deployment: deployment.to_string(),
                message,
                status: Status::Code(status),
            })
            .inc();
    }

    /// One attempt to send `message` to a peer ended with `status`.
    pub fn peer_sent(&self, deployment: &str, message: &'static str, status: Status) {
        self.peer_sent
            .get_or_create(&PeerLabels {
                deployment: deployment.to_string(),
                message,
                status,
            })
            .inc();
    }

    /// Counts a peer message in flight (`direction`: `in` or `out`) until the guard is dropped.
    pub fn peer_in_flight(&self, deployment: &str, direction: &'static str) -> InFlight {
        InFlight::new(self.peer_in_flight.get_or_create_owned(&DirectionLabels {
            deployment: deployment.to_string(),
            direction,
        }))
    }

    /// A device job (`work`) ended with `outcome` (`ok` or `failed`) and `status_code`, `took` after its
    /// command arrived.
    pub fn device_job(
        &self,
        deployment: &str,
        work: &'static str,
        outcome: &'static str,
        status_code: u32,
        took: Duration,
    ) {
        self.device_jobs
            .get_or_create(&DeviceJobLabels {
                deployment: deployment.to_string(),
                work,
                outcome,
                status_code,
            })
            .inc();
        self.device_job_duration
            .get_or_create(&WorkLabels {
                deployment: deployment.to_string(),
                work,
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a device job in progress until the guard is dropped.
    pub fn device_job_in_progress(&self, deployment: &str) -> InFlight {
        InFlight::new(
            self.device_jobs_in_progress
                .get_or_create_owned(&DeploymentLabels {
                    deployment: deployment.to_string(),
                }),
        )
    }

    /// The series of one work-queue consumer, looked up once (its hot path then takes no lock).
    pub fn consumer(&self, deployment: &str, service: &str) -> ConsumerMetrics {
        let labels = ConsumerLabels {
            deployment: deployment.to_string(),
            service: service.to_string(),
        };
        ConsumerMetrics {
            redeliveries: self.consumer_redeliveries.get_or_create_owned(&labels),
            dead_letters: self.consumer_dead_letters.get_or_create_owned(&labels),
            in_flight: self.consumer_in_flight.get_or_create_owned(&labels),
        }
    }

    /// A bus operation took `took`; `failed` when it ended in an error.
    pub fn bus_op(&self, op: BusOp, took: Duration, failed: bool) {
        let at = BusOp::ALL.iter().position(|o| *o == op).unwrap_or(0);
        if let Some(h) = self.bus_ops.get(at) {
            h.observe(took.as_secs_f64());
        }
        if failed && let Some(c) = self.bus_errors.get(at) {
            c.inc();
        }
    }
}

/// A gauge raised while this lives.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl InFlight {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One work-queue consumer's series.
#[derive(Debug, Clone)]
pub struct ConsumerMetrics {
    redeliveries: Counter,
    dead_letters: Counter,
    in_flight: Gauge,
}

impl ConsumerMetrics {
    /// A message arrives for its `attempt`-th time (counted as a redelivery from the second on); it is
    /// in flight until the guard is dropped.
    pub fn delivered(&self, attempt: u64) -> InFlight {
        if attempt > 1 {
            self.redeliveries.inc();
        }
        InFlight::new(self.in_flight.clone())
    }

    /// A message arrives for its `attempt`-th time, for a consumer that keeps its own loop and counts
    /// nothing in flight (the orchestrator's).
    pub fn redelivered(&self, attempt: u64) {
        if attempt > 1 {
            self.redeliveries.inc();
        }
    }

    /// A message was dropped as poison.
    pub fn dead_letter(&self) {
        self.dead_letters.inc();
    }

    /// Messages delivered again so far.
    pub fn redeliveries(&self) -> u64 {
        self.redeliveries.get()
    }

    /// Messages dropped as poison so far.
    pub fn dead_letters(&self) -> u64 {
        self.dead_letters.get()
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// The process's metrics as OpenMetrics text, for `/metrics`.
pub fn encode() -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; an encoder error would leave a partial text, still readable.
    let _ = prometheus_client::encoding::text::encode(&mut out, &global().registry);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn recorded_values_show_in_the_text_with_their_labels() {
        let m = global();
        m.delegation_started("unit", "delegating", "partial");
        m.delegation_ended(
            "unit",
            "delegating",
            "temporary",
            "declined",
            Some((403, 1)),
        );
        m.delegation_ended("unit", "delegating", "partial", "revoked", None);
        m.step_done(
            "unit",
            "delegating",
            "notif_sent",
            Duration::from_millis(30),
        );
        m.bus_op(BusOp::KvUpdate, Duration::from_micros(300), false);
        m.peer_sent("unit", "DELEGATION_NOTIF", Status::Error);
        let consumer = m.consumer("unit", "auth");
        drop(consumer.delivered(2));
        let text = encode();
        for line in [
            r#"dmd_delegations_started_total{deployment="unit",role="delegating",type="partial"} 1"#,
            r#"dmd_delegations_ended_total{deployment="unit",role="delegating",type="temporary",outcome="declined",status_code="403",step="1"} 1"#,
            r#"dmd_delegations_ended_total{deployment="unit",role="delegating",type="partial",outcome="revoked",status_code="",step=""} 1"#,
            r#"dmd_peer_messages_sent_total{deployment="unit",message="DELEGATION_NOTIF",status="error"} 1"#,
            r#"dmd_bus_redeliveries_total{deployment="unit",service="auth"} 1"#,
            r#"dmd_bus_messages_in_flight{deployment="unit",service="auth"} 0"#,
            r#"dmd_bus_operation_duration_seconds_bucket{le="0.0005",op="kv_update"} 1"#,
            r#"dmd_delegation_step_duration_seconds_count{deployment="unit",role="delegating",phase="notif_sent"} 1"#,
            r#"dmd_delegation_step_duration_seconds_bucket{le="0.025",deployment="unit",role="delegating",phase="notif_sent"} 0"#,
            r#"dmd_delegation_step_duration_seconds_bucket{le="0.05",deployment="unit",role="delegating",phase="notif_sent"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
