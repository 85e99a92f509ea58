//! Fake `fluent-bit` and `fluentd` executables for the supervisor's tests. They behave like
//! the real agents as recorded in `fixtures/` (see README.md for the command lines and the
//! `FAKE_*` test hooks); this library holds the code both binaries share.

pub mod common;
pub mod fluentbit;
pub mod fluentd;
pub mod http;
pub mod json;
