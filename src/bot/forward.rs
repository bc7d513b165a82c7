//! Forwarded bot calls: a bot may call any node of a cluster.
//!
//! What it owns: deciding whether a call is answered here or by another node
//! ([`BotApi::route`]), sending the whole call there (the `bot_request` node message,
//! `wire/proto/node.proto`: token, method, parameters as JSON, idempotency header)
//! and giving the HTTP client exactly the answer that node gave (status, JSON, retry
//! hint), and serving such calls from other nodes ([`BotApi::serve_forwarded`]).
//!
//! A call needs the bot's user group (its token is checked there, and its bot state
//! lives there) and, when it names a `chat_id`, that chat's group. A node that serves
//! no replica of the bot's group sends the call to one of that group's replicas; a node
//! that serves the bot's group but not the chat's sends it only when another node
//! serves both (the methods that name a chat write to it, and a write reaches its
//! group's leader from any node: the call works here too). The targets are the bot
//! group's replicas, those serving every needed group first, then in placement order,
//! each until one takes the call. The receiver answers as if it were called directly
//! (errors included) and never forwards again; one that cannot take it (it serves no
//! replica of the group now) says so and the next is asked.
//!
//! What it must not do: forward while this node's own replica of the bot's group is
//! repairing (issue 9: that refusal says why, and the other replicas may be what it
//! waits for), try another node once a call may have run (a node that does not answer
//! in time), or interpret a method: the receiver runs [`BotApi::call_here`].
//! Webhook delivery is not forwarded: it runs on the leader of the bot's group, which
//! keeps the last delivery error in memory; so a `getWebhookInfo` answered by a replica
//! that does not lead goes on once to the leader (`at_leader`), and is answered there
//! whatever that node then believes (no second hop). A `getUpdates` likewise: a new
//! poll ends the bot's waiting one only where both wait, so every poll waits at the
//! leader ([`answered_at_leader`]); when the leader does not take it, the replica
//! answers it itself.

use std::time::Duration;

use bytes::Bytes;
use chatlog_raft::GroupId;
use chatlog_raft::chat::group_of;
use chatlog_raft::network::{BOT_WORK_TIMEOUT, ForwardError};
use chatlog_wire::proto::node::v1::{ForwardedBotAnswer, ForwardedBotCall};
use prost::Message;
use serde_json::Value;

use super::{BotApi, BotError, CALL_TIMEOUT, Params, REQUEST_BODY_BYTES_MAX, methods};

/// How long the forwarding node waits for one node's answer. Why: the receiver answers
/// within [`CALL_TIMEOUT`] (the longest long poll, 50 s, plus 10 s to commit its
/// hand-out and read the events); 5 s more carry the answer back. The receiver's
/// transport gives up on the work only after `BOT_WORK_TIMEOUT` (70 s), so this side
/// decides and a call that may still run is never sent to a second node.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(CALL_TIMEOUT.as_secs() + 5);

const _: () = assert!(CALL_TIMEOUT.as_secs() < FORWARD_TIMEOUT.as_secs());
const _: () = assert!(FORWARD_TIMEOUT.as_secs() < BOT_WORK_TIMEOUT.as_secs());

/// Largest encoded `ForwardedBotCall`, in bytes. Why: its parameters come from a body of
/// at most [`REQUEST_BODY_BYTES_MAX`] (128 KiB) and a query string (hyper reads at most
/// about 400 KiB of head); re-encoded as JSON they can grow by escaping. 1 MiB holds any
/// call a client can make with room; the receiver checks it before decoding.
pub const CALL_BYTES_MAX: usize = 1 << 20;

const _: () = assert!(8 * REQUEST_BODY_BYTES_MAX <= CALL_BYTES_MAX);

/// Largest encoded `ForwardedBotAnswer`, in bytes. Why: it must fit in one node frame
/// (`NODE_FRAME_BYTES_MAX`, 16 MiB) with its envelope. A `getUpdates` answer of 100
/// updates with texts of 16 KiB fits unless most of their characters need JSON's
/// six-byte escapes; such an answer is refused (500) and the updates come again on the
/// next call, which can ask for fewer (`limit`).
pub const ANSWER_BYTES_MAX: usize =
    chatlog_wire::limits::NODE_FRAME_BYTES_MAX as usize - (64 << 10);

/// Where a call is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// On this node.
    Here,
    /// On a replica of `bot_group`, preferring one that serves every group of `needed`
    /// (the bot's first).
    Elsewhere {
        bot_group: GroupId,
        needed: Vec<GroupId>,
    },
}

impl BotApi {
    /// Whether this node serves a replica of `g` that may answer reads.
    fn serves(&self, g: GroupId) -> bool {
        self.node.serving_group(g).is_some()
    }

    /// The bot a token names (its `"{user_id}:"` prefix), if that id names a group; the
    /// token itself is checked where the call is answered.
    fn bot_of_token(&self, token: &str) -> Option<u64> {
        token
            .split_once(':')
            .and_then(|(id, _)| id.parse::<u64>().ok())
            .filter(|id| self.check_id(*id, "bot").is_ok())
    }

    /// Where the call with `token` and `params` is answered (see the module docs). A
    /// token or `chat_id` that names no group leaves the call here, which refuses it.
    pub(crate) fn route(&self, token: &str, params: &Params) -> Route {
        let Some(bot) = self.bot_of_token(token) else {
            return Route::Here;
        };
        let bot_group = group_of(bot);
        let mut needed = vec![bot_group];
        if let Ok(Some(chat)) = methods::u64_param(params, "chat_id")
            && self.check_id(chat, "chat").is_ok()
            && !needed.contains(&group_of(chat))
        {
            needed.push(group_of(chat));
        }
        if self.goes_elsewhere(&needed) {
            Route::Elsewhere { bot_group, needed }
        } else {
            Route::Here
        }
    }

    /// Whether a call needing `needed` (the bot's group first) is answered elsewhere.
    fn goes_elsewhere(&self, needed: &[GroupId]) -> bool {
        let bot_group = needed[0];
        if !self.serves(bot_group) {
            return self.node.served_elsewhere(bot_group);
        }
        // The bot's group is here: a chat's group only when another node has both.
        let lacking = needed[1..]
            .iter()
            .any(|g| !self.serves(*g) && self.node.served_elsewhere(*g));
        if !lacking {
            return false;
        }
        self.node.another_hosts_all(needed)
    }

    /// Answers a call on another node (see the module docs): what that node answered.
    pub(crate) async fn forward(
        &self,
        bot_group: GroupId,
        needed: &[GroupId],
        token: &str,
        method: &str,
        params: &Params,
        idempotency_header: Option<&str>,
    ) -> Result<Value, BotError> {
        let call = ForwardedBotCall {
            token: token.to_string(),
            method: method.to_string(),
            params_json: Value::Object(params.clone()).to_string(),
            idempotency_key: idempotency_header.map(str::to_owned),
            at_leader: false,
        };
        let targets = self.node.forward_targets(bot_group, needed);
        self.send_call(bot_group, &call, targets).await
    }

    /// Sends `call` for the bot's group `bot_group` to `targets` in order, until one
    /// takes it: what that node answered.
    async fn send_call(
        &self,
        bot_group: GroupId,
        call: &ForwardedBotCall,
        targets: Vec<u64>,
    ) -> Result<Value, BotError> {
        if call.encoded_len() > CALL_BYTES_MAX {
            return Err(BotError::new(
                413,
                format!(
                    "the call is over {CALL_BYTES_MAX} bytes, more than is forwarded to the \
                     node serving the bot"
                ),
            ));
        }
        let unavailable = |description: String| {
            let mut e = BotError::new(503, description);
            e.retry_after_s = Some(1);
            e
        };
        let Some(router) = self.node.router() else {
            return Err(unavailable(format!(
                "the bot's group {bot_group} is not served by this node"
            )));
        };
        let body = Bytes::from(call.encode_to_vec());
        let mut tried = Vec::new();
        for target in targets {
            match router
                .bot_request(target, bot_group, body.clone(), FORWARD_TIMEOUT)
                .await
            {
                Ok(bytes) => {
                    let (result, leader) = answer_of(target, &bytes);
                    self.node.note_leader(bot_group, leader);
                    return result;
                }
                Err(ForwardError::NotSent(detail)) => tried.push((target, detail)),
                Err(ForwardError::Unknown(detail)) => {
                    return Err(BotError::new(
                        503,
                        format!(
                            "forwarded to node {target}, no answer ({detail}): it may have \
                             been done"
                        ),
                    ));
                }
            }
        }
        let nodes: Vec<String> = tried.iter().map(|(n, _)| n.to_string()).collect();
        let why: Vec<String> = tried
            .iter()
            .map(|(n, detail)| format!("node {n}: {detail}"))
            .collect();
        Err(unavailable(if tried.is_empty() {
            format!("no other node serves the bot's group {bot_group}")
        } else {
            format!(
                "no node serving the bot's group {bot_group} took the call (tried nodes {}): {}",
                nodes.join(", "),
                why.join("; ")
            )
        }))
    }

    /// A call answered at the leader of the bot's group ([`answered_at_leader`]), made on
    /// a replica of that group that does not lead it: the leader's answer, or `None` to
    /// answer here (another method, this node leads or knows no leader, or the leader
    /// did not take the call: an answer here beats none).
    pub(crate) async fn at_leader_elsewhere(
        &self,
        token: &str,
        method: &str,
        params: &Params,
    ) -> Option<Result<Value, BotError>> {
        if !answered_at_leader(method) {
            return None;
        }
        let g = group_of(self.bot_of_token(token)?);
        let leader = self.node.serving_group(g)?.leader()?;
        if leader == self.node.node_id() {
            return None;
        }
        let call = ForwardedBotCall {
            token: token.to_string(),
            method: method.to_string(),
            params_json: Value::Object(params.clone()).to_string(),
            idempotency_key: None,
            at_leader: true,
        };
        match self.send_call(g, &call, vec![leader]).await {
            Err(e) if e.status == 503 => None,
            answered => Some(answered),
        }
    }

    /// Serves a call another node forwarded for group `g`, the bot's (the receiving
    /// side): answered here whatever it needs, never forwarded again but for a
    /// `getWebhookInfo` or `getUpdates` on a replica that does not lead the bot's group,
    /// which goes on once to the leader (`at_leader`). `Err` when this
    /// node cannot take it (no serving replica of `g`: the forwarder asks another) or
    /// for a body that is not a forwarded call.
    pub async fn serve_forwarded(&self, g: GroupId, body: Bytes) -> Result<Bytes, String> {
        if body.len() > CALL_BYTES_MAX {
            return Err(format!(
                "a forwarded bot call of {} bytes is over {CALL_BYTES_MAX}",
                body.len()
            ));
        }
        let call = ForwardedBotCall::decode(body)
            .map_err(|e| format!("a bad forwarded bot call for group {g}: {e}"))?;
        let params = match serde_json::from_str::<Value>(&call.params_json) {
            Ok(Value::Object(params)) => params,
            Ok(_) => return Err("a forwarded bot call's parameters are not an object".into()),
            Err(e) => return Err(format!("a forwarded bot call's parameters: {e}")),
        };
        if !self.serves(g) {
            return Err(format!(
                "node {} serves no replica of group {g} now",
                self.node.node_id()
            ));
        }
        let at_leader = if call.at_leader {
            None
        } else {
            self.at_leader_elsewhere(&call.token, &call.method, &params)
                .await
        };
        let result = match at_leader {
            Some(answered) => answered,
            None => {
                self.call_here(
                    &call.token,
                    &call.method,
                    &params,
                    call.idempotency_key.as_deref(),
                )
                .await
            }
        };
        let mut answer = encode_answer(result);
        answer.leader = self.node.group(g).and_then(|r| r.leader()).unwrap_or(0);
        Ok(Bytes::from(answer.encode_to_vec()))
    }
}

/// Whether `method` is answered by the leader of the bot's group wherever it is called:
/// `getWebhookInfo` (the webhook's last delivery error lives in memory on the node that
/// delivers, the leader: `webhook.rs`) and `getUpdates` (a new poll ends the bot's
/// waiting one, and only polls that meet on one node can: `BotApi::poll_slot`).
pub(crate) fn answered_at_leader(method: &str) -> bool {
    method.eq_ignore_ascii_case("getWebhookInfo") || method.eq_ignore_ascii_case("getUpdates")
}

/// The answer to send back for `result`, within [`ANSWER_BYTES_MAX`].
fn encode_answer(result: Result<Value, BotError>) -> ForwardedBotAnswer {
    let answer = match result {
        Ok(v) => ForwardedBotAnswer {
            status: 200,
            result_json: v.to_string(),
            ..ForwardedBotAnswer::default()
        },
        Err(e) => ForwardedBotAnswer {
            status: u32::from(e.status),
            description: e.description,
            retry_after_s: e.retry_after_s,
            ..ForwardedBotAnswer::default()
        },
    };
    let bytes = answer.encoded_len();
    if bytes <= ANSWER_BYTES_MAX {
        return answer;
    }
    let e = BotError::new(
        500,
        format!(
            "the answer is {bytes} bytes, over the {ANSWER_BYTES_MAX} a forwarded answer \
             carries; call the node serving the bot, or getUpdates with a smaller limit"
        ),
    );
    ForwardedBotAnswer {
        status: u32::from(e.status),
        description: e.description,
        ..ForwardedBotAnswer::default()
    }
}

/// The call's result from `target`'s encoded answer, as `target` gave it, and the
/// leader of the bot's group that `target` named (0: none).
fn answer_of(target: u64, bytes: &[u8]) -> (Result<Value, BotError>, u64) {
    if bytes.len() > ANSWER_BYTES_MAX {
        return (Err(bad_answer(target, format!("{} bytes", bytes.len()))), 0);
    }
    match ForwardedBotAnswer::decode(bytes) {
        Ok(answer) => {
            let leader = answer.leader;
            (result_of(target, answer), leader)
        }
        Err(e) => (Err(bad_answer(target, e.to_string())), 0),
    }
}

fn bad_answer(target: u64, what: String) -> BotError {
    BotError::new(
        500,
        format!("node {target} answered a forwarded bot call badly: {what}"),
    )
}

/// The call's result from `target`'s decoded answer.
fn result_of(target: u64, answer: ForwardedBotAnswer) -> Result<Value, BotError> {
    let bad = |what: String| bad_answer(target, what);
    let status = u16::try_from(answer.status)
        .ok()
        .filter(|s| (200..600).contains(s))
        .ok_or_else(|| bad(format!("status {}", answer.status)))?;
    if status == 200 {
        return serde_json::from_str(&answer.result_json).map_err(|e| bad(e.to_string()));
    }
    // As given there: the description carries its prefix already.
    Err(BotError {
        status,
        description: answer.description,
        retry_after_s: answer.retry_after_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_travel_unchanged() {
        let ok = encode_answer(Ok(serde_json::json!({"id": 7, "text": "hé"})));
        let back = answer_of(2, &ok.encode_to_vec()).0.expect("a result");
        assert_eq!(back, serde_json::json!({"id": 7, "text": "hé"}));
        let limited = BotError::rate_limited("sends", Duration::from_millis(1500));
        let refused = encode_answer(Err(limited.clone()));
        let back = answer_of(2, &refused.encode_to_vec())
            .0
            .expect_err("an error");
        assert_eq!(back, limited);
        assert_eq!(back.to_json(), limited.to_json());
        // The leader the receiver named comes back beside the result.
        let mut led = encode_answer(Ok(serde_json::json!(true)));
        led.leader = 3;
        assert_eq!(
            answer_of(2, &led.encode_to_vec()),
            (Ok(serde_json::json!(true)), 3)
        );
    }

    #[test]
    fn an_oversized_answer_is_refused_at_the_source() {
        let text = "\u{1}".repeat(ANSWER_BYTES_MAX / 6 + 1);
        let answer = encode_answer(Ok(Value::String(text)));
        assert_eq!(answer.status, 500);
        assert!(answer.description.contains("smaller limit"));
        assert!(answer.encoded_len() <= ANSWER_BYTES_MAX);
    }

    #[test]
    fn bad_answers_are_errors() {
        let weird = ForwardedBotAnswer {
            status: 42,
            ..ForwardedBotAnswer::default()
        };
        assert_eq!(
            answer_of(3, &weird.encode_to_vec())
                .0
                .expect_err("refused")
                .status,
            500
        );
        assert!(answer_of(3, b"\xff\xff\xff").0.is_err());
    }
}
