//! Prometheus metrics: agents by state, messages by kind, commands by status, delivery latency.
//!
//! Counters and the histogram are updated where things happen; gauges that describe stored
//! state (agents by liveness, commands by status) are computed at scrape time by the REST layer
//! and passed to [`Metrics::render`], so they can never drift from the registry.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// All metrics of one server.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// AgentToServer messages handled, by kind: `status`, `heartbeat`, `disconnect`,
    /// `custom_message`, `malformed`.
    pub messages: Family<KindLabel, Counter>,
    /// Connections or requests refused, by reason (`overload`, `too_large`, `unauthorized`).
    pub rejected: Family<ReasonLabel, Counter>,
    /// Seconds from queueing a command to writing it to the agent.
    pub delivery_latency: Histogram,
    agents: Family<StateLabel, Gauge>,
    commands: Family<StatusLabel, Gauge>,
    ws_connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let messages = Family::<KindLabel, Counter>::default();
        let rejected = Family::<ReasonLabel, Counter>::default();
        let delivery_latency = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 300.0,
        ]);
        let agents = Family::<StateLabel, Gauge>::default();
        let commands = Family::<StatusLabel, Gauge>::default();
        let ws_connections = Gauge::default();
        let mut registry = Registry::with_prefix("flotilla");
        registry.register(
            "opamp_messages",
            "OpAMP AgentToServer messages handled, by kind",
            messages.clone(),
        );
        registry.register(
            "opamp_rejected",
            "OpAMP connections or requests refused, by reason",
            rejected.clone(),
        );
        registry.register(
            "command_delivery_latency_seconds",
            "Time from queueing a command to writing it to the agent",
            delivery_latency.clone(),
        );
        registry.register("agents", "Agents in the registry, by state", agents.clone());
        registry.register("commands", "Commands, by status", commands.clone());
        registry.register(
            "websocket_connections",
            "Open agent WebSocket connections",
            ws_connections.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            messages,
            rejected,
            delivery_latency,
            agents,
            commands,
            ws_connections,
        }
    }

    /// Counts one handled message of `kind`.
    pub fn message(&self, kind: &str) {
        self.messages
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// Counts one refusal for `reason`.
    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// Renders the text exposition format with the given stored-state gauges.
    pub fn render(
        &self,
        agents_by_state: &[(&str, u64)],
        commands_by_status: &[(&str, u64)],
        ws_connections: u64,
    ) -> String {
        for (state, n) in agents_by_state {
            self.agents
                .get_or_create(&StateLabel {
                    state: (*state).into(),
                })
                .set(*n as i64);
        }
        for (status, n) in commands_by_status {
            self.commands
                .get_or_create(&StatusLabel {
                    status: (*status).into(),
                })
                .set(*n as i64);
        }
        self.ws_connections.set(ws_connections as i64);
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}
