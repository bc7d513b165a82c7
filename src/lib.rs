//! The chatlog server and CLI: the command line (`cli`), `chatlog serve` (`serve`), the
//! gateway's connection layer (`gateway`), the Raft-backed service behind it (`service`),
//! the fan-out hub (`fanout`), push notifications for offline members (`notify`), the HTTP
//! port (`http`), the HTTP bot API (`bot`), and the client, admin, load
//! generator and storage commands (`client_cmd`, `admin_cmd`, `bench_cmd`,
//! `storage_cmd`), and media uploads and downloads (`media`).

pub mod admin_cmd;
pub mod admin_retention;
pub mod backup;
pub mod bench_cmd;
pub mod bot;
pub mod cli;
pub mod client_cmd;
pub mod fanout;
pub mod gateway;
pub mod handoff;
pub mod http;
pub mod media;
pub mod notify;
pub mod serve;
pub mod service;
pub mod storage_cmd;
