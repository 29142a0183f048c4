//! The OpenAPI document: the routes of every module (collected by `utoipa-axum`, so a route
//! cannot be served without being documented) plus the shared parts declared here.

use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

/// Shared parts of the document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Nimbus API",
        description = "Control plane of Nimbus, the self-hostable multi-tenant serverless platform.\n\n\
            Errors are RFC 9457 problem+json documents with a stable `code`. Lists take `limit` and \
            `after` and return `next_cursor`. Creating POSTs honour `Idempotency-Key`.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    components(schemas(crate::error::Problem, crate::error::FieldError)),
    tags(
        (name = "auth", description = "Sign-up, sign-in, tokens, the caller"),
        (name = "tenants", description = "Tenants"),
        (name = "members", description = "Members of a tenant and their roles"),
        (name = "api-keys", description = "Machine credentials of a tenant"),
        (name = "audit", description = "Who changed what"),
        (name = "ops", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An access token from sign-in, or an API key (`nmb_...`)"))
                    .build(),
            ),
        );
    }
}

/// The complete document, as served at `/openapi.json` and checked in at `openapi/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    crate::startup::routes().1
}

/// The document as pretty JSON with a trailing newline (the checked-in form).
pub fn document_json() -> String {
    let mut s = document().to_pretty_json().expect("the OpenAPI document serializes");
    s.push('\n');
    s
}
