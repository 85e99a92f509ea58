//! The web console at the HTTP level, against a real server: security headers, login and the
//! session cookie's flags, CSRF on every state change, roles (a viewer's forged post is
//! refused), audit channel `console`, inline search errors, and `console.enabled = false`.
//! The same flows in a real Chromium are in `console_browser.rs`.

use std::collections::BTreeMap;

use flotilla_proto::AgentCapabilities as Cap;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::support::{register_agent, TestServer, OPERATOR_TOKEN, VIEWER_TOKEN};

/// A browser-like client: no redirects followed, cookies kept by hand so tests see each
/// `Set-Cookie`.
pub struct Console {
    pub base: String,
    http: reqwest::Client,
    pub cookies: BTreeMap<String, String>,
}

pub struct Page {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Page {
    pub fn location(&self) -> &str {
        self.headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }
    /// The value of the first `name="…" value="…"` hidden input.
    pub fn hidden(&self, name: &str) -> Option<String> {
        let needle = format!("name=\"{name}\" value=\"");
        let i = self.body.find(&needle)? + needle.len();
        let j = self.body[i..].find('"')?;
        Some(self.body[i..i + j].to_string())
    }
}

impl Console {
    pub fn new(server: &TestServer) -> Console {
        Console {
            base: format!("http://{}", server.api),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: BTreeMap::new(),
        }
    }

    fn keep(&mut self, p: &Page) {
        for c in p.set_cookies() {
            let first = c.split(';').next().unwrap();
            let (k, v) = first.split_once('=').unwrap();
            if c.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_string(), v.to_string());
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub async fn get(&mut self, path: &str) -> Page {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .expect("GET");
        self.page(resp).await
    }

    pub async fn post(
        &mut self,
        path: &str,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Page {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .form(form);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("POST");
        self.page(resp).await
    }

    async fn page(&mut self, resp: reqwest::Response) -> Page {
        let p = Page {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap_or_default(),
        };
        self.keep(&p);
        p
    }

    /// Signs in with `token`; returns the session's CSRF token (from the next page).
    pub async fn login(&mut self, token: &str) -> String {
        let form = self.get("/ui/login").await;
        assert_eq!(form.status, StatusCode::OK, "{}", form.body);
        let nonce = form.hidden("login_csrf").expect("login form nonce");
        let r = self
            .post(
                "/ui/login",
                &[
                    ("token", token),
                    ("login_csrf", &nonce),
                    ("next", "/ui/fleet"),
                ],
                &[],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        let p = self.get("/ui/fleet").await;
        assert_eq!(p.status, StatusCode::OK, "{}", p.body);
        p.hidden("csrf").expect("csrf on every signed-in page")
    }
}

fn cookie<'a>(cookies: &'a [String], name: &str) -> &'a str {
    cookies
        .iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie in {cookies:?}"))
}

async fn agent(server: &TestServer, name: &str) -> Uuid {
    register_agent(
        server,
        &[
            ("service.name", "fluent-bit"),
            ("service.version", "5.1.1"),
            ("host.name", name),
        ],
        Cap::ReportsStatus as u64 | Cap::AcceptsRestartCommand as u64,
        &[],
    )
    .await
}

#[tokio::test]
async fn pages_carry_security_headers_and_login_sets_strict_cookies() {
    let server = TestServer::start().await;
    let mut c = Console::new(&server);
    // Signed out: every page sends the browser to the login form, remembering where it was.
    let r = c.get("/ui/audit?actor=ops").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/ui/login?next=%2Fui%2Faudit%3Factor%3Dops");
    let r = c.get("/").await;
    assert_eq!(r.location(), "/ui/fleet");

    let form = c.get("/ui/login").await;
    let h = &form.headers;
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    for d in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(d), "{d} missing from {csp}");
    }
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-store");
    // Nothing inline for the CSP to refuse.
    assert!(
        !form.body.contains("<script>") && !form.body.contains("style=\""),
        "{}",
        form.body
    );
    let cookies = form.set_cookies();
    let login = cookie(&cookies, "flotilla_login");
    assert!(
        login.contains("HttpOnly") && login.contains("SameSite=Strict"),
        "{login}"
    );
    let nonce = form.hidden("login_csrf").unwrap();

    // A login post without the form's own nonce (another site's form) is refused.
    let r = c
        .post(
            "/ui/login",
            &[("token", OPERATOR_TOKEN), ("login_csrf", "forged")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let form = c.get("/ui/login").await;
    let nonce2 = form.hidden("login_csrf").unwrap();
    assert_ne!(nonce, nonce2, "every form gets a fresh nonce");
    let r = c
        .post(
            "/ui/login",
            &[
                ("token", "not-a-real-token-123456"),
                ("login_csrf", &nonce2),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("not valid"), "{}", r.body);

    let form = c.get("/ui/login").await;
    let nonce3 = form.hidden("login_csrf").unwrap();
    let r = c
        .post(
            "/ui/login",
            &[
                ("token", OPERATOR_TOKEN),
                ("login_csrf", &nonce3),
                ("next", "https://evil.example/x"),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        r.location(),
        "/ui/fleet",
        "never redirected off the console"
    );
    let cookies = r.set_cookies();
    let session = cookie(&cookies, "flotilla_session");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(session.contains(flag), "{flag} missing: {session}");
    }
    assert!(
        !session.contains("Secure"),
        "plain HTTP: not Secure ({session})"
    );
    let page = c.get("/ui/fleet").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("ops (operator)"), "{}", page.body);

    // Assets are embedded, typed and cacheable.
    let css_url = page
        .body
        .split("href=\"/ui/assets/console.css")
        .nth(1)
        .unwrap();
    let css_url = format!(
        "/ui/assets/console.css{}",
        &css_url[..css_url.find('"').unwrap()]
    );
    let css = c.get(&css_url).await;
    assert_eq!(css.status, StatusCode::OK);
    assert_eq!(css.headers["content-type"], "text/css; charset=utf-8");
    assert!(css.body.contains("prefers-color-scheme: dark"));
    server.stop().await;
}

#[tokio::test]
async fn cookies_are_secure_behind_tls_and_the_console_can_be_turned_off() {
    let server = TestServer::start_with(|c| c.console.secure_cookie = true).await;
    let mut c = Console::new(&server);
    let form = c.get("/ui/login").await;
    let cookies = form.set_cookies();
    let login = cookie(&cookies, "__Host-flotilla_login");
    assert!(login.contains("; Secure"), "{login}");
    // reqwest does not drop Secure cookies over http, which lets the test go on.
    let nonce = form.hidden("login_csrf").unwrap();
    let r = c
        .post(
            "/ui/login",
            &[("token", OPERATOR_TOKEN), ("login_csrf", &nonce)],
            &[],
        )
        .await;
    let cookies = r.set_cookies();
    let s = cookie(&cookies, "__Host-flotilla_session");
    assert!(
        s.contains("; Secure") && s.contains("HttpOnly") && s.contains("SameSite=Strict"),
        "{s}"
    );
    server.stop().await;

    let server = TestServer::start_with(|c| c.console.enabled = false).await;
    let mut c = Console::new(&server);
    for path in ["/", "/ui/login", "/ui/fleet"] {
        assert_eq!(c.get(path).await.status, StatusCode::NOT_FOUND, "{path}");
    }
    // The REST API is unaffected.
    let (status, _) = server.rest().get("/api/v1/fleet/summary").await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn every_state_change_needs_the_sessions_csrf_token_and_is_audited_as_console() {
    let server = TestServer::start().await;
    let uid = agent(&server, "web-1").await;
    let mut c = Console::new(&server);
    let csrf = c.login(OPERATOR_TOKEN).await;
    let path = format!("/ui/agents/{uid}/labels");
    let label = |v: Value| v["labels"]["env"].clone();

    for (form, headers, why) in [
        (vec![("key", "env"), ("value", "prod")], vec![], "no token"),
        (
            vec![
                ("key", "env"),
                ("value", "prod"),
                ("csrf", "forged-forged-forged"),
            ],
            vec![],
            "wrong token",
        ),
        (
            vec![("key", "env"), ("value", "prod"), ("csrf", csrf.as_str())],
            vec![("origin", "https://evil.example")],
            "another origin",
        ),
        (
            vec![("key", "env"), ("value", "prod"), ("csrf", csrf.as_str())],
            vec![("sec-fetch-site", "cross-site")],
            "cross-site fetch",
        ),
    ] {
        let r = c.post(&path, &form, &headers).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{why}: {}", r.body);
        let (_, a) = server.rest().get(&format!("/api/v1/agents/{uid}")).await;
        assert_eq!(label(a), Value::Null, "{why}: nothing changed");
    }
    let origin = c.base.clone();
    let r = c
        .post(
            &path,
            &[("key", "env"), ("value", "prod"), ("csrf", &csrf)],
            &[("origin", &origin)],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let (_, a) = server.rest().get(&format!("/api/v1/agents/{uid}")).await;
    assert_eq!(label(a), "prod");
    let (_, audit) = server
        .rest()
        .get("/api/v1/audit?operation=agent.label.set")
        .await;
    let rec = &audit["items"][0];
    assert_eq!(rec["channel"], "console", "{rec}");
    assert_eq!(rec["actor"], "ops");

    // Cancel and sign-out are state changes too.
    let (_, q) = server
        .rest()
        .post(
            &format!("/api/v1/agents/{uid}/commands"),
            serde_json::json!({"kind": "restart"}),
        )
        .await;
    let id = q["command_id"].as_str().unwrap().to_string();
    let r = c.post(&format!("/ui/commands/{id}/cancel"), &[], &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = c
        .post(
            &format!("/ui/commands/{id}/cancel"),
            &[("csrf", &csrf)],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let (_, cmd) = server.rest().get(&format!("/api/v1/commands/{id}")).await;
    assert_eq!(cmd["status"], "cancelled");
    let r = c.post("/ui/logout", &[], &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = c.post("/ui/logout", &[("csrf", &csrf)], &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        c.get("/ui/fleet").await.status,
        StatusCode::SEE_OTHER,
        "signed out"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_viewer_sees_no_controls_and_a_forged_post_is_refused() {
    let server = TestServer::start().await;
    let uid = agent(&server, "web-2").await;
    let mut c = Console::new(&server);
    let csrf = c.login(VIEWER_TOKEN).await;
    for path in [
        format!("/ui/agents/{uid}"),
        "/ui/fleet".to_string(),
        "/ui/commands".to_string(),
        "/ui/config".to_string(),
        "/ui/audit".to_string(),
    ] {
        let p = c.get(&path).await;
        assert_eq!(p.status, StatusCode::OK, "{path}");
        let posts = p.body.matches("method=\"post\"").count();
        assert_eq!(posts, 1, "{path}: only the sign-out form ({})", p.body);
    }
    // Even with a valid session and token, the service refuses the viewer.
    let r = c
        .post(
            "/ui/commands/preview",
            &[
                ("csrf", &csrf),
                ("target", "agent"),
                ("agent", &uid.to_string()),
                ("kind", "restart"),
                ("params", "{}"),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = c
        .post(
            &format!("/ui/agents/{uid}/labels"),
            &[("csrf", &csrf), ("key", "env"), ("value", "x")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.body.contains("needs the operator role"), "{}", r.body);
    let (_, cmds) = server.rest().get("/api/v1/commands").await;
    assert_eq!(cmds["items"].as_array().unwrap().len(), 0, "nothing queued");
    server.stop().await;
}

#[tokio::test]
async fn searches_show_errors_inline_and_the_audit_page_verifies_the_chain() {
    let server = TestServer::start().await;
    agent(&server, "web-3").await;
    agent(&server, "db-1").await;
    let mut c = Console::new(&server);
    c.login(OPERATOR_TOKEN).await;
    let p = c.get("/ui/fleet?q=health%3Abogus").await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(
        p.body.contains("role=\"alert\"") && p.body.contains("invalid query"),
        "{}",
        p.body
    );
    let p = c.get("/ui/fleet?q=host%3Aweb-*").await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(
        p.body.contains("data-total=\"1\"")
            && p.body.contains("web-3")
            && !p.body.contains(">db-1<"),
        "{}",
        p.body
    );
    let p = c.get("/ui/audit").await;
    assert!(p.body.contains("data-intact=\"true\""), "{}", p.body);
    // The same verification over REST (the console does nothing REST cannot).
    let (status, v) = server.rest().get("/api/v1/audit/verify").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["intact"], true);
    server.stop().await;
}

/// An open `/ui/events` stream read as the browser's EventSource would.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    async fn open(c: &Console) -> Sse {
        let resp = c
            .http
            .get(format!("{}/ui/events", c.base))
            .header("cookie", c.cookie_header())
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("GET /ui/events");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Sse {
            resp,
            buf: String::new(),
        }
    }

    /// The next message's `(event, data)`, skipping keep-alive comments; `None` at the end of
    /// the stream or after `wait` with nothing.
    async fn next(&mut self, wait: std::time::Duration) -> Option<(String, String)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let (mut event, mut data) = (String::from("message"), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if block.lines().all(|l| l.starts_with(':') || l.is_empty()) {
                    continue;
                }
                return Some((event, data));
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.resp.chunk()).await {
                Ok(Ok(Some(b))) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return None,
            }
        }
    }
}

#[tokio::test]
async fn a_reconnect_storm_is_one_live_message_per_window() {
    use std::time::Duration;
    let server = TestServer::start().await;
    let mut c = Console::new(&server);
    c.login(VIEWER_TOKEN).await;
    let mut sse = Sse::open(&c).await;
    // What the login itself caused (its audit record) passes first; then all is quiet.
    while sse.next(Duration::from_millis(2500)).await.is_some() {}

    // A storm: 300 agents register (several events each) and labels change, for ~2.5 s.
    let started = tokio::time::Instant::now();
    let storm = {
        let server_opamp = server.opamp_http_url();
        let api = server.rest();
        tokio::spawn(async move {
            let mut uids = Vec::new();
            for wave in 0..5 {
                let mut set = tokio::task::JoinSet::new();
                for i in 0..60 {
                    let url = server_opamp.clone();
                    set.spawn(async move {
                        use flotilla_proto::Message;
                        let uid = Uuid::now_v7();
                        let msg = crate::support::agent_status(
                            uid,
                            0,
                            &[
                                ("service.name", "fluent-bit"),
                                ("host.name", &format!("storm-{wave}-{i}")),
                            ],
                            Cap::ReportsStatus as u64,
                            &[],
                        );
                        let r = reqwest::Client::new()
                            .post(url)
                            .header("Content-Type", "application/x-protobuf")
                            .body(msg.encode_to_vec())
                            .send()
                            .await
                            .expect("OpAMP post");
                        assert_eq!(r.status(), 200);
                        uid
                    });
                }
                while let Some(u) = set.join_next().await {
                    uids.push(u.unwrap());
                }
                let (s, _) = api
                    .put(
                        &format!("/api/v1/agents/{}/labels/wave", uids[0]),
                        serde_json::json!({"value": wave.to_string()}),
                    )
                    .await;
                assert_eq!(s, 200);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            uids.len()
        })
    };
    let mut got = Vec::new();
    // Until quiet for 2.5 s: the storm is over and flushed.
    while let Some(m) = sse.next(Duration::from_millis(2500)).await {
        got.push((tokio::time::Instant::now(), m));
    }
    assert_eq!(storm.await.unwrap(), 300);
    let span = got.last().unwrap().0 - started;
    // Each message waits one 1 s window after the first event it carries.
    assert!(
        got.len() as u128 <= span.as_millis() / 1000 + 1,
        "{} messages in {span:?}: {got:?}",
        got.len()
    );
    for w in got.windows(2) {
        assert!(
            w[1].0 - w[0].0 >= Duration::from_millis(900),
            "messages closer than a window: {got:?}"
        );
    }
    let mut topics = std::collections::BTreeSet::new();
    for (_, (event, data)) in &got {
        assert_eq!(event, "change");
        let v: Value = serde_json::from_str(data).unwrap();
        for t in v["topics"].as_array().unwrap() {
            topics.insert(t.as_str().unwrap().to_string());
        }
    }
    assert!(
        topics.contains("agents") && topics.contains("audit"),
        "{topics:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_live_stream_says_expired_when_the_session_ends() {
    use std::time::Duration;
    // The shortest session the configuration allows.
    let server = TestServer::start_with(|c| c.console.session_ttl_s = 60).await;
    let mut c = Console::new(&server);
    c.login(VIEWER_TOKEN).await;
    let opened = tokio::time::Instant::now();
    let mut sse = Sse::open(&c).await;
    let (event, _) = sse
        .next(Duration::from_secs(75))
        .await
        .expect("a message before the stream ends");
    assert_eq!(event, "expired");
    assert!(
        opened.elapsed() >= Duration::from_secs(55),
        "{:?}",
        opened.elapsed()
    );
    assert!(
        sse.next(Duration::from_secs(5)).await.is_none(),
        "the stream ends"
    );
    // And the expired session opens no new stream.
    let r = c
        .http
        .get(format!("{}/ui/events", c.base))
        .header("cookie", c.cookie_header())
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn a_live_stream_ends_when_the_server_stops() {
    use std::time::Duration;
    let server = TestServer::start().await;
    let mut c = Console::new(&server);
    c.login(VIEWER_TOKEN).await;
    let mut sse = Sse::open(&c).await;
    // The graceful stop is not held by the open stream: it ends with `shutdown`.
    let stopping = tokio::spawn(server.stop());
    let (event, _) = sse.next(Duration::from_secs(10)).await.expect("shutdown");
    assert_eq!(event, "shutdown");
    tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .expect("the server stopped")
        .unwrap();
}
