//! The mutual HMAC challenge of [`Listener`](super::Listener) and [`Client`](super::Client).
//!
//! Like Python's `multiprocessing.connection` (3.12+), each side proves it knows the shared key
//! without sending it, and the server goes first:
//!
//! 1. server -> client: `#CHALLENGE#{sha256}` followed by 32 random bytes;
//! 2. client -> server: `{sha256}` followed by HMAC-SHA256(key, the whole challenge message);
//! 3. server -> client: `#WELCOME#` if the digest matches (constant-time comparison), else
//!    `#FAILURE#` and both sides fail with [`Error::AuthenticationError`];
//! 4. the same three steps with the roles swapped.
//!
//! Every handshake message is a frame of at most [`MAX_MSG`] bytes, and the whole handshake runs
//! under one deadline, so a peer that sends garbage, a huge length or nothing at all costs a
//! bounded amount of memory and time. The parsers are pure functions (fuzzed in `fuzz/`).

use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::RawConn;
use crate::error::{Error, Result};

const CHALLENGE: &[u8] = b"#CHALLENGE#";
const ALGO: &[u8] = b"{sha256}";
const WELCOME: &[u8] = b"#WELCOME#";
const FAILURE: &[u8] = b"#FAILURE#";
/// Random bytes in a challenge (Python uses 40; 32 is the digest size and ample).
const NONCE: usize = 32;
const DIGEST: usize = 32;
/// Largest handshake message accepted.
pub(crate) const MAX_MSG: u64 = 256;

fn auth_err(msg: impl Into<String>) -> Error {
    Error::AuthenticationError(msg.into())
}

/// HMAC-SHA256 of `msg` under `key`.
fn digest(key: &[u8], msg: &[u8]) -> [u8; DIGEST] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// Checks a challenge message; returns it whole (the client signs the whole message).
pub(crate) fn parse_challenge(msg: &[u8]) -> Result<&[u8]> {
    let rest = msg
        .strip_prefix(CHALLENGE)
        .ok_or_else(|| auth_err("the peer's first message is not a challenge"))?;
    let nonce = rest
        .strip_prefix(ALGO)
        .ok_or_else(|| auth_err("the peer proposes an unsupported digest (want {sha256})"))?;
    if !(16..=128).contains(&nonce.len()) {
        return Err(auth_err(format!(
            "challenge of {} random bytes (want 16 to 128)",
            nonce.len()
        )));
    }
    Ok(msg)
}

/// Checks a response message; returns the digest in it.
pub(crate) fn parse_response(msg: &[u8]) -> Result<&[u8]> {
    let d = msg
        .strip_prefix(ALGO)
        .ok_or_else(|| auth_err("the peer's response is not a {sha256} digest"))?;
    if d.len() != DIGEST {
        return Err(auth_err(format!(
            "digest of {} bytes (want {DIGEST})",
            d.len()
        )));
    }
    Ok(d)
}

/// Constant-time check that `response` is the right digest of `challenge` under `key`.
fn verify(key: &[u8], challenge: &[u8], response: &[u8]) -> bool {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(challenge);
    m.verify_slice(response).is_ok()
}

/// Runs the parsers on arbitrary bytes (for the fuzz target): they must never panic.
pub fn fuzz_handshake_parsers(data: &[u8]) {
    if let Ok(c) = parse_challenge(data) {
        let _ = digest(b"key", c);
    }
    if let Ok(d) = parse_response(data) {
        let _ = verify(b"key", b"challenge", d);
    }
}

fn recv_msg(conn: &mut RawConn, deadline: Instant) -> Result<Vec<u8>> {
    conn.recv_with(Some(deadline), |b, _| Ok(b.to_vec()))
        .map_err(|e| match e {
            Error::Timeout | Error::AuthenticationError(_) => e,
            Error::Eof => auth_err("the peer closed the connection during the handshake"),
            other => auth_err(format!("handshake failed: {other}")),
        })
}

fn send_msg(conn: &mut RawConn, msg: &[u8]) -> Result<()> {
    conn.send_bytes(msg).map_err(|e| match e {
        Error::Eof => auth_err("the peer closed the connection during the handshake"),
        other => other,
    })
}

/// Challenges the peer and checks its answer.
fn deliver_challenge(conn: &mut RawConn, key: &[u8], deadline: Instant) -> Result<()> {
    let mut challenge = Vec::with_capacity(CHALLENGE.len() + ALGO.len() + NONCE);
    challenge.extend_from_slice(CHALLENGE);
    challenge.extend_from_slice(ALGO);
    let mut nonce = [0u8; NONCE];
    getrandom::fill(&mut nonce).map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
    challenge.extend_from_slice(&nonce);
    send_msg(conn, &challenge)?;
    let resp = recv_msg(conn, deadline)?;
    let ok = parse_response(&resp)
        .map(|d| verify(key, &challenge, d))
        .unwrap_or(false);
    if !ok {
        let _ = send_msg(conn, FAILURE);
        return Err(auth_err(
            "the peer's digest is wrong (a different authkey?)",
        ));
    }
    send_msg(conn, WELCOME)
}

/// Answers the peer's challenge and learns whether it was accepted.
fn answer_challenge(conn: &mut RawConn, key: &[u8], deadline: Instant) -> Result<()> {
    let msg = recv_msg(conn, deadline)?;
    let challenge = parse_challenge(&msg)?;
    let mut resp = Vec::with_capacity(ALGO.len() + DIGEST);
    resp.extend_from_slice(ALGO);
    resp.extend_from_slice(&digest(key, challenge));
    send_msg(conn, &resp)?;
    let verdict = recv_msg(conn, deadline)?;
    if verdict == WELCOME {
        Ok(())
    } else if verdict == FAILURE {
        Err(auth_err(
            "the peer refused our digest (a different authkey?)",
        ))
    } else {
        Err(auth_err(
            "the peer's verdict is neither welcome nor failure",
        ))
    }
}

/// Runs `f` with the connection's frame limit lowered to [`MAX_MSG`].
fn bounded(conn: &mut RawConn, f: impl FnOnce(&mut RawConn) -> Result<()>) -> Result<()> {
    let saved = conn.max_frame;
    conn.set_max_frame(MAX_MSG);
    let r = f(conn);
    conn.set_max_frame(saved);
    r
}

/// The server's side: challenge first, then answer.
pub(crate) fn server_handshake(conn: &mut RawConn, key: &[u8], deadline: Instant) -> Result<()> {
    bounded(conn, |c| {
        deliver_challenge(c, key, deadline)?;
        answer_challenge(c, key, deadline)
    })
}

/// The client's side: answer first, then challenge.
pub(crate) fn client_handshake(conn: &mut RawConn, key: &[u8], deadline: Instant) -> Result<()> {
    bounded(conn, |c| {
        answer_challenge(c, key, deadline)?;
        deliver_challenge(c, key, deadline)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_accept_what_we_send_and_refuse_the_rest() {
        let mut ch = Vec::new();
        ch.extend_from_slice(CHALLENGE);
        ch.extend_from_slice(ALGO);
        ch.extend_from_slice(&[1; NONCE]);
        assert!(parse_challenge(&ch).is_ok());
        assert!(parse_challenge(&ch[..ch.len() - NONCE]).is_err());
        assert!(parse_challenge(b"#CHALLENGE#{md5}0123456789abcdef").is_err());
        let mut resp = ALGO.to_vec();
        resp.extend_from_slice(&digest(b"k", &ch));
        assert!(verify(b"k", &ch, parse_response(&resp).unwrap()));
        assert!(!verify(b"K", &ch, parse_response(&resp).unwrap()));
        assert!(parse_response(&resp[..resp.len() - 1]).is_err());
        fuzz_handshake_parsers(&[0xff; 300]);
    }
}
