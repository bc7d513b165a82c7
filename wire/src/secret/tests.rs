//! Secret-chat cryptography on its own: two devices agree on keys, seal and open both
//! ways, and refuse tampered, replayed, reordered and misrouted messages; re-keying by
//! count and by time; the key file round-trips and refuses damage.

use super::*;

struct Pair {
    _dir: tempfile::TempDir,
    alice: DeviceKeys,
    bob: DeviceKeys,
    chat: u64,
}

const ALICE: u64 = 1 << 16 | 1;
const BOB: u64 = 2 << 16 | 1;

/// What the server does at `start`: record both identity keys and the one-time key.
fn start(alice: &mut DeviceKeys, bob: &mut DeviceKeys, chat: u64) {
    let e = Ephemeral::generate();
    let info = ChatInfo {
        chat,
        initiator_user: alice.user,
        initiator_device: alice.device.clone(),
        initiator_key: alice.public_key(),
        responder_user: bob.user,
        responder_device: bob.device.clone(),
        responder_key: bob.public_key(),
        ephemeral_key: e.public(),
    };
    alice.add_started(&info, e).expect("initiator derives");
    bob.add_joined(&info).expect("responder derives");
}

fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let mut alice = DeviceKeys::generate(dir.path().join("alice"), ALICE, "phone");
    let mut bob = DeviceKeys::generate(dir.path().join("bob"), BOB, "laptop");
    start(&mut alice, &mut bob, 7);
    Pair {
        _dir: dir,
        alice,
        bob,
        chat: 7,
    }
}

/// The message as the server relays it.
fn relay(from: &DeviceKeys, s: &Sealed) -> v1::SecretMessage {
    v1::SecretMessage {
        secret_chat_id: s.chat,
        sender_user_id: from.user,
        sender_device_id: from.device.clone(),
        counter: s.counter,
        epoch: s.epoch,
        sent_at_ms: 1,
        expires_at_ms: 2,
        self_destruct_s: s.self_destruct_s,
        ciphertext: s.ciphertext.clone().into(),
    }
}

#[test]
fn two_devices_exchange_messages_both_ways() {
    let mut p = pair();
    for i in 0..5u64 {
        let s = p
            .alice
            .seal(p.chat, &format!("hello bob {i}"), 0, 1000 + i)
            .unwrap();
        assert!(
            !s.ciphertext.windows(9).any(|w| w == b"hello bob"),
            "plaintext visible in the ciphertext"
        );
        let o = p.bob.open(&relay(&p.alice, &s)).unwrap();
        assert_eq!(o.text, format!("hello bob {i}"));
        assert_eq!((o.counter, o.sender_user), (i + 1, ALICE));
        let r = p.bob.seal(p.chat, "hi alice", 30, 2000 + i).unwrap();
        let o = p.alice.open(&relay(&p.bob, &r)).unwrap();
        assert_eq!(o.text, "hi alice");
        assert_eq!(o.self_destruct_s, 30);
        assert_eq!(o.destruct_at_ms(10_000), Some(40_000));
    }
}

#[test]
fn tampered_messages_are_refused_and_change_nothing() {
    let mut p = pair();
    let s = p.alice.seal(p.chat, "attack at dawn", 5, 1).unwrap();
    let good = relay(&p.alice, &s);
    let mut cases: Vec<(&str, v1::SecretMessage)> = Vec::new();
    for at in [0, s.ciphertext.len() / 2, s.ciphertext.len() - 1] {
        let mut m = good.clone();
        let mut c = m.ciphertext.to_vec();
        c[at] ^= 0x01;
        m.ciphertext = c.into();
        cases.push(("a flipped ciphertext byte", m));
    }
    let mut m = good.clone();
    m.counter += 1;
    cases.push(("another counter", m));
    let mut m = good.clone();
    m.epoch += 1;
    cases.push(("another epoch", m));
    let mut m = good.clone();
    m.self_destruct_s = 0;
    cases.push(("another self-destruct timer", m));
    let mut m = good.clone();
    m.ciphertext = m.ciphertext.slice(..m.ciphertext.len() - 1);
    cases.push(("a truncated ciphertext", m));
    let mut m = good.clone();
    m.ciphertext = vec![0; good.ciphertext.len()].into();
    cases.push(("an erased (zeroed) ciphertext", m));
    for (what, m) in cases {
        match p.bob.open(&m) {
            Err(SecretError::Tampered { .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    // Nothing moved: the genuine message still opens.
    assert_eq!(p.bob.open(&good).unwrap().text, "attack at dawn");
}

#[test]
fn replayed_and_reordered_messages_are_refused() {
    let mut p = pair();
    let sealed = p.alice.seal(p.chat, "one", 0, 1).unwrap();
    let one = relay(&p.alice, &sealed);
    let sealed = p.alice.seal(p.chat, "two", 0, 2).unwrap();
    let two = relay(&p.alice, &sealed);
    let sealed = p.alice.seal(p.chat, "three", 0, 3).unwrap();
    let three = relay(&p.alice, &sealed);
    assert_eq!(p.bob.open(&two).unwrap().text, "two");
    // Reordered: "one" arrives after "two".
    assert!(matches!(
        p.bob.open(&one),
        Err(SecretError::Replayed {
            counter: 1,
            last: 2,
            ..
        })
    ));
    // Replayed: "two" again.
    assert!(matches!(
        p.bob.open(&two),
        Err(SecretError::Replayed { .. })
    ));
    assert_eq!(p.bob.open(&three).unwrap().text, "three");
}

#[test]
fn misrouted_messages_are_refused() {
    let mut p = pair();
    // A second chat between the same two devices.
    start(&mut p.alice, &mut p.bob, 8);
    let s = p.alice.seal(p.chat, "for chat 7", 0, 1).unwrap();
    let good = relay(&p.alice, &s);
    // Presented as a message of the other chat: other keys, other associated data.
    let mut m = good.clone();
    m.secret_chat_id = 8;
    assert!(matches!(p.bob.open(&m), Err(SecretError::Tampered { .. })));
    // Presented as coming from another device of alice.
    let mut m = good.clone();
    m.sender_device_id = "tablet".into();
    assert!(matches!(p.bob.open(&m), Err(SecretError::Misrouted(_))));
    // Delivered back to its sender.
    assert!(matches!(
        p.alice.open(&good),
        Err(SecretError::Misrouted(_))
    ));
    // A third device of bob's (own identity key) holds no keys for the chat, and cannot
    // derive them: the chat names bob's laptop.
    let dir = tempfile::tempdir().unwrap();
    let mut tablet = DeviceKeys::generate(dir.path().join("t"), BOB, "tablet");
    assert!(matches!(
        tablet.open(&good),
        Err(SecretError::UnknownChat(7))
    ));
    let info = ChatInfo {
        chat: 7,
        initiator_user: ALICE,
        initiator_device: "phone".into(),
        initiator_key: p.alice.public_key(),
        responder_user: BOB,
        responder_device: "laptop".into(),
        responder_key: p.bob.public_key(),
        ephemeral_key: [9; 32],
    };
    assert!(matches!(
        tablet.add_joined(&info),
        Err(SecretError::Misrouted(_))
    ));
    // Even claiming to be the laptop, its key is not the one the chat was started with.
    let mut pretender = DeviceKeys::generate(dir.path().join("p"), BOB, "laptop");
    assert!(matches!(
        pretender.add_joined(&info),
        Err(SecretError::BadKey(_))
    ));
    assert_eq!(p.bob.open(&good).unwrap().text, "for chat 7");
}

#[test]
fn keys_are_rekeyed_after_a_count_and_receivers_follow() {
    let mut p = pair();
    let total = 2 * REKEY_MESSAGES + 10;
    let mut held_back = None;
    for i in 1..=total {
        let s = p.alice.seal(p.chat, &format!("m{i}"), 0, 1).unwrap();
        assert_eq!(u64::from(s.epoch), (i - 1) / REKEY_MESSAGES, "message {i}");
        let m = relay(&p.alice, &s);
        if i == REKEY_MESSAGES - 5 {
            // Lost in transit (e.g. expired on the server): later ones still open.
            held_back = Some(m);
            continue;
        }
        assert_eq!(p.bob.open(&m).unwrap().text, format!("m{i}"));
    }
    assert_eq!(p.alice.chat(p.chat).unwrap().send_epoch(), 2);
    assert_eq!(p.bob.chat(p.chat).unwrap().recv_epoch(), 2);
    // The old epoch's key is gone: a message of epoch 0 can no longer be opened.
    assert!(matches!(
        p.bob.open(&held_back.unwrap()),
        Err(SecretError::Replayed { .. } | SecretError::Epoch { .. })
    ));
}

#[test]
fn keys_are_rekeyed_after_a_time_and_epochs_can_be_skipped() {
    let mut p = pair();
    let s = p.alice.seal(p.chat, "day one", 0, 1_000).unwrap();
    assert_eq!(s.epoch, 0);
    p.bob.open(&relay(&p.alice, &s)).unwrap();
    let s = p
        .alice
        .seal(p.chat, "day two", 0, 1_000 + REKEY_INTERVAL_MS)
        .unwrap();
    assert_eq!(s.epoch, 1);
    let s2 = p
        .alice
        .seal(p.chat, "day three", 0, 1_000 + 2 * REKEY_INTERVAL_MS)
        .unwrap();
    assert_eq!(s2.epoch, 2);
    // Bob never saw epoch 1 and follows straight to 2.
    assert_eq!(p.bob.open(&relay(&p.alice, &s2)).unwrap().text, "day three");
    assert!(p.bob.open(&relay(&p.alice, &s)).is_err());
    // A forged far-future epoch costs bounded work and is refused.
    let mut m = relay(&p.alice, &s2);
    m.counter += 1;
    m.epoch = u32::MAX;
    assert!(matches!(p.bob.open(&m), Err(SecretError::Epoch { .. })));
}

#[test]
fn the_key_file_round_trips_and_refuses_damage() {
    let mut p = pair();
    let s = p.alice.seal(p.chat, "before save", 0, 1).unwrap();
    p.bob.open(&relay(&p.alice, &s)).unwrap();
    p.alice.save().unwrap();
    p.bob.save().unwrap();
    let mut alice = DeviceKeys::load_or_create(p.alice.path(), ALICE, "phone").unwrap();
    let mut bob = DeviceKeys::load(p.bob.path()).unwrap();
    assert_eq!(alice.public_key(), p.alice.public_key());
    // Counters survived: the next message continues, and the old one is a replay.
    let s2 = alice.seal(7, "after load", 0, 2).unwrap();
    assert_eq!(s2.counter, 2);
    assert_eq!(bob.open(&relay(&alice, &s2)).unwrap().text, "after load");
    assert!(matches!(
        bob.open(&relay(&alice, &s)),
        Err(SecretError::Replayed { .. })
    ));
    // The wrong device's file is refused.
    assert!(matches!(
        DeviceKeys::load_or_create(p.bob.path(), ALICE, "phone"),
        Err(SecretError::Corrupt { .. })
    ));
    // Any flipped byte is caught by the checksum or the structure checks.
    let bytes = std::fs::read(p.alice.path()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(p.alice.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key file readable by others");
    }
    for at in (0..bytes.len()).step_by(7) {
        let mut b = bytes.clone();
        b[at] ^= 0x40;
        std::fs::write(p.alice.path(), &b).unwrap();
        assert!(
            matches!(
                DeviceKeys::load(p.alice.path()),
                Err(SecretError::Corrupt { .. })
            ),
            "flip at {at} went unnoticed"
        );
    }
    std::fs::write(p.alice.path(), &bytes[..bytes.len() - 1]).unwrap();
    assert!(DeviceKeys::load(p.alice.path()).is_err());
}

#[test]
fn low_order_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut alice = DeviceKeys::generate(dir.path().join("a"), ALICE, "phone");
    let e = Ephemeral::generate();
    let info = ChatInfo {
        chat: 1,
        initiator_user: ALICE,
        initiator_device: "phone".into(),
        initiator_key: alice.public_key(),
        responder_user: BOB,
        responder_device: "laptop".into(),
        // The all-zero point: every key agreement with it gives zeros.
        responder_key: [0; 32],
        ephemeral_key: e.public(),
    };
    assert!(matches!(
        alice.add_started(&info, e),
        Err(SecretError::BadKey(_))
    ));
}

#[test]
fn two_processes_of_one_device_never_reuse_a_counter() {
    let mut p = pair();
    p.alice.save().unwrap();
    p.bob.save().unwrap();
    // A `tail` and a `send` of the same device: two copies of the same key file.
    let mut first = DeviceKeys::load(p.alice.path()).unwrap();
    let mut second = DeviceKeys::load(p.alice.path()).unwrap();
    let a = first
        .locked(|k| k.seal(7, "from the first process", 0, 1))
        .unwrap();
    let b = second
        .locked(|k| k.seal(7, "from the second, stale copy", 0, 2))
        .unwrap();
    assert_eq!(
        (a.counter, b.counter),
        (1, 2),
        "a counter (and nonce) was reused"
    );
    // The first copy saves again (after opening something): it keeps the newer counter.
    first.save().unwrap();
    let c = first.locked(|k| k.seal(7, "third", 0, 3)).unwrap();
    assert_eq!(c.counter, 3);
    for (s, text) in [
        (&a, "from the first process"),
        (&b, "from the second, stale copy"),
        (&c, "third"),
    ] {
        assert_eq!(p.bob.open(&relay(&p.alice, s)).unwrap().text, text);
    }
}

#[test]
fn read_messages_self_destruct_after_their_timer() {
    let mut p = pair();
    let mut read = ReadMessages::default();
    let s = p.alice.seal(p.chat, "burn after reading", 5, 1).unwrap();
    let o = p.bob.open(&relay(&p.alice, &s)).unwrap();
    assert_eq!(read.insert(o, 10_000), Some(15_000));
    let s = p.alice.seal(p.chat, "keep me", 0, 2).unwrap();
    let o = p.bob.open(&relay(&p.alice, &s)).unwrap();
    assert_eq!(read.insert(o, 10_000), None);
    assert_eq!(read.next_deadline_ms(), Some(15_000));
    assert_eq!(read.purge(14_999), 0);
    assert_eq!(read.get(p.chat, 1).unwrap().text, "burn after reading");
    assert_eq!(read.purge(15_000), 1);
    assert!(read.get(p.chat, 1).is_none());
    assert_eq!(read.get(p.chat, 2).unwrap().text, "keep me");
    assert_eq!((read.len(), read.next_deadline_ms()), (1, None));
}
