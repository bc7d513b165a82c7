//! A history of client operations against a cluster, and one checker per property the
//! cluster promises about it (issue 9).
//!
//! Clients record every operation they issued with its outcome; after the run the test
//! reads every chat from every replica. Each checker takes the whole [`History`] and
//! returns its violations, each a sentence with the detail needed to find it (empty
//! means the property held). Time is logical: [`History::tick`] hands out increasing
//! numbers, taken when an operation is invoked and when its outcome arrives, so "read
//! after an ack" means the read was invoked after the ack came back.
//!
//! The checkers are unit-tested against hand-made bad histories below: a checker that
//! cannot fail proves nothing.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a send ended, as far as the client knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: the event is in the chat's log at `seq`.
    Acked { seq: u64 },
    /// Refused with a definite error code before any attempt could have taken effect.
    Refused { code: String },
    /// Every attempt timed out, was cut off or was refused after an attempt whose fate
    /// is unknown: the event may or may not be in the log.
    Unknown,
}

/// One send as a client issued it (all attempts of it used the same client message id).
#[derive(Debug, Clone)]
pub struct Send {
    pub chat: u64,
    pub sender: u64,
    pub cmid: u64,
    pub text: String,
    pub outcome: Outcome,
    /// Logical time the send was invoked.
    pub invoked: u64,
    /// Logical time its outcome arrived.
    pub completed: u64,
}

/// One event of a chat's log as a node served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub sender: u64,
    /// `Some` for a posted message (its client message id), `None` for other events.
    pub cmid: Option<u64>,
    pub text: String,
}

/// One linearizable history read: what a node answered for a chat.
#[derive(Debug, Clone)]
pub struct Read {
    pub chat: u64,
    pub node: u64,
    /// Logical time the read was invoked.
    pub invoked: u64,
    /// The chat's head seq in the answer.
    pub head_seq: u64,
    /// The events of the page read.
    pub events: Vec<Event>,
}

/// Everything recorded in one run.
#[derive(Debug, Default)]
pub struct History {
    clock: AtomicU64,
    pub sends: Mutex<Vec<Send>>,
    pub reads: Mutex<Vec<Read>>,
    /// Final logs after healing: node → chat → events in the order served.
    pub logs: Mutex<BTreeMap<u64, BTreeMap<u64, Vec<Event>>>>,
}

impl History {
    /// The next logical time.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn record_send(&self, send: Send) {
        self.sends.lock().unwrap().push(send);
    }

    pub fn record_read(&self, read: Read) {
        self.reads.lock().unwrap().push(read);
    }

    pub fn record_log(&self, node: u64, chat: u64, events: Vec<Event>) {
        self.logs
            .lock()
            .unwrap()
            .entry(node)
            .or_default()
            .insert(chat, events);
    }
}

/// Every checker, with its property's name.
pub type Checker = fn(&History) -> Vec<String>;

pub const CHECKERS: [(&str, Checker); 6] = [
    (
        "every_acknowledged_send_is_present_once_at_its_seq",
        every_acknowledged_send_is_present_once_at_its_seq,
    ),
    ("seqs_are_dense", seqs_are_dense),
    ("no_event_nobody_sent", no_event_nobody_sent),
    (
        "retries_with_one_client_id_yield_one_event",
        retries_with_one_client_id_yield_one_event,
    ),
    ("replicas_hold_the_same_log", replicas_hold_the_same_log),
    ("reads_after_an_ack_see_it", reads_after_an_ack_see_it),
];

/// Runs every checker: (property, violations) for each.
pub fn check_all(history: &History) -> Vec<(&'static str, Vec<String>)> {
    CHECKERS
        .iter()
        .map(|(name, check)| (*name, check(history)))
        .collect()
}

fn acked(send: &Send) -> Option<u64> {
    match send.outcome {
        Outcome::Acked { seq } => Some(seq),
        _ => None,
    }
}

/// Every acknowledged send is in every replica's log of its chat, exactly once, at the
/// seq its acknowledgement named, with its sender, client message id and text.
pub fn every_acknowledged_send_is_present_once_at_its_seq(h: &History) -> Vec<String> {
    let sends = h.sends.lock().unwrap();
    let logs = h.logs.lock().unwrap();
    let mut out = Vec::new();
    for (node, chats) in logs.iter() {
        for send in sends.iter() {
            let Some(seq) = acked(send) else { continue };
            let Some(log) = chats.get(&send.chat) else {
                out.push(format!(
                    "node {node}: chat {} was not read, but {:?} was acknowledged at seq {seq}",
                    send.chat, send.text
                ));
                continue;
            };
            let copies: Vec<u64> = log
                .iter()
                .filter(|e| e.cmid.is_some() && e.text == send.text)
                .map(|e| e.seq)
                .collect();
            let at = log.iter().find(|e| e.seq == seq);
            let right = at.is_some_and(|e| {
                e.sender == send.sender && e.cmid == Some(send.cmid) && e.text == send.text
            });
            if !right {
                out.push(format!(
                    "node {node}: chat {} acknowledged {:?} (sender {}, cmid {}) at seq {seq}, \
                     but seq {seq} holds {at:?}; the text is at seqs {copies:?}",
                    send.chat, send.text, send.sender, send.cmid
                ));
            } else if copies.len() != 1 {
                out.push(format!(
                    "node {node}: chat {} holds {:?} (acknowledged at seq {seq}) at seqs {copies:?}",
                    send.chat, send.text
                ));
            }
        }
    }
    out
}

/// Per replica and chat, the events served are seqs 1, 2, 3, … with no gap or repeat.
pub fn seqs_are_dense(h: &History) -> Vec<String> {
    let logs = h.logs.lock().unwrap();
    let mut out = Vec::new();
    for (node, chats) in logs.iter() {
        for (chat, log) in chats {
            if let Some((i, e)) = log.iter().enumerate().find(|(i, e)| e.seq != *i as u64 + 1) {
                out.push(format!(
                    "node {node}: chat {chat}: position {} holds seq {} (expected {})",
                    i,
                    e.seq,
                    i + 1
                ));
            }
        }
    }
    out
}

/// Every message event in a replica's log was sent by some client (same chat, sender,
/// client message id and text), and none of them by a send that was refused.
pub fn no_event_nobody_sent(h: &History) -> Vec<String> {
    let sends = h.sends.lock().unwrap();
    let logs = h.logs.lock().unwrap();
    let mut by_key: HashMap<(u64, u64, u64), Vec<&Send>> = HashMap::new();
    for s in sends.iter() {
        by_key
            .entry((s.chat, s.sender, s.cmid))
            .or_default()
            .push(s);
    }
    let mut out = Vec::new();
    for (node, chats) in logs.iter() {
        for (chat, log) in chats {
            for e in log {
                let Some(cmid) = e.cmid else { continue };
                let candidates = by_key
                    .get(&(*chat, e.sender, cmid))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let matching: Vec<&&Send> =
                    candidates.iter().filter(|s| s.text == e.text).collect();
                if matching.is_empty() {
                    out.push(format!(
                        "node {node}: chat {chat} seq {} holds {:?} from sender {} cmid {cmid}, \
                         which no client sent",
                        e.seq, e.text, e.sender
                    ));
                } else if matching
                    .iter()
                    .all(|s| matches!(s.outcome, Outcome::Refused { .. }))
                {
                    out.push(format!(
                        "node {node}: chat {chat} seq {} holds {:?}, whose send was refused ({:?})",
                        e.seq, e.text, matching[0].outcome
                    ));
                }
            }
        }
    }
    out
}

/// Sends that share (chat, sender, client message id) are one message: every
/// acknowledgement among them names the same seq, and each replica holds one event for
/// them at most.
pub fn retries_with_one_client_id_yield_one_event(h: &History) -> Vec<String> {
    let sends = h.sends.lock().unwrap();
    let logs = h.logs.lock().unwrap();
    let mut out = Vec::new();
    let mut seqs: BTreeMap<(u64, u64, u64), Vec<u64>> = BTreeMap::new();
    for s in sends.iter() {
        let entry = seqs.entry((s.chat, s.sender, s.cmid)).or_default();
        if let Some(seq) = acked(s) {
            entry.push(seq);
        }
    }
    for ((chat, sender, cmid), acks) in &seqs {
        if acks.windows(2).any(|w| w[0] != w[1]) {
            out.push(format!(
                "chat {chat} sender {sender} cmid {cmid} was acknowledged at different seqs {acks:?}"
            ));
        }
    }
    for (node, chats) in logs.iter() {
        for (chat, log) in chats {
            let mut count: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
            for e in log {
                if let Some(cmid) = e.cmid {
                    count.entry((e.sender, cmid)).or_default().push(e.seq);
                }
            }
            for ((sender, cmid), at) in count {
                if at.len() > 1 && seqs.contains_key(&(*chat, sender, cmid)) {
                    out.push(format!(
                        "node {node}: chat {chat} sender {sender} cmid {cmid} is in the log \
                         {} times, at seqs {at:?}",
                        at.len()
                    ));
                }
            }
        }
    }
    out
}

/// Every replica serves the same events for every chat.
pub fn replicas_hold_the_same_log(h: &History) -> Vec<String> {
    let logs = h.logs.lock().unwrap();
    let mut out = Vec::new();
    let Some((first_node, first)) = logs.iter().next() else {
        return vec!["no replica's log was read".into()];
    };
    for (node, chats) in logs.iter().skip(1) {
        let all_chats: std::collections::BTreeSet<&u64> =
            first.keys().chain(chats.keys()).collect();
        for chat in all_chats {
            let (a, b) = (first.get(chat), chats.get(chat));
            let (Some(a), Some(b)) = (a, b) else {
                out.push(format!(
                    "chat {chat} was read on node {} but not node {}",
                    if a.is_some() { first_node } else { node },
                    if a.is_some() { node } else { first_node },
                ));
                continue;
            };
            if a != b {
                let at = a
                    .iter()
                    .zip(b.iter())
                    .position(|(x, y)| x != y)
                    .unwrap_or(a.len().min(b.len()));
                out.push(format!(
                    "chat {chat}: node {first_node} ({} events) and node {node} ({} events) \
                     differ from position {at}: {:?} vs {:?}",
                    a.len(),
                    b.len(),
                    a.get(at),
                    b.get(at)
                ));
            }
        }
    }
    out
}

/// A read invoked after a send's acknowledgement arrived sees it: the chat's head is at
/// or past the acknowledged seq, and if the page holds that seq it holds that send.
/// Everything a read saw is also what the final log holds at that seq (a read never
/// shows an event that is later lost or replaced).
pub fn reads_after_an_ack_see_it(h: &History) -> Vec<String> {
    let sends = h.sends.lock().unwrap();
    let reads = h.reads.lock().unwrap();
    let logs = h.logs.lock().unwrap();
    let mut out = Vec::new();
    let mut acks_by_chat: HashMap<u64, Vec<&Send>> = HashMap::new();
    for s in sends.iter().filter(|s| acked(s).is_some()) {
        acks_by_chat.entry(s.chat).or_default().push(s);
    }
    for r in reads.iter() {
        for s in acks_by_chat
            .get(&r.chat)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let seq = acked(s).unwrap_or_default();
            if s.completed >= r.invoked {
                continue;
            }
            if r.head_seq < seq {
                out.push(format!(
                    "node {}: read of chat {} at t={} saw head {} but {:?} was acknowledged \
                     at seq {seq} at t={}",
                    r.node, r.chat, r.invoked, r.head_seq, s.text, s.completed
                ));
            } else if let Some(e) = r.events.iter().find(|e| e.seq == seq)
                && (e.text != s.text || e.cmid != Some(s.cmid))
            {
                out.push(format!(
                    "node {}: read of chat {} at t={} saw {e:?} at seq {seq}, acknowledged for {:?}",
                    r.node, r.chat, r.invoked, s.text
                ));
            }
        }
        for (node, chats) in logs.iter() {
            let Some(log) = chats.get(&r.chat) else {
                continue;
            };
            for e in &r.events {
                let fin = log.iter().find(|f| f.seq == e.seq);
                if fin != Some(e) {
                    out.push(format!(
                        "node {}: read of chat {} at t={} saw {e:?}; node {node} finally holds {fin:?}",
                        r.node, r.chat, r.invoked
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod checker_tests {
    use super::*;

    fn msg(seq: u64, sender: u64, cmid: u64, text: &str) -> Event {
        Event {
            seq,
            sender,
            cmid: Some(cmid),
            text: text.into(),
        }
    }

    fn created() -> Event {
        Event {
            seq: 1,
            sender: 7,
            cmid: None,
            text: String::new(),
        }
    }

    fn send(cmid: u64, text: &str, outcome: Outcome, invoked: u64, completed: u64) -> Send {
        Send {
            chat: 100,
            sender: 7,
            cmid,
            text: text.into(),
            outcome,
            invoked,
            completed,
        }
    }

    /// A good history: chat 100 created at seq 1, a and b acknowledged at 2 and 3, c's
    /// outcome unknown and c in the log, d refused and absent; two replicas agree; a read
    /// after a's ack sees it.
    fn good() -> History {
        let h = History::default();
        h.record_send(send(1, "a", Outcome::Acked { seq: 2 }, 1, 2));
        h.record_send(send(2, "b", Outcome::Acked { seq: 3 }, 3, 4));
        h.record_send(send(3, "c", Outcome::Unknown, 5, 6));
        h.record_send(send(4, "d", Outcome::Refused { code: "X".into() }, 7, 8));
        // A deliberate repeat of a's client message id, acknowledged at the same seq.
        h.record_send(send(1, "a", Outcome::Acked { seq: 2 }, 9, 10));
        let log = vec![
            created(),
            msg(2, 7, 1, "a"),
            msg(3, 7, 2, "b"),
            msg(4, 7, 3, "c"),
        ];
        h.record_log(1, 100, log.clone());
        h.record_log(2, 100, log);
        h.record_read(Read {
            chat: 100,
            node: 2,
            invoked: 3,
            head_seq: 2,
            events: vec![msg(2, 7, 1, "a")],
        });
        h
    }

    fn only(h: &History, name: &str) -> Vec<String> {
        let results = check_all(h);
        for (n, v) in &results {
            if *n != name {
                assert!(v.is_empty(), "{n} fails too: {v:?}");
            }
        }
        results
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap()
    }

    fn set_log(h: &History, node: u64, log: Vec<Event>) {
        h.record_log(node, 100, log);
    }

    #[test]
    fn a_good_history_passes_every_checker() {
        for (name, v) in check_all(&good()) {
            assert!(v.is_empty(), "{name}: {v:?}");
        }
    }

    #[test]
    fn a_lost_acknowledged_send_is_found() {
        let h = good();
        for node in [1, 2] {
            // b lost; c moves down to seq 3.
            set_log(
                &h,
                node,
                vec![created(), msg(2, 7, 1, "a"), msg(3, 7, 3, "c")],
            );
        }
        let v = every_acknowledged_send_is_present_once_at_its_seq(&h);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("\"b\""), "{v:?}");
    }

    #[test]
    fn a_send_at_the_wrong_seq_or_twice_is_found() {
        let h = good();
        let log = vec![
            created(),
            msg(2, 7, 2, "b"),
            msg(3, 7, 1, "a"),
            msg(4, 7, 3, "c"),
        ];
        set_log(&h, 1, log.clone());
        set_log(&h, 2, log);
        assert!(!every_acknowledged_send_is_present_once_at_its_seq(&h).is_empty());
        let h = good();
        let log = vec![
            created(),
            msg(2, 7, 1, "a"),
            msg(3, 7, 2, "b"),
            msg(4, 7, 3, "c"),
            msg(5, 7, 9, "a"),
        ];
        set_log(&h, 1, log.clone());
        set_log(&h, 2, log);
        let v = every_acknowledged_send_is_present_once_at_its_seq(&h);
        assert!(v.iter().any(|v| v.contains("at seqs [2, 5]")), "{v:?}");
    }

    #[test]
    fn a_gap_or_repeat_is_found() {
        let h = good();
        let log = vec![
            created(),
            msg(2, 7, 1, "a"),
            msg(3, 7, 2, "b"),
            msg(5, 7, 3, "c"),
        ];
        set_log(&h, 1, log.clone());
        set_log(&h, 2, log);
        assert_eq!(only(&h, "seqs_are_dense").len(), 2);
        let h = good();
        let log = vec![
            created(),
            msg(2, 7, 1, "a"),
            msg(3, 7, 2, "b"),
            msg(3, 7, 3, "c"),
        ];
        set_log(&h, 1, log);
        assert_eq!(seqs_are_dense(&h).len(), 1);
    }

    #[test]
    fn an_event_nobody_sent_is_found() {
        let h = good();
        let log = vec![
            created(),
            msg(2, 7, 1, "a"),
            msg(3, 7, 2, "b"),
            msg(4, 7, 3, "c"),
            msg(5, 8, 3, "c"),
        ];
        set_log(&h, 1, log.clone());
        set_log(&h, 2, log);
        let v = only(&h, "no_event_nobody_sent");
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("no client sent"), "{v:?}");
    }

    #[test]
    fn a_refused_send_in_the_log_is_found() {
        let h = good();
        let log = vec![
            created(),
            msg(2, 7, 1, "a"),
            msg(3, 7, 2, "b"),
            msg(4, 7, 3, "c"),
            msg(5, 7, 4, "d"),
        ];
        set_log(&h, 1, log.clone());
        set_log(&h, 2, log);
        let v = only(&h, "no_event_nobody_sent");
        assert!(v[0].contains("refused"), "{v:?}");
    }

    #[test]
    fn a_retry_that_made_two_events_or_two_seqs_is_found() {
        let h = good();
        // c (unknown outcome) retried twice into the log: no other checker minds.
        let log = vec![
            created(),
            msg(2, 7, 1, "a"),
            msg(3, 7, 2, "b"),
            msg(4, 7, 3, "c"),
            msg(5, 7, 3, "c"),
        ];
        set_log(&h, 1, log.clone());
        set_log(&h, 2, log);
        let v = only(&h, "retries_with_one_client_id_yield_one_event");
        assert_eq!(v.len(), 2, "{v:?}");
        let h = good();
        h.record_send(send(2, "b", Outcome::Acked { seq: 4 }, 11, 12));
        let v = retries_with_one_client_id_yield_one_event(&h);
        assert!(v[0].contains("different seqs [3, 4]"), "{v:?}");
    }

    #[test]
    fn diverging_replicas_are_found() {
        let h = good();
        // Node 2 lacks c, whose outcome is unknown: only the replicas checker can tell.
        set_log(&h, 2, vec![created(), msg(2, 7, 1, "a"), msg(3, 7, 2, "b")]);
        let v = only(&h, "replicas_hold_the_same_log");
        assert!(v[0].contains("position 3"), "{v:?}");
        let h = good();
        h.logs.lock().unwrap().get_mut(&2).unwrap().clear();
        assert!(!replicas_hold_the_same_log(&h).is_empty());
        assert!(!replicas_hold_the_same_log(&History::default()).is_empty());
    }

    #[test]
    fn a_stale_read_is_found() {
        let h = good();
        // Invoked after b's ack (t=4) but shows the head at 2.
        h.record_read(Read {
            chat: 100,
            node: 3,
            invoked: 5,
            head_seq: 2,
            events: vec![],
        });
        let v = only(&h, "reads_after_an_ack_see_it");
        assert_eq!(v.len(), 1, "{v:?}");
        // A read concurrent with the ack may miss it.
        let h = good();
        h.record_read(Read {
            chat: 100,
            node: 3,
            invoked: 4,
            head_seq: 2,
            events: vec![],
        });
        assert!(reads_after_an_ack_see_it(&h).is_empty());
    }

    #[test]
    fn a_read_of_something_later_lost_is_found() {
        let h = good();
        h.record_read(Read {
            chat: 100,
            node: 3,
            invoked: 7,
            head_seq: 5,
            events: vec![msg(5, 7, 4, "d")],
        });
        let v = only(&h, "reads_after_an_ack_see_it");
        assert_eq!(v.len(), 2, "one per final replica: {v:?}");
    }
}
