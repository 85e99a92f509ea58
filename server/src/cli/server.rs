//! The server-side commands: `serve`, `config check`, `audit verify`, `chat discord register`,
//! `chat teams package`, `flotilla mcp` (a stdio MCP server forwarding to a remote server's
//! REST API) and `flotilla chat` (the chat gateways as their own process, over the same REST API).
//!
//! `serve` and `config check` share [`load`] and [`check_tokens`], so `config check` passes
//! exactly when `serve` would get as far as binding its ports.

use anyhow::Context;
use flotilla_server::config::{Config, Validated};
use flotilla_server::rest::auth::{admin_token_path, Tokens, MIN_TOKEN_LEN};

use super::{logging, ClientArgs, Exit, Failure, ServerConfigArgs};

/// The configuration: file, then `FLOTILLA_*` variables, then flags; validated whole.
fn load(args: &ServerConfigArgs, serve: Option<ServeFlags<'_>>) -> anyhow::Result<Validated> {
    let mut cfg = Config::load(
        args.config.as_deref(),
        flotilla_server::config::process_env(),
    )
    .map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(f) = serve {
        if let Some(a) = f.opamp_listen {
            cfg.opamp.listen = a.to_string();
        }
        if let Some(a) = f.api_listen {
            cfg.api.listen = a.to_string();
        }
        if f.mcp_read_only {
            cfg.mcp.read_only = true;
        }
    }
    cfg.validate()
        .map_err(|e| Failure::new(Exit::Usage, e.to_string()).into())
}

#[derive(Clone, Copy)]
struct ServeFlags<'a> {
    opamp_listen: Option<&'a str>,
    api_listen: Option<&'a str>,
    mcp_read_only: bool,
}

/// What the token files hold, for `config check`'s report.
struct TokenReport {
    api: String,
    agents: String,
}

/// Reads the token files as `serve` will. `generate`: create the admin token when no tokens
/// file is configured (`serve`); otherwise only check an existing one (`config check` must not
/// create the data directory).
fn check_tokens(cfg: &Config, generate: bool) -> anyhow::Result<TokenReport> {
    let usage = |m: String| Failure::new(Exit::Usage, m);
    let api = match (&cfg.api.tokens_file, generate) {
        (Some(path), _) => {
            let t = Tokens::load(&cfg.api, &cfg.data_dir)
                .map_err(|e| usage(format!("api.tokens_file: {e}")))?;
            format!("{} API token(s) from {}", t.len(), path.display())
        }
        (None, true) => {
            Tokens::load(&cfg.api, &cfg.data_dir).context("API tokens")?;
            format!(
                "the admin token in {}",
                admin_token_path(&cfg.data_dir).display()
            )
        }
        (None, false) => {
            let path = admin_token_path(&cfg.data_dir);
            match std::fs::read_to_string(&path) {
                Ok(t) if t.trim().len() < MIN_TOKEN_LEN => {
                    return Err(usage(format!(
                        "the admin token in {} is shorter than {MIN_TOKEN_LEN} characters",
                        path.display()
                    ))
                    .into())
                }
                Ok(_) => format!("the admin token in {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!(
                    "no api.tokens_file: `serve` will generate an admin token in {}",
                    path.display()
                ),
                Err(e) => return Err(usage(format!("cannot read {}: {e}", path.display())).into()),
            }
        }
    };
    let mtls = cfg.opamp.agent_auth_mode() == flotilla_server::config::AgentAuthMode::Mtls;
    let agents = match &cfg.opamp.agent_tokens_file {
        None if mtls => {
            "agents authenticate by client certificate (opamp.agent_auth = mtls)".to_string()
        }
        None => "no opamp.agent_tokens_file: agents connect without a token".to_string(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                usage(format!(
                    "opamp.agent_tokens_file: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            let n = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .count();
            if n == 0 {
                // The server would start and refuse every agent.
                return Err(usage(format!(
                    "opamp.agent_tokens_file {} holds no token: every agent would be refused",
                    path.display()
                ))
                .into());
            }
            let or_cert = if mtls {
                ", or a client certificate"
            } else {
                ""
            };
            format!("{n} agent token(s) from {}{or_cert}", path.display())
        }
    };
    Ok(TokenReport { api, agents })
}

/// `flotilla serve`.
pub async fn serve(
    args: &ServerConfigArgs,
    opamp_listen: Option<String>,
    api_listen: Option<String>,
    mcp_read_only: bool,
) -> anyhow::Result<Exit> {
    // Everything is validated before anything is opened or bound.
    let v = load(
        args,
        Some(ServeFlags {
            opamp_listen: opamp_listen.as_deref(),
            api_listen: api_listen.as_deref(),
            mcp_read_only,
        }),
    )?;
    logging::init(&v.config.log.format, &v.config.log.level);
    check_tokens(&v.config, true)?;
    let store = flotilla_server::open_store(&v.config).await?;
    let opamp = flotilla_server::bind(v.opamp_addr)
        .with_context(|| format!("cannot listen for agents on {}", v.opamp_addr))?;
    let api = flotilla_server::bind(v.api_addr)
        .with_context(|| format!("cannot listen for operators on {}", v.api_addr))?;
    flotilla_server::run(v, store, opamp, api, shutdown_signal()).await?;
    Ok(Exit::Ok)
}

/// `flotilla config check`: the effective configuration as TOML on stdout (a file that
/// reproduces it), what the token files hold on stderr.
pub fn config_check(args: &ServerConfigArgs) -> anyhow::Result<Exit> {
    let v = load(args, None)?;
    let report = check_tokens(&v.config, false)?;
    print!("{}", v.config.to_toml());
    eprintln!(
        "configuration is valid\n  {}\n  {}",
        report.api, report.agents
    );
    for w in v.config.warnings() {
        eprintln!("  warning: {w}");
    }
    Ok(Exit::Ok)
}

/// `flotilla audit verify`: 0 intact, 1 broken, 3 no database or no Flotilla schema in the
/// PostgreSQL one (never created).
pub async fn audit_verify(
    args: &ServerConfigArgs,
    anchor: Option<&flotilla_server::audit::ChainHead>,
) -> anyhow::Result<Exit> {
    let v = load(args, None)?;
    logging::init(&v.config.log.format, &v.config.log.level);
    let store = match flotilla_server::open_store_for_tools(&v.config).await {
        Ok(s) => s,
        Err(
            e @ (flotilla_server::ServerError::NoDatabase { .. }
            | flotilla_server::ServerError::NoSchema { .. }),
        ) => return Err(Failure::new(Exit::NotFound, e.to_string()).into()),
        Err(e) => return Err(e.into()),
    };
    match flotilla_server::audit::verify(store.as_ref(), anchor).await {
        Ok(ok) => {
            println!("audit chain intact: {} records verified", ok.count);
            println!(
                "commands match their queuing records: {} verified",
                ok.commands.verified
            );
            if ok.commands.legacy > 0 {
                println!(
                    "{} commands unverifiable (legacy): queued before records carried a digest of their parameters",
                    ok.commands.legacy
                );
            }
            if let Some(head) = ok.head {
                println!("head: {head}");
            }
            Ok(Exit::Ok)
        }
        Err(flotilla_server::audit::VerifyError::Broken(b)) => {
            println!("audit chain BROKEN at record {}: {}", b.id, b.reason);
            Ok(Exit::Error)
        }
        Err(e) => Err(e.into()),
    }
}

/// `flotilla chat discord register [--guild ID]`: the `/flotilla` command (the table the
/// gateway parses with) sent as Discord's bulk overwrite, with the bot token of the same
/// `[chat.discord]` that `serve` uses. A refused token exits 4.
pub async fn discord_register(
    args: &ServerConfigArgs,
    guild: Option<&str>,
) -> anyhow::Result<Exit> {
    use flotilla_chat::discord::client::{ApiError, BotToken, DiscordApi};
    use flotilla_chat::discord::commands;

    let v = load(args, None)?;
    logging::init(&v.config.log.format, &v.config.log.level);
    let Some(d) = v.discord else {
        return Err(Failure::new(
            Exit::Usage,
            "chat.discord is not enabled: set [chat.discord] enabled = true (or FLOTILLA_DISCORD_ENABLED) with its application_id, public_key and bot token",
        )
        .into());
    };
    if let Some(g) = guild {
        if g.is_empty() || !g.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Failure::new(
                Exit::Usage,
                format!("--guild {g:?} is not a guild id (digits: Server Settings → Widget, or Copy Server ID)"),
            )
            .into());
        }
    }
    let usage = |e: ApiError| Failure::new(Exit::Usage, e.to_string());
    let api = DiscordApi::new(
        &d.api_url,
        &d.application_id,
        BotToken::new(&d.bot_token).map_err(usage)?,
    )
    .map_err(usage)?;
    let registered = api
        .overwrite_commands(guild, &serde_json::json!([commands::definition()]))
        .await
        .map_err(|e| match e {
            ApiError::Discord {
                status: 401 | 403, ..
            } => Failure::new(Exit::Refused, e.to_string()),
            e => Failure::new(Exit::Error, e.to_string()),
        })?;
    let id = registered
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == commands::NAME))
        .and_then(|c| c["id"].as_str())
        .unwrap_or("?");
    let scope = match guild {
        Some(g) => format!("in guild {g}"),
        None => "globally".to_string(),
    };
    println!(
        "registered /{} {scope} (command id {id}, {} sub-commands) for application {}",
        commands::NAME,
        commands::SUBS.len(),
        d.application_id
    );
    Ok(Exit::Ok)
}

/// `flotilla chat teams package`: the app package for the bot of `[chat.teams]`. Only the
/// app id and name are read (not the password), so the package can be built where the secrets
/// are not; the rest of the file must still parse.
pub fn teams_package(
    args: &ServerConfigArgs,
    out: &std::path::Path,
    mut spec: flotilla_chat::teams::package::PackageSpec,
) -> anyhow::Result<Exit> {
    let cfg = Config::load(
        args.config.as_deref(),
        flotilla_server::config::process_env(),
    )
    .map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
    spec.app_id = cfg.chat.teams.app_id.clone();
    spec.app_name = cfg.chat.teams.app_name.clone();
    let zip = flotilla_chat::teams::package::build(&spec)
        .map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
    std::fs::write(out, &zip).with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "wrote {} ({} bytes): Teams app {:?} for bot {}; upload it in Teams (Apps → Manage your apps → Upload an app)",
        out.display(),
        zip.len(),
        spec.app_name,
        spec.app_id.trim()
    );
    Ok(Exit::Ok)
}

/// `flotilla mcp`: stdout belongs to the protocol, so logs go to stderr without colour.
pub async fn mcp(client: &ClientArgs, read_only: bool) -> anyhow::Result<Exit> {
    let level = std::env::var("FLOTILLA_LOG").unwrap_or_else(|_| "info".into());
    logging::init("text", &level);
    let settings = client.resolve()?;
    if settings.token.is_none() {
        tracing::warn!(
            "no token (--token-file, FLOTILLA_TOKEN_FILE, FLOTILLA_TOKEN or the client config): the server will refuse every call"
        );
    }
    let options = flotilla_mcp::RestOptions {
        ca_file: settings.ca_file.clone(),
    };
    let backend =
        flotilla_mcp::RestBackend::with_options(&settings.server, settings.token, &options)
            .map_err(|e| anyhow::anyhow!(e.message))?;
    flotilla_mcp::run_stdio(std::sync::Arc::new(backend), read_only).await?;
    Ok(Exit::Ok)
}

/// `flotilla chat`: the chat gateways of `--config` as their own process, over a remote
/// server's REST API.
pub async fn chat(args: &super::ChatArgs) -> anyhow::Result<Exit> {
    let v = load(&args.cfg, None)?;
    logging::init(&v.config.log.format, &v.config.log.level);
    if v.slack.is_none() && v.teams.is_none() && v.discord.is_none() {
        return Err(Failure::new(
            Exit::Usage,
            "no chat gateway is enabled in the configuration ([chat.slack], [chat.teams] or [chat.discord])",
        )
        .into());
    }
    let settings = args.client.resolve()?;
    let Some(token) = settings.token else {
        return Err(Failure::new(
            Exit::Usage,
            "flotilla chat needs its gateway token (--token-file, FLOTILLA_TOKEN_FILE, FLOTILLA_TOKEN \
             or the client config): a line of the server's api.tokens_file ending in `gateway`",
        )
        .into());
    };
    let options = flotilla_mcp::RestOptions {
        ca_file: settings.ca_file.clone(),
    };
    let rest = flotilla_mcp::RestBackend::with_options(&settings.server, Some(token), &options)
        .map_err(|e| Failure::new(Exit::Usage, e.message))?;
    // Checked before serving: a token the server does not know, or one not marked `gateway`,
    // would fail every chat request later with nothing but a 401/403 in the platform.
    let me = rest.whoami().await.map_err(|e| {
        Failure::new(
            if e.code == "unauthorized" {
                Exit::Refused
            } else {
                Exit::Error
            },
            format!(
                "flotilla chat: cannot check the gateway token with {}: {}",
                settings.server, e.message
            ),
        )
    })?;
    if me["gateway"] != serde_json::Value::Bool(true) {
        return Err(Failure::new(
            Exit::Refused,
            format!(
                "flotilla chat: the token {:?} is not marked `gateway` in the server's api.tokens_file \
                 (add a 4th field `gateway` to its line), so it may not act for chat users",
                me["actor"].as_str().unwrap_or_default()
            ),
        )
        .into());
    }
    let token_name = me["actor"].as_str().unwrap_or_default().to_string();
    let listener = match v.chat_addr {
        Some(a) => Some(
            flotilla_server::bind(a).with_context(|| format!("cannot listen for chat on {a}"))?,
        ),
        None => None,
    };
    tracing::info!(server = %settings.server, token = %token_name, role = %me["role"].as_str().unwrap_or_default(),
        "flotilla chat: tool calls go to the server's REST API as the gateway token acting for each chat user");
    flotilla_server::run_chat_gateway(v, rest, token_name, listener, shutdown_signal()).await?;
    Ok(Exit::Ok)
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
