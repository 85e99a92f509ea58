//! Exponential backoff with jitter (reconnects, agent restarts) and `Retry-After` parsing
//! (seconds or HTTP-date, RFC 9110 §10.2.3).

use std::time::{Duration, SystemTime};

use rand::Rng;

/// Doubling delays from `initial` up to `max`, each with ±20 % jitter so a fleet that lost its
/// server does not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        jitter(base)
    }

    /// Back to `initial` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// `d` ± 20 %.
pub fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::thread_rng().gen_range(0.8..1.2);
    d.mul_f64(f)
}

/// Longest wait a server's `Retry-After` / `RetryInfo` can impose: a typo or a hostile value
/// (`Retry-After: 99999999`) must not park the supervisor for years.
pub const MAX_SERVER_DELAY: Duration = Duration::from_secs(3600);

/// How long to wait after a throttling answer that asked for `server` (Retry-After, RetryInfo):
/// the server's value, capped at [`MAX_SERVER_DELAY`], but never less than the backoff's next
/// delay. The backoff advances either way, so `Retry-After: 0`, a date in the past or a tiny
/// RetryInfo cannot turn into an immediate reconnect loop.
pub fn throttle_delay(server: Duration, backoff: &mut Backoff) -> Duration {
    server.min(MAX_SERVER_DELAY).max(backoff.next_delay())
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP-date (a date in the past gives 0).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let d: Vec<f64> = (0..6).map(|_| b.next_delay().as_secs_f64()).collect();
        assert!((0.8..1.2).contains(&d[0]), "{d:?}");
        assert!((1.6..2.4).contains(&d[1]), "{d:?}");
        assert!((3.2..4.8).contains(&d[2]), "{d:?}");
        assert!((6.4..9.6).contains(&d[5]), "{d:?}");
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(1200));
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(42)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(42));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        // Absurd values parse (the cap is applied where the delay is used).
        assert_eq!(
            parse_retry_after("18446744073709551615", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn throttling_waits_at_least_the_backoff_and_at_most_an_hour() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        // Retry-After: 0 (or a past date): the backoff's delay, and the backoff advances.
        let d0 = throttle_delay(Duration::ZERO, &mut b);
        assert!(d0 >= Duration::from_millis(800), "{d0:?}");
        let d1 = throttle_delay(Duration::ZERO, &mut b);
        assert!(d1 >= Duration::from_millis(1600), "{d1:?}");
        assert_eq!(b.attempts(), 2);
        // A longer server value wins over the backoff.
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(
            throttle_delay(Duration::from_secs(30), &mut b),
            Duration::from_secs(30)
        );
        // A huge one is capped.
        assert_eq!(
            throttle_delay(Duration::from_secs(u64::MAX), &mut b),
            MAX_SERVER_DELAY
        );
        assert_eq!(
            throttle_delay(Duration::from_nanos(u64::MAX), &mut b),
            MAX_SERVER_DELAY
        );
    }
}
