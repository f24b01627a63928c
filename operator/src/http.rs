//! `/metrics` (Prometheus text format), `/healthz` and `/readyz` (the
//! process serves; the body says whether this replica leads, so a standby
//! replica counts as ready and does not hold up a rollout).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::error::RunError;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    /// Whether the controllers run in this replica.
    pub active: Arc<AtomicBool>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

pub async fn serve(addr: SocketAddr, state: HttpState) -> Result<(), RunError> {
    let failed = |source| RunError::Http { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(failed)?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(state)).await.map_err(failed)
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn ready(State(state): State<HttpState>) -> impl IntoResponse {
    let role = if state.active.load(Ordering::Relaxed) {
        "leading"
    } else {
        "standby"
    };
    (StatusCode::OK, role)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(state: &HttpState, path: &str) -> (StatusCode, String) {
        let request = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router(state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn serves_metrics_health_and_role() {
        let state = HttpState {
            metrics: Arc::new(Metrics::default()),
            active: Arc::new(AtomicBool::new(false)),
        };
        state
            .metrics
            .reconciled("sandbox", std::time::Duration::from_millis(1));
        let (status, body) = get(&state, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("sandfork_reconciles_total{controller=\"sandbox\"} 1"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(get(&state, "/healthz").await, (StatusCode::OK, "ok".into()));
        assert_eq!(
            get(&state, "/readyz").await,
            (StatusCode::OK, "standby".into())
        );
        state.active.store(true, Ordering::Relaxed);
        assert_eq!(
            get(&state, "/readyz").await,
            (StatusCode::OK, "leading".into())
        );
        assert_eq!(get(&state, "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
