//! A deliberately small HTTP/1.1 server for Consul's HTTP API.
//!
//! Why not axum: `stop()` must close the listener *and* every open connection,
//! including requests held as blocking queries, so that clients see errors
//! exactly as when an agent dies; axum's `serve` detaches connection tasks and
//! only offers graceful shutdown, which waits for them. Owning the connection
//! loop also gives exact connection counts and lets a held request notice at
//! once that its client went away (as Go's server does via the request context).
//!
//! Supported: GET/HEAD, keep-alive, pipelining, `Content-Length` bodies (read
//! and ignored). Not supported (answered 400 and closed): chunked request
//! bodies, which no Consul client sends on a GET.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rand::Rng;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::state::{Scope, State};
use super::{lock, Inner, DATACENTER};

/// Consul's default and maximum blocking wait.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 1024 * 1024;

pub(super) struct Request {
    pub method: String,
    /// Percent-decoded path, without the query string.
    pub path: String,
    /// The request target exactly as sent.
    pub target: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub keep_alive: bool,
    content_length: usize,
    chunked: bool,
}

impl Request {
    /// First value of a query parameter (`Some("")` for a bare `?passing`).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn params(&self, name: &str) -> Vec<String> {
        self.query
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub(super) struct Response {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Response {
    /// A plain-text body, the way Consul reports errors.
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: body.into().into_bytes(),
        }
    }

    /// A JSON body with Consul's query-meta headers when `index` is given.
    fn json(value: &impl serde::Serialize, index: Option<u64>) -> Self {
        let mut headers = Vec::new();
        if let Some(i) = index {
            headers.push(("X-Consul-Effective-Consistency", "leader".to_string()));
            headers.push(("X-Consul-Index", i.max(1).to_string()));
            headers.push(("X-Consul-KnownLeader", "true".to_string()));
            headers.push(("X-Consul-LastContact", "0".to_string()));
        }
        Response {
            status: 200,
            content_type: "application/json",
            headers,
            body: serde_json::to_vec(value).expect("serialize JSON"),
        }
    }

    fn encode(&self, keep_alive: bool, head_only: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            _ => "Unknown",
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nVary: Accept-Encoding\r\n",
            self.status,
            reason,
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if !keep_alive {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// Decrements the open-connection count however the connection task ends.
struct ConnGuard(Arc<Inner>);

impl ConnGuard {
    fn new(inner: &Arc<Inner>) -> Self {
        let open = inner.stats.open_connections.fetch_add(1, Ordering::SeqCst) + 1;
        inner
            .stats
            .max_connections
            .fetch_max(open, Ordering::SeqCst);
        ConnGuard(inner.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.stats.open_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts until cancelled. Each connection task holds a `done` sender so that
/// `stop()` can wait until every socket of this generation is closed.
pub(super) async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    cancel: CancellationToken,
    done: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let guard = ConnGuard::new(&inner);
                let inner = inner.clone();
                let cancel = cancel.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let _done = done;
                    let conn = CountedStream {
                        _count: guard,
                        stream,
                    };
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = serve_conn(&inner, conn) => {}
                    }
                });
            }
            // E.g. EMFILE: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A connection and its place in the count. Fields drop in declaration order: the count goes
/// down before the socket closes. A client learns of the close from our FIN and may connect
/// again at once; counting the old connection until after the FIN would count both at the same
/// moment, which no client can avoid (it cannot see our counter), so the peak would not be the
/// client's doing.
struct CountedStream {
    _count: ConnGuard,
    stream: TcpStream,
}

async fn serve_conn(inner: &Arc<Inner>, mut conn: CountedStream) {
    let stream = &mut conn.stream;
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let req = match read_request(inner, stream, &mut buf).await {
            Ok(r) => r,
            Err(Some(resp)) => {
                let _ = stream.write_all(&resp.encode(false, false)).await;
                return;
            }
            Err(None) => return,
        };
        record(inner, &req);
        if inner.hang.load(Ordering::SeqCst) {
            wait_for_close(stream, &mut buf).await;
            return;
        }
        let resp = if inner.fail.load(Ordering::SeqCst) {
            Response::text(500, "rpc error making call: No cluster leader")
        } else {
            tokio::select! {
                r = handle(inner, &req) => r,
                // The client gave up on a held request: drop it, like Consul does.
                _ = wait_for_close(stream, &mut buf) => return,
            }
        };
        let bytes = resp.encode(req.keep_alive, req.method == "HEAD");
        if stream.write_all(&bytes).await.is_err() {
            return;
        }
        if !req.keep_alive {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

fn record(inner: &Inner, req: &Request) {
    lock(&inner.stats.requests).push((req.path.clone(), req.target.clone()));
    if let Some(token) = req.header("X-Consul-Token") {
        *lock(&inner.stats.last_token) = Some(token.to_string());
    }
}

/// Returns when the peer closes (or resets) the connection. Bytes that arrive
/// meanwhile (pipelined requests) are kept in `buf` for the next round.
async fn wait_for_close(stream: &mut TcpStream, buf: &mut BytesMut) {
    loop {
        if buf.len() >= MAX_HEAD + MAX_BODY {
            // Stop reading rather than buffer without bound.
            std::future::pending::<()>().await;
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Reads one request. `Err(Some(resp))`: answer `resp` and close;
/// `Err(None)`: the peer closed, just close.
async fn read_request(
    inner: &Inner,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<Request, Option<Response>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf.split_to(end + 4);
            // The request line as it came, before any parsing: what the hostile-name tests
            // hold against the endpoints the forwarder may ask for.
            let line_end = head.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
            lock(&inner.stats.request_lines)
                .push(String::from_utf8_lossy(&head[..line_end]).into_owned());
            let req = parse_head(&head).map_err(Some)?;
            if req.chunked {
                return Err(Some(Response::text(
                    400,
                    "chunked request bodies are not supported by consul_sim",
                )));
            }
            if req.content_length > MAX_BODY {
                return Err(Some(Response::text(413, "request body too large")));
            }
            while buf.len() < req.content_length {
                match stream.read_buf(buf).await {
                    Ok(0) | Err(_) => return Err(None),
                    Ok(_) => {}
                }
            }
            buf.advance(req.content_length);
            return Ok(req);
        }
        if buf.len() > MAX_HEAD {
            return Err(Some(Response::text(431, "request head too large")));
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

fn parse_head(head: &[u8]) -> Result<Request, Response> {
    let bad = || Response::text(400, "malformed request");
    let text = std::str::from_utf8(head).map_err(|_| bad())?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().ok_or_else(bad)?.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v)) if !m.is_empty() && t.starts_with('/') => (m, t, v),
        _ => return Err(bad()),
    };
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once(':').ok_or_else(bad)?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let connection = get("connection").unwrap_or_default();
    let keep_alive = if version == "HTTP/1.0" {
        connection.contains("keep-alive")
    } else {
        !connection.contains("close")
    };
    let content_length = match get("content-length") {
        Some(v) => v.parse().map_err(|_| bad())?,
        None => 0,
    };
    let chunked = get("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let query = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k, true), decode(v, true))
        })
        .collect();
    Ok(Request {
        method: method.to_string(),
        path: decode(raw_path, false),
        target: target.to_string(),
        query,
        headers,
        keep_alive,
        content_length,
        chunked,
    })
}

/// Percent-decoding; `plus_is_space` for query components (Go's url.ParseQuery).
fn decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a Go `time.Duration` string (`"5s"`, `"100ms"`, `"1m30s"`, `"0"`).
pub(super) fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() || rest.starts_with('-') {
        return None;
    }
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        nanos += num * mult;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_nanos(nanos as u64))
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The datacenter `?dc=` asks for: ours without it, or one the catalog has nodes in (as
/// through a WAN-federated server); any other fails the way an agent without a WAN path does.
fn check_dc(inner: &Inner, req: &Request) -> Result<String, Response> {
    match req.param("dc") {
        None | Some("") => Ok(DATACENTER.to_string()),
        Some(dc) if inner.state().datacenters().contains(&dc) => Ok(dc.to_string()),
        Some(_) => Err(Response::text(500, "No path to datacenter")),
    }
}

/// Consul's blocking-query wait: when `index` > 0 is given, hold until
/// `index_of(state)` exceeds it or `wait` (default 5m, cap 10m, `0` = default)
/// plus a random jitter of up to wait/16 has passed.
async fn block(
    inner: &Inner,
    req: &Request,
    index_of: impl Fn(&State) -> u64,
) -> Result<(), Response> {
    let wait = match req.param("wait") {
        None | Some("") => DEFAULT_WAIT,
        Some(w) => parse_go_duration(w).ok_or_else(|| Response::text(400, "Invalid wait time"))?,
    };
    let min_index: u64 = match req.param("index") {
        None | Some("") => 0,
        Some(i) => i
            .parse()
            .map_err(|_| Response::text(400, "Invalid index"))?,
    };
    if min_index == 0 {
        return Ok(());
    }
    let wait = if wait.is_zero() {
        DEFAULT_WAIT
    } else {
        wait.min(MAX_WAIT)
    };
    let jitter_ns = rand::rng().random_range(0..=(wait.as_nanos() / 16) as u64);
    let deadline = tokio::time::Instant::now() + wait + Duration::from_nanos(jitter_ns);
    // Subscribe before checking, so a change between the check and the wait
    // still wakes us.
    let mut rx = inner.index_tx.subscribe();
    loop {
        if index_of(&inner.state()) > min_index {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Ok(()),
        }
    }
}

async fn handle(inner: &Arc<Inner>, req: &Request) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::text(405, format!("method {} not allowed", req.method));
    }
    let health = ["service", "connect", "ingress"]
        .into_iter()
        .find_map(|kind| {
            let prefix = format!("/v1/health/{kind}/");
            req.path.strip_prefix(&prefix).map(|name| (kind, name))
        });
    let result = if let Some((kind, name)) = health {
        health_service(inner, req, kind, name).await
    } else if req.path == "/v1/peerings" {
        // Not blocking in Consul, and no index header.
        Ok(Response::json(&inner.state().peerings_json(), None))
    } else if req.path == "/v1/partitions" || req.path == "/v1/namespaces" {
        enterprise_list(inner, req)
    } else if let Some(node) = req.path.strip_prefix("/v1/catalog/node/") {
        catalog_node(inner, req, node).await
    } else if let Some(state) = req.path.strip_prefix("/v1/health/state/") {
        health_state(inner, req, state).await
    } else if req.path == "/v1/catalog/services" {
        catalog_services(inner, req).await
    } else if req.path == "/v1/catalog/nodes" {
        catalog_nodes(inner, req).await
    } else if req.path == "/v1/catalog/datacenters" {
        // No blocking and no index on this endpoint in Consul: the WAN members' datacenters.
        Ok(Response::json(
            &Value::from(inner.state().datacenters()),
            None,
        ))
    } else if req.path == "/v1/query" {
        query_list(inner, req)
    } else if let Some(q) = req
        .path
        .strip_prefix("/v1/query/")
        .and_then(|r| r.strip_suffix("/execute"))
    {
        query_execute(inner, req, q)
    } else if req.path == "/v1/agent/self" {
        Ok(Response::json(&inner.state().agent_self_json(), None))
    } else if req.path == "/v1/status/leader" {
        // Not in the agreed list, but the usual liveness probe of Consul clients.
        Ok(Response::json(&Value::from("127.0.0.1:8300"), None))
    } else {
        // Consul's catch-all index handler: 404, empty body.
        Ok(Response::text(404, ""))
    };
    let mut response = result.unwrap_or_else(|e| e);
    consistency(inner, req, &mut response);
    response
}

/// Consul's consistency headers (api-docs/features/consistency.mdx): a `?stale` read may be
/// answered by a follower, which reports how long ago it heard from the leader; any other read
/// is the leader's own. Only responses that carry query meta (an index) get them.
fn consistency(inner: &Inner, req: &Request, response: &mut Response) {
    let Some(at) = response
        .headers
        .iter()
        .position(|(name, _)| *name == "X-Consul-Effective-Consistency")
    else {
        return;
    };
    let stale = req.param("stale").is_some();
    response.headers[at].1 = if stale { "stale" } else { "leader" }.to_string();
    let lag = if stale {
        inner.follower_lag_ms.load(Ordering::SeqCst)
    } else {
        0
    };
    for (name, value) in &mut response.headers {
        if *name == "X-Consul-LastContact" {
            *value = lag.to_string();
        }
    }
}

/// A request's `peer`, `ns` and `partition`. Consul CE refuses the two Enterprise ones, even
/// `default`, with its own message (`agent/http_ce.go`).
fn scope(inner: &Inner, req: &Request) -> Result<Scope, Response> {
    let get = |k: &str| req.param(k).unwrap_or("").to_owned();
    let scope = Scope {
        peer: get("peer"),
        ns: get("ns"),
        partition: get("partition"),
    };
    if !inner.state().enterprise {
        if !scope.ns.is_empty() {
            return Err(Response::text(
                400,
                "Invalid query parameter: \"ns\" - Namespaces are a Consul Enterprise feature",
            ));
        }
        if !scope.partition.is_empty() {
            return Err(Response::text(
                400,
                "Invalid query parameter: \"partition\" - Partitions are a Consul Enterprise feature",
            ));
        }
    }
    Ok(scope)
}

/// `/v1/partitions` and `/v1/namespaces[?partition=]`: Enterprise only; a CE agent has no such
/// endpoint (404 from its catch-all handler). Neither blocks.
fn enterprise_list(inner: &Inner, req: &Request) -> Result<Response, Response> {
    let st = inner.state();
    if !st.enterprise {
        return Err(Response::text(404, ""));
    }
    let body = if req.path == "/v1/partitions" {
        st.partitions_json()
    } else {
        let partition = match req.param("partition") {
            None | Some("") => "default",
            Some(p) => p,
        };
        st.namespaces_json(partition)
    };
    Ok(Response::json(&body, Some(st.index)))
}

/// `/v1/health/{service,connect,ingress}/<name>`: the same parameters and entry shape for all
/// three (Consul's docs), each with its own selection of instances.
async fn health_service(
    inner: &Inner,
    req: &Request,
    kind: &str,
    name: &str,
) -> Result<Response, Response> {
    if name.is_empty() {
        return Err(Response::text(400, "Missing service name"));
    }
    let dc = check_dc(inner, req)?;
    let scope = scope(inner, req)?;
    // Real Consul: bare `?passing` = true, otherwise strconv.ParseBool, so
    // `passing=false` does not filter and garbage is a 400.
    let passing = match req.param("passing") {
        None => false,
        Some("") => true,
        Some(v) => {
            parse_go_bool(v).ok_or_else(|| Response::text(400, "Invalid value for ?passing"))?
        }
    };
    let tags = req.params("tag");
    // A proxy or gateway changes under its own name: those views follow every table.
    let index_of = |st: &State| match kind {
        "service" => st.service_idx(name),
        _ => st
            .services_index
            .max(st.checks_index)
            .max(st.nodes_index)
            .max(1),
    };
    block(inner, req, index_of).await?;
    let st = inner.state();
    let body = st.health_json(kind, (&dc, &scope), name, passing, &tags);
    Ok(Response::json(&body, Some(index_of(&st))))
}

/// `/v1/health/state/<state>`: every check in that state (`any` = all), with
/// the checks table index, blocking on it. Consul's `?filter` (a bexpr
/// expression) is not implemented: rather than answer as if it were applied,
/// the simulator refuses it, so a client that relies on it cannot pass here and
/// fail against Consul. Likewise `?ns`/`?partition` (Enterprise) are not
/// supported.
async fn health_state(inner: &Inner, req: &Request, state: &str) -> Result<Response, Response> {
    use super::Status;
    let wanted = match state {
        "any" => None,
        "passing" => Some(Status::Passing),
        "warning" => Some(Status::Warning),
        "critical" => Some(Status::Critical),
        "" => return Err(Response::text(400, "Missing check state")),
        // No client of this project asks for another state; refusing it keeps a typo from
        // looking like "no checks in that state".
        _ => return Err(Response::text(400, "consul_sim: unknown check state")),
    };
    if req.param("filter").is_some() {
        return Err(Response::text(
            400,
            "consul_sim: ?filter is not implemented by the simulator",
        ));
    }
    let dc = check_dc(inner, req)?;
    let denied = || {
        inner
            .health_state_denied
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    if denied() {
        return Err(Response::text(403, "Permission denied"));
    }
    block(inner, req, |st| st.checks_index).await?;
    // Consul checks the token again when a blocking query wakes.
    if denied() {
        return Err(Response::text(403, "Permission denied"));
    }
    let st = inner.state();
    Ok(Response::json(
        &st.health_state_json(&dc, wanted),
        Some(st.checks_index),
    ))
}

async fn catalog_node(inner: &Inner, req: &Request, node: &str) -> Result<Response, Response> {
    if node.is_empty() {
        return Err(Response::text(400, "Missing node name"));
    }
    let dc = check_dc(inner, req)?;
    let scope = scope(inner, req)?;
    block(inner, req, State::node_idx).await?;
    let st = inner.state();
    Ok(Response::json(
        &st.catalog_node_json(&dc, &scope, node),
        Some(st.node_idx()),
    ))
}

async fn catalog_services(inner: &Inner, req: &Request) -> Result<Response, Response> {
    let dc = check_dc(inner, req)?;
    let scope = scope(inner, req)?;
    block(inner, req, |st| st.services_index).await?;
    let delay = *inner.list_delay.lock().expect("list delay");
    if !delay.is_zero() {
        // A large catalog on a loaded agent (see `ConsulSim::set_list_delay`).
        tokio::time::sleep(delay).await;
    }
    let answer = {
        let st = inner.state();
        Response::json(
            &st.catalog_services_json(&dc, &scope),
            Some(st.services_index),
        )
    };
    let transit = *inner.list_transit.lock().expect("list transit");
    if !transit.is_zero() {
        // Made now, received later (see `ConsulSim::set_list_transit`).
        tokio::time::sleep(transit).await;
    }
    Ok(answer)
}

/// `/v1/catalog/nodes`: every node, blocking on the nodes table's index.
async fn catalog_nodes(inner: &Inner, req: &Request) -> Result<Response, Response> {
    let dc = check_dc(inner, req)?;
    let scope = scope(inner, req)?;
    block(inner, req, |st| st.nodes_index.max(1)).await?;
    let st = inner.state();
    Ok(Response::json(
        &st.catalog_nodes_json(&dc, &scope),
        Some(st.nodes_index.max(1)),
    ))
}

/// `/v1/query`: every prepared query's definition (no blocking in Consul). Refused with 403
/// while [`super::ConsulSim::set_query_list_denied`] is on, as Consul answers a token without
/// `query:read`.
fn query_list(inner: &Inner, req: &Request) -> Result<Response, Response> {
    let dc = check_dc(inner, req)?;
    if inner
        .query_list_denied
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return Err(Response::text(403, "Permission denied"));
    }
    let st = inner.state();
    Ok(Response::json(&st.query_list_json(&dc), Some(st.index)))
}

/// Prepared queries do not support blocking in Consul; executed immediately.
fn query_execute(inner: &Inner, req: &Request, name: &str) -> Result<Response, Response> {
    let dc = check_dc(inner, req)?;
    let st = inner.state();
    // Every prepared query is our datacenter's.
    let q = st
        .find_query(name)
        .filter(|_| dc == DATACENTER)
        .ok_or_else(|| Response::text(404, "Query not found"))?;
    Ok(Response::json(&st.query_execute_json(q), Some(st.index)))
}
