//! Rules of the chat state: every refusal the issue names, dense seqs, de-duplication,
//! and deterministic, round-tripping checkpoint bytes.

use super::command::{ChatKind, Command, Outcome, RefusalCode, Role};
use super::state::{EventKind, GroupState};
use super::{group_of, make_id};

const G: u64 = 3;

struct T {
    st: GroupState,
    index: u64,
    ts: u64,
}

impl T {
    fn new() -> T {
        T {
            st: GroupState::new(G),
            index: 0,
            ts: 1_000,
        }
    }

    fn run(&mut self, cmd: Command) -> Outcome {
        self.index += 1;
        self.ts += 1;
        self.st.apply(&cmd, self.ts, self.index, 0)
    }

    fn user(&mut self, name: &str) -> u64 {
        match self.run(Command::CreateUser {
            name: name.into(),
            login_token_hash: [1; 32],
        }) {
            Outcome::UserCreated { user } => user,
            o => panic!("create user {name}: {o:?}"),
        }
    }

    fn chat(&mut self, creator: u64, kind: ChatKind, members: &[u64]) -> u64 {
        let title = if kind == ChatKind::Direct { "" } else { "t" };
        match self.run(Command::CreateChat {
            creator,
            kind,
            title: title.into(),
            members: members.to_vec(),
        }) {
            Outcome::Event { chat, seq: 1, .. } => chat,
            o => panic!("create chat: {o:?}"),
        }
    }

    fn post(&mut self, chat: u64, sender: u64, cmid: u64) -> Outcome {
        self.run(Command::Post {
            chat,
            sender,
            client_message_id: cmid,
            text: "hi".into(),
            media: None,
            reply_to: 0,
        })
    }
}

fn seq(o: &Outcome) -> u64 {
    match o {
        Outcome::Event { seq, .. } => *seq,
        o => panic!("expected an event, got {o:?}"),
    }
}

fn refused(o: &Outcome, code: RefusalCode) {
    match o {
        Outcome::Refused(r) => assert_eq!(r.code, code, "{}", r.message),
        o => panic!("expected a {code:?} refusal, got {o:?}"),
    }
}

#[test]
fn users_have_unique_handles_and_ids_in_their_group() {
    let mut t = T::new();
    let a = t.user("alice");
    assert_eq!(group_of(a), G);
    assert_eq!(a, make_id(G, 1));
    refused(
        &t.run(Command::CreateUser {
            name: "alice".into(),
            login_token_hash: [0; 32],
        }),
        RefusalCode::Conflict,
    );
    refused(
        &t.run(Command::CreateUser {
            name: "Bad Name".into(),
            login_token_hash: [0; 32],
        }),
        RefusalCode::BadRequest,
    );
    assert_eq!(t.st.user_by_name("alice"), Some(a));
}

#[test]
fn login_checks_the_token_and_replaces_a_device_session() {
    let mut t = T::new();
    let a = t.user("alice");
    let login = |hash: [u8; 32], device: &str, session: u8| Command::Login {
        user: a,
        login_token_hash: hash,
        device_id: device.into(),
        device_name: "d".into(),
        session_token_hash: [session; 32],
    };
    refused(
        &t.run(login([2; 32], "phone", 5)),
        RefusalCode::Unauthenticated,
    );
    let first = t.run(login([1; 32], "phone", 5));
    assert_eq!(
        first,
        Outcome::LoggedIn {
            user: a,
            session_id: 1
        }
    );
    assert_eq!(t.st.session_by_token(a, &[5; 32]), Some(1));
    t.run(login([1; 32], "phone", 6));
    assert_eq!(t.st.session_by_token(a, &[5; 32]), None, "replaced");
    assert_eq!(t.st.session_by_token(a, &[6; 32]), Some(2));
    t.run(login([1; 32], "laptop", 7));
    assert_eq!(t.st.sessions(a).len(), 2);
    let revoke = t.run(Command::RevokeSession {
        user: a,
        session_id: 2,
    });
    assert!(matches!(revoke, Outcome::UserEvent { seq: 1, .. }));
    assert_eq!(t.st.session_by_token(a, &[6; 32]), None);
}

#[test]
fn seqs_are_dense_and_retries_return_the_original_seq() {
    let mut t = T::new();
    let (a, b) = (t.user("a"), t.user("b"));
    let c = t.chat(a, ChatKind::Group, &[b]);
    let mut expected = 2;
    for i in 1..=50 {
        let sender = if i % 2 == 0 { a } else { b };
        assert_eq!(seq(&t.post(c, sender, i)), expected);
        expected += 1;
    }
    // A retry, even much later, returns the original seq and appends nothing.
    let again = t.post(c, b, 1);
    assert!(matches!(
        again,
        Outcome::Event {
            seq: 2,
            deduplicated: true,
            ..
        }
    ));
    // The same client id from another sender is a different message.
    assert_eq!(seq(&t.post(c, a, 1)), expected);
    assert_eq!(t.st.chat(c).expect("chat").head_seq, expected);
    let locs = t.st.chat_events(c, 1, 100).expect("chat");
    assert_eq!(locs.len() as u64, expected);
    for (i, (s, loc)) in locs.iter().enumerate() {
        assert_eq!(*s, i as u64 + 1);
        if *s > 1 {
            assert_eq!(loc.kind(), EventKind::MessagePosted);
        }
    }
}

#[test]
fn permissions_are_enforced() {
    let mut t = T::new();
    let (owner, m, x, y) = (t.user("o"), t.user("m"), t.user("x"), t.user("y"));
    let g = t.chat(owner, ChatKind::Group, &[m]);
    // A non-member cannot post.
    refused(&t.post(g, x, 1), RefusalCode::PermissionDenied);
    // A plain member cannot invite, ban or pin.
    refused(
        &t.run(Command::Invite {
            chat: g,
            actor: m,
            user: x,
        }),
        RefusalCode::PermissionDenied,
    );
    // Groups are joined by invitation only.
    refused(
        &t.run(Command::Join { chat: g, actor: x }),
        RefusalCode::PermissionDenied,
    );
    // A banned user cannot be invited or rejoin.
    seq(&t.run(Command::Ban {
        chat: g,
        actor: owner,
        user: x,
    }));
    refused(
        &t.run(Command::Invite {
            chat: g,
            actor: owner,
            user: x,
        }),
        RefusalCode::PermissionDenied,
    );
    // The owner cannot leave or be removed.
    refused(
        &t.run(Command::Leave {
            chat: g,
            actor: owner,
        }),
        RefusalCode::PermissionDenied,
    );
    // Channels: subscribers join but cannot post; banned users cannot join.
    let ch = t.chat(owner, ChatKind::Channel, &[]);
    seq(&t.run(Command::Join { chat: ch, actor: y }));
    refused(&t.post(ch, y, 1), RefusalCode::PermissionDenied);
    seq(&t.post(ch, owner, 1));
    seq(&t.run(Command::Ban {
        chat: ch,
        actor: owner,
        user: y,
    }));
    assert_eq!(t.st.role(ch, y), None, "ban removes the member");
    refused(
        &t.run(Command::Join { chat: ch, actor: y }),
        RefusalCode::PermissionDenied,
    );
    seq(&t.run(Command::Unban {
        chat: ch,
        actor: owner,
        user: y,
    }));
    seq(&t.run(Command::Join { chat: ch, actor: y }));
    // Roles: an admin invites; only the owner changes roles.
    seq(&t.run(Command::SetRole {
        chat: g,
        actor: owner,
        user: m,
        role: Role::Admin,
    }));
    seq(&t.run(Command::Invite {
        chat: g,
        actor: m,
        user: y,
    }));
    refused(
        &t.run(Command::SetRole {
            chat: g,
            actor: m,
            user: y,
            role: Role::Admin,
        }),
        RefusalCode::PermissionDenied,
    );
}

#[test]
fn edits_deletes_reactions_and_pins_follow_the_rules() {
    let mut t = T::new();
    let (a, b) = (t.user("a"), t.user("b"));
    let g = t.chat(a, ChatKind::Group, &[b]);
    let msg = seq(&t.post(g, b, 1));
    let edit = |sender, text: &str| Command::Edit {
        chat: g,
        sender,
        target: msg,
        text: text.into(),
    };
    refused(&t.run(edit(a, "x")), RefusalCode::PermissionDenied);
    seq(&t.run(edit(b, "better")));
    // Editing an event that is not a message fails.
    refused(
        &t.run(Command::Edit {
            chat: g,
            sender: a,
            target: 1,
            text: "x".into(),
        }),
        RefusalCode::NotFound,
    );
    seq(&t.run(Command::React {
        chat: g,
        sender: a,
        target: msg,
        reaction: "+1".into(),
        add: true,
    }));
    seq(&t.run(Command::Pin {
        chat: g,
        sender: a,
        target: msg,
        pin: true,
    }));
    refused(
        &t.run(Command::Pin {
            chat: g,
            sender: a,
            target: msg,
            pin: true,
        }),
        RefusalCode::Conflict,
    );
    // The owner (an admin) deletes b's message; it is then gone for edits.
    seq(&t.run(Command::Delete {
        chat: g,
        sender: a,
        target: msg,
    }));
    let loc = t.st.chat_events(g, msg, msg).expect("chat")[0].1;
    assert!(loc.erased());
    refused(&t.run(edit(b, "again")), RefusalCode::NotFound);
    // Direct chats: created once per pair, both may pin, nobody else may post.
    let d = t.chat(a, ChatKind::Direct, &[b]);
    assert_eq!(
        t.chat(b, ChatKind::Direct, &[a]),
        d,
        "one direct chat per pair"
    );
    let dm = seq(&t.post(d, a, 9));
    seq(&t.run(Command::Pin {
        chat: d,
        sender: b,
        target: dm,
        pin: true,
    }));
    refused(
        &t.run(Command::Delete {
            chat: d,
            sender: b,
            target: dm,
        }),
        RefusalCode::PermissionDenied,
    );
}

#[test]
fn read_markers_only_move_forward() {
    let mut t = T::new();
    let a = t.user("a");
    let mark = |seq| Command::MarkRead {
        user: a,
        chat: 77,
        seq,
    };
    assert!(matches!(
        t.run(mark(5)),
        Outcome::UserEvent {
            seq: 1,
            read_seq: 5,
            ..
        }
    ));
    assert!(matches!(
        t.run(mark(3)),
        Outcome::UserEvent {
            seq: 0,
            read_seq: 5,
            ..
        }
    ));
    assert_eq!(t.st.read_marker(a, 77), 5);
    t.run(Command::UserChatAdded { user: a, chat: 77 });
    assert_eq!(t.st.user_chats(a, 0, 10), (vec![77], false));
    assert_eq!(t.st.user(a).expect("user").log_head, 2);
}

/// Random command streams: two replicas applying the same stream (one of them taking the
/// in-place path for posts) reach byte-identical checkpoints, decoding a checkpoint gives back the state, and every chat's seqs are
/// dense.
#[test]
fn random_streams_are_deterministic_and_checkpoints_round_trip() {
    let (_seed, mut next) = crate::chat::test_rng::seeded();
    let mut a = T::new();
    let mut b = GroupState::new(G);
    let users: Vec<u64> = (0..8).map(|i| a.user(&format!("u{i}"))).collect();
    for i in 0..8 {
        let cmd = Command::CreateUser {
            name: format!("u{i}"),
            login_token_hash: [1; 32],
        };
        b.apply(&cmd, 1_000 + i + 1, i + 1, 0);
    }
    let mut chats = Vec::new();
    for step in 0..3000u64 {
        let u = users[next(8) as usize];
        let other = users[next(8) as usize];
        let chat = if chats.is_empty() || next(20) == 0 {
            None
        } else {
            Some(chats[next(chats.len() as u64) as usize])
        };
        let cmd = match (chat, next(9)) {
            (None, _) => Command::CreateChat {
                creator: u,
                kind: [ChatKind::Group, ChatKind::Channel, ChatKind::Direct][next(3) as usize],
                title: String::new(),
                members: vec![other],
            },
            (Some(c), 0) => Command::Invite {
                chat: c,
                actor: u,
                user: other,
            },
            (Some(c), 1) => Command::Ban {
                chat: c,
                actor: u,
                user: other,
            },
            (Some(c), 2) => Command::Join { chat: c, actor: u },
            (Some(c), 3) => Command::Delete {
                chat: c,
                sender: u,
                target: next(20),
            },
            (Some(c), 4) => Command::Leave { chat: c, actor: u },
            (Some(c), _) => Command::Post {
                chat: c,
                sender: u,
                client_message_id: next(30) + 1,
                text: "m".into(),
                media: None,
                reply_to: 0,
            },
        };
        // Direct chats need no title; groups and channels do: fix up so both kinds occur.
        let cmd = match cmd {
            Command::CreateChat {
                creator,
                kind,
                members,
                ..
            } => Command::CreateChat {
                creator,
                kind,
                title: if kind == ChatKind::Direct {
                    String::new()
                } else {
                    "t".into()
                },
                members,
            },
            c => c,
        };
        let oa = a.run(cmd.clone());
        // Replica b applies posts through the in-place fast path, from the batch bytes.
        let batch = super::command::DecodedBatch::parse(
            super::command::Batch {
                timestamp_ms: a.ts,
                commands: vec![cmd.clone()],
            }
            .encode(),
        )
        .expect("parses");
        let ob = match batch.post_fields(0) {
            Some(p) => {
                assert!(
                    matches!(cmd, Command::Post { .. }),
                    "fast path only for posts"
                );
                b.apply_post(&p, a.ts, a.index, 0)
            }
            None => {
                assert!(
                    !matches!(cmd, Command::Post { .. }),
                    "every post takes the fast path"
                );
                b.apply(&cmd, a.ts, a.index, 0)
            }
        };
        assert_eq!(oa, ob, "step {step}: replicas disagree");
        if let Outcome::Event {
            chat,
            seq: 1,
            deduplicated: false,
            ..
        } = oa
            && !chats.contains(&chat)
        {
            chats.push(chat);
        }
    }
    let bytes = a.st.encode();
    assert_eq!(bytes, b.encode(), "checkpoints differ");
    let back = GroupState::decode(&bytes).expect("decodes");
    assert_eq!(back, a.st);
    for len in [0, 1, 9, bytes.len() / 2, bytes.len() - 1] {
        assert!(GroupState::decode(&bytes[..len]).is_err(), "prefix {len}");
    }
    for c in &chats {
        let view = a.st.chat(*c).expect("chat");
        let locs = a.st.chat_events(*c, 1, u64::MAX).expect("chat");
        assert_eq!(locs.len() as u64, view.head_seq);
        assert!(
            locs.iter()
                .enumerate()
                .all(|(i, (s, _))| *s == i as u64 + 1)
        );
    }
}

/// The chat-list outbox: membership changes in a chat's group reach the members' own
/// group exactly once and in order, however often a delivery is repeated or replayed
/// late, and the outbox survives a checkpoint.
#[test]
fn chat_list_changes_reach_the_members_group_once_and_in_order() {
    use super::chat_lists::plan_round;
    let mut chats = T::new(); // group G
    let mut users = T {
        st: GroupState::new(5),
        index: 0,
        ts: 1_000,
    };
    let a = users.user("ann");
    let b = users.user("bob");
    assert_eq!((group_of(a), group_of(b)), (5, 5));
    let c = chats.chat(a, ChatKind::Group, &[b]);
    let pending = |t: &T| -> Vec<(u64, u64, bool)> {
        t.st.chat_lists()
            .oldest(100)
            .iter()
            .map(|r| (r.user, r.chat, r.added))
            .collect()
    };
    assert_eq!(pending(&chats), vec![(a, c, true), (b, c, true)]);
    seq(&chats.run(Command::Leave { chat: c, actor: b }));
    seq(&chats.run(Command::Invite {
        chat: c,
        actor: a,
        user: b,
    }));
    seq(&chats.run(Command::RemoveMember {
        chat: c,
        actor: a,
        user: b,
    }));
    // A refused change records nothing.
    refused(
        &chats.run(Command::Leave { chat: c, actor: b }),
        RefusalCode::PermissionDenied,
    );
    assert_eq!(chats.st.chat_lists().pending(), 5);

    // Drain in rounds as the leader does, repeating every delivery and replaying the
    // first round's deliveries again at the end (a deposed leader's late retry).
    let mut first_round = Vec::new();
    let mut rounds = 0;
    loop {
        let records = chats.st.chat_lists().oldest(4096);
        if records.is_empty() {
            break;
        }
        rounds += 1;
        let plan = plan_round(&records, group_of);
        assert_eq!(plan.keys().copied().collect::<Vec<_>>(), vec![5]);
        let upto = plan.values().flatten().map(|r| r.no).max().unwrap();
        for (_, records) in plan {
            let cmd = Command::ChatListDelivery { source: G, records };
            users.run(cmd.clone());
            assert_eq!(
                users.run(cmd.clone()),
                Outcome::ChatListsDelivered { users: vec![] }
            );
            if first_round.is_empty() {
                first_round.push(cmd);
            }
        }
        assert!(matches!(
            chats.run(Command::ChatListAcked { upto }),
            Outcome::ChatLists { .. }
        ));
    }
    // b's four changes need four rounds (one record per user per delivery).
    assert_eq!(rounds, 4);
    for cmd in first_round {
        assert_eq!(
            users.run(cmd),
            Outcome::ChatListsDelivered { users: vec![] }
        );
    }
    assert_eq!(chats.st.chat_lists().pending(), 0);
    assert_eq!(chats.st.chat_lists().acked(), 5);
    assert_eq!(users.st.user_chats(a, 0, 10), (vec![c], false));
    assert_eq!(users.st.user_chats(b, 0, 10), (vec![], false));
    let kinds = |u| -> Vec<EventKind> {
        users
            .st
            .user_events(u, 1, 100)
            .unwrap()
            .iter()
            .map(|(_, l)| l.kind())
            .collect()
    };
    assert_eq!(kinds(a), vec![EventKind::ChatAdded]);
    assert_eq!(
        kinds(b),
        vec![
            EventKind::ChatAdded,
            EventKind::ChatRemoved,
            EventKind::ChatAdded,
            EventKind::ChatRemoved
        ]
    );
    assert_eq!(users.st.chat_lists().delivered_from(G), 5);
    // An acknowledgement past the end is refused.
    refused(
        &chats.run(Command::ChatListAcked { upto: 6 }),
        RefusalCode::BadRequest,
    );

    // Pending records and delivery marks survive a checkpoint.
    seq(&chats.run(Command::Invite {
        chat: c,
        actor: a,
        user: b,
    }));
    for st in [&chats.st, &users.st] {
        let bytes = st.encode();
        let back = GroupState::decode(&bytes).expect("decode");
        assert_eq!(&back, st);
        assert_eq!(back.encode(), bytes);
    }
}

/// A full outbox refuses membership changes and leaves the chat as it was.
#[test]
fn a_full_chat_list_outbox_refuses_membership_changes() {
    use super::chat_lists::OUTBOX_RECORDS_MAX;
    let mut t = T::new();
    let a = t.user("ann");
    let c = t.chat(a, ChatKind::Group, &[]);
    let already = t.st.chat_lists().pending();
    for i in already..OUTBOX_RECORDS_MAX {
        t.st.chat_lists_mut().push(a, i as u64, true);
    }
    let before = t.st.encode();
    refused(
        &t.run(Command::Invite {
            chat: c,
            actor: a,
            user: make_id(9, 1),
        }),
        RefusalCode::Conflict,
    );
    refused(
        &t.run(Command::CreateChat {
            creator: a,
            kind: ChatKind::Group,
            title: "t".into(),
            members: vec![],
        }),
        RefusalCode::Conflict,
    );
    assert_eq!(t.st.encode(), before, "a refused change changed the state");
    // Posts do not touch chat lists and still go through.
    seq(&t.post(c, a, 1));
}

/// Deleting a message erases it and every edit of it, records one erasure per command
/// for the erasers, and survives a checkpoint; other messages are untouched.
#[test]
fn a_delete_erases_the_message_and_its_edits() {
    let mut t = T::new();
    let a = t.user("ann");
    let c = t.chat(a, ChatKind::Group, &[]);
    let m = seq(&t.post(c, a, 1));
    let other = seq(&t.post(c, a, 2));
    let edit = |t: &mut T, text: &str| {
        seq(&t.run(Command::Edit {
            chat: c,
            sender: a,
            target: m,
            text: text.into(),
        }))
    };
    let e1 = edit(&mut t, "one");
    let e2 = edit(&mut t, "two");
    let (_, before) = t.st.secret().erasures_after(0);
    // The edits are remembered in the checkpoint before the delete.
    let bytes = t.st.encode();
    assert_eq!(GroupState::decode(&bytes).expect("decode"), t.st);
    seq(&t.run(Command::Delete {
        chat: c,
        sender: a,
        target: m,
    }));
    for s in [m, e1, e2] {
        assert!(t.st.event_erased(c, s), "seq {s} not erased");
    }
    assert!(!t.st.event_erased(c, other));
    let (due, total) = t.st.secret().erasures_after(before);
    assert_eq!(total, before + 3);
    // Each erasure names the command of one of the three events.
    let mut locs: Vec<(u64, u32)> = due.iter().map(|e| (e.raft_index, e.pos)).collect();
    locs.sort_unstable();
    let mut want: Vec<(u64, u32)> =
        t.st.chat_events(c, m, e2)
            .expect("events")
            .into_iter()
            .filter(|(s, _)| [m, e1, e2].contains(s))
            .map(|(_, l)| (l.raft_index(), l.pos() as u32))
            .collect();
    want.sort_unstable();
    assert_eq!(locs, want);
    refused(
        &t.run(Command::Edit {
            chat: c,
            sender: a,
            target: m,
            text: "back".into(),
        }),
        RefusalCode::NotFound,
    );
    let bytes = t.st.encode();
    assert_eq!(GroupState::decode(&bytes).expect("decode"), t.st);
}
