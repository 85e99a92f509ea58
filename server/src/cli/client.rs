//! The operator CLI's connection to a server: which server and token (flags, environment, or
//! the client config file, in that order) and the REST calls, each sent with
//! `X-Flotilla-Channel: cli` so the audit trail names the channel. REST error codes become
//! the CLI's exit codes here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Exit, Failure, Format};

/// The server a client command talks to. Secrets never come from flags: the token is read
/// from a file or the FLOTILLA_TOKEN variable.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientArgs {
    /// The Flotilla operator listener, e.g. http://127.0.0.1:8080 [client config: server;
    /// default http://127.0.0.1:8080].
    #[arg(long, env = "FLOTILLA_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// File holding the API bearer token [else FLOTILLA_TOKEN; client config: token_file].
    #[arg(long, env = "FLOTILLA_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM file of CA certificates to trust for an https:// server besides the web roots
    /// [client config: ca_file].
    #[arg(long, env = "FLOTILLA_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client config file (TOML: server, token_file, ca_file, output)
    /// [default: $XDG_CONFIG_HOME/flotilla/client.toml, else ~/.config/flotilla/client.toml].
    #[arg(long, env = "FLOTILLA_CLIENT_CONFIG", value_name = "FILE")]
    pub client_config: Option<PathBuf>,
}

/// The client config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    server: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    output: Option<Format>,
}

/// Where and as whom to connect, resolved.
#[derive(Clone)]
pub struct Settings {
    pub server: String,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// The config file's default output format.
    pub output: Option<Format>,
}

const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

fn default_client_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("flotilla").join("client.toml"))
}

/// A path from the config file: `~/` is the home directory, a relative path is relative to
/// the file's directory.
fn file_path(p: &Path, config: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    if p.is_relative() {
        if let Some(dir) = config.parent() {
            return dir.join(p);
        }
    }
    p.to_path_buf()
}

impl ClientArgs {
    /// Flags and environment first, then the client config file, then the defaults.
    pub fn resolve(&self) -> Result<Settings, Failure> {
        self.resolve_with(true)
    }

    /// [`ClientArgs::resolve`] without reading any token (for `/readyz`, which needs none).
    pub fn resolve_server(&self) -> Result<Settings, Failure> {
        self.resolve_with(false)
    }

    fn resolve_with(&self, with_token: bool) -> Result<Settings, Failure> {
        let usage = |m: String| Failure::new(Exit::Usage, m);
        let (file, path) = match (&self.client_config, default_client_config()) {
            (Some(p), _) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    usage(format!("cannot read client config {}: {e}", p.display()))
                })?;
                (parse_client_file(&text, p)?, p.clone())
            }
            (None, Some(p)) => match std::fs::read_to_string(&p) {
                Ok(text) => (parse_client_file(&text, &p)?, p),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (ClientFile::default(), p),
                Err(e) => {
                    return Err(usage(format!(
                        "cannot read client config {}: {e}",
                        p.display()
                    )))
                }
            },
            (None, None) => (ClientFile::default(), PathBuf::new()),
        };
        let server = self
            .server
            .clone()
            .or(file.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        let token_file = self
            .token_file
            .clone()
            .map(|f| (f, "--token-file/FLOTILLA_TOKEN_FILE"));
        let env_token = std::env::var("FLOTILLA_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let token = match (token_file, env_token) {
            _ if !with_token => None,
            (Some((f, from)), _) => Some(read_token(&f, from)?),
            (None, Some(t)) => Some(t),
            (None, None) => match &file.token_file {
                Some(f) => Some(read_token(&file_path(f, &path), "token_file")?),
                None => None,
            },
        };
        let ca_file = self
            .ca_file
            .clone()
            .or_else(|| file.ca_file.as_ref().map(|f| file_path(f, &path)));
        Ok(Settings {
            server,
            token,
            ca_file,
            output: file.output,
        })
    }
}

fn parse_client_file(text: &str, path: &Path) -> Result<ClientFile, Failure> {
    toml::from_str(text).map_err(|e| {
        Failure::new(
            Exit::Usage,
            format!("client config {}: {e}", path.display()),
        )
    })
}

fn read_token(path: &Path, from: &str) -> Result<String, Failure> {
    flotilla_mcp::read_token_file(path)
        .map_err(|e| Failure::new(Exit::Usage, format!("{from}: {e}")))
}

/// How long one REST call may take.
const TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The REST API of one server, as one token's caller, on channel `cli`.
pub struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    pub fn new(s: &Settings) -> Result<Api, Failure> {
        let usage = |m: String| Failure::new(Exit::Usage, m);
        let base = s.server.trim().trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&base)
            .map_err(|e| usage(format!("server {:?} is not a URL: {e}", s.server)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(usage(format!(
                "server {:?} must start with http:// or https://",
                s.server
            )));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("flotilla-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &s.ca_file {
            for cert in load_ca(path).map_err(usage)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| Failure::new(Exit::Error, format!("HTTP client: {e}")))?;
        Ok(Api {
            base,
            token: s.token.clone(),
            http,
        })
    }

    /// One call; a non-2xx answer becomes a [`Failure`] with the exit code of its error code.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .header("X-Flotilla-Channel", "cli")
            .query(query);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            Failure::new(
                Exit::Error,
                format!("cannot reach Flotilla at {}: {e}", self.base),
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            Failure::new(
                Exit::Error,
                format!("reading the answer of {method} {path}: {e}"),
            )
        })?;
        let v: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }))
        };
        if status.is_success() {
            return Ok(v);
        }
        let code = v["error"]["code"].as_str().unwrap_or("");
        let message = v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status} from {method} {path}"));
        let mut message = if code.is_empty() {
            message
        } else {
            format!("{message} ({code})")
        };
        if status == StatusCode::UNAUTHORIZED && self.token.is_none() {
            message.push_str(
                "; no token was sent: give --token-file, FLOTILLA_TOKEN_FILE or FLOTILLA_TOKEN",
            );
        }
        Err(Failure::new(exit_for(status, code), message))
    }

    /// `GET /readyz` (no token needed): Ok when it answers 200.
    pub async fn ready(&self) -> Result<(), Failure> {
        let url = format!("{}/readyz", self.base);
        let fail = |m: String| Failure::new(Exit::Error, m);
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| fail(format!("cannot reach Flotilla at {}: {e}", self.base)))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            Err(fail(format!("{url}: HTTP {status} {}", body.trim())))
        }
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, Failure> {
        self.call(Method::GET, path, query, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        self.call(Method::POST, path, &[], Some(body)).await
    }
}

/// The exit code of a REST error (by its stable code, else by its status).
pub fn exit_for(status: StatusCode, code: &str) -> Exit {
    match code {
        "unauthorized" | "forbidden" => Exit::Refused,
        "not_found" | "no_route" | "no_targets" => Exit::NotFound,
        "bad_request" | "malformed_json" | "invalid_query" | "invalid_params"
        | "ambiguous_agent" => Exit::Usage,
        "targets_changed" => Exit::NotConfirmed,
        _ => match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Exit::Refused,
            StatusCode::NOT_FOUND => Exit::NotFound,
            StatusCode::BAD_REQUEST => Exit::Usage,
            _ => Exit::Error,
        },
    }
}

fn load_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        format!(
            "the CA file {} is not PEM certificates: {e}",
            path.display()
        )
    })?;
    if certs.is_empty() {
        return Err(format!(
            "the CA file {} holds no certificate",
            path.display()
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_error_codes_map_to_exit_codes() {
        for (status, code, exit) in [
            (401, "unauthorized", Exit::Refused),
            (403, "forbidden", Exit::Refused),
            (404, "not_found", Exit::NotFound),
            (422, "no_targets", Exit::NotFound),
            (400, "invalid_query", Exit::Usage),
            (400, "invalid_params", Exit::Usage),
            (409, "targets_changed", Exit::NotConfirmed),
            (409, "conflict", Exit::Error),
            (409, "ambiguous_agent", Exit::Usage),
            (422, "capability_missing", Exit::Error),
            (503, "storage_unavailable", Exit::Error),
            (401, "", Exit::Refused),
            (404, "", Exit::NotFound),
        ] {
            assert_eq!(
                exit_for(StatusCode::from_u16(status).unwrap(), code),
                exit,
                "{status} {code}"
            );
        }
    }

    #[test]
    fn config_file_paths_are_relative_to_the_file() {
        let cfg = Path::new("/etc/flotilla/client.toml");
        assert_eq!(
            file_path(Path::new("token"), cfg),
            PathBuf::from("/etc/flotilla/token")
        );
        assert_eq!(file_path(Path::new("/t"), cfg), PathBuf::from("/t"));
        let err = parse_client_file("sever = \"x\"\n", cfg).err().unwrap();
        assert_eq!(err.exit, Exit::Usage);
        assert!(err.message.contains("sever"), "{}", err.message);
    }
}
