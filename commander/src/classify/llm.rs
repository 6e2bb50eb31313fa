//! The classifier's LLM clients: OpenAI-compatible `/v1/chat/completions` (OpenAI, vLLM,
//! Ollama, llama.cpp server, LiteLLM …) and Anthropic `/v1/messages`. One request per
//! call; retries, the breaker and the cache live in [`super::Classifier`].

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

pub use crate::domain::Protocol;

/// Why one request gave no usable text.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("HTTP {status}: {body}")]
    Status {
        status: u16,
        body: String,
        /// From `Retry-After`, when the server sent one.
        retry_after: Option<Duration>,
    },
    /// The HTTP exchange worked but the body is not the protocol's response shape.
    #[error("unreadable response: {0}")]
    Protocol(String),
    #[error("request failed: {0}")]
    Other(String),
}

impl CallError {
    /// Worth trying again: the service is busy or briefly unreachable.
    pub fn retryable(&self) -> bool {
        match self {
            CallError::Timeout(_) | CallError::Connect(_) => true,
            // 408 request timeout, 409 lock, 429 rate limit, 5xx incl. Anthropic's 529.
            CallError::Status { status, .. } => matches!(status, 408 | 409 | 429) || *status >= 500,
            CallError::Protocol(_) | CallError::Other(_) => false,
        }
    }

    /// A stable short code for counters and decisions.
    pub fn code(&self) -> &'static str {
        match self {
            CallError::Timeout(_) => "timeout",
            CallError::Connect(_) => "connect",
            CallError::Status { status: 429, .. } => "rate_limited",
            CallError::Status { status, .. } if *status >= 500 => "server_error",
            CallError::Status { .. } => "client_error",
            CallError::Protocol(_) => "bad_response",
            CallError::Other(_) => "other",
        }
    }
}

/// What one successful call returned.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub text: String,
    /// The model that answered, as the provider names it.
    pub model: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

/// One endpoint.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    protocol: Protocol,
    url: String,
    api_key: Option<String>,
    pub model: String,
    max_tokens: u32,
}

impl std::fmt::Debug for LlmClient {
    /// Everything but the key, which never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient")
            .field("protocol", &self.protocol)
            .field("url", &self.url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl LlmClient {
    /// `endpoint` is the base URL (`https://api.openai.com`, `http://localhost:11434`);
    /// a trailing `/v1` is accepted too.
    pub fn new(
        protocol: Protocol,
        endpoint: &str,
        model: String,
        api_key: Option<String>,
        max_tokens: u32,
    ) -> Result<Self, CallError> {
        let base = endpoint.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        let url = match protocol {
            Protocol::Openai => format!("{base}/v1/chat/completions"),
            Protocol::Anthropic => format!("{base}/v1/messages"),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| CallError::Other(e.to_string()))?;
        Ok(Self {
            http,
            protocol,
            url,
            api_key,
            model,
            max_tokens,
        })
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// host:port, for `server.address` on the span (never the key).
    pub fn server(&self) -> String {
        self.url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_default()
            .to_string()
    }

    /// One request, bounded by `timeout`.
    pub async fn call(
        &self,
        system: &str,
        user: &str,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let body = match self.protocol {
            Protocol::Openai => json!({
                "model": self.model,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": user},
                ],
                "temperature": 0,
                "max_tokens": self.max_tokens,
                "response_format": {"type": "json_object"},
            }),
            Protocol::Anthropic => json!({
                "model": self.model,
                "system": system,
                "messages": [{"role": "user", "content": user}],
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }),
        };
        let mut req = self.http.post(&self.url).timeout(timeout).json(&body);
        match (self.protocol, &self.api_key) {
            (Protocol::Openai, Some(k)) => req = req.bearer_auth(k),
            (Protocol::Anthropic, Some(k)) => req = req.header("x-api-key", k),
            (_, None) => {}
        }
        if self.protocol == Protocol::Anthropic {
            req = req.header("anthropic-version", "2023-06-01");
        }
        let resp = req
            .send()
            .await
            .map_err(|e| classify_send_error(e, timeout))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| classify_send_error(e, timeout))?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
            return Err(CallError::Status {
                status: status.as_u16(),
                body,
                retry_after,
            });
        }
        match self.protocol {
            Protocol::Openai => parse_openai(&bytes),
            Protocol::Anthropic => parse_anthropic(&bytes),
        }
    }
}

fn classify_send_error(e: reqwest::Error, timeout: Duration) -> CallError {
    if e.is_timeout() {
        CallError::Timeout(timeout)
    } else if e.is_connect() {
        CallError::Connect(e.to_string())
    } else {
        CallError::Other(e.to_string())
    }
}

#[derive(Deserialize)]
struct OpenaiResponse {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<OpenaiChoice>,
    #[serde(default)]
    usage: Option<OpenaiUsage>,
}
#[derive(Deserialize)]
struct OpenaiChoice {
    message: OpenaiMessage,
}
#[derive(Deserialize)]
struct OpenaiMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}
#[derive(Deserialize)]
struct OpenaiUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

fn parse_openai(bytes: &[u8]) -> Result<Reply, CallError> {
    let r: OpenaiResponse =
        serde_json::from_slice(bytes).map_err(|e| CallError::Protocol(e.to_string()))?;
    let Some(choice) = r.choices.into_iter().next() else {
        return Err(CallError::Protocol("no choices".into()));
    };
    let text = match (choice.message.content, choice.message.refusal) {
        (Some(t), _) => t,
        (None, Some(refusal)) => return Err(CallError::Protocol(format!("refused: {refusal}"))),
        (None, None) => return Err(CallError::Protocol("no content".into())),
    };
    Ok(Reply {
        text,
        model: r.model,
        input_tokens: r.usage.as_ref().and_then(|u| u.prompt_tokens),
        output_tokens: r.usage.as_ref().and_then(|u| u.completion_tokens),
    })
}

#[derive(Deserialize)]
struct AnthropicResponse {
    #[serde(default)]
    model: Option<String>,
    content: Vec<AnthropicBlock>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}
#[derive(Deserialize)]
struct AnthropicBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}
#[derive(Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

fn parse_anthropic(bytes: &[u8]) -> Result<Reply, CallError> {
    let r: AnthropicResponse =
        serde_json::from_slice(bytes).map_err(|e| CallError::Protocol(e.to_string()))?;
    let text: String = r
        .content
        .iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text.as_deref())
        .collect();
    if text.is_empty() {
        return Err(CallError::Protocol("no text block".into()));
    }
    Ok(Reply {
        text,
        model: r.model,
        input_tokens: r.usage.as_ref().and_then(|u| u.input_tokens),
        output_tokens: r.usage.as_ref().and_then(|u| u.output_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let c = LlmClient::new(
            Protocol::Anthropic,
            "https://api.anthropic.com/v1/",
            "claude-haiku-4-5".into(),
            Some("sk-ant-very-secret".into()),
            100,
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(
            shown.contains("https://api.anthropic.com/v1/messages"),
            "{shown}"
        );
        assert_eq!(c.server(), "api.anthropic.com");
    }
}
