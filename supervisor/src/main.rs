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
    /// Ask a running supervisor's `/healthz` (at healthz.listen) and exit 0 if it answers 200:
    /// the health check of a container image that has no curl.
    #[arg(long, conflicts_with = "check")]
    probe_healthz: bool,
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
    if cli.probe_healthz {
        return probe_healthz(&cfg);
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

/// `--probe-healthz`: GET http://<healthz.listen>/healthz (loopback when it listens on every
/// address); Ok on 200.
fn probe_healthz(cfg: &Config) -> anyhow::Result<()> {
    let listen = cfg.healthz.listen.as_deref().context(
        "--probe-healthz needs healthz.listen (FLOTILLA_SUPERVISOR_HEALTHZ_LISTEN): /healthz is off",
    )?;
    let mut addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("healthz.listen {listen:?}"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}/healthz");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let (status, body) = rt
        .block_on(async {
            let resp = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .build()?
                .get(&url)
                .send()
                .await?;
            let status = resp.status();
            Ok::<_, reqwest::Error>((status, resp.text().await.unwrap_or_default()))
        })
        .with_context(|| url.clone())?;
    println!("{}", body.trim());
    anyhow::ensure!(status.is_success(), "{url} answered {status}");
    Ok(())
}

/// The log shape `flotilla` writes too (server/src/cli/logging.rs): JSON objects with
/// `timestamp`, `level`, `message`, `target` and the event's fields flat beside them, no span
/// objects; text with colour only on a terminal.
fn init_logging(cfg: &Config) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .with_context(|| format!("log.level {:?}", cfg.log.level))?;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        b.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        b.with_ansi(std::io::stderr().is_terminal()).init();
    }
    Ok(())
}
