//! Log set-up of the `flotilla` binary. The JSON shape is the one `flotilla-supervisor` writes
//! too (one object per line: `timestamp`, `level`, `message`, `target` and the event's fields
//! flat beside them, no span objects), so one pipeline parses both; colour only on a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber writing to stderr. `level` must already be validated.
pub fn init(format: &str, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        // ANSI colour codes are noise in a file or a journal.
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}
