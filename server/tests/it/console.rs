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
