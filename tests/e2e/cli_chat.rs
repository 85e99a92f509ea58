//! The chat set-up commands as an operator runs them, on the real binary.
//!
//! `flotilla chat discord register`, reading the same `[chat.discord]` as `serve` (bot token
//! from a 0600 file), against the fake Discord API on loopback, which checks the bot token and
//! keeps the registered commands like Discord's bulk overwrite. Registering twice leaves the
//! same set (same command id); a guild is its own scope; a refused token exits 4 and changes
//! nothing.
//!
//! `flotilla chat teams package`: the zip it writes is read back as Teams reads an upload —
//! the manifest, and icons of the sizes and colours Teams requires.

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

const TEAMS_APP: &str = "7f5e1c0a-0000-4000-8000-0000000000b0";

/// An image's width, height and RGBA pixels (8-bit RGBA, non-interlaced: what the package
/// ships), read from its IHDR and inflated IDAT with every PNG row filter undone.
fn png_rgba(bytes: &[u8]) -> (u32, u32, Vec<[u8; 4]>) {
    use std::io::Read;
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let (mut ihdr, mut idat) = (None, Vec::new());
    let mut at = 8;
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let kind = &bytes[at + 4..at + 8];
        let data = &bytes[at + 8..at + 8 + len];
        match kind {
            b"IHDR" => ihdr = Some(data.to_vec()),
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        at += 12 + len;
    }
    let ihdr = ihdr.expect("an IHDR chunk");
    let w = u32::from_be_bytes(ihdr[0..4].try_into().unwrap());
    let h = u32::from_be_bytes(ihdr[4..8].try_into().unwrap());
    assert_eq!(
        (ihdr[8], ihdr[9], ihdr[12]),
        (8, 6, 0),
        "8-bit RGBA, not interlaced"
    );
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(idat.as_slice())
        .read_to_end(&mut raw)
        .unwrap();
    let stride = w as usize * 4;
    assert_eq!(raw.len(), h as usize * (stride + 1), "IDAT holds every row");
    let mut prev = vec![0u8; stride];
    let mut pixels = Vec::new();
    for row in raw.chunks(stride + 1) {
        let mut cur = row[1..].to_vec();
        for i in 0..stride {
            let a = if i >= 4 { cur[i - 4] as i16 } else { 0 };
            let (b, c) = (prev[i] as i16, if i >= 4 { prev[i - 4] as i16 } else { 0 });
            let pred = match row[0] {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                f => panic!("row filter {f}"),
            };
            cur[i] = cur[i].wrapping_add(pred as u8);
        }
        pixels.extend(cur.chunks(4).map(|p| [p[0], p[1], p[2], p[3]]));
        prev = cur;
    }
    (w, h, pixels)
}

#[tokio::test]
async fn teams_package_is_an_uploadable_zip_naming_the_bot_and_needs_an_app_id() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("flotilla.toml");
    // The password file is absent on purpose: packaging reads only the id and the name.
    std::fs::write(
        &cfg,
        format!(
            "[chat.teams]\nenabled = true\napp_id = \"{TEAMS_APP}\"\napp_name = \"Fleet Ops\"\n\
             app_password_file = \"/nonexistent/teams-password\"\n"
        ),
    )
    .unwrap();
    let out = dir.path().join("flotilla-teams.zip");
    let args = |cfg: &Path| {
        vec![
            "chat".to_string(),
            "teams".into(),
            "package".into(),
            "--config".into(),
            cfg.to_str().unwrap().into(),
            "--domain".into(),
            "flotilla.example.com".into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let a = args(&cfg);
    let stdout = ok(&run_flotilla(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        TIMEOUT,
    )
    .await);
    assert!(stdout.contains(TEAMS_APP), "{stdout}");

    let mut zip = zip::ZipArchive::new(std::fs::File::open(&out).unwrap()).expect("a zip");
    let mut names: Vec<String> = zip.file_names().map(String::from).collect();
    names.sort();
    assert_eq!(names, ["color.png", "manifest.json", "outline.png"]);
    let mut read = |name: &str| {
        let mut b = Vec::new();
        zip.by_name(name).unwrap().read_to_end(&mut b).unwrap();
        b
    };
    let m: serde_json::Value = serde_json::from_slice(&read("manifest.json")).expect("JSON");
    let version: Vec<u32> = m["manifestVersion"]
        .as_str()
        .unwrap()
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(version >= vec![1, 16], "{m}");
    assert_eq!(m["id"], TEAMS_APP);
    assert_eq!(m["bots"][0]["botId"], TEAMS_APP);
    assert_eq!(m["name"]["short"], "Fleet Ops");
    assert_eq!(
        m["bots"][0]["scopes"],
        serde_json::json!(["personal", "team", "groupChat"])
    );
    assert_eq!(
        m["validDomains"],
        serde_json::json!(["flotilla.example.com"])
    );
    assert_eq!(
        m["developer"]["websiteUrl"],
        "https://flotilla.example.com/"
    );
    for key in ["version", "developer", "description", "icons"] {
        assert!(!m[key].is_null(), "{key} missing: {m}");
    }
    let commands = m["bots"][0]["commandLists"][0]["commands"]
        .as_array()
        .unwrap();
    assert!(commands.len() <= 10, "Teams takes at most 10: {commands:?}");
    assert!(
        commands.iter().any(|c| c["title"] == "restart"),
        "{commands:?}"
    );
    assert_eq!(m["icons"]["color"], "color.png");
    assert_eq!(m["icons"]["outline"], "outline.png");

    let (w, h, _) = png_rgba(&read("color.png"));
    assert_eq!((w, h), (192, 192), "color icon");
    let (w, h, outline) = png_rgba(&read("outline.png"));
    assert_eq!((w, h), (32, 32), "outline icon");
    assert!(
        outline
            .iter()
            .all(|p| p[3] == 0 || (p[3] == 255 && p[..3] == [255, 255, 255])),
        "the outline is white on transparent"
    );
    assert!(outline.iter().any(|p| p[3] == 255) && outline.iter().any(|p| p[3] == 0));

    // No app id: refused with the reason, and nothing written.
    std::fs::remove_file(&out).unwrap();
    let bare = dir.path().join("bare.toml");
    std::fs::write(&bare, "[chat.teams]\nenabled = true\n").unwrap();
    let a = args(&bare);
    let refused = run_flotilla(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        TIMEOUT,
    )
    .await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("chat.teams.app_id is not set"), "{stderr}");
    assert!(!out.exists());
}
