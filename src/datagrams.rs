//! Datagrams in batches: one `recvmmsg` reads up to [`BATCH`] queued datagrams and one
//! `sendmmsg` sends up to as many replies, with std's socket addresses on both sides; a batch of
//! one goes by plain `recvfrom` and `sendto`. [`ReadSize`] decides how many each read asks for.
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
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};
use rustix::net::{RecvFlags, SendFlags};

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
    pub(crate) fn receive(&mut self, socket: &impl AsFd, max: usize) -> io::Result<usize> {
        self.count = 0;
        let max = max.clamp(1, BATCH);
        if max == 1 {
            return self.receive_one(socket);
        }
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(max, None);
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .slots
            .chunks_exact_mut(MAX_DATAGRAM)
            .take(max)
            .map(|slot| [IoSliceMut::new(slot)])
            .collect();
        let results = recvmmsg(
            socket.as_fd().as_raw_fd(),
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

    /// One datagram by `recvfrom`: `recvmmsg` for one would allocate its header arrays and copy
    /// them in and out for a single message, which at one datagram per call (see [`ReadSize`])
    /// costs more than the call it replaces.
    fn receive_one(&mut self, socket: &impl AsFd) -> io::Result<usize> {
        let slot = self.slots.get_mut(..MAX_DATAGRAM).unwrap_or_default();
        let (len, _, source) = rustix::net::recvfrom(socket, slot, RecvFlags::DONTWAIT)?;
        self.received[0] = (len, source.and_then(|s| SocketAddr::try_from(s).ok()));
        self.count = 1;
        Ok(1)
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
    pub(crate) fn send(&self, socket: &impl AsFd, from: usize) -> io::Result<usize> {
        let pending = from..self.len;
        match pending.len() {
            0 => return Ok(0),
            // One reply by `sendto`, for the reason `Inbox::receive_one` gives.
            1 => {
                let Some((reply, peer)) = self.reply(from) else {
                    return Ok(0);
                };
                rustix::net::sendto(socket, reply, SendFlags::DONTWAIT, &peer)?;
                return Ok(1);
            }
            _ => {}
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
            socket.as_fd().as_raw_fd(),
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

/// How many datagrams each read asks for: one at a time while the loop keeps up with its
/// clients, [`BATCH`] at a time once the queue runs ahead of it.
///
/// Why not always a batch: every reply of a batch goes out after the whole batch is read and
/// answered. A client waiting on its replies (dnsperf's receiving thread in the load benchmark;
/// nginx or a resolver library on the same host) has then gone idle in between, and each burst
/// has to wake its CPU with an inter-processor interrupt, which the sender pays for and which in
/// a virtual machine is an exit to the hypervisor. Answered one at a time, the first reply leaves
/// while the client is still busy sending, and the rest follow closely enough that it stays
/// awake. Forwarded hits at half the maximum rate (152,000 queries/s), always batches of 32:
/// 32,996 such interrupts in 4 s, ×1.077 of 76a8758's CPU per answer (one datagram per system
/// call); with this policy: 1,403 interrupts and ×0.925 (docs/benchmarks.md, step fifteen).
/// Flat out the client's CPU never idles, there is nothing to save, and a batch per call is what
/// makes a hit cheap (×0.869 of 76a8758's; always one at a time, ×0.99).
///
/// How deep the queue runs is judged by what the recent wake-ups answered before finding it
/// empty, and by the current one: at half the maximum rate a wake-up answers 16–31 datagrams,
/// flat out mostly more than 32.
#[derive(Debug, Default)]
pub(crate) struct ReadSize {
    /// Datagrams read per wake-up, a moving average over the recent wake-ups, in units of
    /// 1/[`AVERAGE_SCALE`] of a datagram (integers, no float state in the loop).
    recent: usize,
    /// Datagrams read since the queue was last found empty.
    this_wakeup: usize,
}

/// Fixed-point scale of [`ReadSize::recent`].
const AVERAGE_SCALE: usize = 16;

/// Weight of the newest wake-up in [`ReadSize::recent`], as 1/N: a quarter follows a change of
/// load within a few wake-ups without flipping on one odd one.
const AVERAGE_WEIGHT_INVERSE: usize = 4;

impl ReadSize {
    /// Datagrams the next read asks for, at most `left` (what the loop's turn has room for) and
    /// at least one.
    pub(crate) fn next(&self, left: usize) -> usize {
        let deep = self.recent >= BATCH * AVERAGE_SCALE || self.this_wakeup >= BATCH;
        let size = if deep { BATCH } else { 1 };
        size.min(left).max(1)
    }

    /// Counts datagrams read (answered or not).
    pub(crate) fn read(&mut self, count: usize) {
        self.this_wakeup = self.this_wakeup.saturating_add(count);
    }

    /// The queue was found empty: the wake-up's count joins the average. Counts above two
    /// batches weigh as two batches, so that one long flood does not hold batches for long after.
    pub(crate) fn emptied(&mut self) {
        let newest = self.this_wakeup.min(2 * BATCH) * AVERAGE_SCALE;
        self.recent =
            (self.recent * (AVERAGE_WEIGHT_INVERSE - 1) + newest) / AVERAGE_WEIGHT_INVERSE;
        self.this_wakeup = 0;
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
        let mut inbox = Inbox::new();
        // Read alone (`recvfrom`) and in a batch (`recvmmsg`).
        for max in [1, BATCH] {
            client
                .send_to(b"q", server.local_addr().expect("addr"))
                .expect("send");
            let mut got = None;
            for _ in 0..50 {
                if let Ok(1) = inbox.receive(&server, max) {
                    got = inbox.datagrams().next().map(|(d, p)| (d.to_vec(), p));
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(
                got,
                Some((b"q".to_vec(), client.local_addr().expect("addr"))),
                "read with max {max}"
            );
        }
    }

    /// Wake-ups that answer fewer than a batch are read one datagram at a time; a wake-up that
    /// has answered a batch, or a run of them that averaged one, reads batches.
    #[test]
    fn reads_grow_to_batches_only_while_wakeups_find_a_batch_queued() {
        let mut size = ReadSize::default();
        assert_eq!(size.next(64), 1, "an idle server starts one at a time");
        // Half-rate wake-ups (about 17 datagrams each) stay one at a time.
        for _ in 0..50 {
            for _ in 0..17 {
                assert_eq!(size.next(64), 1);
                size.read(1);
            }
            size.emptied();
        }
        // A flood: one at a time until this wake-up has read a batch, then batches.
        for _ in 0..BATCH {
            assert_eq!(size.next(64), 1);
            size.read(1);
        }
        assert_eq!(size.next(64), BATCH);
        assert_eq!(size.next(5), 5, "never more than the turn has room for");
        size.read(500);
        size.emptied();
        // Once recent wake-ups average a batch or more, the next one starts with batches: after
        // the long run of small ones, within two more of 70.
        for _ in 0..2 {
            size.read(70);
            size.emptied();
        }
        for _ in 0..3 {
            assert_eq!(size.next(64), BATCH);
            size.read(70);
            size.emptied();
        }
        // Load falls back to small wake-ups: within a few, one at a time again.
        let mut wakeups = 0;
        while size.next(64) == BATCH {
            size.read(3);
            size.emptied();
            wakeups += 1;
            assert!(
                wakeups <= 8,
                "still batching after {wakeups} small wake-ups"
            );
        }
        assert!(
            wakeups >= 1,
            "one small wake-up after a flood does not flip the mode"
        );
        assert_eq!(size.next(0), 1, "a read asks for at least one datagram");
    }

    /// A batch of one takes the single-datagram calls, and they keep the batch calls' contract:
    /// source addresses of both families, replies to their own peers, `WouldBlock` when empty.
    #[test]
    fn single_datagrams_are_read_and_answered_like_batches() {
        let server = bound("127.0.0.1:0");
        server.set_nonblocking(true).expect("nonblocking");
        let addr = server.local_addr().expect("addr");
        let client = bound("127.0.0.1:0");
        let mut inbox = Inbox::new();
        let mut outbox = Outbox::new(16);
        for round in 0..3u8 {
            client.send_to(&[round; 3], addr).expect("send");
            let mut read = Err(io::ErrorKind::WouldBlock.into());
            // Loopback delivers synchronously; a few tries cover a scheduler hiccup.
            for _ in 0..50 {
                read = inbox.receive(&server, 1);
                if read.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(read.expect("one datagram"), 1);
            let (datagram, peer) = inbox.datagrams().next().expect("read");
            assert_eq!(
                (datagram, peer),
                (&[round; 3][..], client.local_addr().expect("addr"))
            );
            let reply = outbox.next_buffer().expect("room");
            reply.extend_from_slice(b"re");
            outbox.commit(peer);
            assert_eq!(outbox.send(&server, 0).expect("sent"), 1);
            outbox.clear();
            let mut buf = [0u8; 8];
            let (n, from) = client.recv_from(&mut buf).expect("reply");
            assert_eq!((&buf[..n], from), (&b"re"[..], addr));
        }
        let err = inbox.receive(&server, 1).expect_err("nothing queued");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // A datagram longer than any reply buffer is read whole.
        let big = vec![7u8; 4000];
        client.send_to(&big, addr).expect("send");
        let mut got = 0;
        for _ in 0..50 {
            if let Ok(1) = inbox.receive(&server, 1) {
                got = inbox.datagrams().next().map_or(0, |(d, _)| d.len());
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(got, big.len());
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
