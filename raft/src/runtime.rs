//! The async runtime openraft runs on: tokio, with a random generator a simulation can
//! seed (issue 9, deterministic simulation).
//!
//! openraft draws its election timeouts and first heartbeat waits from
//! `AsyncRuntime::thread_rng()`. With plain `TokioRuntime` that is `rand::rng()`, seeded
//! by the OS, so two runs of one simulated history elect different leaders. [`ChatRuntime`]
//! is `TokioRuntime` in every respect (same tasks, timers, channels, instants) except
//! that `thread_rng()` draws from a per-thread seeded sequence once
//! [`seed_this_thread`] has been called on the thread, and from the OS otherwise (every
//! server: nothing seeds it). A simulation runs all its nodes on one current-thread
//! runtime, so one seed gives one sequence of draws in one order.
//!
//! The other randomness tokio itself draws (from a per-runtime generator that only a
//! `tokio_unstable` build can seed): `select!` branch order, and the order in which a
//! `sync::watch` channel wakes its receivers. openraft's own selects are biased (the
//! runtime's default `select2..4` poll in order), so they need nothing; its watch
//! channels are replaced by [`watch::OrderedWatch`], which wakes receivers in the order
//! they began to wait. So the simulation needs no `--cfg tokio_unstable` (a RUSTFLAGS
//! change would rebuild every crate of every build, CI's included).
//!
//! What it owns: the choice of runtime in `types.rs` and the seed of its generator. What it
//! must not do: change anything for a thread that was never seeded.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use openraft::rt::{AsyncRuntime, OptionalSend, Select2, Select3, Select4};
use openraft_rt_tokio::TokioRuntime;
use rand_openraft::rngs::SmallRng;
use rand_openraft::{Rng, SeedableRng};

pub mod watch;

thread_local! {
    /// The next seed of this thread's generator; `None`: draw from the OS.
    static SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Makes every later `ChatRuntime::thread_rng()` on this thread (every election timeout
/// openraft draws here) follow `seed`. For simulations only; [`unseed_this_thread`] ends it.
pub fn seed_this_thread(seed: u64) {
    SEED.with(|s| s.set(Some(seed)));
}

/// Back to OS randomness on this thread.
pub fn unseed_this_thread() {
    SEED.with(|s| s.set(None));
}

/// splitmix64: advances the thread's seed, one bijection per draw.
fn next_seed(seed: u64) -> u64 {
    let z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// tokio, with a generator [`seed_this_thread`] can seed. See the module docs.
#[derive(Debug)]
pub struct ChatRuntime {
    inner: TokioRuntime,
}

impl AsyncRuntime for ChatRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as AsyncRuntime>::Sleep;
    type Instant = <TokioRuntime as AsyncRuntime>::Instant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> =
        <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = SmallRng;

    #[inline]
    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    #[inline]
    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    #[inline]
    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    #[inline]
    fn timeout<R, F>(duration: Duration, future: F) -> Self::Timeout<R, F>
    where
        F: Future<Output = R> + OptionalSend,
    {
        TokioRuntime::timeout(duration, future)
    }

    #[inline]
    fn timeout_at<R, F>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F>
    where
        F: Future<Output = R> + OptionalSend,
    {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn select2<A, B>(
        a: A,
        b: B,
    ) -> impl Future<Output = Select2<A::Output, B::Output>> + OptionalSend
    where
        A: Future + OptionalSend,
        B: Future + OptionalSend,
    {
        TokioRuntime::select2(a, b)
    }

    fn select3<A, B, C>(
        a: A,
        b: B,
        c: C,
    ) -> impl Future<Output = Select3<A::Output, B::Output, C::Output>> + OptionalSend
    where
        A: Future + OptionalSend,
        B: Future + OptionalSend,
        C: Future + OptionalSend,
    {
        TokioRuntime::select3(a, b, c)
    }

    fn select4<A, B, C, D>(
        a: A,
        b: B,
        c: C,
        d: D,
    ) -> impl Future<Output = Select4<A::Output, B::Output, C::Output, D::Output>> + OptionalSend
    where
        A: Future + OptionalSend,
        B: Future + OptionalSend,
        C: Future + OptionalSend,
        D: Future + OptionalSend,
    {
        TokioRuntime::select4(a, b, c, d)
    }

    #[inline]
    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        let seeded = SEED.with(|s| {
            let seed = s.get()?;
            s.set(Some(next_seed(seed)));
            Some(seed)
        });
        SmallRng::seed_from_u64(seeded.unwrap_or_else(|| rand_openraft::rng().next_u64()))
    }

    type Mpsc = <TokioRuntime as AsyncRuntime>::Mpsc;
    // Not tokio's watch: its waiters wake in a random order (`watch.rs`).
    type Watch = watch::OrderedWatch;
    type Oneshot = <TokioRuntime as AsyncRuntime>::Oneshot;
    type Mutex<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::Mutex<T>;

    fn new(threads: usize) -> Self {
        ChatRuntime {
            inner: TokioRuntime::new(threads),
        }
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.inner.block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use rand_openraft::RngExt;

    use super::*;

    fn draws() -> Vec<u64> {
        (0..8)
            .map(|_| ChatRuntime::thread_rng().random_range(400..800))
            .collect()
    }

    #[test]
    fn a_seeded_thread_draws_the_same_sequence_and_an_unseeded_one_does_not() {
        seed_this_thread(42);
        let a = draws();
        seed_this_thread(42);
        assert_eq!(a, draws(), "one seed, one sequence");
        seed_this_thread(43);
        assert_ne!(a, draws(), "another seed, another sequence");
        unseed_this_thread();
        let b = draws();
        assert_ne!(b, draws(), "unseeded draws come from the OS");
    }
}
