//! Webhook delivery: POST each update as JSON to the bot's URL, in update id order,
//! confirming an update (the same durable cursor `getUpdates` uses) only after a 2xx.
//!
//! What it owns: the supervisor (one task per node) that keeps one delivery loop per bot
//! with a webhook whose group this node leads, so a cluster runs one loop per bot; the
//! loop with its bounded exponential backoff; the minimal HTTP/1.1 POST; and the error
//! state `getWebhookInfo` reports. What it must not do: confirm before a 2xx, send an
//! update before the previous one succeeded (this orders every chat, a stricter rule than
//! per-chat order), or hold a delivery in memory that is not committed as handed out.
//!
//! Delivery is at least once: a crash (or a leader change) between a 2xx and its
//! confirmation sends that update again with the same `update_id`; receivers de-duplicate
//! by it. Only `http://` URLs: the server has no TLS client. The URL may name any host
//! and port the server can reach (loopback included): operators who run untrusted bots
//! should firewall the server's outgoing connections.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatlog_raft::chat::UserId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::updates::{self, Update};
use super::{BotApi, WebhookStatus};

/// Longest one delivery may take (connect, send, read the status line). Why: Telegram
/// gives a webhook about this long too; a receiver that takes longer should answer
/// first and work afterwards.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait after a failed delivery.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait between attempts (the backoff doubles up to it). Why: a receiver that
/// comes back is served within this; a dead one costs one attempt per this period.
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How often the supervisor looks for leadership changes when nothing is applied, and
/// the longest a delivery loop waits for news before checking it still should run.
pub const SUPERVISOR_TICK: Duration = Duration::from_secs(1);
/// Most bytes of a receiver's answer read to find its status line.
pub const RESPONSE_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Updates fetched per round of a delivery loop (delivered one by one).
pub const DELIVERY_BATCH_UPDATES_MAX: u64 = 100;
/// The header carrying the bot's `secret_token` (Telegram's is
/// `X-Telegram-Bot-Api-Secret-Token`).
pub const SECRET_HEADER: &str = "X-Chatlog-Bot-Api-Secret-Token";

/// Bots with a webhook whose group this node leads.
fn wanted(api: &BotApi) -> Vec<UserId> {
    let me = api.node().node_id();
    let mut out = Vec::new();
    for g in api.node().groups() {
        if g.leader() != Some(me) {
            continue;
        }
        let st = g.shared().read();
        out.extend(
            st.bots()
                .iter()
                .filter(|(_, b)| b.webhook().is_some())
                .map(|(id, _)| id),
        );
    }
    out
}

/// The bot's webhook `(url, secret)` if it has one and this node leads its group.
fn webhook_here(api: &BotApi, bot: UserId) -> Option<(String, String)> {
    let g = api.group(bot, "bot").ok()?;
    if g.leader() != Some(api.node().node_id()) {
        return None;
    }
    let st = g.shared().read();
    st.bots()
        .get(bot)?
        .webhook()
        .map(|w| (w.url.clone(), w.secret_token.clone()))
}

/// Starts the supervisor: keeps one delivery loop per bot that should have one here.
pub(crate) fn start_supervisor(api: Weak<BotApi>) {
    tokio::spawn(async move {
        let Some(mut applied) = api.upgrade().map(|a| a.applied()) else {
            return;
        };
        let mut loops: HashMap<UserId, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            {
                let Some(strong) = api.upgrade() else {
                    return;
                };
                loops.retain(|_, h| !h.is_finished());
                for bot in wanted(&strong) {
                    loops
                        .entry(bot)
                        .or_insert_with(|| tokio::spawn(delivery_loop(Weak::clone(&api), bot)));
                }
            }
            match tokio::time::timeout(SUPERVISOR_TICK, applied.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(_)) => tokio::time::sleep(SUPERVISOR_TICK).await,
            }
        }
    });
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn record_error(api: &BotApi, bot: UserId, message: String) {
    tracing::debug!(bot, %message, "webhook delivery failed");
    api.webhook_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            bot,
            WebhookStatus {
                last_error_date: Some(now_s()),
                last_error_message: Some(message),
            },
        );
}

/// Delivers one bot's updates while this node leads its group and it has a webhook.
async fn delivery_loop(api: Weak<BotApi>, bot: UserId) {
    let mut backoff = BACKOFF_INITIAL;
    loop {
        let batch = {
            let Some(strong) = api.upgrade() else {
                return;
            };
            if webhook_here(&strong, bot).is_none() {
                return;
            }
            let (batch, tick) = (DELIVERY_BATCH_UPDATES_MAX, SUPERVISOR_TICK);
            updates::next_updates(&strong, bot, 0, batch, tick, None).await
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(bot, error = %e.description, "webhook loop cannot read updates");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        for update in batch {
            loop {
                let Some(strong) = api.upgrade() else {
                    return;
                };
                let Some((url, secret)) = webhook_here(&strong, bot) else {
                    return;
                };
                drop(strong);
                match deliver(&url, &secret, &update).await {
                    Ok(()) => {
                        backoff = BACKOFF_INITIAL;
                        let Some(strong) = api.upgrade() else {
                            return;
                        };
                        if let Err(e) = updates::confirm(&strong, bot, update.update_id + 1).await {
                            // Not confirmed: it will be delivered again (at least once).
                            tracing::warn!(bot, error = %e.description, "confirming a delivered update failed");
                        }
                        break;
                    }
                    Err(message) => {
                        if let Some(strong) = api.upgrade() {
                            record_error(&strong, bot, message);
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
    }
}

/// Splits `http://host[:port][/path]` into a connect address and a request path.
fn target(url: &str) -> Result<(String, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let addr = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((addr, authority.to_string(), path.to_string()))
}

/// POSTs one update; `Ok` on a 2xx status.
async fn deliver(url: &str, secret: &str, update: &Update) -> Result<(), String> {
    let (addr, host, path) = target(url)?;
    let body = update.to_json().to_string();
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("Connection to {addr} failed: {e}"))?;
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: chatlog-bot-api/{}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        if !secret.is_empty() {
            head.push_str(&format!("{SECRET_HEADER}: {secret}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        stream
            .write_all(&out)
            .await
            .map_err(|e| format!("Sending to {addr} failed: {e}"))?;
        let mut got = Vec::with_capacity(256);
        let mut buf = [0u8; 1024];
        let line_end = loop {
            if let Some(i) = got.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if got.len() >= RESPONSE_HEAD_BYTES_MAX {
                return Err("Wrong response from the webhook: no status line".to_string());
            }
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("Reading the answer of {addr} failed: {e}"))?;
            if n == 0 {
                return Err("Wrong response from the webhook: connection closed".to_string());
            }
            got.extend_from_slice(&buf[..n]);
        };
        let line = String::from_utf8_lossy(&got[..line_end]).into_owned();
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("Wrong response from the webhook: {line:?}"))?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            let reason = line.splitn(3, ' ').nth(2).unwrap_or_default();
            Err(format!(
                "Wrong response from the webhook: {status} {reason}"
            ))
        }
    };
    match tokio::time::timeout(DELIVERY_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "Timeout: no answer from {addr} within {DELIVERY_TIMEOUT:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_address_and_path() {
        assert_eq!(
            target("http://127.0.0.1:9/a/b?c=1").expect("ok"),
            (
                "127.0.0.1:9".to_string(),
                "127.0.0.1:9".to_string(),
                "/a/b?c=1".to_string()
            )
        );
        assert_eq!(
            target("http://example.org").expect("ok").0,
            "example.org:80"
        );
        assert_eq!(target("http://[::1]:81/").expect("ok").0, "[::1]:81");
        assert!(target("https://x/").is_err());
    }

    #[test]
    fn delivery_limits_relate() {
        const _: () = assert!(BACKOFF_INITIAL.as_millis() < BACKOFF_MAX.as_millis());
    }
}
