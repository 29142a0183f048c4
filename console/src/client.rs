//! The console's way to the REST API: requests sent in-process through the API router, with
//! the signed-in user's token, exactly as an external client would send them.

use axum::{
    Router,
    body::{Body, to_bytes},
    http::{Method, Request, StatusCode, header},
};
use serde_json::Value;
use tower::ServiceExt;

/// Largest API response the console reads.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// A handle on the REST API.
#[derive(Clone)]
pub struct Api(pub Router);

impl Api {
    /// Sends a request; returns the status and the JSON body (`Null` when there is none).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let Ok(req) = req.body(body) else {
            return (StatusCode::INTERNAL_SERVER_ERROR, Value::Null);
        };
        let res = match self.0.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = res.status();
        let bytes = to_bytes(res.into_body(), MAX_RESPONSE).await.unwrap_or_default();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}
