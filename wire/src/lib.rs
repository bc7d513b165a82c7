//! chatlog-wire: the protocol layer between chatlog clients and servers, and between
//! chatlog nodes.
//!
//! This crate owns the `.proto` files in `proto/` (the source of truth, compiled by
//! `build.rs`), the Rust messages generated from them ([`proto`]), the length-prefixed
//! framing that carries them on a byte stream ([`frame`]), the protocol's named limits
//! ([`limits`]), the one error type of the codec ([`Error`]) and the async client library
//! ([`client::Client`]) that the CLI, the load generator and the tests use.
//! `PROTOCOL.md` describes the protocol for client authors.
//!
//! Only this crate derives prost messages. Other crates convert their own types to and
//! from these messages at their boundary, so an internal type never becomes part of the
//! protocol by accident. The only networking here is the client's side of a connection;
//! the server's side (accepting, sessions, routing) belongs to the server's gateway.

#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod frame;
pub mod limits;
pub mod proto;
pub mod secret;

pub use client::{Client, ClientError, ClientOptions};
pub use error::{Error, Result};
pub use frame::FrameDecoder;
