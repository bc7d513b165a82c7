//! chatlog-wire: the protocol layer between chatlog clients and servers, and between
//! chatlog nodes.
//!
//! This crate owns the `.proto` files in `proto/` (the source of truth, compiled by
//! `build.rs`), the Rust messages generated from them ([`proto`]), the length-prefixed
//! framing that carries them on a byte stream ([`frame`]), the protocol's named limits
//! ([`limits`]) and the one error type of this layer ([`Error`]). `PROTOCOL.md` describes
//! the protocol for client authors.
//!
//! Only this crate derives prost messages. Other crates convert their own types to and
//! from these messages at their boundary, so an internal type never becomes part of the
//! protocol by accident. This crate does no networking of its own beyond reading and
//! writing frames on a stream it is given; connections, routing and sessions belong to
//! the server.

#![warn(missing_docs)]

pub mod error;
pub mod frame;
pub mod limits;
pub mod proto;

pub use error::{Error, Result};
pub use frame::FrameDecoder;
