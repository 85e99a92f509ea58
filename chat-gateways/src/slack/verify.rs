//! Slack request verification, done on the raw bytes before anything is parsed: the `v0`
//! signature (HMAC-SHA256 of `v0:{timestamp}:{body}` keyed with the app's signing secret,
//! compared in constant time), the five-minute window on `X-Slack-Request-Timestamp`, refusal
//! of a byte-identical replay inside that window, and recognition of Slack's own retries
//! (`X-Slack-Retry-Num`, `X-Slack-Retry-Reason`) so a delivery that already ran never runs twice.
//!
//! Follows Slack's "Verifying requests from Slack" (api.slack.com/authentication/
//! verifying-requests-from-slack): the basestring is the version `v0`, the timestamp header and
//! the raw body joined by `:`; the header `X-Slack-Signature` is `v0=` + lowercase hex.

use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2_11::Sha256;

use crate::core::seen::Seen;

/// How far a request's timestamp may be from now, either way (Slack: five minutes).
pub const MAX_SKEW_S: i64 = 5 * 60;

/// Header carrying the request's signature.
pub const SIGNATURE_HEADER: &str = "x-slack-signature";
/// Header carrying the unix time (seconds) Slack signed the request at.
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// Present on Slack's retries of an Events API delivery: 1, 2, 3.
pub const RETRY_NUM_HEADER: &str = "x-slack-retry-num";
/// Why Slack retried (`http_timeout`, `http_error`, ...).
pub const RETRY_REASON_HEADER: &str = "x-slack-retry-reason";

/// The app's signing secret. Never printed: `Debug` shows its length only.
#[derive(Clone)]
pub struct SigningSecret(Vec<u8>);

impl SigningSecret {
    /// A secret from its text (surrounding whitespace, as a file's trailing newline, removed).
    pub fn new(text: &str) -> Result<SigningSecret, VerifyError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(VerifyError::EmptySecret);
        }
        Ok(SigningSecret(t.as_bytes().to_vec()))
    }

    /// Reads the secret from a file (the only other source is an environment variable).
    pub fn from_file(path: &Path) -> Result<SigningSecret, VerifyError> {
        let text = std::fs::read_to_string(path).map_err(|e| VerifyError::Read {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        SigningSecret::new(&text)
    }

    /// `v0=` + hex HMAC-SHA256 of `v0:{timestamp}:{body}`: what Slack puts in
    /// `X-Slack-Signature`. Public so tests (and the fake Slack) sign exactly as Slack does.
    pub fn sign(&self, timestamp: &str, body: &[u8]) -> String {
        format!(
            "v0={}",
            hex::encode(self.mac(timestamp, body).finalize().into_bytes())
        )
    }

    fn mac(&self, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        mac.update(b"v0:");
        mac.update(timestamp.as_bytes());
        mac.update(b":");
        mac.update(body);
        mac
    }
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningSecret(<{} bytes>)", self.0.len())
    }
}

/// Problems with the secret itself (configuration, not requests).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the Slack signing secret is empty")]
    EmptySecret,
    #[error("cannot read the Slack signing secret from {path}: {error}")]
    Read { path: String, error: String },
}

/// Why a request was refused. The text is logged and answered (401); it never contains the
/// secret or the expected signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no {0} header")]
    MissingHeader(&'static str),
    #[error("X-Slack-Request-Timestamp {0:?} is not a unix time in seconds")]
    BadTimestamp(String),
    #[error("X-Slack-Request-Timestamp is {age_s} s from now (more than {MAX_SKEW_S} s): stale or replayed")]
    Stale { age_s: i64 },
    #[error("X-Slack-Signature is not of the form v0=<64 hex digits>")]
    BadSignatureFormat,
    #[error("X-Slack-Signature does not match the body (wrong signing secret or altered request)")]
    Mismatch,
    #[error("this exact signed request was already received (replay)")]
    Replay,
}

/// The request headers verification needs, taken from whatever HTTP types the caller has.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignedHeaders<'a> {
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

impl<'a> SignedHeaders<'a> {
    /// The two headers from an `http` header map (non-UTF-8 values count as absent).
    pub fn from_map(h: &'a http::HeaderMap) -> SignedHeaders<'a> {
        SignedHeaders {
            timestamp: h.get(TIMESTAMP_HEADER).and_then(|v| v.to_str().ok()),
            signature: h.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()),
        }
    }
}

/// Slack's retry headers, if this delivery is a retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    pub num: u32,
    pub reason: String,
}

impl Retry {
    /// `Some` when `X-Slack-Retry-Num` is present (an unreadable number counts as a retry:
    /// treating a retry as a first delivery is the dangerous mistake).
    pub fn from_map(h: &http::HeaderMap) -> Option<Retry> {
        let num = h.get(RETRY_NUM_HEADER)?;
        Some(Retry {
            num: num
                .to_str()
                .ok()
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(u32::MAX),
            reason: h
                .get(RETRY_REASON_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("unknown")
                .to_string(),
        })
    }
}

/// Verifies signed requests and remembers their signatures, so a replayed request (the same
/// signature) is recognised.
#[derive(Debug)]
pub struct Verifier {
    secret: SigningSecret,
    signatures: Seen,
}

impl Verifier {
    pub fn new(secret: SigningSecret) -> Verifier {
        Verifier {
            secret,
            // A signature older than the window is refused as stale anyway; keep it a little
            // longer than the window so clock steps cannot reopen it.
            signatures: Seen::new(2 * MAX_SKEW_S as u64, 200_000),
        }
    }

    /// Checks the signature and the timestamp of `body` at unix time `now_s`, then that the
    /// same signed request was not seen before. Nothing of the body is parsed here.
    pub fn verify(&self, h: SignedHeaders<'_>, body: &[u8], now_s: i64) -> Result<(), Refusal> {
        let ts = h
            .timestamp
            .ok_or(Refusal::MissingHeader("X-Slack-Request-Timestamp"))?;
        let sig = h
            .signature
            .ok_or(Refusal::MissingHeader("X-Slack-Signature"))?;
        let ts_n: i64 = ts
            .trim()
            .parse()
            .map_err(|_| Refusal::BadTimestamp(ts.chars().take(32).collect()))?;
        let age_s = now_s - ts_n;
        if age_s.abs() > MAX_SKEW_S {
            return Err(Refusal::Stale { age_s });
        }
        let hex_part = sig.strip_prefix("v0=").ok_or(Refusal::BadSignatureFormat)?;
        let given = hex::decode(hex_part).map_err(|_| Refusal::BadSignatureFormat)?;
        if given.len() != 32 {
            return Err(Refusal::BadSignatureFormat);
        }
        // `verify_slice` compares in constant time.
        self.secret
            .mac(ts, body)
            .verify_slice(&given)
            .map_err(|_| Refusal::Mismatch)?;
        if !self.signatures.first_time(hex_part, now_s) {
            return Err(Refusal::Replay);
        }
        Ok(())
    }
}

/// The deliveries a gateway has taken (Slack `event_id`, or a command's / interaction's
/// `trigger_id`), over whichever transport brought them (HTTP or Socket Mode), so a second
/// delivery of the same one is recognised before it reaches the core.
#[derive(Debug)]
pub struct Deliveries(Seen);

impl Default for Deliveries {
    fn default() -> Deliveries {
        // Slack retries an event up to three times within about five minutes (after 0 s,
        // 1 min, 5 min); a delivery id is remembered well past that.
        Deliveries(Seen::new(30 * 60, 200_000))
    }
}

impl Deliveries {
    /// Records a delivery; `false` if it was seen before, i.e. this is a retry or a duplicate
    /// that must not run.
    pub fn first_delivery(&self, id: &str, now_s: i64) -> bool {
        self.0.first_time(id, now_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Slack's documented example ("Verifying requests from Slack", step by step walk-through):
    // the signing secret, the slash-command body and timestamp, and the resulting signature.
    const DOC_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const DOC_TS: &str = "1531420618";
    const DOC_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const DOC_SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    fn doc() -> (Verifier, SignedHeaders<'static>, i64) {
        let v = Verifier::new(SigningSecret::new(DOC_SECRET).unwrap());
        let h = SignedHeaders {
            timestamp: Some(DOC_TS),
            signature: Some(DOC_SIG),
        };
        (v, h, DOC_TS.parse().unwrap())
    }

    #[test]
    fn slacks_documented_example_signs_and_verifies() {
        let secret = SigningSecret::new(DOC_SECRET).unwrap();
        assert_eq!(secret.sign(DOC_TS, DOC_BODY.as_bytes()), DOC_SIG);
        let (v, h, now) = doc();
        v.verify(h, DOC_BODY.as_bytes(), now + 30).unwrap();
    }

    #[test]
    fn a_forged_or_altered_request_is_refused() {
        let (v, h, now) = doc();
        // One byte of the body changed.
        let altered = DOC_BODY.replace("text=", "text=x");
        assert_eq!(v.verify(h, altered.as_bytes(), now), Err(Refusal::Mismatch));
        // Signed with another secret.
        let forged = SigningSecret::new("not-the-secret")
            .unwrap()
            .sign(DOC_TS, DOC_BODY.as_bytes());
        let h2 = SignedHeaders {
            signature: Some(&forged),
            ..h
        };
        assert_eq!(
            v.verify(h2, DOC_BODY.as_bytes(), now),
            Err(Refusal::Mismatch)
        );
        // The timestamp moved (the signature covers it).
        let h3 = SignedHeaders {
            timestamp: Some("1531420619"),
            ..h
        };
        assert_eq!(
            v.verify(h3, DOC_BODY.as_bytes(), now),
            Err(Refusal::Mismatch)
        );
        // Malformed headers.
        for bad in [
            "a2114d57",
            "v1=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            "v0=zz",
            "v0=a2114d57",
        ] {
            let h4 = SignedHeaders {
                signature: Some(bad),
                ..h
            };
            assert_eq!(
                v.verify(h4, DOC_BODY.as_bytes(), now),
                Err(Refusal::BadSignatureFormat),
                "{bad}"
            );
        }
        assert_eq!(
            v.verify(
                SignedHeaders {
                    signature: None,
                    ..h
                },
                DOC_BODY.as_bytes(),
                now
            ),
            Err(Refusal::MissingHeader("X-Slack-Signature"))
        );
        assert_eq!(
            v.verify(
                SignedHeaders {
                    timestamp: None,
                    ..h
                },
                DOC_BODY.as_bytes(),
                now
            ),
            Err(Refusal::MissingHeader("X-Slack-Request-Timestamp"))
        );
        assert!(matches!(
            v.verify(
                SignedHeaders {
                    timestamp: Some("soon"),
                    ..h
                },
                DOC_BODY.as_bytes(),
                now
            ),
            Err(Refusal::BadTimestamp(_))
        ));
        // None of the refusals above was remembered: the genuine request still passes once.
        v.verify(h, DOC_BODY.as_bytes(), now).unwrap();
    }

    #[test]
    fn the_five_minute_window_holds_both_ways() {
        let (v, h, now) = doc();
        assert_eq!(
            v.verify(h, DOC_BODY.as_bytes(), now + 301),
            Err(Refusal::Stale { age_s: 301 })
        );
        assert_eq!(
            v.verify(h, DOC_BODY.as_bytes(), now - 301),
            Err(Refusal::Stale { age_s: -301 })
        );
        v.verify(h, DOC_BODY.as_bytes(), now + 300).unwrap();
    }

    #[test]
    fn a_replay_inside_the_window_is_refused() {
        let (v, h, now) = doc();
        v.verify(h, DOC_BODY.as_bytes(), now).unwrap();
        assert_eq!(
            v.verify(h, DOC_BODY.as_bytes(), now + 10),
            Err(Refusal::Replay)
        );
        // And after the window it is stale, not new again.
        assert!(matches!(
            v.verify(h, DOC_BODY.as_bytes(), now + 400),
            Err(Refusal::Stale { .. })
        ));
    }

    #[test]
    fn a_delivery_runs_once_however_often_slack_retries_it() {
        let (_, _, now) = doc();
        let v = Deliveries::default();
        assert!(v.first_delivery("Ev0PV52K25", now));
        assert!(!v.first_delivery("Ev0PV52K25", now + 60));
        assert!(!v.first_delivery("Ev0PV52K25", now + 300));
        assert!(v.first_delivery("Ev0PV52K26", now + 300));
    }

    #[test]
    fn retry_headers_are_recognised() {
        let mut h = http::HeaderMap::new();
        assert_eq!(Retry::from_map(&h), None);
        h.insert(RETRY_NUM_HEADER, "2".parse().unwrap());
        h.insert(RETRY_REASON_HEADER, "http_timeout".parse().unwrap());
        assert_eq!(
            Retry::from_map(&h),
            Some(Retry {
                num: 2,
                reason: "http_timeout".into()
            })
        );
        h.insert(RETRY_NUM_HEADER, "two".parse().unwrap());
        assert_eq!(Retry::from_map(&h).unwrap().num, u32::MAX);
    }

    #[test]
    fn the_secret_is_never_printed() {
        let s = SigningSecret::new(&format!("{DOC_SECRET}\n")).unwrap();
        let shown = format!("{s:?} {:?}", Verifier::new(s.clone()));
        assert!(!shown.contains(DOC_SECRET), "{shown}");
        assert!(SigningSecret::new(" \n").is_err());
        for r in [Refusal::Mismatch, Refusal::Stale { age_s: 400 }] {
            assert!(!r.to_string().contains(DOC_SECRET));
        }
    }

    #[test]
    fn the_seen_set_is_bounded() {
        let s = Seen::new(60, 3);
        for k in ["a", "b", "c", "d"] {
            assert!(s.first_time(k, 0));
        }
        // "a" was evicted by the cap; "d" is still remembered.
        assert!(s.first_time("a", 1));
        assert!(!s.first_time("d", 1));
        // Everything expires after keep_s.
        assert!(s.first_time("d", 100));
    }
}
