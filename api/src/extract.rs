//! Request extractors whose rejections are problem+json: JSON bodies (content type, size,
//! syntax, unknown fields, field rules), path parameters and query strings.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts},
};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, FieldError};

/// A JSON request body. Request types use `#[serde(deny_unknown_fields)]` and validated
/// newtypes, so a value of this type is already valid.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        if !is_json(&content_type) {
            return Err(ApiError::UnsupportedMediaType(if content_type.is_empty() {
                "expected Content-Type: application/json".to_owned()
            } else {
                format!("expected Content-Type: application/json, got {content_type}")
            }));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit: body_limit_hint() }
            } else {
                ApiError::MalformedJson(rejection.body_text())
            }
        })?;
        parse_json(&bytes).map(Json)
    }
}

/// Parses a JSON body, telling syntax errors (400) from data errors (422 naming the field).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            use serde_json::error::Category;
            match inner.classify() {
                Category::Syntax | Category::Eof | Category::Io => Err(ApiError::MalformedJson(inner.to_string())),
                Category::Data => Err(ApiError::Validation(vec![field_error(&path, &inner)])),
            }
        }
    }
}

fn field_error(path: &str, err: &serde_json::Error) -> FieldError {
    // serde_json appends " at line L column C"; the field path says where more usefully.
    let msg = err.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
    let (field, rule) = if let Some(rest) = msg.strip_prefix("unknown field `") {
        // serde_path_to_error's path already ends with the unknown key.
        let name = rest.split('`').next().unwrap_or("");
        let field =
            if path == name || path.ends_with(&format!(".{name}")) { path.to_owned() } else { join_path(path, name) };
        (field, "unknown_field")
    } else if let Some(rest) = msg.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or("");
        (join_path(path, name), "required")
    } else if msg.starts_with("invalid type") {
        (path_or_body(path), "type")
    } else if msg.starts_with("unknown variant") {
        (path_or_body(path), "enum")
    } else {
        (path_or_body(path), "format")
    };
    FieldError::new(field, rule, msg)
}

fn join_path(path: &str, name: &str) -> String {
    if path == "." || path.is_empty() { name.to_owned() } else { format!("{path}.{name}") }
}

fn path_or_body(path: &str) -> String {
    if path == "." || path.is_empty() { "body".to_owned() } else { path.to_owned() }
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The configured body limit, for error messages; set once at startup.
static BODY_LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Records the configured body limit so that 413 problems can name it.
pub fn set_body_limit_hint(limit: usize) {
    let _ = BODY_LIMIT.set(limit);
}

fn body_limit_hint() -> usize {
    BODY_LIMIT.get().copied().unwrap_or(0)
}

/// Path parameters; a value that does not parse (say, a malformed id) is a 400 naming it.
#[derive(Debug, Clone, Copy)]
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                use axum::extract::path::ErrorKind;
                let field = match e.kind() {
                    ErrorKind::ParseErrorAtKey { key, .. }
                    | ErrorKind::InvalidUtf8InPathParam { key }
                    | ErrorKind::DeserializeError { key, .. } => key.clone(),
                    ErrorKind::ParseErrorAtIndex { index, .. } => format!("{index}"),
                    _ => "path".to_owned(),
                };
                Err(ApiError::InvalidPath(vec![FieldError::new(field, "format", e.body_text())]))
            }
            Err(other) => Err(ApiError::Internal(anyhow::anyhow!("path extraction: {other}"))),
        }
    }
}

/// A query string; unknown or malformed parameters are a 400 naming them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(Query).map_err(|err| {
            let path = err.path().to_string();
            let msg = err.inner().to_string();
            let (field, rule) = if let Some(rest) = msg.strip_prefix("unknown field `") {
                (rest.split('`').next().unwrap_or("").to_owned(), "unknown_field")
            } else {
                (path_or_body(&path).replace("body", "query"), "format")
            };
            ApiError::InvalidQuery(vec![FieldError::new(field, rule, msg)])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        size: u32,
    }

    fn field_of(json: &str) -> FieldError {
        match parse_json::<Body>(json.as_bytes()) {
            Err(ApiError::Validation(mut v)) => v.remove(0),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn body_errors_name_the_field_and_rule() {
        let check = |json: &str, field: &str, rule: &str| {
            let e = field_of(json);
            assert_eq!((e.field.as_str(), e.rule.as_str()), (field, rule), "{json}: {e:?}");
        };
        check(r#"{"name":"a","extra":1}"#, "extra", "unknown_field");
        check(r#"{}"#, "name", "required");
        check(r#"{"name":1}"#, "name", "type");
        check(r#"{"name":"a","inner":{"size":"x"}}"#, "inner.size", "type");
        check(r#"{"name":"a","inner":{"size":1,"b":2}}"#, "inner.b", "unknown_field");
    }

    #[test]
    fn syntax_errors_are_malformed_json() {
        assert!(matches!(parse_json::<Body>(b"{\"name\":"), Err(ApiError::MalformedJson(_))));
        assert!(matches!(parse_json::<Body>(b"nope"), Err(ApiError::MalformedJson(_))));
    }

    #[test]
    fn json_media_types() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
    }
}
