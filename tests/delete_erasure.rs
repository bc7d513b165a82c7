//! Black-box: deleting a message erases its body — from what every reader is served at
//! once, and from the disk once its segment is compacted — together with the text of
//! every edit of it; other messages are untouched, and all of it holds after a SIGKILL
//! and restart.
//!
//! A real `chatlog serve` with 1 MiB segments; its data directory is scanned byte by byte
//! for unique markers in the texts (found before the delete, which shows the scan can
//! find them; gone after `POST /admin/compact`).

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/disk.rs"]
mod disk;
#[path = "common/server.rs"]
mod server;

use std::path::Path;
use std::time::Duration;

use chatlog_wire::client::Client;
use chatlog_wire::proto::v1::{self, event::Body};
use disk::{compact, disk_contains};

fn start(dir: &Path, listen: &str) -> server::Server {
    let mut flags = vec!["--http", "127.0.0.1:0", "--segment-mb", "1"];
    flags.extend(server::NO_RATE_LIMITS);
    server::Server::start_on(dir, listen, &flags)
}

fn marker(what: &str) -> String {
    format!("BODY-{what}-{:016x}", rand::random::<u64>())
}

async fn history(client: &Client, chat: u64) -> Vec<v1::Event> {
    client
        .history(v1::HistoryRequest {
            chat_id: chat,
            from_seq: 1,
            direction: v1::Direction::Forward as i32,
            limit: 100,
        })
        .await
        .expect("history")
        .events
}

/// Checks what readers are served: the deleted post and its edit erased, the kept post
/// whole, the deletion recorded.
fn check_served(events: &[v1::Event], deleted_seq: u64, kept: &str) {
    let mut saw = (false, false, false, false);
    for e in events {
        match e.body.as_ref().expect("body") {
            Body::MessagePosted(p) if e.seq == deleted_seq => {
                assert!(p.erased && p.text.is_empty(), "deleted post served: {p:?}");
                saw.0 = true;
            }
            Body::MessagePosted(p) => {
                assert_eq!(p.text, kept);
                assert!(!p.erased);
                saw.1 = true;
            }
            Body::MessageEdited(m) => {
                assert_eq!(m.target_seq, deleted_seq);
                assert!(m.erased && m.text.is_empty(), "edit served: {m:?}");
                saw.2 = true;
            }
            Body::MessageDeleted(d) => {
                assert_eq!(d.target_seq, deleted_seq);
                saw.3 = true;
            }
            _ => {}
        }
    }
    assert_eq!(saw, (true, true, true, true), "events: {events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_message_erases_its_body_and_its_edits_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), "127.0.0.1:0");
    let listen = srv.addr.clone();
    let http = srv.http.clone().expect("http");
    let a = cluster::connect_with(
        &listen,
        cluster::client_options(None, Duration::from_secs(10), 1),
    )
    .await;
    let (_, token) = cluster::create_and_login(&a, "ann", "phone").await;
    let b = cluster::connect_with(
        &listen,
        cluster::client_options(None, Duration::from_secs(10), 1),
    )
    .await;
    let (bob, _) = cluster::create_and_login(&b, "bob", "phone").await;
    let chat = a
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group as i32,
            title: "erasure".into(),
            member_ids: vec![bob],
        })
        .await
        .expect("chat")
        .chat_id;

    let (original, edited, kept) = (marker("original"), marker("edited"), marker("kept"));
    let send = |text: String, id: u64| {
        let a = &a;
        async move {
            a.send_message(v1::SendMessageRequest {
                chat_id: chat,
                client_message_id: id,
                text,
                ..Default::default()
            })
            .await
            .expect("send")
            .seq
        }
    };
    let deleted_seq = send(original.clone(), 1).await;
    a.edit_message(v1::EditMessageRequest {
        chat_id: chat,
        seq: deleted_seq,
        text: edited.clone(),
    })
    .await
    .expect("edit");
    send(kept.clone(), 2).await;
    for m in [&original, &edited, &kept] {
        assert!(
            disk_contains(dir.path(), m.as_bytes()).is_some(),
            "{m} not found on disk before the delete: the scan proves nothing"
        );
    }

    a.delete_message(v1::DeleteMessageRequest {
        chat_id: chat,
        seq: deleted_seq,
    })
    .await
    .expect("delete");
    // A deleted message cannot be edited back to life.
    let e = a
        .edit_message(v1::EditMessageRequest {
            chat_id: chat,
            seq: deleted_seq,
            text: "again".into(),
        })
        .await
        .expect_err("editing a deleted message is refused");
    eprintln!("edit after delete: {e}");
    check_served(&history(&a, chat).await, deleted_seq, &kept);
    check_served(&history(&b, chat).await, deleted_seq, &kept);

    compact(&http).await;
    for m in [&original, &edited] {
        assert_eq!(
            disk_contains(dir.path(), m.as_bytes()),
            None,
            "{m} is still on disk after the delete and compaction"
        );
    }
    assert!(disk_contains(dir.path(), kept.as_bytes()).is_some());

    // After a SIGKILL and restart: the same history, nothing back on disk.
    srv.kill();
    let srv = start(dir.path(), &listen);
    let a = cluster::connect_with(
        &srv.addr,
        cluster::client_options(Some(token), Duration::from_secs(10), 3),
    )
    .await;
    check_served(&history(&a, chat).await, deleted_seq, &kept);
    for m in [&original, &edited] {
        assert_eq!(
            disk_contains(dir.path(), m.as_bytes()),
            None,
            "{m} came back"
        );
    }
}
