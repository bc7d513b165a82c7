//! The chatlog server and CLI. Today it holds the command line, the storage commands and
//! the gateway's connection layer; the service behind the gateway, fan-out, sync and
//! media layers arrive with their issues.

pub mod cli;
pub mod gateway;
pub mod storage_cmd;
