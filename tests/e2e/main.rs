//! End-to-end tests of the real `flotilla` binary, across processes: configuration errors and
//! the CLI (`cli`), Discord command registration (`cli_chat`), the operator CLI against a live server (`cli_ops`), the README's try-it block
//! (`cli_tryit`), logs, metrics, completions and the packaged units and images (`cli_service`),
//! the chat gateways as their own process over REST (`chat_standalone`),
//! state surviving graceful and `kill -9` restarts (`restart`), audit-trail
//! tampering detected by `flotilla audit verify` (`audit_tamper`), and the third-party OpAMP
//! clients from PyPI and npm (`interop`).
//!
//! The binary is built by the first test that needs it (`flotilla_e2e::flotilla_bin`); the
//! peers must be installed (`bash tests/peers/install.sh`), else the interop tests panic.

mod audit_tamper;
mod chat_standalone;
mod cli;
mod cli_chat;
mod cli_ops;
mod cli_service;
mod cli_tryit;
mod interop;
mod restart;
