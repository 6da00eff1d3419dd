//! The debug routes of the HTTP endpoint: `/explain` (JSON, text or HTML) and `/` (the status
//! page). Thin: parameters read and bounded here, everything else in [`gather`](super::gather),
//! [`render`](super::render) and [`status`](super::status). Served only where
//! [`crate::config::MetricsConfig::debug_pages_on`] allows; elsewhere they answer 403.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::RawQuery;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::Semaphore;

use super::gather::{explain, Ask, Current};
use super::render;
use super::status::{self, ReloadLog};
use crate::handler::Handler;

/// Longest query string read; anything longer is refused (a name is at most 254 characters).
pub(crate) const MAX_QUERY_LEN: usize = 1024;

/// Explanations computed at once; more are refused with 503 (each asks a DNS question and may
/// read one service's checks from Consul).
pub(crate) const MAX_CONCURRENT: usize = 4;

/// How long one explanation may take (a forwarded name waits for its upstream).
pub(crate) const EXPLAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the refused debug routes say.
pub(crate) const REFUSED: &str = "the debug pages (/ and /explain) are served only on a loopback \
     metrics.listen address; set metrics.debug = true to serve them on this one\n";

/// What the debug pages read.
pub(crate) struct DebugPages {
    pub(crate) handler: Arc<Handler>,
    pub(crate) current: Arc<dyn Fn() -> Current + Send + Sync>,
    pub(crate) reloads: ReloadLog,
    pub(crate) slots: Semaphore,
}

/// Headers every debug page carries: nothing may run in them, nothing be loaded from elsewhere.
const HEADERS: [(header::HeaderName, &str); 3] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'unsafe-inline'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::CACHE_CONTROL, "no-store"),
];

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut r = (status, [(header::CONTENT_TYPE, content_type)], body).into_response();
    for (name, value) in HEADERS {
        r.headers_mut()
            .insert(name, header::HeaderValue::from_static(value));
    }
    r
}

fn plain(status: StatusCode, body: String) -> Response {
    respond(status, "text/plain; charset=utf-8", body)
}

/// The debug routes, served (`pages`) or refused (`None`).
pub(crate) fn routes(pages: Option<Arc<DebugPages>>) -> axum::Router {
    let Some(pages) = pages else {
        let refused = || async { plain(StatusCode::FORBIDDEN, REFUSED.to_owned()) };
        return axum::Router::new()
            .route("/", get(refused))
            .route("/explain", get(refused));
    };
    let for_status = pages.clone();
    axum::Router::new()
        .route(
            "/",
            get(move || {
                let pages = for_status.clone();
                async move {
                    let now = (pages.current)();
                    respond(
                        StatusCode::OK,
                        "text/html; charset=utf-8",
                        status::render(&now, &pages.reloads),
                    )
                }
            }),
        )
        .route(
            "/explain",
            get(move |RawQuery(query): RawQuery| {
                let pages = pages.clone();
                async move { explain_page(&pages, query.as_deref().unwrap_or("")).await }
            }),
        )
}

/// The parameters of `/explain`: the first of each, unknown ones ignored.
#[derive(Default)]
struct Params {
    name: Option<String>,
    qtype: Option<String>,
    page: Option<String>,
    format: Option<String>,
    no_edns: bool,
}

fn params(query: &str) -> Params {
    let mut p = Params::default();
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let slot = match &*key {
            "name" => &mut p.name,
            "type" => &mut p.qtype,
            "page" => &mut p.page,
            "format" => &mut p.format,
            "edns" => {
                p.no_edns = value == "0";
                continue;
            }
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(value.into_owned());
        }
    }
    p
}

async fn explain_page(pages: &DebugPages, query: &str) -> Response {
    if query.len() > MAX_QUERY_LEN {
        return plain(
            StatusCode::URI_TOO_LONG,
            format!("the query string is longer than {MAX_QUERY_LEN} bytes\n"),
        );
    }
    let p = params(query);
    let ask = match Ask::parse(
        p.name.as_deref().unwrap_or(""),
        p.qtype.as_deref(),
        p.page.as_deref(),
        p.no_edns,
    ) {
        Ok(ask) => ask,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let Ok(_slot) = pages.slots.try_acquire() else {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_CONCURRENT} explanations are in progress; try again\n"),
        );
    };
    let now = (pages.current)();
    let Ok(explanation) =
        tokio::time::timeout(EXPLAIN_TIMEOUT, explain(&pages.handler, &now, &ask)).await
    else {
        return plain(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no explanation within {EXPLAIN_TIMEOUT:?}\n"),
        );
    };
    match p.format.as_deref().unwrap_or("json") {
        "text" => plain(StatusCode::OK, render::text(&explanation)),
        "html" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            render::html(&explanation),
        ),
        _ => match serde_json::to_string_pretty(&explanation) {
            Ok(json) => respond(StatusCode::OK, "application/json", json + "\n"),
            Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
    }
}
