//! Guard rails of issue 11 driven through the public interfaces: remote-config file names
//! refused at queue time, owner-only data files, confirmation tokens bound to their caller,
//! commands delivered only as audited, the admin role, token management and operator OIDC.

use flotilla_proto::AgentCapabilities as Cap;
use serde_json::{json, Value};

use crate::support::{register_agent, TestServer};

const RC_CAPS: u64 = Cap::ReportsStatus as u64 | Cap::AcceptsRemoteConfig as u64;

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// Defect 3: every class of unsafe file name is refused with `invalid_params` naming the file,
/// nothing is queued, and a plain relative name (with a subdirectory) still is.
#[tokio::test]
async fn remote_config_file_names_are_checked_at_queue_time() {
    let server = TestServer::start().await;
    let rest = server.rest();
    let a = register_agent(&server, &[("service.name", "fluent-bit")], RC_CAPS, &[]).await;
    let on = format!("/api/v1/agents/{a}/commands");
    let long = "a".repeat(5000);
    let bad: &[(&str, &str)] = &[
        ("../../etc/passwd", "'..'"),
        ("conf/../../x", "'..'"),
        ("..", "'..'"),
        ("/etc/passwd", "absolute"),
        ("", "empty"),
        ("a//b", "empty"),
        ("./a", "'.'"),
        ("a\0b", "control"),
        ("a\nb", "control"),
        ("a\rb", "control"),
        ("..\\..\\windows\\system.ini", "backslash"),
        ("C:\\x", "backslash"),
        ("C:x", "':'"),
        (&long, "longer than 255"),
    ];
    for (name, why) in bad {
        let (s, v) = rest
            .post(
                &on,
                json!({"kind": "remote_config", "params": {"files": {*name: "x"}}}),
            )
            .await;
        assert_eq!((s, code(&v)), (400, "invalid_params"), "{name:?}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(why), "{name:?}: {msg}");
    }
    // A thousand files is refused as a whole.
    let many: serde_json::Map<String, Value> = (0..1000)
        .map(|i| (format!("f{i}.conf"), json!("x")))
        .collect();
    let (s, v) = rest
        .post(
            &on,
            json!({"kind": "remote_config", "params": {"files": many}}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_params"), "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 64"));
    // A fan-out is refused the same way, before any target is touched.
    let (s, v) = rest
        .post(
            "/api/v1/commands",
            json!({"query": "service.name:fluent-bit", "kind": "remote_config",
                   "params": {"files": {"../x": "x"}}}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_params"), "{v}");
    // Nothing was queued.
    let (s, v) = rest.get(&format!("/api/v1/commands?agent={a}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(0), "{v}");
    // Plain relative names still work.
    let (s, v) = rest
        .post(
            &on,
            json!({"kind": "remote_config", "params": {"files": {
                "fluent-bit.conf": "[SERVICE]\n", "parsers/extra.conf": "[PARSER]\n",
                ".env-free_name-1.conf": "x"}}}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    server.stop().await;
}
