//! The live dashboard at `/`: three static files from `static/`, compiled into the binary (no
//! CDN, no build step, nothing to deploy beside `ltmc`). The page loads its initial state over
//! REST and follows `/v1/events/stream`; with auth on it asks for a read token.

use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::error::{Error, Path};

const INDEX: &str = include_str!("../../static/index.html");
const SCRIPT: &str = include_str!("../../static/app.js");
const STYLE: &str = include_str!("../../static/style.css");

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The dashboard page.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "The live dashboard", content_type = "text/html")))]
pub async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX)
}

/// The dashboard's script and stylesheet (`app.js`, `style.css`).
#[utoipa::path(get, path = "/static/{file}", tag = "operations",
    params(("file" = String, Path, description = "`app.js` or `style.css`")),
    responses((status = 200, description = "The file"), (status = 404, body = crate::error::Problem)))]
pub async fn asset(Path(name): Path<String>) -> Result<Response, Error> {
    match name.as_str() {
        "app.js" => Ok(file("text/javascript; charset=utf-8", SCRIPT)),
        "style.css" => Ok(file("text/css; charset=utf-8", STYLE)),
        _ => Err(Error::NotFound(format!("no dashboard file {name:?}"))),
    }
}
