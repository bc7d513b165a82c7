//! Conversions between the protocol's messages (`chatlog_wire::proto::v1`) and the
//! replicated core's types (`chatlog_raft::chat`). The only place both meet.
//!
//! What it owns: mapping enums both ways, building protocol `Event`s from the commands
//! stored in the log, and turning refusals and proposal failures into typed protocol
//! errors. What it must not do: decide permissions or touch state.

use chatlog_raft::chat::{
    ChatKind, Command, EventKind, EventLoc, MediaRef, Refusal, RefusalCode, Role,
};
use chatlog_raft::node::ProposeError;
use chatlog_wire::proto::v1::{self, ErrorCode, event::Body};

/// A protocol error.
pub fn error(code: ErrorCode, message: impl Into<String>) -> v1::Error {
    v1::Error::new(code, message)
}

/// A bad-request error.
pub fn bad(message: impl Into<String>) -> v1::Error {
    error(ErrorCode::BadRequest, message)
}

/// The protocol error for a refused command.
pub fn refusal(r: Refusal) -> v1::Error {
    let code = match r.code {
        RefusalCode::BadRequest => ErrorCode::BadRequest,
        RefusalCode::Unauthenticated => ErrorCode::Unauthenticated,
        RefusalCode::PermissionDenied => ErrorCode::PermissionDenied,
        RefusalCode::NotFound => ErrorCode::NotFound,
        RefusalCode::Conflict => ErrorCode::Conflict,
    };
    error(code, r.message)
}

/// `retry_after_ms` of a read that hit damaged storage: about the damage watcher's look
/// plus an election, after which the replica repairs or another one serves.
pub const DAMAGED_READ_RETRY_AFTER_MS: u64 = 1_000;

/// s8retention: the protocol error for a failed read of stored events. Damaged bytes
/// (`chatlog_raft::Error::is_damage`) are `UNAVAILABLE` with a message naming the damage
/// (the node's damage watcher repairs the replica; retry, or read through another node);
/// anything else is `INTERNAL`.
pub fn read_error(e: &chatlog_raft::Error) -> v1::Error {
    if e.is_damage() {
        let mut err = error(
            ErrorCode::Unavailable,
            format!(
                "this node's copy of the history is damaged and is being repaired \
                 (retry, or read through another node): {e}"
            ),
        );
        err.retry_after_ms = DAMAGED_READ_RETRY_AFTER_MS;
        err
    } else {
        error(ErrorCode::Internal, e.to_string())
    }
}

/// `retry_after_ms` when a group has no leader here: about one election.
pub const NO_LEADER_RETRY_AFTER_MS: u64 = 500;

/// `UNAVAILABLE` with a retry after about one election ([`NO_LEADER_RETRY_AFTER_MS`]).
pub fn unavailable_retry(message: impl Into<String>) -> v1::Error {
    let mut err = error(ErrorCode::Unavailable, message);
    err.retry_after_ms = NO_LEADER_RETRY_AFTER_MS;
    err
}

/// The protocol error for a proposal or read barrier that did not go through.
pub fn propose_error(e: ProposeError) -> v1::Error {
    match e {
        ProposeError::NotLeader { group, leader } => {
            let mut err = error(
                ErrorCode::Unavailable,
                match leader {
                    Some(l) => format!(
                        "group {group} is led by node {l}, which did not take the request; retry"
                    ),
                    None => format!("group {group} has no leader right now"),
                },
            );
            err.retry_after_ms = NO_LEADER_RETRY_AFTER_MS;
            err
        }
        ProposeError::Unknown { .. } => error(ErrorCode::Timeout, e.to_string()),
        ProposeError::Unavailable { .. } => {
            let mut err = error(ErrorCode::Unavailable, e.to_string());
            err.retry_after_ms = NO_LEADER_RETRY_AFTER_MS;
            err
        }
    }
}

/// A chat kind from the protocol.
pub fn kind_from_proto(k: i32) -> Result<ChatKind, v1::Error> {
    match v1::ChatKind::try_from(k) {
        Ok(v1::ChatKind::Direct) => Ok(ChatKind::Direct),
        Ok(v1::ChatKind::Group) => Ok(ChatKind::Group),
        Ok(v1::ChatKind::Channel) => Ok(ChatKind::Channel),
        _ => Err(bad(format!(
            "chat kind {k} is not direct, group or channel"
        ))),
    }
}

/// A chat kind for the protocol.
pub fn kind_to_proto(k: ChatKind) -> i32 {
    match k {
        ChatKind::Direct => v1::ChatKind::Direct,
        ChatKind::Group => v1::ChatKind::Group,
        ChatKind::Channel => v1::ChatKind::Channel,
    }
    .into()
}

/// A role for the protocol.
pub fn role_to_proto(r: Role) -> i32 {
    match r {
        Role::Member => v1::MemberRole::Member,
        Role::Admin => v1::MemberRole::Admin,
        Role::Owner => v1::MemberRole::Owner,
    }
    .into()
}

/// A role from the protocol (member or admin; ownership is never assigned).
pub fn role_from_proto(r: i32) -> Result<Role, v1::Error> {
    match v1::MemberRole::try_from(r) {
        Ok(v1::MemberRole::Member) => Ok(Role::Member),
        Ok(v1::MemberRole::Admin) => Ok(Role::Admin),
        Ok(v1::MemberRole::Owner) => Ok(Role::Owner),
        _ => Err(bad(format!("role {r} is not member or admin"))),
    }
}

/// A media reference from the protocol, checked.
pub fn media_from_proto(m: v1::MediaRef) -> Result<MediaRef, v1::Error> {
    use chatlog_wire::limits::{MEDIA_FILE_NAME_BYTES_MAX, MEDIA_MIME_TYPE_BYTES_MAX};
    let sha256: [u8; 32] = m
        .sha256
        .as_ref()
        .try_into()
        .map_err(|_| bad(format!("media sha256 is {} bytes, not 32", m.sha256.len())))?;
    if m.mime_type.len() > MEDIA_MIME_TYPE_BYTES_MAX as usize
        || m.file_name.len() > MEDIA_FILE_NAME_BYTES_MAX as usize
    {
        return Err(error(
            ErrorCode::TooLarge,
            "media mime type or file name over its limit",
        ));
    }
    Ok(MediaRef {
        sha256,
        size_bytes: m.size_bytes,
        mime_type: m.mime_type,
        file_name: m.file_name,
    })
}

fn media_to_proto(m: &MediaRef) -> v1::MediaRef {
    v1::MediaRef {
        sha256: bytes::Bytes::copy_from_slice(&m.sha256),
        size_bytes: m.size_bytes,
        mime_type: m.mime_type.clone(),
        file_name: m.file_name.clone(),
    }
}

/// The protocol event for chat event `seq`, rebuilt from the command stored in the log.
/// `None` if the command is not a chat event (a bug upstream; the caller reports it).
pub fn chat_event(
    chat: u64,
    seq: u64,
    loc: &EventLoc,
    cmd: &Command,
    ts: u64,
) -> Option<v1::Event> {
    let body = match (loc.kind(), cmd) {
        (
            EventKind::ChatCreated,
            Command::CreateChat {
                creator,
                kind,
                title,
                members,
            },
        ) => {
            let mut ids = vec![*creator];
            ids.extend(members.iter().copied().filter(|m| m != creator));
            ids.sort_unstable();
            ids.dedup();
            Body::ChatCreated(v1::ChatCreated {
                kind: kind_to_proto(*kind),
                title: title.clone(),
                member_ids: ids,
            })
        }
        (
            EventKind::MessagePosted,
            Command::Post {
                client_message_id,
                text,
                media,
                reply_to,
                ..
            },
        ) => {
            let erased = loc.erased();
            Body::MessagePosted(v1::MessagePosted {
                client_message_id: *client_message_id,
                text: if erased { String::new() } else { text.clone() },
                media: if erased {
                    None
                } else {
                    media.as_ref().map(media_to_proto)
                },
                reply_to_seq: *reply_to,
                erased,
            })
        }
        (EventKind::MessageEdited, Command::Edit { target, text, .. }) => {
            let erased = loc.erased();
            Body::MessageEdited(v1::MessageEdited {
                target_seq: *target,
                text: if erased { String::new() } else { text.clone() },
                erased,
            })
        }
        (EventKind::MessageDeleted, Command::Delete { target, .. }) => {
            Body::MessageDeleted(v1::MessageDeleted {
                target_seq: *target,
            })
        }
        (
            EventKind::ReactionChanged,
            Command::React {
                target,
                reaction,
                add,
                ..
            },
        ) => Body::ReactionChanged(v1::ReactionChanged {
            target_seq: *target,
            reaction: reaction.clone(),
            change: if *add {
                v1::ReactionChange::Add
            } else {
                v1::ReactionChange::Remove
            }
            .into(),
        }),
        (EventKind::PinChanged, Command::Pin { target, pin, .. }) => {
            Body::PinChanged(v1::PinChanged {
                target_seq: *target,
                change: if *pin {
                    v1::PinChange::Pin
                } else {
                    v1::PinChange::Unpin
                }
                .into(),
            })
        }
        (EventKind::MemberJoined, Command::Invite { user, .. })
        | (EventKind::MemberJoined, Command::Join { actor: user, .. }) => {
            Body::MemberJoined(v1::MemberJoined {
                user_id: *user,
                role: role_to_proto(Role::Member),
            })
        }
        (EventKind::MemberLeft, Command::Leave { actor, .. }) => {
            Body::MemberLeft(v1::MemberLeft { user_id: *actor })
        }
        (EventKind::MemberRemoved, Command::RemoveMember { user, .. }) => {
            Body::MemberRemoved(v1::MemberRemoved { user_id: *user })
        }
        (EventKind::MemberBanned, Command::Ban { user, .. }) => {
            Body::MemberBanned(v1::MemberBanned { user_id: *user })
        }
        (EventKind::MemberUnbanned, Command::Unban { user, .. }) => {
            Body::MemberUnbanned(v1::MemberUnbanned { user_id: *user })
        }
        (EventKind::RoleChanged, Command::SetRole { user, role, .. }) => {
            Body::RoleChanged(v1::RoleChanged {
                user_id: *user,
                role: role_to_proto(*role),
            })
        }
        _ => return None,
    };
    Some(v1::Event {
        chat_id: chat,
        seq,
        sender_id: loc.sender,
        timestamp_ms: ts,
        body: Some(body),
    })
}

#[cfg(test)]
mod read_error_tests {
    use super::*;

    /// s8retention: damaged stored bytes reach the client as UNAVAILABLE naming the
    /// damage, with a retry hint; anything else stays INTERNAL.
    #[test]
    fn damage_is_unavailable_and_other_failures_internal() {
        let damaged = chatlog_raft::Error::Storage {
            group: 3,
            verb: "reading",
            subject: "history entries [1, 41)".into(),
            source: chatlog_storage::Error::Corruption {
                file: "d/seg-000001".into(),
                offset: 4096,
                detail: "record checksum mismatch".into(),
            },
        };
        let e = read_error(&damaged);
        assert_eq!(e.code(), ErrorCode::Unavailable, "{e:?}");
        assert!(e.message.contains("damaged"), "{}", e.message);
        assert!(e.message.contains("checksum mismatch"), "{}", e.message);
        assert_eq!(e.retry_after_ms, DAMAGED_READ_RETRY_AFTER_MS);
        let bug = chatlog_raft::Error::Inconsistent {
            group: 3,
            detail: "event 5 points at log entry 9, which this replica does not hold".into(),
        };
        assert_eq!(read_error(&bug).code(), ErrorCode::Internal);
    }
}
