//! Build script: records the git commit the `flotilla` binary is built from (`--version`,
//! `flotilla_build_info` in `/metrics`). `FLOTILLA_BUILD_COMMIT` overrides it (container builds
//! copy the sources without `.git`); outside a git checkout it is `unknown`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Rebuild when `git_path` (a path inside the git directory) changes. Only for files that
/// exist: cargo treats a missing file as always changed, which would rebuild every time.
fn watch(git_path: &str) {
    if let Some(p) = git(&["rev-parse", "--git-path", git_path]) {
        if Path::new(&p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=FLOTILLA_BUILD_COMMIT");
    let commit = std::env::var("FLOTILLA_BUILD_COMMIT")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // HEAD moves on a checkout; the branch it names moves on a commit.
    watch("HEAD");
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(&branch);
    }
    watch("packed-refs");
    println!("cargo:rustc-env=FLOTILLA_COMMIT={commit}");
}
