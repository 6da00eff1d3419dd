//! The limit of `benches/load.sh`: the cheapest UDP DNS responder there can be, so that every
//! contender's CPU per answer can be read as a multiple of what receiving a datagram and sending
//! one back costs on this machine.
//!
//! ```sh
//! cargo run --release --example limit_responder -- 127.0.0.1:25300 [max-seconds] [records]
//! ```
//!
//! Every query gets the same canned reply: the header is the query's (ID kept, QR RA set), the
//! question is echoed (dig and dnsperf check it), `records` A records (default 1: 192.0.2.1,
//! then .2, .3, ...) with TTL 300 follow. With as many records as a contender's reply carries,
//! it is the floor for a reply of that size: what the kernel alone costs to move the larger
//! datagram. No parsing beyond the question's length, no allocation per query, one thread,
//! blocking sockets. Stops on SIGTERM and after `max-seconds` (default 7200) in any case.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

/// The answer record: a pointer to the question's name, A, IN, TTL 300, 192.0.2.1.
const ANSWER: [u8; 16] = [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x01, 0x2c, 0, 4, 192, 0, 2, 1];

/// The DNS header.
const HEADER: usize = 12;

/// How often the blocking receive wakes to check the deadline.
const WAKE: Duration = Duration::from_secs(1);

/// The most records a reply carries: a 64 KiB datagram's worth.
const MAX_RECORDS: u16 = 4000;

/// `count` answer records, each `ANSWER` with its own address (192.0.2.1, .2, ... wrapping into
/// the next octet).
fn answers(count: u16) -> Vec<u8> {
    (0..count)
        .flat_map(|i| {
            let mut record = ANSWER;
            let n = i + 1;
            record[14] = 2u8.wrapping_add((n >> 8) as u8);
            record[15] = (n & 0xff) as u8;
            record
        })
        .collect()
}

/// The reply to `query` in `out` (cleared first) with the records `answers` (`count` of them),
/// or `false` for a packet that is not a query with one plain question.
fn reply(query: &[u8], answers: &[u8], count: u16, out: &mut Vec<u8>) -> bool {
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
    let [hi, lo] = count.to_be_bytes();
    out.extend_from_slice(&[0x80 | (query[2] & 0x01), 0x80, 0, 1, hi, lo, 0, 0, 0, 0]);
    out.extend_from_slice(&query[HEADER..question_end]);
    out.extend_from_slice(answers);
    true
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:25300".to_owned());
    let max_seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(7200);
    let count: u16 = match args.next() {
        None => 1,
        Some(n) => match n.parse() {
            Ok(n) if (1..=MAX_RECORDS).contains(&n) => n,
            _ => {
                eprintln!("records: {n:?} is not a count of records from 1 to {MAX_RECORDS}");
                std::process::exit(2);
            }
        },
    };
    let records = answers(count);
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let socket = UdpSocket::bind(&addr)?;
    socket.set_read_timeout(Some(WAKE))?;
    let (mut buf, mut out) = ([0u8; 4096], Vec::with_capacity(512 + records.len()));
    while Instant::now() < deadline {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if reply(&buf[..len], &records, count, &mut out) {
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
        let one = answers(1);
        assert!(reply(&query, &one, 1, &mut out));
        assert_eq!(&out[..4], &[0x12, 0x34, 0x81, 0x80]);
        assert_eq!(&out[6..8], &[0, 1], "one answer");
        assert_eq!(&out[12..21], &query[12..]);
        assert_eq!(&out[21..], &ANSWER);
        assert!(!reply(&query[..15], &one, 1, &mut out), "cut in the name");
        let mut response = query;
        response[2] |= 0x80;
        assert!(
            !reply(&response, &one, 1, &mut out),
            "a response is not answered"
        );
    }

    #[test]
    fn answers_with_as_many_records_as_asked_each_its_own_address() {
        let query = [
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 1, b'b', 0, 0, 1, 0, 1,
        ];
        let records = answers(300);
        let mut out = Vec::new();
        assert!(reply(&query, &records, 300, &mut out));
        assert_eq!(&out[6..8], &300u16.to_be_bytes());
        assert_eq!(out.len(), 21 + 300 * ANSWER.len());
        let addrs: std::collections::HashSet<&[u8]> =
            out[21..].chunks(16).map(|r| &r[12..]).collect();
        assert_eq!(addrs.len(), 300, "no address repeated");
        assert_eq!(
            &out[21 + 299 * 16 + 12..],
            &[192, 0, 3, 44],
            "the 300th: 192.0.3.44"
        );
    }
}
