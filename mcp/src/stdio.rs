//! The stdio transport: `flotilla mcp --server URL` runs this so desktop clients (Claude
//! Desktop, Codex) launch Flotilla as a command. JSON-RPC travels on stdin/stdout; logs must
//! go to stderr (stdout belongs to the protocol).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rmcp::ServiceExt;

use crate::backend::FleetBackend;
use crate::confirm::ConfirmStore;
use crate::server::FlotillaMcp;

/// How long the start-up probe waits before logging that the server does not answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the stdio server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the token file {0} is empty")]
    EmptyToken(String),
    #[error("MCP session failed: {0}")]
    Session(String),
}

/// Reads a bearer token from a file (first non-empty line, trimmed).
pub fn read_token_file(path: &Path) -> Result<String, StdioError> {
    let text = std::fs::read_to_string(path).map_err(|source| StdioError::TokenFile {
        path: path.display().to_string(),
        source,
    })?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
        .ok_or_else(|| StdioError::EmptyToken(path.display().to_string()))
}

/// Serves MCP on stdin/stdout over `backend` until the client closes stdin.
pub async fn run_stdio(backend: Arc<dyn FleetBackend>, read_only: bool) -> Result<(), StdioError> {
    // A probe so a wrong URL or token shows up in the client's server log at once rather than
    // as the first tool call's error. It runs beside the session: clients give a server a few
    // seconds to answer `initialize` (Codex: 10 s), and an unreachable Flotilla must not make
    // the whole server look broken — each tool call then reports the error itself.
    let probe = backend.clone();
    tokio::spawn(async move {
        match tokio::time::timeout(PROBE_TIMEOUT, probe.summary()).await {
            Ok(Ok(s)) => tracing::info!(agents = %s["total"], read_only, "flotilla mcp: connected"),
            Ok(Err(e)) => tracing::warn!(code = %e.code, error = %e.message,
                "flotilla mcp: the Flotilla server refused a probe; tools will report errors until it answers"),
            Err(_) => tracing::warn!(
                "flotilla mcp: the Flotilla server did not answer a probe within {} s; tools will report errors until it does",
                PROBE_TIMEOUT.as_secs()),
        }
    });
    let mcp = FlotillaMcp::new(Some(backend), read_only, Arc::new(ConfirmStore::default()));
    let running = mcp
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| StdioError::Session(e.to_string()))?;
    running
        .waiting()
        .await
        .map_err(|e| StdioError::Session(e.to_string()))?;
    Ok(())
}
