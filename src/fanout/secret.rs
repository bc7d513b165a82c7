//! Device-targeted delivery of secret-chat messages, and the expiry ticker.
//!
//! What it owns: after each wake-up of a group's watcher, pushing every message accepted
//! since the last look (`SecretState::pending_after`) as a `SecretMessage` to the
//! connections of its one target device: the user **and** the device id of the session
//! must match, so the target user's other devices and the sender's other devices get
//! nothing. And the ticker: on the leader of a group whose earliest pending deadline has
//! passed, it proposes a `Tick` so expiry (decided in apply, by batch timestamps) happens
//! without other traffic. What it must not do: keep ciphertext (it is read from the log
//! for the push and dropped), or push a message already erased (an all-zero ciphertext or
//! one no longer pending is skipped).
//!
//! On a node without a replica of the secret chat's group, the cross-node poller
//! (`remote.rs`) delivers the same messages: a replica puts the pending ones held in the
//! answered entries for the poller's users into its answer ([`Hub::secret_news`]), and
//! the poller pushes each to its target device here ([`Hub::deliver_secret_news`]).
//!
//! A device offline when a message arrived gets it with `secret.pending` on reconnect;
//! with push notifications on, the leader of the group notes a notification that says
//! only that something arrived for that device (`Notifier::secret_arrived`), never what.

use std::collections::HashSet;
use std::sync::Weak;
use std::time::Duration;

use chatlog_raft::chat::secret::{PendingView, SecretChatView, SecretCommand};
use chatlog_raft::chat::{Command, UserId};
use chatlog_raft::node::Group;
use chatlog_raft::secret_log;
use chatlog_wire::proto::node::v1::FanoutSecret;
use chatlog_wire::proto::v1::push;

use super::{FANOUT_READ_EVENTS_MAX, Hub};
use crate::gateway::PushSender;
use crate::service::secret::secret_message;

/// How often the ticker looks for due secret messages. Why: a message is erased at most
/// this long after its time-to-live ends; a quarter second is far below any TTL (at
/// least a second) and one look costs a read lock per local group.
pub const SECRET_TICK_INTERVAL: Duration = Duration::from_millis(250);

impl Hub {
    /// The push senders of `(user, device)`'s connections on this node.
    fn device_conns(&self, user: u64, device: &str) -> Vec<PushSender> {
        let online = self.online();
        online.users.get(&user).map_or_else(Vec::new, |u| {
            u.conns
                .iter()
                .filter(|c| c.device_id == device)
                .map(|c| c.pushes.clone())
                .collect()
        })
    }

    /// The pending secret messages held in the Raft entries (`after`, `through`] of
    /// `group` whose target device belongs to one of `users`, with their chats: what a
    /// cross-node fan-out answer for those entries carries (`remote.rs`).
    pub(super) fn secret_news(
        group: &Group,
        after: u64,
        through: u64,
        users: &HashSet<UserId>,
    ) -> Vec<(PendingView, SecretChatView)> {
        let st = group.shared().read();
        let s = st.secret();
        s.pending_in_entries(after, through)
            .into_iter()
            .filter_map(|p| s.chat(p.chat).map(|v| (p, v)))
            .filter(|(p, v)| users.contains(&v.party(1 - p.from_side as usize).user))
            .collect()
    }

    /// Reads the messages of [`Hub::secret_news`] from the log, for an answer. A message
    /// erased meanwhile (acknowledged or expired) is left out.
    pub(super) async fn read_secret_news(
        group: &Group,
        due: Vec<(PendingView, SecretChatView)>,
    ) -> Result<Vec<FanoutSecret>, String> {
        let mut out = Vec::with_capacity(due.len());
        for (p, view) in due {
            let sent = secret_log::read_send(group.id(), group.log_reader(), p.raft_index, p.pos)
                .await
                .map_err(|e| format!("reading a secret message of chat {}: {e}", p.chat))?;
            if let Some(sent) = sent {
                let target = view.party(1 - p.from_side as usize);
                out.push(FanoutSecret {
                    user_id: target.user,
                    device_id: target.device.clone(),
                    message: Some(secret_message(&view, &p, sent)),
                });
            }
        }
        Ok(out)
    }

    /// Pushes the secret messages of a cross-node fan-out answer to the connections of
    /// their target devices on this node.
    pub(super) fn deliver_secret_news(&self, secrets: Vec<FanoutSecret>) {
        for s in secrets {
            let Some(m) = s.message else { continue };
            for c in self.device_conns(s.user_id, &s.device_id) {
                // A full queue disconnects that session only; the device fetches with
                // `secret.pending` on reconnect.
                let _ = c.push(0, push::Kind::SecretMessage(m.clone()));
            }
        }
    }

    /// Pushes the secret messages of `group` numbered after `cursor` to their target
    /// devices, and moves `cursor`.
    pub(super) async fn push_secret(&self, group: &Group, cursor: &mut u64) {
        let last = group.shared().read().secret().last_message_no();
        while *cursor < last {
            let due: Vec<_> = {
                let st = group.shared().read();
                let s = st.secret();
                s.pending_after(*cursor, FANOUT_READ_EVENTS_MAX as usize)
                    .into_iter()
                    .filter(|p| p.no <= last)
                    .filter_map(|p| s.chat(p.chat).map(|v| (p, v)))
                    .collect()
            };
            if due.is_empty() {
                break;
            }
            for (p, view) in due {
                *cursor = p.no;
                let target = view.party(1 - p.from_side as usize);
                let conns = self.device_conns(target.user, &target.device);
                if conns.is_empty() {
                    // Offline here: a push notification that says only that something
                    // arrived, for which device (`notify/`), if notifications are on.
                    if let Some(n) = self.notifier.get() {
                        n.secret_arrived(group, target.user, &target.device);
                    }
                    continue;
                }
                match secret_log::read_send(group.id(), group.log_reader(), p.raft_index, p.pos)
                    .await
                {
                    Ok(Some(sent)) => {
                        let m = secret_message(&view, &p, sent);
                        for c in conns {
                            // A full queue disconnects that session only; the device
                            // fetches with `secret.pending` on reconnect.
                            let _ = c.push(0, push::Kind::SecretMessage(m.clone()));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(
                        group = group.id(),
                        error = %e,
                        "fan-out could not read a secret message"
                    ),
                }
            }
        }
        *cursor = last;
    }
}

/// The expiry ticker of one node (see the module docs). Stops when the hub is dropped.
pub(super) async fn run_ticker(hub: Weak<Hub>) {
    let mut interval = tokio::time::interval(SECRET_TICK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(hub) = hub.upgrade() else { return };
        // The clock batch timestamps come from (smoothed across wall-clock jumps), so a
        // tick is proposed only when its batch will expire something.
        let now = chatlog_raft::clock::now_ms();
        let me = hub.node.node_id();
        let due: Vec<u64> = hub
            .node
            .groups()
            .into_iter()
            .filter(|g| g.leader() == Some(me))
            .filter(|g| {
                g.shared()
                    .read()
                    .secret()
                    .earliest_deadline_ms()
                    .is_some_and(|d| d <= now)
            })
            .map(|g| g.id())
            .collect();
        let node = std::sync::Arc::clone(&hub.node);
        drop(hub);
        for g in due {
            if let Err(e) = node.propose(g, Command::Secret(SecretCommand::Tick)).await {
                tracing::warn!(group = g, error = %e, "could not propose a secret expiry tick");
            }
        }
    }
}
