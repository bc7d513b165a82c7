//! A replica whose node lost its NEWEST records (issue 9, session 7): the newest segment
//! file cut short, missing or headerless (`chatlog_storage::Damage::tail_lost`). Nothing
//! after the loss says what it held — entries, a vote, markers of any group — so every
//! Raft replica on that node is "repairing, vote unknown" until it has asked every other
//! voter of its group what it may have lost.
//!
//! What it owns: deciding at open which replicas are vote-unknown ([`at_open`], and the
//! meta key [`META_VOTE_UNKNOWN`] that keeps it so across a crash), the probe
//! (`NodeFrame` `repair_probe_request` = 70 / `repair_probe_response` = 71: the answerer's
//! current vote and last log index, [`encode_probe_response`]), the decision from all
//! answers ([`decide`]) and the task that probes and, once decided, restarts the replica
//! with the decided vote saved and the leader's last index as its "synced" marker
//! ([`run`], `Node::restart_group_after`). What it must not do: let a vote-unknown
//! replica vote, campaign, serve reads or accept appends (the peer server and the node
//! ask [`crate::repair::RepairStatus::is_vote_unknown`]), or decide from fewer than all
//! the other voters' answers.
//!
//! Why it is safe. Let V be the highest vote the replica had persisted before the loss
//! (lost with it, possibly). (1) V is bounded by the peers: a vote it granted in term t
//! went to a candidate that had saved its own vote of term t first; a leader whose
//! appends it accepted in term t had saved its vote of term t; votes only grow. So the
//! highest term T* among ALL the other voters' current votes is >= V's term. A peer that
//! does not answer might be that candidate: the probe waits (the group then has no
//! healthy majority including this replica anyway; the others keep serving without it).
//! A peer that is itself vote-unknown answers nothing (it may have lost its own votes).
//! (2) The replica saves the COMMITTED vote of term T* (T*, L) — if no answer holds a
//! committed vote in term T* an election is in progress, and it probes again later. Votes
//! of terms below T* are then refused by openraft for good, so no stale leader (term < T*)
//! can count its acknowledgements (double fault (3) of `crate::repair` closed for this
//! case), and it grants no second vote in any term <= T*: any vote it lost was in a term
//! <= T*, and a committed vote refuses every candidate of its own term. If L is this node
//! itself (it led T* before the loss), it probes again once the others elected a leader
//! without it (it refuses votes meanwhile), since its own last index is what it lost.
//! (3) Its required index is L's last log index: L, leader of T*, holds every committed
//! entry (leader completeness); entries it lost beyond L's log were never committed. Being
//! durable through that index is not enough by itself: after the loss the log may hold
//! stale entries of an older term (ones L had overwritten in the lost tail) at indexes up
//! to and beyond it. So the repair ends once the log is durable through the required
//! index AND its last durable entry is of term >= T* ([`META_PROBE_TERM`]): such an entry
//! came from L (or a later leader, which holds what L committed), so by log matching the
//! whole prefix is that leader's log, which holds everything L had when probed. Rule (b)
//! of `crate::repair` (a durable entry of a term above T* from that term's leader) ends
//! it too. Until then it votes for no one and serves no reads. The vote-unknown state is written as [`META_VOTE_UNKNOWN`] before openraft
//! starts and removed in the same batch that saves the decided vote, so a crash in
//! between probes again.
//!
//! The idle-group case of `crate::repair` (a replica that voted for the CURRENT leader and
//! held entries of an older term beyond that leader's log stays repairing until the log
//! grows past its required index): a repair still going after [`LASTING_REPAIR`] is
//! probed the same way, and if the leader's last index is below the required index, the
//! required index comes down to it with the same "last durable entry of term >= T*" rule
//! (`RepairStatus::lower_required`; in memory only: after a restart the old rule applies
//! again). Safe by (1)-(3): the replica's vote is at most T* (every voter answered), and
//! every committed entry it may have lost is in L's log.
//!
//! What it does not cover: a loss that leaves the newest segment looking complete (a
//! bit flip in the last record with nothing written after it: double fault (1) of
//! `crate::repair`), a replica that knows no voters of its group (its whole log was in
//! the lost tail: it waits, move the replica), two vote-unknown replicas of one group
//! at once (each waits for the other: move one replica), and a crash in the moment
//! between the engine's open and the last local replica's [`META_VOTE_UNKNOWN`] write
//! (each replica writes its own as it starts; if the engine wrote anything after the cut
//! in between, the next open sees the cut segment as an older one followed by records,
//! not as a tail loss, and a replica not flagged yet starts without probing).

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use chatlog_storage::{Engine, LogId as EngineLogId, WriteBatch};

use crate::codec::{self, DecodeError, Reader};
use crate::node::Node;
use crate::repair::LogDamage;
use crate::types::{GroupId, LeaderId, NodeId, Vote};

/// Meta key of a group's Raft log: present (value `1`) while the replica is vote-unknown
/// and has not finished its probe; removed with the decided vote in one batch.
pub const META_VOTE_UNKNOWN: &[u8] = b"vote_unknown";

/// Meta key of a group's Raft log: the identity ([`tail_loss`]) of the engine's tail loss
/// whose probe this replica finished, so the replica restarted by the probe in the same
/// process (whose engine still reports that loss) is not vote-unknown again.
pub const META_PROBED: &[u8] = b"vote_probed";

/// Meta key of a group's Raft log: the term of the vote a finished probe saved (`u64`
/// little-endian). While it is there, the repair ends only once the log is durable
/// through the required index AND its last durable entry is of that term or later: an
/// entry the probed leader sent (entries of its term come only from it; later terms'
/// leaders hold what it committed), so by log matching the whole prefix is that leader's
/// log, which holds everything the leader had when probed — not a stale, never-committed
/// entry of an older term that happens to sit at a high enough index. Deleted by the
/// marker writer once that repair ended.
pub const META_PROBE_TERM: &[u8] = b"probe_term";

/// The probe term a finished probe left in `log` ([`META_PROBE_TERM`]), 0 if none.
pub fn probe_term(engine: &Engine, log: EngineLogId) -> u64 {
    engine
        .meta(log, META_PROBE_TERM)
        .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
        .map_or(0, u64::from_le_bytes)
}

/// Whether the entry at `index` of a log whose leader runs are `leaders` (`(first index,
/// leader id)`, as the log store keeps them; `index` at most its last) is of term `term`
/// or later.
pub fn holds_probed_entry(leaders: &[(u64, LeaderId)], index: u64, term: u64) -> bool {
    let k = leaders.partition_point(|(f, _)| *f <= index);
    k.checked_sub(1).is_some_and(|k| leaders[k].1.term >= term)
}

/// How often the probe task looks for vote-unknown replicas and probes again. Why: a
/// probe waits for every voter and for a committed vote; half a second is well below an
/// election timeout, so a repair starts soon after the group has a leader again, and a
/// probe round is one small frame per voter.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// How long a repair (not vote-unknown) lasts before the probe task asks every voter
/// whether the required index can come down to the leader's last index (the idle-group
/// case of `crate::repair`). Why: an ordinary repair ends within a few round trips of the
/// leader re-sending the range; one still going after this long is waiting for the log to
/// grow, and one probe round per lasting repair is cheap.
pub const LASTING_REPAIR: Duration = Duration::from_secs(5);

/// How long one probe of one peer may take. Why: the answer is read from the peer's
/// in-memory metrics; a peer that takes longer is overloaded or partitioned and is asked
/// again next round.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes of a probe answer: a vote (17), a flag and an index (8).
pub const PROBE_RESPONSE_BYTES: usize = codec::VOTE_BYTES + 1 + 8;

/// What a voter answers a probe: its current vote and the last index of its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeAnswer {
    /// The answerer's current vote (committed when it follows or is a leader of it).
    pub vote: Vote,
    /// The last index its log holds (durable or not), if any.
    pub last_index: Option<u64>,
}

/// What a vote-unknown replica saves once every voter answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeDecision {
    /// The committed vote of the highest term reported.
    pub vote: Vote,
    /// That vote's leader's last log index: the replica repairs through it.
    pub required_index: u64,
}

/// The identity of the engine's tail loss (`Damage::tail_lost`), if it reported one:
/// the damaged file and offset.
pub fn tail_loss(engine: &Engine) -> Option<String> {
    let d = engine.damage()?;
    d.tail_lost
        .then(|| format!("{} at offset {}", d.path.display(), d.offset))
}

/// Decides at open whether group `group`'s replica (Raft log `log`, holding through
/// `held`) is vote-unknown: its log says so ([`META_VOTE_UNKNOWN`], a probe a crash
/// interrupted) or the engine reports a tail loss this replica has not probed for yet.
/// Returns the damage to start repairing with and whether the flag must still be written.
pub fn at_open(
    engine: &Engine,
    group: GroupId,
    log: EngineLogId,
    held: u64,
) -> Option<(LogDamage, bool)> {
    let flagged = engine.meta(log, META_VOTE_UNKNOWN).is_some();
    let loss = tail_loss(engine)
        .filter(|id| engine.meta(log, META_PROBED).as_deref() != Some(id.as_bytes()));
    if !flagged && loss.is_none() {
        return None;
    }
    let cause = loss.unwrap_or_else(|| "a probe a restart interrupted".into());
    Some((
        LogDamage {
            group,
            held_index: held,
            required_index: held,
            detail: format!(
                "vote unknown: the node's newest records were lost ({cause}); probing every \
                 voter of the group before voting, reading or accepting appends"
            ),
        },
        !flagged,
    ))
}

/// Encodes a probe request (empty: the group is the frame's).
pub fn encode_probe_request() -> Bytes {
    Bytes::new()
}

/// Checks a probe request: it must be empty.
pub fn decode_probe_request(bytes: &[u8]) -> Result<(), DecodeError> {
    Reader::new("repair probe request", bytes).finish()
}

/// Encodes a probe answer: `Vote | has_last u8 (0/1) | last_index u64` (the index is 0
/// when `has_last` is 0).
pub fn encode_probe_response(answer: &ProbeAnswer) -> Bytes {
    let mut out = Vec::with_capacity(PROBE_RESPONSE_BYTES);
    codec::put_vote(&mut out, &answer.vote);
    out.push(u8::from(answer.last_index.is_some()));
    out.extend_from_slice(&answer.last_index.unwrap_or(0).to_le_bytes());
    Bytes::from(out)
}

/// Decodes an answer made by [`encode_probe_response`].
pub fn decode_probe_response(bytes: &[u8]) -> Result<ProbeAnswer, DecodeError> {
    let mut r = Reader::new("repair probe response", bytes);
    let vote = r.vote()?;
    let has_last = r.bool()?;
    let index = r.u64()?;
    r.finish()?;
    if !has_last && index != 0 {
        return Err(DecodeError::new(
            "repair probe response",
            "an index without its flag",
        ));
    }
    Ok(ProbeAnswer {
        vote,
        last_index: has_last.then_some(index),
    })
}

/// What this node answers a probe of `raft`'s group: its current vote and last index.
pub fn answer(raft: &crate::ChatRaft) -> ProbeAnswer {
    use openraft::async_runtime::WatchReceiver;
    let m = raft.metrics().borrow_watched().clone();
    ProbeAnswer {
        vote: m.vote,
        last_index: m.last_log_index,
    }
}

/// Decides from every other voter's answer (`answers`, by node) what node `me` saves as
/// its vote and must repair through, or why it must probe again (module docs).
pub fn decide(me: NodeId, answers: &[(NodeId, ProbeAnswer)]) -> Result<ProbeDecision, String> {
    let Some(top) = answers.iter().map(|(_, a)| a.vote.leader_id.term).max() else {
        return Err("no voter answered".into());
    };
    let Some(vote) = answers
        .iter()
        .map(|(_, a)| a.vote)
        .find(|v| v.committed && v.leader_id.term == top)
    else {
        return Err(format!(
            "no committed vote in the highest term reported ({top}): an election is in progress"
        ));
    };
    let leader = vote.leader_id.node_id;
    if leader == me {
        return Err(format!(
            "the highest committed vote (term {top}) names this node, which lost what it \
             held as leader: waiting for the others to elect a leader"
        ));
    }
    let required_index = answers
        .iter()
        .find(|(n, _)| *n == leader)
        .map(|(_, a)| a.last_index.unwrap_or(0))
        .unwrap_or_else(|| {
            // The leader is not a voter (a learner cannot lead): take every voter's.
            answers
                .iter()
                .filter_map(|(_, a)| a.last_index)
                .max()
                .unwrap_or(0)
        });
    Ok(ProbeDecision {
        vote: Vote {
            leader_id: LeaderId {
                term: top,
                node_id: leader,
            },
            committed: true,
        },
        required_index,
    })
}

/// The batch that ends group `group`'s vote-unknown state with `decision`: the vote saved
/// (never lowered: `None` if the stored vote is of a higher term, which the module docs
/// rule out, so the probe is tried again), the "synced" marker raised to the required
/// index (the restarted replica is then repairing through it), the flag removed and the
/// engine's tail loss marked as probed for.
pub fn finish_batch(
    engine: &Engine,
    group: GroupId,
    decision: &ProbeDecision,
) -> Option<WriteBatch> {
    let log = crate::ids::raft_log(group)?;
    let stored = engine
        .meta(log, crate::ids::META_VOTE)
        .and_then(|b| codec::decode_vote(&b).ok());
    if stored.is_some_and(|s| s.leader_id.term > decision.vote.leader_id.term) {
        return None;
    }
    let marker = engine
        .meta(log, crate::repair::META_SYNCED)
        .and_then(|b| crate::repair::decode_synced(&b))
        .unwrap_or(0);
    let mut batch = WriteBatch::new();
    batch.put_meta(
        log,
        crate::ids::META_VOTE,
        &codec::encode_vote(&decision.vote),
    );
    batch.put_meta(
        log,
        crate::repair::META_SYNCED,
        &crate::repair::encode_synced(marker.max(decision.required_index)),
    );
    batch.delete_meta(log, META_VOTE_UNKNOWN);
    batch.put_meta(
        log,
        META_PROBE_TERM,
        &decision.vote.leader_id.term.to_le_bytes(),
    );
    if let Some(id) = tail_loss(engine) {
        batch.put_meta(log, META_PROBED, id.as_bytes());
    }
    Some(batch)
}

/// Probes finished by this process (for the status page and tests).
static PROBES_FINISHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Vote-unknown replicas of this process that finished their probe and restarted
/// repairing.
pub fn probes_finished() -> u64 {
    PROBES_FINISHED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Starts the probe task for `node`'s vote-unknown replicas; it ends with the node.
pub fn spawn(node: &Arc<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(Arc::downgrade(node)))
}

/// Every [`PROBE_INTERVAL`], probes each vote-unknown replica's voters and finishes those
/// that can decide.
pub async fn run(node: Weak<Node>) {
    // Why each group waits, logged when it changes (not every round).
    let mut waiting: std::collections::HashMap<GroupId, String> = Default::default();
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let Some(n) = node.upgrade() else { return };
        let unknown: Vec<crate::node::Group> = n
            .groups()
            .into_iter()
            .filter(|g| g.repair_status().is_vote_unknown())
            .collect();
        // The idle-group case: a repair that lasts, maybe below a required index the
        // group's log may not reach for a long time.
        let lasting: Vec<crate::node::Group> = n
            .groups()
            .into_iter()
            .filter(|g| {
                let r = g.repair_status();
                r.is_repairing()
                    && !r.is_vote_unknown()
                    && r.repairing_for() >= LASTING_REPAIR
                    && r.probe_term() == 0
            })
            .collect();
        for g in lasting {
            if let Ok(decision) = probe(&n, &g).await
                && g.repair_status()
                    .lower_required(decision.required_index, decision.vote.leader_id.term)
            {
                g.log_reader().recheck_repair();
                tracing::warn!(
                    group = g.id(),
                    required_index = decision.required_index,
                    term = decision.vote.leader_id.term,
                    repaired = !g.repair_status().is_repairing(),
                    "lasting repair: a probe of every voter lowered the required index to the \
                     leader's last index"
                );
            }
        }
        for g in unknown {
            match probe(&n, &g).await {
                Ok(decision) => {
                    waiting.remove(&g.id());
                    finish(&n, g.id(), decision).await
                }
                Err(why) => {
                    if waiting.get(&g.id()) != Some(&why) {
                        tracing::warn!(group = g.id(), status = "vote unknown", "probe: {why}");
                        waiting.insert(g.id(), why);
                    }
                }
            }
        }
    }
}

/// Asks every other voter of `group` for its vote and last index and decides.
async fn probe(node: &Node, group: &crate::node::Group) -> Result<ProbeDecision, String> {
    let Some(router) = node.router() else {
        return Err("no router to peers".into());
    };
    probe_voters(node.node_id(), router, group.id(), group.raft()).await
}

/// Asks every voter of `group` but `me` (the voters `raft`, the local replica, knows) for
/// its vote and last index over `router`, and decides ([`decide`]); `Err` says why it
/// must probe again (a voter did not answer, no committed vote yet, ...).
pub async fn probe_voters(
    me: NodeId,
    router: &crate::network::Router,
    group: GroupId,
    raft: &crate::ChatRaft,
) -> Result<ProbeDecision, String> {
    use openraft::async_runtime::WatchReceiver;
    let voters: Vec<NodeId> = raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .voter_ids()
        .filter(|v| *v != me)
        .collect();
    if voters.is_empty() {
        return Err("the replica knows no other voter of its group".into());
    }
    let asks = voters.iter().map(|v| async move {
        let r = router.repair_probe(*v, group, PROBE_TIMEOUT).await;
        (*v, r)
    });
    let mut answers = Vec::new();
    for (v, r) in futures_util::future::join_all(asks).await {
        match r {
            Ok(a) => answers.push((v, a)),
            Err(e) => return Err(format!("voter {v} did not answer: {e}")),
        }
    }
    decide(me, &answers)
}

async fn finish(node: &Node, g: GroupId, decision: ProbeDecision) {
    let Some(batch) = finish_batch(node.engine(), g, &decision) else {
        tracing::warn!(
            group = g,
            ?decision,
            "probe: the stored vote is higher than any voter's"
        );
        return;
    };
    match node.restart_group_after(g, batch).await {
        Ok(()) => {
            PROBES_FINISHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                group = g,
                term = decision.vote.leader_id.term,
                leader = decision.vote.leader_id.node_id,
                required_index = decision.required_index,
                status = "repairing",
                "probe finished: every voter answered; the vote of the highest committed term \
                 is saved and the replica repairs through its leader's last index"
            );
        }
        Err(e) => {
            tracing::error!(group = g, error = %e, "probe finished but the replica could not restart")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(term: u64, node: NodeId, committed: bool) -> Vote {
        Vote {
            leader_id: LeaderId {
                term,
                node_id: node,
            },
            committed,
        }
    }

    fn ans(term: u64, node: NodeId, committed: bool, last: u64) -> ProbeAnswer {
        ProbeAnswer {
            vote: vote(term, node, committed),
            last_index: Some(last),
        }
    }

    #[test]
    fn answers_round_trip_and_damage_is_refused() {
        for a in [
            ans(7, 2, true, 99),
            ProbeAnswer {
                vote: vote(0, 0, false),
                last_index: None,
            },
        ] {
            let bytes = encode_probe_response(&a);
            assert_eq!(bytes.len(), PROBE_RESPONSE_BYTES);
            assert_eq!(decode_probe_response(&bytes), Ok(a));
            assert!(decode_probe_response(&bytes[..bytes.len() - 1]).is_err());
            let mut longer = bytes.to_vec();
            longer.push(0);
            assert!(decode_probe_response(&longer).is_err());
        }
        let mut flag = encode_probe_response(&ans(1, 2, true, 5)).to_vec();
        flag[codec::VOTE_BYTES] = 2;
        assert!(decode_probe_response(&flag).is_err());
        let mut no_flag = encode_probe_response(&ans(1, 2, true, 5)).to_vec();
        no_flag[codec::VOTE_BYTES] = 0;
        assert!(decode_probe_response(&no_flag).is_err());
        assert!(decode_probe_request(&encode_probe_request()).is_ok());
        assert!(decode_probe_request(&[0]).is_err());
    }

    #[test]
    fn a_probed_repair_needs_an_entry_of_the_probed_term() {
        let l = |term, node_id| LeaderId { term, node_id };
        let runs = [(1, l(1, 2)), (10, l(3, 3)), (20, l(5, 2))];
        assert!(!holds_probed_entry(&runs, 15, 5), "a stale entry of term 3");
        assert!(holds_probed_entry(&runs, 20, 5));
        assert!(holds_probed_entry(&runs, 25, 4));
        assert!(!holds_probed_entry(&[], 0, 1));
    }

    #[test]
    fn the_committed_vote_of_the_highest_term_and_its_leaders_last_index() {
        let d = decide(1, &[(2, ans(5, 2, true, 40)), (3, ans(5, 2, true, 38))]).unwrap();
        assert_eq!(d.vote, vote(5, 2, true));
        assert_eq!(d.required_index, 40);
        // An election in progress in a higher term: probe again.
        let e = decide(1, &[(2, ans(5, 2, true, 40)), (3, ans(6, 3, false, 38))]);
        assert!(e.unwrap_err().contains("election"));
        // A committed vote naming this node: wait for the others to elect another.
        let e = decide(1, &[(2, ans(5, 1, true, 40)), (3, ans(5, 1, true, 38))]);
        assert!(e.unwrap_err().contains("names this node"));
        assert!(decide(1, &[]).is_err());
    }
}
