//! Rules of secret chats in the state: who may send and acknowledge, counters only
//! increase, acks and expiry erase (and record the erasure), limits, and deterministic,
//! round-tripping checkpoint bytes with secret state in them.

use super::command::{Command, Outcome, RefusalCode};
use super::secret::{SECRET_TTL_MS_MIN, SecretApplied, SecretCommand};
use super::state::GroupState;

const G: u64 = 5;

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

    fn run_at(&mut self, ts: u64, cmd: SecretCommand) -> Outcome {
        self.index += 1;
        self.ts = ts;
        self.st.apply(&Command::Secret(cmd), ts, self.index, 0)
    }

    fn run(&mut self, cmd: SecretCommand) -> Outcome {
        let ts = self.ts + 1;
        self.run_at(ts, cmd)
    }

    fn user(&mut self, name: &str) -> u64 {
        self.index += 1;
        self.ts += 1;
        match self.st.apply(
            &Command::CreateUser {
                name: name.into(),
                login_token_hash: [1; 32],
            },
            self.ts,
            self.index,
            0,
        ) {
            Outcome::UserCreated { user } => user,
            o => panic!("{o:?}"),
        }
    }

    fn start(&mut self, a: u64, b: u64, eph: u8) -> u64 {
        match self.run(SecretCommand::Start {
            initiator: a,
            initiator_device: "phone".into(),
            initiator_key: [1; 32],
            ephemeral_key: [eph; 32],
            responder: b,
            responder_device: "laptop".into(),
            responder_key: [2; 32],
        }) {
            Outcome::Secret(SecretApplied { chat, .. }) => chat,
            o => panic!("{o:?}"),
        }
    }

    fn send(&mut self, chat: u64, user: u64, device: &str, counter: u64, ttl_ms: u64) -> Outcome {
        self.run(SecretCommand::Send {
            chat,
            sender: user,
            sender_device: device.into(),
            counter,
            epoch: 0,
            ttl_ms,
            self_destruct_s: 0,
            ciphertext: vec![7; 32],
        })
    }
}

fn refused(o: &Outcome, code: RefusalCode) {
    match o {
        Outcome::Refused(r) => assert_eq!(r.code, code, "{}", r.message),
        o => panic!("expected a {code:?} refusal, got {o:?}"),
    }
}

fn n(o: &Outcome) -> u64 {
    match o {
        Outcome::Secret(a) => a.n,
        o => panic!("expected a secret outcome, got {o:?}"),
    }
}

#[test]
fn keys_are_published_for_users_of_the_group_only() {
    let mut t = T::new();
    let a = t.user("alice");
    let o = t.run(SecretCommand::PublishKey {
        user: a,
        device: "phone".into(),
        public_key: [9; 32],
    });
    assert_eq!(n(&o), 0);
    assert_eq!(t.st.secret().device_key(a, "phone"), Some([9; 32]));
    assert_eq!(t.st.secret().device_key(a, "laptop"), None);
    refused(
        &t.run(SecretCommand::PublishKey {
            user: a + (1 << 16),
            device: "phone".into(),
            public_key: [9; 32],
        }),
        RefusalCode::NotFound,
    );
    // A device list needs a published key first.
    refused(
        &t.run(SecretCommand::DeviceChat {
            user: a,
            device: "laptop".into(),
            chat: 1,
        }),
        RefusalCode::NotFound,
    );
    t.run(SecretCommand::DeviceChat {
        user: a,
        device: "phone".into(),
        chat: 77,
    });
    assert_eq!(t.st.secret().device_chats(a, "phone"), vec![77]);
}

#[test]
fn only_the_two_devices_send_and_only_the_target_acknowledges() {
    let mut t = T::new();
    let (a, b) = (t.user("alice"), t.user("bob"));
    let chat = t.start(a, b, 3);
    // A repeated start returns the same chat.
    assert_eq!(t.start(a, b, 3), chat);
    assert_ne!(t.start(a, b, 4), chat);
    assert_eq!(n(&t.send(chat, a, "phone", 1, 60_000)), 1);
    assert_eq!(n(&t.send(chat, b, "laptop", 1, 60_000)), 2);
    // Another device of the same user is not part of the chat.
    refused(
        &t.send(chat, a, "tablet", 2, 60_000),
        RefusalCode::PermissionDenied,
    );
    refused(
        &t.send(chat + (10 << 16), a, "phone", 2, 60_000),
        RefusalCode::NotFound,
    );
    // Counters only increase, per direction.
    refused(&t.send(chat, a, "phone", 1, 60_000), RefusalCode::Conflict);
    refused(&t.send(chat, a, "phone", 0, 60_000), RefusalCode::Conflict);
    refused(&t.send(chat, a, "phone", 5, 10), RefusalCode::BadRequest);
    assert_eq!(n(&t.send(chat, a, "phone", 5, 60_000)), 3);
    let to_b = t.st.secret().pending_to(chat, 1);
    assert_eq!(
        to_b.iter().map(|p| p.counter).collect::<Vec<_>>(),
        vec![1, 5]
    );
    assert_eq!(t.st.secret().pending_to(chat, 0).len(), 1);
    // The sender cannot acknowledge its own messages away; a third device cannot either.
    let ack = |user, device: &str, counter| SecretCommand::Ack {
        chat,
        user,
        device: device.into(),
        counter,
    };
    assert_eq!(
        n(&t.run(ack(a, "phone", 5))),
        1,
        "acks the one message to alice only"
    );
    assert_eq!(t.st.secret().pending_to(chat, 1).len(), 2);
    assert_eq!(t.st.secret().pending_to(chat, 0).len(), 0);
    refused(&t.run(ack(b, "tablet", 5)), RefusalCode::PermissionDenied);
    assert_eq!(n(&t.run(ack(b, "laptop", 1))), 1);
    assert_eq!(t.st.secret().pending_to(chat, 1).len(), 1);
    assert_eq!(n(&t.run(ack(b, "laptop", 9))), 1);
    assert_eq!(t.st.secret().pending_count(), 0);
    let (erasures, total) = t.st.secret().erasures_after(0);
    assert_eq!(total, 3);
    assert_eq!(erasures.iter().map(|e| e.no).collect::<Vec<_>>(), [1, 2, 3]);
}

#[test]
fn pending_messages_are_found_by_the_entries_holding_them() {
    let mut t = T::new();
    let (a, b) = (t.user("alice"), t.user("bob"));
    let chat = t.start(a, b, 3);
    // Each send is one entry (`T::run`): remember which.
    let mut at = Vec::new();
    for counter in 1..=6 {
        t.send(chat, a, "phone", counter, 60_000);
        at.push((t.index, counter));
    }
    // An entry with no message in between.
    t.user("carol");
    t.send(chat, b, "laptop", 1, 60_000);
    at.push((t.index, 1));
    let counters = |after: u64, through: u64| -> Vec<u64> {
        t.st.secret()
            .pending_in_entries(after, through)
            .iter()
            .map(|p| {
                assert!(p.raft_index > after && p.raft_index <= through);
                p.counter
            })
            .collect()
    };
    let expected = |after: u64, through: u64| -> Vec<u64> {
        at.iter()
            .filter(|(i, _)| *i > after && *i <= through)
            .map(|(_, c)| *c)
            .collect()
    };
    let last = t.index;
    for after in 0..=last {
        for through in after..=last + 1 {
            assert_eq!(
                counters(after, through),
                expected(after, through),
                "({after}, {through}]"
            );
        }
    }
    // An acknowledged message is no longer pending, wherever it was.
    t.run(SecretCommand::Ack {
        chat,
        user: b,
        device: "laptop".into(),
        counter: 3,
    });
    assert_eq!(
        t.st.secret()
            .pending_in_entries(0, last)
            .iter()
            .map(|p| p.counter)
            .collect::<Vec<_>>(),
        vec![4, 5, 6, 1]
    );
}

#[test]
fn messages_expire_by_batch_timestamps() {
    let mut t = T::new();
    let (a, b) = (t.user("alice"), t.user("bob"));
    let chat = t.start(a, b, 3);
    let sent_at = t.ts + 1;
    t.send(chat, a, "phone", 1, SECRET_TTL_MS_MIN);
    t.send(chat, a, "phone", 2, 10 * SECRET_TTL_MS_MIN);
    assert_eq!(
        t.st.secret().earliest_deadline_ms(),
        Some(sent_at + SECRET_TTL_MS_MIN)
    );
    // A tick before the deadline erases nothing; at it, the first message goes.
    assert_eq!(
        n(&t.run_at(sent_at + SECRET_TTL_MS_MIN - 1, SecretCommand::Tick)),
        0
    );
    assert_eq!(
        n(&t.run_at(sent_at + SECRET_TTL_MS_MIN, SecretCommand::Tick)),
        1
    );
    let left = t.st.secret().pending_to(chat, 1);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].counter, 2);
    // Any secret command expires what is due before it applies.
    let o = t.run_at(
        sent_at + 20 * SECRET_TTL_MS_MIN,
        SecretCommand::Ack {
            chat,
            user: b,
            device: "laptop".into(),
            counter: 2,
        },
    );
    assert_eq!(n(&o), 0, "already expired, nothing left to ack");
    assert_eq!(t.st.secret().erasures_total(), 2);
    assert_eq!(t.st.secret().earliest_deadline_ms(), None);
}

#[test]
fn replicas_agree_and_checkpoints_round_trip_with_secret_state() {
    let run = || {
        let mut t = T::new();
        let (a, b) = (t.user("alice"), t.user("bob"));
        for (u, d) in [(a, "phone"), (b, "laptop")] {
            t.run(SecretCommand::PublishKey {
                user: u,
                device: d.into(),
                public_key: [u as u8; 32],
            });
        }
        let chat = t.start(a, b, 3);
        t.run(SecretCommand::DeviceChat {
            user: a,
            device: "phone".into(),
            chat,
        });
        for c in 1..=50u64 {
            t.send(chat, a, "phone", c, SECRET_TTL_MS_MIN * (1 + c % 3));
            if c % 7 == 0 {
                t.run(SecretCommand::Ack {
                    chat,
                    user: b,
                    device: "laptop".into(),
                    counter: c - 3,
                });
            }
            if c % 11 == 0 {
                let ts = t.ts + SECRET_TTL_MS_MIN;
                t.run_at(ts, SecretCommand::Tick);
            }
        }
        t.st
    };
    let (one, two) = (run(), run());
    let bytes = one.encode();
    assert_eq!(
        bytes,
        two.encode(),
        "two replicas wrote different checkpoints"
    );
    let back = GroupState::decode(&bytes).expect("decodes");
    assert_eq!(back, one);
    assert_eq!(back.encode(), bytes);
    assert!(one.secret().pending_count() > 0 && one.secret().erasures_total() > 0);
    // A checkpoint cut short fails to decode instead of losing state quietly.
    for cut in [1, 9, 40] {
        assert!(GroupState::decode(&bytes[..bytes.len() - cut]).is_err());
    }
}
