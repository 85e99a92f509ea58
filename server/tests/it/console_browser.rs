//! The web console in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! installed by `tests/peers/install-browser.sh`), driven over WebDriver with fantoccini:
//! sign in; fleet counts match REST; search narrows the table; a bad query shows an inline
//! error; an agent connected over WebSocket shows its health components; a restart is queued
//! with a preview and a confirm and reaches `succeeded` without a reload; the audit page shows
//! it with channel `console`; a viewer sees no state-changing control and a forged form post is
//! refused. axe-core checks every page (no critical violations), and every page is
//! screenshotted — into `$FLOTILLA_CONSOLE_SCREENSHOTS` when set (the README's screenshots are
//! regenerated with `FLOTILLA_CONSOLE_SCREENSHOTS=docs/console`), else into the target dir.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use flotilla_proto::{
    framing::{decode_ws, encode_ws},
    kv_str, AgentCapabilities as Cap, AgentConfigFile, AgentConfigMap, AgentDescription,
    AgentToServer, ComponentHealth, EffectiveConfig, ServerToAgent,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use uuid::Uuid;

use crate::support::{
    peers_dir, register_agent, register_agent_with_health, repo_root, TestServer, OPERATOR_TOKEN,
    VIEWER_TOKEN,
};

const WAIT: Duration = Duration::from_secs(20);

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

// ---------------------------------------------------------------- a WebSocket agent

const FLUENT_BIT_CONF: &str = "[SERVICE]\n    Flush        1\n    HTTP_Server  On\n\n# tail the app log\n[INPUT]\n    Name  tail\n    Path  /var/log/app.log\n\n[OUTPUT]\n    Name   stdout\n    Match  *\n";

/// What the agent reports: a Fluent Bit under a supervisor, with per-plugin health.
fn status(uid: Uuid, seq: u64, started_ns: u64) -> AgentToServer {
    let comp = |healthy: bool, status: &str, err: &str| ComponentHealth {
        healthy,
        start_time_unix_nano: started_ns,
        status: status.into(),
        last_error: err.into(),
        ..Default::default()
    };
    let mut health = comp(true, "running", "");
    health
        .component_health_map
        .insert("input.tail.0".into(), comp(true, "ok", ""));
    health
        .component_health_map
        .insert("output.stdout.0".into(), comp(true, "ok", ""));
    health.component_health_map.insert(
        "filter.grep.0".into(),
        comp(false, "retrying", "3 retries failed"),
    );
    let mut files = std::collections::HashMap::new();
    files.insert(
        "fluent-bit.conf".to_string(),
        AgentConfigFile {
            body: FLUENT_BIT_CONF.as_bytes().to_vec(),
            content_type: "text/plain".into(),
        },
    );
    AgentToServer {
        instance_uid: uid.as_bytes().to_vec(),
        sequence_num: seq,
        capabilities: Cap::ReportsStatus as u64
            | Cap::AcceptsRestartCommand as u64
            | Cap::ReportsHealth as u64
            | Cap::ReportsEffectiveConfig as u64
            | Cap::AcceptsRemoteConfig as u64
            | Cap::ReportsRemoteConfig as u64
            | Cap::ReportsHeartbeat as u64,
        agent_description: Some(AgentDescription {
            identifying_attributes: vec![
                kv_str("service.name", "fluent-bit"),
                kv_str("service.version", "5.1.1"),
                kv_str("service.instance.id", &uid.to_string()),
            ],
            non_identifying_attributes: vec![
                kv_str("host.name", "web-ws-1"),
                kv_str("os.type", "linux"),
            ],
        }),
        health: Some(health),
        effective_config: Some(EffectiveConfig {
            config_map: Some(AgentConfigMap { config_map: files }),
        }),
        ..Default::default()
    }
}

/// A WebSocket agent that restarts when told to: it reports a new start time, which is how
/// the server confirms a restart.
pub(crate) async fn ws_agent(url: String, uid: Uuid) -> tokio::task::JoinHandle<()> {
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("WebSocket connect");
    let (mut tx, mut rx) = ws.split();
    let mut seq = 0;
    tx.send(WsMessage::Binary(
        encode_ws(&status(uid, seq, now_ns())).into(),
    ))
    .await
    .unwrap();
    tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            let WsMessage::Binary(b) = m else { continue };
            let Ok(msg) = decode_ws::<ServerToAgent>(&b) else {
                continue;
            };
            let restart = msg.command.is_some();
            let full = msg.flags & 1 != 0;
            if restart || full {
                if restart {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                seq += 1;
                let reply = status(uid, seq, now_ns());
                if tx
                    .send(WsMessage::Binary(encode_ws(&reply).into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    })
}

// ---------------------------------------------------------------- the browser

struct Driver {
    child: tokio::process::Child,
    _profile: tempfile::TempDir,
}

fn require(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{what} not found at {}: run `bash tests/peers/install-browser.sh` (tests/run.sh does) \
         or set FLOTILLA_CHROMIUM / FLOTILLA_CHROMEDRIVER",
        path.display()
    );
}

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

async fn start_driver() -> (Driver, Client) {
    let chromium = env_path("FLOTILLA_CHROMIUM", "/usr/bin/chromium");
    let driver = env_path("FLOTILLA_CHROMEDRIVER", "/usr/bin/chromedriver");
    require(&chromium, "Chromium");
    require(&driver, "chromedriver");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(&driver)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/status"))
            .send()
            .await
        {
            if r.status().is_success() {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = tempfile::tempdir().unwrap();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            // Without the background-networking flags Chromium stalls on a closed network.
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--force-color-profile=srgb",
                format!("--user-data-dir={}", profile.path().display()),
                "--window-size=1280,800"
            ]
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("WebDriver session with Chromium");
    (
        Driver {
            child,
            _profile: profile,
        },
        client,
    )
}

/// Where screenshots go.
fn shots_dir() -> PathBuf {
    let dir = match std::env::var_os("FLOTILLA_CONSOLE_SCREENSHOTS") {
        Some(d) => {
            let p = PathBuf::from(d);
            if p.is_absolute() {
                p
            } else {
                repo_root().join(p)
            }
        }
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots"),
    };
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

struct Browser {
    c: Client,
    base: String,
    axe: String,
    shots: PathBuf,
    taken: Vec<PathBuf>,
}

impl Browser {
    async fn go(&self, path: &str) {
        self.c
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("goto {path}: {e}"));
    }

    async fn path(&self) -> String {
        let u = self.c.current_url().await.unwrap();
        match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        }
    }

    async fn text(&self, css: &str) -> String {
        match self
            .c
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(el) => el.text().await.unwrap(),
            Err(e) => panic!("no {css} on {}: {e}", self.path_now().await),
        }
    }

    async fn path_now(&self) -> String {
        self.c
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    async fn count(&self, css: &str) -> usize {
        self.c.find_all(Locator::Css(css)).await.unwrap().len()
    }

    async fn click(&self, css: &str) {
        self.c
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Polls `js` (an expression) until it is true.
    async fn until(&self, what: &str, js: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self
                .c
                .execute(&format!("return !!({js});"), vec![])
                .await
                .unwrap_or(Value::Bool(false));
            if v == Value::Bool(true) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let html = self.c.source().await.unwrap_or_default();
                panic!(
                    "{what}: `{js}` never held on {}\n{html}",
                    self.path_now().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs axe-core on the page; fails on any critical violation. Returns all violations.
    async fn axe(&self, page: &str) -> Vec<Value> {
        let loaded = self
            .c
            .execute(&format!("{}\n;return typeof axe;", self.axe), vec![])
            .await
            .unwrap_or_else(|e| panic!("inject axe-core on {page}: {e}"));
        assert_eq!(loaded, "object", "axe-core loaded on {page}");
        let r = self
            .c
            .execute_async(
                "var done = arguments[arguments.length - 1];\
                 axe.run(document, {resultTypes: ['violations']})\
                   .then(function (r) { done(r.violations.map(function (v) {\
                     return {id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(function (n) { return n.target.join(' '); })};\
                   })); })\
                   .catch(function (e) { done({error: String(e)}); });",
                vec![],
            )
            .await
            .unwrap_or_else(|e| panic!("axe.run on {page}: {e}"));
        let list = r
            .as_array()
            .unwrap_or_else(|| panic!("axe failed on {page}: {r}"))
            .clone();
        let critical: Vec<&Value> = list.iter().filter(|v| v["impact"] == "critical").collect();
        assert!(
            critical.is_empty(),
            "critical accessibility violations on {page}: {critical:#?}"
        );
        list
    }

    /// A screenshot of the whole page: the window grows to the page's height for it.
    async fn shot(&mut self, name: &str) {
        let (w, h) = self.c.get_window_size().await.expect("window size");
        let full = self
            .c
            .execute("return document.documentElement.scrollHeight;", vec![])
            .await
            .ok()
            .and_then(|v| v.as_u64())
            .unwrap_or(h);
        let grow = full > h;
        if grow {
            self.c
                .set_window_size(w as u32, full.min(3000) as u32)
                .await
                .expect("grow the window");
        }
        let png = self.c.screenshot().await.expect("screenshot");
        if grow {
            self.c
                .set_window_size(w as u32, h as u32)
                .await
                .expect("restore the window");
        }
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        self.taken.push(path);
    }

    /// Accessibility check and screenshot of the current page.
    async fn check(&mut self, name: &str) -> Vec<Value> {
        let v = self.axe(name).await;
        self.shot(name).await;
        v
    }

    async fn login(&self, token: &str) {
        self.go("/ui/login").await;
        let field = self
            .c
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css("#token"))
            .await
            .unwrap();
        field.send_keys(token).await.unwrap();
        self.click("form[action='/ui/login'] button[type=submit]")
            .await;
        self.until("signed in", "location.pathname === '/ui/fleet'")
            .await;
    }
}

async fn type_into(b: &Browser, css: &str, text: &str) {
    let el = b.c.find(Locator::Css(css)).await.unwrap();
    el.clear().await.unwrap();
    el.send_keys(text).await.unwrap();
}

#[tokio::test]
async fn the_console_in_a_real_browser() {
    let axe_path = peers_dir().join("browser/node_modules/axe-core/axe.min.js");
    let axe = std::fs::read_to_string(&axe_path).unwrap_or_else(|e| {
        panic!(
            "axe-core is not installed ({}: {e}): run `bash tests/peers/install-browser.sh`",
            axe_path.display()
        )
    });
    let server = TestServer::start().await;
    let rest = server.rest();
    // A small fleet: HTTP agents of two types, one unhealthy, and one over WebSocket.
    for (host, ty, version, healthy) in [
        ("web-1", "fluent-bit", "5.1.1", true),
        ("web-2", "fluent-bit", "5.1.1", false),
        ("db-1", "fluentd", "1.18.0", true),
    ] {
        register_agent_with_health(
            &server,
            &[
                ("service.name", ty),
                ("service.version", version),
                ("host.name", host),
            ],
            Cap::ReportsStatus as u64 | Cap::ReportsHealth as u64,
            &[],
            healthy,
        )
        .await;
    }
    register_agent(
        &server,
        &[("service.name", "fluentd"), ("host.name", "queue-1")],
        Cap::ReportsStatus as u64,
        &[],
    )
    .await;
    let ws_uid = Uuid::now_v7();
    let agent_task = ws_agent(server.opamp_ws_url(), ws_uid).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while rest.get(&format!("/api/v1/agents/{ws_uid}")).await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ws agent registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (_driver, client) = start_driver().await;
    let mut b = Browser {
        c: client,
        base: format!("http://{}", server.api),
        axe,
        shots: shots_dir(),
        taken: Vec::new(),
    };

    // ---- sign in (a signed-out visit lands on the form) ----
    b.go("/ui/agents/whatever").await;
    b.until("redirected to sign in", "location.pathname === '/ui/login'")
        .await;
    b.check("login").await;
    b.login(OPERATOR_TOKEN).await;

    // ---- fleet counts match REST ----
    let (_, summary) = rest.get("/api/v1/fleet/summary").await;
    assert_eq!(b.text("#total").await, summary["total"].to_string());
    for (facet, group, values) in [
        ("state", "by_state", &["healthy", "late", "offline"][..]),
        (
            "health",
            "by_health",
            &["healthy", "unhealthy", "unknown"][..],
        ),
    ] {
        for v in values {
            let shown = b
                .text(&format!("[data-facet='{facet}'][data-value='{v}'] .count"))
                .await;
            let want = summary[group][*v].as_u64().unwrap_or(0);
            assert_eq!(shown, want.to_string(), "{facet}={v}");
        }
    }
    for (t, n) in summary["by_type"].as_object().unwrap() {
        let shown = b
            .text(&format!("[data-facet='type'][data-value='{t}'] .count"))
            .await;
        assert_eq!(shown, n.to_string(), "type={t}");
    }
    assert_eq!(b.count("table.agents tbody tr").await, 5);
    b.check("fleet").await;

    // ---- changes made elsewhere appear on the open page, without reloading it ----
    b.c.execute("window.__noReload = 1;", vec![]).await.unwrap();
    b.until(
        "live updates on",
        "document.getElementById('live-status').dataset.state === 'on'",
    )
    .await;
    // An agent connects...
    let cache = register_agent(
        &server,
        &[("service.name", "fluent-bit"), ("host.name", "cache-1")],
        Cap::ReportsStatus as u64,
        &[],
    )
    .await;
    b.until(
        "the new agent's row",
        &format!("document.querySelector(\"tr[data-uid='{cache}']\") !== null"),
    )
    .await;
    assert_eq!(b.text("#total").await, "6");
    // ...and an operator labels it over REST.
    let (s, _) = rest
        .put(
            &format!("/api/v1/agents/{cache}/labels/tier"),
            serde_json::json!({"value": "edge"}),
        )
        .await;
    assert_eq!(s, 200);
    b.until(
        "the label in its row",
        &format!(
            "(document.querySelector(\"tr[data-uid='{cache}'] td.labels\") || {{}}).textContent \
             .indexOf('tier=edge') >= 0"
        ),
    )
    .await;
    b.until("no reload", "window.__noReload === 1").await;
    b.go(&format!("/ui/agents/{cache}")).await;
    b.c.execute("window.__noReload = 1;", vec![]).await.unwrap();
    b.until(
        "live updates on",
        "document.getElementById('live-status').dataset.state === 'on'",
    )
    .await;
    // Another agent connecting changes nothing on this page: no region is fetched again.
    b.c.execute(
        "window.__fetches = 0; var f = window.fetch; \
         window.fetch = function () { window.__fetches += 1; return f.apply(this, arguments); };",
        vec![],
    )
    .await
    .unwrap();
    register_agent(
        &server,
        &[("service.name", "fluent-bit"), ("host.name", "cache-2")],
        Cap::ReportsStatus as u64,
        &[],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let fetches =
        b.c.execute("return window.__fetches;", vec![])
            .await
            .unwrap();
    assert_eq!(
        fetches,
        json!(0),
        "another agent's change re-rendered this agent's page"
    );
    let (s, _) = rest
        .put(
            &format!("/api/v1/agents/{cache}/labels/zone"),
            serde_json::json!({"value": "eu-1"}),
        )
        .await;
    assert_eq!(s, 200);
    b.until(
        "the label on the agent page",
        "document.getElementById('agent-labels').textContent.indexOf('eu-1') >= 0",
    )
    .await;
    b.until("no reload", "window.__noReload === 1").await;
    rest.delete(&format!("/api/v1/agents/{cache}/labels/tier"))
        .await;
    b.go("/ui/fleet").await;

    // ---- search narrows the table, as you type ----
    b.c.execute("window.__noReload = 1;", vec![]).await.unwrap();
    type_into(&b, "#q", "host:web-*").await;
    let (_, found) = rest.get("/api/v1/agents?q=host:web-*").await;
    let want = found["items"].as_array().unwrap().len();
    assert_eq!(want, 3, "web-1, web-2, web-ws-1");
    b.until(
        "search narrowed",
        &format!("document.querySelectorAll('table.agents tbody tr').length === {want}"),
    )
    .await;
    b.until("no reload", "window.__noReload === 1").await;
    assert!(b.path().await.contains("q=host%3Aweb-*") || b.path().await.contains("q=host:web-*"));

    // ---- a bad query shows an inline error ----
    type_into(&b, "#q", "health:bogus").await;
    b.until(
        "inline error",
        "document.getElementById('q-error') !== null",
    )
    .await;
    let err = b.text("#q-error").await;
    assert!(
        err.contains("invalid query") && err.contains("health"),
        "{err}"
    );
    b.check("fleet-error").await;

    // The same search without the script: the form submits.
    b.go("/ui/fleet?q=type%3Afluentd").await;
    assert_eq!(b.count("table.agents tbody tr").await, 2);

    // ---- the WebSocket agent: health components ----
    b.go("/ui/fleet?q=host%3Aweb-ws-1").await;
    b.click(&format!("tr[data-uid='{ws_uid}'] a")).await;
    b.until(
        "agent page",
        &format!("location.pathname === '/ui/agents/{ws_uid}'"),
    )
    .await;
    for comp in ["input.tail.0", "output.stdout.0", "filter.grep.0"] {
        assert_eq!(
            b.count(&format!("#agent-health [data-component='{comp}']"))
                .await,
            1,
            "component {comp}"
        );
    }
    assert!(b.text("#agent-health").await.contains("3 retries failed"));
    assert!(
        b.count("#config .c-section").await >= 3,
        "highlighted config"
    );
    b.check("agent").await;

    // ---- queue a restart: preview, confirm, see it succeed without reloading ----
    b.click("#queue-h + form button[type=submit]").await;
    b.until("preview", "location.pathname === '/ui/commands/preview'")
        .await;
    assert_eq!(b.text("#target-count").await, "1 agent");
    b.check("command-preview").await;
    b.click("#confirm").await;
    b.until(
        "command page",
        "location.pathname.startsWith('/ui/commands/0')",
    )
    .await;
    // The page is not reloaded: the command settles on it through the live stream.
    b.c.execute("window.__noReload = 1;", vec![]).await.unwrap();
    let cmd_path = b.path().await;
    let id = cmd_path.trim_start_matches("/ui/commands/").to_string();
    b.until(
        "restart succeeded",
        "document.querySelector('#command-status [data-status]').dataset.status === 'succeeded'",
    )
    .await;
    b.until("no reload", "window.__noReload === 1").await;
    let (_, c) = rest.get(&format!("/api/v1/commands/{id}")).await;
    assert_eq!(c["status"], "succeeded");
    assert_eq!(c["channel"], "console");
    b.check("command").await;

    b.go("/ui/commands").await;
    b.check("commands").await;

    // ---- remote config: the editor prefilled with the effective config, and its diff ----
    b.go(&format!("/ui/config?agent={ws_uid}")).await;
    b.check("config").await;
    b.c.execute(
        "var t = document.getElementById('body_0'); t.value = t.value.replace('Flush        1', 'Flush        5');",
        vec![],
    )
    .await
    .unwrap();
    b.click("form[action='/ui/config/preview'] button[type=submit]")
        .await;
    b.until(
        "config preview",
        "location.pathname === '/ui/config/preview'",
    )
    .await;
    let diff = b.text("pre.diff").await;
    assert!(
        diff.contains("-    Flush        1") && diff.contains("+    Flush        5"),
        "{diff}"
    );
    b.check("config-preview").await;

    // ---- audit: the restart, with channel console, and the chain verified ----
    b.go("/ui/audit?channel=console").await;
    assert!(
        b.count("tr[data-operation='command.queue'][data-channel='console']")
            .await
            >= 1,
        "the queued restart is in the trail"
    );
    assert_eq!(
        b.c.execute(
            "return document.getElementById('chain-state').dataset.intact;",
            vec![]
        )
        .await
        .unwrap(),
        "true"
    );
    b.check("audit").await;
    b.go("/ui/approvals").await;
    b.check("approvals").await;

    // ---- phone width ----
    b.c.set_window_size(390, 844).await.unwrap();
    b.go("/ui/fleet").await;
    let overflow =
        b.c.execute(
            "return document.documentElement.scrollWidth - window.innerWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        overflow.as_i64().unwrap_or(99) <= 0,
        "no sideways scrolling of the page: {overflow}"
    );
    b.shot("fleet-phone").await;
    b.c.set_window_size(1280, 800).await.unwrap();

    // ---- a viewer: no controls, and a forged post is refused ----
    b.c.delete_all_cookies().await.unwrap();
    b.login(VIEWER_TOKEN).await;
    b.go(&format!("/ui/agents/{ws_uid}")).await;
    assert_eq!(
        b.count("form[method='post']").await,
        1,
        "a viewer's agent page has the sign-out form only"
    );
    assert_eq!(b.count("#label-key, #kind, #params").await, 0);
    // A form another page could build: no CSRF token.
    b.c.execute(
        &format!(
            "var f = document.createElement('form'); f.method = 'post'; \
             f.action = '/ui/agents/{ws_uid}/labels'; \
             ['key', 'value'].forEach(function (n) {{ var i = document.createElement('input'); \
               i.name = n; i.value = n === 'key' ? 'env' : 'forged'; f.appendChild(i); }}); \
             document.body.appendChild(f); f.submit();"
        ),
        vec![],
    )
    .await
    .unwrap();
    b.until(
        "refused",
        "document.querySelector('h1') && document.querySelector('h1').textContent === 'Refused'",
    )
    .await;
    // And with the viewer's own token: the service's role check.
    b.go(&format!("/ui/agents/{ws_uid}")).await;
    b.c.execute(
        &format!(
            "var f = document.createElement('form'); f.method = 'post'; \
             f.action = '/ui/agents/{ws_uid}/labels'; \
             var csrf = document.querySelector('input[name=csrf]').value; \
             [['key', 'env'], ['value', 'forged'], ['csrf', csrf]].forEach(function (p) {{ \
               var i = document.createElement('input'); i.name = p[0]; i.value = p[1]; f.appendChild(i); }}); \
             document.body.appendChild(f); f.submit();"
        ),
        vec![],
    )
    .await
    .unwrap();
    b.until(
        "not allowed",
        "document.body.textContent.indexOf('needs the operator role') >= 0",
    )
    .await;
    let (_, a) = rest.get(&format!("/api/v1/agents/{ws_uid}")).await;
    assert_eq!(a["labels"]["env"], Value::Null, "nothing changed");

    for p in &b.taken {
        let len = std::fs::metadata(p).unwrap().len();
        assert!(
            len > 2_000,
            "{} is a real screenshot ({len} bytes)",
            p.display()
        );
    }
    b.c.close().await.unwrap();
    agent_task.abort();
    server.stop().await;
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
