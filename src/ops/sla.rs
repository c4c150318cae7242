//! SLA compliance (`GET /v1/sla`): the seed's threshold table (configurable) against what this
//! instance measured over a sliding window — p95 latencies and success rates, per component.
//! A measure is judged only once it has `LTMC_SLA_MIN_SAMPLES` samples in the window: before,
//! its value is shown (`null` without any) with its sample count, and it breaks no SLA; a
//! component none of whose measures can be judged yet is `insufficient_data` (and compliant).
//! Measured values carry their own names (`p95_handoff_time_ms` beside the threshold
//! `max_handoff_time_ms`).

use std::collections::{HashMap, HashSet, VecDeque};
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
    /// Per handoff, its first digest check: 1 matched, 0 a mismatch (a retry counts no more).
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

/// A measure taken once for a key (a handoff's id).
type Sampled = (Measure, String);

/// The sliding windows of every measure (the newest [`MAX_SAMPLES`] of each), and a count of
/// committed state changes per second.
pub struct Windows {
    samples: Mutex<HashMap<Measure, VecDeque<(i64, f64)>>>,
    /// What was sampled once per key already (the newest [`MAX_SAMPLES`] keys, oldest first).
    sampled: Mutex<(HashSet<Sampled>, VecDeque<Sampled>)>,
    /// (unix second, state changes committed in it), oldest first.
    operations: Mutex<VecDeque<(i64, u64)>>,
    started_at: i64,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            samples: Mutex::default(),
            sampled: Mutex::default(),
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

    /// Adds a sample for `key` (a handoff, say) unless one was already taken for it: the first
    /// verdict on a thing stands, retries add nothing.
    pub fn record_once(&self, measure: Measure, key: &str, at: i64, value: f64) {
        {
            let mut sampled = self.sampled.lock().expect("sla lock");
            let (seen, order) = &mut *sampled;
            if !seen.insert((measure, key.to_owned())) {
                return;
            }
            order.push_back((measure, key.to_owned()));
            if order.len() > MAX_SAMPLES
                && let Some(oldest) = order.pop_front()
            {
                seen.remove(&oldest);
            }
        }
        self.record(measure, at, value);
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

/// A component's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every measure with enough samples is within its threshold.
    Compliant,
    /// A measure with enough samples breaks its threshold.
    Violated,
    /// No measure has enough samples in the window to be judged: nothing is broken.
    InsufficientData,
}

/// One component's compliance.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ComponentCompliance {
    /// False only when a measure with enough samples breaks its threshold.
    pub compliant: bool,
    pub status: Verdict,
    /// What the component covers, for people (`redis_coordination` names the broker that runs).
    pub label: String,
    /// `redis_coordination` only: the broker that runs, `in-process` or `redis`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// The thresholds in force.
    #[schema(value_type = Object)]
    pub thresholds: Value,
    /// What was measured over the window, each under its own name (`p95_…_ms` for times, a
    /// share 0-1 for rates); null without samples. Shown also while too few to be judged.
    #[schema(value_type = Object)]
    pub measured: Value,
    /// How many samples each measure (by the names in `measured`) has in the window.
    #[schema(value_type = Object)]
    pub samples: Value,
    /// Names of the thresholds the measures break (only measures with enough samples count).
    pub violations: Vec<String>,
}

/// `GET /v1/sla`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SlaReport {
    /// False only when some component is violated; insufficient data breaks nothing.
    pub overall_compliant: bool,
    /// The sliding window the measures cover, in seconds.
    pub window_s: u32,
    /// Samples a measure needs in the window before it is judged.
    pub min_samples: u32,
    pub components: Components,
    pub checked_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Components {
    pub agent_handoff: ComponentCompliance,
    pub workflow_execution: ComponentCompliance,
    pub session_management: ComponentCompliance,
    /// The broker's part (the key keeps its historical name; `broker` says which runs).
    pub redis_coordination: ComponentCompliance,
}

/// A threshold and its measure: the threshold's name, the measure's own name, the samples, how
/// they reduce to one value, and `true` for "at most" (times), `false` for "at least" (rates).
struct Rule {
    threshold: &'static str,
    measured: &'static str,
    measure: Measure,
    reduce: fn(Vec<f64>) -> Option<f64>,
    at_most: bool,
}

const fn time(threshold: &'static str, measured: &'static str, measure: Measure) -> Rule {
    Rule {
        threshold,
        measured,
        measure,
        reduce: p95,
        at_most: true,
    }
}

const fn rate(threshold: &'static str, measured: &'static str, measure: Measure) -> Rule {
    Rule {
        threshold,
        measured,
        measure,
        reduce: mean,
        at_most: false,
    }
}

const HANDOFF: &[Rule] = &[
    time(
        "max_handoff_time_ms",
        "p95_handoff_time_ms",
        Measure::HandoffTime,
    ),
    rate(
        "success_rate_threshold",
        "handoff_success_rate",
        Measure::HandoffSuccess,
    ),
    rate(
        "context_preservation_rate",
        "context_preserved_rate",
        Measure::ContextPreserved,
    ),
];

const WORKFLOW: &[Rule] = &[
    time(
        "step_execution_timeout_ms",
        "p95_step_time_ms",
        Measure::StepTime,
    ),
    rate(
        "workflow_completion_rate",
        "workflows_completed_rate",
        Measure::WorkflowCompleted,
    ),
    rate(
        "parallel_efficiency_threshold",
        "mean_parallel_efficiency",
        Measure::ParallelEfficiency,
    ),
];

const SESSION: &[Rule] = &[
    time(
        "session_creation_time_ms",
        "p95_session_creation_ms",
        Measure::SessionCreate,
    ),
    time(
        "session_update_time_ms",
        "p95_session_update_ms",
        Measure::SessionUpdate,
    ),
    time(
        "session_recovery_time_ms",
        "p95_session_recovery_ms",
        Measure::SessionRecovery,
    ),
];

const BROKER: &[Rule] = &[
    time(
        "message_delivery_time_ms",
        "p95_message_delivery_ms",
        Measure::MessageDelivery,
    ),
    time(
        "coordination_operation_time_ms",
        "p95_broker_operation_ms",
        Measure::BrokerOperation,
    ),
    time(
        "state_synchronization_time_ms",
        "p95_state_sync_ms",
        Measure::StateSync,
    ),
];

/// What the report is computed over.
struct Window {
    since: i64,
    min_samples: u32,
}

fn component(
    windows: &Windows,
    window: &Window,
    label: String,
    thresholds: &impl Serialize,
    rules: &[Rule],
) -> ComponentCompliance {
    let thresholds = serde_json::to_value(thresholds).unwrap_or_default();
    let mut measured = Map::new();
    let mut samples = Map::new();
    let mut violations = Vec::new();
    let mut judged = 0;
    for rule in rules {
        let values = windows.recent(rule.measure, window.since);
        let count = values.len();
        let value = (rule.reduce)(values);
        let limit = thresholds[rule.threshold].as_f64().unwrap_or(f64::NAN);
        if let Some(value) = value
            && count >= window.min_samples as usize
        {
            judged += 1;
            let broken = if rule.at_most {
                value > limit
            } else {
                value < limit
            };
            if broken {
                violations.push(rule.threshold.to_owned());
            }
        }
        measured.insert(rule.measured.to_owned(), json!(value));
        samples.insert(rule.measured.to_owned(), json!(count));
    }
    let status = match (violations.is_empty(), judged) {
        (false, _) => Verdict::Violated,
        (true, 0) => Verdict::InsufficientData,
        (true, _) => Verdict::Compliant,
    };
    ComponentCompliance {
        compliant: status != Verdict::Violated,
        status,
        label,
        broker: None,
        thresholds,
        measured: Value::Object(measured),
        samples: Value::Object(samples),
        violations,
    }
}

/// Compares the window's measures that have at least `min_samples` samples with the thresholds;
/// `broker` is the broker that runs (`in-process` or `redis`).
pub fn report(
    windows: &Windows,
    thresholds: &Thresholds,
    window_s: u32,
    min_samples: u32,
    broker: &str,
    now: i64,
) -> SlaReport {
    let window = Window {
        since: now - i64::from(window_s) * 1000,
        min_samples,
    };
    let mut coordination = component(
        windows,
        &window,
        format!("Coordination over the {broker} broker"),
        &thresholds.redis_coordination,
        BROKER,
    );
    coordination.broker = Some(broker.to_owned());
    let components = Components {
        agent_handoff: component(
            windows,
            &window,
            "Agent handoff".into(),
            &thresholds.agent_handoff,
            HANDOFF,
        ),
        workflow_execution: component(
            windows,
            &window,
            "Workflow execution".into(),
            &thresholds.workflow_execution,
            WORKFLOW,
        ),
        session_management: component(
            windows,
            &window,
            "Session management".into(),
            &thresholds.session_management,
            SESSION,
        ),
        redis_coordination: coordination,
    };
    SlaReport {
        overall_compliant: components.agent_handoff.compliant
            && components.workflow_execution.compliant
            && components.session_management.compliant
            && components.redis_coordination.compliant,
        window_s,
        min_samples,
        components,
        checked_at: crate::common::rfc3339(now),
    }
}

/// The report for this instance now, with its configuration.
pub fn current(state: &crate::app::AppState, now: i64) -> SlaReport {
    let config = &state.config;
    report(
        &state.metrics.sla,
        &config.sla_thresholds,
        config.sla_window_s,
        config.sla_min_samples,
        state.broker.kind(),
        now,
    )
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
        let report = report(&windows, &Thresholds::default(), 300, 1, "in-process", now);
        assert!(!report.overall_compliant);
        let session = &report.components.session_management;
        assert_eq!(session.status, Verdict::Violated);
        assert_eq!(session.violations, ["session_creation_time_ms"]);
        assert_eq!(session.measured["p95_session_creation_ms"], 250.0);
        assert!(report.components.agent_handoff.compliant);
        let workflows = &report.components.workflow_execution;
        assert_eq!(workflows.measured["workflows_completed_rate"], Value::Null);
        assert_eq!(workflows.status, Verdict::InsufficientData);
    }

    #[test]
    fn too_few_samples_judge_nothing() {
        let windows = Windows::default();
        let now = 100_000;
        for _ in 0..19 {
            windows.record(Measure::HandoffTime, now, 900.0);
        }
        let quiet = report(&windows, &Thresholds::default(), 300, 20, "redis", now);
        let handoff = &quiet.components.agent_handoff;
        assert!(quiet.overall_compliant);
        assert!(handoff.compliant);
        assert_eq!(handoff.status, Verdict::InsufficientData);
        assert_eq!(handoff.samples["p95_handoff_time_ms"], 19);
        assert_eq!(handoff.measured["p95_handoff_time_ms"], 900.0);
        windows.record(Measure::HandoffTime, now, 900.0);
        let busy = report(&windows, &Thresholds::default(), 300, 20, "redis", now);
        assert!(!busy.overall_compliant);
        assert_eq!(busy.components.agent_handoff.status, Verdict::Violated);
        assert_eq!(
            busy.components.redis_coordination.broker.as_deref(),
            Some("redis")
        );
    }

    #[test]
    fn a_key_is_sampled_once() {
        let windows = Windows::default();
        windows.record_once(Measure::ContextPreserved, "h1", 1, 0.0);
        windows.record_once(Measure::ContextPreserved, "h1", 2, 0.0);
        windows.record_once(Measure::ContextPreserved, "h1", 3, 1.0);
        windows.record_once(Measure::ContextPreserved, "h2", 4, 1.0);
        assert_eq!(windows.recent(Measure::ContextPreserved, 0), vec![0.0, 1.0]);
    }
}
