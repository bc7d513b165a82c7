//! A damaged replica must not forget acknowledged entries (issue 9): the "synced through"
//! marker of a group's Raft log, the check at open that tells a damaged log from a torn
//! one, and the repair status that keeps a damaged replica out of elections and reads
//! until the leader has sent back what it lost.
//!
//! What it owns: the marker's key and bytes ([`META_SYNCED`]), deciding at open whether a
//! group's log lost entries it had made durable ([`detect`]), and the per-replica
//! [`RepairStatus`] (damaged → repaired) that the node (no campaigning, no reads) and the
//! peer server (no votes) consult. What it must not do: write to the engine (the log
//! store does, in its own batches), or clear a damage before the log holds the required
//! index durably again.
//!
//! The marker. `META_SYNCED` of a group's Raft log holds the Raft index through which
//! its entries were durable when the batch carrying it was built. The log store puts it
//! in the first batch of every append and in every committed-mark batch when it moved
//! (no extra fdatasync), and, if neither came within `log_store::MARKER_DELAY` (20 ms)
//! of a flush, in a small batch of its own: the record holding entry N is followed within
//! about that time by a record that vouches for N. A truncation lowers it in the same
//! batch (never below a damage's required index). A damage found at open is written as
//! the marker before the replica starts, so a crash during repair finds it again.
//!
//! Detection at open. The log held through index H (or purged through it) is damaged
//! when something durable says it held more: the surviving marker, or what the storage
//! engine dropped after a damaged record (`chatlog_storage::Damage`, under
//! `RecoveryMode::CutDamagedTail`): that log's highest appended index, its marker or its
//! committed mark in the dropped records. The required index is the highest of them.
//!
//! When a repair ends. (a) The log is durable through the required index again, or
//! (b) (session 6, liveness) it durably holds an entry of a term T greater than the term
//! of the vote the replica had when the damage was found (`V`), received from T's leader.
//! (b) ends the repair of an idle group whose lost entries the current leader never had
//! (they were never committed), which (a) alone leaves repairing until the log grows past
//! the required index. Why (b) is safe: the replica's required index guards exactly one
//! thing, its votes (it refuses them while repairing; its acknowledgements of new appends
//! are of entries it really holds). Every entry it lost was accepted in a term <= V
//! (openraft saves a vote before accepting a leader's entries). Take such an entry e,
//! accepted in term t <= V < T. If e is committed, by the term t leader or later, then
//! T's leader holds it (leader completeness: T's electing majority meets e's storing
//! majority in a node that stored e before voting for T, since a node that voted in T
//! refuses term-t appends after; that node was not this replica once damaged, since it
//! refuses votes, and the standard Raft argument applies). T's leader's entries of terms
//! before T all sit below T's first entry, so they are in the prefix this replica now
//! shares with T's log (log matching: it accepted that entry with a matching previous
//! log id). Entries it lost that are not in that prefix were never committed and never
//! will be: its vote is again as safe as a sound replica's. The same holds for the
//! required index (a): holding the log through it, the replica holds at least what it
//! had. Vote terms are never forgotten except in the double fault below.
//!
//! What still escapes (double faults): the record holding the last entries of a group is
//! damaged AND no later record of that group reached the disk before the crash (a crash
//! within about `MARKER_DELAY` of the group's last flush, then a bit flip in exactly that
//! record): recovery cuts it as a torn write and nothing says it was acknowledged. A vote
//! kept only in a damaged record is forgotten the same way.
//!
//! Session 7: when the engine SEES that the newest records are gone (the newest segment
//! file cut short, missing or headerless: `Damage::tail_lost`), nothing says what any
//! group lost, not even its vote: every replica of the node starts vote-unknown and probes
//! its group's voters before it votes, reads or accepts appends (`crate::vote_probe`,
//! whose module doc argues it safe); it then repairs as above, with its required index
//! the probed leader's last index. While vote-unknown, `note_durable` and
//! `note_newer_leader` end nothing.

use std::sync::atomic::{AtomicBool, Ordering};

use chatlog_storage::Engine;
use tokio::sync::watch;

use crate::codec;
use crate::ids::{self, raft_index};
use crate::types::{GroupId, Vote};

/// Meta key of a group's Raft log: the Raft index its entries were durable through when
/// the batch carrying it was built (`u64` little-endian).
pub const META_SYNCED: &[u8] = b"synced";

/// Encodes a marker value.
pub fn encode_synced(index: u64) -> [u8; 8] {
    index.to_le_bytes()
}

/// Decodes a marker value; `None` if it is not 8 bytes (never written so by this code).
pub fn decode_synced(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Why a replica's log is damaged and what it must hold again before it votes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDamage {
    /// The group.
    pub group: GroupId,
    /// The log held entries through this index (or was purged through it) at open.
    pub held_index: u64,
    /// The replica had made entries durable through this index: it takes no part in
    /// elections and serves no reads until its log holds it again.
    pub required_index: u64,
    /// Where the damage was found (segment file and offset, or the marker).
    pub detail: String,
}

impl std::fmt::Display for LogDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "group {}: log damaged: holds through index {} but had made {} durable ({})",
            self.group, self.held_index, self.required_index, self.detail
        )
    }
}

/// What [`detect`] found, beyond the damage: a vote the dropped records held.
#[derive(Debug, Default)]
pub struct Detected {
    /// The damage, if any.
    pub damage: Option<LogDamage>,
    /// The vote the dropped records of the engine's damage cut last wrote for this log
    /// (they passed their checks, so it was durable): the log store saves it again, so the
    /// replica never forgets a vote that survives there.
    pub dropped_vote: Option<Vote>,
}

/// Decides at open whether group `group`'s log lost durable entries. `held` is the last
/// index the log holds (or is purged through), `synced` the surviving marker.
pub fn detect(engine: &Engine, group: GroupId, held: Option<u64>, synced: Option<u64>) -> Detected {
    let Some(log) = ids::raft_log(group) else {
        return Detected::default();
    };
    let held = held.unwrap_or(0);
    let mut out = Detected::default();
    let mut required = synced.unwrap_or(0);
    let mut detail = format!("its \"synced\" marker says {required}");
    if let Some(cut) = engine.damage()
        && let Some(dropped) = cut.logs.get(&log)
    {
        let appended = dropped.last_index.map(raft_index).unwrap_or(0);
        let marker = dropped
            .meta
            .get(META_SYNCED)
            .and_then(|v| v.as_deref())
            .and_then(decode_synced)
            .unwrap_or(0);
        let committed = dropped
            .meta
            .get(ids::META_COMMITTED)
            .and_then(|v| v.as_deref())
            .and_then(|b| codec::decode_log_id(b).ok())
            .map_or(0, |c| c.index);
        out.dropped_vote = dropped
            .meta
            .get(ids::META_VOTE)
            .and_then(|v| v.as_deref())
            .and_then(|b| codec::decode_vote(b).ok());
        let from_cut = appended.max(marker).max(committed);
        if from_cut > required {
            required = from_cut;
            detail = format!(
                "segment {} offset {}: {}; records dropped after it held this log through \
                 index {appended}, marker {marker}, committed {committed}",
                cut.path.display(),
                cut.offset,
                cut.detail
            );
        }
    }
    if required > held {
        out.damage = Some(LogDamage {
            group,
            held_index: held,
            required_index: required,
            detail,
        });
    }
    out
}

/// Issue 9 (session 6): whether group `group`'s state machine should set aside its
/// checkpoint (applied through `applied`) and rebuild its state from the log. Yes when
/// the Raft log is damaged (its "synced" marker, or the engine's damage cut, says it held
/// more than it does) and now ends below `applied`, and it still holds everything from
/// its start (never purged): openraft would otherwise purge the log up to `applied` and
/// the replica would never get the entries between its cut and `applied` back, serving
/// a history with a hole. Rebuilt from the log, the state re-applies what the log holds
/// and the leader sends the rest, so the replica ends with the leader's whole log. A log
/// purged at its start keeps the checkpoint (the hole stays: reads of it fail with an
/// error naming the missing entry).
pub fn rebuild_state_from_log(engine: &Engine, group: GroupId, applied: u64) -> bool {
    let Some(log) = ids::raft_log(group) else {
        return false;
    };
    if applied == 0 || engine.meta(log, ids::META_PURGED).is_some() {
        return false;
    }
    let bounds = engine.bounds(log);
    if bounds.is_some_and(|b| !b.is_empty() && b.first > ids::engine_index(0)) {
        return false;
    }
    let held = bounds.and_then(|b| b.last()).map_or(0, raft_index);
    if applied <= held {
        return false;
    }
    let marker = engine
        .meta(log, META_SYNCED)
        .and_then(|b| decode_synced(&b))
        .unwrap_or(0);
    let cut = engine
        .damage()
        .is_some_and(|d| d.logs.contains_key(&log) || d.lost_from.contains_key(&log));
    marker > held || cut
}

/// One replica's repair status: damaged (with what it must hold again) or sound.
#[derive(Debug)]
pub struct RepairStatus {
    /// Fast path for the write path: false once sound.
    damaged: AtomicBool,
    /// Issue 9 (session 7): the node lost its newest records and this replica has not
    /// probed its group's voters yet (`crate::vote_probe`): it also accepts no appends,
    /// and nothing durable ends the repair (only the probe, by restarting the replica).
    vote_unknown: AtomicBool,
    /// Issue 9 (session 7): the term of a probe that lowered the required index while
    /// running (`crate::vote_probe`, the idle-group case), 0 if none: the repair then ends
    /// only once the last durable entry is of that term or later.
    probe_term: std::sync::atomic::AtomicU64,
    /// When the damage was found (the probe task asks only about repairs that last).
    since: std::time::Instant,
    /// The damage while it lasts; `None` once repaired (or never damaged).
    damage: watch::Sender<Option<LogDamage>>,
}

impl Default for RepairStatus {
    fn default() -> RepairStatus {
        RepairStatus::new(None)
    }
}

impl RepairStatus {
    /// A status starting damaged (`Some`) or sound.
    pub fn new(damage: Option<LogDamage>) -> RepairStatus {
        RepairStatus {
            damaged: AtomicBool::new(damage.is_some()),
            vote_unknown: AtomicBool::new(false),
            probe_term: std::sync::atomic::AtomicU64::new(0),
            since: std::time::Instant::now(),
            damage: watch::channel(damage).0,
        }
    }

    /// Issue 9 (session 7): a status starting damaged with its vote unknown
    /// (`crate::vote_probe`).
    pub fn new_vote_unknown(damage: LogDamage) -> RepairStatus {
        let status = RepairStatus::new(Some(damage));
        status.vote_unknown.store(true, Ordering::Release);
        status
    }

    /// Issue 9 (session 7): whether the replica waits for its probe: no votes, no
    /// campaign, no reads, no appends accepted.
    pub fn is_vote_unknown(&self) -> bool {
        self.vote_unknown.load(Ordering::Acquire)
    }

    /// How long ago the damage was found.
    pub fn repairing_for(&self) -> std::time::Duration {
        self.since.elapsed()
    }

    /// Issue 9 (session 7): the term a probe that lowered the required index set, 0 if
    /// none ([`RepairStatus::lower_required`]).
    pub fn probe_term(&self) -> u64 {
        self.probe_term.load(Ordering::Acquire)
    }

    /// Issue 9 (session 7), the idle-group case: a probe of every voter found the
    /// committed vote of the highest term (`term`) and its leader's last index `index`,
    /// below the required index. The required index becomes `index`, and the repair ends
    /// once the log is durable through it with its last durable entry of `term` or later
    /// (the log store checks that, `LogReader::recheck_repair`): the log then matches that
    /// leader's through everything it had when probed, which holds every committed entry
    /// this replica may have lost (`crate::vote_probe`, module docs). Returns whether it
    /// lowered it.
    pub fn lower_required(&self, index: u64, term: u64) -> bool {
        if self.is_vote_unknown() {
            return false;
        }
        let lowered = self.damage.send_if_modified(|d| match d {
            Some(dmg) if index < dmg.required_index => {
                dmg.detail = format!(
                    "{}; lowered from {} by a probe of every voter (leader's last index, term \
                     >= {term})",
                    dmg.detail, dmg.required_index
                );
                dmg.required_index = index;
                true
            }
            _ => false,
        });
        if lowered {
            self.probe_term.fetch_max(term, Ordering::AcqRel);
        }
        lowered
    }

    /// Whether the replica is still repairing a damaged log.
    pub fn is_repairing(&self) -> bool {
        self.damaged.load(Ordering::Acquire)
    }

    /// The damage while it lasts.
    pub fn damage(&self) -> Option<LogDamage> {
        self.damage.borrow().clone()
    }

    /// A receiver that sees the damage cleared.
    pub fn subscribe(&self) -> watch::Receiver<Option<LogDamage>> {
        self.damage.subscribe()
    }

    /// The log is durable through `index`: clears the damage once that reaches the
    /// required index. Called from the engine's durable callbacks, so it only takes a
    /// lock and logs.
    pub fn note_durable(&self, index: u64) {
        if !self.is_repairing() || self.is_vote_unknown() {
            return;
        }
        let mut repaired = None;
        self.damage.send_if_modified(|d| match d {
            Some(dmg) if index >= dmg.required_index => {
                repaired = d.take();
                true
            }
            _ => false,
        });
        if let Some(dmg) = repaired {
            self.damaged.store(false, Ordering::Release);
            tracing::warn!(
                group = dmg.group,
                durable_index = index,
                required_index = dmg.required_index,
                status = "repaired",
                "damaged log repaired from the leader: the replica votes, campaigns and \
                 serves reads again"
            );
        }
    }
}

impl RepairStatus {
    /// Issue 9 (session 6): the log is durable through `first`, the first entry it holds
    /// of `term`, a term later than any the replica knew when damaged: the repair is
    /// over even below the required index (module docs, "When a repair ends").
    pub fn note_newer_leader(&self, first: u64, term: u64) {
        if !self.is_repairing() || self.is_vote_unknown() {
            return;
        }
        let mut repaired = None;
        self.damage.send_if_modified(|d| {
            repaired = d.take();
            repaired.is_some()
        });
        if let Some(dmg) = repaired {
            self.damaged.store(false, Ordering::Release);
            tracing::warn!(
                group = dmg.group,
                first_index_of_term = first,
                term,
                required_index = dmg.required_index,
                status = "repaired",
                "damaged log repaired: it matches a newer leader's log through that leader's \
                 first entry; what it lost beyond can never be committed"
            );
        }
    }
}

/// Vote and pre-vote requests refused by damaged replicas of this node since start (a
/// process-wide count: the status page and tests read it).
static VOTES_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Vote, pre-vote and leader-transfer requests this process refused because the
/// replica asked was repairing a damaged log.
pub fn votes_refused() -> u64 {
    VOTES_REFUSED.load(Ordering::Relaxed)
}

/// Counts and logs one refused vote (the peer server calls it).
pub fn note_vote_refused(group: GroupId, from: u64, refusal: &str) {
    VOTES_REFUSED.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(group, from, status = "repairing", "{refusal}");
}

/// Turns elections back on for `raft` once its log is repaired (or never, if the group
/// stops first).
pub async fn resume_elections_when_repaired(
    raft: crate::ChatRaft,
    mut damage: watch::Receiver<Option<LogDamage>>,
) {
    if damage.wait_for(|d| d.is_none()).await.is_ok() {
        raft.runtime_config().elect(true);
    }
}

/// Keeps a damaged replica's `raft` from campaigning until `status` says it is repaired
/// (openraft's runtime `elect` switch); does nothing for a sound one. Call right after
/// `Raft::new`.
pub fn hold_elections_while_repairing(raft: &crate::ChatRaft, status: &RepairStatus) {
    if status.is_repairing() {
        raft.runtime_config().elect(false);
        tokio::spawn(resume_elections_when_repaired(
            raft.clone(),
            status.subscribe(),
        ));
    }
}
