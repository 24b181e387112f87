//! The admin endpoint: HTTP on loopback, every request with the configured
//! token (`Authorization: Bearer …`). `usher sessions` and `usher kick`
//! talk to it.
//!
//! - `GET /sessions` — live sessions of this server, as JSON;
//! - `POST /kick` — body `{"user": …}`, `{"backend": …}` or `{"client": …}`
//!   (an IP address); answers `{"kicked": n}`;
//! - `GET /health` — what this server believes of each backend;
//! - `GET /metrics` — Prometheus text format (see [`crate::metrics`]).

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::server::Shared;
use crate::sessions::Selector;
use crate::store::canonical_login;

/// What `POST /kick` takes: exactly one of the three.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KickRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KickReply {
    pub kicked: usize,
}

/// Serves the endpoint on `listener` until the process stops.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) -> std::io::Result<()> {
    let prometheus = crate::metrics::install();
    let scrape_shared = shared.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || async move {
                match &prometheus {
                    Some(handle) => crate::metrics::render(&scrape_shared, handle).into_response(),
                    None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                }
            }),
        )
        .route("/sessions", get(sessions))
        .route("/kick", post(kick))
        .route("/health", get(health))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authorize))
        .with_state(shared);
    axum::serve(listener, app).await
}

async fn authorize(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let Some(admin) = &shared.config.admin else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !same(given.as_bytes(), admin.token.expose().as_bytes()) {
        tracing::warn!("admin request with a wrong or missing token");
        return (StatusCode::UNAUTHORIZED, "wrong or missing token\n").into_response();
    }
    next.run(request).await
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn sessions(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json(shared.sessions.list())
}

async fn health(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json(shared.health.list())
}

async fn kick(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<KickRequest>,
) -> Result<Json<KickReply>, (StatusCode, String)> {
    let bad = |m: &str| (StatusCode::BAD_REQUEST, format!("{m}\n"));
    let selector = match (req.user, req.backend, req.client) {
        (Some(u), None, None) => {
            // An alias names its user; an unknown name may still have
            // sessions (removed since), so it is taken as given.
            let user = match shared.store.find_user(&u).await {
                Ok(Some(found)) => found.login,
                _ => canonical_login(&u),
            };
            Selector::User(user)
        }
        (None, Some(b), None) => Selector::Backend(b),
        (None, None, Some(c)) => Selector::Client(c.parse::<IpAddr>().map_err(|_| {
            bad(&format!(
                "client: {c:?} is not an IP address (give it without a port)"
            ))
        })?),
        _ => return Err(bad("give exactly one of user, backend, client")),
    };
    let kicked = shared.sessions.kick(&selector);
    tracing::info!(?selector, kicked, "kick from the admin endpoint");
    Ok(Json(KickReply { kicked }))
}
