//! Text helpers every adapter's renderer shares, so a reply reads the same on each platform:
//! clipping to a platform's limit, the progress bar and its heading.

/// At most `max` characters, with `…` when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A ten-cell bar of `done` out of `total` (full when there is nothing to do).
pub fn bar(done: u64, total: u64) -> String {
    const W: u64 = 10;
    let filled = (done.min(total) * W).checked_div(total).unwrap_or(W);
    (0..W).map(|i| if i < filled { '█' } else { '░' }).collect()
}

/// The heading of a progress block.
pub fn progress_head(done: bool, failed: u64) -> &'static str {
    match (done, failed) {
        (true, 0) => "Finished",
        (true, _) => "Finished with failures",
        _ => "In progress",
    }
}
