//! The supervisor with a (fake) Fluentd 1.18 against the real Flotilla server: registration
//! with per-plugin health, ChatOps into its `http` source, remote config through
//! `config.gracefulReload` (and a refused one), rollback when the graceful reload refuses a
//! config or, without an RPC endpoint, when a restart on it leaves the worker crash-looping
//! (reported as unreachable with Fluentd's own errors), and the 1.18 zero-downtime-restart
//! trap: the original process exits 0 while its successor keeps serving, and must stay managed.

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

/// `conf` with its catch-all output turned into a plugin Fluentd does not have.
fn with_unknown_plugin(conf: &str) -> String {
    conf.replace(
        "@type null\n  @id rest",
        "@type no_such_plugin_xyz\n  @id rest",
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
    let c = server.push_config(&uid, "fluent.conf", &body).await;
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
    let bad = with_unknown_plugin(&body);
    let c = server.push_config(&uid, "fluent.conf", &bad).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert!(
        c["error"].as_str().unwrap().contains("no_such_plugin_xyz"),
        "{c}"
    );
    assert_eq!(std::fs::read_to_string(sup.conf_path()).unwrap(), body);
}

/// [`fluentd_conf`] plus an `http` source on `port`, listed first so a taken port stops the
/// worker before it binds anything else (portconflict.log).
fn with_http_source_on(conf: &str, port: u16) -> String {
    format!("<source>\n  @type http\n  @id extra_http\n  bind 127.0.0.1\n  port {port}\n</source>\n{conf}")
}

#[tokio::test]
async fn fluentd_rollback_on_refused_reload_and_on_restart_without_rpc() {
    let server = Server::start().await;

    // A. With the RPC: the graceful reload refuses what the dry run let through. Fluentd
    //    answers {"ok":true} and only logs "Failed to reload config file"; its old pipeline
    //    runs on, so the files are put back and nothing is reloaded or restarted.
    let refused = async {
        let (o, _) = opts(&server.ws_url());
        let o = o.env("FAKE_DRY_RUN_PASSES", "1");
        let conf = o.agent_conf.clone();
        let sup = Sup::start(o).await;
        let uid = sup.uid().await;
        server
            .wait_agent(&uid, "healthy", T, |a| a["health"]["healthy"] == true)
            .await;
        let bad = with_unknown_plugin(&conf);
        let c = server.push_config(&uid, "fluent.conf", &bad).await;
        assert_eq!(c["status"], "failed", "{c}");
        let err = c["error"].as_str().unwrap();
        assert!(
            err.contains("Failed to reload config file") && err.contains("no_such_plugin_xyz"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(sup.conf_path()).unwrap(), conf);
        assert_eq!(
            sup.count_events(|e| e["event"] == "graceful_reload" && e["result"] == "failed"),
            1,
            "{:?}",
            sup.events()
        );
        assert_eq!(
            sup.count_events(|e| e["event"] == "start" && e["role"] == "supervisor"),
            1
        );
    };

    // B. Without an RPC endpoint configs load by a controlled restart. It starts with its
    //    monitor port taken: the worker crash-loops while Fluentd's supervisor lives on, and
    //    only health polling sees it (fluent-agents.md §4.10).
    let restarted = async {
        let (o, _) = opts(&server.ws_url());
        // Quicker worker start-ups and a shorter gate: this part restarts Fluentd four times.
        let mut o = o.env("FAKE_START_DELAY_MS", "300");
        o.health_gate_s = 2;
        o.extra_toml = String::new();
        let monitor = std::net::TcpListener::bind(("127.0.0.1", o.http_port)).unwrap();
        let (http_port, rpc_port) = (o.http_port, free_port());
        let sup = Sup::start(o).await;
        let uid = sup.uid().await;
        let a = server
            .wait_agent(&uid, "unreachable, with Fluentd's own error", T, |a| {
                a["health"]["status"] == "unreachable"
                    && a["health"]["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("Address already in use"))
            })
            .await;
        assert_eq!(a["health"]["healthy"], false);
        drop(monitor);
        let a = server
            .wait_agent(&uid, "healthy once the port is free", T, |a| {
                a["health"]["healthy"] == true
            })
            .await;
        let t0 = a["health"]["start_time_unix_nano"].as_u64().unwrap();

        // A good config: applied by restarting Fluentd.
        let good = fluentd_conf(http_port, rpc_port, sup.opts.chat_ops_port, 2);
        let c = server.push_config(&uid, "fluent.conf", &good).await;
        assert_eq!(c["status"], "succeeded", "{c}\n{}", sup.log());
        let a = server
            .wait_agent(&uid, "restarted on the new config", T, |a| {
                a["health"]["healthy"] == true
                    && a["health"]["start_time_unix_nano"].as_u64() > Some(t0)
            })
            .await;
        let t1 = a["health"]["start_time_unix_nano"].as_u64().unwrap();
        // A restart instead of a reload drops what is in flight: said as a warning.
        assert!(
            sup.log()
                .lines()
                .any(|l| l.contains("WARN") && l.contains("falling back to restarting")),
            "{}",
            sup.log()
        );

        // One that passes the dry run but cannot start (its http source's port is taken):
        // the health gate fails, last-known-good is restored and loaded by another restart.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let bad = with_http_source_on(&good, taken.local_addr().unwrap().port());
        let c = server.push_config(&uid, "fluent.conf", &bad).await;
        assert_eq!(c["status"], "failed", "{c}\n{}", sup.log());
        let err = c["error"].as_str().unwrap();
        assert!(err.contains("Address already in use"), "{err}");
        server
            .wait_agent(&uid, "healthy on last-known-good", T, |a| {
                a["health"]["healthy"] == true
                    && a["health"]["start_time_unix_nano"].as_u64() > Some(t1)
            })
            .await;
        assert_eq!(std::fs::read_to_string(sup.conf_path()).unwrap(), good);
        // Never a graceful reload, never SIGUSR2: restarts only.
        assert_eq!(sup.count_events(|e| e["event"] == "graceful_reload"), 0);
        assert_eq!(sup.count_events(|e| e["event"] == "zdr_start"), 0);
        drop(taken);
    };
    tokio::join!(refused, restarted);
}

#[tokio::test]
async fn fluentd_reload_failing_in_the_worker_is_rolled_back_at_once() {
    graceful_reload_then_a_worker_side_failure(None).await;
}

/// A Fluentd (`exe`, or the fake) with monitor_agent and RPC: a config loaded by graceful
/// reload; then a config that passes the dry run but that the
/// worker cannot start (an http source on a taken port): Fluentd logs `#0 restart fluentd
/// worker`, then `[error]: #0 failed to reload config: ...`, and runs no pipeline
/// (graceful-reload-portclash.log). That is a failure at once, not after the health gate, and
/// last-known-good is loaded again by a graceful reload, in the same processes.
pub async fn graceful_reload_then_a_worker_side_failure(exe: Option<std::path::PathBuf>) {
    let server = Server::start().await;
    let (mut o, rpc) = opts(&server.ws_url());
    let fake = exe.is_none();
    o.executable = exe;
    // A verdict left to the gate would come after the wait for it below gives up (the
    // worker's own verdict takes a few seconds, more on a loaded machine with real Ruby).
    o.health_gate_s = 20;
    let (monitor, chat) = (o.http_port, o.chat_ops_port);
    let sup = Sup::start(o).await;
    let uid = sup.uid().await;
    let a = server
        .wait_agent(&uid, "healthy with plugin components", T, |a| {
            a["health"]["healthy"] == true
                && a["health"]["components"]["output"]["components"]["null_out"].is_object()
        })
        .await;
    assert_eq!(a["identifying_attributes"]["service.version"], "1.18.0");
    let t0 = a["health"]["start_time_unix_nano"].as_u64().unwrap();

    // A good config through config.gracefulReload: same processes, new config.
    let good = fluentd_conf(monitor, rpc, chat, 2);
    let c = server.push_config(&uid, "fluent.conf", &good).await;
    assert_eq!(c["status"], "succeeded", "{c}\n{}", sup.log());
    assert!(
        sup.log().contains("restart fluentd worker"),
        "{}",
        sup.log()
    );

    // One the worker cannot start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad = with_http_source_on(&good, taken.local_addr().unwrap().port());
    let id = server
        .command(
            &uid,
            "remote_config",
            json!({"files": {"fluent.conf": bad}}),
        )
        .await;
    let c = server.wait_command(&id, Duration::from_secs(15)).await;
    assert_eq!(c["status"], "failed", "{c}\n{}", sup.log());
    let err = c["error"].as_str().unwrap();
    assert!(
        err.contains("failed to reload config: Address already in use"),
        "the worker's own words: {err}"
    );
    assert_eq!(std::fs::read_to_string(sup.conf_path()).unwrap(), good);
    // Back on last-known-good in the same processes: graceful reloads, no restart.
    let a = server
        .wait_agent(&uid, "healthy on last-known-good", T, |a| {
            a["health"]["healthy"] == true
        })
        .await;
    assert_eq!(a["health"]["start_time_unix_nano"].as_u64(), Some(t0));
    assert_eq!(
        sup.log().matches("agent started").count(),
        1,
        "{}",
        sup.log()
    );
    if fake {
        assert_eq!(
            sup.count_events(|e| e["event"] == "worker_reload" && e["result"] == "failed"),
            1,
            "{:?}",
            sup.events()
        );
        assert_eq!(
            sup.count_events(|e| e["event"] == "worker_reload" && e["result"] == "ok"),
            2,
            "{:?}",
            sup.events()
        );
    }
    drop(taken);
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
