//! The Teams app package `flotilla chat teams package` writes: `manifest.json` (schema 1.16)
//! naming the bot, with the two icons Teams requires (`color.png` 192×192, `outline.png`
//! 32×32 white on transparent, drawn by `chat-gateways/teams/icons.py`), zipped at the top
//! level as Teams' *Upload an app* expects.

use std::io::Write;

use serde_json::{json, Value};

use crate::discord::commands::SUBS;

/// The manifest schema version written.
pub const MANIFEST_VERSION: &str = "1.16";
pub const COLOR_PNG: &[u8] = include_bytes!("../../teams/color.png");
pub const OUTLINE_PNG: &[u8] = include_bytes!("../../teams/outline.png");

/// The commands Teams suggests in the compose box (at most 10 per list): the rule planner's
/// words, described as for Discord's `/flotilla`. `ask` is left out: in Teams any words are a
/// request.
const MENU: [&str; 10] = [
    "agents",
    "agent",
    "summary",
    "restart",
    "status",
    "audit",
    "subscribe",
    "subscriptions",
    "unsubscribe",
    "help",
];

/// What the package is built from.
#[derive(Debug, Clone)]
pub struct PackageSpec {
    /// The Azure Bot's Microsoft App ID (`chat.teams.app_id`): the manifest's `id` and
    /// `bots[0].botId`.
    pub app_id: String,
    /// The name Teams shows (`chat.teams.app_name`, at most 30 characters).
    pub app_name: String,
    /// The manifest's version; Teams wants a higher one for each update of an uploaded app.
    pub version: String,
    /// Public host names of the chat listener (`validDomains`).
    pub domains: Vec<String>,
    /// `developer.name`.
    pub developer: String,
    /// `developer.websiteUrl`, also its privacy and terms-of-use URLs.
    pub website_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("chat.teams.app_id is not set: the package names the bot by its Microsoft App ID (Azure Bot → Configuration)")]
    NoAppId,
    #[error("chat.teams.app_id {0:?} is not a GUID (Teams needs the Azure Bot's Microsoft App ID, e.g. 00000000-0000-0000-0000-000000000000)")]
    AppIdNotGuid(String),
    #[error("chat.teams.app_name {0:?} must be 1 to 30 characters (Teams' short name)")]
    BadName(String),
    #[error("{0:?} is not a host name (validDomains takes the public host of chat.listen, without scheme or path)")]
    BadDomain(String),
    #[error("{0:?} is not an https:// URL")]
    BadUrl(String),
    #[error("writing the package: {0}")]
    Zip(#[from] zip::result::ZipError),
    #[error("writing the package: {0}")]
    Io(#[from] std::io::Error),
}

fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The manifest, after checking what Teams would refuse on upload.
pub fn manifest(spec: &PackageSpec) -> Result<Value, PackageError> {
    let app_id = spec.app_id.trim();
    if app_id.is_empty() {
        return Err(PackageError::NoAppId);
    }
    if !is_guid(app_id) {
        return Err(PackageError::AppIdNotGuid(app_id.into()));
    }
    let name = spec.app_name.trim();
    if name.is_empty() || name.chars().count() > 30 {
        return Err(PackageError::BadName(spec.app_name.clone()));
    }
    if let Some(d) = spec.domains.iter().find(|d| !is_host(d)) {
        return Err(PackageError::BadDomain(d.clone()));
    }
    let url = spec.website_url.trim();
    if !url.starts_with("https://") || url.len() <= "https://".len() || url.contains(' ') {
        return Err(PackageError::BadUrl(url.into()));
    }
    let commands: Vec<Value> = MENU
        .iter()
        .filter_map(|m| SUBS.iter().find(|s| s.name == *m))
        .map(|s| json!({"title": s.name, "description": s.description}))
        .collect();
    let scopes = ["personal", "team", "groupChat"];
    Ok(json!({
        "$schema": format!("https://developer.microsoft.com/en-us/json-schemas/teams/v{MANIFEST_VERSION}/MicrosoftTeams.schema.json"),
        "manifestVersion": MANIFEST_VERSION,
        "version": spec.version,
        "id": app_id,
        "developer": {
            "name": spec.developer,
            "websiteUrl": url,
            "privacyUrl": url,
            "termsOfUseUrl": url,
        },
        "name": {"short": name, "full": format!("{name} — Fluent Bit and Fluentd fleet control")},
        "description": {
            "short": "Ask about and act on your Fluent Bit / Fluentd fleet",
            "full": "Search agents, read their health and configuration, restart them with a preview \
                     and confirmation, follow the progress, and get fleet alerts in a channel. \
                     Every action is checked against your Flotilla role and audited.",
        },
        "icons": {"color": "color.png", "outline": "outline.png"},
        "accentColor": "#1F5FB8",
        "bots": [{
            "botId": app_id,
            "scopes": scopes,
            "supportsFiles": false,
            "isNotificationOnly": false,
            "commandLists": [{"scopes": scopes, "commands": commands}],
        }],
        "permissions": ["identity", "messageTeamMembers"],
        "validDomains": spec.domains,
    }))
}

/// The zipped package: `manifest.json`, `color.png`, `outline.png`.
pub fn build(spec: &PackageSpec) -> Result<Vec<u8>, PackageError> {
    let manifest = serde_json::to_vec_pretty(&manifest(spec)?).map_err(std::io::Error::from)?;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in [
        ("manifest.json", manifest.as_slice()),
        ("color.png", COLOR_PNG),
        ("outline.png", OUTLINE_PNG),
    ] {
        zip.start_file(name, opts)?;
        zip.write_all(bytes)?;
    }
    Ok(zip.finish()?.into_inner())
}
