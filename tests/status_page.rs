//! Black-box: the status page at `/` on the HTTP port of real `chatlog serve` processes,
//! loaded in headless Chromium (Debian's `chromium` package) and checked for what a person
//! sees: the summary line, every group with its leader, the nodes up or down, the disk
//! sizes, the admin-token rule, and a node shown down after SIGKILL and up again after its
//! restart (the page reloads itself; each check here is a fresh load, the same request the
//! reload makes).
//!
//! Chromium is required, not optional: when it is missing the tests install it with
//! `scripts/install-chromium` (as `.ci/run` does up front), and where that cannot work
//! (not root, no passwordless sudo) they FAIL with a message saying how to install it. A
//! skipped browser test would pass on every machine that lacks the browser, which is
//! exactly where nobody notices.
//! `CHROMIUM=/path/to/binary` picks another build.
//!
//! Every wait has a deadline, so a bug fails the test instead of hanging it.

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::{Cluster, Options};
use server::Server;

/// Longest one Chromium run may take (a cold start on a busy 2-core machine).
const BROWSER_WAIT: Duration = Duration::from_secs(90);
/// Longest the page may take to show what a check waits for (an election, a node seen
/// down after three missed heartbeats, a restart).
const PAGE_WAIT: Duration = Duration::from_secs(60);

/// The Chromium binary: `CHROMIUM`, else `chromium` on the PATH. Panics with how to
/// install it when there is none.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "CHROMIUM={} is not a file", p.display());
        return p;
    }
    let find = || {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("chromium"))
                .find(|p| p.is_file())
        })
    };
    // Missing: the project installs it (`scripts/install-chromium`, once per run of
    // this file's tests), so `cargo test --workspace` works on a fresh machine too.
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let found = find().or_else(|| {
        let ok = *INSTALLED.get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-chromium");
            eprintln!("chromium is missing: running {}", script.display());
            Command::new(script).status().is_ok_and(|s| s.success())
        });
        if ok { find() } else { None }
    });
    found.unwrap_or_else(|| {
        panic!(
            "chromium is not installed, and the status page tests need it: install Debian's \
             `chromium` package (`scripts/install-chromium` could not: see its message \
             above) or set CHROMIUM=/path/to/chromium"
        )
    })
}

/// Runs headless Chromium on `url` with `what` (`--dump-dom` or `--screenshot=FILE`);
/// returns its standard output.
fn browse(profile: &Path, url: &str, what: &str) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(what)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).expect("chromium's output reads");
        out
    });
    let deadline = Instant::now() + BROWSER_WAIT;
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish loading {url} within {BROWSER_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().expect("reader")
}

/// The page as Chromium rendered it (its DOM after loading).
fn load(profile: &Path, url: &str) -> Page {
    Page {
        dom: browse(profile, url, "--dump-dom"),
    }
}

/// A loaded page, read the way a person reads it: text, not markup.
struct Page {
    dom: String,
}

/// The visible text of an HTML fragment: tags dropped, entities decoded, spaces collapsed.
fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    let out = out
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
        .replace('\u{a0}', " ");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Page {
    /// The element whose opening tag contains `marker`, up to its closing `</tag>`.
    fn element(&self, marker: &str, tag: &str) -> Option<&str> {
        let at = self.dom.find(marker)?;
        let start = self.dom[..at + marker.len()].rfind(&format!("<{tag}"))?;
        let end = self.dom[at..].find(&format!("</{tag}>"))? + at;
        Some(&self.dom[start..end])
    }

    fn title(&self) -> String {
        self.element("<title", "title")
            .map(text)
            .unwrap_or_default()
    }

    fn summary(&self) -> String {
        self.element("id=\"summary\"", "p")
            .map(text)
            .unwrap_or_default()
    }

    /// The text of each cell of the table row with `attribute` (e.g. `data-group="2"`).
    fn row(&self, attribute: &str) -> Option<Vec<String>> {
        let row = self.element(attribute, "tr")?;
        Some(
            row.split("<td")
                .skip(1)
                .map(|c| text(&format!("<td{c}")))
                .collect(),
        )
    }

    /// Node `id`'s state cell: `up`, `DOWN` or `unknown`.
    fn node_state(&self, id: u64) -> Option<String> {
        self.row(&format!("data-node=\"{id}\""))
            .map(|r| r[2].clone())
    }

    /// Group `g`'s leader cell (`node N` or `none`).
    fn group_leader(&self, g: u64) -> Option<String> {
        self.row(&format!("data-group=\"{g}\""))
            .map(|r| r[1].clone())
    }
}

/// Loads `url` until `good` holds, or panics with the last page after [`PAGE_WAIT`].
fn wait_for(profile: &Path, url: &str, what: &str, good: impl Fn(&Page) -> bool) -> Page {
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let page = load(profile, url);
        if good(&page) {
            return page;
        }
        if Instant::now() > deadline {
            panic!(
                "the page at {url} did not show {what} within {PAGE_WAIT:?}; last seen:\n{}",
                text(&page.dom)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn one_node_page_shows_the_summary_every_group_and_disk_sizes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = tempfile::tempdir().expect("browser profile");
    let server = Server::start(&dir.path().join("data"), &["--http", "127.0.0.1:0"]);
    let url = format!("http://{}/", server.http.as_deref().expect("http address"));

    let page = wait_for(profile.path(), &url, "every group with a leader", |p| {
        p.summary().contains("all with a leader")
    });
    assert_eq!(page.title(), "chatlog node 1: status");
    assert!(
        page.summary()
            .starts_with("node 1: 5 groups, all with a leader; 5 led here"),
        "{}",
        page.summary()
    );
    assert!(
        page.dom
            .contains("<meta http-equiv=\"refresh\" content=\"5\">")
    );
    // Groups 0 (the controller) to 4, each led by node 1, with a size on disk.
    for g in 0..=4 {
        let row = page
            .row(&format!("data-group=\"{g}\""))
            .unwrap_or_else(|| panic!("no row for group {g}:\n{}", text(&page.dom)));
        assert_eq!(row[0], g.to_string());
        assert_eq!(row[1], "node 1", "group {g}: {row:?}");
        assert_eq!(row[2], "leader", "group {g}: {row:?}");
        let disk = &row[9];
        assert!(
            disk.ends_with(" B") || disk.ends_with("KiB") || disk.ends_with("MiB"),
            "group {g}'s disk cell {disk:?}"
        );
        assert_ne!(disk, "0 B", "group {g} holds entries since its election");
        assert_eq!(row[10], "", "group {g} shows no problem: {row:?}");
    }
    let me = page.row("data-node=\"1\"").expect("node 1's row");
    assert_eq!(me[0], "1 (this node)");
    assert_eq!(me[2], "up");
    assert_eq!(me[3], env!("CARGO_PKG_VERSION"));
    let disk = page
        .element("id=\"disk\"", "p")
        .map(text)
        .expect("the disk line");
    // Preallocated segment files: at least one of 64 MiB.
    assert!(
        disk.starts_with("disk: data directory ") && disk.contains("MiB") && disk.contains("free"),
        "{disk}"
    );
    // The node has written (the groups' elections): its write latencies are known.
    let latency = page
        .element("id=\"latency\"", "p")
        .map(text)
        .expect("the latency line");
    assert!(
        latency.starts_with("write latency p99 ≤ ") && latency.contains("fdatasync p99 ≤ "),
        "{latency}"
    );
    let changes = page.element("id=\"changes\"", "ul").map(text);
    assert_eq!(changes.as_deref(), Some("none"));

    // A person looks at it: the screenshot is a real picture of some size.
    let shot = dir.path().join("status.png");
    browse(
        profile.path(),
        &url,
        &format!("--screenshot={}", shot.display()),
    );
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        png.len() > 10_000,
        "a {}-byte screenshot is blank",
        png.len()
    );
}

#[test]
fn the_page_takes_the_admin_token_as_a_browser_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = tempfile::tempdir().expect("browser profile");
    let server = Server::start(
        &dir.path().join("data"),
        &["--http", "127.0.0.1:0", "--admin-token", "s3cr3t<&>"],
    );
    let http = server.http.clone().expect("http address");
    // Without credentials (headless Chromium cannot answer the login prompt) and with a
    // wrong password, nothing of the status shows.
    for url in [
        format!("http://{http}/"),
        format!("http://admin:wrong@{http}/"),
    ] {
        let page = load(profile.path(), &url);
        assert!(
            !page.dom.contains("id=\"summary\""),
            "{url} showed the status without the token:\n{}",
            page.dom
        );
    }
    // The token as the password of the browser's Basic prompt (percent-encoded in the URL).
    let page = wait_for(
        profile.path(),
        &format!("http://admin:s3cr3t%3C%26%3E@{http}/"),
        "the status page",
        |p| p.summary().contains("all with a leader"),
    );
    assert_eq!(page.title(), "chatlog node 1: status");
}

#[test]
fn cluster_page_shows_a_killed_node_down_and_back_after_its_restart() {
    let profile = tempfile::tempdir().expect("browser profile");
    let mut c = Cluster::start(Options {
        http: true,
        ..Options::default()
    });
    let url = format!("http://{}/", c.http_addr(1));
    let all_up = |p: &Page| (1..=3).all(|n| p.node_state(n).as_deref() == Some("up"));
    let every_group_led = |p: &Page| {
        p.summary().contains("all with a leader")
            && (0..=4).all(|g| {
                p.group_leader(g)
                    .is_some_and(|l| ["node 1", "node 2", "node 3"].contains(&l.as_str()))
            })
    };

    let page = wait_for(profile.path(), &url, "3 nodes up, 5 groups led", |p| {
        all_up(p) && every_group_led(p)
    });
    assert!(
        page.summary()
            .starts_with("node 1: 5 groups, all with a leader"),
        "{}",
        page.summary()
    );
    for g in 0..=4 {
        let row = page.row(&format!("data-group=\"{g}\"")).expect("row");
        assert_eq!(row[6], "1, 2, 3", "group {g}'s replicas: {row:?}");
    }
    let peer = page.row("data-node=\"3\"").expect("node 3's row");
    assert!(
        peer[1].starts_with("127.0.0.1:"),
        "node 3's address: {peer:?}"
    );
    // Every node's release, the peers' as they reported it in the node handshake.
    for n in 1..=3 {
        let row = page.row(&format!("data-node=\"{n}\"")).expect("row");
        assert_eq!(
            row[3],
            env!("CARGO_PKG_VERSION"),
            "node {n}'s version: {row:?}"
        );
    }

    // SIGKILL node 3: the page shows it down, in the summary and in its row, while the
    // groups keep (or re-elect) a leader among nodes 1 and 2.
    c.kill(3);
    let page = wait_for(profile.path(), &url, "node 3 down", |p| {
        p.node_state(3).as_deref() == Some("DOWN")
            && p.summary().contains("nodes down: 3")
            && every_group_led(p)
    });
    assert_eq!(page.node_state(1).as_deref(), Some("up"));
    assert_eq!(page.node_state(2).as_deref(), Some("up"));
    let down = page.element("data-node=\"3\"", "tr").expect("row");
    assert!(down.starts_with("<tr class=\"down\""), "{down}");
    assert!(page.dom.contains("class=\"summary bad\""));

    // Restart it: back up, and the summary no longer names it.
    c.restart(3);
    let page = wait_for(profile.path(), &url, "node 3 up again", |p| {
        all_up(p) && !p.summary().contains("nodes down") && every_group_led(p)
    });
    assert!(page.dom.contains("class=\"summary ok\""));
}
