//! Bot accounts over the binary protocol: `create_bot`, `list_bots`, `reset_bot_token`
//! (answered by the chat service for an authenticated user, the bot's owner).
//!
//! What it owns: making tokens (`"{user_id}:{secret}"`, only the secret's SHA-256 is
//! proposed) and reading the owner's bots. What it must not do: check the caller's
//! session (the service did) or decide who owns what (the state machine does).

use chatlog_raft::chat::bot::BotCommand;
use chatlog_raft::chat::{Command, Outcome, UserId, group_of_name};
use chatlog_raft::node::Node;
use chatlog_wire::proto::v1::{self, ErrorCode, response::Kind as Resp};

use super::{hash_secret, new_secret};
use crate::service::convert::{bad, error, propose_error, refusal};

async fn propose(node: &Node, group: u64, cmd: Command) -> Result<Outcome, v1::Error> {
    match node.propose(group, cmd).await.map_err(propose_error)? {
        Outcome::Refused(r) => Err(refusal(r)),
        o => Ok(o),
    }
}

/// `create_bot`: a bot user named `r.name`, owned by `owner`, in its name's group.
pub async fn create_bot(
    node: &Node,
    owner: UserId,
    r: v1::CreateBotRequest,
) -> Result<Resp, v1::Error> {
    if !chatlog_raft::chat::state::valid_user_name(&r.name) {
        return Err(bad(format!(
            "bot name {:?} is not 1 to 32 bytes of a-z, 0-9 and _",
            r.name
        )));
    }
    let group = 1 + group_of_name(&r.name, node.config().groups);
    let secret = new_secret();
    let o = propose(
        node,
        group,
        Command::Bot(BotCommand::Create {
            owner,
            name: r.name,
            token_hash: hash_secret(&secret),
        }),
    )
    .await?;
    let Outcome::UserCreated { user } = o else {
        return Err(error(ErrorCode::Internal, format!("unexpected {o:?}")));
    };
    Ok(Resp::CreateBot(v1::CreateBotResponse {
        user_id: user,
        token: format!("{user}:{secret}"),
    }))
}

/// `reset_bot_token`: a new token for one of `owner`'s bots; the old one stops working.
pub async fn reset_bot_token(
    node: &Node,
    owner: UserId,
    r: v1::ResetBotTokenRequest,
) -> Result<Resp, v1::Error> {
    let g = chatlog_raft::chat::group_of(r.bot_id);
    if r.bot_id == 0 || g == 0 || g > node.config().groups {
        return Err(error(ErrorCode::NotFound, format!("no bot {}", r.bot_id)));
    }
    let secret = new_secret();
    propose(
        node,
        g,
        Command::Bot(BotCommand::SetToken {
            bot: r.bot_id,
            owner,
            token_hash: hash_secret(&secret),
        }),
    )
    .await?;
    Ok(Resp::ResetBotToken(v1::CreateBotResponse {
        user_id: r.bot_id,
        token: format!("{}:{secret}", r.bot_id),
    }))
}

/// `list_bots`: the bots `owner` owns, from every group this node hosts.
pub fn list_bots(node: &Node, owner: UserId) -> Result<Resp, v1::Error> {
    let mut bots = Vec::new();
    for g in node.groups() {
        let st = g.shared().read();
        for (id, b) in st.bots().iter().filter(|(_, b)| b.owner() == owner) {
            bots.push(v1::BotInfo {
                user_id: id,
                name: st.user(id).map(|u| u.name).unwrap_or_default(),
                webhook_url: b.webhook().map(|w| w.url.clone()).unwrap_or_default(),
                pending_update_count: b.pending_updates(),
            });
        }
    }
    bots.sort_by_key(|b| b.user_id);
    Ok(Resp::ListBots(v1::ListBotsResponse { bots }))
}
