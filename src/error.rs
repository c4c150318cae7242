//! One error type for the whole API, answered as `application/problem+json`
//! (`{type, title, status, detail}` plus `errors` for validation). Extractor rejections (JSON,
//! path, query) are converted here too, so a client sees one body shape for every 4xx. A 5xx is
//! logged with its whole source chain and never shows internals to the client.

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A 409 that carries what conflicted (answered as the problem's `conflicts` member).
    #[error("{0}")]
    ConflictWith(String, serde_json::Value),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// New work refused while the store is busy finishing accepted work (429, see
    /// [`crate::admission`]).
    #[error("{0}")]
    Overloaded(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Store(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldError {
    /// Where the problem is: a JSON path (`content`, `steps[2].depends_on`) or a parameter name.
    pub field: String,
    pub message: String,
}

/// The RFC 9457 problem document every error is answered with.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A stable, machine-readable URI naming the kind of problem, e.g. `urn:ltmc:problem:conflict`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// On some 409s: what conflicted (e.g. a sync refused under `fail_on_conflict`: the
    /// conflicting keys with each agent's value).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<crate::contexts::Conflict>>)]
    pub conflicts: Option<serde_json::Value>,
}

impl Error {
    /// A validation error on one field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Validation(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) | Error::ConflictWith(..) => StatusCode::CONFLICT,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::TooManyRequests(_) | Error::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Store(e) if store_busy(e) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Store(_) | Error::Migrate(_) | Error::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad-request",
            Error::Validation(_) => "validation",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::NotFound(_) => "not-found",
            Error::Conflict(_) | Error::ConflictWith(..) => "conflict",
            Error::PayloadTooLarge(_) => "payload-too-large",
            Error::UnsupportedMediaType(_) => "unsupported-media-type",
            Error::TooManyRequests(_) => "too-many-requests",
            Error::Overloaded(_) => "overloaded",
            Error::Unavailable(_) => "unavailable",
            Error::Store(e) if store_busy(e) => "unavailable",
            Error::Store(_) | Error::Migrate(_) | Error::Internal(_) => "internal",
        }
    }

    /// The problem document for this error (internals replaced by a generic detail).
    pub fn problem(&self) -> Problem {
        let status = self.status();
        let detail = match self {
            Error::Validation(errors) => errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
            Error::Store(e) if store_busy(e) => "the store is busy; retry".to_owned(),
            Error::Store(_) | Error::Migrate(_) | Error::Internal(_) => {
                "the server failed to handle this request; it has been logged".to_owned()
            }
            other => other.to_string(),
        };
        Problem {
            kind: format!("urn:ltmc:problem:{}", self.code()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            errors: match self {
                Error::Validation(errors) => errors.clone(),
                _ => Vec::new(),
            },
            conflicts: match self {
                Error::ConflictWith(_, conflicts) => Some(conflicts.clone()),
                _ => None,
            },
        }
    }
}

/// SQLite busy or locked (another instance held the write lock past the busy timeout), or no
/// read connection free in time: the backing service is overloaded, not the request wrong.
fn store_busy(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(e) => {
            let code = e.code();
            let primary = code
                .as_deref()
                .and_then(|c| c.parse::<i32>().ok())
                .map(|c| c & 0xff);
            matches!(primary, Some(5 | 6)) // SQLITE_BUSY, SQLITE_LOCKED
        }
        _ => false,
    }
}

/// The message of an error's first source (axum's rejections wrap serde's error in one more layer).
fn first_source(error: &dyn std::error::Error) -> String {
    error.source().unwrap_or(error).to_string()
}

/// Logs a chain of sources, outermost first.
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        chain.push_str(": ");
        chain.push_str(&inner.to_string());
        source = inner.source();
    }
    chain
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::error!(error = %source_chain(&self), "request failed");
        }
        let mut response = problem_response(self.problem());
        if let Error::Unauthorized(_) = self {
            // A 401 names the scheme it wants (RFC 9110 §11.6.1).
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The `Retry-After` of every 429 and 503, in seconds.
pub const RETRY_AFTER_S: &str = "1";

/// A problem document as an HTTP response (with `Retry-After` on a 429 or 503).
pub fn problem_response(problem: Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(problem)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        // Over capacity or a backing service away: both pass in moments, and a client told
        // when to come back does not hammer the server meanwhile.
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
    }
    response
}

impl From<JsonRejection> for Error {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => {
                // The first source is serde's error with its field path: "steps[2].agent: invalid type ...".
                let message = first_source(&e);
                let (field, message) = match message.split_once(": ") {
                    Some((path, rest)) if !path.contains(' ') => (path.to_owned(), rest.to_owned()),
                    _ => ("body".to_owned(), message.to_owned()),
                };
                // A missing field is named only in the message ("missing field `lease_id` …"),
                // the path being its parent's: name the field itself.
                let field = match message
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.split_once('`'))
                {
                    Some((name, _)) if field == "body" => name.to_owned(),
                    Some((name, _)) => format!("{field}.{name}"),
                    None => field,
                };
                Error::Validation(vec![FieldError { field, message }])
            }
            JsonRejection::JsonSyntaxError(e) => Error::BadRequest(first_source(&e)),
            JsonRejection::MissingJsonContentType(_) => Error::UnsupportedMediaType(
                "expected a request body with Content-Type: application/json".into(),
            ),
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Error::PayloadTooLarge("request body is larger than the configured limit".into())
            }
            other => Error::BadRequest(other.body_text()),
        }
    }
}

/// `axum::Json` whose rejections are problem documents.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(Json(value))
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// A JSON body that may also be absent: an empty body or `null` is `T::default()` (action
/// endpoints accept an empty body, `null` or `{}`).
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Whether there is a body is decided by the body itself, not by headers: clients send
        // an empty body with `Content-Type: application/json` and without `Content-Length`.
        let (parts, body) = req.into_parts();
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(JsonRejection::from)?;
        if bytes.is_empty() {
            return Ok(OptionalJson(T::default()));
        }
        // A JSON `null` is no body too, as the document declares (`X | null`, not required).
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        let Json(value) = Json::<Option<T>>::from_request(req, state).await?;
        Ok(OptionalJson(value.unwrap_or_default()))
    }
}

/// `axum::extract::Path` with problem-document rejections.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|rejection: PathRejection| Error::invalid("path", rejection.body_text()))
    }
}

/// `axum::extract::Query` with problem-document rejections.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection: QueryRejection| {
                let text = rejection.body_text();
                let text = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text)
                    .to_owned();
                Error::invalid("query", text)
            })
    }
}
