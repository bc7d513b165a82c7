//! The crate's one error type: everything that can go wrong while framing, encoding or
//! decoding protocol messages, or reading and writing frames.
//!
//! Callers match on variants, never on message text. This type describes failures of
//! this side's codec; the errors a server sends to a client are protocol messages
//! ([`crate::proto::v1::Error`]), and [`Error::protocol_code`] maps one to the other.

use std::io;

use crate::proto::v1::ErrorCode;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A framing, encoding, decoding or I/O failure.
///
/// On the reading side, every variant except [`Error::Decode`] leaves the byte stream
/// unusable: the reader no longer knows where the next frame starts, so the connection
/// must be closed. A bad payload ([`Error::Decode`]) is contained in its frame; the next
/// frame can still be read. On the writing side, [`Error::FrameTooLarge`] and
/// [`Error::EmptyFrame`] mean nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frame's length is above the limit: read from a prefix (checked before any
    /// buffer is sized from it), or measured from a message about to be encoded.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's payload length in bytes.
        len: u64,
        /// The limit it broke.
        max: u32,
    },
    /// A length prefix of 0. No valid frame is empty (every frame carries a message
    /// kind), and rejecting it stops a peer from sending endless free frames.
    #[error("frame with a length prefix of 0")]
    EmptyFrame,
    /// The stream ended inside a frame: in its prefix or in its payload.
    #[error("stream ended inside a frame: {received} of {expected} bytes received")]
    TruncatedFrame {
        /// Bytes of the frame, prefix included, that the stream should have delivered.
        /// When the stream ended inside the prefix, only the prefix's length is known.
        expected: u64,
        /// Bytes of the frame, prefix included, that it did deliver.
        received: u64,
    },
    /// A frame's payload is not a valid encoding of the expected message.
    #[error("frame payload is not a valid {message_type}: {source}")]
    Decode {
        /// The Rust type that was being decoded.
        message_type: &'static str,
        /// What prost found wrong.
        #[source]
        source: prost::DecodeError,
    },
    /// Reading from or writing to the underlying stream failed.
    #[error("i/o error while {action} a frame: {source}")]
    Io {
        /// What was being done: "reading" or "writing".
        action: &'static str,
        /// The error the stream returned.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The protocol error code a server reports in its `Disconnect` (or, for
    /// [`Error::Decode`], in its error response) when a client's bytes fail this way.
    pub fn protocol_code(&self) -> ErrorCode {
        match self {
            Error::FrameTooLarge { .. } => ErrorCode::TooLarge,
            Error::EmptyFrame | Error::TruncatedFrame { .. } | Error::Decode { .. } => {
                ErrorCode::BadRequest
            }
            Error::Io { .. } => ErrorCode::Internal,
        }
    }
}
