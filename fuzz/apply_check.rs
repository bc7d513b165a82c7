//! The check behind the `chat_apply` fuzz target, shared with
//! `raft/tests/fuzz_corpus.rs`, which runs its corpus on stable Rust (issue 9: "the state
//! machine's command apply against a model").
//!
//! What it owns: a decoder from arbitrary bytes to a sequence of chat commands (create
//! user, create chat of each kind, invite, remove, ban, unban, set role, join, leave,
//! post with a client message id — through `GroupState::apply` or the hot path
//! `apply_post` over a real encoded batch —, edit, delete, mark read), and [`Model`], a
//! plain re-statement of the chat rules over maps and vectors, written from the rules'
//! documentation and kept free of `GroupState`'s code. After every command the outcome
//! (event seq, deduplication, refusal code, created ids, read markers) and the head,
//! roles and bans of the chat it named, and every user's log head and read markers, must
//! agree; at the end and every [`CHECKPOINT_EVERY`] commands, every chat the model knows
//! is compared and the checkpoint encoding must round-trip to an identical state and
//! re-encode to the same bytes.
//! What it must not do: call into the rules to predict an outcome (that would compare the
//! code with itself), or panic on any input other than a real disagreement.
//!
//! Input: each command takes one op byte and a few argument bytes; a missing byte reads
//! as zero, so every input is a valid sequence.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chatlog_raft::chat::command::DecodedBatch;
use chatlog_raft::chat::state::GroupState;
use chatlog_raft::chat::{Batch, ChatKind, Command, Outcome, RefusalCode, Role, make_id};

/// The group the state and the model live in.
const GROUP: u64 = 3;
/// Commands at most per input (keeps one run fast).
pub const COMMANDS_MAX: usize = 400;
/// The checkpoint round trip runs after this many commands (and at the end).
pub const CHECKPOINT_EVERY: usize = 64;
/// Batch timestamps advance this much per command: far inside the de-duplication window
/// for any input, so the model needs no expiry.
const TS_STEP_MS: u64 = 10;

/// What the model predicts for one command.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Event { chat: u64, seq: u64, dedup: bool },
    UserCreated { user: u64 },
    UserEvent { user: u64, seq: u64, read_seq: u64 },
    Refused(RefusalCode),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Message,
    Other,
}

#[derive(Debug)]
struct MChat {
    kind: ChatKind,
    members: BTreeMap<u64, Role>,
    banned: BTreeSet<u64>,
    /// Per event: what it is, who caused it, whether it was deleted.
    events: Vec<(Kind, u64, bool)>,
}

/// The chat rules, restated plainly.
#[derive(Debug, Default)]
pub struct Model {
    names: BTreeSet<String>,
    users: Vec<u64>,
    /// Per user: read markers and the length of the user's own log.
    read: HashMap<u64, BTreeMap<u64, u64>>,
    user_log: HashMap<u64, u64>,
    chats: BTreeMap<u64, MChat>,
    next_chat: u64,
    directs: HashMap<(u64, u64), u64>,
    dedupe: HashMap<(u64, u64, u64), u64>,
}

fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Model {
    fn admin(&self, chat: &MChat, actor: u64) -> Result<Role, RefusalCode> {
        if chat.kind == ChatKind::Direct {
            return Err(RefusalCode::BadRequest);
        }
        match chat.members.get(&actor) {
            None => Err(RefusalCode::PermissionDenied),
            Some(r) if *r < Role::Admin => Err(RefusalCode::PermissionDenied),
            Some(r) => Ok(*r),
        }
    }

    /// Applies `cmd` to the model; what the state machine must answer.
    fn apply(&mut self, cmd: &Command) -> Expect {
        match self.try_apply(cmd) {
            Ok(e) => e,
            Err(code) => Expect::Refused(code),
        }
    }

    fn try_apply(&mut self, cmd: &Command) -> Result<Expect, RefusalCode> {
        use RefusalCode as R;
        match cmd {
            Command::CreateUser { name, .. } => {
                if !valid_name(name) {
                    return Err(R::BadRequest);
                }
                if !self.names.insert(name.clone()) {
                    return Err(R::Conflict);
                }
                let user = make_id(GROUP, self.users.len() as u64 + 1);
                self.users.push(user);
                Ok(Expect::UserCreated { user })
            }
            Command::CreateChat {
                creator,
                kind,
                title,
                members,
            } => {
                let others: BTreeSet<u64> =
                    members.iter().copied().filter(|m| m != creator).collect();
                if others.contains(&0) || *creator == 0 {
                    return Err(R::BadRequest);
                }
                if *kind == ChatKind::Direct {
                    if others.len() != 1 || !title.is_empty() {
                        return Err(R::BadRequest);
                    }
                    let other = *others.iter().next().expect("one");
                    let pair = ((*creator).min(other), (*creator).max(other));
                    if let Some(chat) = self.directs.get(&pair) {
                        return Ok(Expect::Event {
                            chat: *chat,
                            seq: 1,
                            dedup: true,
                        });
                    }
                } else if title.is_empty() {
                    return Err(R::BadRequest);
                }
                self.next_chat += 1;
                let id = make_id(GROUP, self.next_chat);
                let mut chat = MChat {
                    kind: *kind,
                    members: others.iter().map(|m| (*m, Role::Member)).collect(),
                    banned: BTreeSet::new(),
                    events: vec![(Kind::Other, *creator, false)],
                };
                let role = if *kind == ChatKind::Direct {
                    Role::Member
                } else {
                    Role::Owner
                };
                chat.members.insert(*creator, role);
                if *kind == ChatKind::Direct {
                    let other = *others.iter().next().expect("one");
                    self.directs
                        .insert(((*creator).min(other), (*creator).max(other)), id);
                }
                self.chats.insert(id, chat);
                Ok(Expect::Event {
                    chat: id,
                    seq: 1,
                    dedup: false,
                })
            }
            Command::MarkRead { user, chat, seq } => {
                if !self.users.contains(user) {
                    return Err(R::NotFound);
                }
                let markers = self.read.entry(*user).or_default();
                let current = markers.get(chat).copied().unwrap_or(0);
                if *seq <= current {
                    return Ok(Expect::UserEvent {
                        user: *user,
                        seq: 0,
                        read_seq: current,
                    });
                }
                markers.insert(*chat, *seq);
                let log = self.user_log.entry(*user).or_default();
                *log += 1;
                Ok(Expect::UserEvent {
                    user: *user,
                    seq: *log,
                    read_seq: *seq,
                })
            }
            _ => self.chat_command(cmd),
        }
    }

    fn chat_command(&mut self, cmd: &Command) -> Result<Expect, RefusalCode> {
        use RefusalCode as R;
        let chat_id = cmd.chat().ok_or(R::BadRequest)?;
        if let Command::Post {
            sender,
            client_message_id,
            ..
        } = cmd
            && let Some(seq) = self.dedupe.get(&(chat_id, *sender, *client_message_id))
        {
            return Ok(Expect::Event {
                chat: chat_id,
                seq: *seq,
                dedup: true,
            });
        }
        let admin = |m: &Model, actor: u64| m.admin(&m.chats[&chat_id], actor);
        let chat = self.chats.get(&chat_id).ok_or(R::NotFound)?;
        let seq = chat.events.len() as u64 + 1;
        let role = |u: &u64| chat.members.get(u).copied();
        let member = |u: &u64| role(u).ok_or(R::PermissionDenied);
        let message = |target: u64| -> Result<(u64, bool), RefusalCode> {
            match (target >= 1)
                .then(|| chat.events.get(target as usize - 1))
                .flatten()
            {
                Some((Kind::Message, sender, false)) => Ok((*sender, false)),
                _ => Err(R::NotFound),
            }
        };
        // Each arm: checks in the documented order, then the change.
        let sender = match cmd {
            Command::Invite { actor, user, .. } => {
                admin(self, *actor)?;
                if chat.banned.contains(user) {
                    return Err(R::PermissionDenied);
                }
                if *user == 0 {
                    return Err(R::BadRequest);
                }
                if role(user).is_some() {
                    return Err(R::Conflict);
                }
                let c = self.chats.get_mut(&chat_id).expect("exists");
                c.members.insert(*user, Role::Member);
                *actor
            }
            Command::RemoveMember { actor, user, .. } | Command::Ban { actor, user, .. } => {
                let actor_role = admin(self, *actor)?;
                let banning = matches!(cmd, Command::Ban { .. });
                match role(user) {
                    Some(Role::Owner) => return Err(R::PermissionDenied),
                    Some(Role::Admin) if actor_role != Role::Owner => {
                        return Err(R::PermissionDenied);
                    }
                    None if !banning => return Err(R::NotFound),
                    _ => {}
                }
                if banning && chat.banned.contains(user) {
                    return Err(R::Conflict);
                }
                let c = self.chats.get_mut(&chat_id).expect("exists");
                c.members.remove(user);
                if banning {
                    c.banned.insert(*user);
                }
                *actor
            }
            Command::Leave { actor, .. } => {
                let r = member(actor)?;
                if chat.kind == ChatKind::Direct {
                    return Err(R::BadRequest);
                }
                if r == Role::Owner {
                    return Err(R::PermissionDenied);
                }
                self.chats
                    .get_mut(&chat_id)
                    .expect("exists")
                    .members
                    .remove(actor);
                *actor
            }
            Command::Unban { actor, user, .. } => {
                admin(self, *actor)?;
                if !chat.banned.contains(user) {
                    return Err(R::Conflict);
                }
                self.chats
                    .get_mut(&chat_id)
                    .expect("exists")
                    .banned
                    .remove(user);
                *actor
            }
            Command::SetRole {
                actor,
                user,
                role: new,
                ..
            } => {
                if admin(self, *actor)? != Role::Owner {
                    return Err(R::PermissionDenied);
                }
                if *new == Role::Owner {
                    return Err(R::BadRequest);
                }
                match role(user) {
                    None => return Err(R::NotFound),
                    Some(Role::Owner) => return Err(R::BadRequest),
                    Some(r) if r == *new => return Err(R::Conflict),
                    _ => {}
                }
                self.chats
                    .get_mut(&chat_id)
                    .expect("exists")
                    .members
                    .insert(*user, *new);
                *actor
            }
            Command::Join { actor, .. } => {
                if chat.kind != ChatKind::Channel {
                    return Err(R::PermissionDenied);
                }
                if chat.banned.contains(actor) {
                    return Err(R::PermissionDenied);
                }
                if role(actor).is_some() {
                    return Err(R::Conflict);
                }
                self.chats
                    .get_mut(&chat_id)
                    .expect("exists")
                    .members
                    .insert(*actor, Role::Member);
                *actor
            }
            Command::Post {
                sender,
                client_message_id,
                text,
                media,
                reply_to,
                ..
            } => {
                let r = member(sender)?;
                if chat.kind == ChatKind::Channel && r < Role::Admin {
                    return Err(R::PermissionDenied);
                }
                if *client_message_id == 0 {
                    return Err(R::BadRequest);
                }
                if text.is_empty() && media.is_none() {
                    return Err(R::BadRequest);
                }
                if *reply_to > chat.events.len() as u64 {
                    return Err(R::NotFound);
                }
                self.dedupe
                    .insert((chat_id, *sender, *client_message_id), seq);
                let c = self.chats.get_mut(&chat_id).expect("exists");
                c.events.push((Kind::Message, *sender, false));
                return Ok(Expect::Event {
                    chat: chat_id,
                    seq,
                    dedup: false,
                });
            }
            Command::Edit {
                sender,
                target,
                text,
                ..
            } => {
                member(sender)?;
                let (author, _) = message(*target)?;
                if author != *sender {
                    return Err(R::PermissionDenied);
                }
                if text.is_empty() {
                    return Err(R::BadRequest);
                }
                *sender
            }
            Command::Delete { sender, target, .. } => {
                let r = member(sender)?;
                let (author, _) = message(*target)?;
                if author != *sender && (chat.kind == ChatKind::Direct || r < Role::Admin) {
                    return Err(R::PermissionDenied);
                }
                let c = self.chats.get_mut(&chat_id).expect("exists");
                c.events[*target as usize - 1].2 = true;
                *sender
            }
            other => panic!("the model does not cover {other:?}"),
        };
        let c = self.chats.get_mut(&chat_id).expect("exists");
        c.events.push((Kind::Other, sender, false));
        Ok(Expect::Event {
            chat: chat_id,
            seq,
            dedup: false,
        })
    }
}

/// Reads argument bytes; zero past the end.
struct Input<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }
}

impl Model {
    /// A user id: mostly a real one, sometimes 0 or one nobody created.
    fn user(&self, b: u8) -> u64 {
        match b {
            0 => 0,
            1 => make_id(GROUP, 999),
            _ if self.users.is_empty() => make_id(GROUP, 1),
            _ => self.users[b as usize % self.users.len()],
        }
    }

    /// Mostly a member of `chat` (owners and admins included), else any user.
    fn actor(&self, chat: u64, b: u8) -> u64 {
        match self.chats.get(&chat) {
            Some(c) if !b.is_multiple_of(4) && !c.members.is_empty() => *c
                .members
                .keys()
                .nth((b / 4) as usize % c.members.len())
                .expect("in range"),
            _ => self.user(b),
        }
    }

    /// A chat id: mostly a real one, sometimes one that does not exist.
    fn chat(&self, b: u8) -> u64 {
        if b == 0 || self.next_chat == 0 {
            return make_id(GROUP, 777);
        }
        make_id(GROUP, 1 + u64::from(b) % self.next_chat)
    }

    fn target(&self, chat: u64, b: u8) -> u64 {
        let head = self.chats.get(&chat).map_or(0, |c| c.events.len() as u64);
        u64::from(b) % (head + 2)
    }
}

/// Decodes the next command from `input`.
fn next_command(model: &Model, input: &mut Input<'_>) -> Command {
    let op = input.byte();
    let (a, b, c) = (input.byte(), input.byte(), input.byte());
    let text = |n: u8| {
        if n.is_multiple_of(7) {
            String::new()
        } else {
            format!("t{n}")
        }
    };
    match op % 14 {
        0 | 1 => Command::CreateUser {
            name: match a % 8 {
                0 => String::new(),
                1 => "Bad-Name".into(),
                _ => format!("u{}", b % 24),
            },
            login_token_hash: [c; 32],
        },
        2 => Command::CreateChat {
            creator: model.user(a),
            kind: match b % 3 {
                0 => ChatKind::Direct,
                1 => ChatKind::Group,
                _ => ChatKind::Channel,
            },
            title: if b % 3 == 0 && c % 4 != 0 {
                String::new()
            } else {
                text(c)
            },
            members: (0..c % 4).map(|k| model.user(c.wrapping_add(k))).collect(),
        },
        3 => Command::Invite {
            chat: model.chat(a),
            actor: model.actor(model.chat(a), b),
            user: model.user(c),
        },
        4 => Command::RemoveMember {
            chat: model.chat(a),
            actor: model.actor(model.chat(a), b),
            user: model.actor(model.chat(a), c),
        },
        5 => Command::Ban {
            chat: model.chat(a),
            actor: model.actor(model.chat(a), b),
            user: model.actor(model.chat(a), c),
        },
        6 => Command::Unban {
            chat: model.chat(a),
            actor: model.actor(model.chat(a), b),
            user: model.user(c),
        },
        7 => Command::SetRole {
            chat: model.chat(a),
            actor: model.actor(model.chat(a), b),
            user: model.actor(model.chat(a), c),
            role: match c % 3 {
                0 => Role::Member,
                1 => Role::Admin,
                _ => Role::Owner,
            },
        },
        8 => Command::Join {
            chat: model.chat(a),
            actor: model.user(b),
        },
        9 => Command::Leave {
            chat: model.chat(a),
            actor: model.actor(model.chat(a), b),
        },
        10 | 11 => {
            let chat = model.chat(a);
            Command::Post {
                chat,
                sender: model.actor(chat, b),
                // A few ids, so retries with one id happen often.
                client_message_id: u64::from(c % 16),
                text: text(c / 16 + 1),
                media: None,
                reply_to: model.target(chat, input.byte()),
            }
        }
        12 => {
            let chat = model.chat(a);
            if c % 2 == 0 {
                Command::Edit {
                    chat,
                    sender: model.actor(chat, b),
                    target: model.target(chat, c / 2),
                    text: text(c),
                }
            } else {
                Command::Delete {
                    chat,
                    sender: model.actor(chat, b),
                    target: model.target(chat, c / 2),
                }
            }
        }
        _ => {
            let chat = model.chat(a);
            Command::MarkRead {
                user: model.user(b),
                chat,
                seq: model.target(chat, c),
            }
        }
    }
}

/// What the state machine answered, in the model's terms.
fn observed(outcome: &Outcome) -> Expect {
    match outcome {
        Outcome::Event {
            chat,
            seq,
            deduplicated,
            ..
        } => Expect::Event {
            chat: *chat,
            seq: *seq,
            dedup: *deduplicated,
        },
        Outcome::UserCreated { user } => Expect::UserCreated { user: *user },
        Outcome::UserEvent {
            user,
            seq,
            read_seq,
        } => Expect::UserEvent {
            user: *user,
            seq: *seq,
            read_seq: *read_seq,
        },
        Outcome::Refused(r) => Expect::Refused(r.code),
        other => panic!("an outcome the model never asks for: {other:?}"),
    }
}

/// The checkpoint encoding round-trips to an identical state and the same bytes.
fn check_checkpoint(state: &GroupState, step: usize) {
    let bytes = state.encode();
    let decoded = GroupState::decode(&bytes)
        .unwrap_or_else(|e| panic!("step {step}: the checkpoint does not decode: {e:?}"));
    assert!(
        decoded == *state,
        "step {step}: the decoded checkpoint differs from the state"
    );
    assert!(
        decoded.encode() == bytes,
        "step {step}: the checkpoint does not re-encode to the same bytes"
    );
}

/// What the model knows agrees with the state: about chat `only` (and every user's log
/// and markers), or about everything when `only` is `None`.
fn check_views(model: &Model, state: &GroupState, step: usize, only: Option<u64>) {
    for (id, chat) in model
        .chats
        .iter()
        .filter(|(id, _)| only.is_none_or(|c| c == **id))
    {
        assert_eq!(
            state.head_seq(*id),
            Some(chat.events.len() as u64),
            "step {step}: head of chat {id}"
        );
        let mut everyone: BTreeSet<u64> = model.users.iter().copied().collect();
        everyone.extend(chat.members.keys());
        everyone.extend(&chat.banned);
        for u in everyone {
            assert_eq!(
                state.role(*id, u),
                chat.members.get(&u).copied(),
                "step {step}: role of user {u} in chat {id}"
            );
            assert_eq!(
                state.is_banned(*id, u),
                chat.banned.contains(&u),
                "step {step}: ban of user {u} in chat {id}"
            );
        }
    }
    assert_eq!(state.head_seq(make_id(GROUP, 777)), None, "step {step}");
    for u in &model.users {
        assert_eq!(
            state.user_log_head(*u),
            Some(model.user_log.get(u).copied().unwrap_or(0)),
            "step {step}: user log head of {u}"
        );
        for (chat, seq) in model.read.get(u).into_iter().flatten() {
            assert_eq!(state.read_marker(*u, *chat), *seq, "step {step}");
        }
    }
}

/// Runs `data` as a command sequence against `GroupState` and the model; panics on any
/// disagreement. Returns the number of commands applied.
pub fn check_chat_apply(data: &[u8]) -> usize {
    let mut input = Input { bytes: data, at: 0 };
    let mut model = Model::default();
    let mut state = GroupState::new(GROUP);
    let mut step = 0;
    while !input.done() && step < COMMANDS_MAX {
        step += 1;
        let cmd = next_command(&model, &mut input);
        let ts = 1_000_000 + step as u64 * TS_STEP_MS;
        let raft_index = step as u64;
        let expected = model.apply(&cmd);
        // Posts go through the hot path (fields read in place from an encoded batch) on
        // odd steps, like the state machine applies them; both must answer alike.
        let outcome = match &cmd {
            Command::Post { .. } if step % 2 == 1 => {
                let batch = DecodedBatch::parse(
                    Batch {
                        timestamp_ms: ts,
                        commands: vec![cmd.clone()],
                    }
                    .encode(),
                )
                .expect("an encoded batch parses");
                let fields = batch.post_fields(0).expect("a post has fields");
                state.apply_post(&fields, ts, raft_index, 0)
            }
            _ => state.apply(&cmd, ts, raft_index, 0),
        };
        let got = observed(&outcome);
        assert_eq!(got, expected, "step {step}: {cmd:?} answered {outcome:?}");
        if step.is_multiple_of(CHECKPOINT_EVERY) {
            check_views(&model, &state, step, None);
            check_checkpoint(&state, step);
        } else {
            // The chat the command named (a new chat's id comes from its outcome).
            let touched = match &got {
                Expect::Event { chat, .. } => Some(*chat),
                _ => cmd.chat(),
            };
            check_views(&model, &state, step, Some(touched.unwrap_or(0)));
        }
    }
    check_views(&model, &state, step, None);
    check_checkpoint(&state, step);
    step
}
