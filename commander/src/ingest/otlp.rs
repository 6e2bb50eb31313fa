//! OTLP receivers: gRPC (tonic) on :4317 and HTTP (axum) on :4318.
//!
//! Status mapping (STANDARDS.md B.2, and the one place it is done):
//! bad data → INVALID_ARGUMENT / 400; over the size limit → RESOURCE_EXHAUSTED (without
//! RetryInfo, so not retried) / 413; queue full → RESOURCE_EXHAUSTED with RetryInfo /
//! 429 with Retry-After (both retryable); shutting down → UNAVAILABLE / 503. Spans without
//! ids are reported in `partial_success` with a message, the rest accepted.

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::codec::CompressionEncoding;
use tonic_types::{ErrorDetails, StatusExt};

use super::limits::{self, DecodeLimits, Signal};
use super::{Accepted, IngestError, Ingestor};

impl IngestError {
    fn grpc(&self) -> tonic::Status {
        match self {
            IngestError::Overloaded(s) => tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                self.to_string(),
                ErrorDetails::with_retry_info(Some(Duration::from_secs(*s))),
            ),
            IngestError::Stopped => tonic::Status::unavailable(self.to_string()),
            IngestError::Internal => tonic::Status::internal(self.to_string()),
            IngestError::TooLarge { .. } | IngestError::Limit(_) => {
                tonic::Status::resource_exhausted(self.to_string())
            }
            IngestError::Decode(_)
            | IngestError::Invalid(_)
            | IngestError::UnsupportedMediaType(_)
            | IngestError::UnsupportedEncoding(_) => {
                tonic::Status::invalid_argument(self.to_string())
            }
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            IngestError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            IngestError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            IngestError::TooLarge { .. } | IngestError::Limit(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Decode(_) | IngestError::Invalid(_) => StatusCode::BAD_REQUEST,
            IngestError::UnsupportedMediaType(_) | IngestError::UnsupportedEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
        }
    }

    /// The gRPC code number, for the `google.rpc.Status` body of an HTTP error.
    fn code_number(&self) -> i32 {
        self.grpc().code() as i32
    }
}

// ---------------------------------------------------------------- gRPC

/// One OTLP signal, as both receivers serve it: its gRPC service name, its request and
/// answer, and how an export is taken.
trait OtlpSignal: Send + Sync + 'static {
    const NAME: &'static str;
    const SIGNAL: Signal;
    /// The `signal` label of the telemetry counters.
    const LABEL: &'static str;
    /// An export as ingest takes it.
    type Request;
    /// An export as OTLP/JSON reads it.
    type Json: DeserializeOwned;
    type Response: Message + Default + Serialize + Send + 'static;
    /// Decodes a protobuf body that passed the decode limits.
    fn decode(body: Bytes) -> Result<Self::Request, IngestError>;
    fn from_json(json: Self::Json) -> Result<Self::Request, IngestError>;
    fn ingest(
        ing: &Ingestor,
        transport: &'static str,
        req: Self::Request,
    ) -> Result<Accepted, IngestError>;
    fn respond(a: Accepted) -> Self::Response;
    /// The export as the other replicas read it from NATS (its `Fleet-Kind` and protobuf
    /// body), when it carries anything their live state uses.
    fn relayed(req: &Self::Request) -> Option<(&'static str, Bytes)>;
}

#[derive(Debug)]
struct Traces;
#[derive(Debug)]
struct Metrics;
#[derive(Debug)]
struct Logs;

impl OtlpSignal for Traces {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    const SIGNAL: Signal = Signal::Traces;
    const LABEL: &'static str = "traces";
    /// The body itself: `Ingestor::traces` reads it without copying its strings.
    type Request = Bytes;
    type Json = ExportTraceServiceRequest;
    type Response = ExportTraceServiceResponse;
    fn decode(body: Bytes) -> Result<Bytes, IngestError> {
        Ok(body)
    }
    /// Encoded to protobuf here: the trace keeper stores that, and ingest reads it as it
    /// reads every other export.
    fn from_json(json: ExportTraceServiceRequest) -> Result<Bytes, IngestError> {
        Ok(Bytes::from(json.encode_to_vec()))
    }
    fn ingest(ing: &Ingestor, t: &'static str, body: Bytes) -> Result<Accepted, IngestError> {
        ing.traces(t, body)
    }
    fn relayed(body: &Bytes) -> Option<(&'static str, Bytes)> {
        Some((fleet_worker::protocol::kinds::OTLP_TRACES, body.clone()))
    }
    fn respond(a: Accepted) -> Self::Response {
        ExportTraceServiceResponse {
            partial_success: (a.rejected > 0).then_some(ExportTracePartialSuccess {
                rejected_spans: a.rejected as i64,
                error_message: a.message,
            }),
        }
    }
}

impl OtlpSignal for Metrics {
    const NAME: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    const SIGNAL: Signal = Signal::Metrics;
    const LABEL: &'static str = "metrics";
    type Request = ExportMetricsServiceRequest;
    type Json = ExportMetricsServiceRequest;
    type Response = ExportMetricsServiceResponse;
    fn decode(body: Bytes) -> Result<Self::Request, IngestError> {
        prost_decode(&body)
    }
    fn from_json(json: Self::Json) -> Result<Self::Request, IngestError> {
        Ok(json)
    }
    fn ingest(
        ing: &Ingestor,
        t: &'static str,
        req: Self::Request,
    ) -> Result<Accepted, IngestError> {
        ing.metrics(t, req)
    }
    fn relayed(req: &Self::Request) -> Option<(&'static str, Bytes)> {
        Some((
            fleet_worker::protocol::kinds::OTLP_METRICS,
            Bytes::from(req.encode_to_vec()),
        ))
    }
    fn respond(a: Accepted) -> Self::Response {
        ExportMetricsServiceResponse {
            partial_success: (a.rejected > 0).then_some(ExportMetricsPartialSuccess {
                rejected_data_points: a.rejected as i64,
                error_message: a.message,
            }),
        }
    }
}

impl OtlpSignal for Logs {
    const NAME: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const SIGNAL: Signal = Signal::Logs;
    const LABEL: &'static str = "logs";
    type Request = ExportLogsServiceRequest;
    type Json = ExportLogsServiceRequest;
    type Response = ExportLogsServiceResponse;
    fn decode(body: Bytes) -> Result<Self::Request, IngestError> {
        prost_decode(&body)
    }
    fn from_json(json: Self::Json) -> Result<Self::Request, IngestError> {
        Ok(json)
    }
    fn ingest(
        ing: &Ingestor,
        t: &'static str,
        req: Self::Request,
    ) -> Result<Accepted, IngestError> {
        ing.logs(t, &req)
    }
    /// Logs carry nothing the live state uses (`Ingestor::logs`).
    fn relayed(_: &Self::Request) -> Option<(&'static str, Bytes)> {
        None
    }
    fn respond(a: Accepted) -> Self::Response {
        ExportLogsServiceResponse {
            partial_success: (a.rejected > 0).then_some(ExportLogsPartialSuccess {
                rejected_log_records: a.rejected as i64,
                error_message: a.message,
            }),
        }
    }
}

fn prost_decode<T: Message + Default>(body: &[u8]) -> Result<T, IngestError> {
    T::decode(body).map_err(|e| IngestError::Decode(e.to_string()))
}

/// Checks the limits on the raw bytes, then decodes: a body that would expand past them
/// is refused before a single message is allocated.
pub(super) fn checked_decode<T: Message + Default>(
    signal: Signal,
    body: &[u8],
    limits: DecodeLimits,
) -> Result<T, IngestError> {
    limits::check_protobuf(signal, body, limits).map_err(IngestError::from)?;
    prost_decode(body)
}

/// One gRPC export of signal `S`: limits, decode, ingest, answer.
fn grpc_export<S: OtlpSignal>(ing: &Ingestor, body: Bytes) -> Result<S::Response, tonic::Status> {
    let req = decode::<S>(Encoding::Protobuf, body, ing.limits).map_err(|e| {
        ing.metrics.telemetry("grpc", S::LABEL, "rejected", 1);
        e.grpc()
    })?;
    ingest_and_relay::<S>(ing, "grpc", req)
        .map(S::respond)
        .map_err(|e| e.grpc())
}

/// Ingests one export, and passes it on to the other replicas once the live state took
/// it (`relay.rs`).
fn ingest_and_relay<S: OtlpSignal>(
    ing: &Ingestor,
    transport: &'static str,
    req: S::Request,
) -> Result<Accepted, IngestError> {
    let relayed = ing
        .relay
        .as_ref()
        .filter(|r| r.wanted())
        .and_then(|r| Some((r, S::relayed(&req)?)));
    let accepted = S::ingest(ing, transport, req)?;
    if let Some((relay, (kind, body))) = relayed {
        relay.pass(kind, S::LABEL, body);
    }
    Ok(accepted)
}

/// A codec that hands the handler the message's bytes (decoded there, after the limits)
/// and encodes the prost answer.
#[derive(Debug)]
struct RawCodec<R>(std::marker::PhantomData<R>);

#[derive(Debug)]
struct RawDecoder;

#[derive(Debug)]
struct ProstEncoder<R>(std::marker::PhantomData<R>);

impl<R: Message + Send + 'static> tonic::codec::Codec for RawCodec<R> {
    type Encode = R;
    type Decode = Bytes;
    type Encoder = ProstEncoder<R>;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder(std::marker::PhantomData)
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl<R: Message> tonic::codec::Encoder for ProstEncoder<R> {
    type Item = R;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: R,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        item.encode(dst)
            .map_err(|e| tonic::Status::internal(format!("encoding the answer: {e}")))
    }
}

/// An OTLP gRPC service for signal `S` that sees each request's bytes before decoding.
#[derive(Debug)]
struct OtlpGrpc<S> {
    ingestor: Ingestor,
    signal: std::marker::PhantomData<fn() -> S>,
}

impl<S> Clone for OtlpGrpc<S> {
    fn clone(&self) -> Self {
        Self {
            ingestor: self.ingestor.clone(),
            signal: std::marker::PhantomData,
        }
    }
}

impl<S: OtlpSignal> OtlpGrpc<S> {
    fn new(ingestor: Ingestor) -> Self {
        Self {
            ingestor,
            signal: std::marker::PhantomData,
        }
    }
}

impl<S: OtlpSignal> tonic::server::NamedService for OtlpGrpc<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for OtlpGrpc<S>
where
    S: OtlpSignal,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let me = self.clone();
        let is_export = req
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(S::NAME))
            == Some("/Export");
        Box::pin(async move {
            if !is_export {
                return Ok(tonic::Status::unimplemented("unknown method").into_http());
            }
            let mut enabled = tonic::codec::EnabledCompressionEncodings::default();
            enabled.enable(CompressionEncoding::Gzip);
            let mut grpc =
                tonic::server::Grpc::new(RawCodec::<S::Response>(std::marker::PhantomData))
                    .apply_compression_config(enabled, enabled)
                    .apply_max_message_size_config(
                        Some(me.ingestor.limits.max_request_bytes),
                        None,
                    );
            let handler = tower::service_fn(move |r: tonic::Request<Bytes>| {
                let me = me.clone();
                async move { grpc_export::<S>(&me.ingestor, r.into_inner()).map(tonic::Response::new) }
            });
            Ok(grpc.unary(handler, req).await)
        })
    }
}

/// tonic answers an over-limit message with OUT_OF_RANGE and undecodable protobuf with
/// INTERNAL; OTLP wants RESOURCE_EXHAUSTED (without RetryInfo: not retryable) and
/// INVALID_ARGUMENT. Rewrites the code of those trailers-only error responses.
fn otlp_status_codes<B>(
    mut res: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    const OUT_OF_RANGE: &str = "11";
    const INTERNAL: &str = "13";
    let code = res
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let message = res
        .headers()
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("")
        .replace("%20", " ");
    let rewrite = match code {
        OUT_OF_RANGE if message.contains("message length too large") => Some("8"),
        INTERNAL if message.starts_with("failed to decode Protobuf message") => Some("3"),
        _ => None,
    };
    if let Some(to) = rewrite {
        res.headers_mut()
            .insert("grpc-status", HeaderValue::from_static(to));
    }
    res
}

/// How often an OTLP/gRPC connection is pinged (HTTP/2 PING), and how long its client has
/// to answer before the connection is closed: an exporter whose host died or whose route
/// was dropped never closes its connection, and would hold one of `http.max_connections`
/// for good. gRPC servers ping every two hours by default; a minute finds a dead
/// peer while costing an idle exporter one small frame a minute.
pub const GRPC_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
pub const GRPC_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves the three OTLP gRPC services until `shutdown` resolves.
pub async fn serve_grpc(
    ingestor: Ingestor,
    listener: tokio::net::TcpListener,
    limits: crate::httpd::Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (open, refused) = ingestor.metrics.http_server("otlp_grpc");
    let incoming =
        crate::httpd::limited_incoming(listener, limits, crate::httpd::Counters { open, refused });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(GRPC_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
        .layer(tower::util::MapResponseLayer::new(otlp_status_codes))
        .add_service(OtlpGrpc::<Traces>::new(ingestor.clone()))
        .add_service(OtlpGrpc::<Metrics>::new(ingestor.clone()))
        .add_service(OtlpGrpc::<Logs>::new(ingestor))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

// ---------------------------------------------------------------- HTTP

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// The body of an HTTP error (`google.rpc.Status`, without details).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

fn encoding_of(headers: &HeaderMap) -> Result<Encoding, IngestError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let base = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match base.as_str() {
        "application/x-protobuf" | "application/protobuf" => Ok(Encoding::Protobuf),
        "application/json" => Ok(Encoding::Json),
        _ => Err(IngestError::UnsupportedMediaType(ct.to_string())),
    }
}

fn decompress(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes, IngestError> {
    let enc = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match enc.as_str() {
        "" | "identity" | "none" => Ok(body),
        "gzip" => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| IngestError::Decode(format!("gzip: {e}")))?;
            if out.len() > limit {
                return Err(IngestError::TooLarge { limit });
            }
            Ok(Bytes::from(out))
        }
        other => Err(IngestError::UnsupportedEncoding(other.to_string())),
    }
}

/// Decodes a body that passes the decode limits (checked here, before decoding).
fn decode<S: OtlpSignal>(
    enc: Encoding,
    body: Bytes,
    limits: DecodeLimits,
) -> Result<S::Request, IngestError> {
    match enc {
        Encoding::Protobuf => {
            limits::check_protobuf(S::SIGNAL, &body, limits)?;
            S::decode(body)
        }
        Encoding::Json => {
            limits::check_json(&body, limits)?;
            let json = serde_json::from_slice(&body)
                .map_err(|e| IngestError::Decode(format!("JSON: {e}")))?;
            S::from_json(json)
        }
    }
}

fn respond<T: Message + Serialize>(enc: Encoding, status: StatusCode, body: &T) -> Response {
    let bytes = match enc {
        Encoding::Protobuf => body.encode_to_vec(),
        // Serialising a generated message to JSON cannot fail (no maps with non-string
        // keys, no foreign Serialize impls); an empty body is the fallback all the same.
        // Unset fields are left out, as OTLP/JSON wants: a full success is `{}`, not
        // `{"partialSuccess":null}`.
        Encoding::Json => serde_json::to_value(body)
            .map(without_nulls)
            .and_then(|v| serde_json::to_vec(&v))
            .unwrap_or_default(),
    };
    (status, [(header::CONTENT_TYPE, enc.content_type())], bytes).into_response()
}

/// An object without its null-valued fields (prost's `Option` serialises as `null`).
fn without_nulls(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            serde_json::Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).collect())
        }
        other => other,
    }
}

fn error_response(enc: Encoding, e: &IngestError) -> Response {
    let mut res = respond(
        enc,
        e.http_status(),
        &RpcStatus {
            code: e.code_number(),
            message: e.to_string(),
        },
    );
    if let IngestError::Overloaded(s) = e
        && let Ok(v) = HeaderValue::from_str(&s.to_string())
    {
        res.headers_mut().insert(header::RETRY_AFTER, v);
    }
    res
}

/// Reads, decompresses and decodes a request body. An error comes with the encoding its
/// answer must use (JSON when the content type itself is the problem).
fn read<S: OtlpSignal>(
    limits: DecodeLimits,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(Encoding, S::Request), (Encoding, IngestError)> {
    let enc = encoding_of(headers).map_err(|e| (Encoding::Json, e))?;
    let body = decompress(headers, body, limits.max_request_bytes).map_err(|e| (enc, e))?;
    let req = decode::<S>(enc, body, limits).map_err(|e| (enc, e))?;
    Ok((enc, req))
}

/// One OTLP/HTTP export of signal `S`, answered in the request's encoding.
async fn http_export<S: OtlpSignal>(
    State(ing): State<Ingestor>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (enc, req) = match read::<S>(ing.limits, &headers, body) {
        Ok(r) => r,
        Err((enc, e)) => {
            ing.metrics.telemetry("http", S::LABEL, "rejected", 1);
            return error_response(enc, &e);
        }
    };
    match ingest_and_relay::<S>(&ing, "http", req) {
        Ok(a) => respond(enc, StatusCode::OK, &S::respond(a)),
        Err(e) => error_response(enc, &e),
    }
}

/// The OTLP/HTTP routes.
pub fn http_router(ingestor: Ingestor) -> Router {
    let max_body = ingestor.limits.max_request_bytes;
    Router::new()
        .route("/v1/traces", post(http_export::<Traces>))
        .route("/v1/metrics", post(http_export::<Metrics>))
        .route("/v1/logs", post(http_export::<Logs>))
        .fallback(http_no_route)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::map_response(status_bodies))
        .with_state(ingestor)
}

async fn http_no_route(uri: axum::http::Uri) -> Response {
    let e = RpcStatus {
        code: tonic::Code::NotFound as i32,
        message: format!(
            "no OTLP route {}: use /v1/traces, /v1/metrics or /v1/logs",
            uri.path()
        ),
    };
    respond(Encoding::Json, StatusCode::NOT_FOUND, &e)
}

/// axum's own refusals (a body over the limit, a wrong method) answer plain text; OTLP
/// clients read a `google.rpc.Status`. 413 keeps its meaning: RESOURCE_EXHAUSTED.
async fn status_bodies(resp: Response) -> Response {
    let mut resp = resp;
    let status = resp.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The body was not read to its end: the connection cannot carry another request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let typed = resp.headers().contains_key(header::CONTENT_TYPE)
        && resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/"));
    if !(status.is_client_error() || status.is_server_error()) || typed {
        return resp;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => tonic::Code::ResourceExhausted,
        StatusCode::METHOD_NOT_ALLOWED => tonic::Code::Unimplemented,
        s if s.is_server_error() => tonic::Code::Internal,
        _ => tonic::Code::InvalidArgument,
    };
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let e = RpcStatus {
        code: code as i32,
        message: String::from_utf8_lossy(&text).trim().to_string(),
    };
    let mut out = respond(Encoding::Json, parts.status, &e);
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// Binds a listener, logging the address (port 0 picks one).
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<tokio::net::TcpListener> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let local = l.local_addr()?;
    tracing::info!(addr = %local, "{what} listening");
    Ok(l)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use tower::ServiceExt;

    use super::*;
    use crate::fleet::{FleetHandle, TaskEvent};
    use crate::metrics::Metrics;

    fn one_span() -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[tokio::test]
    async fn a_full_trace_keeper_queue_sheds_only_trace_keeping_counted() {
        let (fleet, mut rx) = FleetHandle::detached(16);
        let body = one_span().encode_to_vec();
        // Room for one export (its bytes and its one span's facts), and two places.
        let one = body.len() + std::mem::size_of::<crate::domain::SpanFacts>();
        let (tap, mut kept) = crate::ingest::TraceTap::new(2, one);
        let ingestor = Ingestor {
            fleet,
            metrics: Arc::new(Metrics::default()),
            limits: DecodeLimits::default(),
            supervisor: Default::default(),
            traces: Some(tap.clone()),
            relay: None,
        };
        let app = http_router(ingestor);
        let post = || {
            tonic::codegen::http::Request::post("/v1/traces")
                .header("content-type", "application/x-protobuf")
                .body(Body::from(body.clone()))
                .unwrap()
        };
        for _ in 0..3 {
            let r = app.clone().oneshot(post()).await.unwrap();
            assert_eq!(
                r.status(),
                StatusCode::OK,
                "the live state takes every export"
            );
        }
        // The first holds the byte budget: the other two are shed from trace keeping.
        let first = kept
            .try_recv()
            .expect("the first export reached the keeper");
        assert_eq!(first.body.len(), body.len());
        assert!(kept.try_recv().is_err());
        assert_eq!(tap.shed_spans.load(std::sync::atomic::Ordering::Relaxed), 2);
        let mut live = 0;
        while rx.0.try_recv().is_ok() {
            live += 1;
        }
        assert_eq!(live, 3);
        // Its bytes go back when the keeper is done with it: the next export is taken.
        drop(first);
        let r = app.clone().oneshot(post()).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(kept.try_recv().is_ok());
    }

    #[tokio::test]
    async fn a_full_queue_sheds_telemetry_with_retryable_answers_and_spares_the_task_path() {
        let (fleet, _rx) = FleetHandle::detached(1);
        let metrics = Arc::new(Metrics::default());
        let ingestor = Ingestor {
            fleet: fleet.clone(),
            metrics: metrics.clone(),
            limits: DecodeLimits::default(),
            supervisor: Default::default(),
            traces: None,
            relay: None,
        };
        let app = http_router(ingestor.clone());
        let post = || {
            tonic::codegen::http::Request::post("/v1/traces")
                .header("content-type", "application/x-protobuf")
                .body(Body::from(one_span().encode_to_vec()))
                .unwrap()
        };
        // The first batch fills the queue (nobody drains it).
        let r = app.clone().oneshot(post()).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        // HTTP: 429 with Retry-After and a google.rpc.Status body.
        let r = app.clone().oneshot(post()).await.unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        let status = RpcStatus::decode(body).unwrap();
        assert_eq!(status.code, tonic::Code::ResourceExhausted as i32);
        // gRPC: RESOURCE_EXHAUSTED carrying RetryInfo, which makes it retryable in OTLP.
        let err = grpc_export::<Traces>(&ingestor, one_span().encode_to_vec().into()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let retry = err.get_details_retry_info().unwrap();
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
        // Counted as dropped, per transport.
        let dropped = |transport| {
            metrics
                .telemetry
                .get_or_create(&crate::metrics::TelemetryLabels {
                    transport,
                    signal: "traces",
                    outcome: "dropped",
                })
                .get()
        };
        assert_eq!((dropped("http"), dropped("grpc")), (1, 1));
        // The task path has its own channel: it is not refused.
        fleet.task_event(TaskEvent::Queue {
            pool: "p".into(),
            pending: 1,
            ack_pending: 0,
        });
        assert_eq!(fleet.counters.task_events_dropped.get(), 0);
    }
}
