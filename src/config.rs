//! Configuration: every setting is a flag and an `LTMC_*` environment variable, so `ltmc --help`
//! is the configuration reference. Values are validated while parsing; a bad one stops start-up
//! with one line naming the setting (exit code 2, see `main.rs`).

use crate::ops::sla::Thresholds;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The `ltmc` command line.
#[derive(Debug, Parser)]
#[command(
    name = "ltmc",
    version,
    about = "Real-time coordination service for AI agents"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the OpenAPI document and exit.
    Openapi,
}

/// Everything the service is configured with.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(
        long,
        env = "LTMC_BIND",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub bind: SocketAddr,

    /// SQL store (SQLite): `sqlite://PATH`; the file is created if missing.
    #[arg(long, env = "LTMC_DATABASE_URL", default_value = "sqlite://ltmc.db",
          value_parser = parse_database_url, global = true)]
    pub database_url: String,

    /// Redis URL (`redis://HOST:PORT/DB`). Unset: the in-process broker.
    #[arg(long, env = "LTMC_REDIS_URL", value_parser = parse_redis_url, global = true)]
    pub redis_url: Option<String>,

    /// Prefix of every Redis key and channel.
    #[arg(long, env = "LTMC_KEY_PREFIX", default_value = "ltmc:", value_parser = parse_key_prefix, global = true)]
    pub key_prefix: String,

    /// Admin token (may do everything). Setting any token turns auth on.
    #[arg(long, env = "LTMC_ADMIN_TOKEN", value_parser = TokenParser, hide_env_values = true, global = true)]
    pub admin_token: Option<String>,

    /// Read token (every GET and the event streams).
    #[arg(long, env = "LTMC_READ_TOKEN", value_parser = TokenParser, hide_env_values = true, global = true)]
    pub read_token: Option<String>,

    /// Allow listening on a non-loopback address with auth off.
    #[arg(long, env = "LTMC_INSECURE_NO_AUTH", global = true)]
    pub insecure_no_auth: bool,

    /// Host names served besides loopback names and IP addresses (DNS-rebinding protection),
    /// comma-separated: the public name behind a proxy, `*.example.com` for its subdomains,
    /// `*` for any. Ports are ignored.
    #[arg(long, env = "LTMC_ALLOWED_HOSTS", value_delimiter = ',', value_parser = parse_allowed_host, global = true)]
    pub allowed_hosts: Vec<String>,

    /// Origins (`scheme://host[:port]`) whose pages may open WebSocket streams besides the
    /// server's own, comma-separated; `*` for any.
    #[arg(long, env = "LTMC_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = parse_allowed_origin, global = true)]
    pub allowed_origins: Vec<String>,

    /// Log filter (tracing `EnvFilter` syntax), e.g. `info,ltmc=debug`.
    #[arg(long, env = "LTMC_LOG", default_value = "info", value_parser = parse_log_filter, global = true)]
    pub log: String,

    /// Log format: `text` or `json` (JSON lines).
    #[arg(long, env = "LTMC_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    pub log_format: String,

    /// SLA thresholds over the seed's table: a JSON object with any of its components and
    /// values, e.g. `{"agent_handoff": {"max_handoff_time_ms": 200}}` (`GET /v1/sla` shows them all).
    #[arg(long, env = "LTMC_SLA_THRESHOLDS", default_value = "{}", value_parser = parse_sla, global = true)]
    pub sla_thresholds: Thresholds,

    /// Seconds of recent measures `GET /v1/sla` compares with the thresholds.
    #[arg(long, env = "LTMC_SLA_WINDOW_S", default_value_t = 300,
          value_parser = clap::value_parser!(u32).range(1..=86_400), global = true)]
    pub sla_window_s: u32,

    /// Samples a measure needs in the window before `GET /v1/sla` judges it (fewer: reported as
    /// insufficient data, breaking no SLA).
    #[arg(long, env = "LTMC_SLA_MIN_SAMPLES", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=10_000), global = true)]
    pub sla_min_samples: u32,

    #[command(flatten)]
    pub limits: Limits,
}

fn parse_sla(value: &str) -> Result<Thresholds, String> {
    Thresholds::with_overrides(value)
}

/// Limits and timings, each with the API contract's default.
#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Largest accepted request body, in bytes (larger: 413).
    #[arg(long, env = "LTMC_MAX_BODY_BYTES", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u32).range(1024..=64 << 20), global = true)]
    pub max_body_bytes: u32,

    /// Largest message `content` (serialized JSON), in bytes (larger: 413).
    #[arg(long, env = "LTMC_MAX_CONTENT_BYTES", default_value_t = 256 << 10,
          value_parser = clap::value_parser!(u32).range(16..=64 << 20), global = true)]
    pub max_content_bytes: u32,

    /// Messages waiting (queued or claimed) per recipient before sends get 429.
    #[arg(long, env = "LTMC_MAX_QUEUED_PER_AGENT", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_queued_per_agent: u32,

    /// Deliveries before a message moves to the dead letters.
    #[arg(long, env = "LTMC_MAX_DELIVERIES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    pub max_deliveries: u32,

    /// Largest page a list endpoint returns (`?limit=`).
    #[arg(long, env = "LTMC_MAX_PAGE_SIZE", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=10_000), global = true)]
    pub max_page_size: u32,

    /// Open WebSocket streams allowed per agent token (429 beyond).
    #[arg(long, env = "LTMC_MAX_STREAMS_PER_TOKEN", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_streams_per_token: u32,

    /// Handoffs one session or workflow may go through before a new one is refused (422), so
    /// agents cannot pass work back and forth forever.
    #[arg(long, env = "LTMC_MAX_HANDOFF_HOPS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000), global = true)]
    pub max_handoff_hops: u32,

    /// Most steps in one workflow definition (more: 422).
    #[arg(long, env = "LTMC_MAX_WORKFLOW_STEPS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000), global = true)]
    pub max_workflow_steps: u32,

    /// Checkpoints kept per coordination (the newest; older ones are deleted as new ones come).
    #[arg(long, env = "LTMC_CHECKPOINT_RETENTION", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000), global = true)]
    pub checkpoint_retention: u32,

    /// Frames buffered per WebSocket connection; a consumer that falls this far behind is closed (4008).
    #[arg(long, env = "LTMC_STREAM_BUFFER", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1 << 20), global = true)]
    pub stream_buffer: u32,

    /// Seconds between server pings on WebSocket streams.
    #[arg(long, env = "LTMC_PING_INTERVAL_S", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=3600), global = true)]
    pub ping_interval_s: u32,

    /// Seconds a request may take before it is answered 503 (streams are exempt).
    #[arg(long, env = "LTMC_REQUEST_TIMEOUT_S", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=3600), global = true)]
    pub request_timeout_s: u32,

    /// Milliseconds a connection may take to send a request's head (request line and headers);
    /// also how long an idle keep-alive connection waits for its next request. Then it is closed.
    #[arg(long, env = "LTMC_HEADER_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(100..=600_000), global = true)]
    pub header_timeout_ms: u32,

    /// Open connections at most, WebSocket streams included (lowered at start to fit the
    /// file-descriptor limit). At the cap the connection waiting longest for a request is closed.
    #[arg(long, env = "LTMC_MAX_CONNECTIONS", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000), global = true)]
    pub max_connections: u32,

    /// New work (messages sent, workflow steps submitted, handoffs initiated: one unit each)
    /// admitted and waiting for the store, at most; past it new work is refused with 429 and
    /// `Retry-After` while work already accepted finishes first.
    #[arg(long, env = "LTMC_MAX_NEW_BACKLOG", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_new_backlog: u32,

    /// Event log retention in hours (the newest 1000 events are always kept).
    #[arg(long, env = "LTMC_EVENT_RETENTION_H", default_value_t = 24,
          value_parser = clap::value_parser!(u32).range(1..=24 * 365), global = true)]
    pub event_retention_h: u32,

    /// Most events kept, whatever their age (about 300 bytes each on disk with their indexes).
    #[arg(long, env = "LTMC_EVENT_MAX_ROWS", default_value_t = 5_000_000,
          value_parser = clap::value_parser!(u32).range(1000..), global = true)]
    pub event_max_rows: u32,

    /// Most acked messages remembered (for a repeated ack, at most an hour), the newest first.
    #[arg(long, env = "LTMC_ACKED_MAX_ROWS", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u32).range(1000..), global = true)]
    pub acked_max_rows: u32,

    /// Days finished records are kept: workflows (with their steps), handoffs in a final state,
    /// ended and expired sessions (with their activities), finished coordination rounds, and the
    /// checkpoints of coordinations that saved none for that long.
    #[arg(long, env = "LTMC_RETENTION_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=36_500), global = true)]
    pub retention_days: u32,

    /// Days memories (since their last update), graph edges and patterns are kept; 0 keeps them
    /// for good.
    #[arg(long, env = "LTMC_MEMORY_RETENTION_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(0..=36_500), global = true)]
    pub memory_retention_days: u32,

    /// Milliseconds between background ticks (lease reaper, presence expiry, pruning).
    #[arg(long, env = "LTMC_TICK_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u32).range(10..=60_000), global = true)]
    pub tick_ms: u32,
}

impl Config {
    /// Auth is on whenever a token is configured.
    pub fn auth_enabled(&self) -> bool {
        self.admin_token.is_some() || self.read_token.is_some()
    }

    /// Refuse what must not start: a non-loopback bind with auth off (unless the operator
    /// insists), auth without an admin token (no agent could ever register), or one value for
    /// the admin and the read token (every dashboard holding the read token would be admin).
    pub fn check_exposure(&self) -> Result<(), String> {
        if self.admin_token.is_some() && self.admin_token == self.read_token {
            return Err(
                "--admin-token / LTMC_ADMIN_TOKEN and --read-token / LTMC_READ_TOKEN: must differ \
                 (the read token would grant admin)"
                    .into(),
            );
        }
        if self.read_token.is_some() && self.admin_token.is_none() {
            return Err(
                "--admin-token / LTMC_ADMIN_TOKEN: required when a read token is set \
                        (auth is on, and only the admin can register agents)"
                    .into(),
            );
        }
        if !self.auth_enabled() && !self.bind.ip().is_loopback() && !self.insecure_no_auth {
            return Err(format!(
                "--bind / LTMC_BIND: refusing to listen on non-loopback {} without tokens \
                 (set LTMC_ADMIN_TOKEN, or pass --insecure-no-auth)",
                self.bind
            ));
        }
        Ok(())
    }

    /// The SQLite file path inside `database_url`.
    pub fn sqlite_path(&self) -> &str {
        self.database_url
            .strip_prefix("sqlite://")
            .or_else(|| self.database_url.strip_prefix("sqlite:"))
            .unwrap_or(&self.database_url)
    }

    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.limits.tick_ms.into())
    }

    /// A configuration for tests and embedding: defaults with the given database file.
    pub fn for_tests(database_path: &std::path::Path) -> Self {
        let mut cli = Cli::parse_from(["ltmc"]);
        cli.config.bind = "127.0.0.1:0".parse().expect("literal address");
        cli.config.database_url = format!("sqlite://{}", database_path.display());
        cli.config
    }
}

fn parse_database_url(value: &str) -> Result<String, String> {
    let path = value
        .strip_prefix("sqlite://")
        .or_else(|| value.strip_prefix("sqlite:"))
        .ok_or("expected sqlite://PATH (the SQLite store)")?;
    if path.is_empty() || path.starts_with(":memory:") {
        return Err("expected a file path: an in-memory database would lose everything".into());
    }
    Ok(value.to_owned())
}

fn parse_redis_url(value: &str) -> Result<String, String> {
    deadpool_redis::redis::Client::open(value).map_err(|e| format!("not a Redis URL: {e}"))?;
    Ok(value.to_owned())
}

fn parse_key_prefix(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 64 || value.chars().any(|c| c.is_whitespace() || c == '*')
    {
        return Err("1-64 characters, no spaces and no '*'".into());
    }
    Ok(value.to_owned())
}

/// Parses a token without ever repeating it: clap's own error for a rejected value quotes the
/// value, and a rejected token may still be a real secret (one with a stray newline, say) that
/// must not end up in logs.
#[derive(Clone)]
struct TokenParser;

impl clap::builder::TypedValueParser for TokenParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let checked = value
            .to_str()
            .ok_or_else(|| "tokens must be printable ASCII without spaces".to_owned())
            .and_then(parse_token);
        checked.map_err(|reason| {
            let name = arg.map_or_else(|| "token".to_owned(), ToString::to_string);
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{name}': {reason}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

fn parse_token(value: &str) -> Result<String, String> {
    if value.len() < 16 {
        return Err("tokens must be at least 16 characters".into());
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("tokens must be printable ASCII without spaces".into());
    }
    Ok(value.to_owned())
}

/// A host name (its port dropped), `*.name` or `*`; an empty entry (an empty variable) is no entry.
fn parse_allowed_host(value: &str) -> Result<String, String> {
    let value = value.trim();
    let refused = || "expected host names (no scheme, no path), `*.name` or `*`".to_owned();
    if value
        .chars()
        .any(|c| c.is_whitespace() || c == '/' || c == '@')
    {
        return Err(refused());
    }
    if value == "*" {
        return Ok(value.to_owned());
    }
    let name = crate::origin::host_name(value);
    // A wildcard only as a whole first label, over a name: `*.` alone would read as `*`.
    let wildcard_ok = match name.strip_prefix("*.") {
        Some(rest) => !rest.is_empty() && !rest.contains('*'),
        None => !name.contains('*'),
    };
    if !wildcard_ok {
        return Err(refused());
    }
    Ok(name)
}

/// An origin, `scheme://host[:port]` with an http(s) scheme, or `*`. The scheme's default port
/// is dropped, as browsers drop it from the `Origin` they send.
fn parse_allowed_origin(value: &str) -> Result<String, String> {
    let value = value.trim().trim_end_matches('/').to_ascii_lowercase();
    let authority = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"));
    match authority {
        _ if value == "*" || value.is_empty() => Ok(value),
        Some(a) if !a.is_empty() && !a.contains(['/', ' ', '@']) => {
            let default_port = if value.starts_with("https://") {
                ":443"
            } else {
                ":80"
            };
            Ok(value
                .strip_suffix(default_port)
                .unwrap_or(&value)
                .to_owned())
        }
        _ => Err("expected origins like https://dash.example.com[:port], or `*`".into()),
    }
}

fn parse_log_filter(value: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(value).map_err(|e| format!("not a log filter: {e}"))?;
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_hosts_take_names_and_whole_label_wildcards() {
        assert_eq!(
            parse_allowed_host("LTMC.example.com:8080").unwrap(),
            "ltmc.example.com"
        );
        assert_eq!(
            parse_allowed_host("*.corp.example").unwrap(),
            "*.corp.example"
        );
        assert_eq!(parse_allowed_host("*").unwrap(), "*");
        for bad in ["*.", "a.*.b", "ab*.c", "http://x", "a b"] {
            assert!(parse_allowed_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allowed_origins_drop_the_default_port() {
        assert_eq!(
            parse_allowed_origin("https://X.example:443/").unwrap(),
            "https://x.example"
        );
        assert_eq!(
            parse_allowed_origin("http://x.example:80").unwrap(),
            "http://x.example"
        );
        assert_eq!(
            parse_allowed_origin("https://x.example:8443").unwrap(),
            "https://x.example:8443"
        );
        assert!(parse_allowed_origin("x.example").is_err());
    }
}
