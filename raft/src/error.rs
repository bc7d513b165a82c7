//! The crate's one error type. Every variant says which group, what was being done and
//! to what; callers match on variants, never on message text.
//!
//! Openraft's storage traits return `std::io::Error` and wrap it in a `StorageError`
//! with their own subject and verb, which stops the group (fatal, by design: a store
//! that failed must not keep serving). We hand openraft `io::Error::other(Error)`, so
//! the typed error stays reachable through `io::Error::get_ref` / `downcast`.

use std::io;

use crate::codec::DecodeError;
use crate::types::GroupId;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a group's storage glue.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage engine refused or failed an operation.
    #[error("group {group}: {verb} {subject}: {source}")]
    Storage {
        /// The group whose storage failed.
        group: GroupId,
        /// What was being done ("reading", "appending", "purging", …).
        verb: &'static str,
        /// What it was done to ("log entries [3, 9)", "the vote", …).
        subject: String,
        /// The engine's error.
        #[source]
        source: chatlog_storage::Error,
    },
    /// Bytes read back from the engine did not decode.
    #[error("group {group}: decoding {subject}: {source}")]
    Decode {
        /// The group whose data is bad.
        group: GroupId,
        /// What was being decoded ("log entry 7", "the vote", …).
        subject: String,
        /// The failed check.
        #[source]
        source: DecodeError,
    },
    /// Stored data contradicts itself or the caller broke the storage contract (an entry
    /// read back at the wrong index, a gap in an append, a hole in the log).
    #[error("group {group}: {detail}")]
    Inconsistent {
        /// The group concerned.
        group: GroupId,
        /// What does not add up.
        detail: String,
    },
    /// A configuration that cannot work (Raft timing, placement).
    #[error("invalid configuration: {detail}")]
    Config {
        /// What is wrong.
        detail: String,
    },
    /// The group id cannot be mapped to engine logs.
    #[error("group id {group} is above the largest supported group id {max}")]
    GroupIdTooLarge {
        /// The refused id.
        group: GroupId,
        /// The largest id accepted.
        max: GroupId,
    },
}

impl Error {
    /// s8retention: whether stored bytes failed their checks (a damaged record, a log the
    /// engine stopped because of one, or read-back bytes that do not decode), as opposed
    /// to a bug or a usage error. A read that hits damage is refused as unavailable: the
    /// node's damage watcher repairs the replica, and another replica may serve meanwhile.
    pub fn is_damage(&self) -> bool {
        match self {
            Error::Storage { source, .. } => source.is_corruption(),
            Error::Decode { .. } => true,
            _ => false,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::other(e)
    }
}
