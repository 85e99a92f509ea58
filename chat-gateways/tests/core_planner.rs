//! The phrasing corpus (`tests/data/phrasings.toml`) through the rule planner: prints the hit
//! rate (reported in the README), requires it to stay high, and requires — without exception —
//! that nothing expected to be asked back or refused ever plans a state-changing call, and
//! that no state-changing call is planned other than exactly the one expected.

use flotilla_chat::core::planner::{rules, Plan, ThreadContext};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Corpus {
    case: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    expect: String,
    tool: Option<String>,
    args: Option<Value>,
    local: Option<Value>,
    #[serde(default)]
    ctx: ThreadContext,
}

const ME: &str = "slack:T1/U1 (Ada)";

fn hit(case: &Case, got: &Plan) -> bool {
    match (case.expect.as_str(), got) {
        ("tool", Plan::Tool { tool, args }) => {
            Some(tool) == case.tool.as_ref() && Some(args) == case.args.as_ref()
        }
        ("local", Plan::Local(l)) => Some(&serde_json::to_value(l).unwrap()) == case.local.as_ref(),
        ("ask_back", Plan::AskBack { suggestions, .. })
        | ("refuse", Plan::Refuse { suggestions, .. }) => suggestions.len() == 2,
        _ => false,
    }
}

#[test]
fn phrasing_corpus_hit_rate() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/phrasings.toml"
    ))
    .expect("the corpus file");
    let corpus: Corpus = toml::from_str(&text)
        .unwrap_or_else(|e| panic!("the corpus does not parse: {}", e.message()));
    assert!(corpus.case.len() >= 120, "{} phrasings", corpus.case.len());
    let mut hits = 0;
    let mut unsafe_plans = Vec::new();
    for case in &corpus.case {
        let got = rules::plan(&case.text, &case.ctx, ME);
        if hit(case, &got) {
            hits += 1;
        } else {
            println!(
                "MISS {:?} ({}): got {}",
                case.text,
                case.expect,
                serde_json::to_string(&got).unwrap()
            );
            // A miss may answer the wrong question, but it must never aim an action.
            if got.is_mutating() {
                unsafe_plans.push(case.text.clone());
            }
        }
    }
    let rate = hits as f64 / corpus.case.len() as f64;
    println!(
        "rule planner: {hits}/{} phrasings planned as expected ({:.1}%)",
        corpus.case.len(),
        rate * 100.0
    );
    assert!(
        unsafe_plans.is_empty(),
        "state-changing plans not expected: {unsafe_plans:?}"
    );
    assert!(rate >= 0.9, "hit rate {rate:.3} fell below 90%");
}
