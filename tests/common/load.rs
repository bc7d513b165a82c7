//! Steady write load for cluster tests: when each acknowledgement arrived (the gaps are
//! a step's unavailability window), and the protocol events the history checkers read.
//!
//! Included with `#[path = "common/load.rs"] mod load;` next to `mod history;`.
#![allow(dead_code)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chatlog_wire::proto::v1::{self, event::Body};

use crate::history;

/// The protocol events of a chat as the history checkers see them.
pub fn to_history_events(events: &[v1::Event]) -> Vec<history::Event> {
    events
        .iter()
        .map(|e| {
            let (cmid, text) = match &e.body {
                Some(Body::MessagePosted(m)) => (Some(m.client_message_id), m.text.clone()),
                _ => (None, String::new()),
            };
            history::Event {
                seq: e.seq,
                sender: e.sender_id,
                cmid,
                text,
            }
        })
        .collect()
}

/// Acknowledged writes with the time each ack arrived.
#[derive(Default)]
pub struct Acks {
    /// When each acknowledgement arrived.
    pub times: Mutex<Vec<Instant>>,
}

impl Acks {
    /// The longest gap between acknowledged writes in `[from, to]` (edges included).
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut times: Vec<Instant> = self
            .times
            .lock()
            .expect("lock")
            .iter()
            .copied()
            .filter(|t| *t >= from && *t <= to)
            .collect();
        times.sort();
        let mut edges = vec![from];
        edges.extend(times);
        edges.push(to);
        edges
            .windows(2)
            .map(|w| w[1].duration_since(w[0]))
            .max()
            .unwrap_or_default()
    }

    /// Acknowledgements so far.
    pub fn count(&self) -> usize {
        self.times.lock().expect("lock").len()
    }
}
