//! How the `Router` reports failures to openraft, over real sockets: a peer that cannot
//! be reached (no address, nothing listening, a handshake refused, an error frame) is
//! `Unreachable`, so openraft backs off; a peer that accepted the request but did not
//! answer within the deadline is `Timeout`; a snapshot transfer whose replication was
//! cancelled stops with `StreamingError::Closed` instead of running to its deadline;
//! forwarded client requests and bot calls leave most of a connection to Raft's own
//! messages.

use std::sync::Arc;
use std::time::Duration;

use chatlog_raft::chat::retention::RetentionPolicy;
use chatlog_raft::types::Vote;
use chatlog_raft::types::{Snapshot, SnapshotMeta};
use chatlog_raft::{ChatRaft, GroupDirectory, GroupId, NodeIdentity, Router, serve};
use chatlog_wire::frame::{read_message, write_message};
use chatlog_wire::limits::{NODE_FRAME_BYTES_MAX, NODE_PROTOCOL_VERSION};
use chatlog_wire::proto::node::v1::{NodeFrame, NodeHelloOk, node_frame::Payload};
use openraft::error::{RPCError, ReplicationClosed, StreamingError};
use openraft::network::RPCOption;
use openraft::raft::VoteRequest;
use openraft_multi::GroupRouter;
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};

const CLUSTER_ID: u64 = 41;
const WAIT: Duration = Duration::from_secs(10);

fn identity(node_id: u64) -> NodeIdentity {
    NodeIdentity::new(CLUSTER_ID, node_id)
}

fn vote_request() -> VoteRequest<chatlog_raft::TypeConfig> {
    VoteRequest::new(Vote::new(1, 1), None)
}

fn option() -> RPCOption {
    RPCOption::new(Duration::from_millis(200))
}

/// Holds no groups: every request is answered with UNKNOWN_GROUP.
struct NoGroups;

impl GroupDirectory for NoGroups {
    fn raft(&self, _group: GroupId) -> Option<ChatRaft> {
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_peers_are_reported_as_unreachable() {
    let router = Router::new(identity(1));

    // No address known.
    let err = router
        .vote(2, 1, vote_request(), option())
        .await
        .expect_err("no address");
    assert!(matches!(err, RPCError::Unreachable(_)), "{err}");

    // Nothing listening: the dial fails, and the next request fails at once (backoff).
    let free = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = free.local_addr().expect("addr");
    drop(free);
    router.set_peer_addr(2, addr);
    let err = router
        .vote(2, 1, vote_request(), option())
        .await
        .expect_err("refused");
    assert!(matches!(err, RPCError::Unreachable(_)), "{err}");
    let started = Instant::now();
    let err = router
        .vote(2, 1, vote_request(), option())
        .await
        .expect_err("backing off");
    assert!(matches!(err, RPCError::Unreachable(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "waited during backoff"
    );

    // A node of another cluster refuses the handshake.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let other_cluster = NodeIdentity::new(CLUSTER_ID + 1, 3);
    let (stop_other, stopped) = tokio::sync::oneshot::channel::<()>();
    let other = tokio::spawn(serve(listener, other_cluster, Arc::new(NoGroups), async {
        let _ = stopped.await;
    }));
    router.set_peer_addr(3, addr);
    let err = router
        .vote(3, 1, vote_request(), option())
        .await
        .expect_err("wrong cluster");
    assert!(matches!(err, RPCError::Unreachable(_)), "{err}");
    assert!(err.to_string().contains("WrongCluster"), "{err}");

    // A node of our cluster with another retention policy refuses the handshake too:
    // retention shapes the applied state, which every replica must share.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let retaining = NodeIdentity {
        retention: RetentionPolicy {
            retain_entries: Some(1_000),
            retain_bytes: None,
        },
        ..identity(5)
    };
    let (stop_retaining, stopped) = tokio::sync::oneshot::channel::<()>();
    let retaining_server = tokio::spawn(serve(listener, retaining, Arc::new(NoGroups), async {
        let _ = stopped.await;
    }));
    router.set_peer_addr(5, addr);
    let err = router
        .vote(5, 1, vote_request(), option())
        .await
        .expect_err("retention differs");
    assert!(matches!(err, RPCError::Unreachable(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("retention differs") && text.contains("entries=1000"),
        "{text}"
    );
    let _ = stop_retaining.send(());
    retaining_server.await.expect("server task");

    // A node of our cluster without the group answers UNKNOWN_GROUP.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_empty, stopped) = tokio::sync::oneshot::channel::<()>();
    let empty = tokio::spawn(serve(listener, identity(4), Arc::new(NoGroups), async {
        let _ = stopped.await;
    }));
    router.set_peer_addr(4, addr);
    let err = timeout(WAIT, router.vote(4, 9, vote_request(), option()))
        .await
        .expect("answered in time")
        .expect_err("unknown group");
    assert!(matches!(err, RPCError::Unreachable(_)), "{err}");
    assert!(err.to_string().contains("UnknownGroup"), "{err}");
    // The connection survives the error: a second request on it is answered the same way.
    let (frames_before, _) = router.connection_stats(4).expect("connected");
    let err = router
        .pre_vote(4, 9, vote_request(), option())
        .await
        .expect_err("unknown group");
    assert!(err.to_string().contains("UnknownGroup"), "{err}");
    let (frames_after, _) = router.connection_stats(4).expect("still connected");
    assert_eq!(
        frames_after,
        frames_before + 1,
        "the same connection carried it"
    );

    let _ = stop_other.send(());
    let _ = stop_empty.send(());
    other.await.expect("server task");
    empty.await.expect("server task");
}

/// A peer that completes the handshake and then never answers; ends when the router
/// closes the connection.
async fn spawn_silent_peer() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let hello: NodeFrame = read_message(&mut stream, NODE_FRAME_BYTES_MAX)
            .await
            .expect("read")
            .expect("hello");
        let ok = NodeFrame {
            cluster_id: CLUSTER_ID,
            from_node_id: 2,
            to_node_id: hello.from_node_id,
            group_id: 0,
            request_id: 0,
            payload: Some(Payload::HelloOk(NodeHelloOk {
                protocol_version: NODE_PROTOCOL_VERSION,
                software_version: String::new(),
            })),
        };
        write_message(&mut stream, &ok, NODE_FRAME_BYTES_MAX)
            .await
            .expect("write");
        // Read (and ignore) requests until the router goes away.
        while let Ok(Some(_)) =
            read_message::<NodeFrame, _>(&mut stream, NODE_FRAME_BYTES_MAX).await
        {}
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_times_out() {
    let (addr, silent) = spawn_silent_peer().await;
    let router = Router::new(identity(1));
    router.set_peer_addr(2, addr);
    let started = Instant::now();
    let err = timeout(WAIT, router.vote(2, 1, vote_request(), option()))
        .await
        .expect("the deadline fires")
        .expect_err("no answer");
    assert!(matches!(err, RPCError::Timeout(_)), "{err}");
    // soft_ttl is 3/4 of the 200 ms hard TTL.
    assert!(
        started.elapsed() >= Duration::from_millis(140),
        "{:?}",
        started.elapsed()
    );
    router.shutdown();
    timeout(WAIT, silent)
        .await
        .expect("the silent peer sees the connection close")
        .expect("peer task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_transfer_stops_when_replication_is_cancelled() {
    let (addr, silent) = spawn_silent_peer().await;
    let router = Router::new(identity(1));
    router.set_peer_addr(2, addr);
    // A stored checkpoint to send (only `Begin` goes out: the peer never answers it).
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = Arc::new(
        chatlog_storage::Engine::open(chatlog_storage::Config::new(dir.path()))
            .expect("engine opens"),
    );
    let meta = SnapshotMeta {
        last_log_id: Some(chatlog_raft::types::log_id(1, 1, 5)),
        ..SnapshotMeta::default()
    };
    chatlog_raft::state_machine::write_incremental_checkpoint(
        &engine,
        1,
        &meta,
        &chatlog_raft::chat::GroupState::new(1),
    )
    .await
    .expect("a checkpoint");
    let checkpoint =
        chatlog_raft::checkpoint_chunks::CheckpointHandle::durable(engine, 1, Arc::default())
            .expect("reads")
            .expect("an incremental checkpoint");
    let snapshot = Snapshot {
        meta,
        snapshot: chatlog_raft::snapshot_stream::SnapshotData::Local(
            chatlog_raft::snapshot_stream::LocalSnapshot {
                checkpoint,
                log: None,
                upto: 5,
            },
        ),
    };
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ReplicationClosed::new("the test cancelled it")
    };
    // A deadline far beyond the cancel, so only the cancel can end the transfer early.
    let started = Instant::now();
    let err = timeout(
        WAIT,
        router.full_snapshot(
            2,
            1,
            Vote::new_committed(1, 1),
            snapshot,
            cancel,
            RPCOption::new(Duration::from_secs(8)),
        ),
    )
    .await
    .expect("cancelled in time")
    .expect_err("cancelled");
    assert!(matches!(err, StreamingError::Closed(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    router.shutdown();
    timeout(WAIT, silent)
        .await
        .expect("the silent peer sees the connection close")
        .expect("peer task");
}

/// Forwarded client requests and bot calls each have a pool of a connection's requests
/// in flight (`FORWARDED_IN_FLIGHT_MAX`, `BOT_CALLS_IN_FLIGHT_MAX`; the peer serves 4,096
/// at most, and Raft's own messages share the connection). Against a peer that does not
/// answer: with every bot slot held, the next bot call is refused at once as not sent
/// while a client request still goes out; with every client slot held too, the next
/// client request is refused the same way; a vote still goes out (and times out there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_leave_room_for_raft_on_a_connection() {
    use bytes::Bytes;
    use chatlog_raft::network::{BOT_CALLS_IN_FLIGHT_MAX, FORWARDED_IN_FLIGHT_MAX, ForwardError};

    let (addr, silent) = spawn_silent_peer().await;
    let router = Arc::new(Router::new(identity(1)));
    router.set_peer_addr(2, addr);
    // Holds `n` requests of one kind at the silent peer; returns once all were sent
    // (so each holds its slot) and the connection carried `sent_then` frames.
    let hold = |n: usize, bot: bool, sent_then: usize| {
        let router = Arc::clone(&router);
        async move {
            let held: Vec<_> = (0..n)
                .map(|_| {
                    let router = Arc::clone(&router);
                    tokio::spawn(async move {
                        let body = Bytes::from_static(b"held");
                        if bot {
                            router.bot_request(2, 1, body, WAIT * 3).await
                        } else {
                            router.client_request(2, 1, body, WAIT * 3).await
                        }
                    })
                })
                .collect();
            let deadline = Instant::now() + WAIT;
            while router.connection_stats(2).map(|(frames, _)| frames) < Some(sent_then as u64) {
                assert!(
                    Instant::now() < deadline,
                    "the held requests were never all sent"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                held.iter().all(|h| !h.is_finished()),
                "a held request ended"
            );
            held
        }
    };
    let extra = Bytes::from_static(b"extra");
    let short = Duration::from_millis(20);
    let mut held = hold(BOT_CALLS_IN_FLIGHT_MAX, true, BOT_CALLS_IN_FLIGHT_MAX).await;
    match router.bot_request(2, 1, extra.clone(), short).await {
        Err(ForwardError::NotSent(detail)) => assert!(
            detail.contains(&format!("{BOT_CALLS_IN_FLIGHT_MAX} forwarded bot calls")),
            "{detail}"
        ),
        other => panic!("one bot call too many: {other:?}"),
    }
    // Bots waiting take no client slot: a client request is sent (and times out).
    let sent = router.client_request(2, 1, extra.clone(), short).await;
    assert!(matches!(sent, Err(ForwardError::Unknown(_))), "{sent:?}");
    let sent_then = BOT_CALLS_IN_FLIGHT_MAX + 1 + FORWARDED_IN_FLIGHT_MAX;
    held.extend(hold(FORWARDED_IN_FLIGHT_MAX, false, sent_then).await);
    match router.client_request(2, 1, extra, short).await {
        Err(ForwardError::NotSent(detail)) => assert!(
            detail.contains(&format!(
                "{FORWARDED_IN_FLIGHT_MAX} forwarded client requests"
            )),
            "{detail}"
        ),
        other => panic!("one client request too many: {other:?}"),
    }
    // Raft's messages still go out on that connection: the vote reaches the silent peer
    // and times out there instead of being refused here.
    let err = timeout(WAIT, router.vote(2, 1, vote_request(), option()))
        .await
        .expect("the deadline fires")
        .expect_err("no answer");
    assert!(matches!(err, RPCError::Timeout(_)), "{err}");
    for h in held {
        h.abort();
    }
    router.shutdown();
    timeout(WAIT, silent)
        .await
        .expect("the silent peer sees the connection close")
        .expect("peer task");
}
