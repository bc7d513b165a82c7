//! A real `chatlog serve` process for black-box tests: started on a free 127.0.0.1 port
//! below the ephemeral range (`port.rs`, so a restart on the same address cannot find it
//! taken by another test's connection) with its own data directory, its client address read from the `clients: ADDR` line it
//! prints, killed (SIGKILL) and reaped when dropped.
//!
//! Included with `#[path = "common/server.rs"] mod server;` by the tests that need it;
//! not every test uses every item.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

// Both `server.rs` and `cluster.rs` include it; a test may include both.
#[allow(clippy::duplicate_mod)]
#[path = "port.rs"]
mod port;

/// A running server process.
pub struct Server {
    /// The process.
    pub child: Child,
    /// Its client address.
    pub addr: String,
    /// Its HTTP address, when started with `--http`.
    pub http: Option<String>,
}

/// Flags that turn the rate limits off: tests that put many users' worth of load on one
/// user or connection use them (the limits have their own test in `tests/serve.rs`).
pub const NO_RATE_LIMITS: [&str; 4] = ["--user-sends-per-sec", "0", "--conn-requests-per-sec", "0"];

impl Server {
    /// `chatlog serve --listen 127.0.0.1:PORT --groups 4 --data-dir DIR EXTRA...` with a
    /// free port below the ephemeral range.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        Server::start_on(dir, "127.0.0.1:0", extra)
    }

    /// The same on client address `listen` (to restart a server where it was).
    pub fn start_on(dir: &Path, listen: &str, extra: &[&str]) -> Server {
        Server::start_env(dir, listen, extra, &[])
    }

    /// The same with more environment variables. Port 0 in `listen` becomes a free port
    /// below the ephemeral range (`port.rs`), so the server can be restarted where it was.
    pub fn start_env(dir: &Path, listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let listen = match listen.strip_suffix(":0") {
            Some(host) => format!("{host}:{}", port::free_port()),
            None => listen.to_string(),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatlog"))
            .args(["serve", "--listen", &listen, "--groups", "4", "--data-dir"])
            .arg(dir)
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .env_remove("CHATLOG_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("chatlog serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut http = None;
        let addr = loop {
            let line = lines
                .next()
                .expect("the server announces its address before exiting")
                .expect("stdout reads");
            if let Some(a) = line.strip_prefix("http: ") {
                http = Some(a.trim().to_string());
            } else if let Some(a) = line.strip_prefix("clients: ") {
                break a.trim().to_string();
            }
        };
        Server { child, addr, http }
    }

    /// Waits (at most `within`) until the HTTP port's `/ready` answers 200: every local
    /// group has a leader. Panics if the server was started without `--http`.
    pub async fn wait_ready(&self, within: std::time::Duration) {
        let http = self.http.as_deref().expect("started with --http");
        let deadline = std::time::Instant::now() + within;
        while chatlog::http::client::request(http, "GET", "/ready", None, None, within)
            .await
            .map_or(true, |r| r.status != 200)
        {
            assert!(std::time::Instant::now() < deadline, "not ready in time");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// `GET path` on the HTTP port; panics unless it answers 200. Returns the body.
    pub async fn http_get(&self, path: &str, within: std::time::Duration) -> String {
        let http = self.http.as_deref().expect("started with --http");
        let r = chatlog::http::client::request(http, "GET", path, None, None, within)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.text()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
