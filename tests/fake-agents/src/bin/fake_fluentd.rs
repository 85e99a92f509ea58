//! `fake-fluentd`: stands in for Fluentd 1.18.0 / 1.16.11 in tests (see the crate README).

fn main() {
    std::process::exit(flotilla_fake_agents::fluentd::main());
}
