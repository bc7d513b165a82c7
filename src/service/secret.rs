//! The server's side of secret chats: the `secret` requests.
//!
//! What it owns: checking each request against the caller's session (the caller's device
//! is the device id its session was opened with, so one session speaks for one device),
//! routing (a device's key and chat list live in its user's group; a secret chat and its
//! pending messages in the group of the smaller of its two user ids), and turning pending
//! locations back into `SecretMessage`s by reading the one Raft entry that holds each
//! ciphertext (`chatlog_raft::secret_log`). Reads go through a read barrier first, so a
//! key or message written through another node is seen. What it must not do: look inside a ciphertext,
//! keep a copy of one anywhere but the Raft log, or hand a message to any device but its
//! target (another device of the same user gets `PERMISSION_DENIED` or nothing).
//!
//! Push notifications (`notify/`, with `--push-webhook`): a secret message for a device
//! with no connection says only that something arrived for that device: no text (the
//! server has none), no sender, no secret chat id, never for another device
//! (`Notifier::secret_arrived`, called from `fanout/secret.rs`). The one place that
//! builds what a device receives is [`secret_message`].

use chatlog_raft::chat::secret::{
    PUBLIC_KEY_BYTES, PendingView, SECRET_CIPHERTEXT_BYTES_MAX, SecretChatView, SecretCommand,
};
use chatlog_raft::chat::{ChatId, Command, Outcome, UserId};
use chatlog_raft::secret_log::{self, SentMessage};
use chatlog_wire::limits::DEVICE_ID_BYTES_MAX;
use chatlog_wire::proto::v1::{
    self, ErrorCode, response::Kind as Resp, secret_request::Kind as SReq,
    secret_response::Kind as SResp,
};

use super::convert::{bad, error, propose_error};
use super::{ChatService, PAGE_BYTES_MAX, check_len, rate_limited};
use crate::gateway::Principal;

/// Messages in one `secret.pending` answer. Why: a history page's worth; the answer is
/// also cut at [`PAGE_BYTES_MAX`] bytes so it fits one frame, with `more` set.
pub const SECRET_PENDING_PAGE_MAX: usize = 100;

/// The protocol form of a secret chat.
pub(crate) fn chat_proto(v: &SecretChatView) -> v1::SecretChat {
    v1::SecretChat {
        secret_chat_id: v.chat,
        initiator_user_id: v.initiator.user,
        initiator_device_id: v.initiator.device.clone(),
        initiator_key: v.initiator.key.to_vec().into(),
        responder_user_id: v.responder.user,
        responder_device_id: v.responder.device.clone(),
        responder_key: v.responder.key.to_vec().into(),
        ephemeral_key: v.ephemeral_key.to_vec().into(),
        created_at_ms: v.created_ms,
    }
}

/// What the target device receives of a pending message (pushed or fetched).
pub(crate) fn secret_message(
    v: &SecretChatView,
    p: &PendingView,
    sent: SentMessage,
) -> v1::SecretMessage {
    v1::SecretMessage {
        secret_chat_id: p.chat,
        sender_user_id: v.party(p.from_side as usize).user,
        sender_device_id: sent.sender_device,
        counter: p.counter,
        epoch: p.epoch,
        sent_at_ms: p.sent_ms,
        expires_at_ms: p.deadline_ms,
        self_destruct_s: p.self_destruct_s,
        ciphertext: sent.ciphertext.into(),
    }
}

fn key_of(bytes: &[u8], what: &str) -> Result<[u8; PUBLIC_KEY_BYTES], v1::Error> {
    bytes.try_into().map_err(|_| {
        bad(format!(
            "{what} is {} bytes, not {PUBLIC_KEY_BYTES}",
            bytes.len()
        ))
    })
}

fn secret(kind: SResp) -> Resp {
    Resp::Secret(v1::SecretResponse { kind: Some(kind) })
}

impl ChatService {
    /// The device id of the caller's session.
    fn caller_device(&self, me: &Principal) -> Result<String, v1::Error> {
        let group = self.group_for(me.user_id, "user")?;
        group
            .shared()
            .read()
            .session_device(me.user_id, me.session_id)
            .ok_or_else(|| {
                error(
                    ErrorCode::Unauthenticated,
                    "this session was revoked or has expired",
                )
            })
    }

    /// Waits until this node's replica of `id`'s group applied everything committed
    /// before the call (keys and chat lists may have been written through another node).
    async fn barrier(&self, id: u64, what: &str) -> Result<(), v1::Error> {
        let g = self.group_for(id, what)?.id();
        self.node.read_barrier(g).await.map_err(propose_error)
    }

    fn device_key(&self, user: UserId, device: &str) -> Result<[u8; 32], v1::Error> {
        self.group_for(user, "user")?
            .shared()
            .read()
            .secret()
            .device_key(user, device)
            .ok_or_else(|| {
                error(
                    ErrorCode::NotFound,
                    format!("device {device:?} of user {user} published no secret-chat key"),
                )
            })
    }

    fn secret_chat_view(&self, chat: ChatId) -> Result<SecretChatView, v1::Error> {
        self.group_for(chat, "secret chat")?
            .shared()
            .read()
            .secret()
            .chat(chat)
            .ok_or_else(|| error(ErrorCode::NotFound, format!("no secret chat {chat}")))
    }

    async fn propose_secret(&self, g: u64, cmd: SecretCommand) -> Result<(ChatId, u64), v1::Error> {
        match self.propose(g, Command::Secret(cmd)).await? {
            Outcome::Secret(a) => Ok((a.chat, a.n)),
            o => Err(error(ErrorCode::Internal, format!("unexpected {o:?}"))),
        }
    }

    /// Answers one `secret` request of an authenticated caller.
    pub(crate) async fn secret(
        &self,
        me: Principal,
        req: v1::SecretRequest,
    ) -> Result<Resp, v1::Error> {
        let kind = req
            .kind
            .ok_or_else(|| error(ErrorCode::UnknownRequest, "empty or unknown secret request"))?;
        let user = me.user_id;
        let device = self.caller_device(&me)?;
        match kind {
            SReq::PublishKey(r) => {
                let public_key = key_of(&r.public_key, "the public key")?;
                let g = self.group_id_for(user, "user")?;
                self.propose_secret(
                    g,
                    SecretCommand::PublishKey {
                        user,
                        device,
                        public_key,
                    },
                )
                .await?;
                Ok(secret(SResp::PublishKey(v1::SecretPublishKeyResponse {})))
            }
            SReq::GetKey(r) => {
                check_len("device id", &r.device_id, DEVICE_ID_BYTES_MAX)?;
                self.barrier(r.user_id, "user").await?;
                let key = self.device_key(r.user_id, &r.device_id)?;
                Ok(secret(SResp::GetKey(v1::SecretGetKeyResponse {
                    public_key: key.to_vec().into(),
                })))
            }
            SReq::Start(r) => {
                check_len("device id", &r.device_id, DEVICE_ID_BYTES_MAX)?;
                if r.device_id.is_empty() {
                    return Err(bad("the device id is empty"));
                }
                let ephemeral_key = key_of(&r.ephemeral_key, "the one-time key")?;
                let expected = key_of(&r.responder_key, "the responder's key")?;
                self.barrier(user, "user").await?;
                self.barrier(r.user_id, "user").await?;
                let initiator_key = self.device_key(user, &device).map_err(|_| {
                    error(
                        ErrorCode::NotFound,
                        "this device published no secret-chat key: publish one first",
                    )
                })?;
                let responder_key = self.device_key(r.user_id, &r.device_id)?;
                if responder_key != expected {
                    return Err(error(
                        ErrorCode::Conflict,
                        "the other device's key changed since it was read: read it again",
                    ));
                }
                let home = self.group_id_for(user.min(r.user_id), "user")?;
                let (chat, _) = self
                    .propose_secret(
                        home,
                        SecretCommand::Start {
                            initiator: user,
                            initiator_device: device.clone(),
                            initiator_key,
                            ephemeral_key,
                            responder: r.user_id,
                            responder_device: r.device_id.clone(),
                            responder_key,
                        },
                    )
                    .await?;
                // Each device's list lives with its user. A failure here leaves the chat
                // out of that list until the start is repeated (same one-time key, same
                // chat); the chat itself is complete.
                for (u, d) in [(user, device), (r.user_id, r.device_id)] {
                    let g = self.group_id_for(u, "user")?;
                    self.propose_secret(
                        g,
                        SecretCommand::DeviceChat {
                            user: u,
                            device: d,
                            chat,
                        },
                    )
                    .await?;
                }
                let view = self.secret_chat_view(chat)?;
                Ok(secret(SResp::Start(v1::SecretStartResponse {
                    chat: Some(chat_proto(&view)),
                })))
            }
            SReq::List(_) => {
                self.barrier(user, "user").await?;
                let chats = self
                    .group_for(user, "user")?
                    .shared()
                    .read()
                    .secret()
                    .device_chats(user, &device);
                let mut out = Vec::with_capacity(chats.len());
                for c in chats {
                    if let Ok(v) = self.secret_chat_view(c) {
                        out.push(chat_proto(&v));
                    }
                }
                Ok(secret(SResp::List(v1::SecretListResponse { chats: out })))
            }
            SReq::Send(r) => {
                self.limiter
                    .user_send(user)
                    .map_err(|after| rate_limited("messages from this user", after))?;
                if r.ciphertext.len() > SECRET_CIPHERTEXT_BYTES_MAX {
                    return Err(error(
                        ErrorCode::TooLarge,
                        format!(
                            "the ciphertext is {} bytes, over {SECRET_CIPHERTEXT_BYTES_MAX}",
                            r.ciphertext.len()
                        ),
                    ));
                }
                let g = self.group_id_for(r.secret_chat_id, "secret chat")?;
                let (_, no) = self
                    .propose_secret(
                        g,
                        SecretCommand::Send {
                            chat: r.secret_chat_id,
                            sender: user,
                            sender_device: device,
                            counter: r.counter,
                            epoch: r.epoch,
                            ttl_ms: r.ttl_ms,
                            self_destruct_s: r.self_destruct_s,
                            ciphertext: r.ciphertext.to_vec(),
                        },
                    )
                    .await?;
                // The deadline as this replica applied it (0 if it is already gone or
                // this node holds no replica).
                let expires_at_ms = self.node.group(g).map_or(0, |group| {
                    group
                        .shared()
                        .read()
                        .secret()
                        .pending_after(no - 1, 1)
                        .first()
                        .filter(|p| p.no == no)
                        .map_or(0, |p| p.deadline_ms)
                });
                Ok(secret(SResp::Send(v1::SecretSendResponse {
                    expires_at_ms,
                })))
            }
            SReq::Pending(r) => {
                let chats = if r.secret_chat_id != 0 {
                    vec![r.secret_chat_id]
                } else {
                    self.barrier(user, "user").await?;
                    self.group_for(user, "user")?
                        .shared()
                        .read()
                        .secret()
                        .device_chats(user, &device)
                };
                let mut messages = Vec::new();
                let mut bytes = 0;
                let mut more = false;
                'chats: for chat in chats {
                    let group = self.group_for(chat, "secret chat")?;
                    // Linearizable, like history: a message acknowledged as sent is seen.
                    self.node
                        .read_barrier(group.id())
                        .await
                        .map_err(propose_error)?;
                    let (view, pending) = {
                        let st = group.shared().read();
                        let Some(view) = st.secret().chat(chat) else {
                            return Err(error(
                                ErrorCode::NotFound,
                                format!("no secret chat {chat}"),
                            ));
                        };
                        let Some(side) = view.side_of(user, &device) else {
                            return Err(error(
                                ErrorCode::PermissionDenied,
                                format!("secret chat {chat} does not include this device"),
                            ));
                        };
                        let pending = st.secret().pending_to(chat, side);
                        (view, pending)
                    };
                    for p in pending {
                        if messages.len() >= SECRET_PENDING_PAGE_MAX {
                            more = true;
                            break 'chats;
                        }
                        let sent = secret_log::read_send(
                            group.id(),
                            group.log_reader(),
                            p.raft_index,
                            p.pos,
                        )
                        .await
                        .map_err(|e| super::convert::read_error(&e))?;
                        // Erased meanwhile (acknowledged or expired): not delivered.
                        let Some(sent) = sent else { continue };
                        let m = secret_message(&view, &p, sent);
                        let len = prost::Message::encoded_len(&m) + 8;
                        if bytes + len > PAGE_BYTES_MAX && !messages.is_empty() {
                            more = true;
                            break 'chats;
                        }
                        bytes += len;
                        messages.push(m);
                    }
                }
                Ok(secret(SResp::Pending(v1::SecretPendingResponse {
                    messages,
                    more,
                })))
            }
            SReq::Ack(r) => {
                let g = self.group_id_for(r.secret_chat_id, "secret chat")?;
                let (_, erased) = self
                    .propose_secret(
                        g,
                        SecretCommand::Ack {
                            chat: r.secret_chat_id,
                            user,
                            device,
                            counter: r.counter,
                        },
                    )
                    .await?;
                Ok(secret(SResp::Ack(v1::SecretAckResponse { erased })))
            }
        }
    }
}
