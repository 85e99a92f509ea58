//! Slack Socket Mode: Slack's deliveries over WebSockets the gateway opens itself, for teams
//! that cannot give Slack a public URL. slack-morphism's Socket Mode client manager calls
//! `apps.connections.open` with the app-level token (`xapp-…`) through the same configurable
//! API base URL as the Web API client, connects to the `wss://` URL it returns, pings, and
//! reconnects when Slack sends `disconnect` or the socket drops.
//!
//! The envelopes are read here from their raw JSON (rather than through slack-morphism's typed
//! events) so they reach the same parser and dispatch as the HTTP routes
//! ([`super::parse`]'s `*_json` functions, [`SlackGateway::dispatch`]): `events_api`,
//! `slash_commands` and `interactive` envelopes are acknowledged with `{"envelope_id": …}` at
//! once — the core runs in the background — and a second delivery of the same event or
//! interaction (Slack's retries, `retry_attempt` > 0, or the same envelope on another
//! connection) is acknowledged and not run again. Shapes follow Slack's "Using Socket Mode"
//! and "Socket Mode implementation" pages.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};
use slack_morphism::clients_manager::{
    SlackSocketModeClientsManager, SlackSocketModeClientsManagerFactory,
};
use slack_morphism::listener::SlackClientEventsListenerEnvironment;
use slack_morphism::prelude::*;

use super::client::{api_error, connector, ApiError};
use super::gateway::{now_s, Outcome, SlackGateway};
use super::parse::{self, Malformed, Parsed};
use super::verify::Retry;

/// The app-level token (`xapp-…`, scope `connections:write`). Never printed.
#[derive(Clone)]
pub struct AppToken(String);

impl AppToken {
    pub fn new(text: &str) -> Result<AppToken, ApiError> {
        let t = text.trim();
        if !t.starts_with("xapp-") {
            return Err(ApiError::Config(
                "the Slack app-level token does not start with xapp- (Basic Information → App-Level Tokens)"
                    .into(),
            ));
        }
        Ok(AppToken(t.to_string()))
    }
}

impl std::fmt::Debug for AppToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppToken(<{} bytes>)", self.0.len())
    }
}

/// How the WebSockets are kept.
#[derive(Debug, Clone)]
pub struct SocketOptions {
    /// Connections open at once (Slack spreads envelopes over them; one can reconnect while
    /// the others carry on).
    pub connections: u32,
    /// Wait before retrying when `apps.connections.open` or the connect failed, seconds.
    pub reconnect_after_s: u64,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            connections: SlackClientSocketModeConfig::DEFAULT_CONNECTIONS_COUNT,
            reconnect_after_s: 10,
        }
    }
}

type Manager = Arc<dyn SlackSocketModeClientsManager + Send + Sync>;

/// Running Socket Mode connections; [`SocketMode::shutdown`] closes them.
pub struct SocketMode {
    manager: Manager,
}

impl SocketMode {
    /// Checks the app token with one `apps.connections.open` (a refused token is a
    /// configuration error, said at start rather than retried forever), then opens the
    /// connections. Slack being unreachable is not fatal: the manager keeps retrying.
    pub async fn start(
        gw: Arc<SlackGateway>,
        api_url: &str,
        token: AppToken,
        opts: SocketOptions,
    ) -> Result<SocketMode, ApiError> {
        let client = Arc::new(SlackClient::new(connector(api_url)?));
        let token = SlackApiToken::new(SlackApiTokenValue(token.0));
        match client
            .open_session(&token)
            .apps_connections_open(&SlackApiAppsConnectionOpenRequest::new())
            .await
            .map_err(|e| api_error("apps.connections.open", e))
        {
            Ok(_) => {}
            Err(e @ ApiError::Slack { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "Slack Socket Mode: cannot reach Slack yet; retrying in the background")
            }
        }
        let env = Arc::new(SlackClientEventsListenerEnvironment::new(client.clone()));
        let manager: Manager = client.http_api.connector.new_clients_manager(env);
        let listener = Arc::new(Envelopes {
            gw,
            manager: Arc::downgrade(&manager),
        });
        let config = SlackClientSocketModeConfig::new()
            .with_max_connections_count(opts.connections.max(1))
            // slack-morphism's interval panics on zero.
            .with_reconnect_timeout_in_seconds(opts.reconnect_after_s.max(1))
            .with_initial_backoff_in_seconds(1);
        manager
            .register_new_token(&config, token, listener)
            .await
            .map_err(|e| api_error("apps.connections.open", e))?;
        manager.start().await;
        Ok(SocketMode { manager })
    }

    /// Closes the connections (Slack then delivers to nobody; it retries later deliveries).
    pub async fn shutdown(&self) {
        self.manager.shutdown().await;
    }
}

/// One Socket Mode message: `hello`, `disconnect`, or an envelope.
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: Option<String>,
    envelope_id: Option<String>,
    payload: Option<Value>,
    retry_attempt: Option<u32>,
    retry_reason: Option<String>,
    /// `disconnect`: `warning`, `refresh_requested`, `link_disabled`.
    reason: Option<String>,
    /// `hello`.
    num_connections: Option<u32>,
}

/// The acknowledgement Slack waits for (within 3 s, or it retries).
fn ack(envelope_id: &str) -> String {
    json!({ "envelope_id": envelope_id }).to_string()
}

/// A payload parser of [`super::parse`].
type PayloadParser = fn(Value) -> Result<Parsed, Malformed>;

/// What one envelope type carries and how it is parsed.
fn parser(kind: &str) -> Option<(&'static str, PayloadParser)> {
    match kind {
        "events_api" => Some(("socket events_api", parse::event_json)),
        "slash_commands" => Some(("socket slash_commands", parse::command_json)),
        "interactive" => Some(("socket interactive", parse::interaction_json)),
        _ => None,
    }
}

/// Reads the envelopes of every connection.
struct Envelopes {
    gw: Arc<SlackGateway>,
    manager: Weak<dyn SlackSocketModeClientsManager + Send + Sync>,
}

impl Envelopes {
    async fn reconnect(&self, id: &SlackSocketModeWssClientId) {
        if let Some(m) = self.manager.upgrade() {
            m.restart_client(id).await;
        }
    }

    /// Answers one message; `Some(ack)` for every envelope that has an id, whatever became of
    /// it (a malformed or unknown one too: Slack resending it would not make it better).
    fn envelope(&self, env: Envelope) -> Option<String> {
        let kind = env.kind.unwrap_or_default();
        let Some(id) = env.envelope_id.filter(|i| !i.is_empty()) else {
            tracing::warn!(
                kind,
                "Slack Socket Mode message without an envelope_id; ignored"
            );
            return None;
        };
        let Some((route, parse)) = parser(&kind) else {
            tracing::debug!(
                kind,
                "Slack Socket Mode envelope type not handled; acknowledged"
            );
            return Some(ack(&id));
        };
        let Some(payload) = env.payload else {
            tracing::warn!(route, envelope = %id, "Slack Socket Mode envelope without a payload; acknowledged");
            return Some(ack(&id));
        };
        match parse(payload) {
            Err(m) => {
                tracing::warn!(route, envelope = %id, reason = %m, "refused a malformed Slack Socket Mode envelope (acknowledged so it is not resent)");
            }
            Ok(parsed) => {
                let retry = env.retry_attempt.filter(|n| *n > 0).map(|num| Retry {
                    num,
                    reason: env.retry_reason.unwrap_or_default(),
                });
                if let Outcome::Challenge(_) =
                    self.gw.dispatch(route, parsed, retry.as_ref(), now_s())
                {
                    tracing::debug!(
                        route,
                        "url_verification over Socket Mode; nothing to answer"
                    );
                }
            }
        }
        Some(ack(&id))
    }
}

#[async_trait]
impl SlackSocketModeClientListener for Envelopes {
    async fn on_message(
        &self,
        client_id: &SlackSocketModeWssClientId,
        message_body: String,
    ) -> Option<String> {
        let env: Envelope = match serde_json::from_str(&message_body) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "Slack Socket Mode message is not JSON; ignored");
                return None;
            }
        };
        match env.kind.as_deref() {
            Some("hello") => {
                tracing::info!(
                    connection = %client_id.to_string(),
                    num_connections = env.num_connections,
                    "Slack Socket Mode connected"
                );
                None
            }
            Some("disconnect") => {
                tracing::info!(
                    connection = %client_id.to_string(),
                    reason = env.reason.as_deref().unwrap_or("unknown"),
                    "Slack asked this Socket Mode connection to reconnect"
                );
                self.reconnect(client_id).await;
                None
            }
            _ => self.envelope(env),
        }
    }

    async fn on_error(&self, error: Box<dyn std::error::Error + Send + Sync + 'static>) {
        tracing::warn!(error = %error, "Slack Socket Mode connection error");
    }

    async fn on_disconnect(&self, client_id: &SlackSocketModeWssClientId) {
        tracing::info!(connection = %client_id.to_string(), "Slack Socket Mode connection closed; reconnecting");
        self.reconnect(client_id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_token_is_checked_and_never_shown() {
        assert!(AppToken::new("xoxb-bot").is_err());
        assert!(AppToken::new("").is_err());
        let t = AppToken::new(" xapp-1-A1-2-abc\n").unwrap();
        assert_eq!(format!("{t:?}"), "AppToken(<15 bytes>)");
    }

    #[test]
    fn slacks_documented_envelopes_are_read() {
        // "Socket Mode implementation": hello, disconnect, and an events_api envelope.
        let hello: Envelope = serde_json::from_str(
            r#"{"type":"hello","num_connections":1,"debug_info":{"host":"applink-7fc4fdbb64-4x5xq","build_number":10,"approximate_connection_time":18060},"connection_info":{"app_id":"A01K58AR4RF"}}"#,
        )
        .unwrap();
        assert_eq!(
            (hello.kind.as_deref(), hello.num_connections),
            (Some("hello"), Some(1))
        );
        let bye: Envelope = serde_json::from_str(
            r#"{"type":"disconnect","reason":"refresh_requested","debug_info":{"host":"applink-7fc4fdbb64-4x5xq"}}"#,
        )
        .unwrap();
        assert_eq!(bye.reason.as_deref(), Some("refresh_requested"));
        let ev: Envelope = serde_json::from_str(
            r#"{"payload":{"type":"event_callback"},"envelope_id":"dbdd0ef3-1543-4f94-bfb4-133d0e6c1545","type":"events_api","accepts_response_payload":false,"retry_attempt":1,"retry_reason":"timeout"}"#,
        )
        .unwrap();
        assert_eq!(ev.retry_attempt, Some(1));
        assert_eq!(
            ack(ev.envelope_id.as_deref().unwrap()),
            r#"{"envelope_id":"dbdd0ef3-1543-4f94-bfb4-133d0e6c1545"}"#
        );
    }
}
