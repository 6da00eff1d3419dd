//! The status page in a real browser: headless Chromium (Debian's `chromium`, which
//! scripts/test.sh installs) loads `/`, follows a service's explain link, and shows what a
//! health flip changed, as the DOM it built says. A screenshot of each page is left under
//! target/tmp for the record (docs/status-page.png is one of them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

use crate::support::consul_sim::{ConsulSim, Status};
use crate::support::upstream::TestUpstream;
use crate::support::*;

/// How long one Chromium run may take.
const BROWSER_TIMEOUT: &str = "60";

/// Chromium's run for `url`: the DOM after load (`--dump-dom`), or a screenshot to `shot`.
async fn chromium(url: String, shot: Option<PathBuf>) -> String {
    tokio::task::spawn_blocking(move || {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut cmd = Command::new("timeout");
        cmd.args([
            BROWSER_TIMEOUT,
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args([
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1100,700",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()));
        match &shot {
            Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
            None => cmd.arg("--dump-dom"),
        };
        let out = cmd
            .arg(&url)
            .output()
            .expect("chromium runs (scripts/test.sh installs Debian's chromium)");
        assert!(
            out.status.success(),
            "chromium {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .expect("join")
}

/// The text of each cell of the first table row whose markup contains `marker`.
fn row_cells(dom: &str, marker: &str) -> Vec<String> {
    let row = dom
        .split("<tr")
        .find(|r| r.contains(marker))
        .unwrap_or_else(|| panic!("no row with {marker} in {dom}"));
    let row = row.split("</tr>").next().unwrap_or("");
    row.split("<td")
        .skip(1)
        .map(|cell| {
            let inner = cell.split_once('>').map_or("", |(_, rest)| rest);
            let inner = inner.split("</td>").next().unwrap_or("");
            let mut text = String::new();
            let mut in_tag = false;
            for c in inner.chars() {
                match c {
                    '<' => in_tag = true,
                    '>' => in_tag = false,
                    c if !in_tag => text.push(c),
                    _ => {}
                }
            }
            text
        })
        .collect()
}

/// The href of the link whose text is `text`, made absolute.
fn link(dom: &str, text: &str, base: SocketAddr) -> String {
    let end = dom
        .find(&format!(">{text}</a>"))
        .unwrap_or_else(|| panic!("no link {text} in {dom}"));
    let start = dom[..end].rfind("href=\"").expect("href") + "href=\"".len();
    let href = dom[start..end].trim_end_matches('"').replace("&amp;", "&");
    format!("http://{base}{href}")
}

fn shot(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

#[tokio::test]
async fn status_page_and_explain_links_in_chromium_follow_a_health_flip() {
    let sim = ConsulSim::start().await;
    sim.add_instance("web-1", "web", "n1", "127.0.0.2", 8080, Status::Passing);
    sim.add_instance("web-2", "web", "n2", "127.0.0.3", 8080, Status::Passing);
    sim.add_instance("web-3", "web", "n3", "127.0.0.4", 8080, Status::Critical);
    sim.set_service_check_output(
        "web-3",
        Status::Critical,
        "HTTP GET http://127.0.0.4:8080/health: 503",
    );
    let up = TestUpstream::start().await;
    let toml = TestConfig::new()
        .upstream(up.addr)
        .consul_http(sim.http_url())
        .metrics_listen("127.0.0.1:0")
        .toml();
    let server = TestServer::start(&toml).await;
    let endpoint = server.metrics_addr.expect("endpoint");
    // A client's question makes the view the page lists.
    let reply = ask(server.addr, "web.service.consul", RecordType::A).await;
    assert_eq!(addresses(&reply).len(), 2);

    let home = format!("http://{endpoint}/");
    let dom = chromium(home.clone(), None).await;
    assert_eq!(
        row_cells(&dom, ">web.service.consul<")[..5],
        ["web.service.consul", "local", "2", "0", "1"]
    );
    let explain = link(&dom, "web.service.consul", endpoint);
    let page = chromium(explain.clone(), None).await;
    let n3 = row_cells(&page, "<td>n3</td>");
    assert_eq!(n3[0], "no");
    assert_eq!(
        n3[5],
        "left out: critical check \"Service 'web' check\" on node n3"
    );
    assert!(
        n3[6].contains("HTTP GET http://127.0.0.4:8080/health: 503"),
        "{n3:?}"
    );
    assert_eq!(row_cells(&page, "<td>n1</td>")[0], "yes");
    let _ = chromium(home.clone(), Some(shot("status-page.png"))).await;

    // n1's check fails: the page shows it once the view has it (the watcher's blocking query
    // returns at once).
    sim.set_service_check("web-1", Status::Critical);
    let deadline = Instant::now() + Duration::from_secs(10);
    while addresses(&ask(server.addr, "web.service.consul", RecordType::A).await).len() != 1 {
        assert!(
            Instant::now() < deadline,
            "the flip never reached the answers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dom = chromium(home, None).await;
    assert_eq!(
        row_cells(&dom, ">web.service.consul<")[2..5],
        ["1", "0", "2"]
    );
    let page = chromium(explain.clone(), None).await;
    let n1 = row_cells(&page, "<td>n1</td>");
    assert_eq!(n1[0], "no");
    assert_eq!(
        n1[5],
        "left out: critical check \"Service 'web' check\" on node n1"
    );
    let _ = chromium(explain, Some(shot("explain-page.png"))).await;
    assert!(shot("status-page.png").exists() && shot("explain-page.png").exists());
    server.stop().await;
}
