//! Building the application: state, router with its middleware stack, listener, serving with
//! graceful shutdown, and the background maintenance loop.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{
    Router,
    extract::{DefaultBodyLimit, State},
    http::{HeaderName, Request},
    middleware,
    response::IntoResponse,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
    request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
    sensitive_headers::SetSensitiveRequestHeadersLayer,
    trace::TraceLayer,
};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;
use uuid::Uuid;

use crate::{
    api_keys, audit,
    auth::{keys::KeyRing, session, throttle},
    config::ServerArgs,
    db,
    error::ApiError,
    functions, gateway, health, idempotency, me, members, nodes, openapi,
    secrets::SecretBox,
    store::{LocalStore, PackageStore, S3Settings, S3Store},
    telemetry, tenants,
};

/// Shared state of every handler: one `Arc`, so that the clone each middleware layer and handler
/// takes is one reference count, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    /// The application pool (role `nimbus_app`).
    pub pool: db::Db,
    /// Access-token signing keys.
    pub keys: KeyRing,
    /// Settings.
    pub settings: Arc<ServerArgs>,
    /// Prometheus metrics.
    pub metrics: PrometheusHandle,
    /// The code-package store.
    pub store: PackageStore,
    /// Keys sealing secrets at rest, when configured.
    pub secrets: Option<Arc<SecretBox>>,
    /// Wakes agents' desired-state long-polls.
    pub hub: nodes::Hub,
    /// Recent metrics reported by agents, and their per-minute rollups.
    pub stats: nodes::Stats,
    /// The gateway's in-memory routing table.
    pub routes: gateway::Routes,
    /// The gateway's admission limits.
    pub limits: gateway::limits::Limits,
    /// The gateway's own metric handles, registered once.
    pub gateway_metrics: gateway::GatewayMetrics,
}

impl AppState {
    /// The state for `settings`: opens the package store (creating the S3 bucket if asked) and
    /// parses the secrets keys.
    pub async fn new(pool: db::Db, keys: KeyRing, settings: ServerArgs) -> anyhow::Result<AppState> {
        let store = match &settings.s3_bucket {
            Some(bucket) => {
                let credentials = match (&settings.s3_access_key_id, &settings.s3_secret_access_key) {
                    (Some(id), Some(secret)) => Some((id.clone(), secret.expose().to_owned())),
                    (None, None) => None,
                    _ => anyhow::bail!("set both --s3-access-key-id and --s3-secret-access-key, or neither"),
                };
                let s3 = S3Store::open(S3Settings {
                    endpoint: settings.s3_endpoint.clone(),
                    region: settings.s3_region.clone(),
                    bucket: bucket.clone(),
                    path_style: settings.s3_path_style,
                    credentials,
                    spool_dir: settings.spool_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("nimbus-spool")),
                })
                .await?;
                if settings.s3_create_bucket {
                    s3.ensure_bucket().await?;
                }
                PackageStore::S3(s3)
            }
            None => PackageStore::Local(
                LocalStore::open(settings.package_dir.clone().unwrap_or_else(|| "nimbus-packages".into())).await?,
            ),
        };
        let secrets = match &settings.secrets_keys {
            Some(spec) => Some(Arc::new(SecretBox::from_spec(spec.expose())?)),
            None => {
                tracing::warn!("no --secrets-keys: secret environment variables cannot be written");
                None
            }
        };
        let metrics = telemetry::metrics_handle();
        Ok(AppState(Arc::new(Shared {
            pool,
            keys,
            settings: Arc::new(settings),
            metrics,
            store,
            secrets,
            hub: nodes::Hub::default(),
            stats: nodes::Stats::default(),
            routes: gateway::Routes::default(),
            limits: gateway::limits::Limits::default(),
            // After the recorder is installed (`metrics_handle`), so the handles are live.
            gateway_metrics: gateway::GatewayMetrics::register(),
        })))
    }
}

/// Every API route with its OpenAPI description.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(health::router())
        .merge(session::router())
        .merge(me::router())
        .merge(tenants::router())
        .merge(members::router())
        .merge(api_keys::router())
        .merge(crate::iam::router())
        .merge(audit::router())
        .merge(functions::router())
        .merge(nodes::router())
        .split_for_parts()
}

#[derive(Clone, Copy)]
struct MakeUuidV7;

impl MakeRequestId for MakeUuidV7 {
    fn make_request_id<B>(&mut self, _req: &Request<B>) -> Option<RequestId> {
        Uuid::now_v7().to_string().parse().ok().map(RequestId::new)
    }
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let (api, doc) = routes();
    let api: Router = api
        .layer(middleware::from_fn_with_state(state.clone(), idempotency::middleware))
        .layer(middleware::from_fn_with_state(state.clone(), crate::authz::request_facts))
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .with_state(state.clone());
    let console = nimbus_console::router(api.clone());
    // The gateway's routes get none of the stack below (see `gateway::invoke`): only a panic
    // guard. They are merged after the stack is applied, so it does not wrap them.
    let gateway = gateway::router()
        .layer(CatchPanicLayer::custom(|_| ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()))
        .with_state(state.clone());
    let timeouts = Timeouts { request: state.settings.request_timeout.0, upload: state.settings.upload_timeout.0 };
    api.merge(SwaggerUi::new("/docs").url("/openapi.json", doc))
        .nest("/console", console)
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // The console's forms get the same body limit as the API.
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeUuidV7))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                    tracing::info_span!("request", method = %req.method(), uri = %req.uri().path(), request_id = %id)
                }))
                .layer(PropagateRequestIdLayer::new(request_id))
                .layer(SetSensitiveRequestHeadersLayer::new([
                    axum::http::header::AUTHORIZATION,
                    axum::http::header::COOKIE,
                ]))
                .layer(middleware::from_fn(telemetry::track_http))
                .layer(CatchPanicLayer::custom(|_| {
                    ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
                }))
                .layer(middleware::from_fn_with_state(timeouts, enforce_timeout)),
        )
        .merge(gateway)
}

/// The time limits of requests: package uploads get `--upload-timeout`, everything else
/// `--request-timeout`.
#[derive(Clone, Copy)]
struct Timeouts {
    request: Duration,
    upload: Duration,
}

/// Whether a request uploads a code package (and so gets the upload timeout).
fn is_upload(method: &axum::http::Method, path: &str) -> bool {
    (method == axum::http::Method::PUT && path.ends_with("/code"))
        || (method == axum::http::Method::POST && path.contains("/uploads/") && path.ends_with("/complete"))
}

async fn enforce_timeout(
    State(t): State<Timeouts>,
    req: Request<axum::body::Body>,
    next: middleware::Next,
) -> axum::response::Response {
    let limit = if is_upload(req.method(), req.uri().path()) {
        t.upload
    } else if req.uri().path() == "/agent/v1/desired-state" {
        // The long-poll bounds itself (at most `MAX_WAIT_SECONDS`); it must not be cut shorter
        // by a request timeout below that.
        t.request.max(Duration::from_secs(nimbus_protocol::MAX_WAIT_SECONDS + 10))
    } else {
        t.request
    };
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// A built application: connected, migrated, bound, not yet serving.
pub struct Application {
    listener: tokio::net::TcpListener,
    state: AppState,
    public_url: String,
    listen_url: String,
}

impl Application {
    /// Migrates the database, connects, loads keys and binds the listener.
    pub async fn build(
        database_url: &str,
        app_database_url: Option<&str>,
        max_connections: u32,
        settings: ServerArgs,
    ) -> anyhow::Result<Self> {
        db::migrate(database_url).await?;
        let pool = db::connect_app(app_database_url.unwrap_or(database_url), max_connections).await?;
        if pool.login_can_bypass_rls().await? {
            tracing::warn!(
                "the API's database login role is a superuser or has BYPASSRLS: row-level security holds for \
                 its queries (they run as nimbus_app), but SET ROLE NONE would leave it; set \
                 NIMBUS_APP_DATABASE_URL to a login role that is only a member of nimbus_app"
            );
        }
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        let bound = listener.local_addr()?;
        let public_url = settings.public_url(bound);
        let keys = KeyRing::load(pool.clone(), public_url.clone(), settings.access_token_ttl.0).await?;
        crate::extract::set_body_limit_hint(settings.max_body_bytes);
        let state = AppState::new(pool, keys, settings).await?;
        let listen_url = app_database_url.unwrap_or(database_url).to_owned();
        Ok(Application { listener, state, public_url, listen_url })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The public base URL.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// The state (for the local runner's first-run set-up).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let maintenance = tokio::spawn(maintenance_loop(self.state.clone()));
        let watchdog = tokio::spawn(nodes::watchdog_loop(self.state.clone()));
        let activity = tokio::spawn(crate::authz::activity::flush_loop(self.state.pool.clone()));
        let rollups = tokio::spawn(nodes::stats::rollup_loop(self.state.stats.clone(), self.state.pool.clone()));
        let listener = tokio::spawn(self.state.hub.clone().listen(self.listen_url.clone()));
        let routes =
            tokio::spawn(self.state.routes.clone().refresh_loop(self.state.pool.clone(), self.listen_url.clone()));
        let replica = self.state.routes.replica();
        let a = crate::autoscaler::run::Autoscaler::for_replica(
            self.state.pool.clone(),
            self.listen_url.clone(),
            self.state.stats.clone(),
            replica,
        );
        let publisher = tokio::spawn(crate::autoscaler::run::publish_loop(
            self.state.stats.clone(),
            self.state.pool.clone(),
            replica,
            a.leading(),
        ));
        let autoscaler = self.state.settings.autoscaler.then(|| tokio::spawn(a.run()));
        let app = app(self.state.clone()).into_make_service_with_connect_info::<SocketAddr>();
        tracing::info!(url = %self.public_url, "listening");
        // No Nagle delay: a response written in pieces must not wait for the client's delayed ACK
        // (40 ms on Linux) — it showed on every cold start through the gateway.
        let tcp = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let served = axum::serve(tcp, app).with_graceful_shutdown(shutdown).await;
        for task in
            [maintenance, watchdog, activity, rollups, listener, routes, publisher].into_iter().chain(autoscaler)
        {
            task.abort();
        }
        // What agents reported in the last minute reaches PostgreSQL before the replica exits.
        if let Err(e) = self.state.stats.flush(&self.state.pool).await {
            tracing::warn!(error = ?e, "writing the last metrics rollups failed");
        }
        if let Err(e) = crate::authz::activity::flush(&self.state.pool).await {
            tracing::warn!(error = ?e, "writing the last IAM access log counts failed");
        }
        self.state.pool.close();
        served.context("serving HTTP")
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}

/// Periodic housekeeping: rotates the signing key when it is too old, reloads keys rotated by
/// other replicas, and purges expired idempotency records and throttle windows. Each step is
/// idempotent and safe to run on every replica at once.
async fn maintenance_loop(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let result: anyhow::Result<()> = async {
            state.keys.rotate_if_older_than(state.settings.signing_key_max_age.0).await?;
            state.keys.reload().await?;
            idempotency::purge_expired(&state).await?;
            throttle::purge_expired(&state.pool, state.settings.signin_throttle_window.0).await?;
            nodes::purge_logs(&state.pool, state.settings.log_retention.0).await?;
            Ok(())
        }
        .await;
        metrics::counter!("nimbus_maintenance_runs_total", "outcome" => if result.is_ok() { "ok" } else { "error" })
            .increment(1);
        if let Err(e) = result {
            tracing::warn!(error = ?e, "maintenance step failed");
        }
    }
}
