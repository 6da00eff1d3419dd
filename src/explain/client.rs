//! The `explain` command's side: one GET of `/explain` on the running forwarder's HTTP
//! endpoint, the answer returned as text for a terminal or as JSON.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::render::{query_value, terminal_safe};

/// How long the command waits for the forwarder (above the endpoint's own 10 s bound).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest answer read (a page of 100 instances with their checks is well under 1 MiB).
pub const MAX_BODY: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("cannot reach the forwarder's HTTP endpoint at {addr}: {message} (is it running? see metrics.listen / --endpoint)")]
    Connect { addr: SocketAddr, message: String },
    #[error("{addr}: {message}")]
    Http { addr: SocketAddr, message: String },
    #[error("{addr} answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("no answer from {addr} within {FETCH_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
}

/// What to ask.
#[derive(Clone, Debug)]
pub struct Request {
    pub name: String,
    pub qtype: Option<String>,
    pub json: bool,
    /// Ask as a UDP client without EDNS (nginx, glibc) would.
    pub no_edns: bool,
    pub page: Option<usize>,
}

/// Where a listen address is reached from this host: an unspecified one (0.0.0.0, ::) at
/// loopback.
pub fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(v6) if v6.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}

/// The path and query of the request.
fn path(r: &Request) -> String {
    let mut p = format!(
        "/explain?format={}&name={}",
        if r.json { "json" } else { "text" },
        query_value(&r.name)
    );
    if let Some(t) = &r.qtype {
        p.push_str(&format!("&type={}", query_value(t)));
    }
    if r.no_edns {
        p.push_str("&edns=0");
    }
    if let Some(page) = r.page {
        p.push_str(&format!("&page={page}"));
    }
    p
}

/// Asks the forwarder at `addr` and returns what to print (control characters stripped).
pub async fn fetch(addr: SocketAddr, r: &Request) -> Result<String, ExplainError> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(addr, r))
        .await
        .map_err(|_| ExplainError::Timeout { addr })?
}

async fn fetch_inner(addr: SocketAddr, r: &Request) -> Result<String, ExplainError> {
    let http = |e: &dyn std::fmt::Display| ExplainError::Http {
        addr,
        message: e.to_string(),
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| ExplainError::Connect {
            addr,
            message: e.to_string(),
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(&e))?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path(r))
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(&e))?;
    let response = sender.send_request(request).await.map_err(|e| http(&e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| http(&e))?
        .to_bytes();
    let body = terminal_safe(&String::from_utf8_lossy(&body));
    if !status.is_success() {
        return Err(ExplainError::Status {
            addr,
            status: status.as_u16(),
            body: body.trim_end().to_owned(),
        });
    }
    Ok(body)
}
