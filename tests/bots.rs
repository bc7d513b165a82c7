//! Black-box: the HTTP bot API of a real `chatlog serve --http` process, driven with
//! plain HTTP/1.1 over a `TcpStream` (the tiny client below), users over the binary
//! protocol (`chatlog_wire::Client`).
//!
//! - An echo bot long polls while users post and answers each message; the users see
//!   every echo once; a retried send with the same idempotency key posts once.
//! - SIGKILL + restart: updates handed out and not confirmed come back with the same ids
//!   and events, confirmed ones never do; a long poll cut by the kill loses nothing.
//! - Webhooks: a receiver on 127.0.0.1 that fails its first answers gets every update,
//!   retried, in order per chat, with the secret header; getUpdates is refused (409)
//!   while the webhook is set; `getWebhookInfo` reports the failures; after a SIGKILL
//!   and restart delivery resumes with the next ids, repeating nothing confirmed.
//! - Refusals: bad tokens (401), a chat the bot is not in (403), unknown methods (404),
//!   bad input (400), the body limit (413), the send rate (429 with `retry_after` and
//!   `Retry-After`).
//! - A three-node cluster: every node answers the bot, one delivery loop per bot (on
//!   the leader of its group) delivers each update once, `getUpdates` works on a
//!   follower after `deleteWebhook`.
//! - A cluster with more nodes than replicas: a node without the bot's group forwards
//!   every call to one with it (the next one once that is SIGKILLed) and answers what
//!   it answered, refusals and a 429's `Retry-After` included.
//! - `/bot/openapi.json` parses and describes exactly the implemented methods, each of
//!   which answers something other than 404; `chatlog bot create --json` and
//!   `bot list --json` work.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chatlog_wire::client::{Client, ClientOptions};
use chatlog_wire::proto::v1;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "common/server.rs"]
mod server;

use server::{NO_RATE_LIMITS, Server};

#[path = "common/cluster.rs"]
mod cluster;

use cluster::Cluster;

/// The HTTP address a server printed.
trait HttpAddr {
    fn h(&self) -> &str;
}

impl HttpAddr for Server {
    fn h(&self) -> &str {
        self.http
            .as_deref()
            .expect("the server prints its HTTP address")
    }
}

/// Longest wait for anything the test expects to happen.
const WAIT: Duration = Duration::from_secs(20);

/// One HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `result` of a successful call.
    fn result(&self) -> &Value {
        assert_eq!(self.status, 200, "call failed: {:?}", self.body);
        assert_eq!(self.body["ok"], true, "{:?}", self.body);
        &self.body["result"]
    }

    /// Checks a failure's status and envelope.
    fn refused(&self, status: u16) -> &Self {
        assert_eq!(self.status, status, "{:?}", self.body);
        assert_eq!(self.body["ok"], false, "{:?}", self.body);
        assert_eq!(self.body["error_code"], status, "{:?}", self.body);
        assert!(
            self.body["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
        self
    }
}

/// One HTTP/1.1 request (`Connection: close`), the whole answer read.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Answer, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut rest = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    if chunked {
        let mut body = Vec::new();
        let mut r = &rest[..];
        loop {
            let eol = r.windows(2).position(|w| w == b"\r\n").ok_or("chunk")?;
            let n = usize::from_str_radix(std::str::from_utf8(&r[..eol]).map_err(|_| "chunk")?, 16)
                .map_err(|_| "chunk size")?;
            r = &r[eol + 2..];
            if n == 0 {
                break;
            }
            body.extend_from_slice(&r[..n]);
            r = &r[n + 2..];
        }
        rest = body;
    }
    let body = if rest.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&rest)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&rest).into()))
    };
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// A bot call with a JSON body.
async fn call(http_addr: &str, token: &str, method: &str, params: Value) -> Answer {
    let body = params.to_string();
    http(
        http_addr,
        "POST",
        &format!("/bot{token}/{method}"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
    .unwrap_or_else(|e| panic!("{method}: {e}"))
}

async fn client(addr: &str, token: Option<String>) -> Client {
    let options = ClientOptions {
        token,
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    Client::connect(addr, options).await.expect("connects")
}

/// A user logged in: (user id, session token, client).
async fn user(addr: &str, name: &str) -> (u64, String, Client) {
    let anon = client(addr, None).await;
    let created = anon
        .create_user(v1::CreateUserRequest { name: name.into() })
        .await
        .expect("user created");
    let login = anon
        .login(v1::LoginRequest {
            user_id: created.user_id,
            login_token: created.login_token,
            device_id: "test".into(),
            device_name: "test".into(),
        })
        .await
        .expect("logged in");
    let c = client(addr, Some(login.session_token.clone())).await;
    (created.user_id, login.session_token, c)
}

/// A group chat of `owner` with `bot` invited: the chat id.
async fn chat_with(owner: &Client, title: &str, bot: Option<u64>) -> u64 {
    let chat = owner
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: title.into(),
            member_ids: vec![],
        })
        .await
        .expect("chat created")
        .chat_id;
    if let Some(bot) = bot {
        owner
            .invite(v1::InviteRequest {
                chat_id: chat,
                user_id: bot,
            })
            .await
            .expect("bot invited");
    }
    chat
}

async fn post(c: &Client, chat: u64, text: &str, id: u64) -> u64 {
    c.send_message(v1::SendMessageRequest {
        chat_id: chat,
        client_message_id: id,
        text: text.into(),
        ..Default::default()
    })
    .await
    .expect("posted")
    .seq
}

/// What an update names: (chat, seq, kind, text).
fn named(u: &Value) -> (u64, u64, String, String) {
    let e = &u["event"];
    (
        e["chat_id"].as_u64().expect("chat_id"),
        e["seq"].as_u64().expect("seq"),
        e["kind"].as_str().expect("kind").to_string(),
        e["text"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_bot_answers_users_over_long_polling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let (_alice, _, alice) = user(&server.addr, "alice").await;
    let (_bob, _, bob) = user(&server.addr, "bob").await;
    let created = alice
        .create_bot(v1::CreateBotRequest {
            name: "echo_bot".into(),
        })
        .await
        .expect("bot created");
    let (bot, token) = (created.user_id, created.token.clone());
    assert!(
        token.starts_with(&format!("{bot}:")) && token.len() == bot.to_string().len() + 65,
        "token {token:?} is USER_ID:64 hex digits"
    );
    let me = call(server.h(), &token, "getMe", json!({})).await;
    assert_eq!(me.result()["id"], bot);
    assert_eq!(me.result()["username"], "echo_bot");
    assert_eq!(me.result()["is_bot"], true);
    // GET with a query string works too.
    let me = http(server.h(), "GET", &format!("/bot{token}/getme"), &[], b"")
        .await
        .expect("GET");
    assert_eq!(me.result()["id"], bot);

    let chat = chat_with(&alice, "echo", Some(bot)).await;
    alice
        .invite(v1::InviteRequest {
            chat_id: chat,
            user_id: _bob,
        })
        .await
        .expect("bob invited");

    // The bot: long polls, answers every message of a user with "echo: TEXT".
    let http_addr = server.h().to_string();
    let bot_token = token.clone();
    let echo = tokio::spawn(async move {
        let mut offset = 0u64;
        let mut seen: Vec<Value> = Vec::new();
        let mut echoed = 0;
        let deadline = Instant::now() + WAIT;
        while echoed < 10 && Instant::now() < deadline {
            let got = call(
                &http_addr,
                &bot_token,
                "getUpdates",
                json!({"offset": offset, "timeout": 5}),
            )
            .await;
            for u in got.result().as_array().expect("array").clone() {
                let id = u["update_id"].as_u64().expect("update_id");
                assert!(id >= offset.max(1), "update {id} below offset {offset}");
                offset = id + 1;
                if let Some(m) = u.get("message")
                    && m["from"]["id"] != bot
                {
                    let sent = call(
                        &http_addr,
                        &bot_token,
                        "sendMessage",
                        json!({"chat_id": m["chat"]["id"], "text": format!("echo: {}", m["text"].as_str().expect("text")),
                               "reply_to_message_id": m["message_id"], "idempotency_key": format!("echo-{id}")}),
                    )
                    .await;
                    assert_eq!(sent.result()["deduplicated"], false);
                    echoed += 1;
                }
                seen.push(u);
            }
        }
        (seen, echoed)
    });

    for i in 0..10u64 {
        let who = if i % 2 == 0 { &alice } else { &bob };
        post(who, chat, &format!("hello {i}"), 100 + i).await;
    }
    let (seen, echoed) = echo.await.expect("bot task");
    assert_eq!(echoed, 10, "every message answered");

    // Update ids increase; seqs per chat increase; the bot saw its own join first.
    let ids: Vec<u64> = seen
        .iter()
        .map(|u| u["update_id"].as_u64().expect("id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let seqs: Vec<u64> = seen.iter().map(|u| named(u).1).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs increase: {seqs:?}"
    );
    assert_eq!(named(&seen[0]).2, "member_joined");
    // The bot's own echoes are updates too, marked as a bot's.
    for u in seen.iter().filter(|u| u.get("message").is_some()) {
        let from = &u["message"]["from"];
        assert_eq!(from["is_bot"], from["id"] == bot, "{u:?}");
    }

    // The users see each echo once, replying to the right message.
    let history = alice
        .history(v1::HistoryRequest {
            chat_id: chat,
            from_seq: 1,
            direction: v1::Direction::Forward.into(),
            limit: 100,
        })
        .await
        .expect("history");
    let mut texts: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_seq = BTreeMap::new();
    for e in &history.events {
        if let Some(v1::event::Body::MessagePosted(m)) = &e.body {
            *texts.entry(m.text.clone()).or_default() += 1;
            by_seq.insert(e.seq, m.text.clone());
            if let Some(original) = m.text.strip_prefix("echo: ") {
                assert_eq!(e.sender_id, bot);
                assert_eq!(
                    by_seq.get(&m.reply_to_seq).map(String::as_str),
                    Some(original)
                );
            }
        }
    }
    for i in 0..10 {
        assert_eq!(
            texts.get(&format!("echo: hello {i}")),
            Some(&1),
            "{texts:?}"
        );
    }

    // Idempotent send: the same key twice posts once.
    let first = call(
        server.h(),
        &token,
        "sendMessage",
        json!({"chat_id": chat, "text": "once", "idempotency_key": "k-1"}),
    )
    .await;
    let again = http(
        server.h(),
        "POST",
        &format!("/bot{token}/sendMessage"),
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Idempotency-Key", "k-1"),
        ],
        format!("chat_id={chat}&text=once").as_bytes(),
    )
    .await
    .expect("send");
    assert_eq!(again.result()["message_id"], first.result()["message_id"]);
    assert_eq!(again.result()["deduplicated"], true);

    // Edit and delete the bot's own message; the updates show them.
    let seq = first.result()["message_id"].as_u64().expect("seq");
    let edited = call(
        server.h(),
        &token,
        "editMessage",
        json!({"chat_id": chat, "message_id": seq, "text": "twice"}),
    )
    .await;
    assert_eq!(edited.result()["message_id"], seq);
    let deleted = call(
        server.h(),
        &token,
        "deleteMessage",
        json!({"chat_id": chat, "message_id": seq}),
    )
    .await;
    assert!(deleted.result()["event_seq"].as_u64() > edited.result()["event_seq"].as_u64());
    // Someone else's message: only its sender or an admin deletes it.
    let alices = *by_seq
        .keys()
        .find(|s| by_seq[s] == "hello 0")
        .expect("hello 0");
    call(
        server.h(),
        &token,
        "deleteMessage",
        json!({"chat_id": chat, "message_id": alices}),
    )
    .await
    .refused(403);
    let offset = ids.last().expect("ids") + 1;
    let rest = call(
        server.h(),
        &token,
        "getUpdates",
        json!({"offset": offset, "timeout": 5}),
    )
    .await;
    let kinds: Vec<String> = rest
        .result()
        .as_array()
        .expect("array")
        .iter()
        .map(|u| named(u).2)
        .collect();
    // The last echoes may come first; the send, edit and delete end the list, in order.
    assert!(
        kinds.ends_with(&["message".into(), "edit".into(), "delete".into()]),
        "{kinds:?}"
    );
    let edit = rest
        .result()
        .as_array()
        .expect("array")
        .iter()
        .find(|u| named(u).2 == "edit")
        .cloned()
        .expect("edit");
    assert_eq!(edit["edited_message"]["message_id"], seq);
    // The message was deleted before these updates were fetched: the edit's text is
    // erased with it, as for every reader.
    assert_eq!(edit["edited_message"]["text"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loses_no_update_and_repeats_no_confirmed_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let (_, alice_token, alice) = user(&server.addr, "alice").await;
    let created = alice
        .create_bot(v1::CreateBotRequest {
            name: "durable_bot".into(),
        })
        .await
        .expect("bot");
    let token = created.token;
    let chat = chat_with(&alice, "durable", Some(created.user_id)).await;
    for i in 0..5 {
        post(&alice, chat, &format!("before {i}"), 1 + i).await;
    }
    // Handed out: the join and five messages, ids 1..=6.
    let first = call(server.h(), &token, "getUpdates", json!({})).await;
    let first: Vec<Value> = first.result().as_array().expect("array").clone();
    assert_eq!(first.len(), 6, "{first:?}");
    let mut names: BTreeMap<u64, (u64, u64, String, String)> = first
        .iter()
        .map(|u| (u["update_id"].as_u64().expect("id"), named(u)))
        .collect();
    assert_eq!(
        names.keys().copied().collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    // Confirm 1..=3: 4..=6 come back, the same.
    let again = call(server.h(), &token, "getUpdates", json!({"offset": 4})).await;
    let again: Vec<Value> = again.result().as_array().expect("array").clone();
    assert_eq!(
        again
            .iter()
            .map(|u| u["update_id"].as_u64().expect("id"))
            .collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    for u in &again {
        assert_eq!(names[&u["update_id"].as_u64().expect("id")], named(u));
    }

    // SIGKILL with 4..=6 handed out and not confirmed.
    server.kill();
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let after = call(server.h(), &token, "getUpdates", json!({"offset": 4})).await;
    let after: Vec<Value> = after.result().as_array().expect("array").clone();
    assert_eq!(
        after
            .iter()
            .map(|u| u["update_id"].as_u64().expect("id"))
            .collect::<Vec<_>>(),
        vec![4, 5, 6],
        "the same ids after the restart"
    );
    for u in &after {
        assert_eq!(
            names[&u["update_id"].as_u64().expect("id")],
            named(u),
            "the same events"
        );
    }
    // A bot that asks with an old offset gets nothing it confirmed.
    let old = call(server.h(), &token, "getUpdates", json!({"offset": 2})).await;
    assert!(
        old.result()
            .as_array()
            .expect("array")
            .iter()
            .all(|u| u["update_id"].as_u64() >= Some(4))
    );

    // A long poll that confirms everything, cut by a SIGKILL while it waits.
    let http_addr = server.h().to_string();
    let poll_token = token.clone();
    let poll = tokio::spawn(async move {
        http(
            &http_addr,
            "POST",
            &format!("/bot{poll_token}/getUpdates"),
            &[("Content-Type", "application/json")],
            br#"{"offset": 7, "timeout": 40}"#,
        )
        .await
    });
    // Wait until its confirmation is committed (nothing pending any more).
    let deadline = Instant::now() + WAIT;
    loop {
        let info = call(server.h(), &token, "getWebhookInfo", json!({})).await;
        if info.result()["pending_update_count"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the poll never confirmed: {:?}",
            info.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!poll.is_finished(), "the long poll is still waiting");
    server.kill();
    let cut = poll.await.expect("poll task");
    assert!(
        cut.as_ref().map_or(true, |a| a.status != 200),
        "a cut poll returned no updates: {cut:?}"
    );

    // Users post while the server is back; the bot repeats its poll from offset 7.
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let alice = client(&server.addr, Some(alice_token)).await;
    let mut posted = Vec::new();
    for i in 0..3 {
        posted.push(post(&alice, chat, &format!("after {i}"), 10 + i).await);
    }
    let mut offset = 7;
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < 3 && Instant::now() < deadline {
        let a = call(
            server.h(),
            &token,
            "getUpdates",
            json!({"offset": offset, "timeout": 5}),
        )
        .await;
        for u in a.result().as_array().expect("array") {
            let id = u["update_id"].as_u64().expect("id");
            assert!(id >= offset, "id {id} was confirmed already");
            assert!(!names.contains_key(&id), "id {id} names another event now");
            names.insert(id, named(u));
            offset = id + 1;
            got.push(named(u));
        }
    }
    assert_eq!(
        got.iter().map(|n| (n.1, n.3.clone())).collect::<Vec<_>>(),
        posted
            .iter()
            .zip(0..)
            .map(|(s, i)| (*s, format!("after {i}")))
            .collect::<Vec<_>>(),
        "every post after the restart, once, in order"
    );
    // Every message was delivered under exactly one id.
    let messages: BTreeSet<u64> = names
        .values()
        .filter(|n| n.2 == "message")
        .map(|n| n.1)
        .collect();
    assert_eq!(messages.len(), 8);
    assert_eq!(names.values().filter(|n| n.2 == "message").count(), 8);
}

/// A webhook receiver: answers 500 to its first `failures` requests, then 204; sends
/// (status answered, secret header, body) of every request.
fn receiver(failures: usize) -> (String, mpsc::Receiver<(u16, Option<String>, Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut served = 0;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut secret = None;
            let mut length = 0usize;
            let mut line = String::new();
            reader.read_line(&mut line).expect("request line");
            assert!(line.starts_with("POST /hook "), "{line:?}");
            loop {
                line.clear();
                reader.read_line(&mut line).expect("header");
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').expect("header line");
                if k.eq_ignore_ascii_case("x-chatlog-bot-api-secret-token") {
                    secret = Some(v.trim().to_string());
                }
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().expect("length");
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).expect("body");
            let status = if served < failures { 500 } else { 204 };
            served += 1;
            let reason = if status == 500 {
                "Internal Server Error"
            } else {
                "No Content"
            };
            let _ = stream.write_all(
                format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            );
            let body: Value = serde_json::from_slice(&body).expect("JSON update");
            if tx.send((status, secret, body)).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_gets_every_update_in_order_with_retries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let (_, alice_token, alice) = user(&server.addr, "alice").await;
    let created = alice
        .create_bot(v1::CreateBotRequest {
            name: "hook_bot".into(),
        })
        .await
        .expect("bot");
    let (bot, token) = (created.user_id, created.token);
    let (hook_addr, deliveries) = receiver(3);
    let url = format!("http://{hook_addr}/hook");
    call(
        server.h(),
        &token,
        "setWebhook",
        json!({"url": "https://example.org/x"}),
    )
    .await
    .refused(400);
    let set = call(
        server.h(),
        &token,
        "setWebhook",
        json!({"url": url, "secret_token": "s3cret_token-1"}),
    )
    .await;
    assert_eq!(set.result(), &json!(true));
    call(server.h(), &token, "getUpdates", json!({}))
        .await
        .refused(409);

    let chat_a = chat_with(&alice, "a", Some(bot)).await;
    let chat_b = chat_with(&alice, "b", Some(bot)).await;
    for i in 0..5 {
        post(&alice, chat_a, &format!("a{i}"), 1 + i).await;
        if i < 3 {
            post(&alice, chat_b, &format!("b{i}"), 100 + i).await;
        }
    }
    // Joins (2) and messages (8): 10 updates delivered, after 3 failed attempts.
    let mut ok: Vec<Value> = Vec::new();
    let mut failed = Vec::new();
    let deadline = Instant::now() + WAIT;
    while ok.len() < 10 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (status, secret, body) = deliveries
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("only {} updates delivered: {ok:?}", ok.len()));
        assert_eq!(
            secret.as_deref(),
            Some("s3cret_token-1"),
            "the secret header"
        );
        if status == 500 {
            failed.push(body);
        } else {
            ok.push(body);
        }
    }
    assert_eq!(failed.len(), 3);
    // The failed update was retried until it went through, and it went first.
    assert!(
        failed.iter().all(|f| f["update_id"] == ok[0]["update_id"]),
        "{failed:?}"
    );
    let ids: Vec<u64> = ok
        .iter()
        .map(|u| u["update_id"].as_u64().expect("id"))
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "each delivered once, in order: {ids:?}"
    );
    for chat in [chat_a, chat_b] {
        let seqs: Vec<u64> = ok
            .iter()
            .map(named)
            .filter(|n| n.0 == chat)
            .map(|n| n.1)
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "chat {chat} in order: {seqs:?}"
        );
        assert_eq!(seqs.len(), if chat == chat_a { 6 } else { 4 });
    }
    let texts: BTreeSet<String> = ok
        .iter()
        .filter_map(|u| u["message"]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(texts.len(), 8);

    // getWebhookInfo: the URL, nothing pending once confirmed, the last error.
    let deadline = Instant::now() + WAIT;
    let info = loop {
        let info = call(server.h(), &token, "getWebhookInfo", json!({})).await;
        if info.result()["pending_update_count"] == 0 {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "never confirmed: {:?}",
            info.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(info.result()["url"], url.as_str());
    assert!(
        info.result()["last_error_message"]
            .as_str()
            .is_some_and(|m| m.contains("500")),
        "{:?}",
        info.body
    );
    assert!(info.result()["last_error_date"].as_u64().is_some());

    // SIGKILL and restart with the webhook set: delivery resumes with the next ids and
    // sends nothing that was confirmed.
    server.kill();
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let alice = client(&server.addr, Some(alice_token)).await;
    let seqs = [
        post(&alice, chat_a, "after restart 1", 50).await,
        post(&alice, chat_a, "after restart 2", 51).await,
    ];
    let mut later = Vec::new();
    while later.len() < 2 {
        let (status, _, body) = deliveries
            .recv_timeout(WAIT)
            .expect("delivered after the restart");
        assert_eq!(status, 204);
        later.push((body["update_id"].as_u64().expect("id"), named(&body).1));
    }
    let last = *ids.last().expect("ids");
    assert_eq!(later, vec![(last + 1, seqs[0]), (last + 2, seqs[1])]);
    // Confirmed after the receiver's answer: wait for it before looking with getUpdates.
    let deadline = Instant::now() + WAIT;
    while call(server.h(), &token, "getWebhookInfo", json!({}))
        .await
        .result()["pending_update_count"]
        != 0
    {
        assert!(
            Instant::now() < deadline,
            "the last delivery was never confirmed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Without the webhook, getUpdates works again and has nothing left over.
    assert_eq!(
        call(server.h(), &token, "deleteWebhook", json!({}))
            .await
            .result(),
        &json!(true)
    );
    let left = call(server.h(), &token, "getUpdates", json!({})).await;
    assert_eq!(
        left.result(),
        &json!([]),
        "every delivered update was confirmed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_strangers_bad_input_and_floods_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One send per second, so the second send in a row is over the rate.
    let server = Server::start(dir.path(), &["--user-sends-per-sec", "1"]);
    let (_, _, alice) = user(&server.addr, "alice").await;
    let created = alice
        .create_bot(v1::CreateBotRequest {
            name: "strict_bot".into(),
        })
        .await
        .expect("bot");
    let token = created.token;
    let bot = created.user_id;
    let wrong_secret = format!("{bot}:{}", "0".repeat(64));
    for bad in [wrong_secret.as_str(), "garbage", "1:x", ""] {
        call(server.h(), bad, "getMe", json!({})).await.refused(401);
    }
    call(server.h(), &token, "noSuchMethod", json!({}))
        .await
        .refused(404);
    call(
        server.h(),
        &token,
        "sendMessage",
        json!({"text": "no chat"}),
    )
    .await
    .refused(400);
    call(server.h(), &token, "getUpdates", json!({"limit": 1000}))
        .await
        .refused(400);
    call(server.h(), &token, "getUpdates", json!({"timeout": 3600}))
        .await
        .refused(400);
    call(
        server.h(),
        &token,
        "sendMedia",
        json!({"chat_id": 1, "media_id": "ab"}),
    )
    .await
    .refused(400);
    let broken = http(
        server.h(),
        "POST",
        &format!("/bot{token}/getMe"),
        &[("Content-Type", "application/json")],
        b"{not json",
    )
    .await
    .expect("answer");
    broken.refused(400);
    // The body limit.
    let huge =
        json!({"chat_id": 1, "text": "x".repeat(chatlog::bot::REQUEST_BODY_BYTES_MAX)}).to_string();
    let over = http(
        server.h(),
        "POST",
        &format!("/bot{token}/sendMessage"),
        &[("Content-Type", "application/json")],
        huge.as_bytes(),
    )
    .await
    .expect("answer");
    over.refused(413);
    // A chat the bot is not in.
    let stranger = chat_with(&alice, "private", None).await;
    call(
        server.h(),
        &token,
        "sendMessage",
        json!({"chat_id": stranger, "text": "hi"}),
    )
    .await
    .refused(403);
    // A media id nobody uploaded.
    call(
        server.h(),
        &token,
        "sendMedia",
        json!({"chat_id": stranger, "media_id": "ab".repeat(32)}),
    )
    .await
    .refused(400);
    // Over the send rate: 429, retry_after in the body and the header.
    let flood = call(
        server.h(),
        &token,
        "sendMessage",
        json!({"chat_id": stranger, "text": "hi"}),
    )
    .await;
    flood.refused(429);
    assert!(
        flood.body["parameters"]["retry_after"].as_u64() >= Some(1),
        "{:?}",
        flood.body
    );
    assert!(
        flood
            .header("retry-after")
            .is_some_and(|v| v.parse::<u64>().is_ok())
    );
    // A newer long poll of the same bot supersedes the waiting one, which answers 409
    // (a client that gave up on a poll is never locked out by it).
    let http_addr = server.h().to_string();
    let t = token.clone();
    let first =
        tokio::spawn(
            async move { call(&http_addr, &t, "getUpdates", json!({"timeout": 40})).await },
        );
    let deadline = Instant::now() + WAIT;
    while !first.is_finished() {
        let newer = call(server.h(), &token, "getUpdates", json!({"timeout": 0})).await;
        // 409 too when the first poll started after this one and superseded it.
        assert!(
            newer.status == 200 || newer.status == 409,
            "{:?}",
            newer.body
        );
        assert!(
            Instant::now() < deadline,
            "the first poll was never superseded"
        );
    }
    first.await.expect("first poll").refused(409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_method_and_the_cli_makes_bots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let (_, alice_token, _alice) = user(&server.addr, "alice").await;
    // `chatlog bot create --json` and `bot list --json`.
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatlog"))
            .args(args)
            .args(["--server", &server.addr, "--token", &alice_token, "--json"])
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).expect("JSON")
    };
    let made = run(&["bot", "create", "cli_bot"]);
    let token = made["token"].as_str().expect("token").to_string();
    let bot = made["user_id"].as_u64().expect("user_id");
    let listed = run(&["bot", "list"]);
    assert_eq!(listed["bots"][0]["user_id"], bot);
    assert_eq!(listed["bots"][0]["name"], "cli_bot");
    // A new token replaces the old one.
    let renewed = run(&["bot", "token", &bot.to_string()]);
    let new_token = renewed["token"].as_str().expect("token").to_string();
    call(server.h(), &token, "getMe", json!({}))
        .await
        .refused(401);
    let token = new_token;
    assert_eq!(
        call(server.h(), &token, "getMe", json!({})).await.result()["id"],
        bot
    );

    let doc = http(server.h(), "GET", "/bot/openapi.json", &[], b"")
        .await
        .expect("GET");
    assert_eq!(doc.status, 200);
    assert!(
        doc.body["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3."))
    );
    let described: BTreeSet<String> = doc.body["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(|p| {
            p.strip_prefix("/bot{token}/")
                .expect("method path")
                .to_string()
        })
        .collect();
    let implemented: BTreeSet<String> = chatlog::bot::METHODS
        .iter()
        .map(|m| m.to_string())
        .collect();
    assert_eq!(
        described, implemented,
        "every implemented method is described, and only those"
    );
    for path in doc.body["paths"].as_object().expect("paths").values() {
        for verb in ["get", "post"] {
            let op = &path[verb];
            for code in ["200", "400", "401", "403", "404", "429"] {
                assert!(op["responses"][code].is_object(), "{verb} lacks {code}");
            }
        }
    }
    for m in &described {
        let a = call(server.h(), &token, m, json!({})).await;
        assert_ne!(a.status, 404, "{m} answers: {:?}", a.body);
        assert!(a.body["ok"].is_boolean(), "{m}: {:?}", a.body);
    }
}

/// A call retried while a follower has not applied what the leader just committed (a
/// bot created a heartbeat ago answers 401 there).
async fn call_until_ok(http_addr: &str, token: &str, method: &str, params: Value) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let a = call(http_addr, token, method, params.clone()).await;
        if a.status == 200 {
            return a.result().clone();
        }
        assert!(
            Instant::now() < deadline,
            "{method} on {http_addr}: {:?}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_one_delivery_loop_per_bot_and_any_node_answers() {
    let cluster = tokio::task::block_in_place(|| {
        Cluster::start(cluster::Options {
            http: true,
            ..cluster::Options::default()
        })
    });
    let https: Vec<String> = cluster.ids().map(|id| cluster.http_addr(id)).collect();
    // Every node's groups have a leader before the first write.
    for h in &https {
        let deadline = Instant::now() + WAIT;
        while http(h, "GET", "/ready", &[], b"").await.map(|a| a.status) != Ok(200) {
            assert!(Instant::now() < deadline, "{h} never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let anon = cluster::connect_with(
        &cluster.addr(1),
        cluster::client_options(None, Duration::from_secs(10), 0),
    )
    .await;
    let (_, alice_token) = cluster::create_and_login(&anon, "alice", "test").await;
    let alice = client(&cluster.addr(1), Some(alice_token)).await;
    let created = alice
        .create_bot(v1::CreateBotRequest {
            name: "cluster_bot".into(),
        })
        .await
        .expect("bot");
    let (bot, token) = (created.user_id, created.token);
    let chat = chat_with(&alice, "c", Some(bot)).await;
    // Every node knows the bot.
    for h in &https {
        assert_eq!(
            call_until_ok(h, &token, "getMe", json!({})).await["id"],
            bot
        );
    }
    let (hook_addr, deliveries) = receiver(1);
    let url = format!("http://{hook_addr}/hook");
    call_until_ok(
        &https[1],
        &token,
        "setWebhook",
        json!({"url": url, "secret_token": "c1"}),
    )
    .await;
    for i in 0..6 {
        post(&alice, chat, &format!("m{i}"), 1 + i).await;
    }
    // The join and six messages, each delivered once although three nodes run the bot API.
    let mut ok = Vec::new();
    let deadline = Instant::now() + WAIT;
    while ok.len() < 7 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (status, secret, body) = deliveries
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("only {} updates delivered: {ok:?}", ok.len()));
        assert_eq!(secret.as_deref(), Some("c1"));
        if status != 500 {
            ok.push(body);
        }
    }
    // Nothing more arrives: a second loop would repeat what it read before the first
    // confirmed (the supervisors look every second; wait three of their ticks).
    assert!(
        deliveries.recv_timeout(Duration::from_secs(3)).is_err(),
        "an update was delivered twice"
    );
    let ids: Vec<u64> = ok
        .iter()
        .map(|u| u["update_id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids, (1..=7).collect::<Vec<_>>());
    // The first delivery failed: every node's getWebhookInfo says so, the delivering
    // leader's as the followers' (they ask the leader, which holds the last error).
    for h in &https {
        let info = call_until_ok(h, &token, "getWebhookInfo", json!({})).await;
        assert!(
            info["last_error_message"]
                .as_str()
                .is_some_and(|m| m.contains("500")),
            "through {h}: {info}"
        );
        assert_eq!(info["url"], url.as_str());
    }
    // getUpdates through a follower once the webhook is gone: nothing left over, and a
    // new post arrives there.
    call_until_ok(&https[2], &token, "deleteWebhook", json!({})).await;
    let seq = post(&alice, chat, "after", 100).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let got = call(
            &https[2],
            &token,
            "getUpdates",
            json!({"offset": 8, "timeout": 5}),
        )
        .await;
        let got = got.result().as_array().expect("array").clone();
        if let Some(u) = got.first() {
            assert_eq!(u["update_id"], 8);
            assert_eq!(named(u).1, seq);
            break;
        }
        assert!(Instant::now() < deadline, "the post never arrived");
    }
    // Long polls of one bot made on two nodes end each other: both wait at the leader of
    // the bot's group. A 30 s poll through node 1 answers 409 soon after a poll through
    // node 2 starts.
    let first = {
        let (h, token) = (https[0].clone(), token.clone());
        tokio::spawn(async move {
            call(
                &h,
                &token,
                "getUpdates",
                json!({"offset": 9, "timeout": 30}),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let second = call(
        &https[1],
        &token,
        "getUpdates",
        json!({"offset": 9, "timeout": 1}),
    )
    .await;
    assert_eq!(
        second.result(),
        &json!([]),
        "nothing new for the second poll"
    );
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("the first poll ended by the second, not its own 30 s")
        .expect("the poll task");
    assert_eq!(first.status, 409, "{:?}", first.body);
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// `sendMedia` sends a file by its media id once the bot may read it: the file was sent to
/// a chat the bot is in. Before that the same id is refused, and a user who is not in the
/// chat cannot read the file the bot posts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_media_posts_a_file_the_bot_may_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let (_, _, alice) = user(&server.addr, "alice").await;
    let created = alice
        .create_bot(v1::CreateBotRequest {
            name: "media_bot".into(),
        })
        .await
        .expect("bot created");
    let (bot, token) = (created.user_id, created.token);
    let with_bot = chat_with(&alice, "with bot", Some(bot)).await;
    let private = chat_with(&alice, "private", None).await;

    // Alice uploads a file and shares it only in her private chat.
    let file = dir.path().join("photo.bin");
    std::fs::write(
        &file,
        (0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    )
    .expect("file written");
    let up = alice
        .upload_file(
            &file,
            chatlog_wire::client::UploadOptions {
                mime_type: "image/jpeg".into(),
                ..Default::default()
            },
            |_| {},
        )
        .await
        .expect("uploaded");
    alice
        .send_message(v1::SendMessageRequest {
            chat_id: private,
            client_message_id: 1,
            text: "mine".into(),
            media: up.media.clone(),
            reply_to_seq: 0,
        })
        .await
        .expect("shared privately");
    let params = json!({"chat_id": with_bot, "media_id": up.media_id, "caption": "look"});
    call(server.h(), &token, "sendMedia", params.clone())
        .await
        .refused(403);

    // Shared in the chat with the bot: now the bot may send it.
    alice
        .send_message(v1::SendMessageRequest {
            chat_id: with_bot,
            client_message_id: 2,
            text: "for the bot".into(),
            media: up.media.clone(),
            reply_to_seq: 0,
        })
        .await
        .expect("shared with the bot");
    let sent = call(server.h(), &token, "sendMedia", params).await;
    let seq = sent.result()["message_id"]
        .as_u64()
        .or_else(|| sent.result()["seq"].as_u64())
        .unwrap_or_else(|| panic!("a message: {}", sent.body));
    let page = alice
        .get_by_seq(v1::GetBySeqRequest {
            chat_id: with_bot,
            seqs: vec![seq],
        })
        .await
        .expect("read back");
    let Some(v1::event::Body::MessagePosted(m)) = &page.events[0].body else {
        panic!("a message at {seq}: {:?}", page.events);
    };
    assert_eq!(page.events[0].sender_id, bot, "posted by the bot");
    assert_eq!(m.text, "look");
    assert_eq!(m.media, up.media, "the bot's message carries the file");
}

/// A bot call with a JSON body and more headers.
async fn call_with(
    http_addr: &str,
    token: &str,
    method: &str,
    params: Value,
    headers: &[(&str, &str)],
) -> Answer {
    let body = params.to_string();
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    http(
        http_addr,
        "POST",
        &format!("/bot{token}/{method}"),
        &all,
        body.as_bytes(),
    )
    .await
    .unwrap_or_else(|e| panic!("{method}: {e}"))
}

/// [`call_with`] again while it answers 503 (an election, a node just killed), up to
/// [`WAIT`]: the last answer.
async fn call_through_503(
    http_addr: &str,
    token: &str,
    method: &str,
    params: Value,
    headers: &[(&str, &str)],
) -> Answer {
    let deadline = Instant::now() + WAIT;
    loop {
        let a = call_with(http_addr, token, method, params.clone(), headers).await;
        if a.status != 503 || Instant::now() > deadline {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The updates from `offset` on (confirming those below), polled until one satisfies
/// `wanted` (each poll waiting up to a second): every update seen and the next offset.
async fn updates_until(
    http_addr: &str,
    token: &str,
    mut offset: u64,
    wanted: impl Fn(&Value) -> bool,
) -> (Vec<Value>, u64) {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let got = call_through_503(
            http_addr,
            token,
            "getUpdates",
            json!({"offset": offset, "timeout": 1}),
            &[],
        )
        .await;
        let got = got.result().as_array().expect("an array").clone();
        if let Some(last) = got.last() {
            offset = last["update_id"].as_u64().expect("update_id") + 1;
        }
        let found = got.iter().any(&wanted);
        seen.extend(got);
        if found {
            return (seen, offset);
        }
        assert!(Instant::now() < deadline, "no wanted update among {seen:?}");
    }
}

/// Alice, logged in through node 3 of `cluster`, and a bot of hers in `group` (bots land
/// in their name's group: names `{prefix}{n}` are tried until one does): her client,
/// the bot's id and token, and `n`.
async fn alice_and_bot_in(
    cluster: &Cluster,
    prefix: &str,
    group: u64,
) -> (Client, u64, String, u32) {
    let anon = cluster::connect_with(
        &cluster.addr(3),
        cluster::client_options(None, Duration::from_secs(10), 5),
    )
    .await;
    let (_, alice_token) = cluster::create_and_login(&anon, "alice", "test").await;
    let alice = client(&cluster.addr(3), Some(alice_token)).await;
    let deadline = Instant::now() + WAIT;
    for n in 0.. {
        let name = format!("{prefix}{n}");
        // Right after the cluster starts a group may still be electing its leader.
        let created = loop {
            match alice
                .create_bot(v1::CreateBotRequest { name: name.clone() })
                .await
            {
                Err(e) if cluster::retryable(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                created => break created.expect("bot created"),
            }
        };
        if chatlog_raft::chat::group_of(created.user_id) == group {
            return (alice, created.user_id, created.token, n);
        }
    }
    unreachable!()
}

/// A 30 s `getUpdates` through `h` from `offset`, still waiting after half a second,
/// answers soon after `poster` posts `text` (client message id `cmid`) to `chat`, with
/// that post alone: the update.
async fn long_poll_woken_by_post(
    h: &str,
    token: &str,
    offset: u64,
    poster: &Client,
    chat: u64,
    text: &str,
    cmid: u64,
) -> Value {
    let mut poll = {
        let (h, token) = (h.to_string(), token.to_string());
        let params = json!({"offset": offset, "timeout": 30});
        tokio::spawn(async move { call(&h, &token, "getUpdates", params).await })
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut poll)
            .await
            .is_err(),
        "the long poll answered with nothing new"
    );
    let posted_at = Instant::now();
    let seq = post(poster, chat, text, cmid).await;
    let woke = tokio::time::timeout(WAIT, poll)
        .await
        .expect("the long poll answers")
        .expect("the poll task");
    assert!(
        posted_at.elapsed() < Duration::from_secs(15),
        "answered by the post, not the poll's timeout"
    );
    let got = woke.result().as_array().expect("an array").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(message_with(&got[0], text), "{got:?}");
    assert_eq!(named(&got[0]).1, seq);
    got[0].clone()
}

/// Whether update `u` is a new message with `text`.
fn message_with(u: &Value, text: &str) -> bool {
    u["message"]["text"] == text
}

/// Four nodes, three replicas per group, two groups: node 1 serves no replica of group
/// 1, which holds the bot and its chat. Every call through node 1 is answered by a node
/// that does (node 2 first, the next once node 2 is SIGKILLed) with exactly that node's
/// answer: getMe, sendMessage and its idempotent retry, editMessage, getUpdates (a long
/// poll woken by a user's post), refusals (403 for a chat the bot is not in, 401 for a
/// bad token: the same body as the node that answers directly), a 429 with its
/// `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_bots_group_forwards_its_calls() {
    use chatlog_raft::chat::group_of;
    const FAR_GROUP: u64 = 1;
    let mut options = cluster::Options::more_nodes_than_replicas();
    options.http = true;
    // A send rate the burst at the end exceeds (a burst of twice this is allowed).
    options
        .extra
        .extend(["--user-sends-per-sec".to_string(), "20".to_string()]);
    let mut cluster = tokio::task::block_in_place(|| cluster::Cluster::start(options));
    let h1 = cluster.http_addr(1);
    for id in cluster.ids() {
        let h = cluster.http_addr(id);
        let deadline = Instant::now() + WAIT;
        while http(&h, "GET", "/ready", &[], b"").await.map(|a| a.status) != Ok(200) {
            assert!(Instant::now() < deadline, "{h} never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (alice, bot, token, n) = alice_and_bot_in(&cluster, "far_bot", FAR_GROUP).await;
    // Two chats in group 1 (new chats go round-robin over the groups), the bot in one.
    let mut far_chats = Vec::new();
    while far_chats.len() < 2 {
        let chat = chat_with(&alice, "far", None).await;
        if group_of(chat) == FAR_GROUP {
            far_chats.push(chat);
        }
    }
    let (chat, without_bot) = (far_chats[0], far_chats[1]);
    alice
        .invite(v1::InviteRequest {
            chat_id: chat,
            user_id: bot,
        })
        .await
        .expect("bot invited");

    // getMe through node 1.
    let me = call_through_503(&h1, &token, "getMe", json!({}), &[]).await;
    assert_eq!(me.result()["id"], bot, "{:?}", me.body);
    assert_eq!(me.result()["username"], format!("far_bot{n}"));
    assert_eq!(me.header("content-type"), Some("application/json"));

    // A user's post reaches the bot through node 1.
    post(&alice, chat, "hello bot", 1).await;
    let (seen, mut offset) = updates_until(&h1, &token, 0, |u| message_with(u, "hello bot")).await;
    let hello = seen.iter().find(|u| message_with(u, "hello bot")).unwrap();
    assert_eq!(hello["message"]["chat"]["id"], chat);

    // sendMessage, retried with the same Idempotency-Key: one post.
    let key = [("Idempotency-Key", "forwarded-1")];
    let send = json!({"chat_id": chat, "text": "from node 1"});
    let sent = call_through_503(&h1, &token, "sendMessage", send.clone(), &key).await;
    let sent = sent.result().clone();
    assert_eq!(sent["deduplicated"], false, "{sent}");
    assert_eq!(sent["chat"]["id"], chat);
    let again = call_through_503(&h1, &token, "sendMessage", send, &key).await;
    assert_eq!(again.result()["deduplicated"], true, "{:?}", again.body);
    assert_eq!(again.result()["message_id"], sent["message_id"]);
    let history = alice
        .history(v1::HistoryRequest {
            chat_id: chat,
            from_seq: 1,
            direction: v1::Direction::Forward.into(),
            limit: 100,
        })
        .await
        .expect("history");
    let posted: Vec<u64> = history
        .events
        .iter()
        .filter(|e| matches!(&e.body, Some(v1::event::Body::MessagePosted(m)) if m.text == "from node 1"))
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        posted,
        vec![sent["message_id"].as_u64().unwrap()],
        "posted once"
    );

    // editMessage through node 1; the bot sees its post and the edit as updates.
    let edited = call_through_503(
        &h1,
        &token,
        "editMessage",
        json!({"chat_id": chat, "message_id": sent["message_id"], "text": "edited on node 2"}),
        &[],
    )
    .await;
    assert_eq!(edited.result()["text"], "edited on node 2");
    assert!(edited.result()["event_seq"].as_u64().unwrap() > sent["message_id"].as_u64().unwrap());
    let (seen, next) = updates_until(&h1, &token, offset, |u| {
        u["edited_message"]["text"] == "edited on node 2"
    })
    .await;
    assert!(
        seen.iter().any(|u| message_with(u, "from node 1")),
        "{seen:?}"
    );
    offset = next;
    // Nothing left: an empty poll.
    let empty = call_through_503(
        &h1,
        &token,
        "getUpdates",
        json!({"offset": offset, "timeout": 0}),
        &[],
    )
    .await;
    assert_eq!(empty.result(), &json!([]), "nothing left");

    // A long poll through node 1 waits until a user posts, then answers with the post.
    let woke = long_poll_woken_by_post(&h1, &token, offset, &alice, chat, "wake up", 2).await;
    offset = woke["update_id"].as_u64().unwrap() + 1;

    // Refusals come back as the answering node gives them.
    let h3 = cluster.http_addr(3);
    let not_in = json!({"chat_id": without_bot, "text": "let me in"});
    let forwarded = call_through_503(&h1, &token, "sendMessage", not_in.clone(), &[]).await;
    forwarded.refused(403);
    let direct = call_through_503(&h3, &token, "sendMessage", not_in, &[]).await;
    assert_eq!(forwarded.body, direct.body);
    let bad_token = format!("{bot}:{}", "0".repeat(64));
    let forwarded = call_through_503(&h1, &bad_token, "getMe", json!({}), &[]).await;
    forwarded.refused(401);
    let direct = call_through_503(&h3, &bad_token, "getMe", json!({}), &[]).await;
    assert_eq!(forwarded.body, direct.body);
    call_with(&h1, "nonsense", "getMe", json!({}), &[])
        .await
        .refused(401);

    // The replica node 1 sends to first (node 2) dies: the next one answers.
    tokio::task::block_in_place(|| cluster.kill(2));
    let me = call_through_503(&h1, &token, "getMe", json!({}), &[]).await;
    assert_eq!(me.result()["id"], bot, "{:?}", me.body);
    let key = [("Idempotency-Key", "after-the-kill")];
    let after = json!({"chat_id": chat, "text": "after the kill"});
    let sent = call_through_503(&h1, &token, "sendMessage", after, &key).await;
    assert_eq!(sent.result()["chat"]["id"], chat, "{:?}", sent.body);
    let (seen, _) = updates_until(&h1, &token, offset, |u| message_with(u, "after the kill")).await;
    assert!(
        seen.iter()
            .all(|u| u["update_id"].as_u64().unwrap() >= offset),
        "nothing confirmed comes again: {seen:?}"
    );

    // Over the send rate: 429 with its retry hint, in the body and the header.
    let burst: Vec<_> = (0..100)
        .map(|i| {
            let (h1, token) = (h1.clone(), token.clone());
            let params = json!({"chat_id": chat, "text": format!("burst {i}")});
            tokio::spawn(async move { call(&h1, &token, "sendMessage", params).await })
        })
        .collect();
    let mut limited = None;
    for b in burst {
        let a = b.await.expect("a burst call");
        assert!(matches!(a.status, 200 | 429), "{:?}", a.body);
        if a.status == 429 {
            limited = Some(a);
        }
    }
    let limited = limited.expect("the burst is over the rate");
    limited.refused(429);
    let retry_after = limited.body["parameters"]["retry_after"]
        .as_u64()
        .expect("retry_after");
    assert!(retry_after >= 1);
    assert_eq!(
        limited.header("retry-after"),
        Some(retry_after.to_string().as_str())
    );
}

/// Three nodes, one replica per group, two groups: the bot's group (1) is on node 2, one
/// of its chats in group 2 on node 3, and node 1 serves neither. Through node 1 (its
/// calls forwarded to node 2, which reads the chat of group 2 from node 3), the bot gets
/// every event of both chats from the one it joined on: in seq order per chat, with
/// consecutive update ids, nothing before it joined; a message of another bot (of group
/// 2) says it is from a bot; a long poll wakes for a post in the far chat;
/// `getWebhookInfo` counts the far chat's waiting updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_gets_updates_from_chats_in_groups_its_node_does_not_serve() {
    use chatlog_raft::chat::group_of;
    const BOT_GROUP: u64 = 1;
    const FAR_GROUP: u64 = 2;
    let cluster = tokio::task::block_in_place(|| {
        Cluster::start(cluster::Options {
            http: true,
            ..cluster::Options::one_replica_per_group()
        })
    });
    let h1 = cluster.http_addr(1);
    let (alice, bot, token, _) = alice_and_bot_in(&cluster, "spread_bot", BOT_GROUP).await;
    // A chat in each group; posts before the bot joins the far one are not its updates.
    let (mut near, mut far) = (None, None);
    while near.is_none() || far.is_none() {
        let chat = chat_with(&alice, "chat", None).await;
        match group_of(chat) {
            BOT_GROUP if near.is_none() => near = Some(chat),
            FAR_GROUP if far.is_none() => far = Some(chat),
            _ => {}
        }
    }
    let (near, far) = (near.unwrap(), far.unwrap());
    post(&alice, far, "before the bot", 1).await;
    for chat in [near, far] {
        alice
            .invite(v1::InviteRequest {
                chat_id: chat,
                user_id: bot,
            })
            .await
            .expect("bot invited");
    }
    let mut posted: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for i in 0..6u64 {
        let chat = if i % 2 == 0 { far } else { near };
        let seq = post(&alice, chat, &format!("post {i}"), 10 + i).await;
        posted.entry(chat).or_default().push(seq);
    }
    let info = call_through_503(&h1, &token, "getWebhookInfo", json!({}), &[]).await;
    let waiting = info.result()["pending_update_count"].as_u64().unwrap();
    assert!(
        waiting >= 6,
        "the far chat's updates are counted: {:?}",
        info.body
    );
    let (seen, offset) = updates_until(&h1, &token, 0, |u| message_with(u, "post 5")).await;
    let ids: Vec<u64> = seen
        .iter()
        .map(|u| u["update_id"].as_u64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive update ids: {ids:?}"
    );
    assert!(
        !seen.iter().any(|u| message_with(u, "before the bot")),
        "nothing from before the bot joined: {seen:?}"
    );
    for (chat, seqs) in &posted {
        let got: Vec<u64> = seen
            .iter()
            .filter(|u| u["message"]["chat"]["id"] == *chat)
            .map(|u| named(u).1)
            .collect();
        assert_eq!(&got, seqs, "chat {chat}'s posts, in order, once");
    }
    assert!(
        seen.iter()
            .all(|u| u["message"].is_null() || u["message"]["from"]["is_bot"] == false)
    );
    // Another bot, of group 2 (which node 2, answering for the first, does not serve),
    // posts in the far chat: its message comes from a bot.
    let (other, other_token) = {
        let mut n = 0;
        loop {
            let created = alice
                .create_bot(v1::CreateBotRequest {
                    name: format!("other_bot{n}"),
                })
                .await
                .expect("bot created");
            if group_of(created.user_id) == FAR_GROUP {
                break (created.user_id, created.token);
            }
            n += 1;
        }
    };
    alice
        .invite(v1::InviteRequest {
            chat_id: far,
            user_id: other,
        })
        .await
        .expect("bot invited");
    let h3 = cluster.http_addr(3);
    let said = json!({"chat_id": far, "text": "from a bot"});
    call_through_503(&h3, &other_token, "sendMessage", said, &[])
        .await
        .result();
    let (seen, offset) =
        updates_until(&h1, &token, offset, |u| message_with(u, "from a bot")).await;
    let from_bot = seen.iter().find(|u| message_with(u, "from a bot")).unwrap();
    assert_eq!(from_bot["message"]["from"]["id"], other);
    assert_eq!(from_bot["message"]["from"]["is_bot"], true, "{from_bot}");
    // A long poll through node 1 wakes for a post in the far chat.
    let woke = long_poll_woken_by_post(&h1, &token, offset, &alice, far, "far news", 99).await;
    // While a poll waits, its once-a-second looks at the far chat read heads without a
    // read barrier: an idle 3 s poll asks for the first look's barrier only (one
    // per second more before: three in this poll).
    drop(alice);
    let offset = woke["update_id"].as_u64().unwrap() + 1;
    let barriers = || async {
        let mut sum = 0;
        for n in cluster.ids() {
            sum += cluster.counter(n, "chatlog_read_barriers_total").await;
        }
        sum
    };
    let before = barriers().await;
    let idle = call(
        &h1,
        &token,
        "getUpdates",
        json!({"offset": offset, "timeout": 3}),
    )
    .await;
    assert_eq!(idle.result(), &json!([]), "nothing new came");
    let asked = barriers().await - before;
    assert!(
        asked <= 1,
        "an idle 3 s poll asked for {asked} read barriers"
    );
}
