//! Integration tests of the API against a real PostgreSQL: each test gets a fresh database
//! with the migrations applied, and drives the router in-process.

mod helpers;

mod api_keys;
mod auth;
mod authz_routes;
mod autoscaler;
mod conventions;
mod db;
mod functions;
mod gateway;
mod iam;
mod idempotency;
mod isolation;
mod nodes;
mod roles;
mod s3;
mod tenants;
