//! Authentication: who is calling (a user with an access token, an API key, or a function's
//! execution role with a role credential) and from where.

pub mod keys;
pub mod password;
pub mod secret;
pub mod session;
pub mod throttle;

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{HeaderMap, header, request::Parts},
};
use uuid::Uuid;

use crate::{api_keys, authz::Role, error::ApiError, startup::AppState};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A user with an access token.
    User {
        /// The user.
        user_id: Uuid,
        /// The session (refresh-token family) the token belongs to.
        session_id: Uuid,
    },
    /// An API key, bound to one tenant with one role.
    ApiKey {
        /// The key.
        key_id: Uuid,
        /// Its tenant.
        tenant_id: Uuid,
        /// Its role in the tenant.
        role: Role,
        /// Who created it.
        created_by: Option<Uuid>,
    },
    /// A function's execution role, as its invocations hold it (a role credential).
    Role {
        /// The role.
        role_id: Uuid,
        /// Its tenant.
        tenant_id: Uuid,
        /// The function whose invocation holds the credential.
        function_id: Uuid,
    },
}

/// How role credentials begin (`nrc_` and a signed token), so that they are told from API keys
/// and access tokens without decoding them.
pub const ROLE_CREDENTIAL_PREFIX: &str = "nrc_";

impl Principal {
    /// The user, if the principal is one.
    pub fn user_id(&self) -> Option<Uuid> {
        match self {
            Principal::User { user_id, .. } => Some(*user_id),
            Principal::ApiKey { .. } | Principal::Role { .. } => None,
        }
    }

    /// The tenant the principal belongs to, for those bound to one (API keys and roles).
    pub fn home_tenant(&self) -> Option<Uuid> {
        match self {
            Principal::User { .. } => None,
            Principal::ApiKey { tenant_id, .. } | Principal::Role { tenant_id, .. } => Some(*tenant_id),
        }
    }

    /// `("user", id)`, `("api_key", id)` or `("role", id)`: how audit rows and idempotency
    /// records name it.
    pub fn actor(&self) -> (&'static str, Uuid) {
        match self {
            Principal::User { user_id, .. } => ("user", *user_id),
            Principal::ApiKey { key_id, .. } => ("api_key", *key_id),
            Principal::Role { role_id, .. } => ("role", *role_id),
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(p.clone());
        }
        let principal = authenticate(state, &parts.headers).await?;
        parts.extensions.insert(principal.clone());
        Ok(principal)
    }
}

/// Authenticates the `Authorization: Bearer` credential: an API key (`nmb_...`) or an access token.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthenticated("missing Authorization header"))?
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("malformed Authorization header"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(ApiError::Unauthenticated("expected Authorization: Bearer <token>"))?
        .trim();
    if token.starts_with(api_keys::KEY_PREFIX) {
        return api_keys::authenticate(state, token).await;
    }
    use keys::VerifyError;
    if let Some(credential) = token.strip_prefix(ROLE_CREDENTIAL_PREFIX) {
        return match state.keys.verify_role(credential).await {
            Ok(c) => Ok(Principal::Role { role_id: c.sub, tenant_id: c.tid, function_id: c.fid }),
            Err(VerifyError::Expired) => Err(ApiError::Unauthenticated("role credential expired")),
            Err(VerifyError::Internal(e)) => Err(ApiError::Internal(e)),
            Err(_) => Err(ApiError::Unauthenticated("invalid role credential")),
        };
    }
    match state.keys.verify(token).await {
        Ok(claims) => Ok(Principal::User { user_id: claims.sub, session_id: claims.sid }),
        Err(VerifyError::Expired) => Err(ApiError::Unauthenticated("access token expired")),
        Err(VerifyError::Internal(e)) => Err(ApiError::Internal(e)),
        Err(_) => Err(ApiError::Unauthenticated("invalid access token")),
    }
}

/// Where a request comes from, for audit rows and throttling.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The request id (`x-request-id`).
    pub request_id: Option<String>,
    /// The client address.
    pub source_ip: Option<IpAddr>,
    /// The `User-Agent` header, truncated.
    pub user_agent: Option<String>,
}

/// The caller's address: the last `X-Forwarded-For` hop when the proxy in front is trusted
/// (`trust_forwarded_for`), else the connection's peer.
pub fn source_ip(
    headers: &HeaderMap,
    extensions: &axum::http::Extensions,
    trust_forwarded_for: bool,
) -> Option<IpAddr> {
    let forwarded = if trust_forwarded_for {
        headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|ip| ip.trim().parse::<IpAddr>().ok())
    } else {
        None
    };
    forwarded.or_else(|| extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()))
}

impl FromRequestParts<AppState> for RequestContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header =
            |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(|s| s.chars().take(256).collect());
        Ok(RequestContext {
            request_id: header("x-request-id"),
            source_ip: source_ip(&parts.headers, &parts.extensions, state.settings.trust_forwarded_for),
            user_agent: header("user-agent"),
        })
    }
}
