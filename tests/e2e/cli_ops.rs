//! The operator CLI (`flotilla agents`, `agent`, `label`, `labels`, `queue`, `commands`,
//! `command`, `audit`) against a real `flotilla serve` and scripted OpAMP agents: it goes
//! through the REST API, so roles, the preview-then-confirm of `queue` and the audit trail are
//! the server's, and the trail names the channel `cli`. Exit codes are the documented ones.

use std::process::{Output, Stdio};
use std::time::Duration;

use flotilla_e2e::agent::now_ns;
use flotilla_e2e::server::{flotilla_command, OPERATOR};
use flotilla_e2e::{Home, HttpAgent, Server};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(30);

/// Runs the CLI as an operator would: the server from FLOTILLA_SERVER, the token from a file
/// named by FLOTILLA_TOKEN_FILE, `stdin` typed in.
struct Operator {
    server: String,
    token_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Operator {
    fn new(server: &Server, token: &str) -> Operator {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        Operator {
            server: server.url(""),
            token_file,
            _dir: dir,
        }
    }

    async fn run(&self, args: &[&str], stdin: &str) -> Output {
        let mut cmd = flotilla_command();
        cmd.args(args)
            .env("FLOTILLA_SERVER", &self.server)
            .env("FLOTILLA_TOKEN_FILE", &self.token_file)
            // No client config file of the developer's.
            .env("XDG_CONFIG_HOME", self._dir.path())
            .stdin(Stdio::piped());
        let mut child = cmd.spawn().expect("run flotilla");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).await.unwrap();
        drop(input);
        tokio::time::timeout(T, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("flotilla {args:?} did not exit"))
            .unwrap()
    }

    /// Runs and expects exit code `code`.
    async fn expect(&self, args: &[&str], stdin: &str, code: i32) -> Output {
        let out = self.run(args, stdin).await;
        assert_eq!(
            out.status.code(),
            Some(code),
            "flotilla {args:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs with `-o json`, expects success, parses stdout.
    async fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.expect(&a, "", 0).await;
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "flotilla {a:?}: stdout is not JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn operator_cli_finds_labels_queues_after_confirmation_and_is_audited_as_cli() {
    let home = Home::new();
    let server = Server::start(&home).await;
    let mut web = HttpAgent::fluent_like(&server.opamp_url(), "cli-web");
    web.send(web.full_state()).await;
    let mut db = HttpAgent::fluent_like(&server.opamp_url(), "cli-db");
    db.send(db.full_state()).await;
    let (web_host, web_uid) = ("cli-web-host", web.uid_str());
    let op = Operator::new(&server, &home.tokens.operator);

    // Listing, as a table for people and as the REST shapes for scripts.
    let table = stdout(&op.expect(&["agents"], "", 0).await);
    assert!(
        table.starts_with("UID") && table.contains(web_host) && table.contains("cli-db-host"),
        "{table}"
    );
    let all = op.json(&["agents", "type:fluentbit"]).await;
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
    let yaml = stdout(&op.expect(&["agent", web_host, "-o", "yaml"], "", 0).await);
    assert!(yaml.contains(&format!("uid: {web_uid}")), "{yaml}");
    // One agent by host name, service name, uid, and a query that matches it alone.
    let prefix = format!("uid:{}", &web_uid[..13]);
    for name in [web_host, "cli-web", &web_uid, &prefix] {
        let one = op.json(&["agent", name]).await;
        assert_eq!(one["uid"], web_uid, "agent {name}");
    }
    let fields = stdout(&op.expect(&["agent", web_host], "", 0).await);
    assert!(
        fields.contains("Host:") && fields.contains(web_host),
        "{fields}"
    );
    let missing = op.expect(&["agent", "no-such-host"], "", 3).await;
    assert!(
        stderr(&missing).contains("no-such-host"),
        "{}",
        stderr(&missing)
    );

    // Labels are set by operators, then searchable.
    op.expect(&["label", web_host, "env=prod", "tier=web"], "", 0)
        .await;
    op.expect(&["label", web_host, "tier-"], "", 0).await;
    let labels = op.json(&["labels"]).await;
    let of_web = labels
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["uid"] == web_uid)
        .unwrap_or_else(|| panic!("{labels}"));
    assert_eq!(of_web["labels"], serde_json::json!({"env": "prod"}));
    let prod = op.json(&["agents", "label:env=prod"]).await;
    assert_eq!(prod.as_array().map(Vec::len), Some(1), "{prod}");
    // -o name: only identifiers, for $(…) in scripts.
    let names = stdout(
        &op.expect(&["agents", "label:env=prod", "-o", "name"], "", 0)
            .await,
    );
    assert_eq!(names, format!("{web_uid}\n"));
    op.expect(&["label", web_host, "=x"], "", 2).await;

    // The preview names the targets; declining (or not answering) queues nothing.
    for answer in ["n\n", ""] {
        let out = op
            .expect(&["queue", "restart", "label:env=prod"], answer, 5)
            .await;
        let err = stderr(&out);
        assert!(
            err.contains("restart for 1 agent matching") && err.contains(web_host),
            "{err}"
        );
    }
    assert_eq!(op.json(&["commands"]).await, serde_json::json!([]));
    let plan = op
        .json(&["queue", "restart", "label:env=prod", "--dry-run"])
        .await;
    assert_eq!(plan["target_count"], 1, "{plan}");
    assert_eq!(op.json(&["commands"]).await, serde_json::json!([]));

    // A viewer may look but not queue.
    let viewer = Operator::new(&server, &home.tokens.viewer);
    viewer.json(&["agents"]).await;
    viewer
        .expect(&["queue", "restart", web_host, "--yes"], "", 4)
        .await;
    let nobody = Operator::new(&server, "not-a-valid-token-0123456789");
    nobody.expect(&["agents"], "", 4).await;
    // Bad input is a usage error.
    op.expect(&["queue", "reboot", web_host, "--yes"], "", 2)
        .await;
    op.expect(&["agents", "state:sleepy"], "", 2).await;

    // Confirmed: queued, and the trail says who and through which channel.
    let queued = op
        .run(&["queue", "restart", web_host, "-o", "json"], "y\n")
        .await;
    assert!(queued.status.success(), "{}", stderr(&queued));
    let queued: Value = serde_json::from_slice(&queued.stdout).unwrap();
    let id = queued["command_id"]
        .as_str()
        .expect("command_id")
        .to_string();
    let trail = op
        .json(&["audit", "--channel", "cli", "--operation", "command.queue"])
        .await;
    let rec = trail
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["targets"].to_string().contains(&web_uid))
        .unwrap_or_else(|| panic!("no cli record of the queue: {trail}"));
    assert_eq!(
        (&rec["actor"], &rec["channel"]),
        (&OPERATOR.into(), &"cli".into())
    );
    let listed = op.json(&["commands", "--agent", web_host]).await;
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert_eq!(listed[0]["channel"], "cli", "{listed}");

    // --wait: the agent picks the command up and restarts; the CLI exits 0 on success.
    let waiter = {
        let op_args = ["command", id.as_str(), "--wait", "-o", "json"];
        let op = &op;
        async move { op.run(&op_args, "").await }
    };
    let agent_side = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reply = web.send(web.heartbeat()).await;
        assert!(reply.command.is_some(), "restart delivered: {reply:?}");
        web.start_time_unix_nano = now_ns();
        web.send(web.full_state()).await;
    };
    let (waited, ()) = tokio::join!(waiter, agent_side);
    assert!(waited.status.success(), "{}", stderr(&waited));
    let done: Value = serde_json::from_slice(&waited.stdout).unwrap();
    assert_eq!(done["status"], "succeeded", "{done}");

    // A fan-out with --yes, and a --wait that runs out (the agent never polls): exit 7.
    let batch = op.json(&["queue", "restart", "name:cli-db", "--yes"]).await;
    assert_eq!(batch["queued"], 1, "{batch}");
    let cmd = batch["commands"][0]["command_id"].as_str().unwrap();
    op.expect(&["command", cmd, "--wait", "--timeout", "1"], "", 7)
        .await;
    let cancelled = op.json(&["cancel", cmd]).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    op.expect(&["command", cmd, "--wait"], "", 6).await;
    db.send(db.heartbeat()).await;
}

#[tokio::test]
async fn operator_cli_reads_the_client_config_file() {
    let home = Home::new();
    let server = Server::start(&home).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), &home.tokens.viewer).unwrap();
    let cfg = dir.path().join("flotilla").join("client.toml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "server = \"{}\"\ntoken_file = \"../token\"\noutput = \"json\"\n",
            server.url("")
        ),
    )
    .unwrap();
    let run = |env: Vec<(&'static str, String)>| {
        let mut cmd = flotilla_command();
        cmd.args(["agents"]).envs(env);
        async move {
            tokio::time::timeout(T, cmd.output())
                .await
                .unwrap()
                .unwrap()
        }
    };
    // Found in $XDG_CONFIG_HOME/flotilla/client.toml; its output format applies.
    let out = run(vec![("XDG_CONFIG_HOME", dir.path().display().to_string())]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    // A flag or variable wins over the file.
    let out = run(vec![
        ("FLOTILLA_CLIENT_CONFIG", cfg.display().to_string()),
        ("FLOTILLA_SERVER", "http://127.0.0.1:1".into()),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot reach Flotilla at http://127.0.0.1:1"),
        "{}",
        stderr(&out)
    );
    // A typo in the file is named.
    std::fs::write(&cfg, "sever = \"x\"\n").unwrap();
    let out = run(vec![("FLOTILLA_CLIENT_CONFIG", cfg.display().to_string())]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("sever"), "{}", stderr(&out));
    // Without any token the server refuses, and the CLI says how to give one.
    let out = run(vec![
        ("XDG_CONFIG_HOME", "/nonexistent".into()),
        ("FLOTILLA_SERVER", server.url("")),
    ])
    .await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no token was sent"),
        "{}",
        stderr(&out)
    );
}
