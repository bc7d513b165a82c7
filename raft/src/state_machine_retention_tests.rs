//! Session 8 (s8retention): the retention policy is replicated state. Two replicas whose
//! nodes run with different `--retain-*` flags (`SmConfig::retention`) apply the same log
//! through the real state machine (`ChatStateMachine::apply_entry`, on a real engine) and
//! end byte-identical; the policy changes only where the log says, and survives the
//! checkpoint encoding (older encodings decode as "no policy").

use std::sync::Arc;

use chatlog_storage::Engine;

use super::{ChatStateMachine, SmConfig};
use crate::chat::retention::{RetentionCommand, RetentionPolicy};
use crate::chat::{Batch, ChatKind, Command, GroupState, Outcome};
use crate::types::{ChatBatch, Entry, EntryPayload, log_id};

const GROUP: u64 = 3;

fn engine(dir: &std::path::Path) -> Arc<Engine> {
    let mut config = chatlog_storage::Config::new(dir);
    config.segment_bytes = 4 << 20;
    Arc::new(Engine::open(config).expect("engine opens"))
}

fn replica(dir: &std::path::Path, flags: RetentionPolicy) -> ChatStateMachine {
    ChatStateMachine::open(
        engine(dir),
        GROUP,
        SmConfig {
            checkpoint_every_entries: 1 << 40,
            retention: flags,
        },
    )
    .expect("state machine opens")
}

fn entry(index: u64, commands: Vec<Command>) -> Entry {
    let batch = Batch {
        timestamp_ms: 1_000 + index,
        commands,
    };
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(ChatBatch(batch.encode())),
    }
}

fn set(policy: RetentionPolicy, only_if_unset: bool) -> Command {
    Command::Retention(RetentionCommand {
        policy,
        only_if_unset,
    })
}

fn entries(n: u64) -> RetentionPolicy {
    RetentionPolicy {
        retain_entries: Some(n),
        retain_bytes: None,
    }
}

fn bytes(n: u64) -> RetentionPolicy {
    RetentionPolicy {
        retain_entries: None,
        retain_bytes: Some(n),
    }
}

#[tokio::test]
async fn replicas_with_different_flags_apply_the_same_log_to_the_same_bytes() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // Node A runs with `--retain-entries 20`, node B with `--retain-bytes 3000`: before
    // session 8 each trimmed under its own flags and the states diverged.
    let mut a = replica(dirs[0].path(), entries(20));
    let mut b = replica(dirs[1].path(), bytes(3_000));
    let (user, chat) = (
        crate::chat::make_id(GROUP, 1),
        crate::chat::make_id(GROUP, 1),
    );
    let mut log = vec![
        vec![Command::CreateUser {
            name: "ann".into(),
            login_token_hash: [1; 32],
        }],
        vec![Command::CreateChat {
            creator: user,
            kind: ChatKind::Group,
            title: "t".into(),
            members: vec![],
        }],
    ];
    let post = |cmid: u64| Command::Post {
        chat,
        sender: user,
        client_message_id: cmid,
        text: format!("message {cmid} {}", "x".repeat(100)),
        media: None,
        reply_to: 0,
    };
    // 100 entries with no policy, then the log sets one (keep 30 entries), a seed that
    // must not override it, 200 more, a change to a byte limit, 300 more, then keep-all.
    log.extend((1..=100).map(|c| vec![post(c)]));
    log.push(vec![set(entries(30), false)]);
    log.push(vec![set(bytes(1), true)]);
    log.extend((101..=300).map(|c| vec![post(c)]));
    log.push(vec![set(bytes(4_000), false)]);
    log.extend((301..=600).map(|c| vec![post(c)]));
    log.push(vec![set(RetentionPolicy::keep_all(), false)]);
    log.extend((601..=700).map(|c| vec![post(c)]));

    let mut policies = Vec::new();
    let mut horizons = Vec::new();
    for (k, commands) in log.into_iter().enumerate() {
        let index = k as u64 + 1;
        let ra = a
            .apply_entry(entry(index, commands.clone()))
            .expect("A applies");
        let rb = b.apply_entry(entry(index, commands)).expect("B applies");
        assert_eq!(ra.outcomes, rb.outcomes, "entry {index}: same outcomes");
        for o in &ra.outcomes {
            assert!(!matches!(o, Outcome::Refused(_)), "entry {index}: {o:?}");
        }
        let (sa, sb) = (a.shared.read(), b.shared.read());
        assert!(
            sa.encode() == sb.encode(),
            "entry {index}: the replicas' states differ (A retained from {}, B from {})",
            sa.retained_from(),
            sb.retained_from()
        );
        policies.push(sa.retention_policy());
        horizons.push(sa.retained_from());
    }
    // Nothing trimmed before the log set a policy, whatever the flags said.
    assert!(policies[..102].iter().all(Option::is_none));
    assert!(horizons[..102].iter().all(|h| *h == 0), "{horizons:?}");
    // The seed (only-if-unset) did not replace the set policy.
    assert_eq!(policies[103], Some(entries(30)));
    // The entry policy trimmed to about 30 entries (every 30 / 8 = 3 entries), then the
    // byte policy moved on. `horizons[k]` is after entry `k + 1`.
    let at_300 = horizons[302];
    assert!((303 - 33..=303 - 29).contains(&at_300), "{at_300}");
    assert_eq!(policies[304], Some(bytes(4_000)));
    let at_600 = horizons[603];
    assert!(at_600 > at_300 + 200, "{at_300} -> {at_600}");
    // Keep-all stops trimming; nothing comes back.
    assert_eq!(policies.last(), Some(&Some(RetentionPolicy::keep_all())));
    assert_eq!(horizons.last(), Some(&horizons[605]));

    // The policy round-trips through the checkpoint encoding.
    let bytes_now = a.shared.read().encode();
    let back = GroupState::decode(&bytes_now).expect("decodes");
    assert_eq!(back.retention_policy(), Some(RetentionPolicy::keep_all()));
    assert_eq!(back.encode(), bytes_now, "byte-identical");
}

#[test]
fn encodings_without_a_policy_decode_as_none_and_refuse_zero_limits() {
    let mut st = GroupState::new(0);
    let plain = st.encode();
    assert_eq!(GroupState::decode(&plain).unwrap().retention_policy(), None);
    // A limit of 0 is refused on every replica alike and changes nothing.
    match st.apply(&set(entries(0), false), 1, 1, 0) {
        Outcome::Refused(r) => assert!(r.message.contains("at least 1"), "{}", r.message),
        o => panic!("{o:?}"),
    }
    assert_eq!(st.encode(), plain);
    // Set, an unchanged repeat, then the section round-trips.
    let p = RetentionPolicy {
        retain_entries: Some(7),
        retain_bytes: Some(9),
    };
    assert_eq!(
        st.apply(&set(p, false), 1, 2, 0),
        Outcome::Retention { changed: true }
    );
    assert_eq!(
        st.apply(&set(p, false), 1, 3, 0),
        Outcome::Retention { changed: false }
    );
    let enc = st.encode();
    assert!(
        enc.len() > plain.len() && enc.starts_with(&plain),
        "appended at the end"
    );
    let back = GroupState::decode(&enc).unwrap();
    assert_eq!(back.retention_policy(), Some(p));
    assert_eq!(back.encode(), enc);
    // The command round-trips through its bytes.
    let cmd = set(p, true);
    let mut b = Vec::new();
    cmd.encode_into(&mut b);
    assert_eq!(b[0], crate::chat::retention::tag::SET_POLICY);
    assert_eq!(Command::decode(&b).unwrap(), cmd);
}
