//! Who is online on the other nodes of a cluster, so that "online" means online anywhere
//! for push notifications (and `get_presence`'s online flag).
//!
//! What it owns: announcing this node's online users to every other member of the
//! placement (`online_request`, an `OnlineUsers` list, complete each time) about once per
//! [`ONLINE_ANNOUNCE_INTERVAL`] and at once after a user comes online here, and keeping
//! the latest list from each peer until it is older than [`ONLINE_REMOTE_EXPIRY`] (a
//! node that died stops counting). What it must not do: push anything (typing and
//! presence pushes stay per node, `presence.rs`), or trust a list beyond its bound.
//!
//! The lists are a hint: a user who just came online on another node may still get one
//! notification (at most an announce interval late), and one who just left may miss one
//! until the list expires; live delivery never depends on them.

use std::collections::HashSet;
use std::sync::Weak;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatlog_raft::NodeId;
use chatlog_raft::chat::UserId;
use chatlog_wire::proto::node::v1::OnlineUsers;
use prost::Message;

use super::{FANOUT_POLL_USERS_MAX, FANOUT_REPOLL_PAUSE, Hub};

/// How often a node tells the others who is online on it (also at once after a login).
/// Why: a notification is collapsed over a window of about this size anyway; one list
/// per second per peer costs 8 bytes per online user.
pub const ONLINE_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);
/// Age after which a peer's list no longer counts. Why: three missed announces mean the
/// peer is down or cut off; its users are offline for notifications from then on.
pub const ONLINE_REMOTE_EXPIRY: Duration = Duration::from_secs(3);

impl Hub {
    /// Whether `user` has an authenticated connection on another node, as last told.
    pub(super) fn online_elsewhere(&self, user: UserId) -> bool {
        let remote = self.remote_online.lock().unwrap_or_else(|p| p.into_inner());
        remote
            .values()
            .any(|(at, users)| at.elapsed() < ONLINE_REMOTE_EXPIRY && users.contains(&user))
    }

    /// Takes `from`'s list of online users.
    pub(super) fn online_from(&self, from: NodeId, body: Bytes) -> Result<(), String> {
        let list = OnlineUsers::decode(body).map_err(|e| format!("a bad online list: {e}"))?;
        if list.users.len() > FANOUT_POLL_USERS_MAX {
            return Err(format!(
                "an online list of {} users, more than {FANOUT_POLL_USERS_MAX}",
                list.users.len()
            ));
        }
        let users: HashSet<UserId> = list.users.into_iter().collect();
        self.remote_online
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(from, (Instant::now(), users));
        Ok(())
    }
}

/// Announces this node's online users to the other members (see the module docs).
pub(super) async fn announce(hub: Weak<Hub>) {
    let mut online_changes = match hub.upgrade() {
        Some(h) => h.online_changes.subscribe(),
        None => return,
    };
    loop {
        {
            let Some(h) = hub.upgrade() else { return };
            let Some(router) = h.node.router().cloned() else {
                return;
            };
            online_changes.borrow_and_update();
            let body = Bytes::from(
                OnlineUsers {
                    users: h.online_users(),
                }
                .encode_to_vec(),
            );
            let me = h.node.node_id();
            for peer in h.node.placement().members.keys().copied() {
                if peer == me {
                    continue;
                }
                let (router, body) = (router.clone(), body.clone());
                // One task per peer: a dead peer does not hold back the others.
                tokio::spawn(async move {
                    if let Err(error) = router.online(peer, body, ONLINE_ANNOUNCE_INTERVAL).await {
                        tracing::debug!(peer, %error, "online list not delivered");
                    }
                });
            }
        }
        tokio::select! {
            () = tokio::time::sleep(ONLINE_ANNOUNCE_INTERVAL) => {}
            _ = online_changes.changed() => tokio::time::sleep(FANOUT_REPOLL_PAUSE).await,
        }
    }
}
