//! A fake OpenAI-compatible chat-completions endpoint on loopback, for the chat gateway's LLM
//! planner: it answers `POST …/chat/completions` from a script, in the wire format of OpenAI's
//! "Create chat completion" reference (`choices[0].message.tool_calls[]` with `id`,
//! `type: "function"`, `function.name` and `function.arguments` as a JSON *string*,
//! `finish_reason: "tool_calls"`; a final `message.content` with `finish_reason: "stop"`;
//! errors as `{"error": {"message", "type", "param", "code"}}` with their HTTP status), and
//! records every request (body, headers, query) for the tests to check.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{json, Value};

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Step {
    /// `finish_reason: "tool_calls"` with these calls (name, arguments object).
    Tools(Vec<(String, Value)>),
    /// One tool call whose `arguments` string is exactly this (possibly not JSON).
    RawArgs(String, String),
    /// A final answer, `finish_reason: "stop"`.
    Answer(String),
    /// `finish_reason: "length"`: cut at max_tokens.
    Length,
    /// An error status with OpenAI's error body.
    Status(u16, String),
    /// HTTP 200 with this body as is.
    Raw(String),
    /// Wait, then answer with the step.
    Slow(Duration, Box<Step>),
}

/// One request the planner made.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub api_key: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct Inner {
    script: VecDeque<Step>,
    requests: Vec<Request>,
    next_call: u64,
}

/// The fake endpoint, serving until the runtime ends.
#[derive(Clone)]
pub struct FakeLlm {
    pub addr: SocketAddr,
    key: String,
    inner: Arc<Mutex<Inner>>,
}

impl FakeLlm {
    /// Starts a fake accepting `Authorization: Bearer <key>` (or `api-key: <key>`).
    pub async fn start(key: &str) -> FakeLlm {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeLlm {
            addr: listener.local_addr().unwrap(),
            key: key.to_string(),
            inner: Arc::new(Mutex::new(Inner::default())),
        };
        let app = Router::new().fallback(complete).with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        fake
    }

    /// The `base_url` to configure (`…/v1`, as OpenAI's).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Appends answers for the next requests, in order.
    pub fn script(&self, steps: impl IntoIterator<Item = Step>) {
        self.inner.lock().unwrap().script.extend(steps);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.inner.lock().unwrap().requests.clone()
    }
}

fn error(status: u16, message: &str, code: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(
            json!({"error": {"message": message, "type": "invalid_request_error",
                              "param": null, "code": code}}),
        ),
    )
        .into_response()
}

fn completion(model: &Value, message: Value, finish: &str) -> Response {
    Json(json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1_700_000_000,
        "model": model, "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    }))
    .into_response()
}

async fn complete(State(fake): State<FakeLlm>, uri: Uri, h: HeaderMap, body: Bytes) -> Response {
    let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let step = {
        let mut g = fake.inner.lock().unwrap();
        g.requests.push(Request {
            path: uri.path().to_string(),
            query: uri.query().map(str::to_string),
            authorization: header("authorization"),
            api_key: header("api-key"),
            body: json.clone(),
        });
        g.script.pop_front()
    };
    if !uri.path().ends_with("/chat/completions") {
        return error(404, "Invalid URL", "not_found");
    }
    let authed = header("authorization") == Some(format!("Bearer {}", fake.key))
        || header("api-key").as_deref() == Some(fake.key.as_str());
    if !authed {
        return error(401, "Incorrect API key provided", "invalid_api_key");
    }
    let Some(mut step) = step else {
        return error(500, "the fake's script is exhausted", "server_error");
    };
    loop {
        let model = &json["model"];
        return match step {
            Step::Slow(d, next) => {
                tokio::time::sleep(d).await;
                step = *next;
                continue;
            }
            Step::Tools(calls) => {
                let calls: Vec<Value> = calls
                    .into_iter()
                    .map(|(name, args)| (name, args.to_string()))
                    .map(|(name, args)| fake.tool_call(&name, &args))
                    .collect();
                completion(
                    model,
                    json!({"role": "assistant", "content": null, "tool_calls": calls, "refusal": null}),
                    "tool_calls",
                )
            }
            Step::RawArgs(name, args) => completion(
                model,
                json!({"role": "assistant", "content": null,
                       "tool_calls": [fake.tool_call(&name, &args)], "refusal": null}),
                "tool_calls",
            ),
            Step::Answer(text) => completion(
                model,
                json!({"role": "assistant", "content": text, "refusal": null}),
                "stop",
            ),
            Step::Length => completion(
                model,
                json!({"role": "assistant", "content": "The fleet has", "refusal": null}),
                "length",
            ),
            Step::Status(s, m) => error(s, &m, "server_error"),
            Step::Raw(b) => {
                (StatusCode::OK, [("content-type", "application/json")], b).into_response()
            }
        };
    }
}

impl FakeLlm {
    fn tool_call(&self, name: &str, args: &str) -> Value {
        let mut g = self.inner.lock().unwrap();
        g.next_call += 1;
        json!({"id": format!("call_{}", g.next_call), "type": "function",
               "function": {"name": name, "arguments": args}})
    }
}
