//! A watch channel whose receivers wake in a fixed order (issue 9, deterministic
//! simulation).
//!
//! tokio's `sync::watch` spreads its waiting receivers over eight `Notify`s and picks one
//! with the runtime's random generator (`context::thread_rng_n(8)`, seeded by the OS
//! unless tokio is built with `tokio_unstable` and given an `rng_seed`), so the order in
//! which a leader's replication and heartbeat tasks wake after one change differs from
//! run to run: a simulation seed would not replay one history. This channel has one
//! `Notify`: receivers wake in the order they started waiting.
//!
//! Semantics are tokio's (what openraft relies on): a receiver starts having seen the
//! current value; `changed` returns once a newer one was sent (marking it seen) or fails
//! once every sender is gone; `send` fails when no receiver is left;
//! `send_if_modified` stores whatever `modify` did and notifies only if it said so.
//!
//! What it owns: the value, its version and the waiting receivers. What it must not do:
//! hold its lock across an await, or lose a wake-up between a check and a wait (each
//! wait registers with the `Notify` before it looks at the version).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::rt::OptionalSend;
use openraft::rt::OptionalSync;
use openraft::rt::watch::{self, RecvError, SendError};
use tokio::sync::Notify;

/// The watch of [`super::ChatRuntime`].
#[derive(Debug)]
pub struct OrderedWatch;

struct Shared<T> {
    value: RwLock<T>,
    /// Bumped (under the value's write lock) by every change that notifies.
    version: AtomicU64,
    senders: AtomicUsize,
    receivers: AtomicUsize,
    /// Set when the last sender is dropped.
    closed: AtomicBool,
    notify: Notify,
}

impl<T> Shared<T> {
    fn read(&self) -> RwLockReadGuard<'_, T> {
        // A panic while the value was written leaves it as the panicking writer left it;
        // tokio's watch behaves the same (its lock does not poison).
        self.value.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending half.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving half.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// The version this receiver has seen.
    seen: u64,
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("watch::Sender")
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("watch::Receiver")
            .field("seen", &self.seen)
            .finish()
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::SeqCst);
        Sender {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.closed.store(true, Ordering::SeqCst);
            self.shared.notify.notify_waiters();
        }
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        self.shared.receivers.fetch_add(1, Ordering::SeqCst);
        Receiver {
            shared: Arc::clone(&self.shared),
            seen: self.seen,
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.receivers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl watch::Watch for OrderedWatch {
    type Sender<T: OptionalSend + OptionalSync> = Sender<T>;
    type Receiver<T: OptionalSend + OptionalSync> = Receiver<T>;
    type Ref<'a, T: OptionalSend + 'a> = RwLockReadGuard<'a, T>;

    fn channel<T: OptionalSend + OptionalSync>(init: T) -> (Sender<T>, Receiver<T>) {
        let shared = Arc::new(Shared {
            value: RwLock::new(init),
            version: AtomicU64::new(0),
            senders: AtomicUsize::new(1),
            receivers: AtomicUsize::new(1),
            closed: AtomicBool::new(false),
            notify: Notify::new(),
        });
        (
            Sender {
                shared: Arc::clone(&shared),
            },
            Receiver { shared, seen: 0 },
        )
    }
}

impl<T: OptionalSend + OptionalSync> watch::WatchSender<OrderedWatch, T> for Sender<T> {
    fn send(&self, value: T) -> Result<(), SendError<T>> {
        if self.shared.receivers.load(Ordering::SeqCst) == 0 {
            return Err(SendError(value));
        }
        self.send_if_modified(|current| {
            *current = value;
            true
        });
        Ok(())
    }

    fn send_if_modified<F>(&self, modify: F) -> bool
    where
        F: FnOnce(&mut T) -> bool,
    {
        let modified = {
            let mut value = self.shared.value.write().unwrap_or_else(|e| e.into_inner());
            let modified = modify(&mut value);
            if modified {
                self.shared.version.fetch_add(1, Ordering::SeqCst);
            }
            modified
        };
        if modified {
            self.shared.notify.notify_waiters();
        }
        modified
    }

    fn borrow_watched(&self) -> RwLockReadGuard<'_, T> {
        self.shared.read()
    }

    fn subscribe(&self) -> Receiver<T> {
        self.shared.receivers.fetch_add(1, Ordering::SeqCst);
        Receiver {
            shared: Arc::clone(&self.shared),
            seen: self.shared.version.load(Ordering::SeqCst),
        }
    }
}

impl<T: OptionalSend + OptionalSync> watch::WatchReceiver<OrderedWatch, T> for Receiver<T> {
    async fn changed(&mut self) -> Result<(), RecvError> {
        loop {
            let notified = self.shared.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the checks: a change after them wakes this wait.
            notified.as_mut().enable();
            let version = self.shared.version.load(Ordering::SeqCst);
            if version != self.seen {
                self.seen = version;
                return Ok(());
            }
            if self.shared.closed.load(Ordering::SeqCst) {
                return Err(RecvError(()));
            }
            notified.await;
        }
    }

    fn borrow_watched(&self) -> RwLockReadGuard<'_, T> {
        self.shared.read()
    }

    fn borrow_and_update(&mut self) -> RwLockReadGuard<'_, T> {
        let value = self.shared.read();
        // Read under the value's lock: the version of exactly the value returned.
        self.seen = self.shared.version.load(Ordering::SeqCst);
        value
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use openraft::rt::watch::{Watch, WatchReceiver, WatchSender};

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn receivers_see_changes_wake_in_order_and_learn_of_closing() {
        let (tx, mut rx) = OrderedWatch::channel(0u64);
        assert_eq!(*rx.borrow_watched(), 0);
        let woken = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for k in 0..16u64 {
            let mut rx = tx.subscribe();
            let woken = woken.clone();
            tasks.push(tokio::spawn(async move {
                rx.changed().await.expect("a change");
                woken.lock().unwrap().push(k);
                *rx.borrow_and_update()
            }));
        }
        // Let every task register its wait.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        tx.send(7).expect("receivers exist");
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(*woken.lock().unwrap(), (0..16).collect::<Vec<_>>());
        // A change made before the wait is not missed; an unchanged one does not wake.
        rx.changed().await.expect("the send above");
        assert!(!tx.send_if_modified(|_| false));
        assert!(tx.send_if_modified(|v| {
            *v = 9;
            true
        }));
        rx.changed().await.expect("a change");
        assert_eq!(*rx.borrow_and_update(), 9);
        drop(tx);
        assert!(rx.changed().await.is_err(), "every sender is gone");
        let (tx, rx) = OrderedWatch::channel(1u8);
        drop(rx);
        assert!(tx.send(2).is_err(), "no receiver left");
    }
}
