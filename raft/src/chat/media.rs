//! Media metadata every replica of a group agrees on: which files this group's users
//! stored, and which of this group's chats each media id was sent to.
//!
//! What it owns: the `MediaStored` rule (applied in the uploader's group) and the access
//! grants that posting a message with media records (applied in the chat's group), plus
//! their checkpoint bytes, appended at the end of `GroupState`'s encoding. What it must
//! not do: hold or read media bytes (they live in each node's media store, `src/media/`,
//! never in the Raft log), read clocks or do I/O. The service decides from this state who
//! may read a media id: its uploaders (their group's `files`) and the members of every
//! chat it was sent to (the chat group's `grants`).
//!
//! Checkpoint bytes, little-endian, after everything else of `GroupState`:
//!
//! ```text
//! files u64 × ( sha256 [32] | size u64 | stored_ms u64 | mime str | file name str
//!               | uploaders u64 × user u64 )
//! grants u64 × ( sha256 [32] | chats u64 × chat u64 )
//! ```
//!
//! (`str` is a u32 length then UTF-8.) Both maps are written in key order, so replicas
//! with the same history write the same bytes. A checkpoint from before media existed
//! ends before these fields; it decodes as no media.

use std::collections::{BTreeMap, BTreeSet};

use crate::chat::command::{MediaRef, Outcome, RefusalCode};
use crate::chat::{ChatId, UserId};
use crate::codec::{DecodeError, Reader};

/// Bytes of a media id (a SHA-256).
pub const MEDIA_ID_BYTES: usize = 32;
/// Longest MIME type or file name a media record keeps, in bytes (the gateway enforces
/// the protocol's tighter limits before proposing).
pub const MEDIA_TEXT_BYTES_MAX: usize = 1024;

/// A media id: the SHA-256 of the file's content.
pub type MediaId = [u8; MEDIA_ID_BYTES];

#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredFile {
    size_bytes: u64,
    /// When the first upload of it by this group's users finished.
    stored_ms: u64,
    mime_type: String,
    file_name: String,
    /// This group's users who uploaded it (each may read it).
    uploaders: BTreeSet<UserId>,
}

/// The media part of a group's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaState {
    /// Files uploaded by users of this group.
    files: BTreeMap<MediaId, StoredFile>,
    /// Chats of this group each media id was sent to.
    grants: BTreeMap<MediaId, BTreeSet<ChatId>>,
}

impl MediaState {
    /// Records that `uploader` (a user of this group, checked by the caller) finished
    /// uploading `media`. A second upload of the same content adds the uploader; its
    /// size must match (same hash, same content).
    pub fn apply_stored(&mut self, uploader: UserId, media: &MediaRef, ts: u64) -> Outcome {
        if media.mime_type.len() > MEDIA_TEXT_BYTES_MAX
            || media.file_name.len() > MEDIA_TEXT_BYTES_MAX
        {
            return Outcome::refused(
                RefusalCode::BadRequest,
                "media mime type or file name over its limit",
            );
        }
        match self.files.get_mut(&media.sha256) {
            Some(f) => {
                if f.size_bytes != media.size_bytes {
                    return Outcome::refused(
                        RefusalCode::Conflict,
                        format!(
                            "media stored with {} bytes, now {} bytes under the same hash",
                            f.size_bytes, media.size_bytes
                        ),
                    );
                }
                let first = f.uploaders.insert(uploader);
                Outcome::MediaStored {
                    uploader,
                    first_upload: first,
                }
            }
            None => {
                self.files.insert(
                    media.sha256,
                    StoredFile {
                        size_bytes: media.size_bytes,
                        stored_ms: ts,
                        mime_type: media.mime_type.clone(),
                        file_name: media.file_name.clone(),
                        uploaders: BTreeSet::from([uploader]),
                    },
                );
                Outcome::MediaStored {
                    uploader,
                    first_upload: true,
                }
            }
        }
    }

    /// Records that a message carrying `media` was posted in `chat` (of this group): its
    /// members may read the media from now on.
    pub fn grant(&mut self, media: &MediaId, chat: ChatId) {
        self.grants.entry(*media).or_default().insert(chat);
    }

    /// True when `user` (of this group) uploaded `media`.
    pub fn uploaded_by(&self, media: &MediaId, user: UserId) -> bool {
        self.files
            .get(media)
            .is_some_and(|f| f.uploaders.contains(&user))
    }

    /// The stored file `media` as its first upload in this group described it.
    pub fn file(&self, media: &MediaId) -> Option<MediaRef> {
        self.files.get(media).map(|f| MediaRef {
            sha256: *media,
            size_bytes: f.size_bytes,
            mime_type: f.mime_type.clone(),
            file_name: f.file_name.clone(),
        })
    }

    /// The ids of every file this group's users stored, in id order (for a replica
    /// catching up on media bytes it missed, `src/media/fetch.rs`).
    pub fn file_ids(&self) -> impl Iterator<Item = &MediaId> + '_ {
        self.files.keys()
    }

    /// The chats of this group `media` was sent to.
    pub fn chats_with(&self, media: &MediaId) -> impl Iterator<Item = ChatId> + '_ {
        self.grants.get(media).into_iter().flatten().copied()
    }

    /// Number of files recorded and of (media, chat) grants, for metrics.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.files.len(),
            self.grants.values().map(BTreeSet::len).sum(),
        )
    }

    /// Appends the checkpoint bytes (module docs).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        out.extend_from_slice(&(self.files.len() as u64).to_le_bytes());
        for (id, f) in &self.files {
            out.extend_from_slice(id);
            out.extend_from_slice(&f.size_bytes.to_le_bytes());
            out.extend_from_slice(&f.stored_ms.to_le_bytes());
            str(out, &f.mime_type);
            str(out, &f.file_name);
            out.extend_from_slice(&(f.uploaders.len() as u64).to_le_bytes());
            for u in &f.uploaders {
                out.extend_from_slice(&u.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.grants.len() as u64).to_le_bytes());
        for (id, chats) in &self.grants {
            out.extend_from_slice(id);
            out.extend_from_slice(&(chats.len() as u64).to_le_bytes());
            for c in chats {
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
    }

    /// Decodes what [`MediaState::encode_into`] wrote; no bytes left means no media (a
    /// checkpoint from before media existed).
    pub fn decode_from(r: &mut Reader<'_>) -> Result<MediaState, DecodeError> {
        let mut st = MediaState::default();
        if r.remaining() == 0 {
            return Ok(st);
        }
        let count = |r: &mut Reader<'_>, item_bytes: usize| -> Result<usize, DecodeError> {
            let n = r.u64()? as usize;
            if n.saturating_mul(item_bytes) > r.remaining() {
                return Err(r.error(format!("media count {n} exceeds the bytes left")));
            }
            Ok(n)
        };
        for _ in 0..count(r, MEDIA_ID_BYTES + 32)? {
            let id = media_id(r)?;
            let size_bytes = r.u64()?;
            let stored_ms = r.u64()?;
            let mime_type = r.string(MEDIA_TEXT_BYTES_MAX)?;
            let file_name = r.string(MEDIA_TEXT_BYTES_MAX)?;
            let mut uploaders = BTreeSet::new();
            for _ in 0..count(r, 8)? {
                uploaders.insert(r.u64()?);
            }
            st.files.insert(
                id,
                StoredFile {
                    size_bytes,
                    stored_ms,
                    mime_type,
                    file_name,
                    uploaders,
                },
            );
        }
        for _ in 0..count(r, MEDIA_ID_BYTES + 8)? {
            let id = media_id(r)?;
            let mut chats = BTreeSet::new();
            for _ in 0..count(r, 8)? {
                chats.insert(r.u64()?);
            }
            st.grants.insert(id, chats);
        }
        Ok(st)
    }
}

fn media_id(r: &mut Reader<'_>) -> Result<MediaId, DecodeError> {
    let mut id = [0u8; MEDIA_ID_BYTES];
    id.copy_from_slice(r.bytes(MEDIA_ID_BYTES)?);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn media(b: u8, size: u64) -> MediaRef {
        MediaRef {
            sha256: [b; 32],
            size_bytes: size,
            mime_type: "image/png".into(),
            file_name: "a.png".into(),
        }
    }

    #[test]
    fn stored_files_and_grants_round_trip_in_key_order() {
        let mut a = MediaState::default();
        assert!(matches!(
            a.apply_stored(7, &media(2, 10), 5),
            Outcome::MediaStored {
                first_upload: true,
                ..
            }
        ));
        a.apply_stored(9, &media(1, 3), 6);
        assert!(matches!(
            a.apply_stored(9, &media(1, 3), 7),
            Outcome::MediaStored {
                first_upload: false,
                ..
            }
        ));
        assert!(matches!(
            a.apply_stored(9, &media(1, 4), 7),
            Outcome::Refused(_)
        ));
        a.grant(&[1; 32], 44);
        a.grant(&[1; 32], 33);
        assert!(a.uploaded_by(&[2; 32], 7) && !a.uploaded_by(&[2; 32], 9));
        assert_eq!(a.chats_with(&[1; 32]).collect::<Vec<_>>(), vec![33, 44]);
        assert_eq!(a.file(&[1; 32]).map(|f| f.size_bytes), Some(3));
        let mut bytes = Vec::new();
        a.encode_into(&mut bytes);
        let mut r = Reader::new("media", &bytes);
        let b = MediaState::decode_from(&mut r).expect("decodes");
        r.finish().expect("all consumed");
        assert_eq!(a, b);
        // The same history in another order of grants encodes the same bytes.
        let mut c = MediaState::default();
        c.apply_stored(7, &media(2, 10), 5);
        c.apply_stored(9, &media(1, 3), 6);
        c.grant(&[1; 32], 33);
        c.grant(&[1; 32], 44);
        let mut bytes_c = Vec::new();
        c.encode_into(&mut bytes_c);
        assert_eq!(bytes, bytes_c);
        for len in 1..bytes.len() {
            let mut r = Reader::new("media", &bytes[..len]);
            assert!(MediaState::decode_from(&mut r).is_err(), "prefix {len}");
        }
    }
}
