//! The console's page shell (head, navigation, the signed-in operator, the live-update status)
//! and the small renderings every page shares: state and health badges, times, live regions.

use maud::{html, Markup, DOCTYPE};

use super::Op;
use crate::model::{rfc3339, CommandStatus, Liveness, Millis};

/// Which navigation entry is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    None,
    Fleet,
    Commands,
    Config,
    Audit,
    Approvals,
}

const ENTRIES: [(Nav, &str, &str); 5] = [
    (Nav::Fleet, "/ui/fleet", "Fleet"),
    (Nav::Commands, "/ui/commands", "Commands"),
    (Nav::Config, "/ui/config", "Remote config"),
    (Nav::Audit, "/ui/audit", "Audit"),
    (Nav::Approvals, "/ui/approvals", "Approvals"),
];

/// A whole page. `op` is `None` on the sign-in page.
pub fn page(title: &str, nav: Nav, op: Option<&Op>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · Flotilla" }
                link rel="stylesheet" href=(super::css_url());
                script src=(super::js_url()) defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                @if let Some(op) = op {
                    header.top {
                        a.brand href="/ui/fleet" { "Flotilla" }
                        nav aria-label="Main" {
                            ul {
                                @for (n, href, label) in ENTRIES {
                                    li { a href=(href) aria-current=[(n == nav).then_some("page")] { (label) } }
                                }
                            }
                        }
                        div.who {
                            span #live-status role="status" data-state="off" { "Live updates off" }
                            a #refresh href="" { "Refresh" }
                            span.actor { (op.caller().actor) " (" (op.caller().role) ")" }
                            form.inline method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(op.session.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main tabindex="-1" { (body) }
            }
        }
    }
}

/// A region the script re-renders from the same URL when the named topics change
/// (`agents`, `commands`, `audit`, `approvals`). Its `id` must be unique on the page.
pub fn live(id: &str, topics: &str, body: Markup) -> Markup {
    html! {
        div id=(id) data-live=(topics) aria-live="polite" { (body) }
    }
}

/// A [`live`] region about one agent: re-rendered only when a change names that agent (or
/// names none, or too many to list).
pub fn live_for(id: &str, topics: &str, uid: uuid::Uuid, body: Markup) -> Markup {
    html! {
        div id=(id) data-live=(topics) data-uid=(uid) aria-live="polite" { (body) }
    }
}

pub fn liveness_str(l: Liveness) -> &'static str {
    match l {
        Liveness::Healthy => "healthy",
        Liveness::Late => "late",
        Liveness::Offline => "offline",
    }
}

pub fn state_badge(l: Liveness) -> Markup {
    let s = liveness_str(l);
    html! { span class={"badge state-" (s)} { (s) } }
}

pub fn health_str(h: Option<bool>) -> &'static str {
    match h {
        Some(true) => "healthy",
        Some(false) => "unhealthy",
        None => "unknown",
    }
}

pub fn health_badge(h: Option<bool>) -> Markup {
    let s = health_str(h);
    html! { span class={"badge health-" (s)} { (s) } }
}

pub fn status_badge(s: CommandStatus) -> Markup {
    html! { span class={"badge cmd-" (s.as_str())} data-status=(s.as_str()) { (s.as_str()) } }
}

/// `12 s ago`-style age of `ms` at `now`, in a `<time>` carrying the exact time.
pub fn ago(ms: Millis, now: Millis) -> Markup {
    let secs = ((now - ms).max(0)) / 1000;
    let text = if secs < 60 {
        format!("{secs} s ago")
    } else if secs < 3600 {
        format!("{} min ago", secs / 60)
    } else if secs < 86_400 {
        format!("{} h ago", secs / 3600)
    } else {
        format!("{} d ago", secs / 86_400)
    };
    let exact = rfc3339(ms);
    html! { time datetime=(exact) title=(exact) { (text) } }
}

/// An exact time, `2025-01-31 12:00:00Z`.
pub fn at(ms: Millis) -> Markup {
    let exact = rfc3339(ms);
    let shown = exact.replacen('T', " ", 1);
    let shown = match shown.split_once('.') {
        Some((head, _)) => format!("{head}Z"),
        None => shown,
    };
    html! { time datetime=(exact) { (shown) } }
}

/// An empty hidden CSRF field for `op`'s session.
pub fn csrf_field(op: &Op) -> Markup {
    html! { input type="hidden" name="csrf" value=(op.session.csrf); }
}
