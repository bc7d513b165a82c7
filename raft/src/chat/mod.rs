//! Chat semantics: the commands a Raft entry carries, what applying them does, and the
//! state that results (chat heads, members, the per-chat index, the dedupe window, users
//! and sessions).
//!
//! What it owns: everything that must be deterministic across replicas. Applying the
//! same batches in the same order yields the same seqs, the same refusals and the same
//! encoded state on every replica and after every restart. What it must not do: read
//! clocks, draw random numbers, do I/O or know about openraft (the state machine in
//! `state_machine.rs` drives it; the proposer stamps each batch with its timestamp).
//!
//! Ids. Chat ids and user ids carry their group in the low [`GROUP_BITS`] bits, so routing
//! a request is a computation ([`group_of`]). Each group numbers its own users and chats
//! from 1 in the high bits.

pub mod bot;
pub mod chat_lists;
pub mod command;
pub mod index_chunks;
pub mod key_hash;
pub mod media;
pub mod placement;
pub mod retention;
pub mod secret;
pub mod state;

pub use command::{
    Batch, ChatKind, Command, DecodedBatch, MediaRef, Outcome, Refusal, RefusalCode, Role,
};
pub use state::{ChatView, EventKind, EventLoc, GroupState, MemberView, UserView};

use crate::types::GroupId;

/// A user's id. Its low [`GROUP_BITS`] bits name the group holding the user's state.
pub type UserId = u64;
/// A chat's id. Its low [`GROUP_BITS`] bits name the group holding the chat's log.
pub type ChatId = u64;

/// Bits of an id that name its group.
pub const GROUP_BITS: u32 = 16;
/// Groups a cluster can have (`--groups` is at most this).
pub const GROUPS_MAX: u64 = 1 << GROUP_BITS;

/// The group holding the state of user or chat `id`.
pub fn group_of(id: u64) -> GroupId {
    id & (GROUPS_MAX - 1)
}

/// The id of the `local`-th user or chat (from 1) of group `group`.
pub fn make_id(group: GroupId, local: u64) -> u64 {
    debug_assert!(group < GROUPS_MAX);
    (local << GROUP_BITS) | group
}

/// The group a new user with handle `name` lives in: handles are unique per group, and a
/// handle's group is a hash of it, so uniqueness is checked where the name must live.
/// FNV-1a: stable across builds and platforms (a std `Hasher` is not).
pub fn group_of_name(name: &str, groups: u64) -> GroupId {
    crate::codec::fnv1a(name.as_bytes()) % groups.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_group() {
        for g in [0, 1, 15, GROUPS_MAX - 1] {
            for local in [1, 2, 1 << 40] {
                assert_eq!(group_of(make_id(g, local)), g);
            }
        }
        assert_ne!(make_id(3, 1), make_id(3, 2));
    }

    #[test]
    fn name_groups_are_stable_and_in_range() {
        assert_eq!(group_of_name("alice", 16), group_of_name("alice", 16));
        for n in ["a", "bob", "carol_1"] {
            assert!(group_of_name(n, 7) < 7);
        }
        assert_eq!(group_of_name("x", 1), 0);
    }
}

#[cfg(test)]
mod rules_tests;
#[cfg(test)]
mod secret_rules_tests;
#[cfg(test)]
mod test_rng;
