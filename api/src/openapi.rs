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
        (name = "functions", description = "Functions of a tenant. Deploying from a shell:\n\n\
            ```sh\n\
            FN=$API/v1/tenants/$TENANT/functions; AUTH=\"authorization: Bearer $TOKEN\"\n\
            curl -s $FN -H \"$AUTH\" -H 'content-type: application/json' -d '{\"name\":\"thumbs\",\"runtime\":\"wasm\"}'\n\
            curl -s -X PUT $FN/thumbs/code -H \"$AUTH\" -H 'content-type: application/wasm' --data-binary @thumbs.wasm\n\
            curl -s $FN/thumbs/versions -H \"$AUTH\" -H 'content-type: application/json' -d '{}'\n\
            curl -s $FN/thumbs/aliases -H \"$AUTH\" -H 'content-type: application/json' \\\n\
            \x20 -d '{\"name\":\"live\",\"routing\":{\"weights\":[{\"version\":1,\"weight\":100}]}}'\n\
            ETAG=$(curl -s -o /dev/null -w '%header{etag}' $FN/thumbs/aliases/live -H \"$AUTH\")\n\
            curl -s -X PUT $FN/thumbs/aliases/live -H \"$AUTH\" -H \"if-match: $ETAG\" -H 'content-type: application/json' \\\n\
            \x20 -d '{\"routing\":{\"weights\":[{\"version\":1,\"weight\":90},{\"version\":2,\"weight\":10}]}}'\n\
            ```"),
        (name = "packages", description = "Code packages: streamed uploads (`PUT .../code`) and presigned uploads to S3"),
        (name = "versions", description = "Immutable, numbered snapshots of code and configuration"),
        (name = "aliases", description = "Named routing over versions (weights, sticky, header rules) and its history"),
        (name = "nodes", description = "Worker nodes and join tokens (platform admins)"),
        (name = "agent", description = "The agent protocol: what worker agents call (node credentials)"),
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
        components.add_security_scheme(
            "node",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A worker node's credential (`nnc_...`) from `POST /agent/v1/join`"))
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
