//! Upstream UDP sockets kept open between questions, so that a cache miss does not pay for a
//! socket, a bind, a connect and a close (four system calls, about a tenth of a miss's CPU).
//!
//! Each socket is bound to its own port, chosen at random by the kernel, and connected to one
//! server (the kernel then drops datagrams from anyone else). It carries one question at a time
//! and at most [`SOCKET_USES`] questions in all, and goes back to the pool only after a reply
//! that matched: a socket whose question timed out or failed is closed, so a late reply never
//! reaches a later question (where it would count as a forgery). Datagrams that arrive on an
//! idle socket (a duplicate reply) are dropped before its next use. A blind spoofer still has
//! to guess a random port per socket, the ID and the 0x20 case; a port is only ever worth
//! [`SOCKET_USES`] questions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

use tokio::net::UdpSocket;

use crate::lock::lock;

/// Questions one socket (one source port) carries before it is closed: dnsmasq's pool of
/// random ports amortises them the same way. 8 cuts the socket system calls per miss to an
/// eighth while a port stays short-lived.
pub(crate) const SOCKET_USES: u32 = 8;

/// Idle sockets kept per server; more questions in flight than this open sockets of their own,
/// closed after use when the pool is full.
pub(crate) const MAX_IDLE_SOCKETS: usize = 128;

/// A socket lent out for one question; give it back with [`SocketPool::put`] once its reply
/// matched, or drop it.
pub(crate) struct Lent {
    pub(crate) socket: UdpSocket,
    uses: u32,
}

/// The idle sockets connected to one server.
#[derive(Debug, Default)]
pub(crate) struct SocketPool {
    idle: Mutex<Vec<(UdpSocket, u32)>>,
}

impl SocketPool {
    /// A socket connected to `server`: an idle one (emptied of stray datagrams), else a new one
    /// on a random port.
    pub(crate) async fn take(&self, server: SocketAddr) -> std::io::Result<Lent> {
        let idle = lock(&self.idle).pop();
        if let Some((socket, uses)) = idle {
            let mut stray = [0u8; 1];
            while socket.try_recv(&mut stray).is_ok() {}
            return Ok(Lent { socket, uses });
        }
        let bind: SocketAddr = match server.ip() {
            IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        };
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(server).await?;
        Ok(Lent { socket, uses: 0 })
    }

    /// Returns a socket whose question got its matching reply: kept for another question
    /// unless it has carried [`SOCKET_USES`] or the pool is full (then it is closed).
    pub(crate) fn put(&self, lent: Lent) {
        let uses = lent.uses + 1;
        if uses >= SOCKET_USES {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE_SOCKETS {
            idle.push((lent.socket, uses));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[tokio::test]
    async fn ports_are_random_used_a_bounded_number_of_times_and_drained() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let at = server.local_addr().expect("addr");
        let pool = SocketPool::default();
        let mut uses: HashMap<u16, u32> = HashMap::new();
        for _ in 0..80 {
            let lent = pool.take(at).await.expect("socket");
            *uses
                .entry(lent.socket.local_addr().expect("addr").port())
                .or_default() += 1;
            pool.put(lent);
        }
        assert!(
            uses.len() >= 80 / SOCKET_USES as usize,
            "{} ports",
            uses.len()
        );
        assert!(uses.values().all(|&n| n <= SOCKET_USES), "{uses:?}");
        // A datagram left on an idle socket is gone before its next question.
        let lent = pool.take(at).await.expect("socket");
        let port = lent.socket.local_addr().expect("addr");
        lent.socket.send(b"q").await.expect("send");
        pool.put(lent);
        let mut buf = [0u8; 8];
        let (_, from) = server.recv_from(&mut buf).await.expect("recv");
        assert_eq!(from, port);
        server.send_to(b"late", from).await.expect("send");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let lent = pool.take(at).await.expect("socket");
        assert_eq!(lent.socket.local_addr().expect("addr"), port, "reused");
        assert!(
            lent.socket.try_recv(&mut buf).is_err(),
            "the late datagram was dropped"
        );
        // A socket not given back (its question failed) is closed, never reused.
        drop(lent);
        let next = pool.take(at).await.expect("socket");
        assert_ne!(next.socket.local_addr().expect("addr"), port);
    }
}
