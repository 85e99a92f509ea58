//! OpAMP WebSocket message framing: a varint header (0 in this protocol version) before the protobuf.

use prost::Message;

/// Why a WebSocket binary message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    /// The varint header is present but not 0; the spec says to treat the message as malformed.
    #[error("unsupported WebSocket message header {0} (only 0 is defined)")]
    NonZeroHeader(u64),
    /// The varint header ran past 10 bytes or past the end of the message.
    #[error("truncated or overlong varint header")]
    BadHeader,
    /// The protobuf payload did not decode.
    #[error("protobuf decode failed: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Encodes `msg` with the 0x00 header the spec requires on every sent message.
pub fn encode_ws<M: Message>(msg: &M) -> Vec<u8> {
    let mut buf = Vec::with_capacity(1 + msg.encoded_len());
    buf.push(0);
    msg.encode(&mut buf).expect("Vec<u8> grows as needed");
    buf
}

/// Decodes a WebSocket binary message into `M`.
///
/// Messages without the header are accepted: opamp-go does the same for old clients that
/// predate it. Such a message starts with a protobuf tag byte, which is never 0 (field 0 does not
/// exist), so a first byte of 0 always means "header present". A first byte that is a valid
/// protobuf tag is tried as headerless protobuf first; only if that fails is it read as a
/// non-zero varint header, which is rejected.
pub fn decode_ws<M: Message + Default>(data: &[u8]) -> Result<M, FrameError> {
    match data.first() {
        None => Ok(M::default()),
        Some(0) => Ok(M::decode(&data[1..])?),
        Some(_) => match M::decode(data) {
            Ok(m) => Ok(m),
            Err(e) => match read_varint(data) {
                // An over-long encoding of 0 (e.g. 0x80 0x00): not the one-byte header the
                // spec defines, and reachable from untrusted input, so an error, never a panic.
                Some((0, _)) => Err(FrameError::BadHeader),
                Some((h, _)) if looks_like_header(data) => Err(FrameError::NonZeroHeader(h)),
                _ => Err(FrameError::Decode(e)),
            },
        },
    }
}

/// A header varint is followed by a payload that decodes; we only call a message "non-zero
/// header" when the bytes after the varint form a plausible protobuf (or nothing).
fn looks_like_header(data: &[u8]) -> bool {
    match read_varint(data) {
        Some((_, n)) => {
            let rest = &data[n..];
            rest.is_empty() || prost::encoding::decode_key(&mut &rest[..]).is_ok()
        }
        None => false,
    }
}

/// Reads an unsigned LEB128 varint; returns the value and its length in bytes.
pub fn read_varint(data: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, b) in data.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentToServer, ServerToAgent};

    fn sample() -> AgentToServer {
        AgentToServer {
            instance_uid: vec![7; 16],
            sequence_num: 3,
            capabilities: 1,
            ..Default::default()
        }
    }

    #[test]
    fn encode_always_writes_zero_header() {
        let bytes = encode_ws(&ServerToAgent::default());
        assert_eq!(bytes, vec![0]);
        let bytes = encode_ws(&sample());
        assert_eq!(bytes[0], 0);
    }

    #[test]
    fn decodes_with_and_without_header() {
        let with = encode_ws(&sample());
        let without = sample().encode_to_vec();
        assert_eq!(decode_ws::<AgentToServer>(&with).unwrap(), sample());
        assert_eq!(decode_ws::<AgentToServer>(&without).unwrap(), sample());
        assert_eq!(
            decode_ws::<AgentToServer>(&[]).unwrap(),
            AgentToServer::default()
        );
        assert_eq!(
            decode_ws::<AgentToServer>(&[0]).unwrap(),
            AgentToServer::default()
        );
    }

    #[test]
    fn rejects_non_zero_header() {
        let mut bytes = vec![5];
        bytes.extend(sample().encode_to_vec());
        assert_eq!(
            decode_ws::<AgentToServer>(&bytes),
            Err(FrameError::NonZeroHeader(5))
        );
        // A multi-byte varint header (300) is read whole.
        let mut bytes = vec![0xac, 0x02];
        bytes.extend(sample().encode_to_vec());
        assert_eq!(
            decode_ws::<AgentToServer>(&bytes),
            Err(FrameError::NonZeroHeader(300))
        );
    }

    #[test]
    fn overlong_zero_header_is_an_error_not_a_panic() {
        let mut bytes = vec![0x80, 0x00];
        bytes.extend(sample().encode_to_vec());
        assert_eq!(
            decode_ws::<AgentToServer>(&bytes),
            Err(FrameError::BadHeader)
        );
        for first in 1..=255u8 {
            for second in [0u8, 1, 0x0a, 0x80, 0xff] {
                let _ = decode_ws::<AgentToServer>(&[first, second, 0x00, 0x01]);
            }
        }
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let err = decode_ws::<AgentToServer>(&[0, 0x0a, 0xff]).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)));
    }
}
