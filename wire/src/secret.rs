//! Secret chats on the device: keys, key agreement, sealing and opening messages, and the
//! key file that holds them.
//!
//! What it owns: the cryptography of secret chats, all of it on the client (the server
//! relays ciphertext and never sees a key): a device's X25519 identity key, the keys of
//! each secret chat derived with HKDF-SHA256, ChaCha20-Poly1305 sealing with a counter
//! nonce and associated data that binds every message to its chat, sender, counter and
//! epoch, re-keying, and the device's key file. What it must not do: invent primitives
//! (only x25519-dalek, chacha20poly1305, hkdf and sha2 are used), reuse a nonce, or
//! accept a message it cannot authenticate, a replayed or reordered one, or one routed
//! to the wrong chat or from the wrong device.
//!
//! Key agreement. Device A (initiator) starts a chat with device B (responder), whose
//! published identity key is `IB`. A draws a one-time key `E` and computes
//! `DH(E, IB) || DH(IA, IB)`; B computes the same from its secret and `E`, `IA` (which the
//! server returns with the chat). The first term gives every chat fresh keys, the second
//! binds the chat to A's identity key. The input key material goes through
//! HKDF-SHA256 (salt [`HKDF_SALT`], info: a label, the chat id, both devices' user ids,
//! device ids and identity keys, and `E`) into 64 bytes: the key for A→B and the key for
//! B→A at epoch 0. `E`'s secret is dropped (zeroed) as soon as the keys are derived.
//!
//! Messages. Each direction has a counter (1, 2, …, strictly increasing) and an epoch.
//! The nonce is `epoch u32 LE | counter u64 LE`; a key is used for one direction and one
//! epoch only, and counters never repeat, so a nonce never repeats under a key. The
//! associated data is [`AAD_LABEL`], chat id, sender user id, sender device id, counter,
//! epoch and self-destruct timer: changing any of them, or a byte of the ciphertext,
//! makes opening fail. The receiver also refuses a counter not above the last one it
//! opened (replay, reordering) and a sender other than the chat's other device.
//!
//! Re-keying. A sender moves to the next epoch after [`REKEY_MESSAGES`] messages or
//! [`REKEY_INTERVAL_MS`] in one epoch; the next key is HKDF-SHA256 of the current one
//! (info [`REKEY_LABEL`] and the new epoch), and the old key is zeroed. The receiver
//! follows deterministically when a message names a later epoch (at most
//! [`EPOCH_SKIP_MAX`] ahead), only after that message authenticated. An earlier epoch
//! cannot be opened any more: its key is gone (forward secrecy within the chat).
//!
//! Plaintext layout: `version u8 (1) | self_destruct_s u32 | sent_at_ms u64 | text`.
//!
//! Key file (one per user and device, mode 0600, replaced atomically on each change):
//!
//! ```text
//! magic "CLSECRET" | version u8 (1) | body_len u32 | body | SHA-256(body) [32]
//! body: identity_secret [32] | user u64 | device str16 | chat_count u32 × chat
//! chat: chat u64 | side u8 (0 initiator, 1 responder) | peer_user u64 | peer_device str16
//!       | send_epoch u32 | send_key [32] | send_counter u64 | send_epoch_started_ms u64
//!       | send_epoch_messages u64 | recv_epoch u32 | recv_key [32] | recv_counter u64
//! str16: u16 length | UTF-8
//! ```
//!
//! The file is checked (magic, version, length, SHA-256) before anything in it is used.
//! Known limit: replacing the file drops the old keys from the file system's view, but a
//! file system may keep old blocks until they are reused (no secure delete on ext4).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::proto::v1;

/// Messages sealed under one key before the sender moves to the next epoch. Why: bounds
/// what one leaked key opens; 1,000 is a long conversation and re-keying costs one HKDF.
pub const REKEY_MESSAGES: u64 = 1000;
/// Time one epoch lasts at most for a sender. Why: a chat with few messages still
/// changes keys daily.
pub const REKEY_INTERVAL_MS: u64 = 24 * 3600 * 1000;
/// How many epochs ahead of its own a receiver follows in one message. Why: each step is
/// one HKDF; a forged epoch far ahead must not cost unbounded work (the message still has
/// to authenticate before anything is kept).
pub const EPOCH_SKIP_MAX: u32 = 1024;
/// Longest text a secret message carries, in UTF-8 bytes (the protocol's text limit).
pub const SECRET_TEXT_BYTES_MAX: usize = crate::limits::TEXT_BYTES_MAX as usize;
/// Bytes a sealed message adds to its text: the plaintext header and the AEAD tag.
pub const SEAL_OVERHEAD_BYTES: usize = PLAIN_HEADER_BYTES + 16;
/// Largest ciphertext: what the server accepts (`chatlog_raft::chat::secret`).
pub const SECRET_CIPHERTEXT_BYTES_MAX: usize = 20 * 1024;
const _: () = assert!(SECRET_TEXT_BYTES_MAX + SEAL_OVERHEAD_BYTES <= SECRET_CIPHERTEXT_BYTES_MAX);
/// Secret chats one key file holds. Why: the server's limit per device.
pub const SECRET_CHATS_MAX: usize = 1024;
/// Largest key file read. Why: a file this size holds every chat allowed; anything larger
/// is not ours.
pub const KEY_FILE_BYTES_MAX: usize = 1 << 20;

/// HKDF salt of the chat key derivation.
pub const HKDF_SALT: &[u8] = b"chatlog secret chat salt v1";
/// First bytes of the HKDF info of a chat.
pub const CHAT_INFO_LABEL: &[u8] = b"chatlog secret chat keys v1";
/// First bytes of the HKDF info of a re-key.
pub const REKEY_LABEL: &[u8] = b"chatlog secret chat rekey v1";
/// First bytes of every message's associated data.
pub const AAD_LABEL: &[u8] = b"chatlog secret message v1";

const PLAIN_VERSION: u8 = 1;
const PLAIN_HEADER_BYTES: usize = 1 + 4 + 8;
const FILE_MAGIC: &[u8; 8] = b"CLSECRET";
const FILE_VERSION: u8 = 1;

/// Why a secret-chat operation failed on the device.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The ciphertext or its metadata was altered, or sealed with another key.
    #[error(
        "secret message {counter} of chat {chat} does not authenticate (tampered or wrong key)"
    )]
    Tampered {
        /// The chat.
        chat: u64,
        /// The counter it claimed.
        counter: u64,
    },
    /// The counter is not above the last one opened: a replay or a reordering.
    #[error(
        "secret message {counter} of chat {chat} is not newer than {last}: replayed or reordered"
    )]
    Replayed {
        /// The chat.
        chat: u64,
        /// The counter it claimed.
        counter: u64,
        /// The last counter opened.
        last: u64,
    },
    /// The message names a chat, sender or device it does not belong to.
    #[error("misrouted secret message: {0}")]
    Misrouted(String),
    /// The message names an epoch whose key is gone, or one too far ahead.
    #[error("secret message {counter} of chat {chat} names epoch {epoch}, ours is {ours}")]
    Epoch {
        /// The chat.
        chat: u64,
        /// The counter.
        counter: u64,
        /// Its epoch.
        epoch: u32,
        /// The receiver's epoch.
        ours: u32,
    },
    /// No such chat in this device's key file.
    #[error("no secret chat {0} on this device")]
    UnknownChat(u64),
    /// A key is malformed or a key agreement gave a non-contributory result.
    #[error("bad key: {0}")]
    BadKey(String),
    /// The text is too long, or a limit of the key file was reached.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The key file failed a check.
    #[error("key file {path}: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The failed check.
        detail: String,
    },
    /// Reading or writing the key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// One direction's key state.
#[derive(Clone)]
struct Direction {
    epoch: u32,
    key: Zeroizing<[u8; 32]>,
    /// Sending: the last counter used. Receiving: the last counter opened.
    counter: u64,
    /// Sending only: when the epoch started (client clock) and messages sealed in it.
    epoch_started_ms: u64,
    epoch_messages: u64,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a key.
        f.debug_struct("Direction")
            .field("epoch", &self.epoch)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

fn next_key(key: &[u8; 32], epoch: u32) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(None, key);
    let mut info = Vec::with_capacity(REKEY_LABEL.len() + 4);
    info.extend_from_slice(REKEY_LABEL);
    info.extend_from_slice(&epoch.to_le_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(&info, out.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

/// One secret chat as this device holds it.
#[derive(Debug, Clone)]
pub struct ChatKeys {
    /// The chat.
    pub chat: u64,
    /// 0 when this device started it, 1 when it was started with this device.
    pub side: u8,
    /// The other device's user.
    pub peer_user: u64,
    /// The other device.
    pub peer_device: String,
    send: Direction,
    recv: Direction,
}

impl ChatKeys {
    /// The epoch this device seals with now.
    pub fn send_epoch(&self) -> u32 {
        self.send.epoch
    }
    /// The epoch this device last opened with.
    pub fn recv_epoch(&self) -> u32 {
        self.recv.epoch
    }
    /// The last counter this device sent.
    pub fn send_counter(&self) -> u64 {
        self.send.counter
    }
    /// The last counter this device opened.
    pub fn recv_counter(&self) -> u64 {
        self.recv.counter
    }
}

/// A message sealed for sending (the fields of a `SecretSendRequest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The chat.
    pub chat: u64,
    /// The counter.
    pub counter: u64,
    /// The epoch.
    pub epoch: u32,
    /// The self-destruct timer.
    pub self_destruct_s: u32,
    /// The sealed bytes.
    pub ciphertext: Vec<u8>,
}

/// A message opened on the receiving device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The chat.
    pub chat: u64,
    /// The sender's user.
    pub sender_user: u64,
    /// The sender's device.
    pub sender_device: String,
    /// The counter.
    pub counter: u64,
    /// The epoch it was sealed in.
    pub epoch: u32,
    /// The text.
    pub text: String,
    /// The sender's self-destruct timer in seconds (0: keep).
    pub self_destruct_s: u32,
    /// The sender's clock when it sealed the message.
    pub sent_at_ms: u64,
}

impl Opened {
    /// When the receiving client must delete the message, read at `read_at_ms`; `None`
    /// when the sender set no timer.
    pub fn destruct_at_ms(&self, read_at_ms: u64) -> Option<u64> {
        (self.self_destruct_s > 0)
            .then(|| read_at_ms.saturating_add(u64::from(self.self_destruct_s) * 1000))
    }
}

fn aad(
    chat: u64,
    sender_user: u64,
    sender_device: &str,
    counter: u64,
    epoch: u32,
    self_destruct_s: u32,
) -> Vec<u8> {
    let mut a = Vec::with_capacity(AAD_LABEL.len() + 40 + sender_device.len());
    a.extend_from_slice(AAD_LABEL);
    a.extend_from_slice(&chat.to_le_bytes());
    a.extend_from_slice(&sender_user.to_le_bytes());
    a.extend_from_slice(&(sender_device.len() as u32).to_le_bytes());
    a.extend_from_slice(sender_device.as_bytes());
    a.extend_from_slice(&counter.to_le_bytes());
    a.extend_from_slice(&epoch.to_le_bytes());
    a.extend_from_slice(&self_destruct_s.to_le_bytes());
    a
}

fn nonce(epoch: u32, counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&epoch.to_le_bytes());
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

fn public_key(bytes: &[u8], what: &str) -> Result<PublicKey, SecretError> {
    let b: [u8; 32] = bytes
        .try_into()
        .map_err(|_| SecretError::BadKey(format!("{what} is {} bytes, not 32", bytes.len())))?;
    Ok(PublicKey::from(b))
}

/// The public facts of a chat both ends derive its keys from (a `SecretChat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatInfo {
    /// The chat.
    pub chat: u64,
    /// The initiator's user.
    pub initiator_user: u64,
    /// The initiator's device.
    pub initiator_device: String,
    /// The initiator's identity key.
    pub initiator_key: [u8; 32],
    /// The responder's user.
    pub responder_user: u64,
    /// The responder's device.
    pub responder_device: String,
    /// The responder's identity key.
    pub responder_key: [u8; 32],
    /// The initiator's one-time key.
    pub ephemeral_key: [u8; 32],
}

impl ChatInfo {
    /// From the protocol message; checks key sizes.
    pub fn from_proto(c: &v1::SecretChat) -> Result<ChatInfo, SecretError> {
        let k = |b: &[u8], what: &str| public_key(b, what).map(|k| k.to_bytes());
        Ok(ChatInfo {
            chat: c.secret_chat_id,
            initiator_user: c.initiator_user_id,
            initiator_device: c.initiator_device_id.clone(),
            initiator_key: k(&c.initiator_key, "the initiator's key")?,
            responder_user: c.responder_user_id,
            responder_device: c.responder_device_id.clone(),
            responder_key: k(&c.responder_key, "the responder's key")?,
            ephemeral_key: k(&c.ephemeral_key, "the one-time key")?,
        })
    }

    fn hkdf_info(&self) -> Vec<u8> {
        let mut i = Vec::with_capacity(256);
        i.extend_from_slice(CHAT_INFO_LABEL);
        i.extend_from_slice(&self.chat.to_le_bytes());
        for (user, device, key) in [
            (
                self.initiator_user,
                &self.initiator_device,
                &self.initiator_key,
            ),
            (
                self.responder_user,
                &self.responder_device,
                &self.responder_key,
            ),
        ] {
            i.extend_from_slice(&user.to_le_bytes());
            i.extend_from_slice(&(device.len() as u32).to_le_bytes());
            i.extend_from_slice(device.as_bytes());
            i.extend_from_slice(key);
        }
        i.extend_from_slice(&self.ephemeral_key);
        i
    }

    /// Derives both directions' epoch-0 keys from `DH(e, IB) || DH(IA, IB)`.
    fn derive(&self, dh1: [u8; 32], dh2: [u8; 32]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
        let mut ikm = Zeroizing::new([0u8; 64]);
        ikm[..32].copy_from_slice(&dh1);
        ikm[32..].copy_from_slice(&dh2);
        let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), ikm.as_ref());
        let mut okm = Zeroizing::new([0u8; 64]);
        hk.expand(&self.hkdf_info(), okm.as_mut())
            .expect("64 bytes is a valid HKDF-SHA256 length");
        let mut a = Zeroizing::new([0u8; 32]);
        let mut b = Zeroizing::new([0u8; 32]);
        a.copy_from_slice(&okm[..32]);
        b.copy_from_slice(&okm[32..]);
        (a, b)
    }
}

/// A one-time key for starting a chat; its secret is zeroed when dropped.
pub struct Ephemeral(StaticSecret);

impl std::fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Ephemeral").field(&self.public()).finish()
    }
}

impl Ephemeral {
    /// Draws a fresh one-time key.
    pub fn generate() -> Ephemeral {
        Ephemeral(random_secret())
    }
    /// Its public half.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }
}

fn random_secret() -> StaticSecret {
    let mut b = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(b.as_mut());
    StaticSecret::from(*b)
}

fn contributory(shared: x25519_dalek::SharedSecret) -> Result<[u8; 32], SecretError> {
    if !shared.was_contributory() {
        return Err(SecretError::BadKey(
            "a key agreement gave a non-contributory result (low-order public key)".into(),
        ));
    }
    Ok(shared.to_bytes())
}

/// A device's secret-chat keys: its identity key and the keys of its chats. Held in
/// memory; [`DeviceKeys::load_or_create`] and [`DeviceKeys::save`] keep it in its file.
pub struct DeviceKeys {
    path: PathBuf,
    identity: StaticSecret,
    /// The device's user.
    pub user: u64,
    /// The device.
    pub device: String,
    chats: BTreeMap<u64, ChatKeys>,
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeys")
            .field("path", &self.path)
            .field("user", &self.user)
            .field("device", &self.device)
            .field("public_key", &self.public_key())
            .field("chats", &self.chats)
            .finish_non_exhaustive()
    }
}

impl DeviceKeys {
    /// Fresh keys for `(user, device)`, to be kept at `path` (not written yet).
    pub fn generate(path: impl Into<PathBuf>, user: u64, device: &str) -> DeviceKeys {
        DeviceKeys {
            path: path.into(),
            identity: random_secret(),
            user,
            device: device.to_string(),
            chats: BTreeMap::new(),
        }
    }

    /// Loads the key file at `path`, or creates and saves fresh keys if there is none.
    /// A file for another user or device is an error.
    pub fn load_or_create(
        path: impl Into<PathBuf>,
        user: u64,
        device: &str,
    ) -> Result<DeviceKeys, SecretError> {
        let path = path.into();
        match fs::metadata(&path) {
            Ok(_) => {
                let keys = DeviceKeys::load(&path)?;
                if keys.user != user || keys.device != device {
                    return Err(SecretError::Corrupt {
                        path,
                        detail: format!(
                            "holds the keys of user {} device {:?}, not user {user} device {device:?}",
                            keys.user, keys.device
                        ),
                    });
                }
                Ok(keys)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut keys = DeviceKeys::generate(path, user, device);
                keys.save()?;
                Ok(keys)
            }
            Err(source) => Err(SecretError::Io { path, source }),
        }
    }

    /// The identity public key to publish.
    pub fn public_key(&self) -> [u8; 32] {
        PublicKey::from(&self.identity).to_bytes()
    }

    /// The chats this device holds keys for.
    pub fn chats(&self) -> impl Iterator<Item = &ChatKeys> {
        self.chats.values()
    }

    /// One chat's keys.
    pub fn chat(&self, chat: u64) -> Option<&ChatKeys> {
        self.chats.get(&chat)
    }

    /// The file the keys live in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Derives and adds the keys of a chat this device started with one-time key `e`
    /// (dropped afterwards). The chat's facts come from the server's answer.
    pub fn add_started(&mut self, info: &ChatInfo, e: Ephemeral) -> Result<&ChatKeys, SecretError> {
        if info.initiator_user != self.user || info.initiator_device != self.device {
            return Err(SecretError::Misrouted(format!(
                "chat {} was started by user {} device {:?}, not this device",
                info.chat, info.initiator_user, info.initiator_device
            )));
        }
        if info.initiator_key != self.public_key() || info.ephemeral_key != e.public() {
            return Err(SecretError::BadKey(format!(
                "chat {} names keys this device did not use",
                info.chat
            )));
        }
        let ib = PublicKey::from(info.responder_key);
        let dh1 = contributory(e.0.diffie_hellman(&ib))?;
        let dh2 = contributory(self.identity.diffie_hellman(&ib))?;
        drop(e);
        let (a_to_b, b_to_a) = info.derive(dh1, dh2);
        self.insert(info, 0, a_to_b, b_to_a)
    }

    /// Derives and adds the keys of a chat another device started with this one.
    pub fn add_joined(&mut self, info: &ChatInfo) -> Result<&ChatKeys, SecretError> {
        if info.responder_user != self.user || info.responder_device != self.device {
            return Err(SecretError::Misrouted(format!(
                "chat {} is for user {} device {:?}, not this device",
                info.chat, info.responder_user, info.responder_device
            )));
        }
        if info.responder_key != self.public_key() {
            return Err(SecretError::BadKey(format!(
                "chat {} was started with another identity key of this device",
                info.chat
            )));
        }
        let dh1 = contributory(
            self.identity
                .diffie_hellman(&PublicKey::from(info.ephemeral_key)),
        )?;
        let dh2 = contributory(
            self.identity
                .diffie_hellman(&PublicKey::from(info.initiator_key)),
        )?;
        let (a_to_b, b_to_a) = info.derive(dh1, dh2);
        self.insert(info, 1, a_to_b, b_to_a)
    }

    fn insert(
        &mut self,
        info: &ChatInfo,
        side: u8,
        a_to_b: Zeroizing<[u8; 32]>,
        b_to_a: Zeroizing<[u8; 32]>,
    ) -> Result<&ChatKeys, SecretError> {
        if !self.chats.contains_key(&info.chat) && self.chats.len() >= SECRET_CHATS_MAX {
            return Err(SecretError::TooLarge(format!(
                "this device holds {SECRET_CHATS_MAX} secret chats"
            )));
        }
        let (send, recv, peer_user, peer_device) = if side == 0 {
            (
                a_to_b,
                b_to_a,
                info.responder_user,
                info.responder_device.clone(),
            )
        } else {
            (
                b_to_a,
                a_to_b,
                info.initiator_user,
                info.initiator_device.clone(),
            )
        };
        let dir = |key| Direction {
            epoch: 0,
            key,
            counter: 0,
            epoch_started_ms: 0,
            epoch_messages: 0,
        };
        self.chats.insert(
            info.chat,
            ChatKeys {
                chat: info.chat,
                side,
                peer_user,
                peer_device,
                send: dir(send),
                recv: dir(recv),
            },
        );
        Ok(&self.chats[&info.chat])
    }

    /// Seals `text` for chat `chat` at client time `now_ms`: takes the next counter and,
    /// when due, moves to the next epoch. Save the keys before sending the result, so a
    /// crash never reuses a counter; with other processes using the same key file, seal
    /// inside [`DeviceKeys::locked`].
    pub fn seal(
        &mut self,
        chat: u64,
        text: &str,
        self_destruct_s: u32,
        now_ms: u64,
    ) -> Result<Sealed, SecretError> {
        if text.len() > SECRET_TEXT_BYTES_MAX {
            return Err(SecretError::TooLarge(format!(
                "the text is {} bytes, over {SECRET_TEXT_BYTES_MAX}",
                text.len()
            )));
        }
        let (user, device) = (self.user, self.device.clone());
        let keys = self
            .chats
            .get_mut(&chat)
            .ok_or(SecretError::UnknownChat(chat))?;
        let send = &mut keys.send;
        if send.epoch_messages == 0 && send.epoch_started_ms == 0 {
            send.epoch_started_ms = now_ms;
        }
        if send.epoch_messages >= REKEY_MESSAGES
            || now_ms.saturating_sub(send.epoch_started_ms) >= REKEY_INTERVAL_MS
        {
            let epoch = send.epoch + 1;
            // The old key is zeroed as it is replaced (Zeroizing's drop).
            send.key = next_key(&send.key, epoch);
            send.epoch = epoch;
            send.epoch_started_ms = now_ms;
            send.epoch_messages = 0;
        }
        send.counter += 1;
        send.epoch_messages += 1;
        let (counter, epoch) = (send.counter, send.epoch);
        let mut plain = Zeroizing::new(Vec::with_capacity(PLAIN_HEADER_BYTES + text.len()));
        plain.push(PLAIN_VERSION);
        plain.extend_from_slice(&self_destruct_s.to_le_bytes());
        plain.extend_from_slice(&now_ms.to_le_bytes());
        plain.extend_from_slice(text.as_bytes());
        let cipher = ChaCha20Poly1305::new(Key::from_slice(send.key.as_ref()));
        let aad = aad(chat, user, &device, counter, epoch, self_destruct_s);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce(epoch, counter)),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::TooLarge("the AEAD refused the message".into()))?;
        Ok(Sealed {
            chat,
            counter,
            epoch,
            self_destruct_s,
            ciphertext,
        })
    }

    /// Opens a message received for this device. Refuses (and changes nothing) when it
    /// does not authenticate, is not newer than the last one opened, names a chat, sender
    /// or device it does not belong to, or an epoch whose key is gone. Save the keys
    /// afterwards: the counter (and perhaps the epoch) moved.
    pub fn open(&mut self, m: &v1::SecretMessage) -> Result<Opened, SecretError> {
        let chat = m.secret_chat_id;
        let keys = self
            .chats
            .get_mut(&chat)
            .ok_or(SecretError::UnknownChat(chat))?;
        if m.sender_user_id != keys.peer_user || m.sender_device_id != keys.peer_device {
            return Err(SecretError::Misrouted(format!(
                "chat {chat} joins this device with user {} device {:?}, not user {} device {:?}",
                keys.peer_user, keys.peer_device, m.sender_user_id, m.sender_device_id
            )));
        }
        let recv = &keys.recv;
        if m.counter <= recv.counter {
            return Err(SecretError::Replayed {
                chat,
                counter: m.counter,
                last: recv.counter,
            });
        }
        let epoch_error = || SecretError::Epoch {
            chat,
            counter: m.counter,
            epoch: m.epoch,
            ours: recv.epoch,
        };
        if m.epoch < recv.epoch || m.epoch - recv.epoch > EPOCH_SKIP_MAX {
            return Err(epoch_error());
        }
        // The key of the message's epoch, derived on a copy: kept only if it opens.
        let mut key = recv.key.clone();
        for e in recv.epoch + 1..=m.epoch {
            key = next_key(&key, e);
        }
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_ref()));
        let aad = aad(
            chat,
            m.sender_user_id,
            &m.sender_device_id,
            m.counter,
            m.epoch,
            m.self_destruct_s,
        );
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    Nonce::from_slice(&nonce(m.epoch, m.counter)),
                    Payload {
                        msg: &m.ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| SecretError::Tampered {
                    chat,
                    counter: m.counter,
                })?,
        );
        let tampered = || SecretError::Tampered {
            chat,
            counter: m.counter,
        };
        if plain.len() < PLAIN_HEADER_BYTES || plain[0] != PLAIN_VERSION {
            return Err(tampered());
        }
        let self_destruct_s = u32::from_le_bytes(plain[1..5].try_into().expect("4 bytes"));
        let sent_at_ms = u64::from_le_bytes(plain[5..13].try_into().expect("8 bytes"));
        if self_destruct_s != m.self_destruct_s {
            return Err(tampered());
        }
        let text = std::str::from_utf8(&plain[PLAIN_HEADER_BYTES..])
            .map_err(|_| tampered())?
            .to_string();
        let recv = &mut keys.recv;
        recv.key = key;
        recv.epoch = m.epoch;
        recv.counter = m.counter;
        Ok(Opened {
            chat,
            sender_user: m.sender_user_id,
            sender_device: m.sender_device_id.clone(),
            counter: m.counter,
            epoch: m.epoch,
            text,
            self_destruct_s,
            sent_at_ms,
        })
    }

    // ---- the key file ----------------------------------------------------------------

    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut b = Zeroizing::new(Vec::with_capacity(256 + self.chats.len() * 160));
        b.extend_from_slice(&self.identity.to_bytes());
        b.extend_from_slice(&self.user.to_le_bytes());
        put_str16(&mut b, &self.device);
        b.extend_from_slice(&(self.chats.len() as u32).to_le_bytes());
        for c in self.chats.values() {
            b.extend_from_slice(&c.chat.to_le_bytes());
            b.push(c.side);
            b.extend_from_slice(&c.peer_user.to_le_bytes());
            put_str16(&mut b, &c.peer_device);
            b.extend_from_slice(&c.send.epoch.to_le_bytes());
            b.extend_from_slice(c.send.key.as_ref());
            b.extend_from_slice(&c.send.counter.to_le_bytes());
            b.extend_from_slice(&c.send.epoch_started_ms.to_le_bytes());
            b.extend_from_slice(&c.send.epoch_messages.to_le_bytes());
            b.extend_from_slice(&c.recv.epoch.to_le_bytes());
            b.extend_from_slice(c.recv.key.as_ref());
            b.extend_from_slice(&c.recv.counter.to_le_bytes());
        }
        let mut out = Zeroizing::new(Vec::with_capacity(b.len() + 45));
        out.extend_from_slice(FILE_MAGIC);
        out.push(FILE_VERSION);
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&b);
        out.extend_from_slice(&Sha256::digest(&b[..]));
        out
    }

    /// Runs `f` on the keys while holding the key file's lock, after merging in what
    /// another process using the same file saved (newer counters and epochs win, chats
    /// are united), and saves the result before releasing the lock. Sealing and opening
    /// go through here ([`Client::secret_send`](crate::client::Client::secret_send),
    /// [`Client::secret_receive`](crate::client::Client::secret_receive)): two processes
    /// of one device (a `tail` and a `send`) then never seal twice with one counter, which
    /// would reuse a nonce.
    pub fn locked<T>(
        &mut self,
        f: impl FnOnce(&mut DeviceKeys) -> Result<T, SecretError>,
    ) -> Result<T, SecretError> {
        let io = |source| SecretError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io)?;
        let lock = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path.with_extension("lock"))
            .map_err(io)?;
        lock.lock().map_err(io)?;
        self.merge_saved()?;
        let out = f(self)?;
        self.write_file()?;
        // Unlocked when `lock` is closed.
        drop(lock);
        Ok(out)
    }

    /// Merges the saved file into these keys (see [`DeviceKeys::locked`]).
    fn merge_saved(&mut self) -> Result<(), SecretError> {
        if !self.path.exists() {
            return Ok(());
        }
        let saved = DeviceKeys::load(&self.path)?;
        if saved.identity.to_bytes() != self.identity.to_bytes()
            || saved.user != self.user
            || saved.device != self.device
        {
            return Err(SecretError::Corrupt {
                path: self.path.clone(),
                detail: "now holds another device's keys".into(),
            });
        }
        for (id, theirs) in saved.chats {
            match self.chats.get_mut(&id) {
                None => {
                    self.chats.insert(id, theirs);
                }
                Some(mine) => {
                    if (theirs.send.epoch, theirs.send.counter)
                        > (mine.send.epoch, mine.send.counter)
                    {
                        mine.send = theirs.send;
                    }
                    if (theirs.recv.epoch, theirs.recv.counter)
                        > (mine.recv.epoch, mine.recv.counter)
                    {
                        mine.recv = theirs.recv;
                    }
                }
            }
        }
        Ok(())
    }

    /// Saves the keys: under the file's lock, merged with what another process saved.
    pub fn save(&mut self) -> Result<(), SecretError> {
        self.locked(|_| Ok(()))
    }

    /// Writes the key file: a temporary file (mode 0600), fsync, rename over the old one,
    /// fsync of the directory.
    fn write_file(&self) -> Result<(), SecretError> {
        let io = |source| SecretError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io)?;
        let tmp = self.path.with_extension("tmp");
        {
            let mut options = fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut f = options.open(&tmp).map_err(io)?;
            f.write_all(&self.encode()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &self.path).map_err(io)?;
        if let Ok(d) = fs::File::open(dir) {
            d.sync_all().map_err(io)?;
        }
        Ok(())
    }

    /// Reads and checks the key file at `path`.
    pub fn load(path: &Path) -> Result<DeviceKeys, SecretError> {
        let corrupt = |detail: String| SecretError::Corrupt {
            path: path.to_path_buf(),
            detail,
        };
        let meta = fs::metadata(path).map_err(|source| SecretError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.len() > KEY_FILE_BYTES_MAX as u64 {
            return Err(corrupt(format!(
                "{} bytes, over {KEY_FILE_BYTES_MAX}",
                meta.len()
            )));
        }
        let bytes = Zeroizing::new(fs::read(path).map_err(|source| SecretError::Io {
            path: path.to_path_buf(),
            source,
        })?);
        if bytes.len() < 8 + 1 + 4 + 32 || &bytes[..8] != FILE_MAGIC {
            return Err(corrupt("not a chatlog secret key file".into()));
        }
        if bytes[8] != FILE_VERSION {
            return Err(corrupt(format!(
                "version {}, expected {FILE_VERSION}",
                bytes[8]
            )));
        }
        let len = u32::from_le_bytes(bytes[9..13].try_into().expect("4 bytes")) as usize;
        if 13 + len + 32 != bytes.len() {
            return Err(corrupt(format!(
                "says {len} bytes of body, holds {}",
                bytes.len().saturating_sub(45)
            )));
        }
        let body = &bytes[13..13 + len];
        if Sha256::digest(body)[..] != bytes[13 + len..] {
            return Err(corrupt("checksum mismatch".into()));
        }
        let mut r = Cursor { b: body, at: 0 };
        let decode = |r: &mut Cursor<'_>| -> Option<DeviceKeys> {
            let identity = StaticSecret::from(r.key()?);
            let user = r.u64()?;
            let device = r.str16()?;
            let n = r.u32()? as usize;
            if n > SECRET_CHATS_MAX {
                return None;
            }
            let mut chats = BTreeMap::new();
            for _ in 0..n {
                let chat = r.u64()?;
                let side = r.u8()?;
                let peer_user = r.u64()?;
                let peer_device = r.str16()?;
                let send = Direction {
                    epoch: r.u32()?,
                    key: Zeroizing::new(r.key()?),
                    counter: r.u64()?,
                    epoch_started_ms: r.u64()?,
                    epoch_messages: r.u64()?,
                };
                let recv = Direction {
                    epoch: r.u32()?,
                    key: Zeroizing::new(r.key()?),
                    counter: r.u64()?,
                    epoch_started_ms: 0,
                    epoch_messages: 0,
                };
                if side > 1 {
                    return None;
                }
                chats.insert(
                    chat,
                    ChatKeys {
                        chat,
                        side,
                        peer_user,
                        peer_device,
                        send,
                        recv,
                    },
                );
            }
            (r.at == r.b.len()).then_some(DeviceKeys {
                path: path.to_path_buf(),
                identity,
                user,
                device,
                chats,
            })
        };
        decode(&mut r).ok_or_else(|| corrupt("the body does not decode".into()))
    }
}

/// Read messages a device holds once they are shown. Why the bound: a device keeps
/// what it can show; beyond 10,000 the oldest read is dropped first.
pub const READ_MESSAGES_MAX: usize = 10_000;

/// The messages a device has read, each kept until its sender's self-destruct timer runs
/// out (counted from when it was read); then [`ReadMessages::purge`] drops it and zeroes
/// its text. Messages without a timer stay until dropped by the bound. The server's copy
/// is already gone: it was erased with the acknowledgement.
#[derive(Debug, Default)]
pub struct ReadMessages {
    items: BTreeMap<(u64, u64), (Opened, Option<u64>, u64)>,
    /// `(destruct_at_ms, chat, counter)` of the messages with a timer.
    deadlines: std::collections::BTreeSet<(u64, u64, u64)>,
    next_order: u64,
}

impl ReadMessages {
    /// Keeps `o`, read at `read_at_ms`; returns when it must be deleted (`None`: kept).
    pub fn insert(&mut self, o: Opened, read_at_ms: u64) -> Option<u64> {
        let at = o.destruct_at_ms(read_at_ms);
        let key = (o.chat, o.counter);
        if self.items.len() >= READ_MESSAGES_MAX && !self.items.contains_key(&key) {
            // Drop the message read first.
            if let Some((&oldest, _)) = self.items.iter().min_by_key(|(_, (_, _, order))| *order) {
                self.remove(oldest);
            }
        }
        if let Some(d) = at {
            self.deadlines.insert((d, key.0, key.1));
        }
        self.next_order += 1;
        self.items.insert(key, (o, at, self.next_order));
        at
    }

    fn remove(&mut self, key: (u64, u64)) {
        if let Some((mut o, at, _)) = self.items.remove(&key) {
            if let Some(d) = at {
                self.deadlines.remove(&(d, key.0, key.1));
            }
            zeroize::Zeroize::zeroize(&mut o.text);
        }
    }

    /// Deletes (and zeroes) every message whose timer ran out by `now_ms`; returns how
    /// many.
    pub fn purge(&mut self, now_ms: u64) -> usize {
        let due: Vec<(u64, u64)> = self
            .deadlines
            .range(..=(now_ms, u64::MAX, u64::MAX))
            .map(|(_, c, n)| (*c, *n))
            .collect();
        for key in &due {
            self.remove(*key);
        }
        due.len()
    }

    /// The next time [`ReadMessages::purge`] has something to delete.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.deadlines.first().map(|(d, _, _)| *d)
    }

    /// A kept message.
    pub fn get(&self, chat: u64, counter: u64) -> Option<&Opened> {
        self.items.get(&(chat, counter)).map(|(o, _, _)| o)
    }

    /// How many messages are kept.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when none is kept.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

fn put_str16(b: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s);
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes(s.try_into().expect("4")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|s| u64::from_le_bytes(s.try_into().expect("8")))
    }
    fn key(&mut self) -> Option<[u8; 32]> {
        self.take(32).map(|s| s.try_into().expect("32"))
    }
    fn str16(&mut self) -> Option<String> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests;
