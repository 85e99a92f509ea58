//! The registry index (search, fleet summary, catalog counts, `/metrics` gauges) against a full
//! scan of the store, after a seeded random churn of every kind of agent write, including
//! liveness transitions that only the passing of time makes.

use std::collections::BTreeMap;

use flotilla_server::commands::{check_capable, validate_params, CAP_CHATOPS, CAP_SHUTDOWN};
use flotilla_server::model::{
    now_ms, Agent, Caller, CommandKind, Health, Millis, NewAudit, Transport,
};
use flotilla_server::query::Query;
use flotilla_server::store::sqlite::SqliteStore;
use flotilla_server::store::{Store, Touch};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::{TestServer, ADMIN_TOKEN};

/// xorshift64*: a reproducible churn without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const TYPES: [&str; 4] = ["Fluent Bit", "fluentd", "otelcol", "fluent-bit"];
const VERSIONS: [&str; 5] = [
    "5.1.1",
    "Fluent Bit - 5.1.1 (Community)",
    "1.18.0",
    "v2.0.3-rc1",
    "unknown",
];
const HOSTS: [&str; 6] = ["web-1", "web-2", "WEB-3", "db-1", "db-2", "edge"];
const HOST_KEYS: [&str; 3] = ["host.name", "hostname", "host.hostname"];
const LABELS: [(&str, &str); 4] = [
    ("env", "prod"),
    ("env", "dev"),
    ("team", "obs"),
    ("tier", "1"),
];

/// Last-heard ages (ms) well inside healthy / late / offline for a 10 s interval, so the few
/// seconds the test takes never move an agent across a boundary.
const AGES: [Millis; 3] = [1_000, 22_000, 60_000];

fn random_agent(rng: &mut Rng, uid: Uuid, now: Millis) -> Agent {
    let mut a = Agent::new(uid, now - 100_000, 10);
    a.identifying = vec![("service.name".into(), rng.pick(&TYPES).to_string())];
    if rng.below(5) > 0 {
        a.identifying
            .push(("service.version".into(), rng.pick(&VERSIONS).to_string()));
    }
    if rng.below(6) > 0 {
        a.non_identifying = vec![(
            rng.pick(&HOST_KEYS).to_string(),
            rng.pick(&HOSTS).to_string(),
        )];
    }
    a.health = match rng.below(3) {
        0 => None,
        n => Some(Health {
            healthy: n == 1,
            ..Default::default()
        }),
    };
    a.capabilities = rng.next() & 0xfff;
    a.custom_capabilities = match rng.below(4) {
        0 => vec![],
        1 => vec![CAP_CHATOPS.into()],
        2 => vec![format!("request:{CAP_SHUTDOWN}")],
        _ => vec!["com.example.reload".into(), CAP_CHATOPS.into()],
    };
    if rng.below(2) == 0 {
        let (k, v) = rng.pick(&LABELS);
        a.labels.insert(k.to_string(), v.to_string());
    }
    a.last_seen = now - rng.pick(&AGES);
    a.connected = rng.below(2) == 0;
    a.transport = Some(if rng.below(2) == 0 {
        Transport::Websocket
    } else {
        Transport::Http
    });
    a
}

async fn scan(store: &dyn Store) -> Vec<Agent> {
    let mut out: Vec<Agent> = Vec::new();
    loop {
        let page = store
            .list_agents_brief(out.last().map(|a| a.uid), 1000)
            .await
            .unwrap();
        let n = page.len();
        out.extend(page);
        if n < 1000 {
            return out;
        }
    }
}

const QUERIES: [&str; 24] = [
    "",
    "type:fluentd",
    "type:fluentd health:unhealthy",
    "type:fluent*",
    "type:fluentbit -health:healthy",
    "health:unknown",
    "state:healthy",
    "state:late",
    "state:offline",
    "state:online type:otelcol",
    "version:5.1.*",
    "version:5.1.1",
    "version:\"Fluent Bit - 5.1.1 (Community)\"",
    "host:web-3",
    "host.name:WEB-*",
    "host:db-? label:env",
    "label:env=prod",
    "label:team",
    "capability:restart",
    "capability:chatops",
    "capability:shutdown state:online",
    "capability:com.example.*",
    "web",
    "replaced:yes",
];

/// Every query's matches over REST (paged, with total) against the scan; the summary and
/// `/metrics` against counts from the scan; catalog counts against capability checks.
async fn agree(server: &TestServer, what: &str) {
    let rest = server.rest_as(Some(ADMIN_TOKEN));
    let all = scan(server.fleet.store().as_ref()).await;
    let now = now_ms();
    for q in QUERIES {
        let query = Query::parse(q).unwrap();
        let want: Vec<String> = all
            .iter()
            .filter(|a| query.matches(a, now))
            .map(|a| a.uid.to_string())
            .collect();
        let mut got = Vec::new();
        let mut cursor = String::new();
        loop {
            let (st, page) = rest
                .get(&format!(
                    "/api/v1/agents?q={}&limit=97&total=true&cursor={cursor}",
                    urlencode(q)
                ))
                .await;
            assert_eq!(st, 200, "{what}: {q}: {page}");
            assert_eq!(page["total"], json!(want.len()), "{what}: total of {q:?}");
            got.extend(
                page["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["uid"].as_str().unwrap().to_string()),
            );
            match page["next_cursor"].as_str() {
                Some(c) => cursor = c.to_string(),
                None => break,
            }
        }
        assert_eq!(got, want, "{what}: matches of {q:?}");
    }

    let mut want: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    for a in &all {
        let mut bump =
            |k: &'static str, v: String| *want.entry(k).or_default().entry(v).or_default() += 1;
        bump("by_type", a.agent_type());
        bump(
            "by_version",
            a.attr("service.version").unwrap_or("unknown").to_string(),
        );
        bump(
            "by_health",
            match a.health.as_ref().map(|h| h.healthy) {
                Some(true) => "healthy",
                Some(false) => "unhealthy",
                None => "unknown",
            }
            .into(),
        );
        bump(
            "by_state",
            serde_json::to_value(a.liveness(now))
                .unwrap()
                .as_str()
                .unwrap()
                .into(),
        );
    }
    let (st, summary) = rest.get("/api/v1/fleet/summary").await;
    assert_eq!(st, 200);
    assert_eq!(summary["total"], json!(all.len()), "{what}: summary total");
    for (k, m) in &want {
        assert_eq!(summary[k], json!(m), "{what}: summary {k}");
    }

    let text = reqwest::get(server.api_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for state in ["healthy", "late", "offline"] {
        let line = format!("flotilla_agents{{state=\"{state}\"}} ");
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("{what}: no {line} in /metrics"))
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            n,
            want["by_state"].get(state).copied().unwrap_or(0),
            "{what}: /metrics agents {state}"
        );
    }

    let (st, catalog) = rest.get("/api/v1/catalog").await;
    assert_eq!(st, 200);
    for e in catalog["kinds"].as_array().unwrap() {
        let kind: CommandKind = serde_json::from_value(e["kind"].clone()).unwrap();
        let n = if kind == CommandKind::Custom {
            all.iter()
                .filter(|a| !a.custom_capabilities.is_empty())
                .count()
        } else {
            let p = match kind {
                CommandKind::Chatops => json!({"tag": "x"}),
                CommandKind::RemoteConfig => json!({"files": {"f": "x"}}),
                _ => Value::Null,
            };
            let p = validate_params(kind, &p).unwrap_or(Value::Null);
            all.iter()
                .filter(|a| check_capable(a, kind, &p).is_ok())
                .count()
        };
        assert_eq!(e["capable_agents"], json!(n), "{what}: catalog {kind:?}");
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn search_counts_and_metrics_agree_with_a_full_scan_after_random_churn() {
    let mut rng = Rng(0x5eed_f10c_1a00_0015);
    // A registry that exists before the server starts is read into the index at start.
    let dir = tempfile::tempdir().unwrap();
    let mut uids: Vec<Uuid> = Vec::new();
    {
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let now = now_ms();
        for _ in 0..150 {
            let uid = Uuid::now_v7();
            store
                .put_agent(&random_agent(&mut rng, uid, now))
                .await
                .unwrap();
            uids.push(uid);
        }
        store.close().await;
    }
    let server = TestServer::start_in(dir.path().to_path_buf(), |_| {}).await;
    agree(&server, "after start").await;

    let store = server.fleet.store().clone();
    let caller = Caller::system();
    for round in 0..3 {
        for _ in 0..300 {
            let now = now_ms();
            let uid = *rng.pick(&uids);
            match rng.below(9) {
                // register
                0 => {
                    let uid = Uuid::now_v7();
                    store
                        .put_agent(&random_agent(&mut rng, uid, now))
                        .await
                        .unwrap();
                    uids.push(uid);
                }
                // a status report: health, type, version, host, capabilities change
                1 | 2 => {
                    let mut a = store.get_agent(uid).await.unwrap().unwrap();
                    let fresh = random_agent(&mut rng, uid, now);
                    a.identifying = fresh.identifying;
                    a.non_identifying = fresh.non_identifying;
                    a.health = fresh.health;
                    a.capabilities = fresh.capabilities;
                    a.custom_capabilities = fresh.custom_capabilities;
                    a.labels = fresh.labels; // not written for a known agent: labels stay
                    a.last_seen = a.last_seen.max(fresh.last_seen);
                    store.put_agent(&a).await.unwrap();
                }
                3 => {
                    let (k, v) = rng.pick(&LABELS);
                    let value = (rng.below(3) > 0).then_some(*v);
                    store
                        .set_label(uid, k, value, NewAudit::new(&caller, "agent.label.set"))
                        .await
                        .unwrap();
                }
                // heartbeats, some too old to count
                4 | 5 => {
                    let touches: Vec<Touch> = (0..5)
                        .map(|_| Touch {
                            uid: *rng.pick(&uids),
                            last_seen: now - rng.pick(&AGES),
                            sequence_num: rng.next() % 100,
                            heartbeat_interval_s: (rng.below(4) == 0).then_some(10),
                        })
                        .collect();
                    store.touch_agents(&touches).await.unwrap();
                }
                6 => {
                    let connected = rng.below(2) == 0;
                    let at = now - rng.pick(&AGES);
                    store
                        .set_connected(uid, connected, Some(Transport::Websocket), None, at)
                        .await
                        .unwrap();
                }
                // an agent re-registered under a new uid (its old record goes offline)
                7 => {
                    let new = Uuid::now_v7();
                    store
                        .put_agent(&random_agent(&mut rng, new, now))
                        .await
                        .unwrap();
                    uids.push(new);
                    store
                        .link_reregistration(uid, new, NewAudit::new(&caller, "agent.reregistered"))
                        .await
                        .unwrap();
                }
                // an agent adopted a new instance uid
                _ => {
                    let new = Uuid::now_v7();
                    if store
                        .rename_agent(uid, new, NewAudit::new(&caller, "agent.uid.changed"))
                        .await
                        .unwrap()
                    {
                        uids.retain(|u| *u != uid);
                        uids.push(new);
                    }
                }
            }
        }
        agree(&server, &format!("after churn round {round}")).await;
    }

    // Liveness moves with time alone: agents heard just under 1.5 intervals ago go late
    // without any write, and search, summary and /metrics follow.
    let now = now_ms();
    let mut moving = Vec::new();
    for _ in 0..20 {
        let uid = Uuid::now_v7();
        let mut a = random_agent(&mut rng, uid, now);
        a.heartbeat_interval_s = 4;
        a.last_seen = now - 5_800; // late at +200 ms, offline at +6.2 s
        a.departed = false;
        store.put_agent(&a).await.unwrap();
        moving.push(uid.to_string());
    }
    let rest = server.rest_as(Some(ADMIN_TOKEN));
    let late = || async {
        let (_, page) = rest.get("/api/v1/agents?q=state:late&limit=1000").await;
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["uid"].as_str().unwrap().to_string())
            .collect::<Vec<String>>()
    };
    let late_before = late().await;
    assert!(
        moving.iter().all(|u| !late_before.contains(u)),
        "just heard: not late yet"
    );
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let late_after = late().await;
    assert!(
        moving.iter().all(|u| late_after.contains(u)),
        "late after 1.5 intervals of silence"
    );
    agree(&server, "after liveness transitions").await;
    server.stop().await;
}
