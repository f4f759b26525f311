//! Prometheus metrics of the controller (`/metrics`, text format). Names, labels and
//! meaning are listed in docs/metrics.md.
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

pub type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    /// Valid heartbeats taken in, by network path.
    pub heartbeats_received: Family<Labels, Counter>,
    /// Every heartbeat datagram accepted (authentic, fresh, acked), forwarded to the
    /// engine or not. A plain counter: the intake's hot path does no label lookup.
    pub heartbeats_accepted: Counter,
    /// Heartbeat datagrams refused, by reason (forged, replayed, truncated, ...).
    pub heartbeats_rejected: Family<Labels, Counter>,
    /// Events taken in from watchdog streams (new ones).
    pub events_received: Counter,
    /// Events received again (at-least-once delivery) and dropped by the dedup.
    pub events_duplicate: Counter,
    /// Stream frames or connections refused, by reason.
    pub frames_rejected: Family<Labels, Counter>,
    /// Hosts per state.
    pub hosts: Family<Labels, Gauge>,
    /// Open incidents.
    pub incidents_open: Gauge,
    /// World-changing actions issued, by kind (fence, force_down, restart_in_place,
    /// evacuate, unfence, confirm, ask_host, stop_stale_copy).
    pub actions: Family<Labels, Counter>,
    /// Destroys of stale copies sent to watchdogs, by how they ended.
    pub stale_copies: Family<Labels, Counter>,
    /// Alarms raised, by kind.
    pub alarms: Family<Labels, Counter>,
    /// Store writes that failed (`error`) or were refused (`intent_exists`), by reason.
    /// Each one stops the controller from acting.
    pub store_write_failures: Family<Labels, Counter>,
    /// 1 while the controller has stopped acting after a failed store write (until it
    /// restarts), else 0.
    pub stopped_acting: Gauge,
    /// 1 while this controller leads (acts), 0 while it follows.
    pub leader: Gauge,
    /// Times this controller became leader since it started.
    pub leader_terms: Counter,
    // The controller's own load (issue 17): how late it is, so that it never blames a
    // host for silence it caused.
    /// Heartbeat datagrams the kernel dropped because a heartbeat socket's receive
    /// queue was full (`SO_MEMINFO`, asked at every load report): the controller did not read fast enough.
    pub heartbeat_socket_drops: Counter,
    /// The lag the engine extends every host's silence deadline by (0 when on time).
    pub controller_lag_seconds: Gauge<f64, AtomicU64>,
    /// Longest wait of a heartbeat in the last measurement window, from its arrival in
    /// the kernel to the engine.
    pub heartbeat_wait_seconds: Gauge<f64, AtomicU64>,
    /// How late the engine's last timer fired.
    pub engine_timer_lateness_seconds: Gauge<f64, AtomicU64>,
    /// Messages waiting in the engine's intake queue.
    pub engine_queue_depth: Gauge,
    /// 1 while the controller judges itself overloaded (its deadlines extended), else 0.
    pub controller_overloaded: Gauge,
    /// Time the engine task spent working (taking in messages, stepping the engine,
    /// carrying out actions): its CPU share is the rate of this counter.
    pub engine_busy_seconds: Counter<f64, AtomicU64>,
    // What the heartbeat intake answers (heartbeat v4, issue 17): paced acks and
    // refusals of other heartbeat versions.
    /// Heartbeat acks sent, by `counts` ("true": a leader's ack to a proven heartbeat;
    /// "false": a follower's, or one teaching the session).
    pub heartbeat_acks: Family<Labels, Counter>,
    /// Refusals sent to heartbeats of a layout version this controller does not take.
    pub heartbeat_refusals: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("defib");
        let m = Metrics {
            heartbeats_received: Family::default(),
            heartbeats_accepted: Counter::default(),
            heartbeats_rejected: Family::default(),
            events_received: Counter::default(),
            events_duplicate: Counter::default(),
            frames_rejected: Family::default(),
            hosts: Family::default(),
            incidents_open: Gauge::default(),
            actions: Family::default(),
            stale_copies: Family::default(),
            alarms: Family::default(),
            store_write_failures: Family::default(),
            stopped_acting: Gauge::default(),
            leader: Gauge::default(),
            leader_terms: Counter::default(),
            heartbeat_socket_drops: Counter::default(),
            controller_lag_seconds: Gauge::default(),
            heartbeat_wait_seconds: Gauge::default(),
            engine_timer_lateness_seconds: Gauge::default(),
            engine_queue_depth: Gauge::default(),
            controller_overloaded: Gauge::default(),
            engine_busy_seconds: Counter::default(),
            heartbeat_acks: Family::default(),
            heartbeat_refusals: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "heartbeats_received",
            "Valid heartbeats taken in, by path",
            m.heartbeats_received.clone(),
        );
        registry.register(
            "heartbeats_accepted",
            "Heartbeat datagrams accepted (and acked), forwarded to the engine or not",
            m.heartbeats_accepted.clone(),
        );
        registry.register(
            "heartbeats_rejected",
            "Heartbeat datagrams refused, by reason",
            m.heartbeats_rejected.clone(),
        );
        registry.register(
            "events_received",
            "New events taken in from watchdog streams",
            m.events_received.clone(),
        );
        registry.register(
            "events_duplicate",
            "Events received again and dropped by the dedup",
            m.events_duplicate.clone(),
        );
        registry.register(
            "frames_rejected",
            "Stream frames or connections refused, by reason",
            m.frames_rejected.clone(),
        );
        registry.register("hosts", "Hosts per state", m.hosts.clone());
        registry.register("incidents_open", "Open incidents", m.incidents_open.clone());
        registry.register(
            "actions",
            "World-changing actions issued, by kind",
            m.actions.clone(),
        );
        registry.register(
            "stale_copies",
            "Destroys of stale copies (VMs moved off a host, found or started there again), by outcome",
            m.stale_copies.clone(),
        );
        registry.register("alarms", "Alarms raised, by kind", m.alarms.clone());
        registry.register(
            "store_write_failures",
            "Store writes that failed or were refused, by reason (each stops all acting)",
            m.store_write_failures.clone(),
        );
        registry.register(
            "stopped_acting",
            "Whether the controller has stopped acting after a failed store write (1) or acts (0)",
            m.stopped_acting.clone(),
        );
        registry.register(
            "leader",
            "Whether this controller leads and acts (1) or follows (0); always 1 for a single controller on SQLite",
            m.leader.clone(),
        );
        registry.register(
            "leader_terms",
            "Times this controller became leader since it started",
            m.leader_terms.clone(),
        );
        registry.register(
            "heartbeat_socket_drops",
            "Heartbeat datagrams the kernel dropped on a full socket receive queue (the controller read too slowly)",
            m.heartbeat_socket_drops.clone(),
        );
        registry.register(
            "controller_lag_seconds",
            "The controller's own lag, by which it extends every host's silence deadline (0 when on time)",
            m.controller_lag_seconds.clone(),
        );
        registry.register(
            "heartbeat_wait_seconds",
            "Longest wait of a heartbeat from the kernel to the engine in the last window",
            m.heartbeat_wait_seconds.clone(),
        );
        registry.register(
            "engine_timer_lateness_seconds",
            "How late the engine's last timer fired",
            m.engine_timer_lateness_seconds.clone(),
        );
        registry.register(
            "engine_queue_depth",
            "Messages waiting in the engine's intake queue",
            m.engine_queue_depth.clone(),
        );
        registry.register(
            "controller_overloaded",
            "Whether the controller judges itself overloaded and extends its deadlines (1) or not (0)",
            m.controller_overloaded.clone(),
        );
        registry.register(
            "engine_busy_seconds",
            "Time the engine task spent working; its rate is the engine's share of a core",
            m.engine_busy_seconds.clone(),
        );
        registry.register(
            "heartbeat_acks",
            "Heartbeat acks sent (at most one per host, path and ack period), by whether they count",
            m.heartbeat_acks.clone(),
        );
        registry.register(
            "heartbeat_refusals",
            "Refusals sent to heartbeats of a layout version this controller does not take",
            m.heartbeat_refusals.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn label(key: &str, value: impl Into<String>) -> Labels {
        vec![(key.to_string(), value.into())]
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_up_in_the_text_exposition_with_their_labels() {
        let m = Metrics::new();
        m.heartbeats_rejected
            .get_or_create(&Metrics::label("reason", "bad_mac"))
            .inc();
        m.events_received.inc();
        m.heartbeats_accepted.inc_by(3);
        let text = m.encode();
        assert!(
            text.contains("defib_heartbeats_rejected_total{reason=\"bad_mac\"} 1"),
            "{text}"
        );
        assert!(text.contains("defib_events_received_total 1"), "{text}");
        assert!(text.contains("defib_heartbeats_accepted_total 3"), "{text}");
    }
}
