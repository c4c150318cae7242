//! The published contract: `openapi/openapi.json` is the code's OpenAPI document, the service
//! serves that same document at `/openapi.json`, every route the router serves is documented,
//! and every documented operation is served. What can be checked without Python is checked here
//! (every response described, errors as problem documents, security per operation, the rules
//! the server enforces stated, bodies as the server reads them); `tests/contract.sh` validates
//! the served document as OpenAPI 3.1 and fuzzes every operation with schemathesis.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use reqwest::Method;
use serde_json::Value;

use crate::harness::{Kind, TestApp};

const REGENERATE: &str = "cargo run -- openapi > openapi/openapi.json";
const METHODS: &[&str] = &[
    "get", "post", "put", "patch", "delete", "head", "options", "trace",
];

type Operation = (String, String); // (method, path)

fn document() -> Value {
    serde_json::from_str(&ltmc::openapi::document()).expect("the document is JSON")
}

/// The operations in the document, as `(method, path)`.
fn documented(document: &Value) -> BTreeSet<Operation> {
    let mut operations = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if METHODS.contains(&method.as_str()) {
                operations.insert((method.clone(), path.clone()));
            }
        }
    }
    operations
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The text from just after an opening parenthesis to its matching close (string literals
/// skipped).
fn arguments(text: &str) -> &str {
    let (mut depth, mut in_string, mut escaped) = (1, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '(' if !in_string => depth += 1,
            ')' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return &text[..i];
                }
            }
            _ => {}
        }
    }
    panic!(
        "unbalanced parentheses after {:?}",
        &text[..text.len().min(80)]
    );
}

/// The calls at the top level of a method router expression: `post(send).get(list)` → post, get.
fn top_level_calls(expression: &str) -> Vec<&str> {
    let mut calls = Vec::new();
    let (mut depth, mut start) = (0, None);
    for (i, c) in expression.char_indices() {
        if c.is_ascii_alphanumeric() || c == '_' {
            start.get_or_insert(i);
            continue;
        }
        if c == '('
            && depth == 0
            && let Some(s) = start
        {
            calls.push(&expression[s..i]);
        }
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
        start = None;
    }
    calls
}

/// The operations routed in `src/`, read from every `.route("path", get(a).post(b))` and
/// `.route_service("path", service)` (a GET) call, so a new route cannot go unnoticed.
fn routed_in_source() -> BTreeSet<Operation> {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut operations = BTreeSet::new();
    for file in files {
        let text: String = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .map(|line| format!("{line}\n"))
            .collect();
        for nested in [".nest(", ".nest_service("] {
            assert!(
                !text.contains(nested),
                "{}: `{nested}` mounts routes under a prefix; teach tests/api/openapi.rs to read it",
                file.display()
            );
        }
        for call in [".route(", ".route_service("] {
            for (at, _) in text.match_indices(call) {
                let args = arguments(&text[at + call.len()..]).trim_start();
                let path = args
                    .strip_prefix('"')
                    .and_then(|rest| rest.split_once('"'))
                    .map(|(path, _)| path)
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: a `{call}` whose path is not a string literal ({args:?}); \
                             teach tests/api/openapi.rs to read it",
                            file.display()
                        )
                    });
                let methods: Vec<&str> = if call == ".route_service(" {
                    vec!["get"]
                } else {
                    top_level_calls(&args[path.len() + 2..])
                        .into_iter()
                        .filter(|m| METHODS.contains(m))
                        .collect()
                };
                assert!(
                    !methods.is_empty(),
                    "{}: no method found in `{call}{args})`",
                    file.display()
                );
                for method in methods {
                    operations.insert((method.to_owned(), path.to_owned()));
                }
            }
        }
    }
    operations
}

#[test]
fn committed_openapi_json_is_the_codes_document() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; generate it with `{REGENERATE}`",
            path.display()
        )
    });
    let generated = ltmc::openapi::document();
    if committed != generated {
        let (old, new): (Vec<_>, Vec<_>) =
            (committed.lines().collect(), generated.lines().collect());
        let line = (0..old.len().max(new.len()))
            .find(|&i| old.get(i) != new.get(i))
            .unwrap_or(0);
        panic!(
            "openapi/openapi.json is out of date with the code; regenerate it with\n\n    \
             {REGENERATE}\n\nand commit it. First difference at line {}:\n  committed: {:?}\n  \
             generated: {:?}",
            line + 1,
            old.get(line).copied().unwrap_or("<end of file>"),
            new.get(line).copied().unwrap_or("<end of file>"),
        );
    }
}

#[test]
fn every_route_is_documented_and_every_documented_route_is_routed() {
    let documented = documented(&document());
    let routed = routed_in_source();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes without an OpenAPI operation (annotate the handler with #[utoipa::path] and \
         list it in src/openapi.rs, then `{REGENERATE}`): {undocumented:?}"
    );
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        unrouted.is_empty(),
        "documented operations that no `.route(…)` in src/ serves: {unrouted:?}"
    );
}

#[test]
fn every_path_parameter_is_declared() {
    let document = document();
    for (method, path) in documented(&document) {
        let operation = &document["paths"][&path][&method];
        let declared: BTreeSet<&str> = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        let in_path: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        assert_eq!(declared, in_path, "{method} {path}: path parameters");
        assert!(
            operation["responses"]
                .as_object()
                .is_some_and(|r| !r.is_empty()),
            "{method} {path}: no responses documented"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_serves_the_document_and_every_documented_operation() {
    let app = TestApp::spawn(Kind::Memory).await;
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    assert_eq!(
        response.text().await.unwrap(),
        ltmc::openapi::document(),
        "GET /openapi.json serves the code's document"
    );

    // What the router answers for a path it does not serve, to tell it from a real handler.
    let unrouted = app.get("/v1/no-such-route/probe").await;
    assert_eq!(unrouted.0, 404);
    for (method, path) in documented(&document()) {
        let concrete: String = path
            .split('/')
            .map(|s| if s.starts_with('{') { "probe" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let answer = app.request(method.clone(), &concrete, None).await;
        assert!(
            answer != unrouted && answer.0 != 405,
            "{method} {path} is documented but the router does not serve it: {answer:?}"
        );
    }
    app.stop().await;
}

/// Every `(code, response)` of every operation, with the operation's method and path.
fn responses(document: &Value) -> Vec<(String, String, String, Value)> {
    let mut all = Vec::new();
    for (method, path) in documented(document) {
        for (code, response) in document["paths"][&path][&method]["responses"]
            .as_object()
            .unwrap()
        {
            all.push((method.clone(), path.clone(), code.clone(), response.clone()));
        }
    }
    all
}

#[test]
fn every_response_is_described_and_every_error_is_a_problem_document() {
    let document = document();
    for (method, path, code, response) in responses(&document) {
        assert!(
            response["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{method} {path} {code}: a response needs a description (OpenAPI 3.1): {response}"
        );
        let status: u16 = code.parse().unwrap();
        if status >= 400 {
            let content = response["content"].as_object().unwrap();
            assert_eq!(
                content.keys().collect::<Vec<_>>(),
                ["application/problem+json"],
                "{method} {path} {code}: errors are problem documents"
            );
            assert_eq!(
                content["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem",
                "{method} {path} {code}"
            );
        }
        if status == 429 || status == 503 {
            assert!(
                response["headers"]["Retry-After"].is_object(),
                "{method} {path} {code}: documents Retry-After"
            );
        }
    }
}

#[test]
fn every_operation_documents_the_answers_every_request_can_get() {
    let document = document();
    for (method, path) in documented(&document) {
        let operation = &document["paths"][&path][&method];
        let codes: BTreeSet<&str> = operation["responses"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec!["503"];
        if operation["requestBody"].is_object() {
            expected.extend(["400", "413", "415", "422"]);
        }
        if operation["parameters"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
        {
            expected.push("422");
        }
        if codes.contains("101") {
            expected.push("400"); // a plain GET on a stream
        }
        for code in expected {
            assert!(
                codes.contains(code),
                "{method} {path} does not document {code}"
            );
        }
    }
}

#[test]
fn public_paths_declare_no_security_and_every_other_operation_bearer() {
    let document = document();
    assert!(
        document.get("security").is_none(),
        "security is declared per operation, not for the whole document"
    );
    assert!(document["components"]["securitySchemes"]["bearer"].is_object());
    for (method, path) in documented(&document) {
        let operation = &document["paths"][&path][&method];
        let public = ltmc::openapi::PUBLIC.contains(&path.as_str());
        let expected = if public {
            serde_json::json!([])
        } else {
            serde_json::json!([{"bearer": []}])
        };
        assert_eq!(operation["security"], expected, "{method} {path}");
        let codes = operation["responses"].as_object().unwrap();
        let streams = codes.contains_key("101");
        assert_eq!(
            codes.contains_key("401") && codes.contains_key("403"),
            !public && !streams,
            "{method} {path}: 401 and 403 where a token is needed (streams close with 4401/4403)"
        );
    }
    for public in ltmc::openapi::PUBLIC {
        assert!(document["paths"][public].is_object(), "{public} is a path");
    }
}

#[test]
fn agent_ids_page_sizes_and_waits_state_the_rules_the_server_enforces() {
    let document = document();
    let agent_id = &document["components"]["schemas"]["AgentId"];
    assert_eq!(agent_id["pattern"], "^[A-Za-z0-9._:-]{1,128}$");
    assert_eq!(
        (
            agent_id["minLength"].as_u64(),
            agent_id["maxLength"].as_u64()
        ),
        (Some(1), Some(128))
    );
    for (method, path) in documented(&document) {
        for parameter in document["paths"][&path][&method]["parameters"]
            .as_array()
            .into_iter()
            .flatten()
        {
            match (parameter["in"].as_str(), parameter["name"].as_str()) {
                (Some("path"), Some("agent_id")) => assert_eq!(
                    parameter["schema"]["$ref"], "#/components/schemas/AgentId",
                    "{method} {path}"
                ),
                (Some("query"), Some("limit")) => assert_eq!(
                    (
                        &parameter["schema"]["minimum"],
                        &parameter["schema"]["maximum"]
                    ),
                    (&serde_json::json!(1), &serde_json::json!(500)),
                    "{method} {path}"
                ),
                _ => {}
            }
        }
    }
    let schemas = &document["components"]["schemas"];
    let round = &schemas["NewRound"]["properties"]["agents"];
    assert_eq!(
        (round["minItems"].as_u64(), round["maxItems"].as_u64()),
        (Some(1), Some(100))
    );
    let sync = &schemas["NewSync"]["properties"]["agents"];
    assert_eq!(
        (sync["minItems"].as_u64(), sync["maxItems"].as_u64()),
        (Some(2), Some(100))
    );
    let priority = &schemas["NewMessage"]["properties"]["priority"];
    assert_eq!(
        (priority["minimum"].as_u64(), priority["maximum"].as_u64()),
        (Some(0), Some(9))
    );
    let wait = document["paths"]["/v1/coordinations/{coordination_id}"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "wait_ms")
        .unwrap();
    assert_eq!(wait["schema"]["maximum"], 30_000);
}

/// The properties a schema declares and those it requires.
fn shape(schema: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let declared = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    let required = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    (declared, required)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_pattern_answers_the_schema_its_operation_names() {
    let document = document();
    let schemas = &document["components"]["schemas"];
    let answer = &document["paths"]["/v1/patterns"]["post"]["responses"]["201"]["content"]["application/json"]
        ["schema"]["$ref"];
    let name = answer.as_str().unwrap().rsplit('/').next().unwrap();
    let (declared, required) = shape(&schemas[name]);
    assert_eq!(
        schemas["Workflow"]["properties"]["pattern"]["$ref"],
        "#/components/schemas/WorkflowPattern",
        "the workflow pattern has its own name"
    );

    let app = TestApp::spawn(Kind::Memory).await;
    let (status, pattern) = app
        .post(
            "/v1/patterns",
            serde_json::json!({"pattern_type": "retry", "context": "flaky", "solution": "retry twice"}),
        )
        .await;
    assert_eq!(status, 201, "{pattern}");
    let keys: BTreeSet<String> = pattern.as_object().unwrap().keys().cloned().collect();
    assert!(
        required.is_subset(&keys) && keys.is_subset(&declared),
        "POST /v1/patterns answered {keys:?}; {name} declares {declared:?}, requires {required:?}"
    );
    let (_, page) = app.get("/v1/patterns?pattern_type=retry").await;
    assert_eq!(page["items"][0], pattern);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_body_is_no_body_where_the_document_says_so() {
    let document = document();
    for (path, schema) in [
        ("/v1/agents/{agent_id}/messages/claim", "ClaimRequest"),
        ("/v1/agents/{agent_id}/heartbeat", "Heartbeat"),
        ("/v1/handoffs/{handoff_id}/complete", "Complete"),
    ] {
        let body = &document["paths"][path]["post"]["requestBody"];
        assert_ne!(body["required"], true, "{path}: the body is optional");
        let one_of = &body["content"]["application/json"]["schema"]["oneOf"];
        assert!(
            one_of
                .as_array()
                .is_some_and(|o| o.contains(&serde_json::json!({"type": "null"}))
                    && o.contains(
                        &serde_json::json!({"$ref": format!("#/components/schemas/{schema}")})
                    )),
            "{path}: {schema} | null, got {one_of}"
        );
    }

    let app = TestApp::spawn(Kind::Memory).await;
    app.register("planner", &["plan"]).await;
    app.register("coder", &["code"]).await;
    app.send("coder", "planner", serde_json::json!({"n": 1}), 0)
        .await;
    let (status, claimed) = app
        .post("/v1/agents/coder/messages/claim", Value::Null)
        .await;
    assert_eq!(status, 200, "claim with null: {claimed}");
    assert_eq!(claimed["messages"].as_array().unwrap().len(), 1);
    let (status, agent) = app.post("/v1/agents/coder/heartbeat", Value::Null).await;
    assert_eq!(
        (status, &agent["agent_id"]),
        (200, &serde_json::json!("coder")),
        "{agent}"
    );

    let (status, handoff) = app
        .post(
            "/v1/handoffs",
            serde_json::json!({"from_agent": "planner", "to_agent": "coder", "context": {"task": "x"}}),
        )
        .await;
    assert_eq!(status, 201, "{handoff}");
    let id = handoff["handoff_id"].as_str().unwrap();
    let (status, accepted) = app
        .post(
            &format!("/v1/handoffs/{id}/accept"),
            serde_json::json!({"agent_id": "coder"}),
        )
        .await;
    assert_eq!(status, 200, "{accepted}");
    let (status, completed) = app
        .post(&format!("/v1/handoffs/{id}/complete"), Value::Null)
        .await;
    assert_eq!(
        (status, &completed["status"]),
        (200, &serde_json::json!("completed")),
        "{completed}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_capacity_answers_429_with_retry_after() {
    let app = TestApp::spawn_with(
        crate::harness::Options::new(Kind::Memory)
            .configure(|config| config.limits.max_queued_per_agent = 1),
    )
    .await;
    app.send("coder", "planner", serde_json::json!({"n": 1}), 0)
        .await;
    let response = app
        .client
        .post(app.url("/v1/agents/coder/messages"))
        .json(&serde_json::json!({"from": "planner", "message_type": "t", "content": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(
        response.headers()["retry-after"],
        ltmc::error::RETRY_AFTER_S,
        "a 429 says when to retry"
    );
    app.stop().await;
}
