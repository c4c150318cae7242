//! Small things every area shares: ids, timestamps, the rules every id, name and stored JSON
//! value follows, pages.

use serde::de::{DeserializeOwned, Deserializer, Error as _};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use crate::error::{Error, Result};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// RFC 3339 UTC with milliseconds: `2026-11-26T11:29:39.123Z`.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source is available");
    hex(&buf)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// An opaque, type-prefixed, time-sortable id: `msg_` + 12 hex digits of milliseconds + 16 random
/// hex digits. Fixed width, so lexical order is creation order (to the millisecond).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:012x}{}", now_ms(), random_hex(8))
}

// The OpenAPI schema of an agent id: fields and parameters refer to it with
// `#[schema(value_type = AgentId)]`, and [`validate_agent_id`] enforces the same rule.
/// An agent id, chosen by the agent: 1-128 characters of `[A-Za-z0-9._:-]`.
#[derive(ToSchema)]
#[schema(
    pattern = "^[A-Za-z0-9._:-]{1,128}$",
    min_length = 1,
    max_length = 128,
    examples("coder-1")
)]
pub struct AgentId(pub String);

/// Agent ids are chosen by the agent: 1-128 characters of `[A-Za-z0-9._:-]`.
pub fn validate_agent_id(field: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "agent ids are 1-128 characters of [A-Za-z0-9._:-]",
        ))
    }
}

/// A short free-text field: 1..=max bytes.
pub fn validate_text(field: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() || value.len() > max {
        return Err(Error::invalid(field, format!("must be 1-{max} bytes")));
    }
    Ok(())
}

/// A name: an id, a type, a tag, a topic, a capability, a search query: 1..=max bytes and no
/// control characters. These end up in logs, SQL full-text queries, Redis keys and dashboards,
/// where a NUL or an escape sequence breaks the consumer; free text (reasons, errors, memory
/// content) and JSON content may hold them.
pub fn validate_name(field: &str, value: &str, max: usize) -> Result<()> {
    validate_text(field, value, max)?;
    validate_printable(field, value)
}

/// No control characters (see [`validate_name`]); for list filters, which keep their own rules.
pub fn validate_printable(field: &str, value: &str) -> Result<()> {
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// How deep a JSON value the service stores or forwards may nest (arrays and objects, the value
/// itself counted): deeper documents break clients that parse recursively (serde_json stops at
/// 128, many parsers sooner), so one such value in a claim would poison the whole batch.
pub const MAX_JSON_DEPTH: usize = 64;

/// Whether well-formed JSON text nests deeper than `limit`: one pass over the bytes, no
/// recursion, so any depth is measured safely.
fn nests_deeper(json: &str, limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for byte in json.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn too_deep() -> String {
    format!("nests deeper than {MAX_JSON_DEPTH} levels")
}

/// `#[serde(deserialize_with = "bounded")]` for every stored JSON field of a request: the value
/// is captured raw (which has no recursion limit), refused past [`MAX_JSON_DEPTH`] — an error
/// serde reports with the field's path, answered 422 naming it — and only then parsed. Parsing
/// first would refuse a value past serde_json's own limit of 128 as a malformed body (400) that
/// names no field.
pub fn bounded<'de, D: Deserializer<'de>, T: DeserializeOwned>(
    deserializer: D,
) -> Result<T, D::Error> {
    let raw = Box::<RawValue>::deserialize(deserializer)?;
    if nests_deeper(raw.get(), MAX_JSON_DEPTH) {
        return Err(D::Error::custom(too_deep()));
    }
    serde_json::from_str(raw.get()).map_err(|e| {
        // The position inside the captured value means nothing to the client: serde_json adds
        // the one in the body.
        let message = e.to_string();
        let message = message.split(" at line ").next().unwrap_or(&message);
        D::Error::custom(message)
    })
}

/// [`bounded`] for a field kept as raw JSON text (no second parse).
pub fn bounded_raw<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Box<RawValue>, D::Error> {
    let raw = Box::<RawValue>::deserialize(deserializer)?;
    if nests_deeper(raw.get(), MAX_JSON_DEPTH) {
        return Err(D::Error::custom(too_deep()));
    }
    Ok(raw)
}

/// `?limit=&cursor=` of every list endpoint.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size (default 50, at most the configured maximum, 500 by default).
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageQuery {
    /// For lists paged newest first by `seq`: the page size and the `seq` the page starts below.
    pub fn newest_first(&self, max: u32) -> Result<(u32, i64)> {
        let limit = self.limit(max)?;
        let before = match self.cursor.as_deref() {
            None => i64::MAX,
            Some(cursor) => cursor
                .parse()
                .map_err(|_| Error::invalid("cursor", "not a cursor this endpoint issued"))?,
        };
        Ok((limit, before))
    }

    /// The page size, validated against the configured maximum.
    pub fn limit(&self, max: u32) -> Result<u32> {
        match self.limit {
            None => Ok(50.min(max)),
            Some(n) if (1..=max).contains(&n) => Ok(n),
            Some(_) => Err(Error::invalid("limit", format!("must be 1-{max}"))),
        }
    }
}

/// One page of a list: `next_cursor` is null on the last page.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A newest-first page from up to `limit + 1` rows of `(seq, row)`: the cursor is the last
    /// `seq` kept, when more rows follow.
    pub fn from_seq_rows<R>(rows: Vec<(i64, R)>, limit: u32, into: impl Fn(R) -> T) -> Self {
        let more = rows.len() > limit as usize;
        let mut last = None;
        let items = rows
            .into_iter()
            .take(limit as usize)
            .map(|(seq, row)| {
                last = Some(seq);
                into(row)
            })
            .collect();
        Page {
            items,
            next_cursor: last.filter(|_| more).map(|seq| seq.to_string()),
        }
    }

    /// Cuts a `limit + 1` fetch down to `limit` items, deriving the cursor from the last one kept.
    pub fn from_overfetch(mut items: Vec<T>, limit: u32, cursor_of: impl Fn(&T) -> String) -> Self {
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next_cursor = if more {
            items.last().map(cursor_of)
        } else {
            None
        };
        Page { items, next_cursor }
    }
}

/// The body of action endpoints that take none: empty or `{}` (unknown fields are rejected).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}
