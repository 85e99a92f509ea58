//! `flotilla` binary: the server (`serve`, `config check`, `audit verify`), the operator CLI
//! over the REST API (`agents`, `queue`, `commands`, …), `flotilla mcp` (a stdio MCP server
//! forwarding to the REST API), and shell completions and the man page. All of it lives in
//! [`cli`]; this file only runs it.

mod cli;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    cli::main().await
}
