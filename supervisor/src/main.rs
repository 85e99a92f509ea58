//! The `flotilla-supervisor` binary: flags, configuration loading and validation, logging,
//! and a single-threaded runtime (the supervisor must stay lighter than the agent it runs).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use flotilla_supervisor::config::{Config, ENV_VARS};

/// Runs one Fluent Bit or Fluentd and connects it to an OpAMP server.
#[derive(Parser, Debug)]
#[command(name = "flotilla-supervisor", version, about)]
struct Cli {
    /// TOML configuration file.
    #[arg(short, long, env = "FLOTILLA_SUPERVISOR_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides server.url.
    #[arg(long)]
    server_url: Option<String>,
    /// Overrides data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides log.format (text or json).
    #[arg(long)]
    log_format: Option<String>,
    /// Overrides healthz.listen (e.g. 127.0.0.1:8989).
    #[arg(long)]
    healthz_listen: Option<String>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env = std::env::vars().filter(|(k, _)| ENV_VARS.iter().any(|(n, _)| n == k));
    let mut cfg = Config::load(cli.config.as_deref(), env)?;
    for (field, value) in [
        ("server.url", cli.server_url.clone()),
        (
            "data_dir",
            cli.data_dir.as_ref().map(|p| p.display().to_string()),
        ),
        ("log.format", cli.log_format.clone()),
        ("healthz.listen", cli.healthz_listen.clone()),
    ] {
        if let Some(v) = value {
            cfg.set(field, &v)
                .map_err(|e| anyhow::anyhow!("--{}: {e}", field.replace(['.', '_'], "-")))?;
        }
    }
    cfg.validate()?;
    if cli.check {
        println!("configuration is valid");
        return Ok(());
    }
    init_logging(&cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Blocking pool is only used for file IO; a few threads are plenty.
        .max_blocking_threads(4)
        .build()
        .context("cannot start the runtime")?;
    let code = rt.block_on(flotilla_supervisor::supervisor::run(cfg))?;
    drop(rt);
    std::process::exit(code);
}

fn init_logging(cfg: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .with_context(|| format!("log.level {:?}", cfg.log.level))?;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        b.json().flatten_event(true).init();
    } else {
        b.with_ansi(false).init();
    }
    Ok(())
}
