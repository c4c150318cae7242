//! The OpenAPI 3.1 document, generated from the handlers' annotations. `openapi/openapi.json` in
//! the repository is this document; a test fails when they differ (`ltmc openapi > openapi/openapi.json`).
//!
//! The handlers annotate what is particular to them (their bodies, success answers, 404/409 and
//! the rules of their domain). What holds for every operation alike is added here by rule
//! ([`Conventions`]), so it cannot drift from one handler to the next:
//! - every error answer is `application/problem+json` with the [`Problem`](crate::error::Problem)
//!   schema; 429 and 503 carry `Retry-After`, 401 `WWW-Authenticate`;
//! - every operation may answer 503 (a backing service down or busy, or the request timeout);
//!   one with a JSON body also 400 (malformed JSON), 413 (too large), 415 (not
//!   `application/json`) and 422; one with parameters 422;
//! - bearer security on every operation except the public paths ([`PUBLIC`]), which declare
//!   none; those that need a token may answer 401 and 403 (a stream answers those by closing
//!   the socket with 4401/4403 instead, browsers being unable to read an HTTP status);
//! - path parameters named `agent_id` are [`AgentId`](crate::common::AgentId)s, and every
//!   `limit` query parameter is a page size of 1-500;
//! - every response has a description (the status's reason phrase unless the handler gave one);
//! - operation ids are unique: `<tag>_<handler>` (`messages_list`, `handoffs_list`).

use axum::http::StatusCode;
use utoipa::OpenApi;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, HeaderBuilder, Ref, RefOr, Response};

use crate::{
    agents, checkpoints, common, contexts, coordinations, error, events, handoffs, memory,
    messages, ops, sessions, workflows,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ltmc",
        description = "Real-time coordination for AI agents: registry, durable priority messaging, live streams.\n\n\
Errors are `application/problem+json`. Auth: `Authorization: Bearer <token>` (admin, read or agent token); \
WebSocket streams also take the subprotocol `bearer.<token>`. With no token configured auth is off \
and every operation is open (loopback only).",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        agents::routes::register, agents::routes::list, agents::routes::get_agent,
        agents::routes::heartbeat, agents::routes::delete,
        messages::routes::send, messages::routes::list, messages::routes::claim,
        messages::routes::ack, messages::routes::nack, messages::routes::extend, messages::routes::replay,
        events::stream::agent_stream, events::stream::firehose,
        memory::routes::store, memory::routes::list, memory::routes::get_memory, memory::routes::update,
        memory::routes::link, memory::routes::edges, memory::routes::record, memory::routes::patterns,
        memory::routes::stats,
        handoffs::routes::initiate, handoffs::routes::list, handoffs::routes::get_handoff,
        handoffs::routes::accept, handoffs::routes::complete, handoffs::routes::reject, handoffs::routes::cancel,
        checkpoints::routes::save, checkpoints::routes::restore, checkpoints::routes::list,
        sessions::routes::create, sessions::routes::list, sessions::routes::get_session,
        sessions::routes::record, sessions::routes::activities, sessions::routes::end,
        contexts::routes::get_context, contexts::routes::replace, contexts::routes::merge, contexts::routes::sync,
        coordinations::routes::start, coordinations::routes::respond, coordinations::routes::get_round,
        workflows::routes::submit, workflows::routes::list, workflows::routes::get_workflow,
        workflows::routes::result, workflows::routes::cancel, workflows::routes::post_event,
        ops::healthz, ops::readyz, ops::prometheus_metrics, ops::sla_report, ops::metrics_report, ops::diagnose, ops::openapi,
        ops::dashboard::index, ops::dashboard::asset,
    ),
    components(schemas(error::Problem, error::FieldError, common::AgentId, common::Page<agents::Agent>,
        common::Page<messages::Message>, common::Page<memory::Memory>, common::Page<handoffs::Handoff>,
        common::Page<checkpoints::Checkpoint>, common::Page<sessions::Session>, common::Page<memory::Edge>,
        common::Page<memory::Pattern>, common::Page<workflows::Workflow>)),
    modifiers(&Conventions),
)]
pub struct ApiDoc;

/// Paths anyone may read, with auth on too.
pub const PUBLIC: &[&str] = &[
    "/",
    "/static/{file}",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

/// The largest `?limit=` of a list (the default of `LTMC_MAX_PAGE_SIZE`).
const MAX_PAGE_SIZE: i32 = 500;

/// The rules every operation follows (see the module doc).
struct Conventions;

impl utoipa::Modify for Conventions {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = None;
        for (path, item) in openapi.paths.paths.iter_mut() {
            let public = PUBLIC.contains(&path.as_str());
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                apply(operation, public);
            }
        }
    }
}

fn apply(operation: &mut Operation, public: bool) {
    if let (Some(id), Some([tag, ..])) = (&mut operation.operation_id, operation.tags.as_deref()) {
        *id = format!("{tag}_{id}");
    }
    let stream = operation.responses.responses.contains_key("101");
    operation.security = Some(if public {
        Vec::new()
    } else {
        vec![SecurityRequirement::new("bearer", Vec::<String>::new())]
    });

    let mut parameters = false;
    for parameter in operation.parameters.iter_mut().flatten() {
        let RefOr::T(parameter) = parameter else {
            continue;
        };
        parameters = true;
        match (&parameter.parameter_in, parameter.name.as_str()) {
            (ParameterIn::Path, "agent_id") => {
                parameter.schema = Some(Ref::from_schema_name("AgentId").into());
            }
            (ParameterIn::Query, "limit") => {
                parameter.schema = Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                            utoipa::openapi::KnownFormat::Int32,
                        )))
                        .minimum(Some(1))
                        .maximum(Some(MAX_PAGE_SIZE))
                        .into(),
                );
                parameter
                    .description
                    .get_or_insert_with(|| format!("Page size: 1-{MAX_PAGE_SIZE}, default 50"));
            }
            _ => {}
        }
    }

    let mut shared = vec![StatusCode::SERVICE_UNAVAILABLE];
    if !public && !stream {
        shared.extend([StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN]);
    }
    if operation.request_body.is_some() {
        shared.extend([
            StatusCode::BAD_REQUEST,
            StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            StatusCode::UNPROCESSABLE_ENTITY,
        ]);
    }
    if parameters {
        shared.push(StatusCode::UNPROCESSABLE_ENTITY);
    }
    if stream {
        // A plain GET, without the WebSocket handshake.
        shared.push(StatusCode::BAD_REQUEST);
    }
    let responses = &mut operation.responses.responses;
    for status in shared {
        responses
            .entry(status.as_str().to_owned())
            .or_insert_with(|| RefOr::T(Response::new("")));
    }
    for (code, response) in responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        let status: StatusCode = code.parse().expect("responses are keyed by status code");
        if response.description.is_empty() {
            response.description = describe(status).to_owned();
        }
        if status.is_client_error() || status.is_server_error() {
            response.content.clear();
            response.content.insert(
                "application/problem+json".to_owned(),
                Content::new(Some(Ref::from_schema_name("Problem"))).into(),
            );
        }
        let header = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => Some((
                "Retry-After",
                "Seconds to wait before retrying",
                Type::Integer,
            )),
            StatusCode::UNAUTHORIZED => Some((
                "WWW-Authenticate",
                "The scheme wanted: `Bearer`",
                Type::String,
            )),
            _ => None,
        };
        if let Some((name, description, kind)) = header {
            response.headers.insert(
                name.to_owned(),
                HeaderBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(kind)))
                    .description(Some(description))
                    .build()
                    .into(),
            );
        }
    }
}

/// What a status means in this API, for responses the handler did not describe.
fn describe(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => {
            "Malformed request: the body is not JSON, or (streams) not a WebSocket handshake"
        }
        StatusCode::UNAUTHORIZED => {
            "Auth is on and the bearer token is missing, unknown or revoked"
        }
        StatusCode::FORBIDDEN => "The token may not do this",
        StatusCode::NOT_FOUND => "No such resource",
        StatusCode::CONFLICT => "The resource's state does not allow this",
        StatusCode::PAYLOAD_TOO_LARGE => "The body is larger than the configured limit",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "The body is not sent as `application/json`",
        StatusCode::UNPROCESSABLE_ENTITY => "Validation failed: `errors` names each invalid field",
        StatusCode::TOO_MANY_REQUESTS => "Over capacity: retry after `Retry-After` seconds",
        StatusCode::SERVICE_UNAVAILABLE => {
            "A backing service is down or busy, or the request timed out: retry after \
             `Retry-After` seconds"
        }
        other => other.canonical_reason().unwrap_or("Answer"),
    }
}

/// The document as pretty JSON with a trailing newline (the committed file's exact form).
pub fn document() -> String {
    let mut json = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    json.push('\n');
    json
}
