//! The README's walk-through, run as written: every `sh` block of its "A walk through with curl"
//! section (up to the next `##` heading), read from README.md itself, in order, in one bash
//! session against the real `ltmc` binary as a reader starts it (fresh database, default
//! settings: the in-process broker, auth off), with `localhost:8080` pointed at that server.
//! Each `# → …` line (and the `#   …` lines continuing it) is the answer the commands before it
//! must print; a block whose first line starts with `# not run by tests/api/readme.rs` is
//! skipped (it needs a tool the suite cannot assume).
//!
//! An expected answer is JSON in which `…` stands for anything: a value, the rest of a string
//! (`"msg_…"`), or further members or elements (`{"status":"ok",…}`, `[{…},…]`). Everything
//! else must match: an object without `…` has exactly the keys shown, an array without `…`
//! exactly the elements shown. Commands that print nothing (captures into variables) need no
//! `# →` line; a command that prints needs one. At the end no agent may have a message left
//! queued or claimed: whatever the walk-through hands out, it finishes. Needs `bash`, `curl` and
//! `jq` (./test.sh installs them).

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Process, db_path};

const SECTION: &str = "## A walk through with curl";
const SKIP: &str = "# not run by tests/api/readme.rs";
const MARK: &str = "@@readme-segment";

/// Commands, and the answer the README shows for them.
struct Segment {
    code: String,
    expected: Option<Expected>,
}

struct Expected {
    /// 1-based line of the `# →` in README.md.
    line: usize,
    text: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walk_through_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let segments = walk_through(&readme);
    let checked = segments.iter().filter(|s| s.expected.is_some()).count();
    assert!(
        checked >= 20,
        "only {checked} `# →` answers found in the README's walk-through: did its heading or fences change?"
    );

    let dir = tempfile::tempdir().unwrap();
    let server = Process::start(&db_path(&dir), &[]).await;
    let script = script(&segments, &server.addr.to_string());
    let child = tokio::process::Command::new("bash")
        .args(["--noprofile", "--norc", "-c", &script])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bash must be on PATH for the README test");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the walk-through finishes within 60 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let outputs = split_outputs(&stdout);

    for (i, segment) in segments.iter().enumerate() {
        let Some((status, out)) = outputs.get(i) else {
            panic!(
                "the walk-through stopped before segment {i}:\n{}\nstderr: {}",
                segment.code,
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let context = || format!("commands:\n{}\nprinted:\n{out}", segment.code);
        assert_eq!(*status, 0, "exit status {status}; {}", context());
        match &segment.expected {
            None => assert!(
                out.trim().is_empty(),
                "printed something the README does not show (add a `# →` line); {}",
                context()
            ),
            Some(expected) => {
                let pattern = parse_patterns(&expected.text).unwrap_or_else(|e| {
                    panic!("README.md:{}: `# → {}`: {e}", expected.line, expected.text)
                });
                let actual = parse_outputs(out)
                    .unwrap_or_else(|e| panic!("the output is not JSON ({e}); {}", context()));
                if let Err(e) = match_all(&pattern, &actual) {
                    panic!(
                        "README.md:{}: the answer differs from `# → {}`: {e}; {}",
                        expected.line,
                        expected.text,
                        context()
                    );
                }
            }
        }
    }

    // Nothing is left half-done: every message the walk-through's agents were sent was acked
    // (an unacked one would come back when its lease ran out, into a later section's claim).
    let base = format!("http://{}", server.addr);
    let get = |path: String| async move {
        let answer = reqwest::get(path).await.unwrap();
        assert_eq!(answer.status(), 200);
        answer.json::<Value>().await.unwrap()
    };
    let agents = get(format!("{base}/v1/agents")).await;
    for agent in agents["items"].as_array().unwrap() {
        let id = agent["agent_id"].as_str().unwrap();
        for state in ["queued", "claimed"] {
            let left = get(format!("{base}/v1/agents/{id}/messages?state={state}")).await;
            assert_eq!(
                left["items"],
                serde_json::json!([]),
                "the walk-through leaves {state} messages for {id}"
            );
        }
    }
}

/// The walk-through's runnable blocks, cut into segments at each `# →` answer.
fn walk_through(readme: &str) -> Vec<Segment> {
    let lines: Vec<&str> = readme.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_end() == SECTION)
        .unwrap_or_else(|| panic!("README.md has no {SECTION:?} section"));
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |p| start + 1 + p);

    let mut segments = Vec::new();
    let mut i = start + 1;
    while i < end {
        if lines[i].trim_end() != "```sh" {
            i += 1;
            continue;
        }
        let close = lines[i + 1..end]
            .iter()
            .position(|l| l.trim_end() == "```")
            .map(|p| i + 1 + p)
            .unwrap_or_else(|| panic!("README.md:{}: unclosed code block", i + 1));
        let block = &lines[i + 1..close];
        if !block.first().is_some_and(|l| l.starts_with(SKIP)) {
            segments.extend(cut(block, i + 2));
        }
        i = close + 1;
    }
    segments
}

/// Cuts one block (`first` = README line of its first line) into segments.
fn cut(block: &[&str], first: usize) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut code = String::new();
    let mut j = 0;
    while j < block.len() {
        let line = block[j];
        if let Some(text) = line.strip_prefix("# →") {
            let mut text = text.trim().to_owned();
            // Continuation lines: `#` and at least two spaces.
            while j + 1 < block.len() && block[j + 1].starts_with("#  ") {
                j += 1;
                text.push(' ');
                text.push_str(block[j][1..].trim());
            }
            segments.push(Segment {
                code: std::mem::take(&mut code),
                expected: Some(Expected {
                    line: first + j,
                    text,
                }),
            });
        } else {
            code.push_str(line);
            code.push('\n');
        }
        j += 1;
    }
    if !code.trim().is_empty() {
        segments.push(Segment {
            code,
            expected: None,
        });
    }
    segments
}

/// One bash script: the segments in order, each followed by a marker with its exit status.
fn script(segments: &[Segment], addr: &str) -> String {
    let mut script = String::from("set -u -o pipefail\nexec 2>&1\n");
    for segment in segments {
        script.push_str(&segment.code.replace("localhost:8080", addr));
        script.push_str(&format!("printf '\\n{MARK} %d\\n' $?\n"));
    }
    script
}

/// Each segment's exit status and output, in order.
fn split_outputs(stdout: &str) -> Vec<(i32, String)> {
    let mut outputs = Vec::new();
    let mut current = String::new();
    for line in stdout.split_inclusive('\n') {
        match line.trim_end().strip_prefix(MARK) {
            Some(status) => {
                let status = status.trim().parse().expect("the marker's exit status");
                outputs.push((status, std::mem::take(&mut current)));
            }
            None => current.push_str(line),
        }
    }
    outputs
}

fn parse_outputs(out: &str) -> Result<Vec<Value>, serde_json::Error> {
    serde_json::Deserializer::from_str(out)
        .into_iter::<Value>()
        .collect()
}

/// An expected answer: JSON where `…` stands for anything.
#[derive(Debug)]
enum Pattern {
    Any,
    Literal(Value),
    /// A string with `…` in it: the pieces between, in order.
    Glob(Vec<String>),
    Object {
        members: Vec<(String, Pattern)>,
        open: bool,
    },
    Array {
        items: Vec<Pattern>,
        open: bool,
    },
}

fn parse_patterns(text: &str) -> Result<Vec<Pattern>, String> {
    let mut parser = Parser {
        chars: text.chars().collect(),
        at: 0,
    };
    let mut patterns = Vec::new();
    while parser.skip_ws().is_some() {
        patterns.push(parser.value()?);
    }
    Ok(patterns)
}

struct Parser {
    chars: Vec<char>,
    at: usize,
}

impl Parser {
    /// Skips whitespace; the next character, if any.
    fn skip_ws(&mut self) -> Option<char> {
        while self.chars.get(self.at).is_some_and(|c| c.is_whitespace()) {
            self.at += 1;
        }
        self.chars.get(self.at).copied()
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        match self.skip_ws() {
            Some(found) if found == c => {
                self.at += 1;
                Ok(())
            }
            found => Err(format!("expected {c:?} at {}, found {found:?}", self.at)),
        }
    }

    fn value(&mut self) -> Result<Pattern, String> {
        match self.skip_ws() {
            Some('…') => {
                self.at += 1;
                Ok(Pattern::Any)
            }
            Some('{') => self.object(),
            Some('[') => self.array(),
            Some('"') => {
                let s = self.string()?;
                Ok(if s.contains('…') {
                    Pattern::Glob(s.split('…').map(str::to_owned).collect())
                } else {
                    Pattern::Literal(Value::String(s))
                })
            }
            Some(_) => {
                let start = self.at;
                while self
                    .chars
                    .get(self.at)
                    .is_some_and(|c| !c.is_whitespace() && !",]}".contains(*c))
                {
                    self.at += 1;
                }
                let token: String = self.chars[start..self.at].iter().collect();
                serde_json::from_str(&token)
                    .map(Pattern::Literal)
                    .map_err(|e| format!("{token:?}: {e}"))
            }
            None => Err("a value is missing at the end".into()),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let start = self.at;
        self.at += 1;
        loop {
            match self.chars.get(self.at) {
                Some('\\') => self.at += 2,
                Some('"') => break,
                Some(_) => self.at += 1,
                None => return Err("unterminated string".into()),
            }
        }
        self.at += 1;
        let raw: String = self.chars[start..self.at].iter().collect();
        serde_json::from_str(&raw).map_err(|e| format!("{raw}: {e}"))
    }

    fn object(&mut self) -> Result<Pattern, String> {
        self.at += 1;
        let (mut members, mut open) = (Vec::new(), false);
        loop {
            match self.skip_ws() {
                Some('}') => break,
                Some('…') => {
                    self.at += 1;
                    open = true;
                }
                Some('"') => {
                    let key = self.string()?;
                    self.expect(':')?;
                    members.push((key, self.value()?));
                }
                found => return Err(format!("expected a key at {}, found {found:?}", self.at)),
            }
            match self.skip_ws() {
                Some(',') => self.at += 1,
                Some('}') => {}
                found => return Err(format!("expected , or }} at {}, found {found:?}", self.at)),
            }
        }
        self.at += 1;
        Ok(Pattern::Object { members, open })
    }

    fn array(&mut self) -> Result<Pattern, String> {
        self.at += 1;
        let (mut items, mut open) = (Vec::new(), false);
        loop {
            match self.skip_ws() {
                Some(']') => break,
                Some('…') => {
                    self.at += 1;
                    open = true;
                }
                _ => items.push(self.value()?),
            }
            match self.skip_ws() {
                Some(',') => self.at += 1,
                Some(']') => {}
                found => return Err(format!("expected , or ] at {}, found {found:?}", self.at)),
            }
        }
        self.at += 1;
        Ok(Pattern::Array { items, open })
    }
}

fn match_all(patterns: &[Pattern], values: &[Value]) -> Result<(), String> {
    if patterns.len() != values.len() {
        return Err(format!(
            "{} JSON value(s) printed, {} shown",
            values.len(),
            patterns.len()
        ));
    }
    for (i, (p, v)) in patterns.iter().zip(values).enumerate() {
        matches(p, v, &format!("value {i}"))?;
    }
    Ok(())
}

/// Whether `v` has the shape and values `p` shows; `path` names the place for the error.
fn matches(p: &Pattern, v: &Value, path: &str) -> Result<(), String> {
    let differs = || Err(format!("at {path}: {v} does not match"));
    match p {
        Pattern::Any => Ok(()),
        Pattern::Literal(Value::Number(n)) => match v.as_f64() {
            Some(f) if Some(f) == n.as_f64() => Ok(()),
            _ => differs(),
        },
        Pattern::Literal(literal) if literal == v => Ok(()),
        Pattern::Literal(literal) => {
            Err(format!("at {path}: {v} where the README shows {literal}"))
        }
        Pattern::Glob(pieces) => {
            let Some(s) = v.as_str() else {
                return differs();
            };
            let (first, last) = (&pieces[0], &pieces[pieces.len() - 1]);
            if s.len() < first.len() + last.len()
                || !s.starts_with(first.as_str())
                || !s.ends_with(last.as_str())
            {
                return differs();
            }
            let mut rest = &s[first.len()..s.len() - last.len()];
            for piece in &pieces[1..pieces.len() - 1] {
                match rest.find(piece.as_str()) {
                    Some(at) => rest = &rest[at + piece.len()..],
                    None => return differs(),
                }
            }
            Ok(())
        }
        Pattern::Object { members, open } => {
            let Some(object) = v.as_object() else {
                return differs();
            };
            for (key, pattern) in members {
                match object.get(key) {
                    Some(value) => matches(pattern, value, &format!("{path}.{key}"))?,
                    None => return Err(format!("at {path}: no key {key:?} in {v}")),
                }
            }
            if !open && object.len() != members.len() {
                let extra: Vec<&String> = object
                    .keys()
                    .filter(|k| !members.iter().any(|(m, _)| m == *k))
                    .collect();
                return Err(format!(
                    "at {path}: keys {extra:?} the README does not show"
                ));
            }
            Ok(())
        }
        Pattern::Array { items, open } => {
            let Some(array) = v.as_array() else {
                return differs();
            };
            if array.len() < items.len() || (!open && array.len() != items.len()) {
                return Err(format!(
                    "at {path}: {} elements where the README shows {}{}",
                    array.len(),
                    items.len(),
                    if *open { " or more" } else { "" }
                ));
            }
            for (i, (pattern, value)) in items.iter().zip(array).enumerate() {
                matches(pattern, value, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
    }
}

// The matcher itself: `…` stands for what it says and nothing else is let through.
#[test]
fn the_matcher_lets_through_only_what_the_ellipses_allow() {
    let ok = |p: &str, v: &str| {
        let values = parse_outputs(v).unwrap();
        match_all(&parse_patterns(p).unwrap(), &values)
    };
    assert!(
        ok(
            r#"{"id":"msg_…","n":1.0,…}"#,
            r#"{"id":"msg_01","n":1,"x":[]}"#
        )
        .is_ok()
    );
    assert!(ok(r#"{"id":"msg_…"}"#, r#"{"id":"msg_01","x":1}"#).is_err()); // closed object
    assert!(ok(r#"{"id":"msg_…"}"#, r#"{"id":"hof_01"}"#).is_err());
    assert!(ok(r#"{"a":[{"b":2},…]}"#, r#"{"a":[{"b":2},{"c":3}]}"#).is_ok());
    assert!(ok(r#"{"a":[{"b":2}]}"#, r#"{"a":[{"b":2},{"c":3}]}"#).is_err()); // closed array
    assert!(ok(r#"{"a":…}"#, r#"{"a":{"deep":[1]}}"#).is_ok());
    assert!(ok(r#"{"a":true}"#, r#"{"a":"true"}"#).is_err());
    assert!(ok(r#"{"a":…}"#, r#"{"b":1}"#).is_err()); // a missing key
    assert!(ok("204", "204\n").is_ok());
    assert!(ok("204", "409\n").is_err());
    assert!(ok(r#"{"a":1}"#, "").is_err()); // nothing printed
    assert!(ok(r#""a…b…c""#, r#""a-x-b-y-c""#).is_ok());
    assert!(ok(r#""a…b…c""#, r#""a-x-c-y-b""#).is_err());
    assert!(parse_patterns(r#"{"a" 1}"#).is_err());
}
