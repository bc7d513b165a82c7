//! chatlog-raft: openraft glue (log store, state machine, transport, multi-group manager)
//! over `chatlog-storage`. Not yet written: see issue "Replicated chat logs".
