//! Tokens and who may do what (API.md "Access and limits").
//!
//! - The admin token may do everything; read tokens may `GET` anything and open the firehose.
//! - An agent token is issued once, at the agent's first registration, and stored only as its
//!   SHA-256: a lookup by hash of a 256-bit random secret leaks nothing through timing. It lets the
//!   agent act only as itself (its queue, stream, heartbeat, messages `from` itself) and read the
//!   registry (discovery); anything else is 403 and changes nothing.
//! - Configured tokens are compared in constant time.
//! - With no token configured auth is off: everyone is [`Principal::Anonymous`] and may do
//!   everything (start-up refuses a non-loopback bind in that case, see `config.rs`).

use axum::extract::FromRequestParts;
use axum::http::{HeaderMap, header, request::Parts};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::common::{hex, random_hex};
use crate::error::{Error, Result};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Auth is off.
    Anonymous,
    Admin,
    Read,
    Agent(String),
}

/// A freshly issued agent token: `ltmc_agent_` + 64 hex digits.
pub fn issue_agent_token() -> String {
    format!("ltmc_agent_{}", random_hex(32))
}

/// The SHA-256 (hex) under which a token is stored.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn equals(configured: Option<&String>, presented: &str) -> bool {
    configured.is_some_and(|expected| {
        let a = Sha256::digest(expected.as_bytes());
        let b = Sha256::digest(presented.as_bytes());
        bool::from(a.ct_eq(&b))
    })
}

/// The bearer token of a request, from `Authorization` or (WebSocket) the `bearer.<token>`
/// subprotocol.
pub fn presented_token(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` is as good as `Bearer`.
        return value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().to_owned());
    }
    bearer_subprotocol(headers).map(|p| p["bearer.".len()..].to_owned())
}

/// The `bearer.<token>` entry of `Sec-WebSocket-Protocol`, if any.
pub fn bearer_subprotocol(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| p.starts_with("bearer.") && p.len() > "bearer.".len())
        .map(str::to_owned)
}

impl AppState {
    /// Resolves the caller from its headers: 401 when auth is on and the token is missing or
    /// unknown.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal> {
        if !self.config.auth_enabled() {
            return Ok(Principal::Anonymous);
        }
        let token = presented_token(headers).ok_or(Error::Unauthorized("missing bearer token"))?;
        if equals(self.config.admin_token.as_ref(), &token) {
            return Ok(Principal::Admin);
        }
        if equals(self.config.read_token.as_ref(), &token) {
            return Ok(Principal::Read);
        }
        match crate::agents::db::agent_by_token_hash(self.store.reader(), &token_hash(&token))
            .await?
        {
            Some(agent_id) => Ok(Principal::Agent(agent_id)),
            None => Err(Error::Unauthorized("unknown or revoked token")),
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        state.authenticate(&parts.headers).await
    }
}

impl Principal {
    /// Only the admin (or anyone, with auth off).
    pub fn require_admin(&self) -> Result<()> {
        match self {
            Principal::Anonymous | Principal::Admin => Ok(()),
            _ => Err(Error::Forbidden("this needs the admin token".into())),
        }
    }

    /// Act as `agent_id`: that agent's own token, or the admin.
    pub fn require_agent(&self, agent_id: &str) -> Result<()> {
        match self {
            Principal::Anonymous | Principal::Admin => Ok(()),
            Principal::Agent(me) if me == agent_id => Ok(()),
            Principal::Agent(me) => Err(Error::Forbidden(format!(
                "agent token of {me:?} cannot act as {agent_id:?}"
            ))),
            Principal::Read => Err(Error::Forbidden(
                "a read token cannot change anything".into(),
            )),
        }
    }

    /// Read what belongs to `agent_id`: read tokens, the admin, or the agent itself.
    pub fn require_read_of(&self, agent_id: &str) -> Result<()> {
        match self {
            Principal::Read => Ok(()),
            other => other.require_agent(agent_id),
        }
    }

    /// Read system-wide state (the firehose, lists that span agents): not an agent token.
    pub fn require_reader(&self) -> Result<()> {
        match self {
            Principal::Agent(me) => Err(Error::Forbidden(format!(
                "agent token of {me:?} may only read its own data"
            ))),
            _ => Ok(()),
        }
    }
}
