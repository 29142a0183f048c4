//! The one error type of the API and its RFC 9457 problem+json form, with a stable `code`
//! for every kind of error.

use std::time::Duration;

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Media type of error bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// Where the field is: a JSON path (`members[0].role`), a query parameter or a path segment.
    pub field: String,
    /// The rule it breaks, stable and machine-readable (`required`, `unknown_field`, `format`, ...).
    pub rule: String,
    /// A sentence for people.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, rule: &str, message: impl Into<String>) -> Self {
        Self { field: field.into(), rule: rule.to_owned(), message: message.into() }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// Stable machine-readable code.
    pub code: String,
    /// What went wrong this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Invalid fields, for validation problems.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// The action that was denied, for authorization problems.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The resource the denied action was on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The request id, to quote when reporting a problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not syntactically valid JSON.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// The body is not of a media type the route accepts.
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// The body is larger than allowed.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Fields of the body, query or path are invalid.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// A path parameter could not be parsed.
    #[error("invalid path parameter")]
    InvalidPath(Vec<FieldError>),
    /// The query string could not be parsed.
    #[error("invalid query")]
    InvalidQuery(Vec<FieldError>),
    /// No or unusable credentials.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// Wrong e-mail or password.
    #[error("invalid e-mail or password")]
    InvalidCredentials,
    /// A rotated refresh token was presented again; its family is revoked.
    #[error("refresh token reused")]
    RefreshTokenReused,
    /// The principal may not perform the action on the resource.
    #[error("not allowed to {action} on {resource}")]
    Forbidden {
        /// The action name (`tenants:UpdateTenant`).
        action: String,
        /// The resource name (`nrn:nimbus:...`).
        resource: String,
    },
    /// Nothing of this kind that the caller can see.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// No route with this path.
    #[error("no such route")]
    RouteNotFound,
    /// The route exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request conflicts with the current state.
    #[error("{message}")]
    Conflict {
        /// Stable code.
        code: &'static str,
        /// Explanation.
        message: String,
    },
    /// An `If-Match` precondition does not hold: someone changed the resource since it was read.
    #[error("the resource changed since it was read (ETag {current} does not match If-Match)")]
    PreconditionFailed {
        /// The current ETag.
        current: String,
    },
    /// An update that needs `If-Match` came without it.
    #[error("this update needs an If-Match header with the ETag the change is based on (or `*`)")]
    PreconditionRequired,
    /// A code package is not acceptable; every problem is named.
    #[error("invalid package")]
    InvalidPackage(Vec<FieldError>),
    /// This deployment does not offer the feature (for example presigned uploads without S3).
    #[error("{message}")]
    NotSupported {
        /// Stable code.
        code: &'static str,
        /// Explanation.
        message: String,
    },
    /// The same `Idempotency-Key` was used with a different request.
    #[error("Idempotency-Key reused with a different request")]
    IdempotencyKeyReused,
    /// Too many requests; try again later.
    #[error("too many requests")]
    TooManyRequests {
        /// Stable code.
        code: &'static str,
        /// When to try again.
        retry_after: Duration,
    },
    /// The request took longer than the server allows.
    #[error("request timed out")]
    Timeout,
    /// Anything unexpected; logged with its cause, opaque to the caller.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(anyhow::Error::new(e))
    }
}

impl ApiError {
    /// A validation error on one field.
    pub fn field(field: impl Into<String>, rule: &str, message: impl Into<String>) -> Self {
        ApiError::Validation(vec![FieldError::new(field, rule, message)])
    }

    /// A conflict with a stable code.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Conflict { code, message: message.into() }
    }

    /// The status code and the stable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError::*;
        match self {
            MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path_parameter"),
            InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            InvalidCredentials => (StatusCode::UNAUTHORIZED, "invalid_credentials"),
            RefreshTokenReused => (StatusCode::UNAUTHORIZED, "refresh_token_reused"),
            Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            RouteNotFound => (StatusCode::NOT_FOUND, "route_not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Conflict { code, .. } => (StatusCode::CONFLICT, code),
            PreconditionFailed { .. } => (StatusCode::PRECONDITION_FAILED, "precondition_failed"),
            PreconditionRequired => (StatusCode::PRECONDITION_REQUIRED, "precondition_required"),
            InvalidPackage(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_package"),
            NotSupported { code, .. } => (StatusCode::NOT_IMPLEMENTED, code),
            IdempotencyKeyReused => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            TooManyRequests { code, .. } => (StatusCode::TOO_MANY_REQUESTS, code),
            Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let (status, code) = self.status_and_code();
        let mut p = Problem {
            problem_type: format!("https://nimbus.dev/problems/{}", code.replace('_', "-")),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            code: code.to_owned(),
            detail: None,
            errors: Vec::new(),
            action: None,
            resource: None,
            request_id: None,
        };
        match self {
            ApiError::Validation(errors)
            | ApiError::InvalidPath(errors)
            | ApiError::InvalidQuery(errors)
            | ApiError::InvalidPackage(errors) => {
                p.detail =
                    Some(errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "));
                p.errors = errors.clone();
            }
            ApiError::Forbidden { action, resource } => {
                p.detail = Some(self.to_string());
                p.action = Some(action.clone());
                p.resource = Some(resource.clone());
            }
            // The cause of an internal error is logged, never shown.
            ApiError::Internal(_) => p.detail = Some("an internal error occurred".to_owned()),
            _ => p.detail = Some(self.to_string()),
        }
        p
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = ?e, "internal error");
        }
        let retry_after = match &self {
            ApiError::TooManyRequests { retry_after, .. } => Some(retry_after.as_secs().max(1)),
            _ => None,
        };
        let problem = self.problem();
        let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut res = (status, Json(problem)).into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

/// Result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;

/// Maps a constraint violation to the error named for its constraint; other errors pass through.
pub fn on_constraint<const N: usize>(e: sqlx::Error, map: [(&str, ApiError); N]) -> ApiError {
    let name = match &e {
        sqlx::Error::Database(db) => db.constraint().map(str::to_owned),
        _ => None,
    };
    name.and_then(|name| map.into_iter().find(|(c, _)| *c == name).map(|(_, err)| err)).unwrap_or_else(|| e.into())
}
