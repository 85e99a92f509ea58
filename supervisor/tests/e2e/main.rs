//! End-to-end tests of `flotilla-supervisor`: the real binary, the real `flotilla` server, the
//! fake Fluent Bit / Fluentd from `tests/fake-agents`, and small local endpoints.

mod connection;
mod fluentbit;
mod fluentd;
mod harness;
