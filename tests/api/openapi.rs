//! The published contract: `openapi/openapi.json` is the code's OpenAPI document, the service
//! serves that same document at `/openapi.json`, every route the router serves is documented,
//! and every documented operation is served.

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
