//! The fake `fluentd`: command line, dry run, start-up failures and the two-process model
//! (a supervisor that re-executes itself with `--under-supervisor` as the worker), as
//! recorded from real Fluentd 1.18.0 and 1.16.11 in fixtures/fluentd-*/.
//! `FAKE_FLUENTD_VERSION=1.16.11|1.18.0` (default 1.18.0) picks the version's behaviour.

pub mod config;
mod supervisor;
mod worker;

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use crate::common::{event, fd_time};
use config::{Category, Element, ParseError, Plugin};

const AGENT: &str = "fluentd";
const BAD_SYNTAX_REC: &str =
    include_str!("../../fixtures/fluentd-1.18.0/responses/startup-bad-syntax.log");

pub fn version() -> String {
    std::env::var("FAKE_FLUENTD_VERSION").unwrap_or_else(|_| "1.18.0".into())
}

/// v1.18 turned SIGUSR2 into a zero-downtime restart (fluent-agents.md §3.4, §4.8).
pub fn zdr_capable() -> bool {
    let v = version();
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    major > 1 || (major == 1 && minor >= 18)
}

#[derive(Clone, Debug)]
pub struct Cli {
    pub config: String,
    pub dry_run: bool,
    pub under_supervisor: bool,
    pub log_path: Option<String>,
    /// Arguments as given, without `--under-supervisor`: the worker and a zero-downtime
    /// successor are started with them.
    pub args: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Cli, i32> {
    let mut cli = Cli {
        config: "/etc/fluent/fluent.conf".into(),
        dry_run: false,
        under_supervisor: false,
        log_path: None,
        args: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let a = args[i].clone();
        i += 1;
        let mut value = |name: &str| -> Result<String, i32> {
            if let Some(v) = a.strip_prefix(&format!("{name}=")) {
                return Ok(v.to_string());
            }
            let v = args.get(i).cloned().ok_or_else(|| {
                eprintln!("fluentd: missing argument: {a}");
                1
            })?;
            i += 1;
            Ok(v)
        };
        match a.as_str() {
            "--under-supervisor" => {
                cli.under_supervisor = true;
                continue;
            }
            "--version" => {
                // fluent-agents.md §3.1: `fluentd --version` prints `fluentd 1.18.0`.
                println!("fluentd {}", version());
                return Err(0);
            }
            "--dry-run" => cli.dry_run = true,
            s if s == "-c" || s == "--config" || s.starts_with("--config=") => {
                let v = value("--config")?;
                cli.args.push("-c".into());
                cli.args.push(v.clone());
                cli.config = v;
                continue;
            }
            s if s == "-o" || s == "--log" || s.starts_with("--log=") => {
                let v = value("--log")?;
                cli.args.push("-o".into());
                cli.args.push(v.clone());
                cli.log_path = Some(v);
                continue;
            }
            "-v" | "-vv" | "-q" | "-qq" | "--no-color" | "--suppress-repeated-stacktrace" => {}
            "-p" | "--plugin" | "-r" => {
                let v = value(&a)?;
                cli.args.push(a.clone());
                cli.args.push(v);
                continue;
            }
            "-d" | "--daemon" | "--no-supervisor" | "-i" | "--inline-config" => {
                // Not emulated (a supervisor must keep fluentd in the foreground under its
                // own supervisor process, fluent-agents.md §4.7).
                eprintln!("fake-fluentd: '{a}' is not supported by the fake");
                return Err(1);
            }
            _ => {
                // Ruby's OptionParser.
                eprintln!("fluentd: invalid option: {a}");
                return Err(1);
            }
        }
        cli.args.push(a);
    }
    Ok(cli)
}

/// Fluentd's log format: `2026-11-22 02:51:58 +0000 [info]: message` (sig-SIGTERM.log),
/// to stdout, or to the `-o` file. One write per line, so supervisor and worker lines
/// sharing the stream never interleave mid-line.
#[derive(Clone)]
pub struct Log {
    path: Option<String>,
}

impl Log {
    pub fn line(&self, level: &str, msg: &str) {
        self.raw(&format!(
            "{} [{level}]: {msg}\n",
            fd_time(SystemTime::now())
        ));
    }

    /// Text as is, e.g. the indented backtrace lines under an error (portconflict.log).
    pub fn raw(&self, text: &str) {
        match &self.path {
            Some(p) => {
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                {
                    let _ = f.write_all(text.as_bytes());
                }
            }
            None => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
        }
    }

    pub fn info(&self, msg: &str) {
        self.line("info", msg)
    }

    pub fn warn(&self, msg: &str) {
        self.line("warn", msg)
    }

    pub fn error(&self, msg: &str) {
        self.line("error", msg)
    }
}

pub enum LoadError {
    /// Uncaught Ruby exception: backtrace on stderr, exit 1 (startup-bad-syntax.log).
    Parse(ParseError),
    /// `Errno::ENOENT` for a missing file (fluent-agents.md §3.4).
    Missing(String),
}

pub fn read_config(path: &str) -> Result<Element, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|_| LoadError::Missing(path.to_string()))?;
    let fname = Path::new(path)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string());
    config::parse(&text, &fname).map_err(LoadError::Parse)
}

/// The Ruby backtrace of an uncaught config error (startup-bad-syntax.log,
/// dryrun-bad-syntax.log), with the version in the paths.
fn print_uncaught(e: &LoadError) {
    let v = version();
    let from: String = BAD_SYNTAX_REC
        .lines()
        .filter(|l| l.starts_with("\tfrom "))
        .map(|l| format!("{}\n", l.replace("fluentd-1.18.0", &format!("fluentd-{v}"))))
        .collect();
    let head = match e {
        LoadError::Parse(p) => format!(
            "/opt/fluentd-{v}/lib/fluent/config/basic_parser.rb:92:in `parse_error!': {} (Fluent::ConfigParseError)\n{}\n",
            p.headline(),
            p.context()
        ),
        // Not recorded: fluent-agents.md §3.4 only says the missing file raises Errno::ENOENT.
        LoadError::Missing(path) => format!(
            "/opt/fluentd-{v}/lib/fluent/config.rb:31:in `read': No such file or directory @ rb_sysopen - {path} (Errno::ENOENT)\n"
        ),
    };
    let _ = std::io::stderr().write_all(format!("{head}{from}").as_bytes());
}

/// Lines plugins log while being configured, in the supervisor (`worker` false) or the
/// worker (`#0 ` prefix): sig-SIGTERM.log's forward server and sample storage lines.
pub fn plugin_config_lines(log: &Log, plugins: &[Plugin], worker: bool) {
    let w = if worker { "#0 " } else { "" };
    for p in plugins {
        match (p.category, p.type_.as_str()) {
            (Category::Output, "forward") => {
                for s in p.element.children.iter().filter(|c| c.name == "server") {
                    let host = s.param("host").unwrap_or("127.0.0.1");
                    let port = s.param("port").unwrap_or("24224");
                    log.info(&format!(
                        "{w}{}adding forwarding server '{host}:{port}' host=\"{host}\" port={port} weight=60 plugin_id=\"{}\"",
                        p.log_prefix(),
                        p.plugin_id
                    ));
                }
            }
            (Category::Input, "sample" | "dummy") => {
                for _ in 0..2 {
                    log.warn(&format!(
                        "{w}{}both of Plugin @id and path for <storage> are not specified. Using on-memory store.",
                        p.log_prefix()
                    ));
                }
            }
            _ => {}
        }
    }
}

/// The order plugins are configured in (outputs/filters, then sources), which is also the
/// order of their configure-time lines (sig-SIGTERM.log: forward server before sample).
pub fn configure_order(plugins: &[Plugin]) -> Vec<Plugin> {
    let mut v: Vec<Plugin> = plugins
        .iter()
        .filter(|p| p.category != Category::Input)
        .cloned()
        .collect();
    v.extend(
        plugins
            .iter()
            .filter(|p| p.category == Category::Input)
            .cloned(),
    );
    v
}

pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cli = match parse_args(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let log = Log {
        path: cli.log_path.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if cli.under_supervisor {
        return rt.block_on(worker::run(cli, log));
    }
    if cli.dry_run && crate::common::dry_run_passes() {
        return 0;
    }
    // The config is parsed before the logger exists, so a syntax error is a bare
    // backtrace (startup-bad-syntax.log, dryrun-bad-syntax.log): exit 1.
    let root = match read_config(&cli.config) {
        Ok(r) => r,
        Err(e) => {
            print_uncaught(&e);
            event(
                AGENT,
                serde_json::json!({"event": "exit", "code": 1, "role": "supervisor"}),
            );
            return 1;
        }
    };
    log.info("init supervisor logger path=nil rotate_age=nil rotate_size=nil");
    log.info(&format!(
        "parsing config file is succeeded path={}",
        crate::json::quote(&cli.config)
    ));
    if cli.dry_run {
        // dryrun-bad-plugin.log; success prints the same first lines and exits 0.
        log.info(&format!(
            "starting fluentd-{} as dry run mode ruby=\"3.1.2\"",
            version()
        ));
    }
    if let Err((class, msg)) = config::validate(&root) {
        // startup-bad-plugin.log / dryrun-bad-plugin.log: exit 1.
        log.error(&format!(
            "config error file={} error_class={class} error={}",
            crate::json::quote(&cli.config),
            crate::json::quote(&msg)
        ));
        event(
            AGENT,
            serde_json::json!({"event": "exit", "code": 1, "role": "supervisor"}),
        );
        return 1;
    }
    if cli.dry_run {
        return 0;
    }
    rt.block_on(supervisor::run(cli, log, root))
}
