//! Fleet alerts: the engine fed bus events (JSON exactly as `Fleet::subscribe()` sends them)
//! through a broadcast channel, with tokio's clock paused — coalescing, de-duplication, the
//! per-channel token bucket and the storm summary; the subscription commands through the core;
//! and query matching against the real `flotilla` binary with labelled agents.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_chat::core::alerts::{
    candidate, resolve_events, split_query, thousands, AlertEngine, AlertOptions, Kind,
    ACTION_HEALTH, ACTION_MUTE, ACTION_RESTART,
};
use flotilla_chat::core::gateway::{Core, CoreOptions};
use flotilla_chat::core::identity::IdentityConfig;
use flotilla_chat::core::state::{ChatState, MemoryState, Mute, Subscription};
use flotilla_chat::{
    BackendFor, Block, ChatError, ChatUser, ConversationRef, Incoming, IncomingKind, MessageRef,
    Outbox, Platform, Reply, Role,
};
use flotilla_e2e::agent::HttpAgent;
use flotilla_e2e::{Home, Server};
use flotilla_mcp::{FleetBackend, RestBackend};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Posts(Mutex<Vec<(ConversationRef, Reply)>>);

impl Posts {
    fn all(&self) -> Vec<(ConversationRef, Reply)> {
        self.0.lock().unwrap().clone()
    }
    fn texts(&self) -> Vec<String> {
        self.all().iter().map(|(_, r)| r.fallback_text()).collect()
    }
}

#[async_trait]
impl Outbox for Posts {
    async fn post(&self, to: &ConversationRef, reply: &Reply) -> Result<MessageRef, ChatError> {
        let mut p = self.0.lock().unwrap();
        p.push((to.clone(), reply.clone()));
        Ok(MessageRef {
            conversation: to.clone(),
            id: format!("m{}", p.len()),
        })
    }
    async fn update(&self, _: &MessageRef, _: &Reply) -> Result<(), ChatError> {
        Ok(())
    }
    async fn ephemeral(
        &self,
        _: &ConversationRef,
        _: &ChatUser,
        _: &Reply,
    ) -> Result<(), ChatError> {
        Ok(())
    }
}

fn channel(id: &str) -> ConversationRef {
    ConversationRef {
        platform: Platform::Slack,
        workspace: "T1".into(),
        channel: id.into(),
        thread: None,
    }
}

fn ada() -> ChatUser {
    ChatUser {
        id: "U1".into(),
        name: "ada".into(),
        groups: vec![],
    }
}

fn sub(id: &str, chan: &str, query: &str, events: &[&str]) -> Subscription {
    Subscription {
        id: id.into(),
        conversation: channel(chan),
        query: query.into(),
        events: events.iter().map(|e| e.to_string()).collect(),
        created_by: ada(),
        created_at_ms: 1,
    }
}

fn offline(uid: &str, host: &str) -> Value {
    json!({"type": "agent.liveness", "at": 1, "uid": uid, "host": host,
           "agent_type": "fluentbit", "old": "late", "new": "offline"})
}

fn unhealthy(uid: &str, host: &str) -> Value {
    json!({"type": "agent.health", "at": 1, "uid": uid, "host": host,
           "agent_type": "fluentd", "old": "healthy", "new": "unhealthy",
           "last_error": "output es.0 down"})
}

/// No fleet call is made by subscriptions without an agent query.
fn no_backend() -> BackendFor {
    Arc::new(|_, _, _| unreachable!("no fleet call for a subscription without an agent query"))
}

struct Rig {
    state: Arc<MemoryState>,
    posts: Arc<Posts>,
    engine: Arc<AlertEngine>,
    tx: broadcast::Sender<Arc<Value>>,
    stop: CancellationToken,
}

async fn rig(opts: AlertOptions, subs: &[Subscription], backend_for: BackendFor) -> Rig {
    let state = Arc::new(MemoryState::default());
    for s in subs {
        state.put_subscription(s).await.unwrap();
    }
    let posts = Arc::new(Posts::default());
    let engine = Arc::new(AlertEngine::new(
        state.clone(),
        backend_for,
        HashMap::from([(Platform::Slack, posts.clone() as Arc<dyn Outbox>)]),
        opts,
    ));
    let (tx, rx) = broadcast::channel(65_536);
    let stop = CancellationToken::new();
    tokio::spawn(engine.clone().run(rx, stop.clone()));
    Rig {
        state,
        posts,
        engine,
        tx,
        stop,
    }
}

impl Rig {
    fn send(&self, ev: Value) {
        self.tx.send(Arc::new(ev)).unwrap();
    }
}

/// Lets the paused clock run `d` (the engine's timers fire as they come due).
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
    // The flush that the last timer started finishes before anyone looks.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn buttons(r: &Reply) -> Vec<(String, String)> {
    r.blocks
        .iter()
        .flat_map(|b| match b {
            Block::Buttons(bs) => bs
                .iter()
                .map(|b| (b.action_id.clone(), b.value.clone()))
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn events_become_alert_candidates_and_queries_split_into_events_and_agents() {
    let c = candidate(&offline("u1", "web-1")).unwrap();
    assert_eq!((c.kind, c.uid.as_str()), (Kind::Offline, "u1"));
    let c = candidate(&unhealthy("u2", "db-1")).unwrap();
    assert_eq!(c.kind, Kind::Unhealthy);
    assert_eq!(c.detail.as_deref(), Some("output es.0 down"));
    let back = json!({"type": "agent.liveness", "uid": "u1", "old": "offline", "new": "healthy"});
    assert_eq!(candidate(&back).unwrap().kind, Kind::Recovered);
    // Late is not an alert; neither is a label change nor a command making progress.
    let late = json!({"type": "agent.liveness", "uid": "u1", "old": "healthy", "new": "late"});
    assert_eq!(candidate(&late), None);
    assert_eq!(
        candidate(&json!({"type": "agent.labels", "uid": "u1", "key": "k"})),
        None
    );
    let failed = json!({"type": "command.failed", "agent_uid": "u3", "kind": "restart",
                        "status": "expired", "error": "no answer", "host": null});
    let c = candidate(&failed).unwrap();
    assert_eq!((c.kind, c.uid.as_str()), (Kind::CommandFailed, "u3"));
    assert!(c.detail.unwrap().contains("no answer"));
    let cfg = json!({"type": "config.status", "uid": "u4", "old": "applying", "new": "failed",
                     "error": "parse error"});
    assert_eq!(candidate(&cfg).unwrap().kind, Kind::ConfigFailed);

    assert_eq!(
        split_query("health:unhealthy type:fluentd"),
        (
            vec![Kind::Unhealthy, Kind::Recovered],
            "type:fluentd".to_string()
        )
    );
    assert_eq!(
        split_query("label:env=prod host.name:web-*"),
        (vec![], "label:env=prod host.name:web-*".to_string())
    );
    assert_eq!(
        resolve_events("state:offline", &[]).unwrap(),
        vec![Kind::Offline, Kind::Recovered]
    );
    assert_eq!(resolve_events("type:fluentd", &[]).unwrap(), Kind::ALL);
    assert_eq!(
        resolve_events("state:offline", &["command_failed".into()]).unwrap(),
        vec![Kind::CommandFailed]
    );
    assert!(resolve_events("", &["exploded".into()]).is_err());
    assert_eq!(thousands(1000), "1,000");
    assert_eq!(thousands(10_000_000), "10,000,000");
    assert_eq!(thousands(999), "999");
}

#[tokio::test(start_paused = true)]
async fn a_storm_of_1000_agents_going_offline_is_one_summary() {
    let r = rig(
        AlertOptions::default(),
        &[sub("s-1", "C1", "state:offline", &["offline", "recovered"])],
        no_backend(),
    )
    .await;
    for i in 1..=1000 {
        r.send(offline(&format!("u{i}"), &format!("web-{i}")));
    }
    run_for(Duration::from_secs(30)).await;
    let texts = r.posts.texts();
    assert_eq!(texts.len(), 1, "{texts:#?}");
    assert!(
        texts[0].contains("1,000 agents went offline") && texts[0].contains("web-1, web-2, web-3"),
        "{}",
        texts[0]
    );
    assert!(texts[0].contains("… and 990 more"), "{}", texts[0]);
    // A summary carries no per-agent buttons.
    assert!(buttons(&r.posts.all()[0].1).is_empty());
    let st = r.engine.stats();
    assert_eq!((st.events, st.alerts, st.messages), (1000, 1000, 1));
    r.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn one_agent_gets_one_alert_with_restart_health_and_mute_buttons() {
    let r = rig(
        AlertOptions::default(),
        &[sub("s-1", "C1", "", &["unhealthy", "offline"])],
        no_backend(),
    )
    .await;
    r.send(unhealthy("u7", "db-7"));
    // Not before the coalescing window closes (1 s after the last event).
    run_for(Duration::from_millis(900)).await;
    assert!(r.posts.all().is_empty());
    run_for(Duration::from_millis(200)).await;
    let all = r.posts.all();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, channel("C1"));
    let text = all[0].1.fallback_text();
    assert!(
        text.contains("db-7") && text.contains("became unhealthy") && text.contains("es.0 down"),
        "{text}"
    );
    assert_eq!(
        buttons(&all[0].1),
        vec![
            (ACTION_RESTART.to_string(), "u7".to_string()),
            (ACTION_HEALTH.to_string(), "u7".to_string()),
            (ACTION_MUTE.to_string(), "s-1 u7".to_string()),
        ]
    );
    // The same again within the de-duplication window: nothing; another kind: an alert.
    r.send(unhealthy("u7", "db-7"));
    run_for(Duration::from_secs(5)).await;
    assert_eq!(r.posts.all().len(), 1);
    r.send(offline("u7", "db-7"));
    run_for(Duration::from_secs(5)).await;
    assert_eq!(r.posts.all().len(), 2);
    assert_eq!(r.engine.stats().deduplicated, 1);
    // Kinds the subscription did not ask for are not alerted.
    r.send(json!({"type": "config.status", "uid": "u8", "new": "failed", "error": "x"}));
    run_for(Duration::from_secs(5)).await;
    assert_eq!(r.posts.all().len(), 2);
    r.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn de_duplication_ends_after_its_window() {
    let opts = AlertOptions {
        dedupe_for: Duration::from_secs(60),
        ..AlertOptions::default()
    };
    let r = rig(opts, &[sub("s-1", "C1", "", &["offline"])], no_backend()).await;
    r.send(offline("u1", "web-1"));
    run_for(Duration::from_secs(30)).await;
    r.send(offline("u1", "web-1"));
    run_for(Duration::from_secs(20)).await;
    assert_eq!(r.posts.all().len(), 1, "{:#?}", r.posts.texts());
    run_for(Duration::from_secs(20)).await;
    r.send(offline("u1", "web-1"));
    run_for(Duration::from_secs(5)).await;
    assert_eq!(r.posts.all().len(), 2, "{:#?}", r.posts.texts());
    r.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_drained_channel_holds_alerts_back_and_summarises_them_when_it_refills() {
    let opts = AlertOptions {
        burst: 2,
        refill_every: Duration::from_secs(60),
        ..AlertOptions::default()
    };
    let r = rig(
        opts,
        &[
            sub("s-1", "C1", "", &["offline"]),
            sub("s-2", "C2", "", &["offline"]),
        ],
        no_backend(),
    )
    .await;
    // Five windows of one agent each, 3 s apart: two singles, then the bucket is empty.
    for i in 1..=5 {
        r.send(offline(&format!("u{i}"), &format!("web-{i}")));
        run_for(Duration::from_secs(3)).await;
    }
    let c1 = |r: &Rig| {
        r.posts
            .all()
            .into_iter()
            .filter(|(c, _)| c.channel == "C1")
            .map(|(_, r)| r.fallback_text())
            .collect::<Vec<_>>()
    };
    // Each channel has its own bucket: C2 got the same.
    assert_eq!(c1(&r).len(), 2, "{:#?}", c1(&r));
    assert_eq!(r.posts.all().len(), 4);
    assert!(c1(&r)[0].contains("web-1") && c1(&r)[1].contains("web-2"));
    // When a token comes back, what was held back arrives as one summary.
    run_for(Duration::from_secs(60)).await;
    let texts = c1(&r);
    assert_eq!(texts.len(), 3, "{texts:#?}");
    assert!(
        texts[2].contains("3 agents went offline") && texts[2].contains("web-3, web-4, web-5"),
        "{}",
        texts[2]
    );
    r.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_muted_agent_is_not_alerted_for_that_subscription() {
    let r = rig(
        AlertOptions::default(),
        &[
            sub("s-1", "C1", "", &["offline"]),
            sub("s-2", "C2", "", &["offline"]),
        ],
        no_backend(),
    )
    .await;
    let far = i64::MAX / 2;
    assert!(r
        .state
        .mute(
            &Mute {
                subscription: "s-1".into(),
                agent: "u1".into(),
                until_ms: far,
            },
            &ada(),
        )
        .await
        .unwrap());
    r.send(offline("u1", "web-1"));
    run_for(Duration::from_secs(5)).await;
    let all = r.posts.all();
    assert_eq!(all.len(), 1, "{:#?}", r.posts.texts());
    assert_eq!(all[0].0.channel, "C2", "only the other subscription alerts");
    r.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_lag_on_the_bus_is_said_in_the_next_alert_and_shutdown_stops_the_engine() {
    let r = rig(
        AlertOptions::default(),
        &[sub("s-1", "C1", "", &["offline"])],
        no_backend(),
    )
    .await;
    r.engine.lagged(42);
    r.send(offline("u1", "web-1"));
    run_for(Duration::from_secs(5)).await;
    let t = r.posts.texts();
    assert!(t[0].contains("42 fleet events were missed"), "{t:?}");
    r.send(json!({"type": "shutdown", "at": 1}));
    run_for(Duration::from_secs(1)).await;
    // The engine has stopped and let go of the bus.
    assert!(r.tx.send(Arc::new(offline("u2", "web-2"))).is_err());
    assert_eq!(r.posts.all().len(), 1);
}

/// The subscription commands through the core: operators subscribe and unsubscribe, viewers
/// list, and a query the service refuses is said at once.
#[tokio::test]
async fn subscribe_list_and_unsubscribe_through_the_core() {
    let home = Home::new();
    let server = Server::start(&home).await;
    let url = server.url("");
    let token = home.tokens.viewer.clone();
    let backend_for: BackendFor = Arc::new(move |_, _, _| {
        Arc::new(RestBackend::new(&url, Some(token.clone())).unwrap()) as Arc<dyn FleetBackend>
    });
    let mut identity = IdentityConfig::default();
    identity.users.insert("U1".into(), Role::Operator);
    identity.users.insert("UV".into(), Role::Viewer);
    let state = Arc::new(MemoryState::default());
    let core = Core::new(identity, backend_for, state.clone(), CoreOptions::default());
    let posts: Arc<dyn Outbox> = Arc::new(Posts::default());
    let say = |who: &str, text: &str| {
        let conv = ConversationRef {
            thread: Some("1.2".into()),
            ..channel("C1")
        };
        core.handle(
            Incoming {
                conversation: conv,
                user: ChatUser {
                    id: who.into(),
                    name: who.to_lowercase(),
                    groups: vec![],
                },
                kind: IncomingKind::Command { text: text.into() },
                delivery_id: None,
            },
            posts.clone(),
        )
    };
    let r = say("UV", "subscribe state:offline").await;
    assert!(r[0].ephemeral);
    assert!(r[0].fallback_text().contains("operator"), "{r:?}");
    assert!(state.list_subscriptions().await.unwrap().is_empty());

    let r = say("U1", "subscribe health:maybe").await;
    assert!(
        r[0].ephemeral && r[0].fallback_text().contains("refused the query"),
        "{r:?}"
    );
    let r = say("U1", "subscribe health:unhealthy type:fluentd").await;
    let text = r[0].fallback_text();
    assert!(
        text.contains("unhealthy, recovered") && !r[0].ephemeral,
        "{text}"
    );
    let subs = state.list_subscriptions().await.unwrap();
    assert_eq!(subs.len(), 1);
    // The subscription posts to the channel, not the thread it was made in.
    assert_eq!(subs[0].conversation, channel("C1"));
    assert_eq!(subs[0].events, ["unhealthy", "recovered"]);
    let id = subs[0].id.clone();

    let r = say("UV", "subscriptions").await;
    let text = r[0].fallback_text();
    assert!(
        text.contains(&id) && text.contains("health:unhealthy type:fluentd"),
        "{text}"
    );
    let r = say("UV", &format!("unsubscribe {id}")).await;
    assert!(r[0].ephemeral, "{r:?}");
    let r = say("U1", "unsubscribe s-nope").await;
    assert!(r[0].fallback_text().contains("no subscription"), "{r:?}");
    let r = say("U1", &format!("unsubscribe {id}")).await;
    assert!(r[0].fallback_text().contains("Unsubscribed"), "{r:?}");
    assert!(state.list_subscriptions().await.unwrap().is_empty());
    let r = say("U1", "subscriptions").await;
    assert!(r[0].fallback_text().contains("no alert subscriptions"));
}

/// Agent queries are the service's own search: labels, host globs and types match the agents
/// the real server holds, whatever the event itself carries.
#[tokio::test]
async fn subscription_queries_match_agents_through_the_service_search() {
    let home = Home::new();
    let server = Server::start(&home).await;
    let mut agents = Vec::new();
    for name in ["web-1", "web-2", "db-1"] {
        let mut a = HttpAgent::fluent_like(&server.opamp_url(), name);
        let msg = a.full_state();
        a.send(msg).await;
        agents.push(a);
    }
    // web-1 and db-1 are prod.
    for a in [&agents[0], &agents[2]] {
        server
            .put(
                &format!("/api/v1/agents/{}/labels/env", a.uid_str()),
                &json!({"value": "prod"}),
            )
            .await
            .expect(200, "label");
    }
    let url = server.url("");
    let token = home.tokens.viewer.clone();
    let backend_for: BackendFor = Arc::new(move |_, _, _| {
        Arc::new(RestBackend::new(&url, Some(token.clone())).unwrap()) as Arc<dyn FleetBackend>
    });
    let opts = AlertOptions {
        quiet: Duration::from_millis(50),
        max_window: Duration::from_millis(200),
        ..AlertOptions::default()
    };
    let r = rig(
        opts,
        &[
            sub("s-prod", "CPROD", "label:env=prod", &["offline"]),
            sub("s-web", "CWEB", "host.name:web-*", &["offline"]),
            sub("s-fd", "CFD", "state:offline type:fluentd", &[]),
        ],
        backend_for,
    )
    .await;
    for a in &agents {
        // The events name no labels: the match comes from the service.
        r.send(offline(&a.uid_str(), &format!("{}-host", a.name)));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while r.posts.all().len() < 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let any further (wrong) message arrive before judging.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Two alerts each: sent one by one, with buttons.
    let hosts = |c: &str| -> Vec<String> {
        let mut h: Vec<String> = r
            .posts
            .all()
            .into_iter()
            .filter(|(conv, _)| conv.channel == c)
            .map(|(_, r)| r.fallback_text())
            .map(|t| t.split('*').nth(1).unwrap_or_default().to_string())
            .collect();
        h.sort();
        h
    };
    assert_eq!(hosts("CPROD"), ["db-1-host", "web-1-host"]);
    assert_eq!(hosts("CWEB"), ["web-1-host", "web-2-host"]);
    // The agents are Fluent Bit: a fluentd subscription hears nothing.
    assert!(hosts("CFD").is_empty(), "{:?}", hosts("CFD"));
    r.stop.cancel();
}
