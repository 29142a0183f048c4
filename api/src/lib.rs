//! Nimbus control plane: the REST API (identity, tenants, members, API keys, audit log,
//! functions, nodes), the agent protocol's server side and background loops; later the
//! invocation gateway and event ingress.
//!
//! Entry points: [`startup::app`] builds the router (tests drive it in-process),
//! [`startup::Application`] binds and serves it, `src/main.rs` is the command line.

pub mod api_keys;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod autoscaler;
pub mod config;
pub mod db;
pub mod error;
pub mod extract;
pub mod functions;
pub mod gateway;
pub mod health;
pub mod iam;
pub mod idempotency;
pub mod local;
pub mod me;
pub mod members;
pub mod names;
pub mod nodes;
pub mod openapi;
pub mod pagination;
pub mod routing;
pub mod secrets;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tenants;
