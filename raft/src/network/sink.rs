//! The coalescing writer of one node-to-node connection, used by both ends.
//!
//! What it owns: the write half of a socket and the bounded queue in front of it. A task
//! takes every frame queued (from any group, any request) and writes them with one
//! `write_all`, so many groups' small messages cost one system call and, with
//! `TCP_NODELAY`, share packets (the issue's "batching of messages from many groups into
//! one write"). What it must not do: build or interpret frames, or grow without bound: the
//! queue is limited in frames ([`SINK_QUEUE_LEN_MAX`]) and in bytes
//! ([`SINK_QUEUE_BYTES_MAX`]); a sender waits for room.
//!
//! The writer ends when every [`FrameSink`] handle is dropped (after writing what was
//! queued) or at the first write error; dropping the write half then shuts down the
//! sending side of the socket, which the peer reads as end of stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Frames queued for one connection before senders wait.
///
/// Why: openraft keeps one append in flight per group and follower, plus votes and
/// snapshot chunks, so a node with a few thousand groups queues about that many frames
/// at worst; beyond that waiting is the right backpressure.
pub const SINK_QUEUE_LEN_MAX: usize = 4096;

/// Bytes of frames queued for one connection before senders wait: 64 MiB.
///
/// Why: four of the largest frames (`NODE_FRAME_BYTES_MAX`, 16 MiB), enough to keep a
/// 10 Gbit/s link busy for ~50 ms while bounding what a slow peer can make us hold.
pub const SINK_QUEUE_BYTES_MAX: usize = 64 << 20;

/// Bytes gathered into one `write_all`: 256 KiB.
///
/// Why: large enough that thousands of heartbeats (~100 bytes each) go out in one call,
/// small enough that the copy into the batch buffer stays cheap. A larger frame is
/// written on its own, without copying.
pub const WRITE_BATCH_BYTES_MAX: usize = 256 << 10;

// A whole frame of the largest size must fit in the byte budget, or it could never be sent.
const _: () = assert!(
    SINK_QUEUE_BYTES_MAX
        >= chatlog_wire::limits::NODE_FRAME_BYTES_MAX as usize
            + chatlog_wire::limits::FRAME_PREFIX_BYTES
);
// Permits are counted in a u32.
const _: () = assert!(SINK_QUEUE_BYTES_MAX <= u32::MAX as usize);

/// One framed message (prefix included) and the queue bytes it holds until written.
type Queued = (Bytes, OwnedSemaphorePermit);

/// Counters of one writer, for tests and metrics.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Frames written.
    pub frames: AtomicU64,
    /// `write_all` calls made.
    pub writes: AtomicU64,
}

/// A handle that queues frames for a connection's writer task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FrameSink {
    queue: mpsc::Sender<Queued>,
    queue_bytes: Arc<Semaphore>,
    stats: Arc<SinkStats>,
}

/// The writer task is gone (the connection failed or closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection's writer has stopped")]
pub struct SinkClosed;

impl FrameSink {
    /// Spawns the writer task for `writer` and returns its handle.
    pub fn spawn(writer: OwnedWriteHalf) -> FrameSink {
        let (queue, rx) = mpsc::channel(SINK_QUEUE_LEN_MAX);
        let queue_bytes = Arc::new(Semaphore::new(SINK_QUEUE_BYTES_MAX));
        let stats = Arc::new(SinkStats::default());
        tokio::spawn(write_frames(
            writer,
            rx,
            Arc::clone(&queue_bytes),
            Arc::clone(&stats),
        ));
        FrameSink {
            queue,
            queue_bytes,
            stats,
        }
    }

    /// Queues one frame (prefix included), waiting for room. Cancel-safe: a frame is
    /// either queued whole or not at all.
    pub async fn send(&self, frame: Bytes) -> Result<(), SinkClosed> {
        let cost = u32::try_from(frame.len().clamp(1, SINK_QUEUE_BYTES_MAX))
            .expect("bounded by a u32 constant");
        let permit = Arc::clone(&self.queue_bytes)
            .acquire_many_owned(cost)
            .await
            .map_err(|_| SinkClosed)?;
        self.queue
            .send((frame, permit))
            .await
            .map_err(|_| SinkClosed)
    }

    /// Whether the writer has stopped; a later `send` would fail.
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// The writer's counters.
    pub fn stats(&self) -> &SinkStats {
        &self.stats
    }
}

async fn write_frames(
    mut writer: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Queued>,
    queue_bytes: Arc<Semaphore>,
    stats: Arc<SinkStats>,
) {
    let mut batch = BytesMut::new();
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => item,
                None => break,
            },
        };
        let result = if first.0.len() >= WRITE_BATCH_BYTES_MAX {
            // A big frame goes out as it is; coalescing would only copy it.
            stats.frames.fetch_add(1, Ordering::Relaxed);
            writer.write_all(&first.0).await
        } else {
            batch.clear();
            batch.extend_from_slice(&first.0);
            let mut held = vec![first];
            while let Ok(next) = rx.try_recv() {
                if batch.len() + next.0.len() > WRITE_BATCH_BYTES_MAX {
                    carried = Some(next);
                    break;
                }
                batch.extend_from_slice(&next.0);
                held.push(next);
            }
            stats.frames.fetch_add(held.len() as u64, Ordering::Relaxed);
            let result = writer.write_all(&batch).await;
            // The permits go back only once the bytes left the queue for the socket.
            drop(held);
            result
        };
        stats.writes.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = result {
            tracing::debug!(%error, "node connection: write failed; closing the writer");
            break;
        }
    }
    // Senders waiting for room, in either budget, see the queue closed.
    queue_bytes.close();
    rx.close();
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Frames queued while the writer is busy (here: not yet scheduled, on a
    /// current-thread runtime) go out together, in order.
    #[tokio::test(flavor = "current_thread")]
    async fn queued_frames_are_coalesced_into_few_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        let (_reader, writer) = client.into_split();
        let sink = FrameSink::spawn(writer);
        // Few enough sends that tokio's cooperative budget does not force a yield.
        let frames = 40u8;
        for i in 0..frames {
            sink.send(Bytes::from(vec![i; 10])).await.expect("queued");
        }
        let mut received = vec![0u8; usize::from(frames) * 10];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            server.read_exact(&mut received),
        )
        .await
        .expect("in time")
        .expect("read");
        let expected: Vec<u8> = (0..frames).flat_map(|i| [i; 10]).collect();
        assert_eq!(received, expected);
        let stats = sink.stats();
        assert_eq!(stats.frames.load(Ordering::Relaxed), u64::from(frames));
        let writes = stats.writes.load(Ordering::Relaxed);
        assert!(writes <= 2, "{frames} frames took {writes} writes");
    }

    /// After the peer goes away the writer stops and senders see it, instead of queueing
    /// forever.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_connection_closes_the_sink() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        drop(server);
        let (_reader, writer) = client.into_split();
        let sink = FrameSink::spawn(writer);
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                if sink.send(Bytes::from(vec![0u8; 64 << 10])).await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "sends kept succeeding on a dead connection");
        assert!(sink.is_closed());
    }
}
