//! `fake-fluent-bit`: stands in for Fluent Bit 5.1.1 in tests (see the crate README).

fn main() {
    std::process::exit(flotilla_fake_agents::fluentbit::main());
}
