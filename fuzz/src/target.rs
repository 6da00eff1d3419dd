//! The one fuzz target, shared by the libFuzzer and AFL++ entry points: a packet through
//! `Handler::handle`, over UDP and over TCP, judged by the same oracle as the test suite
//! (`tests/support/hostile.rs`). No sockets: the forwarder has no upstream (forwarded names fail
//! at once with SERVFAIL), Consul names come from the demo catalog.

#[allow(dead_code, unused_imports)]
#[path = "../../tests/support/hostile.rs"]
mod hostile;

use std::sync::OnceLock;
use std::time::Duration;

use consul_dns_forwarder::handler::Handler;
use consul_dns_forwarder::reply::Transport;

struct Target {
    runtime: tokio::runtime::Runtime,
    handler: Handler,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        // The forwarder is built inside the runtime (it may spawn).
        let (handler, _registry) = runtime
            .block_on(async { hostile::in_process_handler(None, Duration::from_millis(10)) });
        Target { runtime, handler }
    })
}

/// Panics (a crash for the fuzzer) when the reply to `data` breaks a rule.
pub fn run(data: &[u8]) {
    let t = target();
    for transport in [Transport::Udp, Transport::Tcp] {
        let reply = t
            .runtime
            .block_on(t.handler.handle(data, hostile::ALLOWED_CLIENT, transport));
        if let Err(e) = hostile::check_reply(data, reply.as_deref(), transport, true) {
            panic!("{transport:?}: {e}\npacket {}", hostile::hex(data));
        }
    }
}
