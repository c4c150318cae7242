//! The OpenAPI document, generated from the handlers' annotations. `openapi/openapi.json` in the
//! repository is this document; a test fails when they differ (`ltmc openapi > openapi/openapi.json`).

use utoipa::OpenApi;

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
WebSocket streams also take the subprotocol `bearer.<token>`.",
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
    components(schemas(error::Problem, error::FieldError, common::Page<agents::Agent>, common::Page<messages::Message>,
        common::Page<memory::Memory>, common::Page<handoffs::Handoff>, common::Page<checkpoints::Checkpoint>, common::Page<sessions::Session>, common::Page<memory::Edge>, common::Page<memory::Pattern>,
        common::Page<workflows::Workflow>)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
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
