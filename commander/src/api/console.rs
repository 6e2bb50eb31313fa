//! The dashboard: plain JS modules, CSS and hand-written SVG under `commander/ui/`,
//! embedded in the binary (no build step, no CDN; it works offline). The shell is public;
//! every figure it shows comes from the API with the caller's token.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::ApiError;

#[derive(rust_embed::Embed)]
#[folder = "ui/"]
struct Assets;

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(file) = Assets::get(path) else {
        return ApiError::NotFound(format!("no dashboard file {path}")).into_response();
    };
    let etag = format!(
        "\"{}\"",
        crate::domain::hex(&file.metadata.sha256_hash()[..12])
    );
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == etag)
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let mut resp = (
        [(header::CONTENT_TYPE, content_type(path))],
        file.data.into_owned(),
    )
        .into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    // Revalidated on every load: a new binary serves its own files at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// `GET /`.
pub async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /ui/{file}`.
pub async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(&file, &headers)
}

/// Every embedded file and its size, raw and gzipped (for the figures and a test).
pub fn sizes() -> Vec<(String, usize, usize)> {
    use std::io::Write;
    let mut out = Vec::new();
    for name in Assets::iter() {
        if let Some(f) = Assets::get(&name) {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            let zipped = gz
                .write_all(&f.data)
                .and_then(|_| gz.finish())
                .map_or(0, |v| v.len());
            out.push((name.to_string(), f.data.len(), zipped));
        }
    }
    out
}
