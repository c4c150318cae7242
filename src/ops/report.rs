//! The orchestration metrics report (`GET /v1/metrics`), the seed's OrchestrationMetricsReport:
//! what happened over the SLA window on this instance (from the same sliding windows as
//! [`super::sla`]) and the state of the system now (from the store and the broker).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::sla::{self, Measure};
use crate::app::AppState;
use crate::common::now_ms;
use crate::error::Result;

/// Registered agents looked at for utilisation, at most.
const UTILISATION_AGENTS: u32 = 10_000;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MetricsReport {
    pub agent_coordination: AgentCoordination,
    pub workflow_performance: WorkflowPerformance,
    pub session_management: SessionManagement,
    pub broker_performance: BrokerPerformance,
    pub sla_compliance: SlaSummary,
    /// Messages in the queues now, by state (`queued`, `claimed`, `acked`, `dead`).
    #[schema(value_type = Object)]
    pub queues: std::collections::BTreeMap<String, i64>,
    /// The window the rates and averages cover, in seconds.
    pub window_s: u32,
    pub generated_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentCoordination {
    /// Agents present now; null while the broker cannot say.
    pub active_agents: Option<usize>,
    /// State changes this instance committed per second (every event of the one event path).
    pub coordination_operations_per_second: f64,
    /// Mean initiate → accept time of handoffs accepted in the window; null without any.
    pub average_handoff_time_ms: Option<f64>,
    /// Share of the handoffs and workflow runs that ended in the window that succeeded.
    pub coordination_success_rate: Option<f64>,
    /// Tasks in hand / capacity over present agents (0-1); null with none present.
    pub agent_utilization: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkflowPerformance {
    /// Runs executing now.
    pub active_workflows: i64,
    /// Share of the runs that ended in the window (completed or failed) that completed.
    pub workflow_completion_rate: Option<f64>,
    pub average_workflow_duration_ms: Option<f64>,
    /// Mean, over parallel runs completed in the window, of Σ step time / (steps × run time).
    pub parallel_efficiency: Option<f64>,
    /// Runs ever submitted, by pattern.
    #[schema(value_type = Object)]
    pub workflow_pattern_usage: std::collections::BTreeMap<String, i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionManagement {
    pub active_sessions: i64,
    pub sessions_created_in_window: usize,
    pub average_creation_time_ms: Option<f64>,
    pub average_update_time_ms: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BrokerPerformance {
    /// `memory` or `redis`.
    pub broker: String,
    /// Broker commands timed in the window (Redis only).
    pub operations_in_window: usize,
    pub average_operation_ms: Option<f64>,
    pub p95_operation_ms: Option<f64>,
    /// Broker commands that failed or timed out since start.
    pub errors_total: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SlaSummary {
    pub overall_compliant: bool,
    pub agent_handoff: bool,
    pub workflow_execution: bool,
    pub session_management: bool,
    pub redis_coordination: bool,
}

/// The present agents and how much of their capacity they use.
pub struct Load {
    pub present: usize,
    /// Tasks in hand (held steps, or the heartbeat's count when more) / capacity, over present
    /// agents; None with none present.
    pub utilisation: Option<f64>,
}

/// Presence from the broker, capacity from the store, tasks in hand from both.
pub async fn load(state: &AppState, now: i64) -> Result<Load> {
    let reader = state.store.reader();
    let agents = crate::agents::db::list(reader, None, "", UTILISATION_AGENTS).await?;
    let ids: Vec<&str> = agents.iter().map(|a| a.agent_id.as_str()).collect();
    let presence = state.broker.presence(&ids, now).await?;
    let held: std::collections::HashMap<String, i64> = crate::workflows::db::held(reader, &ids)
        .await?
        .into_iter()
        .collect();
    let (mut in_hand, mut capacity, mut present) = (0i64, 0i64, 0usize);
    for (agent, presence) in agents.iter().zip(&presence) {
        if let Some(p) = presence {
            present += 1;
            let steps = held.get(&agent.agent_id).copied().unwrap_or(0);
            in_hand += steps.max(i64::from(p.current_tasks));
            capacity += i64::from(agent.max_concurrent_tasks);
        }
    }
    Ok(Load {
        present,
        utilisation: (capacity > 0).then(|| in_hand as f64 / capacity as f64),
    })
}

/// Builds the report.
pub async fn build(state: &AppState) -> Result<MetricsReport> {
    let now = now_ms();
    let window_s = state.config.sla_window_s;
    let since = now - i64::from(window_s) * 1000;
    let windows = &state.metrics.sla;
    let recent = |measure| windows.recent(measure, since);
    let reader = state.store.reader();

    // Presence lives in the broker: while it is down, the agent figures are null, the rest stands.
    let load = load(state, now).await.ok();
    let mut outcomes = recent(Measure::HandoffSuccess);
    let completions = recent(Measure::WorkflowCompleted);
    outcomes.extend(completions.iter().copied());

    let broker_ops = recent(Measure::BrokerOperation);
    let sla = sla::current(state, now);
    let errors_total = prometheus::core::Collector::collect(&state.metrics.broker_errors)
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum();
    Ok(MetricsReport {
        agent_coordination: AgentCoordination {
            active_agents: load.as_ref().map(|l| l.present),
            coordination_operations_per_second: windows.operations_per_second(since, now),
            average_handoff_time_ms: sla::mean(recent(Measure::HandoffTime)),
            coordination_success_rate: sla::mean(outcomes),
            agent_utilization: load.and_then(|l| l.utilisation),
        },
        workflow_performance: WorkflowPerformance {
            active_workflows: crate::workflows::db::count_executing(reader)
                .await?
                .iter()
                .map(|(_, n)| n)
                .sum(),
            workflow_completion_rate: sla::mean(completions),
            average_workflow_duration_ms: sla::mean(recent(Measure::WorkflowDuration)),
            parallel_efficiency: sla::mean(recent(Measure::ParallelEfficiency)),
            workflow_pattern_usage: crate::workflows::db::count_by_pattern(reader)
                .await?
                .into_iter()
                .collect(),
        },
        session_management: SessionManagement {
            active_sessions: crate::sessions::db::count_active(reader).await?,
            sessions_created_in_window: recent(Measure::SessionCreate).len(),
            average_creation_time_ms: sla::mean(recent(Measure::SessionCreate)),
            average_update_time_ms: sla::mean(recent(Measure::SessionUpdate)),
        },
        broker_performance: BrokerPerformance {
            broker: state.broker.name().to_owned(),
            operations_in_window: broker_ops.len(),
            average_operation_ms: sla::mean(broker_ops),
            p95_operation_ms: sla.components.redis_coordination.measured["p95_broker_operation_ms"]
                .as_f64(),
            errors_total,
        },
        sla_compliance: SlaSummary {
            overall_compliant: sla.overall_compliant,
            agent_handoff: sla.components.agent_handoff.compliant,
            workflow_execution: sla.components.workflow_execution.compliant,
            session_management: sla.components.session_management.compliant,
            redis_coordination: sla.components.redis_coordination.compliant,
        },
        queues: crate::messages::db::count_by_state(reader)
            .await?
            .into_iter()
            .collect(),
        window_s,
        generated_at: crate::common::rfc3339(now),
    })
}
