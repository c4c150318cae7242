//! Which `Host` and `Origin` a request may carry, so that no web page can borrow a local ltmc
//! (API.md "Access and limits"). Checked first, before auth, and with auth on too.
//!
//! - DNS rebinding: a page on `attacker.example` points its name at 127.0.0.1 and its requests
//!   reach us with `Host: attacker.example`. A request's Host must therefore be a loopback name
//!   (`localhost`, or `*.localhost`, which browsers resolve to loopback themselves), an IP
//!   address, or a name in `LTMC_ALLOWED_HOSTS` (`*.example.com` for subdomains, `*` for any);
//!   ports are ignored. Any IP address passes: a rebinding needs a name the attacker controls,
//!   and a page whose Host is an address was loaded from that address. This also admits the
//!   bind address itself. A request without Host (HTTP/1.0) cannot come from a browser: it passes.
//! - Cross-site WebSocket hijacking: browsers send no CORS preflight for a WebSocket, but always
//!   send `Origin`. An upgrade whose Origin is present must be the server's own origin (its
//!   `host:port` is the request's Host: the dashboard at `/`) or in `LTMC_ALLOWED_ORIGINS` (`*`
//!   for any). Clients outside browsers usually send no Origin and pass.
//!
//! A refusal is a 403 problem+json whose detail names the setting that would admit the request.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::config::Config;
use crate::error::Error;

/// The middleware: refuses a foreign Host or a foreign WebSocket Origin.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // A Host that is not text matches nothing (U+FFFD is no name), so it is refused.
    let host = request
        .headers()
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned())
        .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()));
    if let Err(e) = check(&state.config, host.as_deref(), request.headers()) {
        return e.into_response();
    }
    next.run(request).await
}

fn check(config: &Config, host: Option<&str>, headers: &HeaderMap) -> Result<(), Error> {
    if let Some(host) = host
        && !host_allowed(&config.allowed_hosts, host)
    {
        return Err(Error::Forbidden(format!(
            "Host {host:?} is not served here (DNS-rebinding protection): only loopback names, \
             IP addresses and the names in LTMC_ALLOWED_HOSTS (--allowed-hosts) are; add this \
             name there if it is yours, e.g. behind a proxy"
        )));
    }
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if upgrade && let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !origin_allowed(&config.allowed_origins, origin, host) {
            return Err(Error::Forbidden(format!(
                "a WebSocket from origin {origin:?} is refused (cross-site WebSocket hijacking \
                 protection): only the server's own origin and the origins in \
                 LTMC_ALLOWED_ORIGINS (--allowed-origins) may open streams; add it there if \
                 that page may read them"
            )));
        }
    }
    Ok(())
}

/// The name of a `host[:port]` (an IPv6 address without its brackets), lowercased.
pub fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn host_allowed(allowed: &[String], host: &str) -> bool {
    let name = host_name(host);
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok()
        || allowed.iter().any(|entry| match entry.as_str() {
            "*" => true,
            "" => false,
            wildcard if wildcard.starts_with("*.") => {
                name.len() > wildcard.len() - 1 && name.ends_with(&wildcard[1..])
            }
            exact => name == exact,
        })
}

fn origin_allowed(allowed: &[String], origin: &str, host: Option<&str>) -> bool {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let own = matches!((authority, host), (Some(a), Some(h)) if a == h.trim().to_ascii_lowercase());
    own || allowed.iter().any(|entry| entry == "*" || *entry == origin)
}
