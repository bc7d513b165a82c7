//! Black-box: the `chatlog` binary's client commands against a real `chatlog serve`
//! process on 127.0.0.1. Every command runs as a subprocess with `--json`, and its output
//! is checked against the shapes scripts rely on (`chatlog <command> --help`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_chatlog");

#[path = "common/server.rs"]
mod server;

use server::Server;

/// The binary with a clean environment: no token or server from the caller's shell.
fn chatlog() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("CHATLOG_TOKEN")
        .env_remove("CHATLOG_SERVER")
        .env("RUST_LOG", "warn");
    c
}

/// Runs `chatlog ARGS --server ADDR [--token T] --json`.
fn run(addr: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = chatlog();
    c.args(args).args(["--server", addr, "--json"]);
    if let Some(t) = token {
        c.args(["--token", t]);
    }
    c.output().expect("chatlog runs")
}

/// Runs a command that must succeed and returns its JSON output.
fn ok(addr: &str, token: Option<&str>, args: &[&str]) -> Value {
    let out = run(addr, token, args);
    assert!(
        out.status.success(),
        "chatlog {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "chatlog {args:?} printed no JSON ({e}): {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs a command that must be refused: exit status 1, nothing on stdout, and
/// `error: CODE: …` on stderr. Returns the stderr text.
fn refused(addr: &str, token: Option<&str>, args: &[&str], code: &str) -> String {
    let out = run(addr, token, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "chatlog {args:?} should be refused; stderr {stderr:?}"
    );
    assert!(out.stdout.is_empty(), "a refusal prints nothing on stdout");
    assert!(
        stderr.starts_with(&format!("error: {code}: ")),
        "chatlog {args:?}: expected error {code}, got {stderr:?}"
    );
    stderr
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {v}"))
}

/// `user create NAME`: (user id, session token, login token).
fn user(addr: &str, name: &str) -> (u64, String, String) {
    let v = ok(addr, None, &["user", "create", name]);
    assert_eq!(s(&v, "name"), name);
    (
        u(&v, "user_id"),
        s(&v, "token").to_owned(),
        s(&v, "login_token").to_owned(),
    )
}

fn send(addr: &str, token: &str, chat: u64, text: &str) -> Value {
    ok(addr, Some(token), &["send", &chat.to_string(), text])
}

fn history(addr: &str, token: &str, chat: u64, from: u64, limit: u32) -> Vec<Value> {
    let v = ok(
        addr,
        Some(token),
        &[
            "history",
            &chat.to_string(),
            "--from",
            &from.to_string(),
            "--limit",
            &limit.to_string(),
        ],
    );
    v["events"].as_array().expect("events").clone()
}

#[test]
fn every_command_against_a_real_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start_on(dir.path(), "127.0.0.1:0", &[]);
    let addr = server.addr.as_str();

    let (alice, a_tok, a_login) = user(addr, "alice");
    let (bob, b_tok, _) = user(addr, "bob");
    let (carol, c_tok, _) = user(addr, "carol");
    assert_ne!(alice, bob);
    let (a, b, c) = (a_tok.as_str(), b_tok.as_str(), c_tok.as_str());
    refused(addr, None, &["user", "create", "alice"], "CONFLICT");
    refused(addr, None, &["user", "create", "Not Valid"], "BAD_REQUEST");

    // A group with bob.
    let created = ok(
        addr,
        Some(a),
        &[
            "chat",
            "create",
            "--kind",
            "group",
            "team",
            "--members",
            &bob.to_string(),
        ],
    );
    assert_eq!(u(&created, "seq"), 1);
    assert_eq!(s(&created, "kind"), "group");
    let chat = u(&created, "chat_id");
    let chat_s = chat.to_string();

    // Sends: with a random client id, and with a chosen one repeated.
    let first = send(addr, a, chat, "hello bob");
    assert_eq!((u(&first, "chat_id"), u(&first, "seq")), (chat, 2));
    assert_ne!(u(&first, "client_id"), 0);
    assert_eq!(first["deduplicated"], false);
    let sent = ok(
        addr,
        Some(b),
        &["send", &chat_s, "hi alice", "--client-id", "4242"],
    );
    assert_eq!(u(&sent, "seq"), 3);
    assert_eq!(u(&sent, "client_id"), 4242);
    let again = ok(
        addr,
        Some(b),
        &["send", &chat_s, "hi alice", "--client-id", "4242"],
    );
    assert_eq!(
        u(&again, "seq"),
        3,
        "a repeated client id returns the original seq"
    );
    assert_eq!(again["deduplicated"], true);
    // The token may also come from CHATLOG_TOKEN, the server from CHATLOG_SERVER.
    let out = chatlog()
        .args(["send", &chat_s, "via env", "--json"])
        .env("CHATLOG_TOKEN", a)
        .env("CHATLOG_SERVER", addr)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let via_env: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(u(&via_env, "seq"), 4);

    // History: exactly the documented shape.
    let events = history(addr, a, chat, 2, 3);
    assert_eq!(events.len(), 3);
    for (e, (seq, sender, text)) in events.iter().zip([
        (2, alice, "hello bob"),
        (3, bob, "hi alice"),
        (4, alice, "via env"),
    ]) {
        assert_eq!(u(e, "seq"), seq);
        assert_eq!(s(e, "kind"), "message");
        assert_eq!(u(e, "sender"), sender);
        assert_eq!(s(e, "text"), text);
    }
    let page = ok(
        addr,
        Some(a),
        &["history", &chat_s, "--from", "1", "--limit", "2"],
    );
    assert_eq!(page["has_more"], true);
    assert_eq!(u(&page, "head_seq"), 4);
    assert_eq!(s(&page["events"][0], "kind"), "chat_created");
    // Without --from: the newest events, oldest first.
    let newest = ok(addr, Some(a), &["history", &chat_s, "--limit", "2"]);
    let seqs: Vec<u64> = newest["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| u(e, "seq"))
        .collect();
    assert_eq!(seqs, [3, 4]);

    // Edit, react, pin, delete: each an event of its own.
    let edit = ok(addr, Some(a), &["edit", &chat_s, "2", "hello, bob"]);
    assert_eq!((u(&edit, "chat_id"), u(&edit, "seq")), (chat, 5));
    let react = ok(addr, Some(b), &["react", &chat_s, "2", "👍"]);
    assert_eq!(u(&react, "seq"), 6);
    let unreact = ok(addr, Some(b), &["react", &chat_s, "2", "👍", "--remove"]);
    assert_eq!(u(&unreact, "seq"), 7);
    let pin = ok(addr, Some(a), &["pin", &chat_s, "2"]);
    assert_eq!(u(&pin, "seq"), 8);
    let unpin = ok(addr, Some(a), &["pin", &chat_s, "2", "--unpin"]);
    assert_eq!(u(&unpin, "seq"), 9);
    let delete = ok(addr, Some(b), &["delete", &chat_s, "3"]);
    assert_eq!(u(&delete, "seq"), 10);
    let events = history(addr, a, chat, 2, 100);
    let kinds: Vec<&str> = events.iter().map(|e| s(e, "kind")).collect();
    assert_eq!(
        kinds,
        [
            "message", "message", "message", "edit", "reaction", "reaction", "pin", "pin", "delete"
        ]
    );
    assert_eq!(
        (u(&events[3], "target_seq"), s(&events[3], "text")),
        (2, "hello, bob")
    );
    assert_eq!(s(&events[4], "reaction"), "👍");
    assert_eq!(
        (events[4]["removed"].clone(), events[5]["removed"].clone()),
        (false.into(), true.into())
    );
    assert_eq!(
        (events[6]["pinned"].clone(), events[7]["pinned"].clone()),
        (true.into(), false.into())
    );
    assert_eq!(u(&events[8], "target_seq"), 3);
    assert_eq!(
        events[1]["erased"], true,
        "a deleted message's body is erased"
    );
    assert_eq!(s(&events[1], "text"), "");
    // Editing someone else's message is refused.
    refused(
        addr,
        Some(b),
        &["edit", &chat_s, "2", "mine now"],
        "PERMISSION_DENIED",
    );

    // Read markers and unread counts.
    let unread = ok(addr, Some(b), &["unread"]);
    let counts = unread["counts"].as_array().expect("counts");
    assert_eq!(counts.len(), 1);
    assert_eq!(
        (u(&counts[0], "chat_id"), u(&counts[0], "unread_count")),
        (chat, 2)
    );
    let read = ok(addr, Some(b), &["read", &chat_s, "4"]);
    assert_eq!(
        (
            u(&read, "chat_id"),
            u(&read, "read_seq"),
            u(&read, "unread_count")
        ),
        (chat, 4, 0)
    );
    let unread = ok(addr, Some(b), &["unread", &chat_s]);
    assert_eq!(u(&unread["counts"][0], "read_seq"), 4);
    assert_eq!(u(&unread["counts"][0], "head_seq"), 10);
    assert_eq!(u(&unread["counts"][0], "unread_count"), 0);

    // Refusals: a non-member posts or reads; no token; a revoked token.
    let stderr = refused(
        addr,
        Some(c),
        &["send", &chat_s, "let me in"],
        "PERMISSION_DENIED",
    );
    assert!(stderr.contains(&carol.to_string()), "{stderr}");
    refused(
        addr,
        Some(c),
        &["history", &chat_s, "--from", "1"],
        "PERMISSION_DENIED",
    );
    refused(addr, None, &["send", &chat_s, "anonymous"], "NO_TOKEN");
    refused(addr, None, &["chat", "list"], "NO_TOKEN");
    refused(addr, Some("1.bogus"), &["chat", "list"], "UNAUTHENTICATED");
    refused(
        addr,
        Some(a),
        &["send", "999999999", "nowhere"],
        "NOT_FOUND",
    );

    // A channel: join, post rights, invite, remove, ban, unban, role, leave.
    let news = ok(
        addr,
        Some(a),
        &["chat", "create", "--kind", "channel", "news"],
    );
    assert_eq!(s(&news, "kind"), "channel");
    let news = u(&news, "chat_id").to_string();
    let joined = ok(addr, Some(b), &["chat", "join", &news]);
    assert_eq!(u(&joined, "seq"), 2);
    refused(
        addr,
        Some(b),
        &["send", &news, "subscribers do not post"],
        "PERMISSION_DENIED",
    );
    ok(
        addr,
        Some(a),
        &["chat", "invite", &news, &carol.to_string()],
    );
    // An id no user has (carol's group, a thousand users further) is refused.
    refused(
        addr,
        Some(a),
        &["chat", "invite", &news, &(carol + (1000 << 16)).to_string()],
        "NOT_FOUND",
    );
    let members = ok(addr, Some(c), &["chat", "members", &news]);
    let roles: Vec<(u64, &str)> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| (u(m, "user_id"), s(m, "role")))
        .collect();
    let mut want = vec![(alice, "owner"), (bob, "member"), (carol, "member")];
    want.sort();
    assert_eq!(roles, want);
    assert_eq!(members["has_more"], false);
    ok(
        addr,
        Some(a),
        &["chat", "remove", &news, &carol.to_string()],
    );
    refused(
        addr,
        Some(c),
        &["chat", "members", &news],
        "PERMISSION_DENIED",
    );
    ok(addr, Some(a), &["chat", "ban", &news, &bob.to_string()]);
    refused(addr, Some(b), &["chat", "join", &news], "PERMISSION_DENIED");
    ok(addr, Some(a), &["chat", "unban", &news, &bob.to_string()]);
    ok(addr, Some(b), &["chat", "join", &news]);
    ok(
        addr,
        Some(a),
        &["chat", "role", &news, &bob.to_string(), "admin"],
    );
    let posted = ok(addr, Some(b), &["send", &news, "admins post"]);
    assert!(u(&posted, "seq") > 1);
    ok(addr, Some(b), &["chat", "leave", &news]);
    refused(
        addr,
        Some(a),
        &["chat", "leave", &news],
        "PERMISSION_DENIED",
    );
    let kinds: Vec<String> = history(addr, a, news.parse().expect("id"), 1, 100)
        .iter()
        .map(|e| s(e, "kind").to_owned())
        .collect();
    assert_eq!(
        kinds,
        [
            "chat_created",
            "member_joined",
            "member_joined",
            "member_removed",
            "member_banned",
            "member_unbanned",
            "member_joined",
            "role_changed",
            "message",
            "member_left"
        ]
    );

    // Chat list: alice's two chats with their kinds and roles.
    let list = ok(addr, Some(a), &["chat", "list"]);
    let chats = list["chats"].as_array().expect("chats");
    let mut seen: Vec<(String, &str, &str)> = chats
        .iter()
        .map(|c| (u(c, "chat_id").to_string(), s(c, "kind"), s(c, "role")))
        .collect();
    seen.sort();
    let mut want = vec![
        (chat_s.clone(), "group", "owner"),
        (news.clone(), "channel", "owner"),
    ];
    want.sort();
    assert_eq!(seen, want);
    let limited = ok(addr, Some(a), &["chat", "list", "--limit", "1"]);
    assert_eq!(limited["chats"].as_array().expect("chats").len(), 1);
    assert_eq!(limited["has_more"], true);

    // A direct chat: the other user by --members, or as NAME; the same chat both times.
    let direct = ok(
        addr,
        Some(a),
        &[
            "chat",
            "create",
            "--kind",
            "direct",
            "--members",
            &carol.to_string(),
        ],
    );
    assert_eq!(s(&direct, "kind"), "direct");
    let again = ok(
        addr,
        Some(c),
        &["chat", "create", "--kind", "direct", &alice.to_string()],
    );
    assert_eq!(u(&again, "chat_id"), u(&direct, "chat_id"));
    refused(
        addr,
        Some(a),
        &["chat", "create", "--kind", "direct"],
        "BAD_REQUEST",
    );
    refused(
        addr,
        Some(a),
        &["chat", "create", "--kind", "group"],
        "BAD_REQUEST",
    );

    // Sessions: log in from a second device, list, revoke it.
    let phone = ok(
        addr,
        None,
        &["login", &alice.to_string(), &a_login, "--device", "phone"],
    );
    assert_eq!(u(&phone, "user_id"), alice);
    let phone_tok = s(&phone, "token").to_owned();
    let sessions = ok(addr, Some(a), &["sessions", "list"]);
    let list = sessions["sessions"].as_array().expect("sessions");
    assert_eq!(list.len(), 2);
    let current: Vec<&str> = list
        .iter()
        .filter(|s| s["current"] == true)
        .map(|x| s(x, "device_id"))
        .collect();
    assert_eq!(current, ["cli"]);
    ok(addr, Some(&phone_tok), &["chat", "list"]);
    let revoked = ok(
        addr,
        Some(a),
        &["sessions", "revoke", &u(&phone, "session_id").to_string()],
    );
    assert_eq!(u(&revoked, "revoked"), u(&phone, "session_id"));
    refused(addr, Some(&phone_tok), &["chat", "list"], "UNAUTHENTICATED");
    refused(
        addr,
        None,
        &["login", &alice.to_string(), "wrong"],
        "UNAUTHENTICATED",
    );

    // People's output: one line per event, `#SEQ SENDER HH:MM:SS: text`.
    let out = chatlog()
        .args([
            "history", &chat_s, "--from", "2", "--limit", "1", "--server", addr, "--token", a,
        ])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("#2 {alice} ")) && text.trim_end().ends_with(": hello bob"),
        "{text:?}"
    );
    drop(server);
}

/// Reads a child's stdout lines on a thread, so a test can wait for them with a deadline.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn tail_follows_a_chat_live_across_a_server_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start_on(dir.path(), "127.0.0.1:0", &[]);
    let addr = server.addr.clone();
    let (_, tok, _) = user(&addr, "alice");
    let chat = u(
        &ok(&addr, Some(&tok), &["chat", "create", "live"]),
        "chat_id",
    );
    send(&addr, &tok, chat, "before the tail");

    // From seq 2 (already there) through seq 6: two events before the restart, two after.
    let mut tail = chatlog()
        .args([
            "tail",
            &chat.to_string(),
            "--from",
            "2",
            "--limit",
            "5",
            "--json",
        ])
        .args(["--server", &addr, "--token", &tok])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tail starts");
    let lines = lines_of(&mut tail);
    let next = |what: &str| -> Value {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("tail prints {what}"));
        serde_json::from_str(&line).expect("tail prints JSON lines")
    };
    let e = next("the event before it started");
    assert_eq!(
        (u(&e, "seq"), s(&e, "kind"), s(&e, "text")),
        (2, "message", "before the tail")
    );
    send(&addr, &tok, chat, "live one");
    let e = next("a live event");
    assert_eq!((u(&e, "seq"), s(&e, "text")), (3, "live one"));

    // SIGKILL the server and start it again on the same address: tail reconnects and
    // resumes from seq 4, with no gap and no duplicate.
    server.kill();
    let server = Server::start_on(dir.path(), &addr, &[]);
    assert_eq!(server.addr, addr);
    for text in ["after one", "after two", "after three"] {
        send(&addr, &tok, chat, text);
    }
    for (seq, text) in [(4, "after one"), (5, "after two"), (6, "after three")] {
        let e = next(text);
        assert_eq!((u(&e, "seq"), s(&e, "text")), (seq, text));
    }
    let status = tail.wait().expect("tail exits after --limit");
    assert!(status.success());
    assert!(
        lines.recv_timeout(Duration::from_secs(1)).is_err(),
        "nothing after --limit events"
    );
    drop(server);
}

#[test]
fn tail_without_from_starts_after_the_head() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start_on(dir.path(), "127.0.0.1:0", &[]);
    let addr = server.addr.as_str();
    let (_, tok, _) = user(addr, "alice");
    let chat = u(
        &ok(addr, Some(&tok), &["chat", "create", "live"]),
        "chat_id",
    );
    let mut tail = chatlog()
        .args(["tail", &chat.to_string(), "--limit", "1", "--json"])
        .args(["--server", addr, "--token", &tok])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tail starts");
    let lines = lines_of(&mut tail);
    // The tail subscribes at some point; keep sending until one arrives after it.
    let mut sent = Vec::new();
    let line = loop {
        sent.push(u(&send(addr, &tok, chat, "ping"), "seq"));
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(300)) {
            break line;
        }
        assert!(sent.len() < 100, "tail never printed");
    };
    let e: Value = serde_json::from_str(&line).expect("json");
    assert!(
        sent.contains(&u(&e, "seq")),
        "only events sent after it started"
    );
    assert_ne!(u(&e, "seq"), 1, "not the history before the head");
    assert!(tail.wait().expect("exits").success());
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    // Nothing listens on port 1.
    let out = chatlog()
        .args(["chat", "list", "--server", "127.0.0.1:1", "--token", "1.x"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: CONNECT_FAILED: cannot connect to 127.0.0.1:1: "),
        "{stderr}"
    );
    let out = chatlog()
        .args(["user", "create", "x", "--server", "not an address"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: CONNECT_FAILED: cannot connect to not an address"),
        "{stderr}"
    );
}

#[test]
fn help_of_every_command_exits_zero() {
    let commands: &[&[&str]] = &[
        &[],
        &["user"],
        &["user", "create"],
        &["login"],
        &["sessions"],
        &["sessions", "list"],
        &["sessions", "revoke"],
        &["chat"],
        &["chat", "create"],
        &["chat", "list"],
        &["chat", "members"],
        &["chat", "invite"],
        &["chat", "remove"],
        &["chat", "leave"],
        &["chat", "ban"],
        &["chat", "unban"],
        &["chat", "join"],
        &["chat", "role"],
        &["send"],
        &["history"],
        &["tail"],
        &["edit"],
        &["delete"],
        &["react"],
        &["pin"],
        &["read"],
        &["unread"],
        &["sync"],
        &["serve"],
        &["storage"],
        &["admin", "retention"],
        &["admin", "retention", "show"],
        &["admin", "retention", "set"],
    ];
    for cmd in commands {
        let out = chatlog().args(*cmd).arg("--help").output().expect("runs");
        assert!(out.status.success(), "chatlog {cmd:?} --help failed");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Usage:"), "chatlog {cmd:?} --help: {help}");
    }
    // The JSON shapes scripts rely on are in the help.
    let help = |cmd: &[&str]| {
        let out = chatlog().args(cmd).arg("--help").output().expect("runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(help(&["user", "create"]).contains(r#""token""#));
    assert!(help(&["admin", "retention", "show"]).contains(r#""state_digest""#));
    assert!(help(&["admin", "retention", "set"]).contains(r#""changed""#));
    assert!(help(&["history"]).contains(r#""events""#));
    assert!(help(&["send"]).contains("--client-id"));
    assert!(help(&["send"]).contains("CHATLOG_TOKEN"));
    // A usage error is clap's: status 2.
    let out = chatlog().args(["send"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

/// `sync`: what changed since a device's position, per chat, with the too-long flag when
/// one answer cannot hold the gap; a malformed position is a usage error.
#[test]
fn sync_reports_what_changed_since_a_position() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start_on(dir.path(), "127.0.0.1:0", &[]);
    let addr = server.addr.clone();
    let (_alice, alice_token, _) = user(&addr, "alice");
    let (bob, bob_token, _) = user(&addr, "bob");
    let chat = u(
        &ok(
            &addr,
            Some(&alice_token),
            &["chat", "create", "team", "--members", &bob.to_string()],
        ),
        "chat_id",
    );
    for i in 0..3 {
        send(&addr, &alice_token, chat, &format!("m{i}"));
    }
    // No positions: every chat of bob's, from his read marker (none yet).
    let all = ok(&addr, Some(&bob_token), &["sync"]);
    let chats = all["chats"].as_array().expect("chats");
    assert_eq!(chats.len(), 1, "{all}");
    assert_eq!(u(&chats[0], "chat_id"), chat);
    assert_eq!(u(&chats[0], "head_seq"), 4);
    assert_eq!(u(&chats[0], "unread_count"), 3);
    let seqs: Vec<u64> = chats[0]["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| u(e, "seq"))
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    // From seq 2 with room for one event: seq 3 only, and the answer says more follow.
    let position = format!("{chat}=2");
    let one = ok(
        &addr,
        Some(&bob_token),
        &["sync", &position, "--limit", "1"],
    );
    let d = &one["chats"][0];
    assert_eq!(d["too_long"], true, "{one}");
    let events = d["events"].as_array().expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(u(&events[0], "seq"), 3);
    assert_eq!(s(&events[0], "text"), "m1");
    let usage = refused(
        &addr,
        Some(&bob_token),
        &["sync", "not-a-position"],
        "USAGE",
    );
    assert!(usage.contains("CHAT=SEQ"), "{usage}");
}
