//! `chatlog tail`: follow a chat live.
//!
//! A subscription lives on one connection, so this keeps `next`, the first seq not yet
//! printed, and whenever the subscription is lost (the connection dropped, the push queue
//! overflowed, the server ended it for a reason a retry fixes) subscribes again from
//! `next`. Events below `next` are skipped and a jump past it resubscribes, so what is
//! printed is dense and printed once whatever happens underneath.

use std::time::{Duration, Instant};

use chatlog_wire::client::{Client, ClientError, PushItem};
use chatlog_wire::proto::v1::{self, push};

use super::output::Printer;
use super::{CmdError, CmdResult, TAIL_PING_INTERVAL, TailArgs, connect};

/// How long `tail` keeps trying to subscribe again after losing its subscription before
/// it gives up (the server restarting, a leader election).
const RESUBSCRIBE_FOR: Duration = Duration::from_secs(60);
/// The longest wait between two attempts to subscribe again.
const RESUBSCRIBE_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why the event loop of one subscription stopped.
enum Stop {
    /// Done: Ctrl-C, `--limit` reached, or stdout closed.
    Done,
    /// The subscription is gone; subscribe again from `next`.
    Resubscribe,
}

pub async fn run(a: TailArgs) -> CmdResult {
    let client = connect(&a.conn, true).await?;
    let mut pushes = client
        .pushes()
        .expect("a new client's push receiver is not taken yet");
    let printer = Printer::new(&a.conn);
    if a.limit == Some(0) {
        return Ok(());
    }
    let mut printed = 0u64;
    // The first seq not printed yet; unknown until the first subscription names the head
    // when no --from was given.
    let mut next: Option<u64> = a.from;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ping = tokio::time::interval(TAIL_PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut first = true;
    // The seq at which a subscription last jumped ahead, if any.
    let mut gap_at: Option<u64> = None;

    loop {
        let subscribed = tokio::select! {
            r = subscribe(&client, a.chat, next, !first) => r?,
            _ = &mut ctrl_c => return Ok(()),
        };
        let (sub_id, response) = subscribed;
        first = false;
        let mut want = next.unwrap_or(response.head_seq + 1);
        next = Some(want);

        let stop = loop {
            let item = tokio::select! {
                _ = &mut ctrl_c => break Stop::Done,
                _ = ping.tick() => {
                    // Keeps the connection from the server's idle timeout while only
                    // pushes flow; its outcome does not matter.
                    let c = client.clone();
                    tokio::spawn(async move {
                        let _ = c.ping(v1::PingRequest { nonce: 0 }).await;
                    });
                    continue;
                }
                item = pushes.recv() => item,
            };
            match item {
                None => {
                    return Err(CmdError::new("DISCONNECTED", "the client stopped"));
                }
                Some(PushItem::Push {
                    request_id,
                    push: push::Kind::ChatEvents(events),
                }) if request_id == sub_id => {
                    let mut stop = None;
                    for e in events.events {
                        if e.seq < want {
                            continue;
                        }
                        if e.seq > want {
                            // Never expected within one subscription; resume from the
                            // gap rather than print past it. A server that skips the
                            // same seq again would make that a busy loop: stop instead.
                            if gap_at == Some(want) {
                                return Err(CmdError::new(
                                    "PROTOCOL",
                                    format!(
                                        "the server's subscription skipped seq {want} twice \
                                         (it sent seq {} next)",
                                        e.seq
                                    ),
                                ));
                            }
                            gap_at = Some(want);
                            stop = Some(Stop::Resubscribe);
                            break;
                        }
                        if printer.event(&e).is_err() {
                            stop = Some(Stop::Done);
                            break;
                        }
                        want += 1;
                        next = Some(want);
                        printed += 1;
                        if a.limit.is_some_and(|l| printed >= l) {
                            stop = Some(Stop::Done);
                            break;
                        }
                    }
                    if let Some(stop) = stop {
                        if matches!(stop, Stop::Resubscribe) {
                            unsubscribe(&client, sub_id).await;
                        }
                        break stop;
                    }
                }
                Some(PushItem::Push {
                    request_id,
                    push: push::Kind::SubscriptionEnded(ended),
                }) if request_id == sub_id => {
                    let reason = ended.reason.unwrap_or_default();
                    let code =
                        v1::ErrorCode::try_from(reason.code).unwrap_or(v1::ErrorCode::Internal);
                    match code {
                        v1::ErrorCode::RateLimited | v1::ErrorCode::Unavailable => {
                            break Stop::Resubscribe;
                        }
                        _ => {
                            return Err(ClientError::from_proto(reason).into());
                        }
                    }
                }
                // Pushes were dropped: the subscription's events have a hole. Start a
                // fresh subscription from the next seq (the old one's pushes are ignored,
                // their request id differs).
                Some(PushItem::Lagged { .. }) => {
                    unsubscribe(&client, sub_id).await;
                    break Stop::Resubscribe;
                }
                Some(PushItem::ConnectionLost) => break Stop::Resubscribe,
                // User events, disconnect notices (ConnectionLost follows), pushes of an
                // earlier subscription.
                Some(PushItem::Push { .. }) => {}
            }
        };
        match stop {
            Stop::Done => return Ok(()),
            Stop::Resubscribe => continue,
        }
    }
}

/// Ends a subscription that is no longer wanted; best effort.
async fn unsubscribe(client: &Client, subscription_id: u64) {
    let _ = client
        .unsubscribe(v1::UnsubscribeRequest { subscription_id })
        .await;
}

/// Subscribes from `next` (`None`: after the head). With `retry` (a subscription is being
/// resumed), retries what a retry may fix — a dropped connection, no leader, rate limits
/// — for up to [`RESUBSCRIBE_FOR`]; the first subscription fails at once.
async fn subscribe(
    client: &Client,
    chat: u64,
    next: Option<u64>,
    retry: bool,
) -> CmdResult<(u64, v1::SubscribeResponse)> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let mut told = false;
    loop {
        let result = client
            .subscribe_with_id(v1::SubscribeRequest {
                chat_id: chat,
                from_seq: next.unwrap_or(0),
            })
            .await;
        let error = match result {
            Ok(ok) => {
                if told {
                    eprintln!("tail: following chat {chat} again");
                }
                return Ok(ok);
            }
            Err(e) => e,
        };
        let transient = match &error {
            ClientError::Disconnected | ClientError::Timeout | ClientError::Io(_) => true,
            ClientError::Server { code, .. } => {
                matches!(
                    code,
                    v1::ErrorCode::Unavailable
                        | v1::ErrorCode::RateLimited
                        | v1::ErrorCode::Timeout
                )
            }
            _ => false,
        };
        if !retry || !transient || started.elapsed() >= RESUBSCRIBE_FOR {
            return Err(error.into());
        }
        if !told {
            eprintln!("tail: lost chat {chat} ({error}); reconnecting");
            told = true;
        }
        let wait = match &error {
            ClientError::Server {
                retry_after: Some(after),
                ..
            } => *after,
            _ => backoff,
        };
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(RESUBSCRIBE_BACKOFF_MAX);
    }
}
