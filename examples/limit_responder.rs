//! The limit of `benches/load.sh`: the cheapest UDP DNS responder there can be, so that every
//! contender's CPU per answer can be read as a multiple of what receiving a datagram and sending
//! one back costs on this machine.
//!
//! ```sh
//! cargo run --release --example limit_responder -- 127.0.0.1:25300 [max-seconds]
//! ```
//!
//! Every query gets the same canned reply: the header is the query's (ID kept, QR RA set), the
//! question is echoed (dig and dnsperf check it), one A record 192.0.2.1 with TTL 300 follows.
//! No parsing beyond the question's length, no allocation per query, one thread, blocking
//! sockets. Stops on SIGTERM and after `max-seconds` (default 7200) in any case.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

/// The answer record: a pointer to the question's name, A, IN, TTL 300, 192.0.2.1.
const ANSWER: [u8; 16] = [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x01, 0x2c, 0, 4, 192, 0, 2, 1];

/// The DNS header.
const HEADER: usize = 12;

/// How often the blocking receive wakes to check the deadline.
const WAKE: Duration = Duration::from_secs(1);

/// The reply to `query` in `out` (cleared first), or `false` for a packet that is not a query
/// with one plain question.
fn reply(query: &[u8], out: &mut Vec<u8>) -> bool {
    if query.len() < HEADER || query[2] & 0x80 != 0 {
        return false;
    }
    let mut end = HEADER;
    while let Some(&len) = query.get(end) {
        end += 1 + usize::from(len);
        if len == 0 || len > 63 {
            break;
        }
    }
    let question_end = end + 4;
    if query.get(end - 1) != Some(&0) || question_end > query.len() {
        return false;
    }
    out.clear();
    // ID, then QR and RD as asked, RA; one question, one answer, nothing else.
    out.extend_from_slice(&query[..2]);
    out.extend_from_slice(&[0x80 | (query[2] & 0x01), 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    out.extend_from_slice(&query[HEADER..question_end]);
    out.extend_from_slice(&ANSWER);
    true
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:25300".to_owned());
    let max_seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(7200);
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let socket = UdpSocket::bind(&addr)?;
    socket.set_read_timeout(Some(WAKE))?;
    let (mut buf, mut out) = ([0u8; 4096], Vec::with_capacity(512));
    while Instant::now() < deadline {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if reply(&buf[..len], &mut out) {
            let _ = socket.send_to(&out, from);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_the_question_asked_with_the_canned_record() {
        // ID 0x1234, RD, one question: a.b A IN.
        let query = [
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 1, b'b', 0, 0, 1, 0, 1,
        ];
        let mut out = Vec::new();
        assert!(reply(&query, &mut out));
        assert_eq!(&out[..4], &[0x12, 0x34, 0x81, 0x80]);
        assert_eq!(&out[12..21], &query[12..]);
        assert_eq!(&out[21..], &ANSWER);
        assert!(!reply(&query[..15], &mut out), "cut in the name");
        let mut response = query;
        response[2] |= 0x80;
        assert!(!reply(&response, &mut out), "a response is not answered");
    }
}
