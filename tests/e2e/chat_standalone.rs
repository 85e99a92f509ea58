//! `flotilla chat` as its own process: a real `flotilla serve`, a separate `flotilla chat`
//! reaching it through the REST API with a gateway token, and a fake Slack Web API. A signed
//! slash command reaches the standalone gateway, its confirmed restart is queued on the
//! server and delivered to the agent once, and the audit trail names both the gateway token
//! and the Slack user. A viewer cannot restart, neither through the gateway nor by the gateway
//! token claiming the viewer role on the REST API itself. The server refuses the acting-for
//! headers from an ordinary token (403) and malformed ones (400).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use flotilla_e2e::fake_slack::{Click, FakeSlack, SlackSigner, SlashCommand};
use flotilla_e2e::server::{flotilla_command, free_port, run_flotilla, toml_str};
use flotilla_e2e::{Home, HttpAgent, Server};
use serde_json::Value;

const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const BOT: &str = "xoxb-standalone-token";
const GATEWAY_TOKEN: &str = "gateway-token-0123456789abcdef";
const T: Duration = Duration::from_secs(30);

/// Writes `text` readable by the owner only, as secrets must be.
fn secret_file(path: &std::path::Path, text: &str) {
    std::fs::write(path, format!("{text}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// A running `flotilla chat`, killed when dropped.
struct ChatProcess {
    child: tokio::process::Child,
    listen: SocketAddr,
    config: std::path::PathBuf,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ChatProcess {
    async fn start(server: &Server, fake: &FakeSlack, dir: &std::path::Path) -> ChatProcess {
        let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let signing = dir.join("signing-secret");
        let bot = dir.join("bot-token");
        let token = dir.join("gateway-token");
        secret_file(&signing, SECRET);
        secret_file(&bot, BOT);
        secret_file(&token, GATEWAY_TOKEN);
        let config = dir.join("chat.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {}\n[log]\nlevel = \"info\"\n[chat]\nlisten = \"{listen}\"\n\
                 [chat.slack]\nenabled = true\nsigning_secret_file = {}\nbot_token_file = {}\n\
                 api_url = \"{}\"\n[chat.slack.access.users]\nUOPS = \"admin\"\n\
                 UVIEW = \"viewer\"\n",
                toml_str(&dir.join("data")),
                toml_str(&signing),
                toml_str(&bot),
                fake.api_url()
            ),
        )
        .unwrap();
        let mut cmd = flotilla_command();
        cmd.arg("chat")
            .arg("--config")
            .arg(&config)
            .arg("--server")
            .arg(server.url(""))
            .arg("--token-file")
            .arg(&token)
            .env("XDG_CONFIG_HOME", dir)
            .stdout(Stdio::null());
        let mut child = cmd.spawn().expect("start flotilla chat");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        tokio::spawn(flotilla_e2e::collect_stderr(
            child.stderr.take().expect("stderr is piped"),
            stderr.clone(),
        ));
        let deadline = tokio::time::Instant::now() + T;
        while tokio::net::TcpStream::connect(listen).await.is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "flotilla chat exited with {st}:\n{}",
                    stderr.lock().unwrap()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "flotilla chat did not listen on {listen}:\n{}",
                stderr.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ChatProcess {
            child,
            listen,
            config,
            stderr,
        }
    }
}

impl Drop for ChatProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn a_standalone_gateway_queues_through_rest_as_its_token_for_the_slack_user() {
    let home = Home::new();
    // The gateway's token: operator, marked `gateway`.
    let mut tokens = std::fs::read_to_string(&home.tokens_file).unwrap();
    tokens.push_str(&format!("e2e-gateway operator {GATEWAY_TOKEN} gateway\n"));
    std::fs::write(&home.tokens_file, tokens).unwrap();
    let server = Server::start(&home).await;
    let mut web = HttpAgent::fluent_like(&server.opamp_url(), "gw-web");
    web.send(web.full_state()).await;
    let fake = FakeSlack::start(BOT).await;
    let dir = tempfile::tempdir().unwrap();
    let chat = ChatProcess::start(&server, &fake, dir.path()).await;
    let slack = SlackSigner::new(SECRET, &format!("http://{}", chat.listen));

    // A viewer asking for a restart: refused privately by the gateway, nothing queued.
    let a = slack
        .command(
            &fake,
            &SlashCommand {
                team: "T1",
                channel: "C1",
                user: "UVIEW",
                user_name: "vic",
                text: "restart gw-web-host",
                trigger_id: "t-viewer",
            },
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    fake.wait_for(T, "the viewer's private answer", |c| {
        c.iter()
            .any(|c| c.method == "response_url" && c.target.as_deref() == Some("t-viewer"))
    })
    .await;
    let why = fake
        .calls_of("response_url")
        .into_iter()
        .find(|c| c.target.as_deref() == Some("t-viewer"))
        .unwrap()
        .body["text"]
        .to_string();
    assert!(why.contains("operator"), "{why}");

    let a = slack
        .command(
            &fake,
            &SlashCommand {
                team: "T1",
                channel: "C1",
                user: "UOPS",
                user_name: "ada",
                text: "restart gw-web-host",
                trigger_id: "t-restart",
            },
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    fake.wait_for(T, "the preview", |c| {
        c.iter().any(|c| {
            c.method == "chat.postMessage" && c.body.to_string().contains("flotilla_confirm")
        })
    })
    .await;
    let posted = fake.posted();
    let (preview, ts) = posted
        .iter()
        .find(|(b, _)| b.to_string().contains("flotilla_confirm"))
        .unwrap();
    let confirm = preview["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "actions")
        .unwrap()["elements"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let commands = server.get("/api/v1/commands").await.expect(200, "commands");
    assert_eq!(
        commands["items"],
        serde_json::json!([]),
        "nothing before the confirm"
    );

    let click = Click {
        team: "T1",
        channel: "C1",
        user: ("UOPS", "ada"),
        message_ts: ts,
        thread_ts: None,
        action_id: "flotilla_confirm",
        value: &confirm,
        trigger_id: "t-confirm",
    }
    .payload(&fake);
    assert_eq!(slack.interaction(&click).await.status, 200);
    let deadline = tokio::time::Instant::now() + T;
    let queued = loop {
        let c = server.get("/api/v1/commands").await.expect(200, "commands");
        if let Some(first) = c["items"].as_array().and_then(|i| i.first()).cloned() {
            break first;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no command queued; flotilla chat said:\n{}",
            chat.stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(queued["kind"], "restart", "{queued}");
    assert_eq!(queued["agent_uid"], web.uid_str(), "{queued}");
    // Delivered on the agent's next poll, and only once.
    let reply = web.send(web.heartbeat()).await;
    assert!(reply.command.is_some(), "restart delivered: {reply:?}");
    let again = web.send(web.heartbeat()).await;
    assert!(again.command.is_none(), "delivered twice: {again:?}");
    assert_eq!(
        server.get("/api/v1/commands").await.expect(200, "commands")["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // The audit trail names the gateway token and the Slack user, in channel slack.
    let records: Vec<Value> = server.audit_records().await.into_values().collect();
    let queuing = records
        .iter()
        .find(|r| r.to_string().contains("restart") && r["channel"] == "slack")
        .unwrap_or_else(|| panic!("no slack restart record in {records:#?}"));
    assert_eq!(
        queuing["actor"], "e2e-gateway for slack:T1/UOPS (ada)",
        "{queuing}"
    );

    // The server side: an ordinary token may not act for anyone; a malformed header is a 400.
    let http = reqwest::Client::new();
    let send = |token: &str, for_: &str, role: &str| {
        http.get(server.url("/api/v1/agents"))
            .bearer_auth(token)
            .header("X-Flotilla-Acting-For", for_)
            .header("X-Flotilla-Acting-Role", role)
            .send()
    };
    let r = send(&home.tokens.admin, "slack%3AT1%2FUOPS", "viewer")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gateway"),
        "{body}"
    );
    // The gateway token claiming the viewer role for a user cannot restart: the lower of the
    // two roles applies, whatever the token itself may do.
    let r = http
        .post(server.url("/api/v1/commands"))
        .bearer_auth(GATEWAY_TOKEN)
        .header("X-Flotilla-Acting-For", "slack%3AT1%2FUVIEW%20%28vic%29")
        .header("X-Flotilla-Acting-Role", "viewer")
        .json(&serde_json::json!({"agent": web.uid_str(), "kind": "restart", "params": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    assert_eq!(
        server.get("/api/v1/commands").await.expect(200, "commands")["items"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "nothing queued for the viewer"
    );
    let r = send(GATEWAY_TOKEN, "irc%3Anick", "viewer").await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = send(GATEWAY_TOKEN, "slack%3AT1%2FUOPS", "root")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // A token not marked `gateway`: `flotilla chat` refuses to start (exit 4), saying why.
    let plain = dir.path().join("plain-token");
    secret_file(&plain, &home.tokens.operator);
    let out = run_flotilla(
        &[
            "chat",
            "--config",
            chat.config.to_str().unwrap(),
            "--server",
            &server.url(""),
            "--token-file",
            plain.to_str().unwrap(),
        ],
        &[("XDG_CONFIG_HOME", dir.path().to_str().unwrap())],
        T,
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("not marked `gateway`"), "{err}");
}
