//! End-to-end tests of `flotilla-supervisor`: the real binary, the real `flotilla` server, the
//! fake Fluent Bit / Fluentd from `tests/fake-agents` and the real ones from `../shared/tools`,
//! and small local endpoints.

mod connection;
mod examples;
mod fluentbit;
mod fluentd;
mod harness;
mod real;
#[cfg(feature = "tls")]
mod tls;
