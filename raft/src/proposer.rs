//! The proposal queue of one group: where proposers leave commands for the group's
//! batcher (`node::run_batcher`) and wait for their outcome.
//!
//! What it owns: the entries being filled (the command bytes already framed as the
//! `ChatBatch` they will be, so the batcher hands the buffer to openraft without copying
//! it), the bound on queued commands ([`PROPOSE_QUEUE_MAX`]) and the one reply slot per
//! entry that every proposer of that entry waits on. What it must not do: propose, apply
//! or decide anything about the commands (the batcher and the state machine do), or let
//! an entry grow past [`ENTRY_COMMANDS_MAX`] commands or [`ENTRY_BYTES_MAX`] bytes.
//!
//! Why not a channel and a oneshot per command: at ~40 commands per entry the per-command
//! costs dominated the core's profile (`benches/RESULTS.md`, session 2): an allocation
//! for the encoded command, a oneshot allocation, the channel's semaphore and wake-up,
//! then a copy of every command into the batch. Here a proposer encodes its command
//! straight into the open entry's buffer under a short lock and clones the entry's slot
//! (one reference count); the batcher takes whole entries; one `notify_waiters` per
//! entry wakes its proposers, each of which takes its own outcome.
//!
//! Ordering: commands enter entries in the order proposers take the lock, and entries
//! leave in the order they were opened, so a proposer's commands are proposed in the
//! order it proposed them (as through the channel before).

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
// tokio's clock, not std's: the batcher times the extra in-flight slots from `opened`,
// and a simulation's paused clock must decide that, not the host's (issue 9).
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::chat::Command;
use crate::chat::Outcome;
use crate::chat::command::{BATCH_HEADER_BYTES, BATCH_VERSION};
use crate::node::{ENTRY_BYTES_MAX, ENTRY_COMMANDS_MAX, PROPOSE_QUEUE_MAX, ProposeError};
use crate::types::GroupId;

/// What the entry carrying a command came to: every command's outcome and the entry's
/// Raft index, or one error for all of them.
pub type EntryResult = Result<(Vec<Outcome>, u64), ProposeError>;

/// The reply slot of one entry, shared by every proposer whose command it carries.
#[derive(Debug, Default)]
pub struct Slot {
    result: OnceLock<EntryResult>,
    filled: Notify,
}

impl Slot {
    /// Sets the entry's result (the first one set wins) and wakes every waiter.
    pub fn fill(&self, result: EntryResult) {
        let _ = self.result.set(result);
        self.filled.notify_waiters();
    }

    /// Waits until the slot is filled.
    async fn wait(&self) -> &EntryResult {
        loop {
            // Registered before the check: a `fill` between the check and the await
            // still wakes this waiter (`notify_waiters` reaches every `Notified` made
            // before it).
            let notified = self.filled.notified();
            if let Some(r) = self.result.get() {
                return r;
            }
            notified.await;
        }
    }
}

/// An entry being filled, or taken by the batcher and not answered yet. Dropping it
/// unanswered (a batcher that stopped) answers its proposers `Unavailable`, so no
/// proposer waits forever.
#[derive(Debug)]
pub struct OpenEntry {
    group: GroupId,
    /// `BATCH_HEADER_BYTES` to be filled in by [`OpenEntry::seal`], then each command as
    /// `len u32 | bytes` (the `ChatBatch` layout, `chat::command`).
    buf: Vec<u8>,
    commands: usize,
    slot: Arc<Slot>,
    /// When its first command arrived (tokio's clock): the longest a command of it waited
    /// to be taken.
    opened: Instant,
}

impl OpenEntry {
    fn new(group: GroupId) -> OpenEntry {
        let mut buf = Vec::with_capacity(ENTRY_BUF_INITIAL_BYTES);
        buf.resize(BATCH_HEADER_BYTES, 0);
        OpenEntry {
            group,
            buf,
            commands: 0,
            slot: Arc::default(),
            opened: Instant::now(),
        }
    }

    fn is_full(&self) -> bool {
        self.commands >= ENTRY_COMMANDS_MAX
            || self.buf.len() - BATCH_HEADER_BYTES >= ENTRY_BYTES_MAX
    }

    /// Commands in the entry.
    pub fn len(&self) -> usize {
        self.commands
    }

    /// True when the entry holds no command (never for an entry the batcher takes).
    pub fn is_empty(&self) -> bool {
        self.commands == 0
    }

    /// The entry's `ChatBatch` bytes, stamped with `timestamp_ms`; the entry keeps only
    /// its slot, to be answered with [`OpenEntry::answer`].
    pub fn seal(&mut self, timestamp_ms: u64) -> Bytes {
        let mut buf = std::mem::take(&mut self.buf);
        buf[0] = BATCH_VERSION;
        buf[1..9].copy_from_slice(&timestamp_ms.to_le_bytes());
        // At most ENTRY_COMMANDS_MAX, far below u32::MAX.
        buf[9..13].copy_from_slice(&(self.commands as u32).to_le_bytes());
        Bytes::from(buf)
    }

    /// Answers every proposer of the entry.
    pub fn answer(self, result: EntryResult) {
        self.slot.fill(result);
    }
}

impl Drop for OpenEntry {
    fn drop(&mut self) {
        if self.slot.result.get().is_none() {
            self.slot.fill(Err(ProposeError::Unavailable {
                group: self.group,
                detail: "the group stopped before answering".into(),
            }));
        }
    }
}

/// Bytes reserved for a new entry's buffer: about 40 posts of 256 bytes, what one entry
/// carried under load (`benches/RESULTS.md`); it grows from there up to
/// `ENTRY_BYTES_MAX`.
const ENTRY_BUF_INITIAL_BYTES: usize = 16 << 10;

#[derive(Debug, Default)]
struct Pending {
    /// Entries being filled, oldest first; proposers add to the last one.
    entries: VecDeque<OpenEntry>,
    /// Set once: the group's handles are gone; nothing more is accepted.
    closed: bool,
}

/// The proposal queue of one group (see the module docs).
#[derive(Debug)]
pub struct ProposalQueue {
    group: GroupId,
    pending: Mutex<Pending>,
    /// Wakes the batcher (one stored permit when it is not waiting).
    ready: Notify,
    /// One permit per command that may still be queued ([`PROPOSE_QUEUE_MAX`]); a
    /// proposer takes one, the batcher returns an entry's worth when it takes the entry.
    room: Semaphore,
    /// Per entry taken by the batcher, how long its first command waited to be taken:
    /// the queueing part of a post's latency (the rest is the entry's propose-to-applied
    /// time, `Group::commit_latency`).
    wait_latency: chatlog_storage::Histogram,
}

impl ProposalQueue {
    /// An empty queue of group `group`.
    pub fn new(group: GroupId) -> ProposalQueue {
        ProposalQueue {
            group,
            pending: Mutex::default(),
            ready: Notify::new(),
            room: Semaphore::new(PROPOSE_QUEUE_MAX),
            wait_latency: chatlog_storage::Histogram::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics under this lock but `encode_into` on a bug; the data (whole
        // framed commands) stays consistent either way.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopped(&self) -> ProposeError {
        ProposeError::Unavailable {
            group: self.group,
            detail: "the group is stopped".into(),
        }
    }

    /// Per entry, how long its first command waited for the batcher to take it.
    pub fn wait_latency(&self) -> &chatlog_storage::Histogram {
        &self.wait_latency
    }

    /// Commands queued and not yet taken by the batcher.
    pub fn queued(&self) -> usize {
        PROPOSE_QUEUE_MAX.saturating_sub(self.room.available_permits())
    }

    /// Queues `command` and waits for the outcome of the entry that carries it (and the
    /// entry's Raft index). Waits while [`PROPOSE_QUEUE_MAX`] commands are queued.
    pub async fn propose(&self, command: &Command) -> Result<(Outcome, u64), ProposeError> {
        self.room
            .acquire()
            .await
            .map_err(|_| self.stopped())?
            .forget();
        let (slot, pos) = {
            let mut p = self.lock();
            if p.closed {
                drop(p);
                self.room.add_permits(1);
                return Err(self.stopped());
            }
            if p.entries.back().is_none_or(OpenEntry::is_full) {
                p.entries.push_back(OpenEntry::new(self.group));
                chatlog_storage::timeline::record(
                    chatlog_storage::timeline::Event::EntryOpened,
                    self.group,
                    0,
                );
            }
            let Some(open) = p.entries.back_mut() else {
                unreachable!("an entry was just pushed");
            };
            let start = open.buf.len();
            open.buf.extend_from_slice(&[0; 4]);
            command.encode_into(&mut open.buf);
            // A command is bounded by its fields' limits, far below u32::MAX.
            let len = (open.buf.len() - start - 4) as u32;
            open.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
            let pos = open.commands;
            open.commands += 1;
            (Arc::clone(&open.slot), pos)
        };
        self.ready.notify_one();
        match slot.wait().await {
            Ok((outcomes, index)) => match outcomes.get(pos) {
                Some(o) => Ok((o.clone(), *index)),
                None => Err(ProposeError::Unknown {
                    group: self.group,
                    detail: format!(
                        "entry {index} answered {} outcomes, none for position {pos}",
                        outcomes.len()
                    ),
                }),
            },
            Err(e) => Err(e.clone()),
        }
    }

    /// When the oldest queued entry's first command arrived, waiting for one; `None` once
    /// the queue is closed and empty. The entry stays queued (and keeps collecting
    /// commands) until [`ProposalQueue::next_entry`] takes it.
    pub async fn first_opened(&self) -> Option<Instant> {
        loop {
            {
                let p = self.lock();
                if let Some(entry) = p.entries.front() {
                    return Some(entry.opened);
                }
                if p.closed {
                    return None;
                }
            }
            // As in `next_entry`: a proposer that queued after the check left a permit.
            self.ready.notified().await;
        }
    }

    /// The oldest entry with commands, waiting for one; `None` once the queue is closed
    /// and empty.
    pub async fn next_entry(&self) -> Option<OpenEntry> {
        loop {
            {
                let mut p = self.lock();
                if let Some(entry) = p.entries.pop_front() {
                    drop(p);
                    chatlog_storage::timeline::record(
                        chatlog_storage::timeline::Event::EntryTaken,
                        self.group,
                        entry.commands as u64,
                    );
                    self.wait_latency.record(entry.opened.elapsed());
                    self.room.add_permits(entry.commands);
                    return Some(entry);
                }
                if p.closed {
                    return None;
                }
            }
            // A proposer that queued after the check left a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }

    /// Refuses further proposals and lets the batcher finish what is queued.
    pub fn close(&self) {
        self.lock().closed = true;
        self.room.close();
        self.ready.notify_one();
    }
}

/// The handle groups hold: closes the queue when the last handle of the group goes, which
/// ends its batcher once the queue is drained.
#[derive(Debug)]
pub struct QueueHandle(pub Arc<ProposalQueue>);

impl Drop for QueueHandle {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::DecodedBatch;

    fn post(i: u64) -> Command {
        Command::Post {
            chat: 1 << 16 | 1,
            sender: 1 << 16 | 1,
            client_message_id: i,
            text: format!("post {i}"),
            media: None,
            reply_to: 0,
        }
    }

    #[tokio::test]
    async fn entries_carry_commands_in_order_and_every_proposer_gets_its_outcome() {
        let q = Arc::new(ProposalQueue::new(1));
        let mut waiters = Vec::new();
        for i in 0..10u64 {
            let q2 = Arc::clone(&q);
            waiters.push(tokio::spawn(async move { q2.propose(&post(i)).await }));
            // One at a time, so the order in the entry is known.
            while q.queued() < i as usize + 1 {
                tokio::task::yield_now().await;
            }
        }
        let mut entry = q.next_entry().await.expect("entry");
        assert_eq!(entry.len(), 10);
        assert_eq!(q.queued(), 0);
        let batch = DecodedBatch::parse(entry.seal(1234)).expect("valid batch");
        assert_eq!(batch.timestamp_ms, 1234);
        for i in 0..10 {
            assert_eq!(batch.command(i).expect("command"), post(i as u64));
        }
        let outcomes = (0..10)
            .map(|i| Outcome::refused(crate::chat::RefusalCode::BadRequest, format!("{i}")))
            .collect();
        entry.answer(Ok((outcomes, 77)));
        for (i, w) in waiters.into_iter().enumerate() {
            let (o, index) = w.await.expect("task").expect("answered");
            assert_eq!(index, 77);
            assert_eq!(
                o,
                Outcome::refused(crate::chat::RefusalCode::BadRequest, format!("{i}"))
            );
        }
    }

    #[tokio::test]
    async fn first_opened_leaves_the_entry_queued_and_growing() {
        let q = Arc::new(ProposalQueue::new(2));
        let before = Instant::now();
        let mut waiters = Vec::new();
        for i in 0..2u64 {
            let q2 = Arc::clone(&q);
            waiters.push(tokio::spawn(async move { q2.propose(&post(i)).await }));
            while q.queued() < i as usize + 1 {
                tokio::task::yield_now().await;
            }
            let opened = q.first_opened().await.expect("an entry is queued");
            assert!(opened >= before && opened <= Instant::now());
        }
        let entry = q.next_entry().await.expect("entry");
        assert_eq!(
            entry.len(),
            2,
            "both commands joined the entry first_opened saw"
        );
        drop(entry);
        q.close();
        assert!(q.first_opened().await.is_none());
        for w in waiters {
            assert!(w.await.expect("task").is_err());
        }
    }

    #[tokio::test]
    async fn a_dropped_entry_answers_unavailable_and_a_closed_queue_refuses() {
        let q = Arc::new(ProposalQueue::new(3));
        let q2 = Arc::clone(&q);
        let w = tokio::spawn(async move { q2.propose(&post(1)).await });
        let entry = q.next_entry().await.expect("entry");
        drop(entry);
        assert!(matches!(
            w.await.expect("task"),
            Err(ProposeError::Unavailable { group: 3, .. })
        ));
        q.close();
        assert!(matches!(
            q.propose(&post(2)).await,
            Err(ProposeError::Unavailable { group: 3, .. })
        ));
        assert!(q.next_entry().await.is_none());
    }

    #[tokio::test]
    async fn an_entry_closes_at_the_command_limit() {
        let q = Arc::new(ProposalQueue::new(1));
        let n = ENTRY_COMMANDS_MAX + 5;
        let mut waiters = Vec::new();
        for i in 0..n as u64 {
            let q2 = Arc::clone(&q);
            waiters.push(tokio::spawn(async move { q2.propose(&post(i)).await }));
        }
        while q.queued() < n {
            tokio::task::yield_now().await;
        }
        let first = q.next_entry().await.expect("first");
        let second = q.next_entry().await.expect("second");
        assert_eq!((first.len(), second.len()), (ENTRY_COMMANDS_MAX, 5));
        drop((first, second));
        for w in waiters {
            assert!(w.await.expect("task").is_err());
        }
    }
}
