//! Black-box: a user's chat list follows membership changes made in another group, with
//! the user's group down while they happen and the chat's node SIGKILLed before they are
//! delivered (the chat-list outbox, `chatlog_raft::chat::chat_lists`).
//!
//! Three real `chatlog serve` processes with one replica per group (`--replicas 1`), so
//! killing the node of a group makes that group unavailable. The member's group is down
//! while they are invited to one chat and added to and then removed from another; the
//! chat's node is then killed and restarted (the undelivered records must survive in its
//! replicated state), and only then does the member's node come back. The member's list
//! must end with exactly the first chat, and the owner's with both.

#[path = "common/cluster.rs"]
mod cluster;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::Client;
use chatlog_wire::proto::v1;
use cluster::{Cluster, Options};

/// Longest anything that needs an election, a restart or a delivery may take.
const WAIT: Duration = Duration::from_secs(60);
const GROUPS: u64 = 4;

async fn connect(addr: &str, token: Option<String>) -> Client {
    cluster::connect_with(
        addr,
        cluster::client_options(token, Duration::from_secs(10), 3),
    )
    .await
}

/// The chat ids in `client`'s user's list.
async fn chat_list(client: &Client) -> Result<BTreeSet<u64>, String> {
    let page = client
        .list_chats(v1::ListChatsRequest {
            after_chat_id: 0,
            limit: 100,
        })
        .await
        .map_err(|e| e.to_string())?;
    assert!(!page.has_more);
    Ok(page.chats.iter().map(|c| c.chat_id).collect())
}

/// Waits until `client`'s list is `want`, then checks it stays so for a moment.
async fn await_list(client: &Client, who: &str, want: &BTreeSet<u64>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = chat_list(client).await;
        match &got {
            Ok(list) if list == want => break,
            _ if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => panic!("{who}'s chat list: {got:?}, expected {want:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        chat_list(client).await.as_ref(),
        Ok(want),
        "{who}'s list moved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_lists_follow_membership_across_a_down_group_and_a_crash() {
    let mut c = Cluster::start(Options {
        nodes: 3,
        groups: GROUPS,
        extra: vec!["--replicas".into(), "1".into()],
        ..Options::default()
    });
    // With one replica per group, the node that leads a group is the one holding it.
    let host = |g: u64| c.leader(g, 0).0;
    let hosts: Vec<u64> = (0..=GROUPS).map(host).collect();
    eprintln!("group hosts (group 0 first): {hosts:?}");

    // Users, created until two live in groups on two different nodes.
    let any = connect(&c.addr(1), None).await;
    let mut users: Vec<(u64, String, String)> = Vec::new();
    let (owner, member) = 'found: {
        for i in 0..64 {
            let name = format!("user{i}");
            let (id, token) = cluster::create_and_login(&any, &name, "phone").await;
            users.push((id, token, name));
            for a in &users {
                for b in &users {
                    let (ga, gb) = (group_of(a.0), group_of(b.0));
                    if hosts[ga as usize] != hosts[gb as usize] {
                        break 'found (a.clone(), b.clone());
                    }
                }
            }
        }
        panic!("no two users on different nodes among {users:?}");
    };
    let (owner_host, member_host) = (
        hosts[group_of(owner.0) as usize],
        hosts[group_of(member.0) as usize],
    );
    eprintln!(
        "owner {} in group {} on node {owner_host}, member {} in group {} on node {member_host}",
        owner.2,
        group_of(owner.0),
        member.2,
        group_of(member.0)
    );

    // The member's group goes down; membership changes go on in the owner's group.
    c.kill(member_host);
    let o = connect(&c.addr(owner_host), Some(owner.1.clone())).await;
    let first = o
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group as i32,
            title: "kept".into(),
            member_ids: vec![],
        })
        .await
        .expect("chat created")
        .chat_id;
    o.invite(v1::InviteRequest {
        chat_id: first,
        user_id: member.0,
    })
    .await
    .expect("invite while the member's group is down");
    let second = o
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group as i32,
            title: "left".into(),
            member_ids: vec![],
        })
        .await
        .expect("second chat created")
        .chat_id;
    assert_eq!(group_of(first), group_of(owner.0));
    o.invite(v1::InviteRequest {
        chat_id: second,
        user_id: member.0,
    })
    .await
    .expect("invite");
    o.remove_member(v1::RemoveMemberRequest {
        chat_id: second,
        user_id: member.0,
    })
    .await
    .expect("remove");
    await_list(&o, "the owner", &BTreeSet::from([first, second])).await;
    drop(o);

    // The chats' node crashes with the member's records undelivered, and comes back.
    c.kill(owner_host);
    c.restart(owner_host);
    // Then the member's node.
    c.restart(member_host);

    let m = connect(&c.addr(member_host), Some(member.1.clone())).await;
    await_list(&m, "the member", &BTreeSet::from([first])).await;
    let o = connect(&c.addr(owner_host), Some(owner.1.clone())).await;
    await_list(&o, "the owner", &BTreeSet::from([first, second])).await;
    // The member can use the chat its list shows.
    m.send_message(v1::SendMessageRequest {
        chat_id: first,
        client_message_id: 1,
        text: "back".into(),
        ..Default::default()
    })
    .await
    .expect("the member posts in the chat its list shows");
}
