//! Workflow definitions as submitted (`POST /v1/workflows`) and their validation into a plan the
//! engine can run. [`validate`] checks a [`WorkflowDefinition`] against [`Limits`] and reports
//! every problem at once, each under its JSON path (`steps[2].depends_on[0]`); [`dependants`]
//! inverts the dependency edges, so the engine can skip what hangs on a failed step.
//!
//! What each [`Pattern`] takes:
//! - `sequential`: steps run in the order given.
//! - `parallel`: all steps start at once.
//! - `dependency_based`: a step starts when every step it `depends_on` has succeeded; the
//!   dependencies must not form a cycle.
//! - `event_driven`: every step names a `trigger`, the event that starts it.
//!
//! `depends_on` is for `dependency_based` only and `trigger` for `event_driven` only: a field the
//! pattern would ignore is refused rather than silently dropped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::common::{validate_agent_id, validate_name};
use crate::error::{Error, FieldError, Result};

/// Longest workflow name, in bytes.
const MAX_NAME: usize = 256;
/// Longest step id, in characters.
const MAX_STEP_ID: usize = 128;
/// Longest capability, in bytes.
const MAX_CAPABILITY: usize = 128;
/// Longest trigger (event name), in bytes.
const MAX_TRIGGER: usize = 256;
/// Longest step timeout: one hour.
const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// Most retries of a step.
const MAX_RETRIES: u32 = 100;
/// Most step ids a cycle's message names; a longer cycle is elided in the middle.
const CYCLE_SHOWN: usize = 16;

/// How the steps of a workflow are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
// `Pattern` in the document is the recorded pattern of `memory`: schema names are unique.
#[schema(as = WorkflowPattern)]
pub enum Pattern {
    /// One step after another, in the order given.
    Sequential,
    /// All steps at once.
    Parallel,
    /// A step once every step it `depends_on` has succeeded.
    DependencyBased,
    /// A step when its `trigger` event is posted.
    EventDriven,
}

impl Pattern {
    /// The wire name: `sequential`, `parallel`, `dependency_based` or `event_driven`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Pattern::Sequential => "sequential",
            Pattern::Parallel => "parallel",
            Pattern::DependencyBased => "dependency_based",
            Pattern::EventDriven => "event_driven",
        }
    }

    /// What starts a step, for messages refusing a field this pattern would ignore.
    fn starts_steps(self) -> &'static str {
        match self {
            Pattern::Sequential => "runs its steps in the order given",
            Pattern::Parallel => "starts all its steps at once",
            Pattern::DependencyBased => "starts a step when its dependencies have succeeded",
            Pattern::EventDriven => "starts a step when its trigger event is posted",
        }
    }
}

/// A workflow to run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDefinition {
    /// 1-256 bytes.
    #[schema(min_length = 1, max_length = 256)]
    pub name: String,
    pub description: Option<String>,
    pub pattern: Pattern,
    /// 1 to 10 000 steps (the configured maximum).
    #[schema(min_items = 1, max_items = 10_000)]
    pub steps: Vec<StepDef>,
    /// Free-form JSON object.
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
}

/// One step of a workflow: exactly one of `agent` and `capability` says who runs it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// Unique within the workflow: 1-128 characters of `[A-Za-z0-9._:-]`.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub step_id: String,
    pub name: Option<String>,
    /// The agent that runs the step.
    #[schema(value_type = Option<crate::common::AgentId>)]
    pub agent: Option<String>,
    /// Or a capability (1-128 bytes): the least-loaded available agent that has it runs the step.
    #[schema(min_length = 1, max_length = 128)]
    pub capability: Option<String>,
    /// Handed to the agent (at most 256 KiB serialized, the configured maximum).
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub input: Map<String, Value>,
    /// `dependency_based` only: the `step_id`s that must succeed before this step starts.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// `event_driven` only, and required there: the event name (1-256 bytes) that starts the step.
    #[schema(min_length = 1, max_length = 256)]
    pub trigger: Option<String>,
    /// Milliseconds an attempt may take (1-3 600 000, default 30 000).
    #[serde(default = "default_timeout_ms")]
    #[schema(default = 30000, minimum = 1, maximum = 3_600_000)]
    pub timeout_ms: u64,
    /// Attempts after the first (0-100, default 0).
    #[serde(default)]
    #[schema(default = 0, maximum = 100)]
    pub max_retries: u32,
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// The configurable bounds of a definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most steps of a workflow.
    pub max_steps: usize,
    /// Largest step `input`, serialized as compact JSON.
    pub max_input_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_steps: 10_000,
            max_input_bytes: 256 << 10,
        }
    }
}

/// Checks a definition, reporting all its problems in one [`Error::Validation`].
///
/// A missing or oversized `steps` is reported alone (with `name`): the steps are not looked at.
/// A dependency cycle is looked for only once every `step_id` and `depends_on` entry is valid,
/// and the first cycle found is reported, on the `depends_on` of the step it starts from.
pub fn validate(def: &WorkflowDefinition, limits: &Limits) -> Result<()> {
    let mut errors = Errors::default();
    errors.check(validate_name("", &def.name, MAX_NAME), || "name".to_owned());

    let steps = &def.steps;
    let n = steps.len();
    if n == 0 || n > limits.max_steps {
        let max = limits.max_steps;
        errors.add("steps".to_owned(), format!("a workflow has 1-{max} steps"));
        return errors.finish();
    }

    // The first step of each id: references resolve to it, later ones are duplicates.
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (i, step) in steps.iter().enumerate() {
        index.entry(step.step_id.as_str()).or_insert(i);
    }

    // `depends_on` (DAG) and `step:<step_id>` triggers (event-driven) both order the steps: they
    // must name existing steps and form no cycle.
    let graph = matches!(def.pattern, Pattern::DependencyBased | Pattern::EventDriven);
    let edge_field = if def.pattern == Pattern::EventDriven {
        "trigger"
    } else {
        "depends_on"
    };
    // The dependency graph, compressed: step `i` depends on `edges[starts[i]..starts[i + 1]]`.
    let mut starts = Vec::with_capacity(if graph { n + 1 } else { 0 });
    let mut edges = Vec::new();
    // `named_by[j] == i`: step `i` already names step `j` in its `depends_on`.
    let mut named_by = vec![usize::MAX; if graph { n } else { 0 }];
    let mut refs_ok = true;

    for (i, step) in steps.iter().enumerate() {
        let at = |name: &str| format!("steps[{i}].{name}");

        if !is_step_id(&step.step_id) {
            refs_ok = false;
            errors.add(
                at("step_id"),
                format!("step ids are 1-{MAX_STEP_ID} characters of [A-Za-z0-9._:-]"),
            );
        } else if let Some(&first) = index.get(step.step_id.as_str())
            && first != i
        {
            refs_ok = false;
            errors.add(at("step_id"), format!("duplicates steps[{first}].step_id"));
        }

        match (&step.agent, &step.capability) {
            (Some(_), Some(_)) => errors.add(
                format!("steps[{i}]"),
                "has both an agent and a capability: give exactly one",
            ),
            (None, None) => errors.add(
                format!("steps[{i}]"),
                "needs an agent or a capability to run it",
            ),
            (Some(agent), None) => {
                errors.check(validate_agent_id("", agent), || at("agent"));
            }
            (None, Some(capability)) => {
                errors.check(validate_name("", capability, MAX_CAPABILITY), || {
                    at("capability")
                });
            }
        }

        match (def.pattern, &step.trigger) {
            (Pattern::EventDriven, Some(trigger)) => {
                errors.check(validate_name("", trigger, MAX_TRIGGER), || at("trigger"));
            }
            (Pattern::EventDriven, None) => errors.add(
                at("trigger"),
                "an event_driven step needs a trigger: the event that starts it",
            ),
            (pattern, Some(_)) => errors.add(
                at("trigger"),
                format!(
                    "only event_driven steps have a trigger; a {} workflow {}",
                    pattern.as_str(),
                    pattern.starts_steps()
                ),
            ),
            (_, None) => {}
        }

        if !(1..=MAX_TIMEOUT_MS).contains(&step.timeout_ms) {
            errors.add(at("timeout_ms"), format!("must be 1-{MAX_TIMEOUT_MS}"));
        }
        if step.max_retries > MAX_RETRIES {
            errors.add(at("max_retries"), format!("must be 0-{MAX_RETRIES}"));
        }
        if !fits(&step.input, limits.max_input_bytes) {
            let max = limits.max_input_bytes;
            errors.add(
                at("input"),
                format!("is larger than {max} bytes serialized"),
            );
        }

        if graph {
            starts.push(edges.len());
        }
        // `step:<step_id>`: another step's completion starts this one.
        if let Some(from) = step
            .trigger
            .as_deref()
            .and_then(|t| t.strip_prefix("step:"))
            && def.pattern == Pattern::EventDriven
        {
            match index.get(from) {
                None => {
                    refs_ok = false;
                    errors.add(at("trigger"), "`step:` names no step of this workflow");
                }
                Some(&j) if j == i => {
                    refs_ok = false;
                    errors.add(
                        at("trigger"),
                        "a step cannot be started by its own completion",
                    );
                }
                Some(&j) => edges.push(j),
            }
        }
        if def.pattern == Pattern::DependencyBased {
            for (k, dep) in step.depends_on.iter().enumerate() {
                let problem = match index.get(dep.as_str()) {
                    None => "names no step of this workflow",
                    Some(&j) if j == i => "a step cannot depend on itself",
                    Some(&j) if named_by[j] == i => "already named earlier in depends_on",
                    Some(&j) => {
                        named_by[j] = i;
                        edges.push(j);
                        continue;
                    }
                };
                refs_ok = false;
                errors.add(format!("steps[{i}].depends_on[{k}]"), problem);
            }
        } else if !step.depends_on.is_empty() {
            errors.add(
                at("depends_on"),
                format!(
                    "only dependency_based workflows have dependencies; a {} workflow {}",
                    def.pattern.as_str(),
                    def.pattern.starts_steps()
                ),
            );
        }
    }

    if graph && refs_ok {
        starts.push(edges.len());
        errors
            .0
            .extend(find_cycle(steps, &starts, &edges, edge_field));
    }
    errors.finish()
}

/// For each step, the indexes (ascending) of the steps that name it in their `depends_on`: its
/// direct dependants. Meant for a validated definition; unknown names are ignored.
pub fn dependants(def: &WorkflowDefinition) -> Vec<Vec<usize>> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(def.steps.len());
    for (i, step) in def.steps.iter().enumerate() {
        index.entry(step.step_id.as_str()).or_insert(i);
    }
    let mut dependants = vec![Vec::new(); def.steps.len()];
    for (i, step) in def.steps.iter().enumerate() {
        for dep in &step.depends_on {
            if let Some(&j) = index.get(dep.as_str()) {
                let of_j = &mut dependants[j];
                // Steps are visited in order, so a step naming `j` twice would be last.
                if j != i && of_j.last() != Some(&i) {
                    of_j.push(i);
                }
            }
        }
    }
    dependants
}

/// The field errors found so far.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: String, message: impl Into<String>) {
        self.0.push(FieldError {
            field,
            message: message.into(),
        });
    }

    /// Takes the errors of a one-field check from [`crate::common`], under `field` (built only
    /// on failure, so a valid step allocates nothing).
    fn check(&mut self, checked: Result<()>, field: impl FnOnce() -> String) {
        match checked {
            Ok(()) => {}
            Err(Error::Validation(found)) => {
                let field = field();
                for e in found {
                    self.add(field.clone(), e.message);
                }
            }
            Err(other) => self.add(field(), other.to_string()),
        }
    }

    fn finish(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Validation(self.0))
        }
    }
}

/// 1-128 characters of `[A-Za-z0-9._:-]` (the agent-id rule).
fn is_step_id(id: &str) -> bool {
    (1..=MAX_STEP_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Whether `value` serializes to at most `limit` bytes of compact JSON. Counts without
/// buffering and stops at the limit, so an oversized value is never serialized in full.
fn fits(value: &impl Serialize, limit: usize) -> bool {
    struct Budget(usize);
    impl io::Write for Budget {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 = self
                .0
                .checked_sub(buf.len())
                .ok_or_else(|| io::Error::other("over the limit"))?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    serde_json::to_writer(Budget(limit), value).is_ok()
}

/// The first dependency cycle, found by an iterative depth-first search (a chain of 10 000 steps
/// must not exhaust the stack), as an error on the `depends_on` of the step it starts from.
fn find_cycle(
    steps: &[StepDef],
    starts: &[usize],
    edges: &[usize],
    field: &str,
) -> Option<FieldError> {
    #[derive(Clone, Copy)]
    enum Mark {
        New,
        /// On the search path, at this position of `path`.
        Open(usize),
        Done,
    }
    let deps = |i: usize| &edges[starts[i]..starts[i + 1]];
    let mut mark = vec![Mark::New; steps.len()];
    // The search path: each step and how many of its dependencies have been visited.
    let mut path: Vec<(usize, usize)> = Vec::new();
    for root in 0..steps.len() {
        if !matches!(mark[root], Mark::New) {
            continue;
        }
        mark[root] = Mark::Open(0);
        path.push((root, 0));
        while let Some(top) = path.last_mut() {
            let (step, next) = *top;
            let Some(&dep) = deps(step).get(next) else {
                mark[step] = Mark::Done;
                path.pop();
                continue;
            };
            top.1 += 1;
            match mark[dep] {
                Mark::New => {
                    mark[dep] = Mark::Open(path.len());
                    path.push((dep, 0));
                }
                Mark::Open(from) => return Some(cycle_error(steps, &path[from..], field)),
                Mark::Done => {}
            }
        }
    }
    None
}

/// `cycle: a -> b -> c -> a` on `steps[<a>].<field>`, the middle of a long cycle elided.
fn cycle_error(steps: &[StepDef], cycle: &[(usize, usize)], field: &str) -> FieldError {
    let first = cycle.first().map_or(0, |&(step, _)| step);
    let ids = cycle
        .iter()
        .map(|&(step, _)| step)
        .chain([first])
        .map(|step| steps[step].step_id.as_str());
    let len = cycle.len() + 1;
    let shown = if len > CYCLE_SHOWN {
        CYCLE_SHOWN / 2
    } else {
        len
    };
    let mut message = String::from("cycle: ");
    for (k, id) in ids.enumerate() {
        if k < shown || k >= len - shown {
            if k > 0 {
                message.push_str(" -> ");
            }
            message.push_str(id);
        } else if k == shown {
            let _ = write!(message, " -> … ({} more)", len - 2 * shown);
        }
    }
    FieldError {
        field: format!("steps[{first}].{field}"),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(value: Value) -> WorkflowDefinition {
        serde_json::from_value(value).expect("a well-formed definition")
    }

    fn errors_of(def: &WorkflowDefinition, limits: &Limits) -> Vec<FieldError> {
        match validate(def, limits) {
            Err(Error::Validation(errors)) => errors,
            other => panic!("expected validation errors, got {other:?}"),
        }
    }

    fn errors(def: &WorkflowDefinition) -> Vec<FieldError> {
        errors_of(def, &Limits::default())
    }

    fn only(errors: &[FieldError]) -> (&str, &str) {
        match errors {
            [e] => (&e.field, &e.message),
            _ => panic!("expected exactly one error, got {errors:?}"),
        }
    }

    fn valid(def: &WorkflowDefinition) {
        if let Err(e) = validate(def, &Limits::default()) {
            panic!(
                "expected {} to be valid: {:?}",
                def.name,
                e.problem().errors
            );
        }
    }

    /// A `dependency_based` workflow whose steps (all run by agent `w`) have these ids and deps.
    fn graph(steps: &[(&str, &[&str])]) -> WorkflowDefinition {
        let steps: Vec<Value> = steps
            .iter()
            .map(|(id, deps)| json!({"step_id": id, "agent": "w", "depends_on": deps}))
            .collect();
        def(json!({"name": "g", "pattern": "dependency_based", "steps": steps}))
    }

    /// A `dependency_based` chain of `n` steps, each depending on the next; `closed` makes the
    /// last depend on the first.
    fn chain(n: usize, closed: bool) -> WorkflowDefinition {
        let steps = (0..n)
            .map(|i| StepDef {
                step_id: format!("s{i}"),
                name: None,
                agent: Some("w".into()),
                capability: None,
                input: Map::new(),
                depends_on: match (i + 1 < n, closed) {
                    (true, _) => vec![format!("s{}", i + 1)],
                    (false, true) => vec!["s0".into()],
                    (false, false) => vec![],
                },
                trigger: None,
                timeout_ms: 30_000,
                max_retries: 0,
            })
            .collect();
        WorkflowDefinition {
            name: "chain".into(),
            description: None,
            pattern: Pattern::DependencyBased,
            steps,
            metadata: Map::new(),
        }
    }

    /// Runs `f` on a thread with a small stack: a recursive search of a long chain overflows it.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(f)
            .expect("a thread")
            .join()
            .expect("no overflow")
    }

    #[test]
    fn each_pattern_accepts_a_valid_definition() {
        let sequential = def(json!({
            "name": "review", "description": "d", "pattern": "sequential", "metadata": {"k": 1},
            "steps": [
                {"step_id": "draft", "agent": "writer-1", "input": {"topic": "x"}},
                {"step_id": "review", "name": "Review", "capability": "code_review",
                 "timeout_ms": 3_600_000, "max_retries": 100},
            ],
        }));
        valid(&sequential);
        assert_eq!(sequential.steps[0].timeout_ms, 30_000);
        assert_eq!(sequential.steps[0].max_retries, 0);
        valid(&def(json!({
            "name": "fan", "pattern": "parallel",
            "steps": [{"step_id": "a", "agent": "w"}, {"step_id": "b", "capability": "c"}],
        })));
        // A diamond searched from its top: `a` is reached twice, which is no cycle.
        valid(&graph(&[
            ("d", &["b", "c"]),
            ("b", &["a"]),
            ("c", &["a"]),
            ("a", &[]),
        ]));
        valid(&def(json!({
            "name": "on-events", "pattern": "event_driven",
            "steps": [{"step_id": "a", "agent": "w", "trigger": "build.done"},
                      {"step_id": "b", "agent": "w", "trigger": "deploy.done"}],
        })));
    }

    #[test]
    fn pattern_names_match_the_wire() {
        for pattern in [
            Pattern::Sequential,
            Pattern::Parallel,
            Pattern::DependencyBased,
            Pattern::EventDriven,
        ] {
            assert_eq!(
                serde_json::to_value(pattern).unwrap(),
                json!(pattern.as_str())
            );
        }
    }

    #[test]
    fn name_is_1_to_256_bytes() {
        let mut d = graph(&[("a", &[])]);
        d.name = String::new();
        assert_eq!(only(&errors(&d)).0, "name");
        d.name = "n".repeat(257);
        assert_eq!(only(&errors(&d)).0, "name");
        d.name = "n".repeat(256);
        valid(&d);
    }

    #[test]
    fn steps_are_required() {
        let d = def(json!({"name": "n", "pattern": "parallel", "steps": []}));
        assert_eq!(only(&errors(&d)), ("steps", "a workflow has 1-10000 steps"));
    }

    #[test]
    fn step_ids_are_unique_and_the_duplicate_names_the_first() {
        let d = graph(&[("a", &[]), ("b", &[]), ("a", &[])]);
        assert_eq!(
            only(&errors(&d)),
            ("steps[2].step_id", "duplicates steps[0].step_id")
        );
    }

    #[test]
    fn step_ids_follow_the_id_rule() {
        for bad in ["", "a b", "é", &"x".repeat(129)] {
            let d = graph(&[(bad, &[])]);
            assert_eq!(only(&errors(&d)).0, "steps[0].step_id", "{bad:?}");
        }
        valid(&graph(&[(&"x".repeat(128), &[]), ("A.b_c:d-9", &[])]));
    }

    #[test]
    fn depends_on_names_existing_steps() {
        let d = graph(&[("a", &[]), ("b", &["zz"])]);
        assert_eq!(
            only(&errors(&d)),
            ("steps[1].depends_on[0]", "names no step of this workflow")
        );
    }

    #[test]
    fn a_step_cannot_depend_on_itself() {
        let d = graph(&[("a", &[]), ("b", &["a", "b"])]);
        assert_eq!(
            only(&errors(&d)),
            ("steps[1].depends_on[1]", "a step cannot depend on itself")
        );
    }

    #[test]
    fn depends_on_names_each_step_once() {
        let d = graph(&[("a", &[]), ("b", &["a", "a"])]);
        assert_eq!(only(&errors(&d)).0, "steps[1].depends_on[1]");
    }

    #[test]
    fn depends_on_is_refused_outside_dependency_based() {
        for pattern in ["sequential", "parallel", "event_driven"] {
            let d = def(json!({
                "name": "n", "pattern": pattern,
                "steps": [{"step_id": "a", "agent": "w", "trigger": "t"},
                          {"step_id": "b", "agent": "w", "trigger": "t", "depends_on": ["a"]}],
            }));
            let errors = errors(&d);
            let depends = errors
                .iter()
                .find(|e| e.field == "steps[1].depends_on")
                .unwrap_or_else(|| panic!("{pattern}: {errors:?}"));
            assert!(depends.message.contains(pattern), "{}", depends.message);
        }
    }

    #[test]
    fn a_cycle_is_refused_with_its_path() {
        let d = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        assert_eq!(
            only(&errors(&d)),
            ("steps[0].depends_on", "cycle: a -> b -> c -> a")
        );
        // Found from a step outside the cycle, reported from where the cycle starts.
        let d = graph(&[("x", &["a"]), ("a", &["b"]), ("b", &["a"])]);
        assert_eq!(
            only(&errors(&d)),
            ("steps[1].depends_on", "cycle: a -> b -> a")
        );
    }

    #[test]
    fn cycles_are_looked_for_only_when_the_references_are_valid() {
        let d = graph(&[("a", &["b"]), ("b", &["a"]), ("c", &["nope"])]);
        assert_eq!(only(&errors(&d)).0, "steps[2].depends_on[0]");
    }

    #[test]
    fn a_10000_step_chain_validates_without_exhausting_the_stack() {
        let d = chain(10_000, false);
        on_small_stack(move || validate(&d, &Limits::default())).expect("a valid chain");
    }

    #[test]
    fn a_10000_step_cycle_is_found_and_its_message_elided() {
        let d = chain(10_000, true);
        let found = on_small_stack(move || errors(&d));
        let (field, message) = only(&found);
        assert_eq!(field, "steps[0].depends_on");
        assert_eq!(
            message,
            "cycle: s0 -> s1 -> s2 -> s3 -> s4 -> s5 -> s6 -> s7 -> … (9985 more) -> \
             s9993 -> s9994 -> s9995 -> s9996 -> s9997 -> s9998 -> s9999 -> s0"
        );
    }

    #[test]
    fn more_steps_than_the_limit_are_refused() {
        let d = chain(10_001, false);
        assert_eq!(only(&errors(&d)), ("steps", "a workflow has 1-10000 steps"));
        let limits = Limits {
            max_steps: 2,
            ..Limits::default()
        };
        assert_eq!(only(&errors_of(&chain(3, false), &limits)).0, "steps");
        assert!(validate(&chain(2, false), &limits).is_ok());
    }

    #[test]
    fn a_step_has_exactly_one_of_agent_and_capability() {
        let d = def(json!({
            "name": "n", "pattern": "parallel",
            "steps": [{"step_id": "a", "agent": "w", "capability": "c"}, {"step_id": "b"}],
        }));
        let errors = errors(&d);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].field, "steps[0]");
        assert!(errors[0].message.contains("both"));
        assert_eq!(errors[1].field, "steps[1]");
        assert!(errors[1].message.contains("needs an agent or a capability"));
    }

    #[test]
    fn agent_and_capability_are_checked() {
        let d = def(json!({
            "name": "n", "pattern": "parallel",
            "steps": [{"step_id": "a", "agent": "no spaces"}, {"step_id": "b", "capability": ""},
                      {"step_id": "c", "capability": "c".repeat(129)}],
        }));
        let errors = errors(&d);
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "steps[0].agent",
                "steps[1].capability",
                "steps[2].capability"
            ]
        );
        assert!(errors[0].message.contains("agent ids are"));
    }

    #[test]
    fn event_driven_steps_need_a_trigger() {
        let d = def(json!({
            "name": "n", "pattern": "event_driven",
            "steps": [{"step_id": "a", "agent": "w", "trigger": "t"}, {"step_id": "b", "agent": "w"},
                      {"step_id": "c", "agent": "w", "trigger": ""}],
        }));
        let errors = errors(&d);
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["steps[1].trigger", "steps[2].trigger"]);
    }

    #[test]
    fn step_triggers_name_another_existing_step_without_a_cycle() {
        let trigger = |step_id: &str, trigger: &str| json!({"step_id": step_id, "agent": "w", "trigger": trigger});
        let steps =
            |list: Vec<Value>| def(json!({"name": "n", "pattern": "event_driven", "steps": list}));
        valid(&steps(vec![trigger("a", "go"), trigger("b", "step:a")]));
        let unknown = errors(&steps(vec![
            trigger("a", "step:nope"),
            trigger("b", "step:b"),
        ]));
        let fields: Vec<_> = unknown.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["steps[0].trigger", "steps[1].trigger"]);
        let cycle = errors(&steps(vec![
            trigger("a", "step:c"),
            trigger("b", "step:a"),
            trigger("c", "step:b"),
        ]));
        let (field, message) = only(&cycle);
        assert_eq!(field, "steps[0].trigger");
        assert_eq!(message, "cycle: a -> c -> b -> a");
    }

    #[test]
    fn a_trigger_is_refused_outside_event_driven() {
        let d = def(json!({
            "name": "n", "pattern": "sequential",
            "steps": [{"step_id": "a", "agent": "w", "trigger": "t"}],
        }));
        let errors = errors(&d);
        let (field, message) = only(&errors);
        assert_eq!(field, "steps[0].trigger");
        assert!(message.contains("sequential"), "{message}");
    }

    #[test]
    fn timeout_and_retries_are_bounded() {
        let d = def(json!({
            "name": "n", "pattern": "parallel",
            "steps": [{"step_id": "a", "agent": "w", "timeout_ms": 0},
                      {"step_id": "b", "agent": "w", "timeout_ms": 3_600_001},
                      {"step_id": "c", "agent": "w", "max_retries": 101}],
        }));
        let errors = errors(&d);
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "steps[0].timeout_ms",
                "steps[1].timeout_ms",
                "steps[2].max_retries"
            ]
        );
    }

    #[test]
    fn an_oversized_input_is_refused_naming_the_limit() {
        let big = def(json!({
            "name": "n", "pattern": "parallel",
            "steps": [{"step_id": "a", "agent": "w", "input": {"x": "y".repeat(256 << 10)}}],
        }));
        assert_eq!(
            only(&errors(&big)),
            ("steps[0].input", "is larger than 262144 bytes serialized")
        );
        // The limit is on the compact serialization, inclusive: `{"x":"yyyy"}` is 12 bytes.
        let small = def(json!({
            "name": "n", "pattern": "parallel",
            "steps": [{"step_id": "a", "agent": "w", "input": {"x": "yyyy"}}],
        }));
        let limits = |max_input_bytes| Limits {
            max_input_bytes,
            ..Limits::default()
        };
        assert!(validate(&small, &limits(12)).is_ok());
        assert_eq!(only(&errors_of(&small, &limits(11))).0, "steps[0].input");
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let d = def(json!({
            "name": "", "pattern": "dependency_based",
            "steps": [{"step_id": "a", "agent": "bad agent", "timeout_ms": 0},
                      {"step_id": "a", "capability": "c", "depends_on": ["missing"]},
                      {"step_id": "c", "trigger": "t"}],
        }));
        let errors = errors(&d);
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "name",
                "steps[0].agent",
                "steps[0].timeout_ms",
                "steps[1].step_id",
                "steps[1].depends_on[0]",
                "steps[2]",
                "steps[2].trigger",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let step = json!({
            "name": "n", "pattern": "dependency_based",
            "steps": [{"step_id": "a", "agent": "w"}, {"step_id": "b", "agent": "w", "dependson": ["a"]}],
        });
        let e = serde_json::from_value::<WorkflowDefinition>(step).unwrap_err();
        assert!(e.to_string().contains("unknown field `dependson`"), "{e}");
        let top = json!({"name": "n", "pattern": "parallel", "steps": [], "metdata": {}});
        let e = serde_json::from_value::<WorkflowDefinition>(top).unwrap_err();
        assert!(e.to_string().contains("unknown field `metdata`"), "{e}");
    }

    #[test]
    fn dependants_invert_depends_on() {
        let d = graph(&[("d", &["b", "c"]), ("b", &["a"]), ("c", &["a"]), ("a", &[])]);
        assert_eq!(dependants(&d), [vec![], vec![0], vec![0], vec![1, 2]]);
        assert_eq!(dependants(&chain(3, false)), [vec![], vec![0], vec![1]]);
    }
}
