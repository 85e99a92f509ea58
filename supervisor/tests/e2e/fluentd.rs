//! The supervisor with a (fake) Fluentd 1.18 against the real Flotilla server: registration
//! with per-plugin health, ChatOps into its `http` source, remote config through
//! `config.gracefulReload` (and a refused one), and the 1.18 zero-downtime-restart trap: the
//! original process exits 0 while its successor keeps serving, and must stay managed.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const T: Duration = Duration::from_secs(40);

fn fluentd_conf(monitor: u16, rpc: u16, chat: u16, rate: u32) -> String {
    format!(
        r#"<system>
  rpc_endpoint 127.0.0.1:{rpc}
</system>
<source>
  @type monitor_agent
  @id monitor
  bind 127.0.0.1
  port {monitor}
</source>
<source>
  @type http
  @id chatops
  bind 127.0.0.1
  port {chat}
</source>
<source>
  @type sample
  @id sample_in
  tag app.test
  rate {rate}
</source>
<match app.**>
  @type null
  @id null_out
</match>
<match **>
  @type null
  @id rest
</match>
"#
    )
}

fn opts(server_url: &str) -> (SupOpts, u16) {
    let mut o = SupOpts::fluent_bit(server_url);
    let rpc = free_port();
    o.kind = "fluentd";
    o.agent_conf = fluentd_conf(o.http_port, rpc, o.chat_ops_port, 5);
    o.extra_toml = format!("rpc_endpoint = \"127.0.0.1:{rpc}\"\n");
    o.health_gate_s = 3;
    (o, rpc)
}

#[tokio::test]
async fn fluentd_registration_chatops_and_graceful_reload() {
    let server = Server::start().await;
    let (o, rpc) = opts(&server.ws_url());
    let (monitor, chat) = (o.http_port, o.chat_ops_port);
    let sup = Sup::start(o).await;
    let uid = sup.uid().await;
    let a = server
        .wait_agent(&uid, "healthy with plugin components", T, |a| {
            a["health"]["healthy"] == true && a["health"]["components"]["output"].is_object()
        })
        .await;
    assert_eq!(a["identifying_attributes"]["service.type"], "Fluentd");
    assert_eq!(a["identifying_attributes"]["service.version"], "1.18.0");
    assert_eq!(a["type"], "fluentd");
    let out = &a["health"]["components"]["output"]["components"]["null_out"];
    assert!(
        out["status"].as_str().unwrap().contains("type=null"),
        "{out}"
    );
    assert!(a["health"]["components"]["input"]["components"]["sample_in"].is_object());
    assert!(a["effective_config"]["fluent.conf"]["body"]
        .as_str()
        .unwrap()
        .contains("monitor_agent"));

    // ChatOps into the http source: exactly once.
    let id = server
        .command(
            &uid,
            "chatops",
            json!({"tag": "ops.flush", "attributes": {"who": "me"}}),
        )
        .await;
    let c = server.wait_command(&id, T).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sup.count_events(|e| e["event"] == "http_input" && e["tag"] == "ops.flush"),
        1,
        "{:?}",
        sup.events()
    );

    // Remote config through the RPC graceful reload: same supervisor process, new config.
    let start0 = a["health"]["start_time_unix_nano"].as_u64().unwrap();
    let body = fluentd_conf(monitor, rpc, chat, 2);
    let id = server
        .command(
            &uid,
            "remote_config",
            json!({"files": {"fluent.conf": body}}),
        )
        .await;
    let c = server.wait_command(&id, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "succeeded", "{c}\n{}", sup.log());
    assert_eq!(
        sup.count_events(|e| e["event"] == "graceful_reload" && e["result"] == "ok"),
        1,
        "{:?}",
        sup.events()
    );
    // Never SIGUSR2 (a zero-downtime restart on 1.18) and no restart.
    assert_eq!(sup.count_events(|e| e["event"] == "zdr_start"), 0);
    let a = server
        .wait_agent(&uid, "effective config updated", T, |a| {
            a["effective_config"]["fluent.conf"]["body"] == body.as_str()
        })
        .await;
    assert_eq!(
        a["health"]["start_time_unix_nano"].as_u64().unwrap(),
        start0
    );

    // A config Fluentd refuses: the dry run names the plugin, nothing changes in place.
    let bad = body.replace(
        "@type null\n  @id rest",
        "@type no_such_plugin_xyz\n  @id rest",
    );
    let id = server
        .command(
            &uid,
            "remote_config",
            json!({"files": {"fluent.conf": bad}}),
        )
        .await;
    let c = server.wait_command(&id, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert!(
        c["error"].as_str().unwrap().contains("no_such_plugin_xyz"),
        "{c}"
    );
    assert_eq!(std::fs::read_to_string(sup.conf_path()).unwrap(), body);
}

fn group_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f[0] == "Z" {
        return None;
    }
    f.get(2)?.parse().ok()
}

fn live_in_group(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| group_of(*p) == Some(pgid))
        .collect()
}

#[tokio::test]
async fn fluentd_zero_downtime_restart_stays_managed() {
    let server = Server::start().await;
    let (o, rpc) = opts(&server.ws_url());
    let o = o.env("FAKE_FLUENTD_ZDR_MS", "1500");
    let mut sup = Sup::start(o).await;
    let uid = sup.uid().await;
    let a = server
        .wait_agent(&uid, "healthy", T, |a| a["health"]["healthy"] == true)
        .await;
    let t0 = a["health"]["start_time_unix_nano"].as_u64().unwrap();
    let pgid = std::fs::read_to_string(sup.data_dir().join("agent.pid"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse::<i32>()
        .unwrap();
    // Someone (an operator, a package hook) asks Fluentd for a zero-downtime restart.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = http
        .get(format!(
            "http://127.0.0.1:{rpc}/api/processes.zeroDowntimeRestart"
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    sup.wait_log("tracking the new process", T).await;
    // Still one agent, healthy, not restarted by us on top.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a = server
        .wait_agent(&uid, "healthy after the replacement", T, |a| {
            a["health"]["healthy"] == true
        })
        .await;
    assert!(a["health"]["start_time_unix_nano"].as_u64().unwrap() >= t0);
    let starts = sup.count_events(|e| e["event"] == "start" && e["role"] == "supervisor");
    assert_eq!(starts, 2, "original + successor only: {:?}", sup.events());
    assert!(!live_in_group(pgid).is_empty());
    // Stopping the supervisor stops the successor too: nothing left unmanaged.
    sup.signal(libc::SIGTERM);
    assert_eq!(sup.wait_exit(T).await, Some(0));
    let left = live_in_group(pgid);
    assert!(
        left.is_empty(),
        "processes left in the agent's group: {left:?}"
    );
}
