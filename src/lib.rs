//! Sluice: a token-bucket rate-limit service for Envoy's global rate-limit filter and for any
//! client of its gRPC API.
//!
//! # Map
//!
//! A request travels through the modules in this order:
//!
//! 1. [`server`] accepts a gRPC `ShouldRateLimit` call (or an HTTP `POST /json`, read by
//!    [`json`]) and hands the `RateLimitRequest` to the [`service`].
//! 2. [`service::Limiter::decide`] validates it, finds each descriptor's rule in the [`rules`]
//!    (loaded from YAML files in the format of Envoy's reference service), and turns every limit
//!    that applies into a [`store::Charge`] on a bucket named by [`key`].
//! 3. The [`store`] applies the charges all or nothing, using the arithmetic of [`bucket`] and the
//!    time of a [`clock`], and reports each bucket's level: in memory, or in Redis through one
//!    Lua script call, with a circuit breaker and an in-process fallback when Redis fails.
//! 4. The service writes one status per descriptor, in request order, and the server sends the
//!    response.
//!
//! [`rules`], [`bucket`] and [`key`] are pure: no I/O (beyond reading rule files), no network,
//! no knowledge of gRPC. [`proto`] is the wire contract generated from `proto/`; [`reload`]
//! watches the rule files; [`telemetry`] names the metrics.

#![warn(missing_docs)]

pub mod bucket;
pub mod clock;
pub mod json;
pub mod key;
pub mod proto;
pub mod reload;
pub mod rules;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
