//! `flotilla chat discord register` as an operator runs it: the real binary, reading the same
//! `[chat.discord]` as `serve` (bot token from a 0600 file), against the fake Discord API on
//! loopback, which checks the bot token and keeps the registered commands like Discord's bulk
//! overwrite. Registering twice leaves the same set (same command id); a guild is its own
//! scope; a refused token exits 4 and changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use flotilla_e2e::fake_discord::FakeDiscord;
use flotilla_e2e::run_flotilla;
use flotilla_e2e::server::toml_str;

const APP: &str = "900000000000000123";
const TOKEN: &str = "e2e-register-bot-token";
const TIMEOUT: Duration = Duration::from_secs(30);

/// A server configuration with `[chat.discord]` pointing at `fake`, the bot token `token` in
/// a 0600 file.
fn config(dir: &Path, fake: &FakeDiscord, token: &str) -> PathBuf {
    let token_file = dir.join("discord-bot-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = dir.join("flotilla.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {}\n[chat]\nlisten = \"127.0.0.1:0\"\n[chat.discord]\nenabled = true\n\
             application_id = \"{APP}\"\npublic_key = \"{}\"\nbot_token_file = {}\napi_url = \"{}\"\n",
            toml_str(&dir.join("data")),
            "ab".repeat(32),
            toml_str(&token_file),
            fake.api_url()
        ),
    )
    .unwrap();
    path
}

async fn register(config: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "chat",
        "discord",
        "register",
        "--config",
        config.to_str().unwrap(),
    ];
    args.extend(extra);
    run_flotilla(&args, &[], TIMEOUT).await
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "exit {}; stdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn register_is_idempotent_globally_and_per_guild_and_needs_the_bot_token() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start(APP, TOKEN).await;
    let cfg = config(dir.path(), &fake, TOKEN);

    let first = ok(&register(&cfg, &[]).await);
    assert!(first.contains("registered /flotilla globally"), "{first}");
    let global = fake.commands("global");
    assert_eq!(global.len(), 1, "{global:?}");
    let (id, def) = global[0].clone();
    assert_eq!(def["name"], "flotilla");
    let subs: Vec<&str> = def["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    for want in ["ask", "agents", "restart", "status", "subscribe", "help"] {
        assert!(subs.contains(&want), "{want} not registered: {subs:?}");
    }
    assert!(first.contains(&id), "the id is reported: {first}");

    // Again: the same single command, same id.
    ok(&register(&cfg, &[]).await);
    assert_eq!(
        fake.commands("global"),
        global,
        "registering twice changes nothing"
    );

    // A guild is a scope of its own; the global set is untouched.
    let out = ok(&register(&cfg, &["--guild", "700000000000000001"]).await);
    assert!(out.contains("in guild 700000000000000001"), "{out}");
    assert_eq!(fake.commands("700000000000000001").len(), 1);
    assert_eq!(fake.commands("global"), global);
    for c in fake.calls_of("commands") {
        assert_eq!(
            c.authorization.as_deref(),
            Some(format!("Bot {TOKEN}").as_str()),
            "every registration is made as the bot"
        );
    }

    // A bad guild id is a usage error, before Discord is asked.
    let calls = fake.calls().len();
    let bad = register(&cfg, &["--guild", "my-server"]).await;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert_eq!(fake.calls().len(), calls);

    // A token Discord refuses: exit 4, naming the refusal, and nothing registered.
    let wrong = config(dir.path(), &fake, "not-the-bot-token");
    let out = register(&wrong, &["--guild", "700000000000000002"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    assert!(
        !stderr.contains("not-the-bot-token"),
        "the token is never printed"
    );
    assert!(fake.commands("700000000000000002").is_empty());
}
