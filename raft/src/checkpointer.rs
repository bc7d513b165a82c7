//! Writing a group's periodic checkpoint off the apply path.
//!
//! What it owns: the one background checkpoint write of a group at a time, and the lock
//! ([`CheckpointLock`]) that orders every write of the group's checkpoint (this
//! background one, a snapshot's, an installed snapshot's), so the durable pointer never
//! goes back to an older state. What it must not do: encode the state (the state machine
//! does, under its lock, at an applied index, so the bytes are the state at exactly that
//! index), decide when to checkpoint, or hold more than one encoded state in memory.
//!
//! Why. Every `SmConfig::checkpoint_every_entries` entries the state machine wrote the
//! whole encoded state into the engine and waited for its fdatasync inside `apply`: the
//! group applied nothing (and answered no post) for that write, which grows with the
//! state (the per-chat indexes hold 16 bytes per event, a 200,000-member chat 17 bytes
//! per member). Now `apply` only encodes (CPU, no I/O) and hands the bytes to a task;
//! the next entries apply while the chunks and the pointer are written.
//!
//! Safety of the hand-off (`state_machine` module docs, "Checkpoints"): the chunks are
//! written before the pointer batch, the engine makes a batch durable only after the
//! ones before it, and [`GroupShared::checkpointed`](crate::state_machine::GroupShared)
//! moves only once the pointer is durable, so retention never purges what a restart
//! would replay. A crash while the write is in flight restarts from the previous
//! checkpoint and replays more of the log, as a crash before a synchronous write did. A
//! write that fails stops the group at its next `apply`, as a failed synchronous write
//! did at once.

use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::types::GroupId;

/// Held while a checkpoint of the group is written (chunks and pointer). Shared by the
/// background writer and the state machine's synchronous writes, which therefore happen
/// one after another in the order they took it.
pub type CheckpointLock = Arc<Mutex<()>>;

/// Encoded checkpoints waiting to be written, at most: one. Why: each is a whole encoded
/// state; a second one arriving while the first is still being written is skipped (the
/// next apply retries), so memory holds at most one state's encoding besides the state.
pub const CHECKPOINTS_IN_FLIGHT_MAX: usize = 1;

/// The background checkpoint writer of one group (module docs).
#[derive(Debug)]
pub struct Checkpointer {
    group: GroupId,
    lock: CheckpointLock,
    in_flight: Option<JoinHandle<Result<(), Error>>>,
}

/// What [`Checkpointer::reserve`] found.
#[derive(Debug)]
pub enum Reservation {
    /// Nothing in flight: encode now and pass the bytes and this guard to
    /// [`Checkpointer::start`].
    Free(OwnedMutexGuard<()>),
    /// A write (background or synchronous) is still going: try again later.
    Busy,
}

impl Checkpointer {
    /// The writer of group `group`, with nothing in flight.
    pub fn new(group: GroupId) -> Checkpointer {
        Checkpointer {
            group,
            lock: CheckpointLock::default(),
            in_flight: None,
        }
    }

    /// The lock every checkpoint write of the group takes.
    pub fn lock(&self) -> &CheckpointLock {
        &self.lock
    }

    /// Reports how the last background write ended, once it has: `Err` is that write's
    /// storage error (fatal for the group, as a synchronous one was).
    pub fn poll_finished(&mut self) -> Result<(), Error> {
        let Some(task) = self.in_flight.as_mut() else {
            return Ok(());
        };
        if !task.is_finished() {
            return Ok(());
        }
        // The task has finished, so this does not wait; it may still be `None` when the
        // calling task's cooperative budget is spent: the handle stays for next time.
        let Some(joined) = futures_util::FutureExt::now_or_never(&mut *task) else {
            return Ok(());
        };
        self.in_flight = None;
        match joined {
            Ok(result) => result,
            Err(join) => Err(Error::Inconsistent {
                group: self.group,
                detail: format!("the checkpoint task ended abnormally: {join}"),
            }),
        }
    }

    /// Whether a new checkpoint may start now (at most [`CHECKPOINTS_IN_FLIGHT_MAX`]).
    pub fn reserve(&mut self) -> Result<Reservation, Error> {
        self.poll_finished()?;
        const _: () = assert!(CHECKPOINTS_IN_FLIGHT_MAX == 1);
        if self.in_flight.is_some() {
            return Ok(Reservation::Busy);
        }
        Ok(match Arc::clone(&self.lock).try_lock_owned() {
            Ok(guard) => Reservation::Free(guard),
            Err(_) => Reservation::Busy,
        })
    }

    /// Runs `write` (the chunks and pointer of one checkpoint, then moving
    /// `checkpointed`) in a task that holds `guard` until it is durable.
    pub fn start<F>(&mut self, guard: OwnedMutexGuard<()>, write: F)
    where
        F: std::future::Future<Output = Result<(), Error>> + Send + 'static,
    {
        debug_assert!(self.in_flight.is_none(), "one checkpoint in flight at most");
        self.in_flight = Some(tokio::spawn(async move {
            let result = write.await;
            drop(guard);
            result
        }));
    }

    /// Waits for the background write in flight, if any, and reports how it ended.
    pub async fn finish(&mut self) -> Result<(), Error> {
        let Some(task) = self.in_flight.take() else {
            return Ok(());
        };
        match task.await {
            Ok(result) => result,
            Err(join) => Err(Error::Inconsistent {
                group: self.group,
                detail: format!("the checkpoint task ended abnormally: {join}"),
            }),
        }
    }
}
