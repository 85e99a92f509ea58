//! Fleet-scale behaviour: fan-outs to many WebSocket agents while the store is slow, with every
//! command delivered exactly once and every command record consistent afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::framing::{decode_ws, encode_ws};
use flotilla_proto::{
    caps, kv_str, AgentCapabilities, AgentDescription, AgentToServer, ServerToAgent,
};
use flotilla_server::model::{Command, CommandFilter, CommandStatus};
use flotilla_server::store::Store;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::flaky::{FlakyStore, Latency};
use crate::support::TestServer;

const AGENT_CAPS: u64 = AgentCapabilities::ReportsStatus as u64
    | AgentCapabilities::AcceptsRestartCommand as u64
    | AgentCapabilities::ReportsHeartbeat as u64;

/// What the simulated agents saw.
#[derive(Default)]
struct Seen {
    /// Messages carrying a command, per agent.
    commands: Vec<AtomicU64>,
    /// Agents answered at least once.
    ready: AtomicU64,
}

fn status(i: usize, uid: Uuid, seq: u64, full: bool) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.as_bytes().to_vec(),
        sequence_num: seq,
        capabilities: AGENT_CAPS,
        agent_description: full.then(|| AgentDescription {
            identifying_attributes: vec![
                kv_str("service.name", "fluent-bit"),
                kv_str("service.version", "3.2.0"),
            ],
            non_identifying_attributes: vec![kv_str("host.name", &format!("scale-{i}"))],
        }),
        ..Default::default()
    }
}

/// A long-lived WebSocket agent: reports in full, heartbeats every `beat`, counts the commands
/// it is sent, and reports in full again when asked.
async fn agent(
    url: String,
    i: usize,
    seen: Arc<Seen>,
    beat: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let uid = Uuid::now_v7();
    let mut seq = 0;
    ws.send(Message::Binary(
        encode_ws(&status(i, uid, seq, true)).into(),
    ))
    .await?;
    let mut tick = tokio::time::interval(beat);
    tick.tick().await;
    let mut ready = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {
                seq += 1;
                ws.send(Message::Binary(encode_ws(&status(i, uid, seq, false)).into())).await?;
            }
            m = ws.next() => {
                let data = match m {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => anyhow::bail!("agent {i}: connection closed"),
                };
                let reply: ServerToAgent = decode_ws(&data)?;
                if let Some(e) = &reply.error_response {
                    // UNAVAILABLE under a slow store is allowed; the agent carries on.
                    eprintln!("agent {i}: server error {}", e.error_message);
                }
                if reply.command.is_some() {
                    seen.commands[i].fetch_add(1, Ordering::SeqCst);
                }
                if !ready {
                    ready = true;
                    seen.ready.fetch_add(1, Ordering::SeqCst);
                }
                if caps::report_full_state(reply.flags) {
                    seq += 1;
                    ws.send(Message::Binary(encode_ws(&status(i, uid, seq, true)).into())).await?;
                }
            }
        }
    }
}

/// Every rule a command record keeps, whatever happened to it. Returns the violations.
pub fn command_invariants(cmds: &[Command]) -> Vec<String> {
    let mut bad = Vec::new();
    for c in cmds {
        let mut fail =
            |why: &str| bad.push(format!("{} ({}): {why}: {c:?}", c.id, c.status.as_str()));
        match c.status {
            CommandStatus::Queued => {
                if c.sent_at.is_some() || c.finished_at.is_some() {
                    fail("queued with sent_at or finished_at");
                }
                if c.result.is_some() {
                    fail("queued with a result");
                }
            }
            CommandStatus::Sent => {
                if c.sent_at.is_none() {
                    fail("sent without sent_at");
                }
                if c.finished_at.is_some() {
                    fail("sent with finished_at");
                }
            }
            CommandStatus::Succeeded | CommandStatus::Failed => {
                if c.sent_at.is_none() || c.finished_at.is_none() {
                    fail("settled without sent_at and finished_at");
                }
            }
            CommandStatus::Expired => {
                if c.finished_at.is_none() {
                    fail("expired without finished_at");
                }
            }
            CommandStatus::Cancelled => {
                if c.finished_at.is_none() || c.sent_at.is_some() {
                    fail("cancelled without finished_at, or after it was sent");
                }
            }
        }
        if c.sent_at.is_some_and(|s| s < c.created_at) {
            fail("sent before it was created");
        }
        if let (Some(s), Some(f)) = (c.sent_at, c.finished_at) {
            if f < s {
                fail("finished before it was sent");
            }
        }
    }
    bad
}

async fn all_commands(store: &Arc<dyn Store>) -> Vec<Command> {
    store
        .list_commands(&CommandFilter {
            limit: 1_000_000,
            ..Default::default()
        })
        .await
        .expect("list commands")
}

/// Several fan-outs to many WebSocket agents while every store call is slowed and some claims
/// commit but answer after the session gave up (past the 5 s store timeout): each agent gets
/// each command exactly once, nothing stays queued, and every record is consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_outs_under_a_slow_store_deliver_every_command_exactly_once() {
    const AGENTS: usize = 150;
    const ROUNDS: u64 = 3;
    let latency = Arc::new(Latency::default());
    let real: Arc<Mutex<Option<Arc<dyn Store>>>> = Arc::default();
    let (l, r) = (latency.clone(), real.clone());
    let server = TestServer::start_wrapped(
        |_| {},
        move |inner| {
            *r.lock().unwrap() = Some(inner.clone());
            Arc::new(FlakyStore::slow(inner, l))
        },
    )
    .await;
    let store = real.lock().unwrap().clone().expect("store");

    let seen = Arc::new(Seen {
        commands: (0..AGENTS).map(|_| AtomicU64::new(0)).collect(),
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..AGENTS {
        tasks.push(tokio::spawn(agent(
            server.opamp_ws_url(),
            i,
            seen.clone(),
            Duration::from_millis(700),
            stop.clone(),
        )));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.ready.load(Ordering::SeqCst) < AGENTS as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {AGENTS} agents were answered",
            seen.ready.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Chaos: every call 0..25 ms late both ways, and every 4th claim that took something
    // answers 5.5 s after it committed, past the session's 5 s store timeout.
    latency.max_ms.store(25, Ordering::SeqCst);
    latency.stall_claim_every.store(4, Ordering::SeqCst);
    latency.stall_claim_ms.store(5500, Ordering::SeqCst);
    let rest = server.rest();
    for round in 0..ROUNDS {
        let (code, body) = rest
            .post(
                "/api/v1/commands",
                json!({"query": "host:scale-*", "kind": "restart", "params": {}}),
            )
            .await;
        assert_eq!(code, 202, "round {round}: {body}");
        assert_eq!(body["queued"], json!(AGENTS), "round {round}: {body}");
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let short: Vec<usize> = (0..AGENTS)
            .filter(|i| seen.commands[*i].load(Ordering::SeqCst) < ROUNDS)
            .collect();
        if short.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let cmds = all_commands(&store).await;
            let queued = cmds
                .iter()
                .filter(|c| c.status == CommandStatus::Queued)
                .count();
            panic!(
                "{} agents still lack commands (e.g. agent {}); {queued} commands still queued",
                short.len(),
                short[0]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Calm again; anything delivered twice would show up in the next seconds.
    latency.stall_claim_every.store(0, Ordering::SeqCst);
    latency.max_ms.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    for t in tasks {
        t.await.expect("agent task").expect("agent ran");
    }

    assert!(
        latency.stalled_claims.load(Ordering::SeqCst) > 0,
        "no claim was stalled: the test did not test what it claims to"
    );
    for (i, n) in seen.commands.iter().enumerate() {
        assert_eq!(
            n.load(Ordering::SeqCst),
            ROUNDS,
            "agent {i}: commands received"
        );
    }
    let cmds = all_commands(&store).await;
    assert_eq!(cmds.len(), AGENTS * ROUNDS as usize);
    let bad = command_invariants(&cmds);
    assert!(
        bad.is_empty(),
        "{} inconsistent records: {bad:#?}",
        bad.len()
    );
    assert!(
        cmds.iter().all(|c| c.status == CommandStatus::Sent),
        "every restart was sent (the agents do not restart, so none settles)"
    );
    server.stop().await;
}

#[test]
fn the_invariant_checker_catches_a_stranded_record() {
    let mut c = Command {
        id: Uuid::now_v7(),
        agent_uid: Uuid::now_v7(),
        batch_id: None,
        kind: flotilla_server::model::CommandKind::Restart,
        params: json!({}),
        status: CommandStatus::Queued,
        created_at: 10,
        sent_at: None,
        finished_at: None,
        expires_at: 100,
        result: None,
        error: None,
        actor: "alice".into(),
        channel: flotilla_server::model::Channel::Rest,
        audit_id: None,
    };
    assert!(command_invariants(std::slice::from_ref(&c)).is_empty());
    // The record the issue found: queued, with sent_at and finished_at set.
    c.sent_at = Some(11);
    c.finished_at = Some(12);
    assert_eq!(command_invariants(std::slice::from_ref(&c)).len(), 1);
    c.status = CommandStatus::Sent;
    assert_eq!(command_invariants(std::slice::from_ref(&c)).len(), 1);
    c.finished_at = None;
    assert!(command_invariants(&[c]).is_empty());
}
