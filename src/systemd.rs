//! systemd: the notify protocol (`Type=notify`: READY=1, STATUS=, WATCHDOG=1, STOPPING=1) and
//! socket activation (sockets passed as `LISTEN_FDS`).
//!
//! The protocol is the `sd-notify` crate's: it writes the datagrams to `NOTIFY_SOCKET` and reads
//! `WATCHDOG_USEC`/`WATCHDOG_PID`. The passed sockets are taken with the `listenfd` crate: it
//! checks `LISTEN_PID`, checks each descriptor's socket type and family before wrapping it in a
//! std socket, and marks it close-on-exec, all behind a safe API (`sd-notify`'s `listen_fds`
//! hands out raw descriptors, which would need `unsafe` here). Which addresses they are bound to
//! is checked here against `server.listen`.

use std::net::SocketAddr;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::server::Listeners;

/// How often the STATUS= line is recomputed (and sent when it changed).
pub(crate) const STATUS_POLL: Duration = Duration::from_secs(1);

/// The longest STATUS= text sent: reasons come from Consul's replies and must not make a large
/// datagram.
const STATUS_MAX: usize = 200;

/// Tells the service manager about the process's state. Silent when there is no
/// `NOTIFY_SOCKET` (not started by systemd with `Type=notify`).
#[derive(Clone)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    /// Called once when serving starts, with or without systemd (the binary's "serving" line).
    on_serving: Option<std::sync::Arc<dyn Fn() + Send + Sync>>,
}

impl Notifier {
    /// From the environment systemd sets: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` when the unit
    /// has `WatchdogSec=`.
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            on_serving: None,
        }
    }

    /// Also calls `f` when serving starts (where READY=1 is sent).
    pub fn on_serving(mut self, f: impl Fn() + Send + Sync + 'static) -> Notifier {
        self.on_serving = Some(std::sync::Arc::new(f));
        self
    }

    pub(crate) fn serving(&self) {
        if let Some(f) = &self.on_serving {
            f();
        }
    }

    /// Tells nothing to anyone (library users and in-process tests).
    pub fn off() -> Notifier {
        Notifier {
            enabled: false,
            watchdog: None,
            on_serving: None,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// How often to send WATCHDOG=1: half the interval systemd allows, as sd_watchdog_enabled(3)
    /// advises.
    pub(crate) fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled).map(|d| d / 2)
    }

    pub(crate) fn ready(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    pub(crate) fn status(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Status(&status)]);
    }

    pub(crate) fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    pub(crate) fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: finishing the queries in flight"),
        ]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
        }
    }
}

/// `text` as one bounded line: the protocol is one `KEY=value` per line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(STATUS_MAX)
        .collect()
}

/// The STATUS= text for the Consul source's readiness (`None`: no Consul source).
pub(crate) fn status_text(consul: Option<Result<(), String>>) -> String {
    match consul {
        None => "serving DNS; Consul names off".to_owned(),
        Some(Ok(())) => "serving DNS; Consul: ready".to_owned(),
        Some(Err(reason)) => format!("serving DNS; Consul: not ready: {reason}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Udp => "UDP",
            Proto::Tcp => "TCP",
        }
    }

    /// The `.socket` unit directive that passes this kind of socket.
    fn directive(self) -> &'static str {
        match self {
            Proto::Udp => "ListenDatagram",
            Proto::Tcp => "ListenStream",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: passed socket {which} is not a UDP socket or a listening TCP socket of IPv4 or IPv6: {detail}")]
    Kind { which: String, detail: String },
    #[error("socket activation: passed socket {which} is {proto} on {addr}, which server.listen does not name ({listen}); make the .socket unit's {directive}= lines and server.listen the same addresses")]
    Unexpected {
        which: String,
        proto: &'static str,
        addr: SocketAddr,
        listen: String,
        directive: &'static str,
    },
    #[error("socket activation: passed sockets {first} and {second} are both {proto} on {addr}")]
    Duplicate {
        first: String,
        second: String,
        proto: &'static str,
        addr: SocketAddr,
    },
    #[error("socket activation: server.listen {addr} has no {proto} socket among those passed (LISTEN_FDS); add {directive}={addr} to the .socket unit")]
    Missing {
        addr: SocketAddr,
        proto: &'static str,
        directive: &'static str,
    },
}

/// One passed socket: how errors name it (`fd 3 "dns-udp"`), its kind and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Passed {
    pub(crate) which: String,
    pub(crate) proto: Proto,
    pub(crate) addr: SocketAddr,
}

/// Checks that the passed sockets are exactly one UDP and one TCP socket for each address of
/// `listen` (port 0 there matches any port of that address).
pub(crate) fn check_passed(
    listen: &[SocketAddr],
    passed: &[Passed],
) -> Result<(), ActivationError> {
    let matches = |want: &SocketAddr, got: &SocketAddr| {
        want.ip() == got.ip() && (want.port() == 0 || want.port() == got.port())
    };
    for (i, p) in passed.iter().enumerate() {
        if !listen.iter().any(|l| matches(l, &p.addr)) {
            return Err(ActivationError::Unexpected {
                which: p.which.clone(),
                proto: p.proto.name(),
                addr: p.addr,
                listen: listen
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                directive: p.proto.directive(),
            });
        }
        if let Some(q) = passed[..i]
            .iter()
            .find(|q| q.proto == p.proto && q.addr == p.addr)
        {
            return Err(ActivationError::Duplicate {
                first: q.which.clone(),
                second: p.which.clone(),
                proto: p.proto.name(),
                addr: p.addr,
            });
        }
    }
    for want in listen {
        for proto in [Proto::Udp, Proto::Tcp] {
            if !passed
                .iter()
                .any(|p| p.proto == proto && matches(want, &p.addr))
            {
                return Err(ActivationError::Missing {
                    addr: *want,
                    proto: proto.name(),
                    directive: proto.directive(),
                });
            }
        }
    }
    Ok(())
}

/// Sockets passed by the service manager, checked against `server.listen`, not yet registered
/// with the async runtime.
pub struct Inherited {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

impl Inherited {
    /// Takes the sockets passed in `LISTEN_FDS` (for this process: `LISTEN_PID`), or `None`
    /// when there are none. Call it before any thread starts: it unsets `LISTEN_FDS` and
    /// `LISTEN_PID` so that no child inherits them.
    pub fn from_env(listen: &[SocketAddr]) -> Result<Option<Inherited>, ActivationError> {
        let mut fds = listenfd::ListenFd::from_env();
        if fds.len() == 0 {
            return Ok(None);
        }
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|n| n.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        let mut inherited = Inherited {
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        let mut passed = Vec::new();
        for i in 0..fds.len() {
            let which = match names.get(i).filter(|n| !n.is_empty()) {
                Some(name) => format!("fd {} ({:?})", 3 + i, one_line(name)),
                None => format!("fd {}", 3 + i),
            };
            let kind = |detail: String| ActivationError::Kind {
                which: which.clone(),
                detail,
            };
            let (proto, addr) = match fds.take_udp_socket(i) {
                Ok(Some(s)) => {
                    let addr = s.local_addr().map_err(|e| kind(e.to_string()))?;
                    inherited.udp.push(s);
                    (Proto::Udp, addr)
                }
                Ok(None) => continue,
                Err(_) => match fds.take_tcp_listener(i) {
                    Ok(Some(l)) => {
                        let listening = socket2::SockRef::from(&l)
                            .is_listener()
                            .map_err(|e| kind(e.to_string()))?;
                        if !listening {
                            return Err(kind("a TCP socket that is not listening".to_owned()));
                        }
                        let addr = l.local_addr().map_err(|e| kind(e.to_string()))?;
                        inherited.tcp.push(l);
                        (Proto::Tcp, addr)
                    }
                    Ok(None) => continue,
                    Err(e) => return Err(kind(e.to_string())),
                },
            };
            passed.push(Passed { which, proto, addr });
        }
        check_passed(listen, &passed)?;
        Ok(Some(inherited))
    }

    /// Registers the sockets with the async runtime (call it inside one): `udp_per_address`
    /// receive loops for each UDP socket (0 = one per core), sharing it through duplicated
    /// descriptors.
    pub fn into_listeners(self, udp_per_address: usize) -> std::io::Result<Listeners> {
        let per = crate::server::udp_sockets_per_address(udp_per_address);
        let mut listeners = Listeners::default();
        for socket in self.udp {
            socket.set_nonblocking(true)?;
            crate::server::forbid_fragmentation(&socket, socket.local_addr()?.is_ipv6())?;
            for _ in 1..per {
                listeners
                    .udp
                    .push(tokio::net::UdpSocket::from_std(socket.try_clone()?)?);
            }
            listeners.udp.push(tokio::net::UdpSocket::from_std(socket)?);
        }
        for listener in self.tcp {
            listener.set_nonblocking(true)?;
            listeners
                .tcp
                .push(tokio::net::TcpListener::from_std(listener)?);
        }
        Ok(listeners)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn passed(which: &str, proto: Proto, a: &str) -> Passed {
        Passed {
            which: which.to_owned(),
            proto,
            addr: addr(a),
        }
    }

    #[test]
    fn one_udp_and_one_tcp_per_listen_address_is_accepted() {
        let listen = [addr("127.0.0.1:53"), addr("[::1]:53")];
        let all = [
            passed("fd 3", Proto::Udp, "127.0.0.1:53"),
            passed("fd 4", Proto::Tcp, "127.0.0.1:53"),
            passed("fd 5", Proto::Udp, "[::1]:53"),
            passed("fd 6", Proto::Tcp, "[::1]:53"),
        ];
        check_passed(&listen, &all).expect("matches");
        // Port 0 in server.listen takes whatever port the unit bound.
        check_passed(&[addr("127.0.0.1:0")], &all[..2]).expect("port 0 matches");
    }

    #[test]
    fn a_missing_an_extra_or_a_duplicate_socket_is_named() {
        let listen = [addr("127.0.0.1:53")];
        let udp = passed("fd 3 (\"dns\")", Proto::Udp, "127.0.0.1:53");
        let err = check_passed(&listen, std::slice::from_ref(&udp))
            .expect_err("no TCP")
            .to_string();
        assert!(
            err.contains("server.listen 127.0.0.1:53 has no TCP socket")
                && err.contains("ListenStream=127.0.0.1:53"),
            "{err}"
        );
        let other = passed("fd 4", Proto::Tcp, "127.0.0.1:5353");
        let err = check_passed(&listen, &[udp.clone(), other])
            .expect_err("wrong port")
            .to_string();
        assert!(
            err.contains("fd 4 is TCP on 127.0.0.1:5353") && err.contains("server.listen"),
            "{err}"
        );
        let twice = passed("fd 4", Proto::Udp, "127.0.0.1:53");
        let err = check_passed(&listen, &[udp, twice])
            .expect_err("twice")
            .to_string();
        assert!(err.contains("fd 3 (\"dns\") and fd 4"), "{err}");
    }

    #[test]
    fn status_is_one_bounded_line() {
        let long = format!("a\nb{}", "x".repeat(1000));
        let line = one_line(&status_text(Some(Err(long))));
        assert!(!line.contains('\n'));
        assert_eq!(line.chars().count(), STATUS_MAX);
        assert_eq!(status_text(Some(Ok(()))), "serving DNS; Consul: ready");
    }
}
