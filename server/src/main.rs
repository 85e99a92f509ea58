//! `flotilla` binary: thin CLI over the library — `serve`, `audit verify`, `config check`,
//! and `mcp` (a stdio MCP server forwarding to a Flotilla's REST API).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flotilla_server::config::{Config, Validated, ENV_VARS};

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Flotilla: an OpAMP control plane for Fluent Bit and Fluentd fleets"
)]
struct Cli {
    /// TOML configuration file (settings are then overridden by FLOTILLA_* variables and flags).
    #[arg(long, short, global = true, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (database, generated admin token).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server: OpAMP for agents, REST for operators.
    Serve {
        /// Agent listener, e.g. 0.0.0.0:4320.
        #[arg(long)]
        opamp_listen: Option<String>,
        /// Operator listener, e.g. 127.0.0.1:8080.
        #[arg(long)]
        api_listen: Option<String>,
        /// Hide and refuse every state-changing MCP tool on /mcp and /sse (overrides
        /// `mcp.read_only` and FLOTILLA_MCP_READ_ONLY).
        #[arg(long)]
        mcp_read_only: bool,
    },
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        command: AuditCmd,
    },
    /// Validate the configuration and print the effective settings.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Run a local stdio MCP server forwarding to a Flotilla's REST API (for Claude Desktop,
    /// Codex and other MCP clients that launch servers as commands).
    Mcp {
        /// The Flotilla operator listener, e.g. http://127.0.0.1:8080.
        #[arg(long, env = "FLOTILLA_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// File holding the API bearer token (else the FLOTILLA_TOKEN variable).
        #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Hide and refuse every tool that changes the fleet.
        #[arg(long)]
        read_only: bool,
        /// PEM file of CA certificates to trust for an https:// server besides the web roots
        /// (a private CA or a self-signed server certificate).
        #[arg(long, env = "FLOTILLA_CA_FILE")]
        ca_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the whole hash chain; names the first broken record and prints the chain head.
    Verify {
        /// A head printed by an earlier run (`ID:HASH`): also prove the chain still holds that
        /// record unchanged, which reveals records deleted from the end.
        #[arg(long, value_name = "ID:HASH")]
        anchor: Option<flotilla_server::audit::ChainHead>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate and print.
    Check,
}

fn load(cli: &Cli) -> anyhow::Result<Validated> {
    let env = ENV_VARS
        .iter()
        .filter_map(|(k, _)| std::env::var(k).ok().map(|v| (k.to_string(), v)));
    let mut cfg = Config::load(cli.config.as_deref(), env)?;
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Cmd::Serve {
        opamp_listen,
        api_listen,
        mcp_read_only,
    } = &cli.command
    {
        if let Some(a) = opamp_listen {
            cfg.opamp.listen = a.clone();
        }
        if let Some(a) = api_listen {
            cfg.api.listen = a.clone();
        }
        if *mcp_read_only {
            cfg.mcp.read_only = true;
        }
    }
    Ok(cfg.validate()?)
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flotilla: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    // The stdio MCP server is a client of a remote server: it needs none of the server's
    // configuration, and its stdout belongs to the protocol.
    if let Cmd::Mcp {
        server,
        token_file,
        read_only,
        ca_file,
    } = &cli.command
    {
        return run_mcp(
            server,
            token_file.as_deref(),
            *read_only,
            ca_file.as_deref(),
        )
        .await;
    }
    // Configuration is validated in full before anything is opened or bound.
    let v = load(&cli)?;
    init_logging(&v.config);
    match cli.command {
        // Served before the configuration is loaded (see the top of this function).
        Cmd::Mcp { .. } => unreachable!("flotilla mcp returns early"),
        Cmd::Config { .. } => {
            println!("{:#?}", v.config);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Audit {
            command: AuditCmd::Verify { anchor },
        } => {
            let store = flotilla_server::open_store_for_tools(&v.config).await?;
            match flotilla_server::audit::verify(store.as_ref(), anchor.as_ref()).await {
                Ok(ok) => {
                    println!("audit chain intact: {} records verified", ok.count);
                    if let Some(head) = ok.head {
                        println!("head: {head}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(flotilla_server::audit::VerifyError::Broken(b)) => {
                    println!("audit chain BROKEN at record {}: {}", b.id, b.reason);
                    Ok(ExitCode::from(1))
                }
                Err(e) => Err(e.into()),
            }
        }
        Cmd::Serve { .. } => {
            flotilla_server::rest::auth::Tokens::load(&v.config.api, &v.config.data_dir)
                .context("API tokens")?;
            let store = flotilla_server::open_store(&v.config).await?;
            let opamp = flotilla_server::bind(v.opamp_addr)
                .with_context(|| format!("cannot listen for agents on {}", v.opamp_addr))?;
            let api = flotilla_server::bind(v.api_addr)
                .with_context(|| format!("cannot listen for operators on {}", v.api_addr))?;
            flotilla_server::run(v, store, opamp, api, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run_mcp(
    server: &str,
    token_file: Option<&std::path::Path>,
    read_only: bool,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let filter = std::env::var("FLOTILLA_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let token = match token_file {
        Some(f) => Some(flotilla_mcp::read_token_file(f)?),
        None => std::env::var("FLOTILLA_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
    };
    if token.is_none() {
        tracing::warn!(
            "no token (--token-file or FLOTILLA_TOKEN): the server will refuse every call"
        );
    }
    let options = flotilla_mcp::RestOptions {
        ca_file: ca_file.map(std::path::Path::to_path_buf),
    };
    let backend = flotilla_mcp::RestBackend::with_options(server, token, &options)
        .map_err(|e| anyhow::anyhow!(e.message))?;
    flotilla_mcp::run_stdio(std::sync::Arc::new(backend), read_only).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}
