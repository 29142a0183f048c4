//! Nimbus web console, server-rendered; mounted by the API at `/console`.
//!
//! It calls the public REST API with the signed-in user's token (in-process, through the API
//! router it is given), so it can do nothing the API cannot. Today it holds sign-in, the
//! signed-in overview of the user's tenants, and sign-out; every page works without
//! JavaScript. The full console (functions, rollouts, IAM, events, billing, nodes) grows here.

mod client;
mod pages;

pub use pages::router;
