//! Secret chats over a [`Client`]: the `secret` requests, and the steps that combine them
//! with the device's keys ([`crate::secret::DeviceKeys`]).
//!
//! What it owns: one typed method per `SecretRequest` kind, and the flows a device runs:
//! publish its key, start a chat (read the other device's key, send a one-time key,
//! derive), send (seal, save the keys so a counter is never reused, relay), and receive
//! (learn chats started with this device, open, save). What it must not do: send a
//! plaintext or a secret key to the server, or acknowledge a message it could not open
//! (the caller acknowledges after it stored or showed the text; a message that does not
//! open is left to expire, and reported).
//!
//! Every `secret` request but `send` is repeated after a drop like the other safe
//! requests (`Client::call`): a repeated `start` carries the same one-time key and gets
//! the same chat, `ack` acknowledges "up to" a counter. A `send` is not: if the first
//! attempt went through, the repeat would be refused as a reused counter.

use crate::client::{Client, ClientError, unexpected_response};
use crate::proto::v1::{self, request, response, secret_request, secret_response};
use crate::secret::{ChatInfo, DeviceKeys, Ephemeral, Opened, SecretError};

/// Why a secret-chat flow failed: the server refused or the device did.
#[derive(Debug, thiserror::Error)]
pub enum SecretFlowError {
    /// The request failed (see [`ClientError`]).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The device refused (keys, authentication, replay, routing) or its key file failed.
    #[error(transparent)]
    Device(#[from] SecretError),
}

macro_rules! secret_requests {
    ($(
        $(#[$doc:meta])*
        $method:ident($kind:ident: $request:ty) -> $response:ty;
    )*) => {
        impl Client {
            $(
                $(#[$doc])*
                ///
                /// Errors as [`Client::call`].
                pub async fn $method(&self, request: $request) -> Result<$response, ClientError> {
                    let req = v1::SecretRequest {
                        kind: Some(secret_request::Kind::$kind(request)),
                    };
                    match self.call(request::Kind::Secret(req)).await? {
                        response::Kind::Secret(v1::SecretResponse {
                            kind: Some(secret_response::Kind::$kind(r)),
                        }) => Ok(r),
                        other => Err(unexpected_response(stringify!($method), &other)),
                    }
                }
            )*
        }
    };
}

secret_requests! {
    /// Publishes this device's identity key.
    secret_publish_key(PublishKey: v1::SecretPublishKeyRequest) -> v1::SecretPublishKeyResponse;
    /// Reads another device's identity key.
    secret_get_key(GetKey: v1::SecretGetKeyRequest) -> v1::SecretGetKeyResponse;
    /// Starts a secret chat (the raw request; [`Client::secret_start`] does the whole flow).
    secret_start_request(Start: v1::SecretStartRequest) -> v1::SecretStartResponse;
    /// Lists this device's secret chats.
    secret_list(List: v1::SecretListRequest) -> v1::SecretListResponse;
    /// Relays a sealed message (the raw request; [`Client::secret_send`] seals first).
    secret_send_request(Send: v1::SecretSendRequest) -> v1::SecretSendResponse;
    /// Reads messages waiting for this device.
    secret_pending(Pending: v1::SecretPendingRequest) -> v1::SecretPendingResponse;
    /// Acknowledges messages up to a counter: the server erases them.
    secret_ack(Ack: v1::SecretAckRequest) -> v1::SecretAckResponse;
}

impl Client {
    /// Publishes `keys`' identity key for this session's device.
    pub async fn secret_publish(&self, keys: &DeviceKeys) -> Result<(), ClientError> {
        self.secret_publish_key(v1::SecretPublishKeyRequest {
            public_key: keys.public_key().to_vec().into(),
        })
        .await
        .map(|_| ())
    }

    /// Starts a secret chat with `(user, device)`: reads its published key, sends a fresh
    /// one-time key, derives the chat's keys and saves them. Returns the chat id.
    pub async fn secret_start(
        &self,
        keys: &mut DeviceKeys,
        user: u64,
        device: &str,
    ) -> Result<u64, SecretFlowError> {
        let peer = self
            .secret_get_key(v1::SecretGetKeyRequest {
                user_id: user,
                device_id: device.to_string(),
            })
            .await?;
        let e = Ephemeral::generate();
        let started = self
            .secret_start_request(v1::SecretStartRequest {
                user_id: user,
                device_id: device.to_string(),
                ephemeral_key: e.public().to_vec().into(),
                responder_key: peer.public_key,
            })
            .await?;
        let chat = started
            .chat
            .ok_or_else(|| ClientError::Protocol("secret start answered without a chat".into()))?;
        let info = ChatInfo::from_proto(&chat)?;
        keys.add_started(&info, e)?;
        keys.save()?;
        Ok(info.chat)
    }

    /// Seals `text` for `chat`, saves the keys (the counter is spent even if the send
    /// fails), and relays it. Returns the counter and the server's answer.
    pub async fn secret_send(
        &self,
        keys: &mut DeviceKeys,
        chat: u64,
        text: &str,
        ttl_ms: u64,
        self_destruct_s: u32,
        now_ms: u64,
    ) -> Result<(u64, v1::SecretSendResponse), SecretFlowError> {
        // Sealed and saved under the key file's lock: the counter is spent even if the
        // send fails, and never reused by another process of this device.
        let sealed = keys.locked(|k| k.seal(chat, text, self_destruct_s, now_ms))?;
        let r = self
            .secret_send_request(v1::SecretSendRequest {
                secret_chat_id: chat,
                counter: sealed.counter,
                epoch: sealed.epoch,
                ttl_ms,
                self_destruct_s,
                ciphertext: sealed.ciphertext.into(),
            })
            .await?;
        Ok((sealed.counter, r))
    }

    /// Learns the secret chats started with this device that `keys` does not hold yet
    /// (from `secret_list`), derives and saves their keys. Returns how many were added.
    pub async fn secret_refresh_chats(
        &self,
        keys: &mut DeviceKeys,
    ) -> Result<usize, SecretFlowError> {
        let list = self.secret_list(v1::SecretListRequest {}).await?;
        let mut added = 0;
        for c in &list.chats {
            if keys.chat(c.secret_chat_id).is_some() {
                continue;
            }
            let info = ChatInfo::from_proto(c)?;
            if info.responder_user == keys.user && info.responder_device == keys.device {
                keys.add_joined(&info)?;
                added += 1;
            }
        }
        if added > 0 {
            keys.save()?;
        }
        Ok(added)
    }

    /// Opens a message received for this device (learning its chat first if it is new),
    /// and saves the keys. Does not acknowledge it: call [`Client::secret_ack`] once the
    /// text is stored or shown.
    pub async fn secret_receive(
        &self,
        keys: &mut DeviceKeys,
        message: &v1::SecretMessage,
    ) -> Result<Opened, SecretFlowError> {
        if keys.chat(message.secret_chat_id).is_none() {
            self.secret_refresh_chats(keys).await?;
        }
        Ok(keys.locked(|k| k.open(message))?)
    }
}
