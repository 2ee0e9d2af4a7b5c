//! The web console: one page for the clinic's admin and pharmacist, served at `/` by
//! every node from files built into the binary (nothing is fetched from the internet, so
//! it works on a LAN with none). The page signs in with `POST /v1/sessions` and then uses
//! the same API as every other client, with the same role checks; this module only
//! serves its files.
//!
//! The user-facing text of the page lives in one place, `strings.js` (English, French,
//! Arabic; Arabic is shown right to left).

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The page's files: name, content type, contents.
const FILES: [(&str, &str, &str); 4] = [
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("app.css"),
    ),
    (
        "strings.js",
        "text/javascript; charset=utf-8",
        include_str!("strings.js"),
    ),
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("index.html"),
    ),
];

/// What the page may load and talk to: only this node. Invite QR codes are `data:` images.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Whether a request is for the console's files (which need no credential: they hold no
/// data).
pub fn is_console(path: &str) -> bool {
    path == "/" || path.starts_with("/console/")
}

/// The console's routes: `/` and `/console/{file}`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { file("index.html") }))
        .route(
            "/console/{name}",
            get(|Path(name): Path<String>| async move { file(&name) }),
        )
}

fn file(name: &str) -> Response {
    let Some((_, kind, body)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return (
            StatusCode::NOT_FOUND,
            "the console has no such file; open the console at /",
        )
            .into_response();
    };
    let mut response = (*body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
