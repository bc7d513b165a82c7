//! Proves that a bad length prefix is rejected before any buffer is allocated, and that a
//! frame announced at the limit costs memory only for the bytes that arrived, by counting
//! the test thread's allocations with a wrapping global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::task::{Context, Poll, Waker};

use chatlog_wire::Error;
use chatlog_wire::frame::{FrameDecoder, read_frame};
use chatlog_wire::limits::FRAME_BYTES_MAX;

/// The system allocator, counting the bytes each thread asks for.
struct CountingAllocator;

thread_local! {
    /// Bytes this thread has asked the allocator for. Per thread, because the test
    /// harness runs other tests on other threads at the same time.
    static ALLOCATED_BYTES: Cell<usize> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    // try_with: never panic inside the allocator, even during thread teardown.
    let _ = ALLOCATED_BYTES.try_with(|allocated| allocated.set(allocated.get() + bytes));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// counting touches only a thread-local `Cell` and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as for `alloc`; `ptr` and `layout` come from this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`; `ptr` and `layout` come from this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `action` and returns its result with the bytes this thread allocated meanwhile.
fn allocated_during<T>(action: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED_BYTES.with(Cell::get);
    let result = action();
    let after = ALLOCATED_BYTES.with(Cell::get);
    (result, after - before)
}

/// Polls `future` to completion with a waker that does nothing; the readers here are
/// byte slices, which are always ready.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
    }
}

/// A prefix one past the limit, then bytes the decoder must not look at.
fn oversize_stream() -> Vec<u8> {
    let mut stream = (FRAME_BYTES_MAX + 1).to_le_bytes().to_vec();
    stream.extend_from_slice(&[0; 64]);
    stream
}

/// The counting itself works: decoding a real frame is seen allocating its payload.
#[test]
fn counting_sees_a_payload_allocation() {
    let mut stream = 100u32.to_le_bytes().to_vec();
    stream.extend_from_slice(&[0; 100]);
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    let (result, allocated) = allocated_during(|| {
        let mut input = &stream[..];
        decoder
            .decode(&mut input)
            .map(|frame| frame.map(|payload| payload.len()))
    });
    assert!(matches!(result, Ok(Some(100))), "{result:?}");
    assert!(allocated >= 100, "allocated {allocated} bytes");
}

#[test]
fn decoder_rejects_oversize_prefix_without_allocating() {
    let stream = oversize_stream();
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    let (result, allocated) = allocated_during(|| {
        let mut input = &stream[..];
        decoder.decode(&mut input).map(|frame| frame.is_some())
    });
    assert!(
        matches!(result, Err(Error::FrameTooLarge { .. })),
        "{result:?}"
    );
    assert_eq!(allocated, 0);
}

#[test]
fn decoder_allocates_for_arrived_bytes_not_announced_ones() {
    let mut stream = FRAME_BYTES_MAX.to_le_bytes().to_vec();
    stream.extend_from_slice(&[0; 100]);
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    let (result, allocated) = allocated_during(|| {
        let mut input = &stream[..];
        decoder.decode(&mut input).map(|frame| frame.is_some())
    });
    assert!(matches!(result, Ok(false)), "{result:?}");
    assert!(
        allocated <= 100,
        "allocated {allocated} bytes for 100 arrived"
    );
}

#[test]
fn read_frame_rejects_oversize_prefix_without_allocating() {
    let stream = oversize_stream();
    let (result, allocated) = allocated_during(|| {
        let mut reader = &stream[..];
        block_on(read_frame(&mut reader, FRAME_BYTES_MAX)).map(|frame| frame.is_some())
    });
    assert!(
        matches!(result, Err(Error::FrameTooLarge { .. })),
        "{result:?}"
    );
    assert_eq!(allocated, 0);
}

#[test]
fn read_frame_allocates_a_chunk_not_the_announced_length() {
    let mut stream = FRAME_BYTES_MAX.to_le_bytes().to_vec();
    stream.extend_from_slice(&[0; 100]);
    let (result, allocated) = allocated_during(|| {
        let mut reader = &stream[..];
        block_on(read_frame(&mut reader, FRAME_BYTES_MAX)).map(|frame| frame.is_some())
    });
    assert!(
        matches!(result, Err(Error::TruncatedFrame { .. })),
        "{result:?}"
    );
    assert!(
        allocated <= 64 * 1024,
        "allocated {allocated} bytes for a stalled frame announcing {FRAME_BYTES_MAX}"
    );
}
