//! SLA compliance (`GET /v1/sla`): the seed's threshold table (configurable) against what this
//! instance measured over a sliding window — p95 latencies and success rates, per component.
//! A measure without samples in the window is reported `null` and breaks no SLA.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

/// Samples kept per measure (the oldest go first when the window holds more).
const MAX_SAMPLES: usize = 10_000;

/// What is measured, each a window of timed samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Measure {
    /// Initiate → accept, ms.
    HandoffTime,
    /// 1 completed, 0 failed / rejected / expired.
    HandoffSuccess,
    /// 1 an accept whose digest matched, 0 a mismatch.
    ContextPreserved,
    /// A step attempt, dispatch → result or timeout, ms.
    StepTime,
    /// 1 completed, 0 failed.
    WorkflowCompleted,
    /// Σ step time / (steps × run time) of a parallel run, 0-1.
    ParallelEfficiency,
    SessionCreate,
    SessionUpdate,
    SessionRecovery,
    /// A send, request to durable (ms).
    MessageDelivery,
    /// A broker command (ms).
    BrokerOperation,
    /// A context sync (ms).
    StateSync,
    /// A workflow run, submit to end (ms).
    WorkflowDuration,
}

/// The sliding windows of every measure (the newest [`MAX_SAMPLES`] of each), and a count of
/// committed state changes per second.
pub struct Windows {
    samples: Mutex<HashMap<Measure, VecDeque<(i64, f64)>>>,
    /// (unix second, state changes committed in it), oldest first.
    operations: Mutex<VecDeque<(i64, u64)>>,
    started_at: i64,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            samples: Mutex::default(),
            operations: Mutex::default(),
            started_at: crate::common::now_ms(),
        }
    }
}

impl Windows {
    /// Counts a committed state change at `at` (ms).
    pub fn operation(&self, at: i64) {
        let second = at / 1000;
        let mut operations = self.operations.lock().expect("sla lock");
        match operations.back_mut() {
            Some((s, count)) if *s == second => *count += 1,
            _ => {
                operations.push_back((second, 1));
                // A day of seconds at most, whatever the window.
                if operations.len() > 86_400 {
                    operations.pop_front();
                }
            }
        }
    }

    /// State changes per second since `since` (or since this instance started, if later).
    pub fn operations_per_second(&self, since: i64, now: i64) -> f64 {
        let since = since.max(self.started_at);
        let mut operations = self.operations.lock().expect("sla lock");
        while operations.front().is_some_and(|(s, _)| *s < since / 1000) {
            operations.pop_front();
        }
        let total: u64 = operations.iter().map(|(_, n)| n).sum();
        let seconds = ((now - since) as f64 / 1000.0).max(1.0);
        total as f64 / seconds
    }

    /// Adds a sample taken at `at` (ms).
    pub fn record(&self, measure: Measure, at: i64, value: f64) {
        let mut samples = self.samples.lock().expect("sla lock");
        let window = samples.entry(measure).or_default();
        if window.len() == MAX_SAMPLES {
            window.pop_front();
        }
        window.push_back((at, value));
    }

    /// The samples of `measure` since `since`, dropping older ones.
    pub fn recent(&self, measure: Measure, since: i64) -> Vec<f64> {
        let mut samples = self.samples.lock().expect("sla lock");
        let Some(window) = samples.get_mut(&measure) else {
            return Vec::new();
        };
        while window.front().is_some_and(|(at, _)| *at < since) {
            window.pop_front();
        }
        window.iter().map(|(_, v)| *v).collect()
    }
}

/// The 95th percentile (nearest rank), None without samples.
fn p95(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() as f64) * 0.95).ceil() as usize;
    Some(values[rank.clamp(1, values.len()) - 1])
}

/// The mean, None without samples.
pub fn mean(values: Vec<f64>) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// The seed's threshold table; each value may be overridden by configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub agent_handoff: HandoffThresholds,
    pub workflow_execution: WorkflowThresholds,
    pub session_management: SessionThresholds,
    pub redis_coordination: RedisThresholds,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HandoffThresholds {
    pub max_handoff_time_ms: f64,
    pub success_rate_threshold: f64,
    pub context_preservation_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowThresholds {
    pub step_execution_timeout_ms: f64,
    pub workflow_completion_rate: f64,
    pub parallel_efficiency_threshold: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SessionThresholds {
    pub session_creation_time_ms: f64,
    pub session_update_time_ms: f64,
    pub session_recovery_time_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RedisThresholds {
    pub message_delivery_time_ms: f64,
    pub coordination_operation_time_ms: f64,
    pub state_synchronization_time_ms: f64,
}

impl Default for HandoffThresholds {
    fn default() -> Self {
        HandoffThresholds {
            max_handoff_time_ms: 500.0,
            success_rate_threshold: 0.95,
            context_preservation_rate: 0.99,
        }
    }
}

impl Default for WorkflowThresholds {
    fn default() -> Self {
        WorkflowThresholds {
            step_execution_timeout_ms: 30_000.0,
            workflow_completion_rate: 0.90,
            parallel_efficiency_threshold: 0.80,
        }
    }
}

impl Default for SessionThresholds {
    fn default() -> Self {
        SessionThresholds {
            session_creation_time_ms: 100.0,
            session_update_time_ms: 50.0,
            session_recovery_time_ms: 1_000.0,
        }
    }
}

impl Default for RedisThresholds {
    fn default() -> Self {
        RedisThresholds {
            message_delivery_time_ms: 10.0,
            coordination_operation_time_ms: 25.0,
            state_synchronization_time_ms: 200.0,
        }
    }
}

impl Thresholds {
    /// The defaults with `overrides` (a JSON object shaped like the table, any subset) applied.
    pub fn with_overrides(overrides: &str) -> Result<Thresholds, String> {
        let mut table = serde_json::to_value(Thresholds::default()).map_err(|e| e.to_string())?;
        let overrides: Value = serde_json::from_str(overrides).map_err(|e| e.to_string())?;
        let Value::Object(components) = overrides else {
            return Err("must be a JSON object of components".into());
        };
        for (component, values) in components {
            let (Some(Value::Object(target)), Value::Object(values)) =
                (table.get_mut(&component), values)
            else {
                return Err(format!("unknown component or not an object: {component}"));
            };
            for (key, value) in values {
                if !target.contains_key(&key) {
                    return Err(format!("{component}.{key}: not a threshold of the table"));
                }
                let rate = !key.ends_with("_ms");
                match value.as_f64() {
                    Some(v) if v >= 0.0 && (!rate || v <= 1.0) => {}
                    _ if rate => return Err(format!("{component}.{key}: a rate from 0 to 1")),
                    _ => return Err(format!("{component}.{key}: milliseconds, 0 or more")),
                }
                target.insert(key, value);
            }
        }
        serde_json::from_value(table).map_err(|e| e.to_string())
    }
}

/// One component's compliance.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ComponentCompliance {
    pub compliant: bool,
    /// The thresholds in force.
    #[schema(value_type = Object)]
    pub thresholds: Value,
    /// What was measured over the window, by the same names (p95 for times, the share for
    /// rates); null without samples.
    #[schema(value_type = Object)]
    pub measured: Value,
    /// Names of the thresholds the measures break.
    pub violations: Vec<String>,
}

/// `GET /v1/sla`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SlaReport {
    pub overall_compliant: bool,
    /// The sliding window the measures cover, in seconds.
    pub window_s: u32,
    pub components: Components,
    pub checked_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Components {
    pub agent_handoff: ComponentCompliance,
    pub workflow_execution: ComponentCompliance,
    pub session_management: ComponentCompliance,
    pub redis_coordination: ComponentCompliance,
}

/// A threshold and how its measure is compared: `true` for "at most" (times), `false` for "at
/// least" (rates).
type Rule = (&'static str, Measure, fn(Vec<f64>) -> Option<f64>, bool);

fn component(
    windows: &Windows,
    since: i64,
    thresholds: &impl Serialize,
    rules: &[Rule],
) -> ComponentCompliance {
    let thresholds = serde_json::to_value(thresholds).unwrap_or_default();
    let mut measured = Map::new();
    let mut violations = Vec::new();
    for (name, measure, reduce, at_most) in rules {
        let value = reduce(windows.recent(*measure, since));
        let limit = thresholds[*name].as_f64().unwrap_or(f64::NAN);
        if let Some(value) = value {
            let broken = if *at_most {
                value > limit
            } else {
                value < limit
            };
            if broken {
                violations.push((*name).to_owned());
            }
        }
        measured.insert((*name).to_owned(), json!(value));
    }
    ComponentCompliance {
        compliant: violations.is_empty(),
        thresholds,
        measured: Value::Object(measured),
        violations,
    }
}

/// Compares the window's measures with the thresholds.
pub fn report(windows: &Windows, thresholds: &Thresholds, window_s: u32, now: i64) -> SlaReport {
    let since = now - i64::from(window_s) * 1000;
    let components = Components {
        agent_handoff: component(
            windows,
            since,
            &thresholds.agent_handoff,
            &[
                ("max_handoff_time_ms", Measure::HandoffTime, p95, true),
                (
                    "success_rate_threshold",
                    Measure::HandoffSuccess,
                    mean,
                    false,
                ),
                (
                    "context_preservation_rate",
                    Measure::ContextPreserved,
                    mean,
                    false,
                ),
            ],
        ),
        workflow_execution: component(
            windows,
            since,
            &thresholds.workflow_execution,
            &[
                ("step_execution_timeout_ms", Measure::StepTime, p95, true),
                (
                    "workflow_completion_rate",
                    Measure::WorkflowCompleted,
                    mean,
                    false,
                ),
                (
                    "parallel_efficiency_threshold",
                    Measure::ParallelEfficiency,
                    mean,
                    false,
                ),
            ],
        ),
        session_management: component(
            windows,
            since,
            &thresholds.session_management,
            &[
                (
                    "session_creation_time_ms",
                    Measure::SessionCreate,
                    p95,
                    true,
                ),
                ("session_update_time_ms", Measure::SessionUpdate, p95, true),
                (
                    "session_recovery_time_ms",
                    Measure::SessionRecovery,
                    p95,
                    true,
                ),
            ],
        ),
        redis_coordination: component(
            windows,
            since,
            &thresholds.redis_coordination,
            &[
                (
                    "message_delivery_time_ms",
                    Measure::MessageDelivery,
                    p95,
                    true,
                ),
                (
                    "coordination_operation_time_ms",
                    Measure::BrokerOperation,
                    p95,
                    true,
                ),
                (
                    "state_synchronization_time_ms",
                    Measure::StateSync,
                    p95,
                    true,
                ),
            ],
        ),
    };
    SlaReport {
        overall_compliant: components.agent_handoff.compliant
            && components.workflow_execution.compliant
            && components.session_management.compliant
            && components.redis_coordination.compliant,
        window_s,
        components,
        checked_at: crate::common::rfc3339(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_the_nearest_rank() {
        assert_eq!(p95(vec![]), None);
        assert_eq!(p95(vec![7.0]), Some(7.0));
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(p95(values), Some(95.0));
    }

    #[test]
    fn old_samples_leave_the_window() {
        let windows = Windows::default();
        windows.record(Measure::StepTime, 1_000, 5.0);
        windows.record(Measure::StepTime, 9_000, 7.0);
        assert_eq!(windows.recent(Measure::StepTime, 5_000), vec![7.0]);
    }

    #[test]
    fn overrides_apply_to_named_thresholds_only() {
        let t =
            Thresholds::with_overrides(r#"{"agent_handoff": {"max_handoff_time_ms": 5}}"#).unwrap();
        assert_eq!(t.agent_handoff.max_handoff_time_ms, 5.0);
        assert_eq!(t.agent_handoff.success_rate_threshold, 0.95);
        assert!(Thresholds::with_overrides(r#"{"agent_handoff": {"typo": 5}}"#).is_err());
        assert!(Thresholds::with_overrides(r#"{"nope": {}}"#).is_err());
        assert!(Thresholds::with_overrides("[]").is_err());
        let rate = r#"{"agent_handoff": {"success_rate_threshold": 1.5}}"#;
        assert!(Thresholds::with_overrides(rate).is_err());
        let negative = r#"{"session_management": {"session_update_time_ms": -1}}"#;
        assert!(Thresholds::with_overrides(negative).is_err());
    }

    #[test]
    fn a_measure_over_its_threshold_breaks_the_component() {
        let windows = Windows::default();
        let now = 100_000;
        windows.record(Measure::SessionCreate, now, 250.0);
        windows.record(Measure::HandoffSuccess, now, 1.0);
        let report = report(&windows, &Thresholds::default(), 300, now);
        assert!(!report.overall_compliant);
        assert_eq!(
            report.components.session_management.violations,
            ["session_creation_time_ms"]
        );
        assert!(report.components.agent_handoff.compliant);
        assert_eq!(
            report.components.workflow_execution.measured["workflow_completion_rate"],
            Value::Null
        );
    }
}
