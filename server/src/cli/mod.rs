//! The `flotilla` command line, defined once with clap: the definitions here also generate the
//! shell completions and the man page (`flotilla completions SHELL`, `flotilla man`).
//!
//! Server-side commands (`serve`, `config check`, `audit verify`, `chat discord register`,
//! `chat teams package`)
//! read the server's configuration ([`server`]); the operator commands (`agents`, `agent`, `queue`, `commands`,
//! `command`, `cancel`, `audit`, `labels`, `label`) are a client of the REST API ([`remote`]),
//! so they get the same roles, confirmation and audit as any REST caller (channel `cli`).

mod client;
mod logging;
mod output;
mod remote;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

pub use client::ClientArgs;
pub use output::Format;

/// Exit codes a script can branch on (also in `flotilla --help` and the man page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// Anything not listed below: the server is unreachable or failed, the request conflicts
    /// with the fleet's state, or the audit chain is broken.
    Error = 1,
    /// Bad flags or arguments, or a request the server found malformed (bad query, unknown
    /// command kind, bad parameters).
    Usage = 2,
    /// The agent or command does not exist, no agent matched, or there is no database.
    NotFound = 3,
    /// The token is missing or unknown, or its role may not do this.
    Refused = 4,
    /// Nothing was queued: the confirmation was declined (or could not be asked), or the
    /// targets changed since the preview.
    NotConfirmed = 5,
    /// `--wait`: the command (or a command of the batch) ended failed, expired or cancelled.
    CommandFailed = 6,
    /// `--wait`: the command had not finished when the timeout ran out.
    WaitTimedOut = 7,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  error: server unreachable or failed, a conflict with the fleet's state, a broken audit chain
  2  usage: bad flags or arguments, or the server found the request malformed
  3  not found: no such agent or command, no agent matched, no database (audit verify)
  4  refused: the token is missing or unknown, or its role may not do this
  5  not confirmed: the prompt was declined or got no answer, or the targets changed
  6  --wait: the command ended failed, expired or cancelled
  7  --wait: the command had not finished when the timeout ran out";

/// An error with the exit code it stands for. Everything else that fails exits 1.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure {
            exit,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// `flotilla --version`: the crate version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FLOTILLA_COMMIT"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "flotilla",
    version = VERSION,
    about = "Flotilla: an OpAMP control plane for Fluent Bit and Fluentd fleets",
    long_about = "Flotilla: an OpAMP control plane for Fluent Bit and Fluentd fleets.\n\n\
        `flotilla serve` runs the server. The operator commands (agents, agent, queue, commands, \
        command, cancel, audit, labels, label) talk to a running server's REST API: set the \
        server with --server, FLOTILLA_SERVER or the client config file, and the token with \
        --token-file, FLOTILLA_TOKEN_FILE, FLOTILLA_TOKEN or the client config file.",
    after_help = EXIT_CODES_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// `flotilla --config F serve` as scripts wrote it before the flag moved to the
    /// subcommands that read it; refused with any other subcommand.
    #[arg(long, short, value_name = "FILE", hide = true)]
    config: Option<PathBuf>,
    /// As `--config`, for `--data-dir`.
    #[arg(long, value_name = "DIR", hide = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

/// Where the server's configuration comes from (server-side commands only).
#[derive(Args, Debug, Clone, Default)]
pub struct ServerConfigArgs {
    /// TOML configuration file (then overridden by FLOTILLA_* variables and flags).
    #[arg(long, short, env = "FLOTILLA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (database, generated admin token); overrides data_dir.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the server: OpAMP for agents, REST and MCP for operators.
    Serve {
        #[command(flatten)]
        cfg: ServerConfigArgs,
        /// Agent listener, e.g. 0.0.0.0:4320.
        #[arg(long, value_name = "ADDR")]
        opamp_listen: Option<String>,
        /// Operator listener, e.g. 127.0.0.1:8080.
        #[arg(long, value_name = "ADDR")]
        api_listen: Option<String>,
        /// Hide and refuse every state-changing MCP tool on /mcp and /sse (overrides
        /// `mcp.read_only` and FLOTILLA_MCP_READ_ONLY).
        #[arg(long)]
        mcp_read_only: bool,
    },
    /// Validate the server configuration (and read its token files) and print it as TOML.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// The audit trail: list records through the REST API, or `verify` the hash chain of a
    /// local database.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        command: Option<AuditCmd>,
        #[command(flatten)]
        list: remote::AuditArgs,
    },
    /// List agents matching a search query (all agents without one).
    Agents(remote::AgentsArgs),
    /// Show one agent, by host name or uid.
    Agent(remote::AgentArgs),
    /// Queue a command for one agent (host name or uid) or every agent matching a query:
    /// previews the targets and asks for confirmation unless --yes.
    Queue(remote::QueueArgs),
    /// List commands, newest first.
    Commands(remote::CommandsArgs),
    /// Show one command; --wait until it finishes.
    Command(remote::CommandArgs),
    /// Cancel a command that has not been delivered yet.
    Cancel(remote::CancelArgs),
    /// List the labels of agents (those matching a query, or all).
    Labels(remote::LabelsArgs),
    /// Set (KEY=VALUE) or remove (KEY-) labels of one agent, by host name or uid.
    Label(remote::LabelArgs),
    /// Check that a server is up and its store answers (`/readyz`): exit 0 when ready. For
    /// scripts and container health checks.
    Health(remote::HealthArgs),
    /// Run a stdio MCP server forwarding to a Flotilla's REST API (for Claude Desktop, Codex
    /// and other MCP clients that launch servers as commands).
    Mcp {
        #[command(flatten)]
        client: ClientArgs,
        /// Hide and refuse every tool that changes the fleet.
        #[arg(long)]
        read_only: bool,
    },
    /// Chat: with a subcommand, platform set-up; without one, run the chat gateways configured
    /// in --config ([chat.slack], [chat.teams], [chat.discord], chat.listen) as their own
    /// process, reaching a Flotilla through its REST API with a gateway token (a line of its
    /// api.tokens_file ending in `gateway`). Every call is audited as `<token name> for <chat
    /// user>`; alerts need `flotilla serve`.
    #[command(args_conflicts_with_subcommands = true)]
    Chat {
        #[command(subcommand)]
        command: Option<ChatCmd>,
        #[command(flatten)]
        run: ChatArgs,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) of flotilla(1).
    Man,
}

/// `flotilla chat`: where the server is, and the chat settings.
#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub cfg: ServerConfigArgs,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Validate everything `serve` checks before it binds (settings, environment, token files)
    /// and print the effective configuration as TOML.
    Check {
        #[command(flatten)]
        cfg: ServerConfigArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum ChatCmd {
    /// Discord set-up.
    Discord {
        #[command(subcommand)]
        command: DiscordCmd,
    },
    /// Microsoft Teams set-up.
    Teams {
        #[command(subcommand)]
        command: TeamsCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum TeamsCmd {
    /// Build the Teams app package (manifest.json naming the bot of `[chat.teams]`, and its
    /// icons, zipped) to upload in Teams: Apps → Manage your apps → Upload an app.
    Package {
        #[command(flatten)]
        cfg: ServerConfigArgs,
        /// Where to write the zip.
        #[arg(long, value_name = "FILE", default_value = "flotilla-teams.zip")]
        out: PathBuf,
        /// The public host name of the chat listener (the messaging endpoint's host): the
        /// manifest's validDomains, and its developer URLs unless --website-url is given.
        #[arg(long, value_name = "HOST", required = true)]
        domain: Vec<String>,
        /// The developer's website (also used as privacy and terms-of-use URL).
        #[arg(long, value_name = "URL")]
        website_url: Option<String>,
        /// The developer name Teams shows.
        #[arg(long, value_name = "NAME", default_value = "Flotilla")]
        developer: String,
        /// The app version (raise it for each upload of an update).
        #[arg(long, value_name = "X.Y.Z", default_value = env!("CARGO_PKG_VERSION"))]
        app_version: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiscordCmd {
    /// Register the `/flotilla` command and its sub-commands with Discord, globally or in one
    /// guild, as the bot of `[chat.discord]`. Idempotent: Discord's bulk overwrite replaces the
    /// application's commands in that scope, so running it again leaves the same set.
    Register {
        #[command(flatten)]
        cfg: ServerConfigArgs,
        /// Register in this guild (server id) only: usable at once there. Without it the
        /// command is global (every guild the bot is in, and DMs).
        #[arg(long, value_name = "ID")]
        guild: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Check the whole hash chain of the local database; names the first broken record and
    /// prints the chain head. A missing database is an error (exit 3), never "intact".
    Verify {
        #[command(flatten)]
        cfg: ServerConfigArgs,
        /// A head printed by an earlier run (`ID:HASH`): also prove the chain still holds that
        /// record unchanged, which reveals records deleted from the end.
        #[arg(long, value_name = "ID:HASH")]
        anchor: Option<flotilla_server::audit::ChainHead>,
    },
}

/// Parses the command line, runs it, and turns the outcome into an exit code.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code.into(),
        Err(e) => {
            let exit = e.downcast_ref::<Failure>().map_or(Exit::Error, |f| f.exit);
            eprintln!("flotilla: {e:#}");
            exit.into()
        }
    }
}

/// Moves a `--config`/`--data-dir` given before the subcommand into the subcommand's own
/// settings; refuses them for subcommands that do not read the server's configuration.
fn hoist_server_flags(cli: &mut Cli) -> Result<(), Failure> {
    if cli.config.is_none() && cli.data_dir.is_none() {
        return Ok(());
    }
    let target = match &mut cli.command {
        Cmd::Serve { cfg, .. }
        | Cmd::Config {
            command: ConfigCmd::Check { cfg },
        }
        | Cmd::Audit {
            command: Some(AuditCmd::Verify { cfg, .. }),
            ..
        }
        | Cmd::Chat {
            command:
                Some(ChatCmd::Discord {
                    command: DiscordCmd::Register { cfg, .. },
                }),
            ..
        }
        | Cmd::Chat {
            command:
                Some(ChatCmd::Teams {
                    command: TeamsCmd::Package { cfg, .. },
                }),
            ..
        }
        | Cmd::Chat {
            command: None,
            run: ChatArgs { cfg, .. },
        } => cfg,
        _ => {
            return Err(Failure::new(
                Exit::Usage,
                "--config and --data-dir apply only to serve, config check, audit verify and \
                 chat discord register and chat teams package; \
                 the other commands reach a server through --server and --token-file",
            ))
        }
    };
    // A flag before the subcommand is still a flag: it wins over FLOTILLA_CONFIG.
    if let Some(c) = cli.config.take() {
        target.config = Some(c);
    }
    if let Some(d) = cli.data_dir.take() {
        target.data_dir = Some(d);
    }
    Ok(())
}

async fn run(mut cli: Cli) -> anyhow::Result<Exit> {
    hoist_server_flags(&mut cli)?;
    match cli.command {
        Cmd::Serve {
            cfg,
            opamp_listen,
            api_listen,
            mcp_read_only,
        } => server::serve(&cfg, opamp_listen, api_listen, mcp_read_only).await,
        Cmd::Config {
            command: ConfigCmd::Check { cfg },
        } => server::config_check(&cfg),
        Cmd::Audit {
            command: Some(AuditCmd::Verify { cfg, anchor }),
            ..
        } => server::audit_verify(&cfg, anchor.as_ref()).await,
        Cmd::Audit {
            command: None,
            list,
        } => remote::audit(list).await,
        Cmd::Agents(a) => remote::agents(a).await,
        Cmd::Health(a) => remote::health(a).await,
        Cmd::Agent(a) => remote::agent(a).await,
        Cmd::Queue(a) => remote::queue(a).await,
        Cmd::Commands(a) => remote::commands(a).await,
        Cmd::Command(a) => remote::command(a).await,
        Cmd::Cancel(a) => remote::cancel(a).await,
        Cmd::Labels(a) => remote::labels(a).await,
        Cmd::Label(a) => remote::label(a).await,
        Cmd::Mcp { client, read_only } => server::mcp(&client, read_only).await,
        Cmd::Chat {
            command:
                Some(ChatCmd::Discord {
                    command: DiscordCmd::Register { cfg, guild },
                }),
            ..
        } => server::discord_register(&cfg, guild.as_deref()).await,
        Cmd::Chat {
            command:
                Some(ChatCmd::Teams {
                    command:
                        TeamsCmd::Package {
                            cfg,
                            out,
                            domain,
                            website_url,
                            developer,
                            app_version,
                        },
                }),
            ..
        } => server::teams_package(
            &cfg,
            &out,
            flotilla_chat::teams::package::PackageSpec {
                app_id: String::new(),
                app_name: String::new(),
                version: app_version,
                website_url: website_url
                    .unwrap_or_else(|| format!("https://{}/", domain[0].trim())),
                domains: domain,
                developer,
            },
        ),
        Cmd::Chat { command: None, run } => server::chat(&run).await,
        Cmd::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "flotilla", &mut std::io::stdout());
            Ok(Exit::Ok)
        }
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(Exit::Ok)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn server_flags_are_not_offered_where_they_would_be_ignored() {
        // `flotilla mcp` and the operator commands are clients of a remote server: a
        // --config or --data-dir there would be accepted and silently ignored.
        for args in [
            &["flotilla", "mcp", "--data-dir", "d"][..],
            &["flotilla", "mcp", "--config", "c.toml"],
            &["flotilla", "agents", "--data-dir", "d"],
            &[
                "flotilla", "queue", "restart", "web-1", "--config", "c.toml",
            ],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::UnknownArgument,
                "{args:?}"
            );
        }
        // Before the subcommand (as older scripts wrote it) they parse, and are refused for
        // the client commands.
        let mut cli = Cli::try_parse_from(["flotilla", "--data-dir", "d", "mcp"]).unwrap();
        let err = hoist_server_flags(&mut cli).unwrap_err();
        assert_eq!(err.exit, Exit::Usage);
        assert!(err.message.contains("--server"), "{}", err.message);
        // The server-side commands take them before or after the subcommand.
        Cli::try_parse_from(["flotilla", "audit", "verify", "--data-dir", "d"]).unwrap();
        Cli::try_parse_from(["flotilla", "config", "check", "--config", "c.toml"]).unwrap();
        let mut cli = Cli::try_parse_from(["flotilla", "--config", "c.toml", "serve"]).unwrap();
        hoist_server_flags(&mut cli).unwrap();
        let Cmd::Serve { cfg, .. } = &cli.command else {
            panic!("serve")
        };
        assert_eq!(cfg.config.as_deref(), Some(std::path::Path::new("c.toml")));
    }

    #[test]
    fn exit_codes_in_the_help_match_the_enum() {
        for (code, name) in [
            (Exit::Ok, "success"),
            (Exit::Error, "error"),
            (Exit::Usage, "usage"),
            (Exit::NotFound, "not found"),
            (Exit::Refused, "refused"),
            (Exit::NotConfirmed, "not confirmed"),
            (Exit::CommandFailed, "--wait: the command ended"),
            (Exit::WaitTimedOut, "--wait: the command had not finished"),
        ] {
            let line = format!("  {}  {name}", code as u8);
            assert!(EXIT_CODES_HELP.contains(&line), "{line:?} missing");
        }
    }
}
