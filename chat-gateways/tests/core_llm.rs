//! The LLM planner through `Core::handle`, against the real `flotilla` binary (as in
//! `core_gateway`) and a fake OpenAI-compatible endpoint (`flotilla_e2e::fake_llm`) that
//! answers in the real chat-completions wire format and records what it was sent. Asserts the
//! requests (model, the MCP tools' names and schemas, the key, tool results as role "tool"),
//! what chat was answered, and what the fleet did: nothing is queued before a Confirm.

use std::sync::Arc;
use std::time::Duration;

use flotilla_chat::core::gateway::{CoreOptions, ACTION_CONFIRM};
use flotilla_chat::core::planner::llm::{offered_tools, Flavor, LlmConfig, LlmPlanner};
use flotilla_chat::core::planner::{rules, Plan, ThreadContext};
use flotilla_chat::{ChatUser, Reply};
use flotilla_e2e::fake_llm::{FakeLlm, Step};
use serde_json::{json, Value};

use crate::core_gateway::{agent, confirm_id, fast, setup, user, Setup};

const KEY: &str = "sk-test-0123456789";
const MODEL: &str = "fake-model";

fn options(fake_url: &str, tune: impl FnOnce(&mut LlmConfig)) -> CoreOptions {
    let mut cfg = LlmConfig::new(fake_url, MODEL);
    cfg.api_key = Some(KEY.into());
    cfg.timeout = Duration::from_secs(10);
    cfg.deadline = Duration::from_secs(20);
    tune(&mut cfg);
    CoreOptions {
        llm: Some(Arc::new(LlmPlanner::new(cfg).unwrap())),
        ..fast()
    }
}

/// The text is one the rule planner asks back about (so the model is asked).
fn missed(text: &str) -> &str {
    let p = rules::plan(text, &ThreadContext::default(), "slack:T1/U1 (Ada)");
    assert!(
        matches!(p, Plan::AskBack { .. }),
        "{text}: rules gave {p:?}"
    );
    text
}

fn text_of(r: &[Reply]) -> String {
    r.iter()
        .map(Reply::fallback_text)
        .collect::<Vec<_>>()
        .join("\n")
}

fn tool_messages(body: &Value) -> Vec<Value> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .cloned()
        .collect()
}

async fn with_fake(tune: impl FnOnce(&mut LlmConfig)) -> (Setup, FakeLlm) {
    let fake = FakeLlm::start(KEY).await;
    let s = setup(options(&fake.base_url(), tune), None).await;
    (s, fake)
}

#[tokio::test]
async fn a_read_only_question_is_answered_from_tool_results() {
    let (s, fake) = with_fake(|_| {}).await;
    let _a = agent(&s.server, "web-1").await;
    let _b = agent(&s.server, "web-2").await;
    let ada = user("U1", "Ada");
    fake.script([
        Step::Tools(vec![(
            "agents_search".into(),
            json!({"query": "type:fluentbit"}),
        )]),
        Step::Answer("Two Fluent Bit agents: web-1-host and web-2-host.".into()),
    ]);
    let r = s
        .say(
            &ada,
            missed("anything weird going on with our log shippers lately"),
        )
        .await;
    let text = text_of(&r);
    assert!(text.contains("Two Fluent Bit agents"), "{text}");
    // The data it stood on is shown, and where the answer came from.
    assert!(
        text.contains("*2* agents found") && text.contains("web-2-host"),
        "{text}"
    );
    assert!(
        text.contains("Answered by fake-model from agents_search"),
        "{text}"
    );

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let first = &reqs[0];
    assert_eq!(first.path, "/v1/chat/completions");
    assert_eq!(
        first.authorization.as_deref(),
        Some(&*format!("Bearer {KEY}"))
    );
    assert_eq!(first.body["model"], MODEL);
    assert_eq!(first.body["tool_choice"], "auto");
    assert_eq!(first.body["max_tokens"], 1024);
    // The MCP tools' own names, descriptions and schemas (command_cancel held back).
    let sent = first.body["tools"].as_array().unwrap();
    let mcp = flotilla_mcp::tools::all();
    assert_eq!(sent.len(), mcp.len() - 1);
    for t in sent {
        let name = t["function"]["name"].as_str().unwrap();
        let d = mcp.iter().find(|d| d.name == name).expect(name);
        assert_eq!(t["type"], "function");
        assert_eq!(
            t["function"]["parameters"],
            Value::Object((*d.tool.input_schema).clone())
        );
        assert_eq!(t["function"]["description"], json!(d.tool.description));
    }
    assert!(!sent
        .iter()
        .any(|t| t["function"]["name"] == "command_cancel"));
    assert_eq!(sent, &offered_tools());
    let msgs = first.body["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["role"], "system");
    let system = msgs[0]["content"].as_str().unwrap();
    assert!(
        system.contains("Flotilla's assistant in Slack") && system.contains("at most 4 rounds")
    );
    assert_eq!(msgs.last().unwrap()["role"], "user");

    // The tool result went back as role "tool" for the model's call id, after its call.
    let second = &reqs[1].body;
    let msgs = second["messages"].as_array().unwrap();
    let call = msgs.iter().find(|m| m["role"] == "assistant").unwrap();
    let id = call["tool_calls"][0]["id"].as_str().unwrap();
    assert_eq!(call["tool_calls"][0]["function"]["name"], "agents_search");
    let tools = tool_messages(second);
    assert_eq!(tools.len(), 1);
    assert_eq!(tools[0]["tool_call_id"], id);
    let result: Value = serde_json::from_str(tools[0]["content"].as_str().unwrap()).unwrap();
    assert_eq!(result["total"], 2, "{result}");

    // The thread remembers the model's search: "restart them" (rules) previews those two.
    let r = s.say(&ada, "restart them").await;
    let text = text_of(&r);
    assert!(text.contains("Confirm `restart` on 2 agents?"), "{text}");
    assert!(s.commands().await.is_empty());
    assert_eq!(fake.requests().len(), 2, "a rule hit never asks the model");
}

#[tokio::test]
async fn a_state_changing_call_is_previewed_and_queued_only_on_confirm() {
    let (s, fake) = with_fake(|_| {}).await;
    let a = agent(&s.server, "web-1").await;
    let _b = agent(&s.server, "web-2").await;
    let (ada, vic) = (
        user("U1", "Ada"),
        ChatUser {
            groups: vec!["S-viewers".into()],
            ..user("U3", "Vic")
        },
    );
    let restart = || {
        Step::Tools(vec![(
            "command_queue".into(),
            json!({"query": "host:web-1-host", "kind": "restart", "dry_run": true,
                   "confirmation_token": "made-up"}),
        )])
    };
    fake.script([restart(), restart()]);
    let ask = missed("the shipper on web one looks wedged, bounce the thing please");

    // A viewer gets the role refusal, privately; nothing queued.
    let r = s.say(&vic, ask).await;
    assert!(
        r[0].ephemeral && text_of(&r).contains("needs the *operator* role"),
        "{}",
        text_of(&r)
    );
    assert!(s.commands().await.is_empty());

    let r = s.say(&ada, ask).await;
    let text = text_of(&r);
    assert!(text.contains("Confirm `restart` on 1 agent?"), "{text}");
    assert!(
        text.contains("web-1-host") && text.contains("Nothing is queued until you confirm"),
        "{text}"
    );
    // The turn ended at the change: the model was not told it ran.
    assert_eq!(fake.requests().len(), 2);
    assert!(s.commands().await.is_empty(), "nothing queued by a preview");

    let r = s
        .click(&ada, ACTION_CONFIRM, &confirm_id(&r[0]), None)
        .await;
    assert!(
        text_of(&r).contains("Queued by Ada for 1 agent"),
        "{}",
        text_of(&r)
    );
    let cmds = s.commands().await;
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0]["kind"], "restart");
    assert_eq!(cmds[0]["agent_uid"], a.uid_str());
}

#[tokio::test]
async fn unknown_tools_and_bad_arguments_are_refused_and_told_to_the_model() {
    let (s, fake) = with_fake(|_| {}).await;
    let _a = agent(&s.server, "web-1").await;
    fake.script([
        Step::Tools(vec![
            ("delete_agents".into(), json!({"query": "host:web-1-host"})),
            ("command_cancel".into(), json!({"command_id": "c-1"})),
        ]),
        Step::RawArgs("agents_search".into(), "{\"query\": ".into()),
        Step::Tools(vec![(
            "command_queue".into(),
            json!({"query": "", "kind": "shutdown"}),
        )]),
        Step::Answer("I cannot delete agents; Flotilla can restart or shut them down.".into()),
    ]);
    let r = s
        .say(
            &user("U1", "Ada"),
            missed("nuke the flaky log boxes from orbit"),
        )
        .await;
    let text = text_of(&r);
    assert!(text.contains("I cannot delete agents"), "{text}");
    assert!(
        text.contains("Refused tool calls: delete_agents, command_cancel"),
        "{text}"
    );
    assert!(text.contains("without looking at the fleet"), "{text}");
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 4);
    let told: Vec<String> = tool_messages(&reqs[3].body)
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(told.len(), 4, "{told:?}");
    assert!(
        told[0].contains("unknown_tool") && told[1].contains("unknown_tool"),
        "{told:?}"
    );
    assert!(told[2].contains("arguments are not JSON"), "{told:?}");
    // A fan-out to the whole fleet by an empty query is not even previewed.
    assert!(told[3].contains("non-empty query"), "{told:?}");
    assert!(s.commands().await.is_empty());
}

#[tokio::test]
async fn the_step_limit_stops_a_model_that_keeps_calling_tools() {
    let (s, fake) = with_fake(|c| c.max_steps = 2).await;
    let _a = agent(&s.server, "web-1").await;
    let summary = || Step::Tools(vec![("fleet_summary".into(), json!({}))]);
    fake.script([summary(), summary(), summary()]);
    let r = s
        .say(
            &user("U1", "Ada"),
            missed("tell me a story about my log shippers"),
        )
        .await;
    let text = text_of(&r);
    assert!(text.contains("I stopped after 2 rounds"), "{text}");
    assert!(
        text.contains("Nothing was changed") && text.contains("*Fleet summary*"),
        "{text}"
    );
    let reqs = fake.requests();
    assert_eq!(
        reqs.len(),
        3,
        "two rounds and one request that may only answer"
    );
    assert_eq!(reqs[1].body["tool_choice"], "auto");
    assert_eq!(reqs[2].body["tool_choice"], "none");
    assert!(reqs[0].body["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains("at most 2 rounds"));
}

#[tokio::test]
async fn a_failing_endpoint_falls_back_to_the_rule_planner() {
    let fake = FakeLlm::start(KEY).await;
    let ask = missed("anything weird going on with our log shippers lately");
    let mut s = setup(fast(), None).await;
    let ada = user("U1", "Ada");

    // Down: a port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    /// What the note must say, the endpoint, its script, the settings.
    type Case = (&'static str, String, Vec<Step>, fn(&mut LlmConfig));
    let cases: Vec<Case> = vec![
        ("could not be reached", dead, vec![], |_| {}),
        (
            "did not answer within",
            fake.base_url(),
            vec![Step::Slow(
                Duration::from_secs(3),
                Box::new(Step::Answer("late".into())),
            )],
            |c| c.timeout = Duration::from_millis(300),
        ),
        (
            "did not finish within the",
            fake.base_url(),
            vec![Step::Slow(
                Duration::from_secs(3),
                Box::new(Step::Answer("late".into())),
            )],
            |c| c.deadline = Duration::from_millis(300),
        ),
        (
            "was not a chat completion",
            fake.base_url(),
            vec![Step::Raw("{\"choices\": [{\"message\": 42".into())],
            |_| {},
        ),
        (
            "was not a chat completion (no choices)",
            fake.base_url(),
            vec![Step::Raw("{\"choices\": []}".into())],
            |_| {},
        ),
        (
            "answered HTTP 503: overloaded",
            fake.base_url(),
            vec![Step::Status(503, "overloaded".into())],
            |_| {},
        ),
        (
            "cut at max_tokens",
            fake.base_url(),
            vec![Step::Length],
            |_| {},
        ),
        (
            "answered HTTP 401: Incorrect API key",
            fake.base_url(),
            vec![Step::Answer("never".into())],
            |c| c.api_key = Some("sk-wrong".into()),
        ),
    ];
    for (why, url, steps, tune) in cases {
        fake.script(steps);
        s.rebuild(options(&url, tune));
        let started = std::time::Instant::now();
        let r = s.say(&ada, ask).await;
        let text = text_of(&r);
        // The rule planner's answer, with a short note saying why.
        assert!(text.contains("I understood"), "{why}: {text}");
        assert!(
            text.contains("The language model could not help") && text.contains(why),
            "{why}: {text}"
        );
        assert!(!text.contains("sk-"), "{why}: the key leaked: {text}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{why}: not bounded"
        );
    }
    assert!(s.commands().await.is_empty());
}

#[tokio::test]
async fn the_azure_flavor_sends_api_key_and_api_version() {
    let fake = FakeLlm::start(KEY).await;
    let base = format!("http://{}/openai/deployments/gpt-4o", fake.addr);
    let azure = options(&base, |c| {
        c.flavor = Flavor::Azure;
        c.api_version = Some("2024-10-21".into());
    });
    let s = setup(azure, None).await;
    fake.script([Step::Answer("Nothing about the fleet was asked.".into())]);
    let r = s
        .say(&user("U1", "Ada"), missed("good morning friend"))
        .await;
    assert!(text_of(&r).contains("Nothing about the fleet was asked"));
    let req = &fake.requests()[0];
    assert_eq!(req.path, "/openai/deployments/gpt-4o/chat/completions");
    assert_eq!(req.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(req.api_key.as_deref(), Some(KEY));
    assert_eq!(req.authorization, None);
}
