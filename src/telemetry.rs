//! Structured logs via `tracing`: `RUST_LOG` filters (default `info`),
//! `KEYWARD_LOG_FORMAT=json` switches to JSON lines. Key material is never logged:
//! the types that hold it do not implement `Debug`/`Display` with their contents.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Install the global subscriber. Safe to call once per process.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("KEYWARD_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry.with(fmt::layer().json().with_writer(std::io::stderr)).try_init()
    } else {
        registry.with(fmt::layer().with_writer(std::io::stderr)).try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
