//! What the client commands print: JSON objects for scripts (`--json`), one line per
//! item for people. The JSON field names are the contract documented in each command's
//! `--help`; fields may be added, never renamed or removed.

use std::io::{self, Write};

use chatlog_wire::proto::v1::{self, event::Body};
use serde_json::{Value, json};

use super::Conn;

/// Prints results as JSON or for people, as `--json` says.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    json: bool,
}

impl Printer {
    pub fn new(conn: &Conn) -> Printer {
        Printer { json: conn.json }
    }

    /// Prints one command's result: `value` with `--json`, else what `human` returns.
    /// A closed stdout (`| head`) is not an error worth reporting.
    pub fn result(&self, value: &Value, human: impl FnOnce() -> String) {
        let text = if self.json {
            value.to_string()
        } else {
            human()
        };
        let _ = line(&text);
    }

    /// Prints one event (for `tail`): an error means stdout is closed.
    pub fn event(&self, e: &v1::Event) -> io::Result<()> {
        if self.json {
            line(&event_json(e).to_string())
        } else {
            line(&event_line(e))
        }
    }
}

/// Writes one line to stdout and flushes it, so that a reader of a pipe sees each line
/// as soon as it is printed.
fn line(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// A chat kind's name: `direct`, `group`, `channel`.
pub fn chat_kind_name(kind: i32) -> &'static str {
    match v1::ChatKind::try_from(kind) {
        Ok(v1::ChatKind::Direct) => "direct",
        Ok(v1::ChatKind::Group) => "group",
        Ok(v1::ChatKind::Channel) => "channel",
        _ => "unknown",
    }
}

/// A role's name: `member`, `admin`, `owner`.
pub fn role_name(role: i32) -> &'static str {
    match v1::MemberRole::try_from(role) {
        Ok(v1::MemberRole::Member) => "member",
        Ok(v1::MemberRole::Admin) => "admin",
        Ok(v1::MemberRole::Owner) => "owner",
        _ => "unknown",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One event as scripts see it: `chat_id`, `seq`, `kind` (`Event::kind_name`), `sender`,
/// `timestamp_ms`, then the fields of its body.
pub fn event_json(e: &v1::Event) -> Value {
    let mut v = json!({
        "chat_id": e.chat_id,
        "seq": e.seq,
        "kind": e.kind_name(),
        "sender": e.sender_id,
        "timestamp_ms": e.timestamp_ms,
    });
    let fields = match &e.body {
        Some(Body::ChatCreated(c)) => json!({
            "chat_kind": chat_kind_name(c.kind),
            "title": c.title,
            "members": c.member_ids,
        }),
        Some(Body::MessagePosted(m)) => {
            let mut f = json!({
                "text": m.text,
                "client_id": m.client_message_id,
                "erased": m.erased,
            });
            if m.reply_to_seq != 0 {
                f["reply_to"] = json!(m.reply_to_seq);
            }
            if let Some(media) = &m.media {
                f["media"] = json!({
                    "sha256": hex(&media.sha256),
                    "size_bytes": media.size_bytes,
                    "mime_type": media.mime_type,
                    "file_name": media.file_name,
                });
            }
            f
        }
        Some(Body::MessageEdited(m)) => json!({"target_seq": m.target_seq, "text": m.text}),
        Some(Body::MessageDeleted(m)) => json!({"target_seq": m.target_seq}),
        Some(Body::ReactionChanged(r)) => json!({
            "target_seq": r.target_seq,
            "reaction": r.reaction,
            "removed": r.change == i32::from(v1::ReactionChange::Remove),
        }),
        Some(Body::PinChanged(p)) => json!({
            "target_seq": p.target_seq,
            "pinned": p.change != i32::from(v1::PinChange::Unpin),
        }),
        Some(Body::MemberJoined(m)) => json!({"user_id": m.user_id, "role": role_name(m.role)}),
        Some(Body::MemberLeft(m)) => json!({"user_id": m.user_id}),
        Some(Body::MemberRemoved(m)) => json!({"user_id": m.user_id}),
        Some(Body::MemberBanned(m)) => json!({"user_id": m.user_id}),
        Some(Body::MemberUnbanned(m)) => json!({"user_id": m.user_id}),
        Some(Body::RoleChanged(m)) => json!({"user_id": m.user_id, "role": role_name(m.role)}),
        None => json!({}),
    };
    if let (Value::Object(into), Value::Object(from)) = (&mut v, fields) {
        into.extend(from);
    }
    v
}

/// One event for people: `#12 65537 12:01:03: hello` (time of day in UTC).
pub fn event_line(e: &v1::Event) -> String {
    let what = match &e.body {
        Some(Body::ChatCreated(c)) => {
            let members: Vec<String> = c.member_ids.iter().map(u64::to_string).collect();
            if c.title.is_empty() {
                format!(
                    "created a {} chat with {}",
                    chat_kind_name(c.kind),
                    members.join(", ")
                )
            } else {
                format!(
                    "created {} {:?} with {}",
                    chat_kind_name(c.kind),
                    c.title,
                    members.join(", ")
                )
            }
        }
        Some(Body::MessagePosted(m)) => {
            let mut s = String::new();
            if m.reply_to_seq != 0 {
                s.push_str(&format!("(reply to #{}) ", m.reply_to_seq));
            }
            if m.erased {
                s.push_str("(deleted)");
            } else {
                s.push_str(&m.text);
                if let Some(media) = &m.media {
                    s.push_str(&format!(
                        " [file {:?}, {}, {} bytes]",
                        media.file_name, media.mime_type, media.size_bytes
                    ));
                }
            }
            s
        }
        Some(Body::MessageEdited(m)) => format!("(edited #{}) {}", m.target_seq, m.text),
        Some(Body::MessageDeleted(m)) => format!("(deleted #{})", m.target_seq),
        Some(Body::ReactionChanged(r)) => {
            if r.change == i32::from(v1::ReactionChange::Remove) {
                format!("(took back {} from #{})", r.reaction, r.target_seq)
            } else {
                format!("(reacted {} to #{})", r.reaction, r.target_seq)
            }
        }
        Some(Body::PinChanged(p)) => {
            if p.change == i32::from(v1::PinChange::Unpin) {
                format!("(unpinned #{})", p.target_seq)
            } else {
                format!("(pinned #{})", p.target_seq)
            }
        }
        Some(Body::MemberJoined(m)) => {
            if m.user_id == e.sender_id {
                format!("(joined as {})", role_name(m.role))
            } else {
                format!("(added {} as {})", m.user_id, role_name(m.role))
            }
        }
        Some(Body::MemberLeft(_)) => "(left)".to_owned(),
        Some(Body::MemberRemoved(m)) => format!("(removed {})", m.user_id),
        Some(Body::MemberBanned(m)) => format!("(banned {})", m.user_id),
        Some(Body::MemberUnbanned(m)) => format!("(unbanned {})", m.user_id),
        Some(Body::RoleChanged(m)) => format!("(made {} {})", m.user_id, role_name(m.role)),
        None => "(an event this version does not know)".to_owned(),
    };
    format!(
        "#{} {} {}: {what}",
        e.seq,
        e.sender_id,
        time_of_day(e.timestamp_ms)
    )
}

/// `HH:MM:SS` in UTC.
pub fn time_of_day(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn date_time(ms: u64) -> String {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = (ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {}", time_of_day(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(date_time(0), "1970-01-01 00:00:00");
        // 2024-02-29 12:01:03 UTC.
        assert_eq!(date_time(1_709_208_063_000), "2024-02-29 12:01:03");
    }

    #[test]
    fn a_message_event_has_the_documented_shape() {
        let e = v1::Event {
            chat_id: 7,
            seq: 12,
            sender_id: 65537,
            timestamp_ms: 1_709_208_063_000,
            body: Some(Body::MessagePosted(v1::MessagePosted {
                client_message_id: 9,
                text: "hello".into(),
                ..Default::default()
            })),
        };
        let v = event_json(&e);
        assert_eq!(v["seq"], 12);
        assert_eq!(v["kind"], "message");
        assert_eq!(v["sender"], 65537);
        assert_eq!(v["text"], "hello");
        assert_eq!(event_line(&e), "#12 65537 12:01:03: hello");
    }
}
