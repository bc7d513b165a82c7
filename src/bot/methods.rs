//! The bot API's methods other than `getUpdates` (`updates.rs`): parameters in, chat
//! commands proposed as the bot, Telegram-shaped JSON out.
//!
//! What it owns: reading and checking each method's parameters against the protocol's
//! limits. What it must not do: check permissions itself; the state machine refuses a
//! bot exactly as it refuses a user (`403` for a chat the bot is not a member of).

use chatlog_raft::chat::bot::{BotCommand, WEBHOOK_SECRET_BYTES_MAX, WEBHOOK_URL_BYTES_MAX};
use chatlog_raft::chat::{Command, MediaRef, Outcome, UserId};
use chatlog_wire::limits::TEXT_BYTES_MAX;
use serde_json::{Value, json};

use super::{BotApi, BotError, IDEMPOTENCY_KEY_BYTES_MAX, Params, updates};

/// A parameter as a non-negative integer (a JSON number or a decimal string).
pub(crate) fn u64_param(p: &Params, name: &str) -> Result<Option<u64>, BotError> {
    match p.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| BotError::bad(format!("{name} must be a non-negative integer"))),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| BotError::bad(format!("{name} must be a non-negative integer"))),
        Some(_) => Err(BotError::bad(format!(
            "{name} must be a non-negative integer"
        ))),
    }
}

/// A required integer parameter.
pub(crate) fn required_u64(p: &Params, name: &str) -> Result<u64, BotError> {
    u64_param(p, name)?.ok_or_else(|| BotError::bad(format!("{name} is missing")))
}

/// A parameter as text (a JSON string, or a number's digits).
pub(crate) fn str_param(p: &Params, name: &str) -> Result<Option<String>, BotError> {
    match p.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(BotError::bad(format!("{name} must be a string"))),
    }
}

fn text_param(p: &Params, name: &str, required: bool) -> Result<String, BotError> {
    let text = str_param(p, name)?.unwrap_or_default();
    if text.len() > TEXT_BYTES_MAX as usize {
        return Err(BotError::bad(format!(
            "{name} is {} bytes, over the limit of {TEXT_BYTES_MAX}",
            text.len()
        )));
    }
    if required && text.is_empty() {
        return Err(BotError::bad(format!("{name} is empty")));
    }
    Ok(text)
}

/// The client message id of a send: `client_message_id`, or a hash of
/// `idempotency_key` / the `Idempotency-Key` header, so that a retried call posts once;
/// a random one without either.
fn client_message_id(p: &Params, header: Option<&str>) -> Result<u64, BotError> {
    if let Some(id) = u64_param(p, "client_message_id")? {
        if id == 0 {
            return Err(BotError::bad("client_message_id must not be 0"));
        }
        return Ok(id);
    }
    let key = str_param(p, "idempotency_key")?.or_else(|| header.map(str::to_owned));
    match key.filter(|k| !k.is_empty()) {
        Some(k) if k.len() > IDEMPOTENCY_KEY_BYTES_MAX => Err(BotError::bad(format!(
            "idempotency key is {} bytes, over the limit of {IDEMPOTENCY_KEY_BYTES_MAX}",
            k.len()
        ))),
        Some(k) => {
            use sha2::Digest;
            let h = sha2::Sha256::digest(k.as_bytes());
            let id = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
            Ok(id.max(1))
        }
        None => Ok(rand::random::<u64>().max(1)),
    }
}

fn chat_json(chat: u64) -> Value {
    json!({"id": chat})
}

/// A message as Telegram shapes it (`message_id` is the message's seq).
pub(crate) fn message_json(
    chat: u64,
    seq: u64,
    sender: UserId,
    timestamp_ms: u64,
    text: &str,
) -> Value {
    json!({
        "message_id": seq,
        "chat": chat_json(chat),
        "from": {"id": sender, "is_bot": true},
        "date": timestamp_ms / 1000,
        "timestamp_ms": timestamp_ms,
        "text": text,
    })
}

pub(crate) fn get_me(api: &BotApi, bot: UserId) -> Result<Value, BotError> {
    let g = api.group(bot, "bot")?;
    let st = g.shared().read();
    let user = st
        .user(bot)
        .ok_or_else(|| BotError::new(401, "invalid bot token"))?;
    let owner = st.bots().get(bot).map(|b| b.owner()).unwrap_or(0);
    Ok(json!({
        "id": bot,
        "is_bot": true,
        "username": user.name,
        "first_name": user.name,
        "owner_id": owner,
    }))
}

async fn post(
    api: &BotApi,
    bot: UserId,
    p: &Params,
    header: Option<&str>,
    text: String,
    media: Option<MediaRef>,
) -> Result<Value, BotError> {
    let chat = required_u64(p, "chat_id")?;
    let reply_to = u64_param(p, "reply_to_message_id")?.unwrap_or(0);
    let client_message_id = client_message_id(p, header)?;
    // Writes are forwarded to the chat's leader: no local replica needed.
    api.check_id(chat, "chat")?;
    api.take_send(bot)?;
    let media_json = media.as_ref().map(|m| {
        json!({"sha256": m.sha256.iter().map(|b| format!("{b:02x}")).collect::<String>(),
               "size_bytes": m.size_bytes, "mime_type": m.mime_type, "file_name": m.file_name})
    });
    let o = api
        .propose(
            chat,
            Command::Post {
                chat,
                sender: bot,
                client_message_id,
                text: text.clone(),
                media,
                reply_to,
            },
        )
        .await?;
    let Outcome::Event {
        chat,
        seq,
        timestamp_ms,
        deduplicated,
    } = o
    else {
        return Err(BotError::new(500, format!("unexpected outcome {o:?}")));
    };
    let mut v = message_json(chat, seq, bot, timestamp_ms, &text);
    v["client_message_id"] = json!(client_message_id);
    v["deduplicated"] = json!(deduplicated);
    if reply_to != 0 {
        v["reply_to_message_id"] = json!(reply_to);
    }
    if let Some(m) = media_json {
        v["media"] = m;
    }
    Ok(v)
}

pub(crate) async fn send_message(
    api: &BotApi,
    bot: UserId,
    p: &Params,
    header: Option<&str>,
) -> Result<Value, BotError> {
    let text = text_param(p, "text", true)?;
    post(api, bot, p, header, text, None).await
}

pub(crate) async fn send_media(
    api: &BotApi,
    bot: UserId,
    p: &Params,
    header: Option<&str>,
) -> Result<Value, BotError> {
    let media_id = str_param(p, "media_id")?
        .filter(|m| !m.is_empty())
        .ok_or_else(|| BotError::bad("media_id is missing"))?;
    if media_id.len() != 64 || !media_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BotError::bad(
            "media_id must be the file's SHA-256 in 64 hex digits",
        ));
    }
    let caption = text_param(p, "caption", false)?;
    let media_id = media_id.to_ascii_lowercase();
    let media = api.media.resolve_media(bot, &media_id).await?;
    post(api, bot, p, header, caption, Some(media)).await
}

/// Answers an edit or delete (`EventAck`-like: the seq of the new event).
fn ack_json(o: Outcome, target: u64) -> Result<Value, BotError> {
    match o {
        Outcome::Event {
            chat,
            seq,
            timestamp_ms,
            ..
        } => Ok(
            json!({"chat": chat_json(chat), "message_id": target, "event_seq": seq,
                        "date": timestamp_ms / 1000, "timestamp_ms": timestamp_ms}),
        ),
        o => Err(BotError::new(500, format!("unexpected outcome {o:?}"))),
    }
}

pub(crate) async fn edit_message(api: &BotApi, bot: UserId, p: &Params) -> Result<Value, BotError> {
    let chat = required_u64(p, "chat_id")?;
    let target = required_u64(p, "message_id")?;
    let text = text_param(p, "text", true)?;
    // Writes are forwarded to the chat's leader: no local replica needed.
    api.check_id(chat, "chat")?;
    api.take_send(bot)?;
    let o = api
        .propose(
            chat,
            Command::Edit {
                chat,
                sender: bot,
                target,
                text: text.clone(),
            },
        )
        .await?;
    let mut v = ack_json(o, target)?;
    v["text"] = json!(text);
    Ok(v)
}

pub(crate) async fn delete_message(
    api: &BotApi,
    bot: UserId,
    p: &Params,
) -> Result<Value, BotError> {
    let chat = required_u64(p, "chat_id")?;
    let target = required_u64(p, "message_id")?;
    // Writes are forwarded to the chat's leader: no local replica needed.
    api.check_id(chat, "chat")?;
    api.take_send(bot)?;
    let o = api
        .propose(
            chat,
            Command::Delete {
                chat,
                sender: bot,
                target,
            },
        )
        .await?;
    ack_json(o, target)
}

/// Checks a webhook URL: `http://HOST:PORT/PATH` (no TLS client in the server).
pub(crate) fn check_webhook_url(url: &str) -> Result<(), BotError> {
    if url.len() > WEBHOOK_URL_BYTES_MAX {
        return Err(BotError::bad(format!(
            "url is over {WEBHOOK_URL_BYTES_MAX} bytes"
        )));
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(BotError::bad(
            "only http:// webhook URLs are supported (the server has no TLS client; put a \
             TLS-terminating proxy in front of an https receiver)",
        ));
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains('@') || host.chars().any(char::is_whitespace) {
        return Err(BotError::bad(format!("url {url:?} names no host")));
    }
    Ok(())
}

pub(crate) async fn set_webhook(api: &BotApi, bot: UserId, p: &Params) -> Result<Value, BotError> {
    let url = str_param(p, "url")?.unwrap_or_default();
    if !url.is_empty() {
        check_webhook_url(&url)?;
    }
    let secret_token = str_param(p, "secret_token")?.unwrap_or_default();
    if secret_token.len() > WEBHOOK_SECRET_BYTES_MAX
        || !secret_token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(BotError::bad(format!(
            "secret_token must be at most {WEBHOOK_SECRET_BYTES_MAX} characters of A-Z, a-z, \
             0-9, _ and -"
        )));
    }
    api.propose(
        bot,
        Command::Bot(BotCommand::SetWebhook {
            bot,
            url,
            secret_token,
        }),
    )
    .await?;
    api.webhook_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&bot);
    Ok(json!(true))
}

pub(crate) async fn delete_webhook(
    api: &BotApi,
    bot: UserId,
    p: &Params,
) -> Result<Value, BotError> {
    let drop_pending = matches!(p.get("drop_pending_updates"), Some(Value::Bool(true)))
        || matches!(p.get("drop_pending_updates"), Some(Value::String(s)) if s == "true");
    api.propose(
        bot,
        Command::Bot(BotCommand::SetWebhook {
            bot,
            url: String::new(),
            secret_token: String::new(),
        }),
    )
    .await?;
    if drop_pending {
        let next = {
            let g = api.group(bot, "bot")?;
            let st = g.shared().read();
            st.bots().get(bot).map_or(0, |b| b.next_update_id())
        };
        api.propose(bot, Command::Bot(BotCommand::Confirm { bot, offset: next }))
            .await?;
    }
    Ok(json!(true))
}

pub(crate) async fn get_webhook_info(api: &BotApi, bot: UserId) -> Result<Value, BotError> {
    let (url, handed_out) = {
        let g = api.group(bot, "bot")?;
        let st = g.shared().read();
        let b = st
            .bots()
            .get(bot)
            .ok_or_else(|| BotError::new(401, "invalid bot token"))?;
        (
            b.webhook().map(|w| w.url.clone()).unwrap_or_default(),
            b.pending_updates(),
        )
    };
    let waiting = updates::not_handed_out(api, bot).await?;
    let mut v = json!({
        "url": url,
        "has_custom_certificate": false,
        "pending_update_count": handed_out + waiting,
    });
    if let Some(s) = api
        .webhook_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&bot)
    {
        if let Some(d) = s.last_error_date {
            v["last_error_date"] = json!(d);
        }
        if let Some(m) = &s.last_error_message {
            v["last_error_message"] = json!(m);
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_read_from_numbers_and_strings() {
        let p: Params = serde_json::from_str(r#"{"a": 5, "b": "7", "c": -1, "d": "x", "e": ""}"#)
            .expect("json");
        assert_eq!(u64_param(&p, "a").ok(), Some(Some(5)));
        assert_eq!(u64_param(&p, "b").ok(), Some(Some(7)));
        assert!(u64_param(&p, "c").is_err());
        assert!(u64_param(&p, "d").is_err());
        assert_eq!(u64_param(&p, "e").ok(), Some(None));
        assert!(required_u64(&p, "zz").is_err());
    }

    #[test]
    fn idempotency_keys_map_to_stable_ids() {
        let p: Params = serde_json::from_str(r#"{"idempotency_key": "k1"}"#).expect("json");
        let a = client_message_id(&p, None).expect("id");
        assert_eq!(a, client_message_id(&p, None).expect("id"));
        let empty = Params::new();
        assert_eq!(client_message_id(&empty, Some("k1")).expect("id"), a);
        assert_ne!(client_message_id(&empty, Some("k2")).expect("id"), a);
    }

    #[test]
    fn webhook_urls_are_http_only() {
        assert!(check_webhook_url("http://127.0.0.1:8080/hook").is_ok());
        assert!(check_webhook_url("https://example.com/hook").is_err());
        assert!(check_webhook_url("http:///x").is_err());
        assert!(check_webhook_url("ftp://x").is_err());
    }
}
