//! The chatlog server and CLI. Today it holds the command line and the storage
//! commands; the gateway, fan-out, sync and media layers arrive with their issues.

pub mod cli;
pub mod storage_cmd;
