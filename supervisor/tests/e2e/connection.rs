//! The connection side: server outage and reconnect without duplicate execution (also with a
//! command still running when the server dies), Retry-After on both transports and from the
//! real server when it is full, duplicate command ids across reconnects and supervisor
//! restarts, agent_disconnect before Close, a server-offered endpoint (switch and fall back;
//! another origin refused; commands read while leaving run), results confirmed by the
//! server's ack (and by its answers where it does not ack), OAuth2 client credentials with
//! refresh, and HTTP polling against the real server.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::{CustomMessage, ServerToAgent};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::harness::*;

const T: Duration = Duration::from_secs(30);
const CAP_CHATOPS: &str = "org.mp3monster.opamp_provider.chatopcommand";

#[tokio::test]
async fn server_outage_then_reconnect_without_duplicates() {
    let mut server = Server::start().await;
    let (sink, sup, uid) = chatops_setup(&server).await;
    let id = server
        .command(&uid, "chatops", json!({"tag": "before", "attributes": {}}))
        .await;
    assert_eq!(server.wait_command(&id, T).await["status"], "succeeded");
    // Over WebSocket the real server acks each result, and only the ack confirms it.
    sup.wait_log(
        &format!("the server acknowledged a result command_id={id} known=true"),
        T,
    )
    .await;

    server.kill().await;
    // The supervisor saw the outage before the server comes back.
    sup.wait_log("OpAMP connection:", T).await;
    server.restart().await;
    server
        .wait_agent(&uid, "reconnected", T, |a| a["connected"] == true)
        .await;
    let id2 = server
        .command(&uid, "chatops", json!({"tag": "after", "attributes": {}}))
        .await;
    assert_eq!(server.wait_command(&id2, T).await["status"], "succeeded");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sink.count("/before"),
        1,
        "{:?}",
        sink.requests.lock().unwrap()
    );
    assert_eq!(sink.count("/after"), 1);
    assert!(sup.log().contains("OpAMP WebSocket connected"));
    // Both results were acked: nothing was sent again after the outage.
    assert!(!sup.log().contains("re-sending results"), "{}", sup.log());
}

#[tokio::test]
async fn outage_while_a_command_runs_settles_it_once() {
    let mut server = Server::start().await;
    let (sink, sup, uid) = chatops_setup(&server).await;
    let id = server
        .command(
            &uid,
            "chatops",
            json!({"tag": "hold.deploy", "attributes": {}}),
        )
        .await;
    // The supervisor is running it (the POST reached the listener, which has not answered)...
    wait_for("the ChatOps POST", T, || {
        let n = sink.count("/hold.deploy");
        async move { (n == 1).then_some(()) }
    })
    .await;
    // ...when the server dies. The result is produced while nobody listens.
    server.kill().await;
    sink.release();
    sup.wait_log("command succeeded", T).await;
    server.restart().await;
    // Delivered after the reconnect and stored on the command, which ran exactly once.
    let c = server.wait_command(&id, T).await;
    assert_eq!(c["status"], "succeeded", "{c}\n{}", sup.log());
    assert_eq!(c["result"]["http_code"], 201, "{c}");
    assert_eq!(sink.count("/hold.deploy"), 1);
    let done = std::fs::read_to_string(sup.data_dir().join("commands.json")).unwrap();
    assert!(done.contains(&id), "{done}");
}

#[tokio::test]
async fn retry_after_from_the_real_server_when_it_is_full() {
    // Room for one agent connection, and the test takes it: the supervisor's upgrade gets the
    // server's own 503 + Retry-After: 2.
    let server = Server::start_with_toml("[opamp]\nmax_connections = 1\nretry_after_s = 2\n").await;
    let (holder, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("the test's own connection");
    let sup = Sup::start(SupOpts::fluent_bit(&server.ws_url())).await;
    let uid = sup.uid().await;
    wait_for("three refused upgrades", T, || {
        let n = sup.log_times("OpAMP server busy").len();
        async move { (n >= 3).then_some(()) }
    })
    .await;
    assert!(
        sup.log().contains("HTTP 503, Retry-After 2"),
        "{}",
        sup.log()
    );
    let refused = sup.log_times("OpAMP server busy");
    for w in refused.windows(2).take(2) {
        let gap = w[1] - w[0];
        // The backoff here starts at 200 ms; only Retry-After explains ≥ 1.9 s every time.
        assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
    }
    let overload = server
        .metric("flotilla_opamp_rejected_total{reason=\"overload\"}")
        .await;
    assert!(overload >= 3.0, "server counted {overload} refusals");
    // A slot frees up: it gets in.
    drop(holder);
    server
        .wait_agent(&uid, "connected once there is room", T, |a| {
            a["connected"] == true
        })
        .await;
}

/// A ServerToAgent offering `endpoint` as the OpAMP destination (heartbeat unchanged: 30 s).
fn endpoint_offer(endpoint: &str) -> ServerToAgent {
    ServerToAgent {
        connection_settings: Some(flotilla_proto::ConnectionSettingsOffers {
            opamp: Some(flotilla_proto::OpAmpConnectionSettings {
                destination_endpoint: endpoint.to_string(),
                heartbeat_interval_seconds: 30,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn offered_endpoint_is_used_and_a_dead_one_falls_back() {
    let mut a = FakeOpamp::start().await;
    let mut b = FakeOpamp::start().await;
    let mut opts = SupOpts::fluent_bit(&a.url);
    // Each fake is its own origin (port): only "any" follows such offers.
    opts.server_extra = "accept_offered_endpoint = \"any\"\n".into();
    let sup = Sup::start(opts).await;
    a.wait_message("first status", T, |_| true).await;
    // Offered another endpoint: goodbye here, full status there.
    a.push.send(endpoint_offer(&b.url)).unwrap();
    a.wait_message("agent_disconnect on the old endpoint", T, |m| {
        m.agent_disconnect.is_some()
    })
    .await;
    b.wait_message("status on the offered endpoint", T, |m| {
        m.agent_description.is_some()
    })
    .await;
    // Offered one that does not answer: back to the one that works...
    let dead = format!("ws://127.0.0.1:{}/v1/opamp", free_port());
    b.push.send(endpoint_offer(&dead)).unwrap();
    b.wait_message("agent_disconnect before trying it", T, |m| {
        m.agent_disconnect.is_some()
    })
    .await;
    b.wait_message("status after falling back", T, |m| {
        m.agent_description.is_some()
    })
    .await;
    // ...and offered it again (as a server does on every connection): not tried again.
    b.push.send(endpoint_offer(&dead)).unwrap();
    sup.wait_log("offered OpAMP endpoint failed before; staying", T)
        .await;
    assert_eq!(
        sup.log().matches("did not answer").count(),
        1,
        "{}",
        sup.log()
    );
}

/// A local endpoint answering every request with 503 + `Retry-After: <retry_after>` for the
/// first `refusals` requests (then it closes the connection); records when each arrived.
async fn throttling_endpoint(
    refusals: usize,
    retry_after: &'static str,
) -> (String, Arc<Mutex<Vec<Instant>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let seen = s2.clone();
            tokio::spawn(async move {
                if read_http(&mut s).await.is_none() {
                    return;
                }
                let n = {
                    let mut v = seen.lock().unwrap();
                    v.push(Instant::now());
                    v.len()
                };
                if n <= refusals {
                    let resp = format!("HTTP/1.1 503 Service Unavailable\r\nretry-after: {retry_after}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    let _ = s.write_all(resp.as_bytes()).await;
                }
            });
        }
    });
    (format!("{addr}/v1/opamp"), seen)
}

async fn assert_retry_after(scheme: &str) {
    let (addr, seen) = throttling_endpoint(3, "2").await;
    let _sup = Sup::start(SupOpts::fluent_bit(&format!("{scheme}://{addr}"))).await;
    wait_for("three attempts", Duration::from_secs(20), || {
        let n = seen.lock().unwrap().len();
        async move { (n >= 3).then_some(()) }
    })
    .await;
    let v = seen.lock().unwrap().clone();
    for w in v.windows(2).take(2) {
        let gap = w[1] - w[0];
        // Backoff here is 200 ms..2 s; only Retry-After explains ≥ 1.9 s every time.
        assert!(
            gap >= Duration::from_millis(1900),
            "{scheme}: retried after {gap:?} despite Retry-After: 2"
        );
    }
}

#[tokio::test]
async fn retry_after_is_honoured_over_http() {
    assert_retry_after("http").await;
}

#[tokio::test]
async fn retry_after_is_honoured_on_websocket_upgrade() {
    assert_retry_after("ws").await;
}

#[tokio::test]
async fn retry_after_zero_still_backs_off() {
    // "Retry now" (0, or a date already past) must not become a reconnect loop: each retry
    // waits at least the backoff's next delay (200 ms, 400 ms, 800 ms ± 20 % here).
    let (addr, seen) = throttling_endpoint(4, "0").await;
    let _sup = Sup::start(SupOpts::fluent_bit(&format!("ws://{addr}"))).await;
    wait_for("four attempts", Duration::from_secs(20), || {
        let n = seen.lock().unwrap().len();
        async move { (n >= 4).then_some(()) }
    })
    .await;
    let v = seen.lock().unwrap().clone();
    let gaps: Vec<Duration> = v.windows(2).take(3).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(150)),
        "retried without waiting: {gaps:?}"
    );
    assert!(gaps[2] > gaps[0], "the backoff did not advance: {gaps:?}");
}

#[tokio::test]
async fn unavailable_with_retry_info_is_honoured() {
    let mut fake = FakeOpamp::start().await;
    let _sup = Sup::start(SupOpts::fluent_bit(&fake.url)).await;
    fake.wait_message("first status", T, |_| true).await;
    fake.push
        .send(ServerToAgent {
            error_response: Some(flotilla_proto::ServerErrorResponse {
                r#type: flotilla_proto::ServerErrorResponseType::Unavailable as i32,
                error_message: "busy".into(),
                details: Some(
                    flotilla_proto::v1::server_error_response::Details::RetryInfo(
                        flotilla_proto::RetryInfo {
                            retry_after_nanoseconds: 2_500_000_000,
                        },
                    ),
                ),
            }),
            ..Default::default()
        })
        .unwrap();
    let t0 = Instant::now();
    loop {
        match fake.next(T).await {
            FakeEvent::Closed => break,
            _ => continue,
        }
    }
    loop {
        if let FakeEvent::Connected { .. } = fake.next(T).await {
            break;
        }
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(2400),
        "reconnected after {:?} despite RetryInfo 2.5 s",
        t0.elapsed()
    );
}

fn chatops_push(command_id: &str, tag: &str) -> ServerToAgent {
    ServerToAgent {
        custom_message: Some(CustomMessage {
            capability: CAP_CHATOPS.into(),
            r#type: "request".into(),
            data: json!({"attributes": {"n": 1}, "command_id": command_id, "tag": tag})
                .to_string()
                .into_bytes(),
        }),
        ..Default::default()
    }
}

fn is_result_for(m: &flotilla_proto::AgentToServer, id: &str) -> bool {
    custom_json(m)
        .map(|(cap, ty, v)| {
            cap == "io.flotilla.command/v1" && ty == "result" && v["command_id"] == id
        })
        .unwrap_or(false)
}

/// A rich null command: answered at once, it marks a point in the message stream.
fn null_push(command_id: &str) -> ServerToAgent {
    ServerToAgent {
        custom_message: Some(CustomMessage {
            capability: "org.mp3monster.opamp_provider.nullcommand".into(),
            r#type: "Null Command".into(),
            data: json!({"command_id": command_id}).to_string().into_bytes(),
        }),
        ..Default::default()
    }
}

/// Pushes a null command and returns every message up to its result: a result the
/// supervisor re-sends after a reconnect goes out before it (re-sent ones are queued first).
async fn messages_until_marker(fake: &mut FakeOpamp) -> Vec<flotilla_proto::AgentToServer> {
    let marker = uuid::Uuid::now_v7().to_string();
    fake.push.send(null_push(&marker)).unwrap();
    fake.messages_until("marker result", T, |m| is_result_for(m, &marker))
        .await
}

/// After the reconnect that follows a kick: the result of `id` is not sent again.
async fn assert_not_resent_after_reconnect(fake: &mut FakeOpamp, id: &str, sup: &Sup) {
    fake.wait_connected(T).await;
    let seen = messages_until_marker(fake).await;
    assert!(
        !seen.iter().any(|m| is_result_for(m, id)),
        "the result of {id} was sent again\n{}",
        sup.log()
    );
}

/// The marker a server declares when it acks results.
const CAP_ACK: &str = "io.flotilla.command/v1/ack";

#[tokio::test]
async fn on_websocket_only_the_ack_confirms_a_result() {
    let mut fake = FakeOpamp::start_with(FakeBehaviour {
        declare: vec![CAP_ACK.into()],
        ack: true,
    })
    .await;
    let sink = ChatSink::start().await;
    let mut opts = SupOpts::fluent_bit(&fake.url);
    opts.chat_ops_port = sink.port;
    let sup = Sup::start(opts).await;
    fake.wait_message("first status", T, |_| true).await;
    // The server takes the result but dies before processing it (no answer, no ack), while
    // frames it pushed unasked (queued commands) still arrive: they answer nothing.
    fake.withhold
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let id = uuid::Uuid::now_v7().to_string();
    fake.push.send(chatops_push(&id, "acked")).unwrap();
    fake.wait_message("result", T, |m| is_result_for(m, &id))
        .await;
    for _ in 0..5 {
        fake.push.send(ServerToAgent::default()).unwrap();
    }
    fake.withhold
        .store(false, std::sync::atomic::Ordering::SeqCst);
    fake.kick.send(()).unwrap();
    fake.wait_connected(T).await;
    // Not acked: re-sent on the next connection, where it is answered with its ack.
    fake.wait_message("result re-sent", T, |m| is_result_for(m, &id))
        .await;
    sup.wait_log(
        &format!("the server acknowledged a result command_id={id} known=true"),
        T,
    )
    .await;
    // Acked: never sent again, and the ack itself is not taken for a command.
    fake.kick.send(()).unwrap();
    assert_not_resent_after_reconnect(&mut fake, &id, &sup).await;
    assert_eq!(sink.count("/acked"), 1);
}

#[tokio::test]
async fn without_acks_answers_confirm_and_re_sends_are_bounded() {
    // fluent-opamp's server declares no io.flotilla.command/v1/ack and never acks: its answer
    // confirms a result, as before acks existed.
    let mut plain = FakeOpamp::start().await;
    // One that declares it but does not ack (a broken or hostile server).
    let mut old = FakeOpamp::start_with(FakeBehaviour {
        declare: vec![CAP_ACK.into()],
        ack: false,
    })
    .await;
    let plain_sup = Sup::start(SupOpts::fluent_bit(&plain.url)).await;
    let old_sup = Sup::start(SupOpts::fluent_bit(&old.url)).await;
    plain.wait_message("first status", T, |_| true).await;
    old.wait_message("first status", T, |_| true).await;

    let id = uuid::Uuid::now_v7().to_string();
    plain.push.send(null_push(&id)).unwrap();
    plain
        .wait_message("result", T, |m| is_result_for(m, &id))
        .await;
    plain.kick.send(()).unwrap();
    assert_not_resent_after_reconnect(&mut plain, &id, &plain_sup).await;

    // Without acks, each answered send counts; after three the result is given up on instead
    // of going out after every reconnect forever.
    let id = uuid::Uuid::now_v7().to_string();
    old.push.send(null_push(&id)).unwrap();
    for n in 1..=3 {
        old.wait_message("result", T, |m| is_result_for(m, &id))
            .await;
        // The answer to it went out before the fake reads the kick.
        old.kick.send(()).unwrap();
        if n < 3 {
            old.wait_connected(T).await;
        } else {
            assert_not_resent_after_reconnect(&mut old, &id, &old_sup).await;
        }
    }
    old_sup.wait_log("never acknowledged it", T).await;
}

#[tokio::test]
async fn offers_stay_on_the_origin_and_commands_read_while_leaving_are_run() {
    let mut a = FakeOpamp::start().await;
    let mut b = FakeOpamp::start().await;
    let sink = ChatSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "agent-secret-1\n").unwrap();
    let mut opts = SupOpts::fluent_bit(&a.url);
    opts.chat_ops_port = sink.port;
    opts.server_extra = format!(
        "[server.auth]\ntype = \"bearer\"\ntoken_file = {:?}\n",
        token_file.display().to_string()
    );
    let sup = Sup::start(opts).await;
    let bearer = |h: &[(String, String)]| {
        h.iter()
            .any(|(k, v)| k == "authorization" && v == "Bearer agent-secret-1")
    };
    assert!(bearer(&a.wait_connected(T).await));
    a.wait_message("first status", T, |_| true).await;

    // Another origin (port): not followed under the default policy, and the token never
    // goes there.
    a.push.send(endpoint_offer(&b.url)).unwrap();
    sup.wait_log("another origin", T).await;
    messages_until_marker(&mut a).await;
    assert!(
        b.events.try_recv().is_err(),
        "the supervisor connected to another origin"
    );

    // The same origin on another path: followed. While leaving, the server still pushes a
    // queued command, then (last) yet another offer.
    let id = uuid::Uuid::now_v7().to_string();
    let next = a.url.replace("/v1/opamp", "/v1/opamp-next");
    let later = a.url.replace("/v1/opamp", "/v1/opamp-later");
    *a.on_disconnect.lock().unwrap() =
        vec![chatops_push(&id, "while.leaving"), endpoint_offer(&later)];
    a.push.send(endpoint_offer(&next)).unwrap();
    a.wait_message("agent_disconnect", T, |m| m.agent_disconnect.is_some())
        .await;
    let h = a.wait_connected(T).await;
    assert!(
        h.iter().any(|(k, v)| k == ":path" && v == "/v1/opamp-next"),
        "{h:?}"
    );
    assert!(bearer(&h));
    // The command read while leaving ran, once, and its result came on the new connection.
    a.wait_message("result of the command pushed while leaving", T, |m| {
        is_result_for(m, &id)
    })
    .await;
    messages_until_marker(&mut a).await;
    assert_eq!(sink.count("/while.leaving"), 1);
    // The offer still pending from the endpoint left did not end the trial of the new one
    // before it answered (it would have been blamed for not answering).
    assert!(!sup.log().contains("did not answer"), "{}", sup.log());
}

#[tokio::test]
async fn duplicate_command_ids_run_once_across_reconnects_and_restarts() {
    let mut fake = FakeOpamp::start().await;
    let sink = ChatSink::start().await;
    let mut opts = SupOpts::fluent_bit(&fake.url);
    opts.chat_ops_port = sink.port;
    let mut sup = Sup::start(opts).await;
    fake.wait_message("first status", T, |_| true).await;
    let id = uuid::Uuid::now_v7().to_string();
    fake.push.send(chatops_push(&id, "once")).unwrap();
    let r = fake
        .wait_message("result", T, |m| is_result_for(m, &id))
        .await;
    assert_eq!(custom_json(&r).unwrap().2["status"], "succeeded");
    // Delivered again (a server retrying after a lost connection): not run, result re-sent.
    fake.push.send(chatops_push(&id, "once")).unwrap();
    fake.wait_message("re-sent result", T, |m| is_result_for(m, &id))
        .await;
    // And again after a supervisor restart.
    sup.signal(libc::SIGTERM);
    assert_eq!(sup.wait_exit(T).await, Some(0));
    sup.spawn();
    loop {
        if let FakeEvent::Connected { .. } = fake.next(T).await {
            break;
        }
    }
    fake.wait_message("status after restart", T, |m| m.agent_description.is_some())
        .await;
    fake.push.send(chatops_push(&id, "once")).unwrap();
    fake.wait_message("result after restart", T, |m| is_result_for(m, &id))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sink.count("/once"),
        1,
        "{:?}",
        sink.requests.lock().unwrap()
    );
}

#[tokio::test]
async fn plain_fluent_opamp_forms_and_unknown_capabilities() {
    let mut fake = FakeOpamp::start().await;
    let mut opts = SupOpts::fluent_bit(&fake.url);
    opts.chat_ops_port = free_port(); // nothing listens: the POST fails
    let _sup = Sup::start(opts).await;
    let first = fake.wait_message("first status", T, |_| true).await;
    assert_eq!(first.sequence_num, 0);
    assert!(first.agent_description.is_some() && first.health.is_some());
    // Plain form (no command id), as fluent-opamp's server sends it: failure reported its way.
    fake.push
        .send(ServerToAgent {
            custom_message: Some(CustomMessage {
                capability: CAP_CHATOPS.into(),
                r#type: "request".into(),
                data: br#"{"attributes":"{\"a\":1}","tag":"t"}"#.to_vec(),
            }),
            ..Default::default()
        })
        .unwrap();
    let m = fake
        .wait_message("plain failure", T, |m| {
            custom_json(m)
                .map(|(c, t, _)| c == CAP_CHATOPS && t == "failure")
                .unwrap_or(false)
        })
        .await;
    let v = custom_json(&m).unwrap().2;
    assert!(
        v["http_code"].is_number() && v["err_msg"].as_str().unwrap().contains("POST"),
        "{v}"
    );
    // An unknown capability with a command id: a clear failure, and the supervisor lives on.
    let id = uuid::Uuid::now_v7().to_string();
    fake.push
        .send(ServerToAgent {
            custom_message: Some(CustomMessage {
                capability: "com.example.unknown".into(),
                r#type: "do".into(),
                data: json!({"command_id": id}).to_string().into_bytes(),
            }),
            ..Default::default()
        })
        .unwrap();
    let m = fake
        .wait_message("unknown-capability failure", T, |m| is_result_for(m, &id))
        .await;
    let v = custom_json(&m).unwrap().2;
    assert_eq!(v["status"], "failed");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("com.example.unknown"),
        "{v}"
    );
    // Null command (probe): logged and, in the rich form, answered.
    let id = uuid::Uuid::now_v7().to_string();
    fake.push
        .send(ServerToAgent {
            custom_message: Some(CustomMessage {
                capability: "org.mp3monster.opamp_provider.nullcommand".into(),
                r#type: "Null Command".into(),
                data: json!({"command_id": id, "dummyValue": 1})
                    .to_string()
                    .into_bytes(),
            }),
            ..Default::default()
        })
        .unwrap();
    let m = fake
        .wait_message("null result", T, |m| is_result_for(m, &id))
        .await;
    assert_eq!(custom_json(&m).unwrap().2["status"], "succeeded");
    // Sequence numbers keep counting by one.
    let later = fake.wait_message("any", T, |_| true).await;
    assert!(later.sequence_num > first.sequence_num);
}

#[tokio::test]
async fn report_full_state_heartbeat_interval_and_disconnect() {
    let mut fake = FakeOpamp::start().await;
    let mut sup = Sup::start(SupOpts::fluent_bit(&fake.url)).await;
    fake.wait_message("first status", T, |m| m.agent_description.is_some())
        .await;
    // Offer a 1 s heartbeat: messages must start arriving about every second.
    fake.push
        .send(ServerToAgent {
            connection_settings: Some(flotilla_proto::ConnectionSettingsOffers {
                opamp: Some(flotilla_proto::OpAmpConnectionSettings {
                    heartbeat_interval_seconds: 1,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
    let t0 = Instant::now();
    let mut n = 0;
    while t0.elapsed() < Duration::from_secs(4) {
        if let FakeEvent::Message(_) = fake.next(Duration::from_secs(3)).await {
            n += 1;
        }
    }
    assert!(n >= 3, "only {n} messages in 4 s with a 1 s heartbeat");
    // ReportFullState: the next message carries everything.
    fake.push
        .send(ServerToAgent {
            flags: flotilla_proto::ServerToAgentFlags::ReportFullState as u64,
            ..Default::default()
        })
        .unwrap();
    let m = fake
        .wait_message("full state", Duration::from_secs(5), |m| {
            m.agent_description.is_some()
        })
        .await;
    assert!(m.health.is_some() && m.effective_config.is_some() && m.custom_capabilities.is_some());
    // SIGTERM: agent_disconnect is the last message, then the socket closes.
    sup.signal(libc::SIGTERM);
    let bye = fake
        .wait_message("agent_disconnect", T, |m| m.agent_disconnect.is_some())
        .await;
    assert!(bye.agent_disconnect.is_some());
    loop {
        match fake.next(T).await {
            FakeEvent::Closed => break,
            FakeEvent::Message(m) => panic!("message after agent_disconnect: {m:?}"),
            _ => {}
        }
    }
    assert_eq!(sup.wait_exit(T).await, Some(0));
}

/// A token endpoint handing out numbered tokens that live `ttl_s` seconds.
async fn token_endpoint(ttl_s: u64) -> (String, Arc<Mutex<Vec<Vec<(String, String)>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/oauth2/token", l.local_addr().unwrap());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c2 = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let calls = c2.clone();
            tokio::spawn(async move {
                let Some((_, _, headers, body)) = read_http(&mut s).await else {
                    return;
                };
                let n = {
                    let mut c = calls.lock().unwrap();
                    let mut h = headers.clone();
                    h.push(("body".into(), body));
                    c.push(h);
                    c.len()
                };
                let b = json!({"access_token": format!("tok-{n}"), "token_type": "Bearer", "expires_in": ttl_s}).to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                    b.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, calls)
}

#[tokio::test]
async fn oauth2_client_credentials_token_is_used_and_refreshed() {
    let (token_url, calls) = token_endpoint(3).await;
    let mut fake = FakeOpamp::start().await;
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let mut opts = SupOpts::fluent_bit(&fake.url);
    opts.server_extra = format!(
        "[server.auth]\ntype = \"oauth2\"\ntoken_url = {token_url:?}\nclient_id = \"vm-01\"\nclient_secret_file = {:?}\nscope = \"opamp\"\n",
        secret.display().to_string()
    );
    let _sup = Sup::start(opts).await;
    let bearer = |ev: &FakeEvent| match ev {
        FakeEvent::Connected { headers } => headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.clone()),
        _ => None,
    };
    let mut first_auth = None;
    let end = Instant::now() + T;
    while first_auth.is_none() && Instant::now() < end {
        let ev = fake.next(T).await;
        first_auth = bearer(&ev);
    }
    assert_eq!(first_auth.as_deref(), Some("Bearer tok-1"));
    let first = calls.lock().unwrap()[0].clone();
    let basic = first
        .iter()
        .find(|(k, _)| k == "authorization")
        .unwrap()
        .1
        .clone();
    // client_secret_basic: base64("vm-01:s3cret")
    assert_eq!(basic, "Basic dm0tMDE6czNjcmV0");
    let body = first.iter().find(|(k, _)| k == "body").unwrap().1.clone();
    assert!(
        body.contains("grant_type=client_credentials") && body.contains("scope=opamp"),
        "{body}"
    );
    // The token lives 3 s (refreshed with a fifth of its life left): a reconnect after that
    // presents a new one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    fake.push
        .send(ServerToAgent {
            error_response: Some(flotilla_proto::ServerErrorResponse {
                r#type: flotilla_proto::ServerErrorResponseType::Unavailable as i32,
                error_message: "reconnect".into(),
                details: None,
            }),
            ..Default::default()
        })
        .unwrap();
    let mut second = None;
    let end = Instant::now() + T;
    while second.is_none() && Instant::now() < end {
        let ev = fake.next(T).await;
        second = bearer(&ev);
    }
    assert_eq!(second.as_deref(), Some("Bearer tok-2"));
    assert_eq!(calls.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn static_bearer_token_against_the_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("agent-tokens");
    write_private(&tokens, "agent-secret-1\n");
    let server = Server::start_with(vec![(
        "FLOTILLA_AGENT_TOKENS_FILE",
        tokens.to_str().unwrap(),
    )])
    .await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "agent-secret-1\n").unwrap();
    let mut opts = SupOpts::fluent_bit(&server.ws_url());
    opts.server_extra = format!(
        "[server.auth]\ntype = \"bearer\"\ntoken_file = {:?}\n",
        token_file.display().to_string()
    );
    let sup = Sup::start(opts).await;
    let uid = sup.uid().await;
    server
        .wait_agent(&uid, "registered with a bearer token", T, |a| {
            a["connected"] == true
        })
        .await;
}

#[tokio::test]
async fn http_polling_against_the_real_server() {
    // A polling agent gets a command with the answer to its next poll: the server offers a
    // 1 s heartbeat (its offer wins over the supervisor's own `heartbeat_interval_s`).
    let server = Server::start_with(vec![("FLOTILLA_HEARTBEAT_INTERVAL_S", "1")]).await;
    let mut opts = SupOpts::fluent_bit(&server.http_url());
    opts.heartbeat_s = 1;
    let sup = Sup::start(opts).await;
    let uid = sup.uid().await;
    let a = server
        .wait_agent(&uid, "healthy over HTTP", T, |a| {
            a["health"]["healthy"] == true
        })
        .await;
    assert_eq!(a["transport"], "http", "{a}");
    let id = server.command(&uid, "restart", json!({})).await;
    let c = server.wait_command(&id, T).await;
    assert_eq!(c["status"], "succeeded", "{c}");
}
