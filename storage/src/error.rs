//! The engine's one error type. Every variant says what was being done to what; callers
//! match on variants, never on message text.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::LogId;

/// Result alias for the storage engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
///
/// `Clone` so that one failure (a failed fdatasync, say) can be handed to every waiter
/// whose write it affected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// An operating-system call failed.
    #[error("storage i/o error while {action} {path}: {source}")]
    Io {
        /// What the engine was doing ("writing", "syncing", "opening", …).
        action: &'static str,
        /// The file or directory it was doing it to.
        path: PathBuf,
        /// The error the operating system returned.
        #[source]
        source: Arc<io::Error>,
    },
    /// Bytes on disk failed a check: a checksum, a magic number, a length, a sequence.
    #[error("storage corruption in {file} at offset {offset}: {detail}")]
    Corruption {
        /// The file holding the bad bytes.
        file: PathBuf,
        /// Byte offset of the bad record or block within that file.
        offset: u64,
        /// What check failed.
        detail: String,
    },
    /// A log was stopped after corruption was found in it; it serves nothing until repaired.
    #[error("log {log} is stopped: {cause}")]
    LogFailed {
        /// The stopped log.
        log: LogId,
        /// The error that stopped it.
        cause: Arc<Error>,
    },
    /// The engine stopped accepting writes after an I/O failure (fail-stop: a failed
    /// fdatasync is never retried and never reported as success).
    #[error("storage engine stopped after an earlier failure: {cause}")]
    Stopped {
        /// The failure that stopped the engine.
        cause: Arc<Error>,
    },
    /// A write batch broke a rule of the log it touches (a gap, a conflict, a bad range).
    #[error("invalid write to log {log}: {reason}")]
    InvalidWrite {
        /// The log the rejected operation targeted.
        log: LogId,
        /// Which rule it broke.
        reason: String,
    },
    /// A limit was exceeded; the named limit and the offending size are given.
    #[error("{what} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// What was too large ("write batch", "entry", "meta value", …).
        what: &'static str,
        /// Its size in bytes (or count, for counts).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A read asked for an index the log does not hold (purged, truncated or not yet written).
    #[error("log {log} has no entry {index} (it holds [{first}, {next}))")]
    OutOfRange {
        /// The log read.
        log: LogId,
        /// The index asked for.
        index: u64,
        /// First index held.
        first: u64,
        /// One past the last index held.
        next: u64,
    },
    /// The configuration cannot work.
    #[error("invalid storage configuration: {0}")]
    Config(String),
    /// The engine was closed.
    #[error("storage engine is closed")]
    Closed,
}

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            action,
            path: path.into(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn corruption(
        file: impl Into<PathBuf>,
        offset: u64,
        detail: impl Into<String>,
    ) -> Error {
        Error::Corruption {
            file: file.into(),
            offset,
            detail: detail.into(),
        }
    }

    /// True for errors that mean bytes on disk are bad (as opposed to I/O or usage errors).
    pub fn is_corruption(&self) -> bool {
        match self {
            Error::Corruption { .. } => true,
            Error::LogFailed { cause, .. } | Error::Stopped { cause } => cause.is_corruption(),
            _ => false,
        }
    }
}
