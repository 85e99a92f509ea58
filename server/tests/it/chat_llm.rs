//! `[chat.llm]` wired through `flotilla serve`: a real server with the Slack gateway (signed
//! requests, the fake Slack Web API) and the LLM planner pointed at a fake OpenAI-compatible
//! endpoint, its key from `FLOTILLA_CHAT_LLM_API_KEY`. A message the rule planner asks back
//! about reaches the model with the MCP tools, the model's read runs as the Slack user, and a
//! state-changing call it asks for is only previewed: nothing is queued.

use std::time::Duration;

use flotilla_e2e::fake_llm::{FakeLlm, Step};
use flotilla_e2e::fake_slack::{FakeSlack, SlackSigner};
use flotilla_server::config::Secret;
use serde_json::{json, Value};

use crate::chat_slack::{cmd, configure, connected_agent, SECRET, TOKEN};
use crate::support::TestServer;

const KEY: &str = "sk-server-test-key";
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn chat_llm_config_reaches_the_slack_gateway_and_changes_are_only_previewed() {
    let fake = FakeSlack::start(TOKEN).await;
    let llm = FakeLlm::start(KEY).await;
    let (api_url, base_url) = (fake.api_url(), llm.base_url());
    let server = TestServer::start_with(|c| {
        configure(c, &api_url);
        c.chat.llm.enabled = true;
        c.chat.llm.base_url = base_url;
        c.chat.llm.model = "gpt-test".into();
        c.chat.llm.max_steps = 3;
        c.env_secrets.chat_llm_api_key = Some(Secret(KEY.into()));
    })
    .await;
    let _agent = connected_agent(&server).await;
    let slack = SlackSigner::new(SECRET, &format!("http://{}", server.chat.unwrap()));

    llm.script([
        Step::Tools(vec![(
            "agents_search".into(),
            json!({"query": "host.name:web-ws-1"}),
        )]),
        Step::Answer("web-ws-1 is the one agent matching; it is connected.".into()),
        Step::Tools(vec![(
            "command_queue".into(),
            json!({"agent": "web-ws-1", "kind": "restart"}),
        )]),
    ]);
    let a = slack
        .command(
            &fake,
            &cmd(
                "UVIEW",
                "vic",
                "is the websocket shipper box alive at all",
                "t-llm-1",
            ),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    fake.wait_for(WAIT, "the model's answer", |c| {
        c.iter().any(|c| {
            c.method == "chat.postMessage" && c.body.to_string().contains("web-ws-1 is the one")
        })
    })
    .await;
    let posts = fake.calls_of("chat.postMessage");
    let answer = posts
        .iter()
        .find(|c| c.body.to_string().contains("web-ws-1 is the one"))
        .unwrap();
    assert!(answer
        .body
        .to_string()
        .contains("Answered by gpt-test from agents_search"));

    let reqs = llm.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[0].authorization.as_deref(),
        Some(&*format!("Bearer {KEY}"))
    );
    assert_eq!(reqs[0].body["model"], "gpt-test");
    let names: Vec<&str> = reqs[0].body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert!(names.contains(&"agents_search") && names.contains(&"command_queue"));
    assert!(reqs[0].body["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains("at most 3 rounds"));
    // The read ran as the Slack user, through the service: its result went back to the model.
    let tool = reqs[1].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .cloned()
        .unwrap();
    let result: Value = serde_json::from_str(tool["content"].as_str().unwrap()).unwrap();
    assert_eq!(result["total"], 1, "{result}");

    // The model asks for a restart: an operator gets a preview, and nothing is queued.
    slack
        .command(
            &fake,
            &cmd(
                "UOPS",
                "ada",
                "give the websocket shipper box a kick",
                "t-llm-2",
            ),
        )
        .await;
    fake.wait_for(WAIT, "the preview", |c| {
        c.iter().any(|c| {
            c.method == "chat.postMessage" && c.body.to_string().contains("flotilla_confirm")
        })
    })
    .await;
    let (st, body) = server.rest().get("/api/v1/commands").await;
    assert_eq!(st, 200);
    assert_eq!(body["items"], json!([]), "nothing queued before a Confirm");
    assert_eq!(llm.requests().len(), 3);
}
