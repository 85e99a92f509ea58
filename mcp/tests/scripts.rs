//! The client set-up scripts (`mcp/scripts/configure-*.sh`) against a temporary HOME: they
//! produce a config the client would accept (valid JSON / TOML with the expected entry), keep
//! everything else, back up what they change, and are idempotent; they refuse to write an
//! entry without a token (it could only answer "unauthorized") or with a command that is not
//! there.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

fn run(name: &str, home: &Path, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(script(name))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("CODEX_HOME")
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn backups(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".bak-")
        })
        .count()
}

fn fake_flotilla(home: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let bin = home.join("bin/flotilla");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::write(&bin, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin.to_string_lossy().to_string()
}

/// A token file in `home`; its path.
fn token_file(home: &Path) -> String {
    let t = home.join("token");
    std::fs::write(&t, "a-token-long-enough-0123\n").unwrap();
    t.to_string_lossy().to_string()
}

#[test]
fn claude_desktop_config_is_valid_complete_and_idempotent() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let bin = fake_flotilla(h);
    let token = h.join("token");
    std::fs::write(&token, "t").unwrap();
    let token = token.to_string_lossy().to_string();
    let dir = if cfg!(target_os = "macos") {
        h.join("Library/Application Support/Claude")
    } else {
        h.join(".config/Claude")
    };
    let cfg = dir.join("claude_desktop_config.json");
    // An existing config with another server and a setting of its own.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        &cfg,
        r#"{"globalShortcut": "Ctrl+Space", "mcpServers": {"other": {"command": "x", "args": []}}}"#,
    )
    .unwrap();
    let args = [
        "--command",
        &bin,
        "--server",
        "http://10.0.0.5:8080",
        "--token-file",
        &token,
        "--read-only",
    ];
    run("configure-claude-desktop.sh", h, &args);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    assert_eq!(doc["globalShortcut"], "Ctrl+Space");
    assert_eq!(doc["mcpServers"]["other"]["command"], "x");
    // Logging quieted as in the Codex entry: the client shows a server's stderr as errors.
    assert_eq!(
        doc["mcpServers"]["flotilla"],
        json!({"command": bin, "args": ["mcp", "--server", "http://10.0.0.5:8080", "--token-file", token, "--read-only"],
               "env": {"FLOTILLA_LOG": "warn"}})
    );
    assert_eq!(backups(&dir), 1);
    let first = std::fs::read_to_string(&cfg).unwrap();
    let out = run("configure-claude-desktop.sh", h, &args);
    assert!(out.contains("already up to date"), "{out}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), first);
    assert_eq!(backups(&dir), 1, "an unchanged entry makes no backup");
    // A change (no longer read-only) updates the entry in place.
    run("configure-claude-desktop.sh", h, &args[..6]);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    assert_eq!(
        doc["mcpServers"]["flotilla"]["args"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    assert_eq!(doc["mcpServers"].as_object().unwrap().len(), 2);

    // From nothing: the directory and file are created.
    let fresh = tempfile::tempdir().unwrap();
    let bin = fake_flotilla(fresh.path());
    let tok = token_file(fresh.path());
    run(
        "configure-claude-desktop.sh",
        fresh.path(),
        &["--command", &bin, "--token-file", &tok],
    );
    let p = if cfg!(target_os = "macos") {
        fresh
            .path()
            .join("Library/Application Support/Claude/claude_desktop_config.json")
    } else {
        fresh
            .path()
            .join(".config/Claude/claude_desktop_config.json")
    };
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    assert_eq!(
        doc["mcpServers"]["flotilla"]["args"],
        json!([
            "mcp",
            "--server",
            "http://127.0.0.1:8080",
            "--token-file",
            tok
        ])
    );
}

/// A temporary HOME with a fake `flotilla` and an empty `~/.codex`: (home, flotilla path,
/// `~/.codex`, `~/.codex/config.toml`).
fn codex_home() -> (tempfile::TempDir, String, PathBuf, PathBuf) {
    let home = tempfile::tempdir().unwrap();
    let bin = fake_flotilla(home.path());
    let dir = home.path().join(".codex");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.toml");
    (home, bin, dir, cfg)
}

#[test]
fn codex_config_is_valid_complete_and_idempotent() {
    let (home, bin, dir, cfg) = codex_home();
    let h = home.path();
    // Our table sits between others and has an old sub-table: both are replaced, the rest kept.
    std::fs::write(
        &cfg,
        "model = \"o4\"\n\n[mcp_servers.flotilla]\ncommand = \"old\"\n\n[mcp_servers.flotilla.env]\nX = \"1\"\n\n[mcp_servers.other]\ncommand = \"x\"\nargs = []\n",
    )
    .unwrap();
    let tok = token_file(h);
    let args = [
        "--command",
        &bin,
        "--server",
        "http://h:8080",
        "--token-file",
        &tok,
        "--read-only",
    ];
    run("configure-codex.sh", h, &args);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let doc: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(doc["model"].as_str(), Some("o4"));
    assert_eq!(doc["mcp_servers"]["other"]["command"].as_str(), Some("x"));
    let f = &doc["mcp_servers"]["flotilla"];
    assert_eq!(f["command"].as_str(), Some(bin.as_str()));
    let a: Vec<&str> = f["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        a,
        [
            "mcp",
            "--server",
            "http://h:8080",
            "--token-file",
            &tok,
            "--read-only"
        ]
    );
    assert_eq!(f["env"]["FLOTILLA_LOG"].as_str(), Some("warn"));
    assert!(f["env"].get("X").is_none(), "the old sub-table is gone");
    assert_eq!(backups(&dir), 1);
    let out = run("configure-codex.sh", h, &args);
    assert!(out.contains("already up to date"), "{out}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), text);
    assert_eq!(backups(&dir), 1);

    // CODEX_HOME-less fresh home: created from nothing.
    let fresh = tempfile::tempdir().unwrap();
    let bin = fake_flotilla(fresh.path());
    run(
        "configure-codex.sh",
        fresh.path(),
        &["--command", &bin, "--token-file", "~/tok"],
    );
    let doc: toml::Value =
        toml::from_str(&std::fs::read_to_string(fresh.path().join(".codex/config.toml")).unwrap())
            .unwrap();
    let a = doc["mcp_servers"]["flotilla"]["args"].as_array().unwrap();
    assert_eq!(
        a[4].as_str().unwrap(),
        fresh.path().join("tok").to_string_lossy()
    );
}

#[test]
fn scripts_refuse_bad_input() {
    let home = tempfile::tempdir().unwrap();
    for s in ["configure-claude-desktop.sh", "configure-codex.sh"] {
        let out = Command::new("bash")
            .arg(script(s))
            .args(["--server", "ftp://x", "--command", "/bin/true"])
            .env("HOME", home.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{s}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--server"),
            "{s}"
        );
    }
}

/// Runs a script expecting it to fail; its stderr.
fn run_failing(name: &str, home: &Path, args: &[&str], env: &[(&str, &Path)]) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(script(name))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("CODEX_HOME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run bash");
    assert!(
        !out.status.success(),
        "{name} {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn codex_refuses_entries_it_cannot_replace_and_unvalidated_toml() {
    let (home, bin, dir, cfg) = codex_home();
    let h = home.path();
    let tok = token_file(h);
    // Dotted keys and inline tables define the entry without a [mcp_servers.flotilla] header;
    // appending one would make a duplicate key.
    for existing in [
        "mcp_servers.flotilla.command = \"old\"\n",
        "[mcp_servers]\nflotilla.command = \"old\"\n",
        "[mcp_servers]\n\"flotilla\" = { command = \"old\" }\n",
        "mcp_servers = { flotilla = { command = \"old\" } }\n",
    ] {
        std::fs::write(&cfg, existing).unwrap();
        let err = run_failing(
            "configure-codex.sh",
            h,
            &["--command", &bin, "--token-file", &tok],
            &[],
        );
        assert!(
            err.contains("dotted keys or an inline table"),
            "{existing}: {err}"
        );
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), existing);
        assert_eq!(backups(&dir), 0, "{existing}");
    }
    // Another server inline: the new table could not be added; refused, nothing written.
    let existing = "mcp_servers = { other = { command = \"x\" } }\n";
    std::fs::write(&cfg, existing).unwrap();
    let err = run_failing(
        "configure-codex.sh",
        h,
        &["--command", &bin, "--token-file", &tok],
        &[],
    );
    assert!(err.contains("would not be valid"), "{err}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), existing);

    // A Python without tomllib (< 3.11) and without tomli cannot validate: refused.
    let shadow = h.join("no-tomllib");
    std::fs::create_dir_all(&shadow).unwrap();
    for m in ["tomllib.py", "tomli.py"] {
        std::fs::write(
            shadow.join(m),
            "raise ModuleNotFoundError('not in this Python')\n",
        )
        .unwrap();
    }
    std::fs::remove_file(&cfg).unwrap();
    let err = run_failing(
        "configure-codex.sh",
        h,
        &["--command", &bin, "--token-file", &tok],
        &[("PYTHONPATH", &shadow)],
    );
    assert!(err.contains("cannot validate TOML"), "{err}");
    assert!(!cfg.exists(), "nothing written without validation");
}

#[test]
fn quick_successive_changes_keep_every_backup() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let bin = fake_flotilla(h);
    let tok = token_file(h);
    let codex = h.join(".codex");
    std::fs::create_dir_all(&codex).unwrap();
    std::fs::write(codex.join("config.toml"), "model = \"o4\"\n").unwrap();
    let claude = if cfg!(target_os = "macos") {
        h.join("Library/Application Support/Claude")
    } else {
        h.join(".config/Claude")
    };
    std::fs::create_dir_all(&claude).unwrap();
    std::fs::write(claude.join("claude_desktop_config.json"), "{}").unwrap();
    // Four changes well within a second: four distinct backups, none overwritten.
    for (s, dir) in [
        ("configure-codex.sh", &codex),
        ("configure-claude-desktop.sh", &claude),
    ] {
        for i in 0..4 {
            let server = format!("http://127.0.0.1:{}", 8080 + i);
            run(
                s,
                h,
                &["--command", &bin, "--server", &server, "--token-file", &tok],
            );
        }
        assert_eq!(backups(dir), 4, "{s}");
    }
}

#[test]
fn scripts_refuse_an_entry_without_a_token_or_a_command() {
    for s in ["configure-claude-desktop.sh", "configure-codex.sh"] {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        let bin = fake_flotilla(h);
        let tok = token_file(h);
        // No token: the entry could only ever answer "unauthorized".
        let err = run_failing(s, h, &["--command", &bin], &[]);
        assert!(err.contains("--token-file is required"), "{s}: {err}");
        // A --command that is not there.
        let err = run_failing(
            s,
            h,
            &["--command", "/nonexistent/flotilla", "--token-file", &tok],
            &[],
        );
        assert!(err.contains("is not an executable file"), "{s}: {err}");
        // Not on PATH: the message says how to install it.
        let empty = h.join("empty-path");
        std::fs::create_dir_all(&empty).unwrap();
        let path = format!("{}:/usr/bin:/bin", empty.display());
        let err = run_failing(s, h, &["--token-file", &tok], &[("PATH", Path::new(&path))]);
        assert!(
            err.contains("not on PATH") && err.contains("cargo install --locked --path server"),
            "{s}: {err}"
        );
        // Nothing was written by any of them.
        assert!(
            !h.join(".codex").exists() && !h.join(".config").exists(),
            "{s}"
        );
    }
}
