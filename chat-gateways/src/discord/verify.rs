//! Discord request verification, done on the raw bytes before anything is parsed: the
//! Ed25519 signature in `X-Signature-Ed25519` over `X-Signature-Timestamp` + body, checked with
//! the application's public key ("Receiving and Responding": security and authorization), and
//! a five-minute window on the timestamp so a captured request cannot be replayed later.
//!
//! The signature check is ring's Ed25519 (RFC 8032), which is constant time; ring is already
//! in the build as rustls' crypto provider.

use ring::signature::{UnparsedPublicKey, ED25519};

/// How far a request's timestamp may be from now, either way.
pub const MAX_SKEW_S: i64 = 5 * 60;

/// Header carrying the hex Ed25519 signature.
pub const SIGNATURE_HEADER: &str = "x-signature-ed25519";
/// Header carrying the unix time (seconds) Discord signed the request at.
pub const TIMESTAMP_HEADER: &str = "x-signature-timestamp";

/// The application's public key (General Information → Public Key: 64 hex digits).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

/// Problems with the key itself (configuration, not requests).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the Discord public key must be 64 hex digits (General Information → Public Key)")]
    Format,
}

impl PublicKey {
    /// A key from its hex text (surrounding whitespace, as a file's trailing newline, removed).
    pub fn from_hex(text: &str) -> Result<PublicKey, KeyError> {
        let bytes = hex::decode(text.trim()).map_err(|_| KeyError::Format)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Format)?;
        Ok(PublicKey(key))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", hex::encode(self.0))
    }
}

/// Why a request was refused. The text is logged and answered (401); Discord itself sends
/// forged requests to the endpoint and expects exactly this refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no {0} header")]
    MissingHeader(&'static str),
    #[error("X-Signature-Timestamp {0:?} is not a unix time in seconds")]
    BadTimestamp(String),
    #[error(
        "X-Signature-Timestamp is {age_s} s from now (more than {MAX_SKEW_S} s): stale or replayed"
    )]
    Stale { age_s: i64 },
    #[error("X-Signature-Ed25519 is not 128 hex digits")]
    BadSignatureFormat,
    #[error("X-Signature-Ed25519 does not verify (wrong public key or altered request)")]
    Mismatch,
}

/// The two headers verification needs, taken from whatever HTTP types the caller has.
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

/// Verifies interaction requests with the application's public key.
#[derive(Debug, Clone)]
pub struct Verifier {
    key: PublicKey,
}

impl Verifier {
    pub fn new(key: PublicKey) -> Verifier {
        Verifier { key }
    }

    /// Checks the timestamp window and the signature of `timestamp + body` at unix time
    /// `now_s`. Nothing of the body is parsed here.
    pub fn verify(&self, h: SignedHeaders<'_>, body: &[u8], now_s: i64) -> Result<(), Refusal> {
        let ts = h
            .timestamp
            .ok_or(Refusal::MissingHeader("X-Signature-Timestamp"))?;
        let sig = h
            .signature
            .ok_or(Refusal::MissingHeader("X-Signature-Ed25519"))?;
        let ts_n: i64 = ts
            .trim()
            .parse()
            .map_err(|_| Refusal::BadTimestamp(ts.chars().take(32).collect()))?;
        let age_s = now_s - ts_n;
        if age_s.abs() > MAX_SKEW_S {
            return Err(Refusal::Stale { age_s });
        }
        let given = hex::decode(sig.trim()).map_err(|_| Refusal::BadSignatureFormat)?;
        if given.len() != 64 {
            return Err(Refusal::BadSignatureFormat);
        }
        let mut signed = Vec::with_capacity(ts.len() + body.len());
        signed.extend_from_slice(ts.as_bytes());
        signed.extend_from_slice(body);
        UnparsedPublicKey::new(&ED25519, &self.key.0)
            .verify(&signed, &given)
            .map_err(|_| Refusal::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    // RFC 8032 section 7.1, TEST 2: a one-byte message.
    const RFC_SEED: &str = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb";
    const RFC_PUBLIC: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
    const RFC_SIG: &str = "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
                           085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00";

    fn signer() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&hex::decode(RFC_SEED).unwrap()).unwrap()
    }

    fn headers<'a>(ts: &'a str, sig: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            timestamp: Some(ts),
            signature: Some(sig),
        }
    }

    #[test]
    fn the_rfc_8032_vector_verifies_split_as_timestamp_and_body() {
        assert_eq!(hex::encode(signer().public_key().as_ref()), RFC_PUBLIC);
        // The message is the single byte 0x72 ("r"): an empty timestamp would be refused, so
        // check the primitive through a signature made the same way Discord makes it instead.
        let v = Verifier::new(PublicKey::from_hex(RFC_PUBLIC).unwrap());
        assert_eq!(
            hex::encode(signer().sign(b"r").as_ref()),
            RFC_SIG,
            "ring signs as RFC 8032 says"
        );
        let ts = "1700000000";
        let body = br#"{"type":1}"#;
        let sig = hex::encode(signer().sign(&[ts.as_bytes(), body].concat()).as_ref());
        v.verify(headers(ts, &sig), body, 1_700_000_010).unwrap();
    }

    #[test]
    fn forged_altered_stale_and_missing_are_refused() {
        let v = Verifier::new(PublicKey::from_hex(RFC_PUBLIC).unwrap());
        let ts = "1700000000";
        let body = br#"{"type":2}"#;
        let sig = hex::encode(signer().sign(&[ts.as_bytes(), body].concat()).as_ref());
        let now = 1_700_000_000;
        assert_eq!(
            v.verify(headers(ts, &sig), br#"{"type":3}"#, now),
            Err(Refusal::Mismatch)
        );
        assert_eq!(
            v.verify(headers("1700000001", &sig), body, now),
            Err(Refusal::Mismatch),
            "the timestamp is signed too"
        );
        let other = Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).unwrap();
        let forged = hex::encode(other.sign(&[ts.as_bytes(), body].concat()).as_ref());
        assert_eq!(
            v.verify(headers(ts, &forged), body, now),
            Err(Refusal::Mismatch)
        );
        assert_eq!(
            v.verify(headers(ts, &sig), body, now + MAX_SKEW_S + 1),
            Err(Refusal::Stale {
                age_s: MAX_SKEW_S + 1
            })
        );
        assert!(matches!(
            v.verify(headers("yesterday", &sig), body, now),
            Err(Refusal::BadTimestamp(_))
        ));
        assert_eq!(
            v.verify(headers(ts, "abcd"), body, now),
            Err(Refusal::BadSignatureFormat)
        );
        assert_eq!(
            v.verify(
                SignedHeaders {
                    timestamp: None,
                    signature: Some(&sig)
                },
                body,
                now
            ),
            Err(Refusal::MissingHeader("X-Signature-Timestamp"))
        );
        assert_eq!(
            v.verify(
                SignedHeaders {
                    timestamp: Some(ts),
                    signature: None
                },
                body,
                now
            ),
            Err(Refusal::MissingHeader("X-Signature-Ed25519"))
        );
    }

    #[test]
    fn a_key_must_be_32_bytes_of_hex() {
        assert!(PublicKey::from_hex(&format!("{RFC_PUBLIC}\n")).is_ok());
        assert_eq!(PublicKey::from_hex("abc"), Err(KeyError::Format));
        assert_eq!(PublicKey::from_hex(&"zz".repeat(32)), Err(KeyError::Format));
    }
}
