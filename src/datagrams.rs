//! Datagrams in batches: one `recvmmsg` reads up to [`BATCH`] queued datagrams and one
//! `sendmmsg` sends up to as many replies, with std's socket addresses on both sides.
//!
//! Why batches: a cache hit's own work is a fraction of a microsecond, and on this path each
//! datagram paid two system calls, each with its entry and exit, glibc's cancellation wrappers
//! and the runtime's readiness check (6–9 % of the CPU per answer in the load benchmark's profile
//! of `fwd-hits`, where the limit, a blocking single-threaded responder, pays less of it). What the
//! datagrams mean is the caller's business; nothing here blocks (`MSG_DONTWAIT`), so the caller
//! runs these inside the runtime's `try_io` and learns of an empty queue or a full send buffer as
//! `WouldBlock`.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};

/// Datagrams read, and replies sent, per system call. Under load the receive loop finds about
/// two dozen datagrams queued per wake-up (load benchmark, `fwd-hits`: 606,115 `sendto` for
/// 25,429 `epoll_wait`), so 32 takes a typical wake-up's worth in one call; more would only
/// lengthen the wait of the first reply behind the batch.
pub(crate) const BATCH: usize = 32;

/// The largest datagram read. EDNS clients may send up to their advertised size; reading the
/// whole datagram lets an oversized one be parsed (and refused) instead of silently cut.
pub(crate) const MAX_DATAGRAM: usize = 65_535;

/// Datagrams read in one call, each in a slot of its own.
pub(crate) struct Inbox {
    /// `BATCH` slots of `MAX_DATAGRAM` bytes. A zeroed allocation this large is mapped lazily
    /// and the kernel writes each slot only as far as its datagram reaches, so the slots cost
    /// about one page each, not 64 KiB.
    slots: Vec<u8>,
    /// Length and source of each datagram read by the last `receive`; a datagram without an
    /// IP source (none should arrive on an IP socket) has `None` and is skipped.
    received: [(usize, Option<SocketAddr>); BATCH],
    count: usize,
}

impl Inbox {
    pub(crate) fn new() -> Inbox {
        Inbox {
            slots: vec![0u8; BATCH * MAX_DATAGRAM],
            received: [(0, None); BATCH],
            count: 0,
        }
    }

    /// Reads up to `max` (at most [`BATCH`]) datagrams already queued on `socket`, without
    /// waiting: `WouldBlock` when none is.
    pub(crate) fn receive(&mut self, socket: &impl AsRawFd, max: usize) -> io::Result<usize> {
        self.count = 0;
        let max = max.clamp(1, BATCH);
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(max, None);
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .slots
            .chunks_exact_mut(MAX_DATAGRAM)
            .take(max)
            .map(|slot| [IoSliceMut::new(slot)])
            .collect();
        let results = recvmmsg(
            socket.as_raw_fd(),
            &mut headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        for (slot, message) in self.received.iter_mut().zip(results) {
            *slot = (message.bytes, message.address.and_then(std_address));
            self.count += 1;
        }
        Ok(self.count)
    }

    /// The datagrams the last `receive` read, with their sources.
    pub(crate) fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.slots
            .chunks_exact(MAX_DATAGRAM)
            .zip(&self.received[..self.count])
            .filter_map(|(slot, &(len, peer))| Some((slot.get(..len)?, peer?)))
    }
}

/// Replies waiting to be sent together, each in a buffer of its own that is reused.
pub(crate) struct Outbox {
    buffers: Vec<Vec<u8>>,
    peers: [Option<SocketAddr>; BATCH],
    len: usize,
}

impl Outbox {
    /// Buffers of `capacity` bytes each to start with (they grow if a reply needs more).
    pub(crate) fn new(capacity: usize) -> Outbox {
        Outbox {
            buffers: (0..BATCH).map(|_| Vec::with_capacity(capacity)).collect(),
            peers: [None; BATCH],
            len: 0,
        }
    }

    /// The buffer the next reply is written into, or `None` when [`BATCH`] replies wait: send
    /// them first. It becomes a queued reply only by [`Outbox::commit`].
    pub(crate) fn next_buffer(&mut self) -> Option<&mut Vec<u8>> {
        let buffer = self.buffers.get_mut(self.len)?;
        buffer.clear();
        Some(buffer)
    }

    /// Queues what was written into the buffer [`Outbox::next_buffer`] gave, as a reply to
    /// `peer`.
    pub(crate) fn commit(&mut self, peer: SocketAddr) {
        if let Some(slot) = self.peers.get_mut(self.len) {
            *slot = Some(peer);
            self.len += 1;
        }
    }

    /// Replies queued.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Reply `index` and its destination.
    pub(crate) fn reply(&self, index: usize) -> Option<(&[u8], SocketAddr)> {
        let peer = (*self.peers[..self.len].get(index)?)?;
        Some((self.buffers.get(index)?, peer))
    }

    /// Sends the queued replies from `from` on, as many as the socket takes in one call:
    /// how many went. An error is the first of them's (the kernel sends none then); the
    /// caller skips that one and sends the rest again.
    pub(crate) fn send(&self, socket: &impl AsRawFd, from: usize) -> io::Result<usize> {
        let pending = from..self.len;
        if pending.is_empty() {
            return Ok(0);
        }
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(pending.len(), None);
        let slices: Vec<[IoSlice<'_>; 1]> = self.buffers[pending.clone()]
            .iter()
            .map(|buffer| [IoSlice::new(buffer)])
            .collect();
        let addresses: Vec<Option<SockaddrStorage>> = self.peers[pending]
            .iter()
            .map(|peer| peer.map(SockaddrStorage::from))
            .collect();
        let no_control: [ControlMessage<'_>; 0] = [];
        let sent = sendmmsg(
            socket.as_raw_fd(),
            &mut headers,
            &slices,
            addresses,
            no_control,
            MsgFlags::MSG_DONTWAIT,
        )?;
        Ok(sent.count())
    }

    /// Cuts queued reply `index` to its question with TC=1 (`raw::cut_to_question`); false
    /// when there is no such reply or it cannot be cut.
    pub(crate) fn cut_to_question(&mut self, index: usize) -> bool {
        index < self.len
            && self
                .buffers
                .get_mut(index)
                .is_some_and(crate::raw::cut_to_question)
    }

    /// Forgets the queued replies (their buffers are kept for the next ones).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }
}

/// A datagram's source as std's address: IPv4 or IPv6, nothing else.
fn std_address(address: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    address
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn bound(addr: &str) -> UdpSocket {
        let socket = UdpSocket::bind(addr).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        socket
    }

    /// Datagrams from several senders, read in one call and answered in one call: each sender
    /// gets the reply to its own datagram, in order, and a partial read leaves the rest queued.
    #[test]
    fn datagrams_read_and_replies_sent_in_batches_reach_their_own_peers() {
        let server = bound("127.0.0.1:0");
        server.set_nonblocking(true).expect("nonblocking");
        let addr = server.local_addr().expect("addr");
        let clients: Vec<UdpSocket> = (0..3).map(|_| bound("127.0.0.1:0")).collect();
        for round in 0..4u8 {
            for (i, client) in clients.iter().enumerate() {
                client.send_to(&[round, i as u8], addr).expect("send");
            }
        }
        let mut inbox = Inbox::new();
        let mut outbox = Outbox::new(16);
        let mut seen = Vec::new();
        // Loopback delivers synchronously; a few tries cover a scheduler hiccup.
        for _ in 0..50 {
            match inbox.receive(&server, 5) {
                Ok(n) => {
                    assert!(n <= 5, "read {n} with a limit of 5");
                    for (datagram, peer) in inbox.datagrams() {
                        seen.push((datagram.to_vec(), peer));
                        let reply = outbox.next_buffer().expect("room");
                        reply.extend_from_slice(b"re:");
                        reply.extend_from_slice(datagram);
                        outbox.commit(peer);
                    }
                    let mut sent = 0;
                    while sent < outbox.len() {
                        sent += outbox.send(&server, sent).expect("send");
                    }
                    outbox.clear();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if seen.len() == 12 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("receive: {e}"),
            }
        }
        assert_eq!(seen.len(), 12, "every datagram read once: {seen:?}");
        for (i, client) in clients.iter().enumerate() {
            assert!(seen
                .iter()
                .any(|(d, p)| *p == client.local_addr().expect("addr") && d[1] == i as u8));
            for round in 0..4u8 {
                let mut buf = [0u8; 16];
                let (n, from) = client.recv_from(&mut buf).expect("reply");
                assert_eq!(from, addr);
                assert_eq!(&buf[..n], &[b'r', b'e', b':', round, i as u8]);
            }
        }
    }

    #[test]
    fn an_empty_queue_is_would_block() {
        let server = bound("127.0.0.1:0");
        server.set_nonblocking(true).expect("nonblocking");
        let mut inbox = Inbox::new();
        let err = inbox.receive(&server, BATCH).expect_err("nothing queued");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(inbox.datagrams().count(), 0);
    }

    #[test]
    fn replies_alternate_between_ipv4_and_ipv6_sockets_on_one_thread() {
        // One outbox serves replies to both families in turn: each send addresses its own.
        let Ok(server6) = UdpSocket::bind("[::1]:0") else {
            return; // no IPv6 loopback on this machine
        };
        let server4 = bound("127.0.0.1:0");
        let (client4, client6) = (bound("127.0.0.1:0"), bound("[::1]:0"));
        let mut outbox = Outbox::new(512);
        for round in 0..3u8 {
            for (server, client) in [(&server6, &client6), (&server4, &client4)] {
                for i in 0..2u8 {
                    let Some(buffer) = outbox.next_buffer() else {
                        panic!("room for two replies");
                    };
                    buffer.extend_from_slice(&[round, i]);
                    outbox.commit(client.local_addr().expect("addr"));
                }
                assert_eq!(outbox.send(server, 0).expect("send"), 2);
                outbox.clear();
                let mut buf = [0u8; 8];
                for i in 0..2u8 {
                    let (n, from) = client.recv_from(&mut buf).expect("a reply arrives");
                    assert_eq!(&buf[..n], &[round, i]);
                    assert_eq!(from, server.local_addr().expect("addr"));
                }
            }
        }
    }

    #[test]
    fn ipv6_sources_come_back_as_std_addresses() {
        let Ok(server) = UdpSocket::bind("[::1]:0") else {
            return; // no IPv6 loopback on this machine
        };
        server.set_nonblocking(true).expect("nonblocking");
        let client = bound("[::1]:0");
        client
            .send_to(b"q", server.local_addr().expect("addr"))
            .expect("send");
        let mut inbox = Inbox::new();
        let mut got = None;
        for _ in 0..50 {
            if let Ok(1) = inbox.receive(&server, BATCH) {
                got = inbox.datagrams().next().map(|(d, p)| (d.to_vec(), p));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            got,
            Some((b"q".to_vec(), client.local_addr().expect("addr")))
        );
    }

    #[test]
    fn a_full_outbox_gives_no_buffer() {
        let mut outbox = Outbox::new(4);
        let peer: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        for _ in 0..BATCH {
            outbox.next_buffer().expect("room").push(1);
            outbox.commit(peer);
        }
        assert!(outbox.next_buffer().is_none());
        assert_eq!(outbox.len(), BATCH);
        assert_eq!(outbox.reply(BATCH - 1), Some((&[1u8][..], peer)));
        outbox.clear();
        assert!(outbox.next_buffer().is_some_and(|b| b.is_empty()));
    }
}
