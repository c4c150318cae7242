//! Diagnostics (`GET /v1/diagnostics`): the seed's health checks run for real — store and broker
//! connectivity and latency, registry integrity, a messaging round trip, stuck leases, dead-letter
//! growth, overdue workflow steps, SLA compliance, storage — each `passed`, `warning` or `failed`
//! with its detail; the `issues` found, concrete `recommendations` (the seed's optimisation
//! rules, each applied only once its measure has the SLA's minimum sample count, so a quiet
//! system is not told to change anything) and a `health_score` from 0 to 100. A check that
//! cannot run is `failed`: the report always answers.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::sla::{self, Measure};
use crate::app::AppState;
use crate::common::now_ms;
use crate::messages::{self, ClaimRequest, NewMessage};

/// The recipients of the messaging round trip's probes: `ltmc:diagnostics:<random>`, one per
/// probe (no agent can register an `ltmc:` id), so concurrent probes never take each other's.
pub const PROBE_PREFIX: &str = "ltmc:diagnostics:";
/// A lease expired this long without the reaper taking it back means the reaper is stuck.
const STUCK_AFTER_MS: i64 = 60_000;
/// Longest a check may take before it counts as failed (the report must answer while a backing
/// service hangs).
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs a check's future under [`CHECK_TIMEOUT`].
async fn bounded<T>(
    what: &str,
    future: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    match tokio::time::timeout(CHECK_TIMEOUT, future).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "{what} did not answer within {} s",
            CHECK_TIMEOUT.as_secs()
        )),
    }
}

/// One check's outcome.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Check {
    /// `passed`, `warning` or `failed`.
    pub status: String,
    pub detail: String,
    /// How long the check took, where that is the point (connectivity, round trip).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

/// The database file and what retention purged.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Storage {
    /// page_count × page_size (the WAL file not included).
    pub database_bytes: i64,
    /// Free pages inside the file not yet given back to the file system.
    pub free_bytes: i64,
    /// Rows this instance purged past their retention since it started, by kind.
    #[schema(value_type = Object)]
    pub purged_rows: BTreeMap<String, u64>,
}

/// `GET /v1/diagnostics`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Diagnostics {
    /// 100 × (passed + ½ warnings) / checks.
    pub health_score: u8,
    pub checks: BTreeMap<String, Check>,
    /// Null when the store could not say.
    pub storage: Option<Storage>,
    /// `<check>: <detail>` for every check that did not pass.
    pub issues: Vec<String>,
    pub recommendations: Vec<String>,
    pub checked_at: String,
}

fn check(status: &str, detail: impl Into<String>, latency_ms: Option<f64>) -> Check {
    Check {
        status: status.to_owned(),
        detail: detail.into(),
        latency_ms,
    }
}

fn ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

/// Latency checks: failed on error, warning over `slow_ms`.
fn timed(result: Result<(), String>, started: Instant, slow_ms: f64, what: &str) -> Check {
    let latency = ms(started);
    match result {
        Err(e) => check("failed", format!("{what}: {e}"), Some(latency)),
        Ok(()) if latency > slow_ms => check(
            "warning",
            format!("{what} answered in {latency:.1} ms (over {slow_ms} ms)"),
            Some(latency),
        ),
        Ok(()) => check("passed", format!("{what} answered"), Some(latency)),
    }
}

/// A real message through the queue: send to a fresh `ltmc:diagnostics:…` recipient, claim it
/// (auto-ack).
async fn round_trip(state: &AppState) -> Result<(), String> {
    let recipient = format!("{PROBE_PREFIX}{}", crate::common::random_hex(6));
    let content =
        RawValue::from_string(format!("{{\"probe\":{}}}", now_ms())).map_err(|e| e.to_string())?;
    let probe = NewMessage {
        from: "ltmc".to_owned(),
        message_type: "diagnostics.probe".to_owned(),
        content,
        priority: 9,
        correlation_id: None,
    };
    let sent = messages::send(state, &recipient, probe, None)
        .await
        .map_err(|e| e.to_string())?;
    let request = ClaimRequest {
        limit: 1,
        visibility_timeout_s: 30,
        auto_ack: true,
    };
    let claimed = messages::claim(state, &recipient, request)
        .await
        .map_err(|e| e.to_string())?;
    if claimed
        .messages
        .iter()
        .any(|m| m.message_id == sent.message_id)
    {
        Ok(())
    } else {
        Err("the probe message was sent but not claimed".into())
    }
}

/// Passed when every SLA with enough samples is met; names the components still short of data.
fn sla_check(report: &sla::SlaReport) -> Check {
    let c = &report.components;
    let components = [
        ("agent_handoff", &c.agent_handoff),
        ("workflow_execution", &c.workflow_execution),
        ("session_management", &c.session_management),
        ("redis_coordination", &c.redis_coordination),
    ];
    let violations: Vec<String> = components
        .iter()
        .flat_map(|(name, c)| c.violations.iter().map(move |v| format!("{name}.{v}")))
        .collect();
    let waiting: Vec<&str> = components
        .iter()
        .filter(|(_, c)| c.status == sla::Verdict::InsufficientData)
        .map(|(name, _)| *name)
        .collect();
    if !violations.is_empty() {
        return check(
            "warning",
            format!("SLAs broken: {}", violations.join(", ")),
            None,
        );
    }
    let detail = if waiting.is_empty() {
        "every SLA met over the window".to_owned()
    } else {
        format!(
            "every SLA with at least {} samples met; insufficient data for {}",
            report.min_samples,
            waiting.join(", ")
        )
    };
    check("passed", detail, None)
}

/// Passed with the file's size; a warning when freed space cannot be given back (a file whose
/// conversion to incremental vacuum did not happen).
fn storage_check(size: &Result<crate::store::Size, String>) -> Check {
    const MB: f64 = 1024.0 * 1024.0;
    match size {
        Err(e) => check("failed", format!("database size unreadable: {e}"), None),
        Ok(size) if !size.incremental_vacuum => check(
            "warning",
            format!(
                "database {:.1} MB, {:.1} MB free inside that cannot be given back \
                 (auto_vacuum is not incremental)",
                size.bytes as f64 / MB,
                size.free_bytes as f64 / MB
            ),
            None,
        ),
        Ok(size) => check(
            "passed",
            format!(
                "database {:.1} MB ({:.1} MB free inside, being given back)",
                size.bytes as f64 / MB,
                size.free_bytes as f64 / MB
            ),
            None,
        ),
    }
}

/// Runs every check.
pub async fn run(state: &AppState) -> Diagnostics {
    let now = now_ms();
    let reader = state.store.reader();
    let mut checks = BTreeMap::new();
    let mut recommendations = Vec::new();

    // The probes that talk to a backing service run side by side, each bounded.
    let started = Instant::now();
    let name = state.broker.kind();
    let (store, broker_check, trip) = tokio::join!(
        async {
            let store = bounded("SQLite", async {
                state.store.ping().await.map_err(|e| e.to_string())
            });
            timed(store.await, started, 100.0, "SQLite")
        },
        async {
            let broker = bounded("the broker", async {
                state.broker.ping().await.map_err(|e| e.to_string())
            });
            timed(broker.await, started, 25.0, &format!("the {name} broker"))
        },
        async {
            let trip = bounded("send → claim → ack", round_trip(state));
            timed(trip.await, started, 100.0, "send → claim → ack")
        },
    );
    checks.insert("sqlite_connectivity".into(), store);
    if broker_check.status == "failed" {
        recommendations.push(format!(
            "The {name} broker is unreachable: check LTMC_REDIS_URL and that Redis runs; \
             messages stay durable, but presence, caches and streams across instances wait for it."
        ));
    }
    checks.insert("broker_connectivity".into(), broker_check);

    checks.insert(
        "agent_registry".into(),
        match crate::agents::db::inconsistent_capabilities(reader).await {
            Ok(0) => check("passed", "every agent's capabilities are indexed", None),
            Ok(n) => check(
                "warning",
                format!("{n} agents' capability index differs from their record"),
                None,
            ),
            Err(e) => check("failed", format!("registry unreadable: {e}"), None),
        },
    );

    checks.insert("coordination_messaging".into(), trip);

    checks.insert(
        "stuck_leases".into(),
        match messages::db::stuck_leases(reader, now - STUCK_AFTER_MS).await {
            Ok(0) => check("passed", "no lease is overdue for redelivery", None),
            Ok(n) => {
                recommendations.push(
                    "Leases are not being reaped: check the service's logs for the lease reaper."
                        .into(),
                );
                check(
                    "failed",
                    format!("{n} messages held past their lease for over a minute"),
                    None,
                )
            }
            Err(e) => check("failed", e.to_string(), None),
        },
    );

    checks.insert(
        "dead_letters".into(),
        match messages::db::dead_lettered_since(reader, now - 3_600_000).await {
            Ok(0) => check("passed", "no message dead-lettered in the last hour", None),
            Ok(n) => {
                recommendations.push(format!(
                    "{n} messages were dead-lettered in the last hour: look at them \
                     (GET /v1/agents/{{id}}/messages?state=dead), fix the consumer, replay them."
                ));
                check(
                    "warning",
                    format!("{n} messages dead-lettered in the last hour"),
                    None,
                )
            }
            Err(e) => check("failed", e.to_string(), None),
        },
    );

    checks.insert(
        "overdue_workflows".into(),
        match crate::workflows::db::overdue_steps(reader, now - STUCK_AFTER_MS).await {
            Ok(0) => check("passed", "no workflow step is overdue", None),
            Ok(n) => {
                recommendations.push(
                    "Workflow steps are past their deadlines without moving: check the service's \
                     logs for the workflow timers."
                        .into(),
                );
                check(
                    "failed",
                    format!("{n} steps are over a minute past their deadline"),
                    None,
                )
            }
            Err(e) => check("failed", e.to_string(), None),
        },
    );

    let storage = bounded("storage", async {
        state.store.size().await.map_err(|e| e.to_string())
    })
    .await;
    checks.insert("storage".into(), storage_check(&storage));
    let storage = storage.ok().map(|size| Storage {
        database_bytes: size.bytes,
        free_bytes: size.free_bytes,
        purged_rows: state.metrics.purged_so_far(),
    });

    let report = sla::current(state, now);
    checks.insert("sla_compliance".into(), sla_check(&report));

    // The seed's optimisation rules, on what was measured — each only past the minimum sample
    // count, as the SLA judges.
    let config = &state.config;
    let enough = |samples: usize| samples >= config.sla_min_samples as usize;
    let since = now - i64::from(config.sla_window_s) * 1000;
    let windows = &state.metrics.sla;
    let coordination = &report.components.redis_coordination;
    let broker_p95 = coordination.measured["p95_broker_operation_ms"].as_f64();
    let broker_samples = coordination.samples["p95_broker_operation_ms"].as_u64();
    if let Some(p95) = broker_p95.filter(|p| *p > 5.0)
        && broker_samples.is_some_and(|n| enough(n as usize))
    {
        recommendations.push(format!(
            "Redis commands take {p95:.1} ms at p95 (over 5 ms): put Redis next to the service \
             (same host or zone) and check its load (INFO commandstats)."
        ));
    }
    let load = bounded("presence", async {
        super::report::load(state, now)
            .await
            .map_err(|e| e.to_string())
    });
    // Idle agents on a quiet system say nothing about capacity: under-use counts only once the
    // agents have done some work in the window.
    let worked = enough(windows.recent(Measure::StepTime, since).len());
    if let Some(utilisation) = load.await.ok().and_then(|l| l.utilisation) {
        if utilisation < 0.6 && worked {
            recommendations.push(format!(
                "Agents use {:.0} % of their capacity (under 60 %): fewer agents, or a lower \
                 max_concurrent_tasks, would do the same work.",
                utilisation * 100.0
            ));
        } else if utilisation > 0.9 {
            recommendations.push(format!(
                "Agents use {:.0} % of their capacity: add agents with the busiest capabilities, \
                 or steps will wait for a free agent.",
                utilisation * 100.0
            ));
        }
    }
    let efficiency = windows.recent(Measure::ParallelEfficiency, since);
    if enough(efficiency.len())
        && let Some(mean) = sla::mean(efficiency)
        && mean < 0.7
    {
        recommendations.push(format!(
            "Parallel workflows run at {:.0} % efficiency (under 70 %): their steps wait on \
             each other — spread them over more agents (capability routing) or shorten the \
             slowest steps.",
            mean * 100.0
        ));
    }

    let total = checks.len() as f64;
    let earned: f64 = checks
        .values()
        .map(|c| match c.status.as_str() {
            "passed" => 1.0,
            "warning" => 0.5,
            _ => 0.0,
        })
        .sum();
    let issues = checks
        .iter()
        .filter(|(_, c)| c.status != "passed")
        .map(|(name, c)| format!("{name}: {}", c.detail))
        .collect();
    Diagnostics {
        health_score: (100.0 * earned / total).round() as u8,
        checks,
        storage,
        issues,
        recommendations,
        checked_at: crate::common::rfc3339(now),
    }
}
