//! The README's "Try it without Fluent Bit" block, run as written with bash (`-euo pipefail`,
//! so any command in it that fails fails the test) against the real `flotilla`,
//! `flotilla-supervisor` and `fake-fluent-bit` binaries, within the two minutes it promises.
//! Only its fixed ports are swapped for free ones, so it cannot collide with anything else on
//! the machine.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use flotilla_e2e::server::{flotilla_bin, free_port, workspace_bin};
use flotilla_e2e::workspace_root;

const MARKER: &str = "<!-- try-it: the next block is run as written by tests/e2e/cli_tryit.rs -->";

/// What the README promises a newcomer.
const PROMISED: Duration = Duration::from_secs(120);

/// The fenced block right after the marker.
fn readme_block() -> String {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let at = readme
        .find(MARKER)
        .expect("README.md lost the try-it marker this test runs the block after");
    let rest = readme[at + MARKER.len()..].trim_start();
    let body = rest
        .strip_prefix("```sh\n")
        .expect("a ```sh block right after the try-it marker");
    let end = body.find("\n```\n").expect("the try-it block is closed");
    body[..=end].to_string()
}

fn link(dir: &Path, bin: &Path) {
    let name = bin.file_name().unwrap();
    std::os::unix::fs::symlink(bin, dir.join(name)).unwrap();
}

#[tokio::test]
async fn the_readme_try_it_block_shows_an_agent_a_search_and_a_command() {
    let mut script = readme_block();
    // The README's ports, each swapped for a free one.
    for port in ["4320", "8080", "2020", "8888"] {
        assert!(
            script.contains(port),
            "the try-it block no longer names port {port}; update this test"
        );
        script = script.replace(port, &free_port().to_string());
    }

    // The binaries, as `cargo install` would put them on PATH.
    let bins = tempfile::tempdir().unwrap();
    link(bins.path(), &flotilla_bin());
    link(
        bins.path(),
        &workspace_bin("flotilla-supervisor", "flotilla-supervisor"),
    );
    link(
        bins.path(),
        &workspace_bin("flotilla-fake-agents", "fake-fluent-bit"),
    );
    let scratch = tempfile::tempdir().unwrap();
    let path = format!(
        "{}:{}",
        bins.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut cmd = tokio::process::Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", &script])
        .env("PATH", path)
        // `mktemp -d` makes the scratch directory inside ours; no client config of the
        // developer's is read.
        .env("TMPDIR", scratch.path())
        .env("XDG_CONFIG_HOME", scratch.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: the background server and supervisor are stopped with it
        // even when the block fails halfway.
        .process_group(0)
        .kill_on_drop(true);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLOTILLA_") {
            cmd.env_remove(k);
        }
    }
    let started = Instant::now();
    let child = cmd.spawn().expect("run bash");
    let pgid = child.id().expect("bash pid");
    let result = tokio::time::timeout(PROMISED, child.wait_with_output()).await;
    // Whatever happened, nothing the block started outlives the test.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let logs = || {
        let mut s = String::new();
        for entry in walk(scratch.path()) {
            if entry.extension().is_some_and(|e| e == "log") {
                s.push_str(&format!(
                    "--- {} ---\n{}\n",
                    entry.display(),
                    std::fs::read_to_string(&entry).unwrap_or_default()
                ));
            }
        }
        s
    };
    let out = match result {
        Ok(r) => r.expect("wait for bash"),
        Err(_) => panic!(
            "the try-it block did not finish within {PROMISED:?}\n{}",
            logs()
        ),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the try-it block failed ({}) after {:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n{}",
        out.status,
        started.elapsed(),
        logs()
    );
    let host = String::from_utf8(
        std::process::Command::new("uname")
            .arg("-n")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let host = host.trim();
    // An agent, found by host and by the label an operator set, and a command that succeeded,
    // audited with channel cli.
    for needle in [
        "UID",
        "fluentbit",
        host,
        "Health:       healthy",
        "env=demo",
        "succeeded",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from the try-it output:\n{stdout}\n--- stderr ---\n{stderr}"
        );
    }
    assert!(
        !stdout.contains("failed") && !stdout.contains("expired"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(" cli ") && l.contains("batch.queue")),
        "the audit listing shows the fan-out queued through the cli channel:\n{stdout}"
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
