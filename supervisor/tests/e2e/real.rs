//! The supervisor with the real agents from `../shared/tools` (Fluent Bit 5.1.1, Fluentd
//! 1.18.0 on Debian's Ruby) against the real Flotilla server: hot reload, a config refused
//! by the dry run, ChatOps through the shipped example config, a crash loop and a fixed
//! restart, Fluentd's graceful reload and one that fails in the worker. tests/run.sh installs
//! their packages and points `FLOTILLA_REAL_AGENTS_DIR` at them; without that folder (a clone
//! without ../shared) each test says `SKIPPED <name>` on the terminal and passes, and with it
//! an agent that cannot run fails the test.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const T: Duration = Duration::from_secs(40);

fn real_fluent_bit(test: &str) -> Option<PathBuf> {
    real_agent(
        test,
        "fluent-bit-5.1.1/fluent-bit",
        "-V",
        "Fluent Bit v5.1.1",
    )
}

fn real_fluentd(test: &str) -> Option<PathBuf> {
    real_agent(
        test,
        "fluentd-1.18.0/fluentd",
        "--version",
        "fluentd 1.18.0",
    )
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

async fn hot_reload_count(http_port: u16) -> Option<u64> {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let v: Value = http
        .get(format!("http://127.0.0.1:{http_port}/api/v2/reload"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["hot_reload_count"].as_u64()
}

#[tokio::test]
async fn real_fluent_bit_hot_reload_and_a_refused_config() {
    let Some(exe) = real_fluent_bit("real_fluent_bit_hot_reload_and_a_refused_config") else {
        return;
    };
    let server = Server::start().await;
    let mut opts = SupOpts::fluent_bit(&server.ws_url());
    opts.executable = Some(exe);
    // The default pace: per-plugin health must not wait for the next probe.
    opts.health_interval_s = 10;
    let http_port = opts.http_port;
    let sup = Sup::start(opts).await;
    let uid = sup.uid().await;
    let a = server
        .wait_agent(&uid, "per-plugin health", Duration::from_secs(8), |a| {
            a["health"]["healthy"] == true
                && a["health"]["components"]["output"]["components"]["null_out"].is_object()
        })
        .await;
    let t0 = a["health"]["start_time_unix_nano"].as_u64().unwrap();
    eprintln!(
        "real Fluent Bit: per-plugin health on the server {:.2} s after the agent started",
        (now_ns() - t0) as f64 / 1e9
    );
    assert_eq!(a["identifying_attributes"]["service.version"], "5.1.1");

    // Hot reload: POST /api/v2/reload with Content-Length: 0, confirmed by the count.
    let body = crate::fluentbit::conf_with_stdout();
    let c = server.push_config(&uid, "fluent-bit.conf", &body).await;
    assert_eq!(c["status"], "succeeded", "{c}\n{}", sup.log());
    assert_eq!(hot_reload_count(http_port).await, Some(1), "{}", sup.log());
    let a = server
        .wait_agent(&uid, "healthy on the new config", T, |a| {
            a["health"]["healthy"] == true
                && a["health"]["components"]["output"]["components"]["out2"].is_object()
        })
        .await;
    assert_eq!(
        a["health"]["start_time_unix_nano"].as_u64(),
        Some(t0),
        "no restart"
    );
    assert!(!sup.log().contains("falling back"), "{}", sup.log());
    assert!(
        sup.log().contains("successful reload done"),
        "{}",
        sup.log()
    );

    // A plugin this build does not have: refused by the dry run in the agent's own words.
    let bad = format!("{body}\n[OUTPUT]\n    Name  no_such_output\n    Match *\n");
    let c = server.push_config(&uid, "fluent-bit.conf", &bad).await;
    assert_eq!(c["status"], "failed", "{c}");
    let err = c["error"].as_str().unwrap();
    assert!(
        err.contains("dry run failed") && err.contains("no_such_output"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(sup.conf_path()).unwrap(), body);
    assert_eq!(hot_reload_count(http_port).await, Some(1));
}

#[tokio::test]
async fn real_fluent_bit_example_delivers_the_readme_chatops_command() {
    let Some(exe) = real_fluent_bit("real_fluent_bit_example_delivers_the_readme_chatops_command")
    else {
        return;
    };
    crate::examples::fluent_bit_example_delivers_the_readme_chatops_command(Some(exe)).await;
}

#[tokio::test]
async fn real_fluent_bit_crash_loop_then_a_fixed_restart() {
    let Some(exe) = real_fluent_bit("real_fluent_bit_crash_loop_then_a_fixed_restart") else {
        return;
    };
    crate::fluentbit::crash_loop_then_a_fixed_restart(Some(exe)).await;
}

#[tokio::test]
async fn real_fluentd_graceful_reload_and_a_worker_side_failure() {
    let Some(exe) = real_fluentd("real_fluentd_graceful_reload_and_a_worker_side_failure") else {
        return;
    };
    crate::fluentd::graceful_reload_then_a_worker_side_failure(Some(exe)).await;
}
