//! The status page at `GET /` on the HTTP port: what `chatlog admin status` shows, as
//! one server-rendered HTML page for a person on call. No script, no external asset, no
//! build step; it reloads itself every [`REFRESH_SECS`] (`<meta http-equiv="refresh">`).
//!
//! What it owns: rendering the JSON of `/admin/status` (so the page and the CLI show the
//! same facts from the same source) into HTML, escaping every value, and the page's
//! admin check: the `/admin/status` rule (loopback peers only without `--admin-token`;
//! with one, `Authorization: Bearer TOKEN`), plus HTTP Basic authentication with the
//! token as the password, because a browser cannot send a Bearer header but asks for
//! Basic credentials itself after a `401` with `WWW-Authenticate: Basic`.
//! What it must not do: gather facts of its own (everything comes from the status JSON),
//! or put any value into the page unescaped.

use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::HttpContext;
use super::disk::human_bytes;

/// Seconds between reloads of the page. Why: `status` changes within a heartbeat or an
/// election (at most a few seconds); five seconds keeps a node shown down at most that
/// much later than it is, at one cheap status call per open page.
pub const REFRESH_SECS: u64 = 5;

/// Longest `Authorization` header value decoded. Why: a Basic header carrying a token is
/// a few hundred bytes; anything longer is refused before it is decoded.
pub const AUTHORIZATION_BYTES_MAX: usize = 4096;

/// The admin check of the page: `/admin/status`'s rule, or Basic credentials whose
/// password is the admin token (any user name).
#[allow(clippy::result_large_err)]
pub fn authorize(ctx: &HttpContext, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Response> {
    if let Some(expected) = &ctx.admin_token
        && let Some(password) = basic_password(headers)
    {
        if super::constant_time_eq(password.as_bytes(), expected.as_bytes()) {
            return Ok(());
        }
        return Err(ask_for_credentials("wrong admin token"));
    }
    super::authorize(ctx, peer, headers).map_err(|r| {
        if r.status() == StatusCode::UNAUTHORIZED {
            ask_for_credentials(
                "this page needs the node's admin token: as the password of the browser's \
                 login prompt (any user name), or as `Authorization: Bearer TOKEN`",
            )
        } else {
            r
        }
    })
}

/// A `401` that makes a browser ask for a user name and password.
fn ask_for_credentials(message: &str) -> Response {
    let mut r = (StatusCode::UNAUTHORIZED, format!("{message}\n")).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"chatlog admin\", charset=\"UTF-8\""),
    );
    r
}

/// The password of an `Authorization: Basic …` header, if there is a well-formed one.
fn basic_password(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    if value.len() > AUTHORIZATION_BYTES_MAX {
        return None;
    }
    let encoded = std::str::from_utf8(value)
        .ok()?
        .strip_prefix("Basic ")?
        .trim();
    let decoded = String::from_utf8(base64_decode(encoded)?).ok()?;
    decoded.split_once(':').map(|(_, p)| p.to_owned())
}

/// Standard base64 with padding (RFC 4648 §4); `None` on anything else.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let last = i + 1 == bytes.len() / 4;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = n << 6 | value(c)?;
        }
        n <<= 6 * pad as u32;
        let three = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&three[..3 - pad]);
    }
    Some(out)
}

/// The page as an HTTP answer.
pub fn response(status: &Value) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        render(status, now_utc()),
    )
        .into_response()
}

/// `HH:MM:SS UTC` of the server's clock now, for "as of" on the page.
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Escapes text for HTML element content and double-quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as escaped text for a table cell: `-` for null or absent.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => escape(s),
        other => escape(&other.to_string()),
    }
}

/// A list of numbers (`[1, 2]`) as `1, 2`, or `-` when empty.
fn list(v: &Value) -> String {
    let items: Vec<String> = v.as_array().into_iter().flatten().map(cell).collect();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// An upper bucket bound in seconds as `≤ 5 ms` (`"+Inf"`: past the last bound); `-`
/// without observations.
fn latency(v: &Value) -> String {
    if v.as_str() == Some("+Inf") {
        return "> 10 s".into();
    }
    let Some(s) = v.as_f64() else {
        return "-".into();
    };
    // Bucket bounds are whole microseconds: print from those, free of float artefacts.
    let us = (s * 1e6).round() as u64;
    match us {
        us if us < 1_000 => format!("≤ {us} µs"),
        us if us < 1_000_000 => format!("≤ {} ms", us as f64 / 1e3),
        us => format!("≤ {} s", us as f64 / 1e6),
    }
}

fn duration_for_people(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s / 60 % 60),
        s => format!("{} d {} h", s / 86_400, s / 3600 % 24),
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#1b1b1b}\
h1{font-size:1.5em;margin:0 0 .3em}h2{font-size:1.15em;margin:1.2em 0 .4em}\
.summary{font-size:1.15em;padding:.5em .8em;border-radius:4px}\
.ok{background:#e3f4e1}.bad{background:#fbe2e0}.meta{color:#555}\
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.25em .6em;\
text-align:left}th{background:#f2f2f2}td.num{text-align:right}\
tr.down td,tr.noleader td{background:#fbe2e0}.state-down{color:#b00;font-weight:bold}\
.state-up{color:#070}";

/// Renders the page from the JSON of `/admin/status`.
pub fn render(status: &Value, now: String) -> String {
    let node = &status["node"];
    let summary = status["summary"].as_str().unwrap_or("(no summary)");
    let healthy = !summary.contains("without a leader") && !summary.contains("nodes down");
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>chatlog node {id}: status</title><style>{STYLE}</style></head><body>\n\
         <h1>chatlog node {id}</h1>\n\
         <p id=\"summary\" class=\"summary {class}\">{summary}</p>\n",
        id = cell(&node["id"]),
        class = if healthy { "ok" } else { "bad" },
        summary = escape(summary),
    );
    let disk_free = node["disk_free_bytes"]
        .as_u64()
        .map_or_else(|| "-".to_owned(), human_bytes);
    let _ = write!(
        h,
        "<p class=\"meta\" id=\"node\">version {version} · up {uptime} · clients {clients} · \
         HTTP {http} · I/O backend {backend} · {connections} client connections</p>\n\
         <p class=\"meta\" id=\"disk\">disk: data directory {data}{partial} · segment files \
         {segments} · free {free}</p>\n\
         <p class=\"meta\" id=\"latency\">write latency p99 {append} (submit to \
         durable) · fdatasync p99 {sync}</p>\n\
         <p class=\"meta\">as of {now} (reloads every {REFRESH_SECS} s)</p>\n",
        version = cell(&node["version"]),
        uptime = duration_for_people(node["uptime_s"].as_u64().unwrap_or(0)),
        clients = cell(&node["clients_addr"]),
        http = cell(&node["http_addr"]),
        backend = cell(&node["io_backend"]),
        connections = cell(&node["client_connections"]),
        data = human_bytes(node["data_dir_bytes"].as_u64().unwrap_or(0)),
        partial = if node["data_dir_complete"].as_bool() == Some(false) {
            " (at least)"
        } else {
            ""
        },
        segments = human_bytes(node["disk_bytes"].as_u64().unwrap_or(0)),
        free = disk_free,
        append = latency(&node["append_latency_p99_s"]),
        sync = latency(&node["sync_latency_p99_s"]),
        now = escape(&now),
    );

    // Nodes.
    h.push_str(
        "<h2>Nodes</h2>\n<table id=\"nodes\"><tr><th>Node</th><th>Peer address</th>\
         <th>State</th><th>Version</th><th>Last heard</th></tr>\n",
    );
    for n in status["nodes"].as_array().into_iter().flatten() {
        let me = n["self"].as_bool() == Some(true);
        let (state, class) = match n["up"].as_bool() {
            Some(true) => ("up", "up"),
            Some(false) => ("DOWN", "down"),
            None => ("unknown", "unknown"),
        };
        let heard = if me {
            "-".to_owned()
        } else {
            n["last_ack_ms"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms ago"))
        };
        let _ = writeln!(
            h,
            "<tr class=\"{class}\" data-node=\"{id}\"><td>{id}{this}</td><td>{addr}</td>\
             <td class=\"state-{class}\">{state}</td><td>{version}</td><td>{heard}</td></tr>",
            id = cell(&n["id"]),
            this = if me { " (this node)" } else { "" },
            addr = cell(&n["peer_addr"]),
            version = cell(&n["version"]),
        );
    }
    h.push_str("</table>\n");

    // Groups (the replicas on this node).
    h.push_str(
        "<h2>Groups on this node</h2>\n<table id=\"groups\"><tr><th>Group</th><th>Leader</th>\
         <th>Role here</th><th>Term</th><th>Committed</th><th>Applied</th><th>Replicas</th>\
         <th>Learners</th><th>Follower lag (entries)</th><th>Disk here (estimate)</th>\
         <th>Problem</th><th>Commit p99</th></tr>\n",
    );
    for g in status["groups"].as_array().into_iter().flatten() {
        let leader = match g["leader"].as_u64() {
            Some(l) => format!("node {l}"),
            None => "none".into(),
        };
        let lag: Vec<String> = g["followers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| format!("node {}: {}", cell(&f["node"]), cell(&f["lag"])))
            .collect();
        let problem = if !g["fatal"].is_null() {
            format!("stopped: {}", cell(&g["fatal"]))
        } else if g["leader"].is_null() {
            "no leader".into()
        } else {
            String::new()
        };
        let _ = writeln!(
            h,
            "<tr class=\"{class}\" data-group=\"{id}\"><td>{id}</td><td>{leader}</td>\
             <td>{role}</td><td class=\"num\">{term}</td><td class=\"num\">{committed}</td>\
             <td class=\"num\">{applied}</td><td>{replicas}</td><td>{learners}</td>\
             <td>{lag}</td><td class=\"num\">{disk}</td><td>{problem}</td>\
             <td class=\"num\">{commit}</td></tr>",
            class = if problem.is_empty() {
                "led"
            } else {
                "noleader"
            },
            id = cell(&g["id"]),
            role = cell(&g["role"]),
            term = cell(&g["term"]),
            committed = cell(&g["committed"]),
            applied = cell(&g["applied"]),
            replicas = list(&g["replicas"]),
            learners = list(&g["learners"]),
            lag = if lag.is_empty() {
                "-".into()
            } else {
                lag.join(", ")
            },
            disk = human_bytes(g["disk_bytes"].as_u64().unwrap_or(0)),
            commit = latency(&g["commit_latency_p99_s"]),
        );
    }
    h.push_str("</table>\n");

    // Changes in progress (the placement replicated in group 0).
    h.push_str("<h2>Changes in progress</h2>\n<ul id=\"changes\">");
    let placement = &status["placement"];
    let mut any = false;
    for m in placement["moves"].as_array().into_iter().flatten() {
        any = true;
        let _ = write!(
            h,
            "<li>replica move: group {} from node {} to node {}, step {}</li>",
            cell(&m["group"]),
            cell(&m["from"]),
            cell(&m["to"]),
            cell(&m["step"])
        );
    }
    for t in placement["leader_transfers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        any = true;
        let _ = write!(
            h,
            "<li>leader transfer: group {} to node {}</li>",
            cell(&t["group"]),
            cell(&t["to"])
        );
    }
    for m in placement["members"].as_array().into_iter().flatten() {
        if m["draining"].as_bool() == Some(true) {
            any = true;
            let _ = write!(h, "<li>node {} is draining</li>", cell(&m["id"]));
        }
    }
    if !any {
        h.push_str("<li>none</li>");
    }
    let _ = write!(
        h,
        "</ul>\n<p class=\"meta\">placement version {} · {} chat groups · JSON: \
         <a href=\"/admin/status\">/admin/status</a> · <a href=\"/metrics\">/metrics</a></p>\n\
         </body></html>\n",
        cell(&placement["version"]),
        cell(&placement["chat_groups"]),
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_value_is_escaped() {
        let evil = "<script>alert('x')</script>&\"";
        let v = json!({
            "node": {"id": 1, "version": evil, "clients_addr": evil, "http_addr": evil,
                     "io_backend": evil, "client_connections": 0},
            "summary": evil,
            "nodes": [{"id": 1, "self": true, "up": true, "peer_addr": evil, "version": evil}],
            "groups": [{"id": 0, "role": evil, "leader": null, "term": 1, "replicas": [1],
                        "learners": [], "followers": [], "fatal": evil, "disk_bytes": 4096}],
            "placement": {"moves": [{"group": 0, "from": 1, "to": 2, "step": evil}],
                          "members": [], "leader_transfers": [], "version": 1,
                          "chat_groups": 3},
        });
        let page = render(&v, evil.into());
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"));
        assert!(page.contains("stopped: &lt;script"));
        assert!(page.contains("4.0 KiB"));
        assert!(page.contains("<li>replica move: group 0 from node 1 to node 2, step &lt;script"));
    }

    #[test]
    fn down_nodes_and_leaderless_groups_stand_out() {
        let v = json!({
            "node": {"id": 1},
            "summary": "node 1: 2 groups, 1 without a leader (groups 1); 0 led here; nodes down: 3",
            "nodes": [{"id": 1, "self": true, "up": true},
                      {"id": 3, "self": false, "up": false, "last_ack_ms": 4200}],
            "groups": [{"id": 1, "leader": null, "fatal": null}],
            "placement": {},
        });
        let page = render(&v, "00:00:00 UTC".into());
        assert!(page.contains("class=\"summary bad\""));
        assert!(page.contains(
            "<tr class=\"down\" data-node=\"3\"><td>3</td><td>-</td><td class=\"state-down\">DOWN</td>"
        ));
        assert!(page.contains("4200 ms ago"));
        assert!(page.contains("<td>no leader</td>"));
        assert!(page.contains("<li>none</li>"));
    }

    #[test]
    fn latencies_read_as_upper_bounds() {
        assert_eq!(latency(&Value::Null), "-");
        assert_eq!(latency(&serde_json::json!(0.00025)), "≤ 250 µs");
        assert_eq!(latency(&serde_json::json!(0.0025)), "≤ 2.5 ms");
        assert_eq!(latency(&serde_json::json!(2.5)), "≤ 2.5 s");
        assert_eq!(latency(&serde_json::json!(0.005)), "≤ 5 ms");
        assert_eq!(latency(&serde_json::json!("+Inf")), "> 10 s");
    }

    #[test]
    fn base64_decodes_and_refuses_bad_input() {
        assert_eq!(
            base64_decode("YWRtaW46czNjcjN0").as_deref(),
            Some(&b"admin:s3cr3t"[..])
        );
        assert_eq!(base64_decode("Og==").as_deref(), Some(&b":"[..]));
        assert_eq!(base64_decode("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("YWI=").as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
        for bad in ["YWJ", "Y===", "YQ==YQ==", "YW!j", "===="] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }
}
