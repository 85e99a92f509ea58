//! Custom-capability commands: parsing the wire forms (Flotilla's rich form with `command_id`,
//! fluent-opamp's plain form), running ChatOps (POST to the agent's local `http` input), and
//! building the reports (rich `result` messages, fluent-opamp `failure` messages).

use std::time::Duration;

use flotilla_proto::CustomMessage;
use serde_json::{json, Value};

use crate::auth::excerpt;
use crate::config::{CAP_CHATOPS, CAP_FLOTILLA, CAP_NULL, CAP_SHUTDOWN};

/// What a custom message from the server asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Chatops {
        tag: String,
        attributes: Value,
    },
    Shutdown,
    Null,
    /// Anything else: reported as a failure, never a crash.
    Unsupported(String),
}

/// A parsed custom message.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The capability as sent (fluent-opamp may prefix `request:`).
    pub capability: String,
    /// Set in Flotilla's rich form.
    pub command_id: Option<String>,
    pub request: Request,
}

impl Incoming {
    /// Short kind name for logs and the executed-command log.
    pub fn kind(&self) -> &'static str {
        match self.request {
            Request::Chatops { .. } => "chatops",
            Request::Shutdown => "shutdown",
            Request::Null => "null",
            Request::Unsupported(_) => "unsupported",
        }
    }
}

/// Reads a custom message. `declared` says whether a capability was declared by us.
pub fn parse(cm: &CustomMessage, declared: impl Fn(&str) -> bool) -> Incoming {
    let cap = cm
        .capability
        .strip_prefix("request:")
        .unwrap_or(&cm.capability)
        .to_string();
    let data: Value = serde_json::from_slice(&cm.data).unwrap_or(Value::Null);
    let command_id = data
        .get("command_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let request = if !declared(&cap) {
        Request::Unsupported(format!(
            "custom capability {cap:?} is not supported by this supervisor"
        ))
    } else {
        match cap.as_str() {
            CAP_CHATOPS => chatops(&data),
            CAP_SHUTDOWN => Request::Shutdown,
            CAP_NULL => Request::Null,
            CAP_FLOTILLA => Request::Unsupported(format!(
                "message type {:?} on {CAP_FLOTILLA} is not a command",
                cm.r#type
            )),
            other => Request::Unsupported(format!("custom capability {other:?} has no handler")),
        }
    };
    Incoming {
        capability: cm.capability.clone(),
        command_id,
        request,
    }
}

fn chatops(data: &Value) -> Request {
    let Some(tag) = data.get("tag").and_then(Value::as_str) else {
        return Request::Unsupported("ChatOps command without a tag".into());
    };
    // The tag becomes a URL path: only what fluent-opamp's tags and the server allow.
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        return Request::Unsupported(format!(
            "ChatOps tag {tag:?} must be 1-128 characters of A-Z a-z 0-9 . _ -"
        ));
    }
    // fluent-opamp sends attributes as an object or as a string holding JSON.
    let attributes = match data.get("attributes") {
        None | Some(Value::Null) => json!({}),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return Request::Unsupported(
                    "ChatOps attributes string is not a JSON object".into(),
                )
            }
        },
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => return Request::Unsupported("ChatOps attributes must be a JSON object".into()),
    };
    Request::Chatops {
        tag: tag.to_string(),
        attributes,
    }
}

/// Outcome of a command, reported to the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub ok: bool,
    pub message: String,
    /// Extra fields for the rich result (`http_code`, `body`, ...).
    pub details: serde_json::Map<String, Value>,
}

impl Outcome {
    pub fn ok(message: impl Into<String>) -> Self {
        Outcome {
            ok: true,
            message: message.into(),
            details: Default::default(),
        }
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Outcome {
            ok: false,
            message: message.into(),
            details: Default::default(),
        }
    }
}

/// POSTs the attributes to `http://127.0.0.1:<port>/<tag>` (fluent-opamp posts to localhost;
/// the `http` input listens there).
pub async fn run_chatops(
    http: &reqwest::Client,
    port: u16,
    tag: &str,
    attributes: &Value,
) -> Outcome {
    let url = format!("http://127.0.0.1:{port}/{tag}");
    let resp = http
        .post(&url)
        .timeout(Duration::from_secs(10))
        .header("content-type", "application/json")
        .body(attributes.to_string())
        .send()
        .await;
    match resp {
        Err(e) => {
            let mut o = Outcome::failed(format!("POST {url} failed: {e}"));
            o.details.insert("http_code".into(), json!(0));
            o
        }
        Ok(r) => {
            let code = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            let body = excerpt(&body, 512);
            let mut o = if (200..300).contains(&code) {
                Outcome::ok(format!("POST {url} answered HTTP {code}"))
            } else {
                Outcome::failed(format!("POST {url} answered HTTP {code}: {body}"))
            };
            o.details.insert("http_code".into(), json!(code));
            o.details.insert("body".into(), json!(body));
            o.details.insert("url".into(), json!(url));
            o
        }
    }
}

/// Flotilla's rich result for `command_id`.
pub fn rich_result(command_id: &str, o: &Outcome) -> Value {
    let mut m = o.details.clone();
    m.insert("command_id".into(), json!(command_id));
    m.insert(
        "status".into(),
        json!(if o.ok { "succeeded" } else { "failed" }),
    );
    m.insert("message".into(), json!(o.message));
    Value::Object(m)
}

/// The custom message carrying a rich result.
pub fn rich_message(result: &Value) -> CustomMessage {
    CustomMessage {
        capability: CAP_FLOTILLA.into(),
        r#type: "result".into(),
        data: result.to_string().into_bytes(),
    }
}

/// The command id of a Flotilla result (`CustomMessage{capability: CAP_FLOTILLA, type: "result"}`).
pub fn result_id(cm: &CustomMessage) -> Option<String> {
    flotilla_id(cm, "result")
}

/// The command id a Flotilla server acknowledges: it sends
/// `CustomMessage{capability: CAP_FLOTILLA, type: "ack", data: {"command_id": ...}}` in its reply
/// to a message carrying that command's result, once it has processed it.
pub fn ack_id(cm: &CustomMessage) -> Option<String> {
    flotilla_id(cm, "ack")
}

fn flotilla_id(cm: &CustomMessage, ty: &str) -> Option<String> {
    if cm.capability != CAP_FLOTILLA || cm.r#type != ty {
        return None;
    }
    let v: Value = serde_json::from_slice(&cm.data).ok()?;
    v.get("command_id")?.as_str().map(str::to_string)
}

/// fluent-opamp's failure report on the command's own capability (no command id; the server
/// correlates it with the oldest open command of that capability).
pub fn plain_failure(capability: &str, o: &Outcome) -> CustomMessage {
    let code = o.details.get("http_code").cloned().unwrap_or(json!(0));
    CustomMessage {
        capability: capability.to_string(),
        r#type: "failure".into(),
        data: json!({"http_code": code, "err_msg": o.message})
            .to_string()
            .into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(cap: &str, ty: &str, data: &str) -> CustomMessage {
        CustomMessage {
            capability: cap.into(),
            r#type: ty.into(),
            data: data.as_bytes().to_vec(),
        }
    }

    #[test]
    fn wire_forms() {
        let all = |_: &str| true;
        let i = parse(
            &cm(
                CAP_CHATOPS,
                "request",
                r#"{"attributes":{"b":1},"command_id":"c1","tag":"t"}"#,
            ),
            all,
        );
        assert_eq!(i.command_id.as_deref(), Some("c1"));
        assert_eq!(
            i.request,
            Request::Chatops {
                tag: "t".into(),
                attributes: json!({"b": 1})
            }
        );
        let i = parse(
            &cm(
                &format!("request:{CAP_CHATOPS}"),
                "request",
                r#"{"attributes":"{\"a\":2}","tag":"x.y"}"#,
            ),
            all,
        );
        assert_eq!(i.command_id, None);
        assert!(matches!(i.request, Request::Chatops { .. }));
        assert_eq!(
            parse(&cm(CAP_SHUTDOWN, "Shutdown Agent", "{}"), all).request,
            Request::Shutdown
        );
        assert_eq!(
            parse(&cm(CAP_NULL, "Null Command", r#"{"dummyValue":1}"#), all).request,
            Request::Null
        );
        assert!(matches!(
            parse(&cm(CAP_CHATOPS, "request", r#"{"tag":"../x"}"#), all).request,
            Request::Unsupported(_)
        ));
        assert!(matches!(
            parse(&cm("com.example.other", "do", "not json"), all).request,
            Request::Unsupported(_)
        ));
        assert!(matches!(
            parse(&cm(CAP_NULL, "Null Command", "{}"), |_| false).request,
            Request::Unsupported(_)
        ));
    }

    #[test]
    fn results_and_acks_are_told_apart() {
        let r = rich_message(&rich_result("c1", &Outcome::ok("done")));
        assert_eq!(result_id(&r).as_deref(), Some("c1"));
        assert_eq!(ack_id(&r), None);
        let a = cm(CAP_FLOTILLA, "ack", r#"{"command_id":"c1"}"#);
        assert_eq!(ack_id(&a).as_deref(), Some("c1"));
        assert_eq!(result_id(&a), None);
        assert_eq!(
            ack_id(&cm(CAP_CHATOPS, "ack", r#"{"command_id":"c1"}"#)),
            None
        );
        assert_eq!(ack_id(&cm(CAP_FLOTILLA, "ack", "not json")), None);
    }

    #[test]
    fn reports() {
        let mut o = Outcome::failed("HTTP 404");
        o.details.insert("http_code".into(), json!(404));
        let r = rich_result("c1", &o);
        assert_eq!(r["status"], "failed");
        assert_eq!(r["command_id"], "c1");
        assert_eq!(r["http_code"], 404);
        let p = plain_failure(CAP_CHATOPS, &o);
        assert_eq!(p.r#type, "failure");
        let v: Value = serde_json::from_slice(&p.data).unwrap();
        assert_eq!(v["http_code"], 404);
        assert_eq!(v["err_msg"], "HTTP 404");
    }
}
