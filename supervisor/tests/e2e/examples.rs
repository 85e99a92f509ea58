//! The shipped example configs, run as shipped (only their ports changed): the ChatOps
//! command of the top-level README must reach an output. Fluent Bit's `http` input tags a
//! record with the URL path (I_http_in_POST_flush.txt), so the ChatOps tag is the route.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const T: Duration = Duration::from_secs(30);

/// The `params` of the README's ChatOps example (`"kind":"chatops","params":{...}`).
fn readme_chatops_params() -> Value {
    let readme = include_str!("../../../README.md");
    readme
        .lines()
        .filter_map(|l| l.split("-d '").nth(1)?.split('\'').next())
        .filter_map(|body| serde_json::from_str::<Value>(body).ok())
        .find(|v| v["kind"] == "chatops")
        .map(|v| v["params"].clone())
        .expect("the top-level README shows a ChatOps command (`-d '{\"kind\":\"chatops\",...}'`)")
}

/// supervisor/examples/fluent-bit.conf on our ChatOps port, under a supervisor running `exe`
/// (or the fake): the README's command succeeds and its record reaches `chatops_echo`.
pub async fn fluent_bit_example_delivers_the_readme_chatops_command(exe: Option<PathBuf>) {
    let shipped = include_str!("../../examples/fluent-bit.conf");
    let server = Server::start().await;
    let mut opts = SupOpts::fluent_bit(&server.ws_url());
    opts.executable = exe;
    assert_eq!(shipped.matches("Port   8888").count(), 1, "{shipped}");
    opts.agent_conf = shipped.replace("Port   8888", &format!("Port   {}", opts.chat_ops_port));
    let http_port = opts.http_port;
    let sup = Sup::start(opts).await;
    let uid = sup.uid().await;
    server
        .wait_agent(&uid, "healthy with the example's plugins", T, |a| {
            a["health"]["healthy"] == true
                && a["health"]["components"]["output"]["components"]["chatops_echo"].is_object()
        })
        .await;
    let params = readme_chatops_params();
    let tag = params["tag"].as_str().expect("a tag").to_string();
    let id = server.command(&uid, "chatops", params.clone()).await;
    let c = server.wait_command(&id, T).await;
    assert_eq!(c["status"], "succeeded", "{c}\n{}", sup.log());
    assert_eq!(c["result"]["http_code"], 201, "{c}");
    // Delivered, not only accepted: the output that the example routes the tag to counted it
    // (I_v1_metrics_after_*.json) and printed it under that tag.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://127.0.0.1:{http_port}/api/v1/metrics");
    let m = wait_for("the record counted by chatops_echo", T, || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let m: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            (m["output"]["chatops_echo"]["proc_records"] == 1).then_some(m)
        }
    })
    .await;
    assert_eq!(m["input"]["chatops"]["records"], 1, "{m}");
    sup.wait_log(&format!("{tag}: [["), T).await;
    let reason = params["attributes"]["reason"].as_str().unwrap_or("");
    assert!(
        sup.log().contains(&format!("\"reason\"=>\"{reason}\"")),
        "{}",
        sup.log()
    );
}

#[tokio::test]
async fn shipped_fluent_bit_example_delivers_the_readme_chatops_command() {
    fluent_bit_example_delivers_the_readme_chatops_command(None).await;
}
