//! Who may call what. Every route declares the roles it admits in [`ROUTES`] (one table:
//! the middleware reads it, a test checks every route of the router is in it, and
//! docs/api.md prints it). A caller proves a role with `Authorization: Bearer <token>`; a
//! browser's WebSocket, which cannot set that header, offers the token as the subprotocol
//! `bearer.<token>`. Tokens come from environment variables named in `[[auth.tokens]]`,
//! are compared in constant time and never logged.
//!
//! With no tokens configured the commander is in local mode: every caller may do
//! everything, and `serve` refuses to bind anything but loopback unless told otherwise.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
pub use crate::config::Role;
use crate::config::Role::{Compliance, Operator, Producer, Viewer};

/// What a route admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health probes, and the dashboard's shell (its data needs a token).
    Public,
    /// A caller holding one of these roles.
    Roles(&'static [Role]),
}

const READ: Access = Access::Roles(&[Viewer, Operator, Compliance]);
const ACT: Access = Access::Roles(&[Operator]);
const POLICY: Access = Access::Roles(&[Compliance]);
const SUBMIT: Access = Access::Roles(&[Producer]);
const TASK: Access = Access::Roles(&[Viewer, Operator, Compliance, Producer]);

/// Every route: method, path as the router names it, and who may call it.
pub const ROUTES: &[(&str, &str, Access)] = &[
    ("GET", "/healthz", Access::Public),
    ("GET", "/readyz", Access::Public),
    ("GET", "/", Access::Public),
    ("GET", "/ui/{*file}", Access::Public),
    ("GET", "/v1/whoami", TASK),
    ("GET", "/metrics", READ),
    ("POST", "/v1/tasks", SUBMIT),
    ("GET", "/v1/tasks", READ),
    ("GET", "/v1/tasks/{id}", TASK),
    ("GET", "/v1/tasks/{id}/result", TASK),
    ("GET", "/v1/fleet", READ),
    ("GET", "/v1/workers", READ),
    ("GET", "/v1/workers/{id}", READ),
    ("GET", "/v1/pools", READ),
    ("GET", "/v1/costs", READ),
    ("GET", "/v1/models", READ),
    ("GET", "/v1/decisions", READ),
    ("GET", "/v1/decisions/{task_id}", READ),
    ("GET", "/v1/classifier", READ),
    ("GET", "/v1/traces", READ),
    ("GET", "/v1/traces/{trace_id}", READ),
    ("GET", "/v1/alerts", READ),
    ("GET", "/v1/alerts/sinks", READ),
    ("GET", "/v1/silences", READ),
    ("POST", "/v1/silences", ACT),
    ("DELETE", "/v1/silences/{id}", ACT),
    ("GET", "/v1/interventions", READ),
    ("POST", "/v1/interventions/{id}/revert", ACT),
    ("GET", "/v1/policy", READ),
    ("PUT", "/v1/policy", POLICY),
    ("POST", "/v1/policy/check", POLICY),
    ("POST", "/v1/policy/replay", POLICY),
    ("GET", "/v1/policy/history", READ),
    ("GET", "/v1/policy/history/{version}", READ),
    ("GET", "/v1/stream", READ),
    ("GET", "/v1/control", ACT),
    ("POST", "/v1/control", ACT),
    ("GET", "/v1/control/audit", READ),
    ("GET", "/v1/control/state", READ),
];

/// The access a route declares; `None` for a path the router does not have.
pub fn access(method: &Method, path: &str) -> Option<Access> {
    // HEAD is answered like GET by the router.
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    ROUTES
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
        .map(|(_, _, a)| *a)
}

/// Who is calling, as the handlers and the audit see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's `name` (`local` in local mode).
    pub name: String,
    /// `None` in local mode: every role.
    pub role: Option<Role>,
}

impl Caller {
    pub fn local() -> Self {
        Caller {
            name: "local".into(),
            role: None,
        }
    }

    /// The caller the middleware handed a handler (none: a router without it, local).
    pub fn of(handed: Option<axum::Extension<Caller>>) -> Self {
        handed.map_or_else(Caller::local, |axum::Extension(c)| c)
    }

    /// Whether this caller may do what `access` admits.
    pub fn may(&self, access: Access) -> bool {
        match (access, self.role) {
            (Access::Public, _) | (_, None) => true,
            (Access::Roles(roles), Some(r)) => roles.contains(&r),
        }
    }

    /// The roles this caller holds, for the dashboard to hide what it may not do.
    pub fn roles(&self) -> Vec<&'static str> {
        match self.role {
            None => Role::ALL.iter().map(|r| r.as_str()).collect(),
            Some(r) => vec![r.as_str()],
        }
    }
}

/// The tokens in force.
#[derive(Clone)]
pub struct Keys {
    tokens: Arc<Vec<(String, Role, String)>>,
}

impl std::fmt::Debug for Keys {
    // Never print a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field(
                "tokens",
                &self
                    .tokens
                    .iter()
                    .map(|(n, r, _)| (n.as_str(), r.as_str()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keys {
    /// `tokens`: (name, role, secret). The compliance token of `policy.compliance_token_env`
    /// joins as a compliance token named `compliance` when other tokens exist (alone, it
    /// only guards policy pushes, as before roles).
    pub fn new(mut tokens: Vec<(String, Role, String)>, compliance: Option<String>) -> Self {
        if !tokens.is_empty()
            && let Some(c) = compliance
            && !tokens.iter().any(|(_, _, t)| *t == c)
        {
            tokens.push(("compliance".into(), Compliance, c));
        }
        Keys {
            tokens: Arc::new(tokens),
        }
    }

    /// No tokens: every caller may do everything.
    pub fn local_mode(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The caller a token proves, if any. Every configured token is compared, each in
    /// constant time, so the time taken says nothing about which one nearly matched.
    pub fn caller(&self, token: &str) -> Option<Caller> {
        let mut found = None;
        for (name, role, secret) in self.tokens.iter() {
            if crate::domain::constant_time_eq(token.as_bytes(), secret.as_bytes())
                && found.is_none()
            {
                found = Some(Caller {
                    name: name.clone(),
                    role: Some(*role),
                });
            }
        }
        found
    }
}

/// The bearer token a request offers: the `Authorization` header, else (a browser's
/// WebSocket) a `bearer.<token>` entry of `Sec-WebSocket-Protocol`.
pub fn offered_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(a) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return a
            .strip_prefix("Bearer ")
            .or_else(|| a.strip_prefix("bearer "))
            .map(str::trim);
    }
    headers
        .get(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())?
        .split(',')
        .find_map(|p| p.trim().strip_prefix("bearer."))
}

/// The middleware: answers 401 (no or unknown token) or 403 (a role the route does not
/// admit) before the handler runs, and hands the handler the [`Caller`].
pub async fn authorise(
    State(s): State<AppState>,
    matched: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(path) = matched else {
        // Not a route: the fallback answers 404 or 405.
        return next.run(req).await;
    };
    let Some(access) = access(req.method(), path.as_str()) else {
        // A method the route does not have: the router answers 405.
        return next.run(req).await;
    };
    let caller = if s.auth.local_mode() {
        Caller::local()
    } else if access == Access::Public {
        Caller {
            name: "anonymous".into(),
            role: Some(Viewer),
        }
    } else {
        let Some(token) = offered_token(req.headers()) else {
            s.core.metrics.auth_refused("missing_token");
            return ApiError::Unauthorized(
                "this endpoint needs a bearer token (Authorization: Bearer …)".into(),
            )
            .into_response();
        };
        let Some(caller) = s.auth.caller(token) else {
            s.core.metrics.auth_refused("unknown_token");
            tracing::warn!(
                path = path.as_str(),
                "request with an unknown token refused"
            );
            return ApiError::Unauthorized("unknown token".into()).into_response();
        };
        if !caller.may(access) {
            s.core.metrics.auth_refused("wrong_role");
            let Access::Roles(roles) = access else {
                return next.run(req).await;
            };
            let need: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            return ApiError::Forbidden(format!(
                "{} {} needs the role {}; {} holds {}",
                req.method(),
                path.as_str(),
                need.join(" or "),
                caller.name,
                caller.roles().join(", ")
            ))
            .into_response();
        }
        caller
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Who is asking, as `Fleet-Identity` says (else `http`).
pub fn identity(h: &HeaderMap) -> String {
    h.get("fleet-identity")
        .or_else(|| h.get("x-fleet-identity"))
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .unwrap_or("http")
        .to_string()
}

/// Who did it, for an audit: the token's name, and the `fleet-identity` header when the
/// caller sent one (`oncall (alice)`); in local mode the header alone, or `http`.
pub fn who(caller: Option<axum::Extension<Caller>>, headers: &HeaderMap) -> String {
    let c = Caller::of(caller);
    let named = Some(identity(headers)).filter(|i| i != "http");
    match (c.role, named) {
        // Local mode: as before roles, the header or `http`.
        (None, _) => identity(headers),
        (Some(_), Some(i)) if i != c.name => format!("{} ({i})", c.name),
        (Some(_), _) => c.name,
    }
}

/// `GET /v1/whoami`: the caller's name and roles, and whether the commander is in local
/// mode (the dashboard hides what the role may not do).
pub async fn whoami(
    State(s): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
) -> Response {
    let c = Caller::of(caller);
    axum::Json(serde_json::json!({
        "name": c.name,
        "roles": c.roles(),
        "local_mode": s.auth.local_mode(),
    }))
    .into_response()
}

/// The route table as a Markdown matrix (docs/api.md carries it; a test keeps the two
/// the same).
pub fn matrix() -> String {
    let mut out = String::from("| method | path | viewer | operator | compliance | producer |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for (m, p, a) in ROUTES {
        let cells: Vec<&str> = Role::ALL
            .iter()
            .map(|r| match a {
                Access::Public => "public",
                Access::Roles(rs) if rs.contains(r) => "yes",
                Access::Roles(_) => "—",
            })
            .collect();
        out.push_str(&format!("| {m} | `{p}` | {} |\n", cells.join(" | ")));
    }
    out
}
