//! keyward: a Kubernetes operator for the whole life of API keys.
//!
//! Layout: [`api`] (CRD types), [`duration`] (ISO 8601 durations), [`controller`]
//! (reads, applies, writes status), [`verifier`] (answers requests), [`runtime`] (what
//! both processes stand on: the CRD check, the shutdown signal, the health server),
//! [`cli`], [`metrics`], [`telemetry`], [`error`].

pub mod api;
pub mod cli;
pub mod controller;
pub mod duration;
pub mod error;
pub mod keys;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod ops;
pub mod runtime;
pub mod telemetry;
pub mod verifier;
pub mod webhook;
