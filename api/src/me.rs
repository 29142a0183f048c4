//! `GET /v1/me`: who the caller is.

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    auth::Principal,
    authz::Role,
    db::{self, Hot, Scope},
    error::{ApiError, ApiResult},
    startup::AppState,
};

/// The signed-in user.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct User {
    /// Id.
    pub id: Uuid,
    /// E-mail address.
    pub email: String,
    /// Name.
    pub display_name: String,
    /// Whether the user operates the platform (nodes, join tokens, guardrails).
    pub is_platform_admin: bool,
    /// Signed up at.
    pub created_at: DateTime<Utc>,
}

/// The API key in use.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyIdentity {
    /// Key id.
    pub id: Uuid,
    /// Tenant the key belongs to.
    pub tenant_id: Uuid,
    /// Its role.
    pub role: Role,
}

/// The caller.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "principal_type", rename_all = "snake_case")]
pub enum Me {
    /// A user with an access token.
    User {
        /// The user.
        user: User,
        /// The session the token belongs to.
        session_id: Uuid,
    },
    /// An API key.
    ApiKey {
        /// The key.
        api_key: KeyIdentity,
    },
    /// A function's execution role (a role credential, as invocations hold it).
    Role {
        /// The role.
        role: RoleIdentity,
    },
}

/// The role a role credential stands for.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RoleIdentity {
    /// Role id.
    pub id: Uuid,
    /// Tenant the role belongs to.
    pub tenant_id: Uuid,
    /// The function whose invocation holds the credential.
    pub function_id: Uuid,
}

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_me))
}

/// Who am I?
#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "auth",
    responses(
        (status = 200, description = "The caller", body = Me),
        (status = 401, description = "Not authenticated", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn get_me(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Me>> {
    match principal {
        Principal::User { user_id, session_id } => {
            let user: User = db::read_hot(&state.pool, &Scope::user(user_id), Hot::UserById, &user_id.to_string())
                .await?
                .pop()
                .ok_or(ApiError::Unauthenticated("the user no longer exists"))?;
            Ok(Json(Me::User { user, session_id }))
        }
        Principal::ApiKey { key_id, tenant_id, role, .. } => {
            Ok(Json(Me::ApiKey { api_key: KeyIdentity { id: key_id, tenant_id, role } }))
        }
        Principal::Role { role_id, tenant_id, function_id } => {
            Ok(Json(Me::Role { role: RoleIdentity { id: role_id, tenant_id, function_id } }))
        }
    }
}
