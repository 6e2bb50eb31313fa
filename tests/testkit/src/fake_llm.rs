//! A local LLM service for tests: speaks OpenAI `/v1/chat/completions` and Anthropic
//! `/v1/messages` over real HTTP, and answers from a script — classifications, slow
//! answers, rate limits, server errors, garbage. Runs on its own thread and runtime so
//! that sync and async tests can both use it; stops on drop.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// What the server does for one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this text as the assistant's message (a classification JSON, or not).
    Text(String),
    /// Waits, then does the inner reply.
    Slow(Duration, Box<Reply>),
    /// This status with a small error body; `retry_after` sets the header (seconds).
    Status(u16, Option<u64>),
    /// 200 with this raw body (not the protocol's shape).
    RawBody(String),
    /// OpenAI-style refusal (content null, refusal set); for Anthropic, an empty content list.
    Refusal,
}

impl Reply {
    /// A well-formed classification answer.
    pub fn classification(task_type: &str, tier: &str, caps: &[&str], confidence: f64) -> Self {
        Reply::Text(
            json!({
                "task_type": task_type,
                "tier": tier,
                "capabilities": caps,
                "estimated_input_tokens": 1200,
                "estimated_output_tokens": 300,
                "confidence": confidence,
            })
            .to_string(),
        )
    }
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `openai` or `anthropic`.
    pub protocol: &'static str,
    pub body: Value,
    /// The user message text.
    pub user: String,
    pub authorization: Option<String>,
    pub api_key: Option<String>,
    pub anthropic_version: Option<String>,
}

#[derive(Debug, Default)]
struct Script {
    /// (needle in the user message, replies in order; the last one repeats).
    rules: Vec<(String, Vec<Reply>, usize)>,
    default: Option<Reply>,
    /// Replies for the next requests whatever they say, before rules apply.
    queue: std::collections::VecDeque<Reply>,
    seen: Vec<Seen>,
}

/// The running server.
#[derive(Debug)]
pub struct FakeLlm {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Tokens the fake reports per call.
pub const USAGE_INPUT: u64 = 410;
pub const USAGE_OUTPUT: u64 = 42;

impl FakeLlm {
    pub fn start() -> std::io::Result<Self> {
        let script = Arc::new(Mutex::new(Script::default()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let s = script.clone();
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let app = Router::new()
                    .route("/v1/chat/completions", post(handle))
                    .route("/v1/messages", post(handle))
                    .with_state(s);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        Ok(Self {
            addr,
            script,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:38211`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests whose user message contains `needle` get `replies` in turn (the last repeats).
    pub fn on(&self, needle: &str, replies: Vec<Reply>) -> &Self {
        if let Ok(mut s) = self.script.lock() {
            s.rules.push((needle.to_string(), replies, 0));
        }
        self
    }

    /// What requests matching no rule get (default: a 500).
    pub fn otherwise(&self, reply: Reply) -> &Self {
        if let Ok(mut s) = self.script.lock() {
            s.default = Some(reply);
        }
        self
    }

    /// The next requests get these, in order, whatever they ask.
    pub fn then(&self, replies: Vec<Reply>) -> &Self {
        if let Ok(mut s) = self.script.lock() {
            s.queue.extend(replies);
        }
        self
    }

    /// Forgets the rules, the queue and the requests seen.
    pub fn reset(&self) {
        if let Ok(mut s) = self.script.lock() {
            *s = Script::default();
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.script
            .lock()
            .map(|s| s.seen.clone())
            .unwrap_or_default()
    }

    pub fn requests(&self) -> usize {
        self.script.lock().map(|s| s.seen.len()).unwrap_or(0)
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(
    State(script): State<Arc<Mutex<Script>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let protocol = if uri.path().ends_with("/messages") {
        "anthropic"
    } else {
        "openai"
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let user = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string();
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let reply = {
        let Ok(mut s) = script.lock() else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        s.seen.push(Seen {
            protocol,
            body: body.clone(),
            user: user.clone(),
            authorization: h("authorization"),
            api_key: h("x-api-key"),
            anthropic_version: h("anthropic-version"),
        });
        if let Some(r) = s.queue.pop_front() {
            r
        } else if let Some((_, replies, n)) = s
            .rules
            .iter_mut()
            .find(|(needle, _, _)| user.contains(needle.as_str()))
        {
            let r = replies[(*n).min(replies.len() - 1)].clone();
            *n += 1;
            r
        } else {
            s.default.clone().unwrap_or(Reply::Status(500, None))
        }
    };
    let model = body["model"].as_str().unwrap_or("unknown").to_string();
    respond(protocol, &model, reply).await
}

fn respond(
    protocol: &'static str,
    model: &str,
    reply: Reply,
) -> std::pin::Pin<Box<dyn Future<Output = Response> + Send>> {
    let model = model.to_string();
    Box::pin(async move {
        match reply {
            Reply::Slow(d, inner) => {
                tokio::time::sleep(d).await;
                respond(protocol, &model, *inner).await
            }
            Reply::Status(code, retry_after) => {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut resp = (
                    status,
                    axum::Json(json!({"error": {"type": "scripted", "message": format!("scripted {code}")}})),
                )
                    .into_response();
                if let Some(s) = retry_after
                    && let Ok(v) = s.to_string().parse()
                {
                    resp.headers_mut().insert("retry-after", v);
                }
                resp
            }
            Reply::RawBody(b) => (StatusCode::OK, [("content-type", "application/json")], b).into_response(),
            Reply::Refusal => match protocol {
                "anthropic" => axum::Json(json!({
                    "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": "refusal",
                    "usage": {"input_tokens": USAGE_INPUT, "output_tokens": 0}
                }))
                .into_response(),
                _ => axum::Json(json!({
                    "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": "I can't help with that."}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": USAGE_INPUT, "completion_tokens": 0, "total_tokens": USAGE_INPUT}
                }))
                .into_response(),
            },
            Reply::Text(text) => match protocol {
                "anthropic" => axum::Json(json!({
                    "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                    "usage": {"input_tokens": USAGE_INPUT, "output_tokens": USAGE_OUTPUT}
                }))
                .into_response(),
                _ => axum::Json(json!({
                    "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": USAGE_INPUT, "completion_tokens": USAGE_OUTPUT, "total_tokens": USAGE_INPUT + USAGE_OUTPUT}
                }))
                .into_response(),
            },
        }
    })
}
