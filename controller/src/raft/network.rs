//! The Raft network over tonic: one lazily connected channel per peer, with the peer's
//! member id in every request so a member never acts on a message meant for another.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkV2};
use serde::Serialize;
use serde::de::DeserializeOwned;
use skiff_proto::v1::raft_internal_client::RaftInternalClient;
use skiff_proto::v1::{RaftReply, RaftRequest, SnapshotChunk};
use tonic::transport::{Channel, Endpoint};

use super::types::{Member, MemberId, Snapshot, TypeConfig, Vote};
use super::wire::{Kind as WireKind, WireClient, WireError};

/// Snapshot chunk size on the wire.
const SNAPSHOT_CHUNK: usize = 1024 * 1024;

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("bad peer address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("peer {addr} unreachable: {status}")]
    Unreachable { addr: String, status: tonic::Status },
    #[error("peer {addr} timed out")]
    Timeout { addr: String },
    #[error("peer {addr} refused: {message}")]
    Remote { addr: String, message: String },
    #[error("bad reply from {addr}: {reason}")]
    Decode { addr: String, reason: String },
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own types to JSON cannot fail: no maps with non-string keys, no
    // non-finite floats reach here (specs are validated).
    serde_json::to_vec(v).unwrap_or_else(|e| panic!("serializing a raft message: {e}"))
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// Builds tonic channels to members (mutual TLS with this member's certificate), shared by
/// the Raft network and write forwarding.
#[derive(Clone)]
pub struct Channels {
    /// Channels by address, made with the certificate of the TLS generation kept with them.
    cache: Arc<Mutex<(u64, HashMap<String, Channel>)>>,
    tls: Arc<skiff_tls::TlsContext>,
}

impl Channels {
    pub fn new(tls: Arc<skiff_tls::TlsContext>) -> Channels {
        Channels {
            cache: Arc::default(),
            tls,
        }
    }

    pub fn get(&self, addr: &str) -> Result<Channel, PeerError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // A renewed certificate: new connections (the old ones close once their calls end).
        let generation = self.tls.generation();
        if cache.0 != generation {
            *cache = (generation, HashMap::new());
        }
        if let Some(c) = cache.1.get(addr) {
            return Ok(c.clone());
        }
        let ch = self.fresh(addr)?;
        cache.1.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// A channel of its own (not cached): snapshots use one so a large transfer never
    /// delays heartbeats on the shared connection.
    pub fn fresh(&self, addr: &str) -> Result<Channel, PeerError> {
        let ep =
            Endpoint::from_shared(format!("http://{addr}")).map_err(|e| PeerError::BadAddress {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        let ep = ep
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        Ok(skiff_tls::net::channel_lazy(&self.tls, ep))
    }

    pub fn tls(&self) -> &Arc<skiff_tls::TlsContext> {
        &self.tls
    }

    pub fn client(&self, addr: &str) -> Result<RaftInternalClient<Channel>, PeerError> {
        Ok(RaftInternalClient::new(self.get(addr)?)
            .max_decoding_message_size(skiff_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(skiff_proto::MAX_MESSAGE_BYTES))
    }
}

/// Maps a tonic status from a peer to a [`PeerError`].
pub fn status_to_peer_error(addr: &str, status: tonic::Status) -> PeerError {
    match status.code() {
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => PeerError::Timeout {
            addr: addr.to_string(),
        },
        tonic::Code::Unavailable | tonic::Code::Unknown => PeerError::Unreachable {
            addr: addr.to_string(),
            status,
        },
        _ => PeerError::Remote {
            addr: addr.to_string(),
            message: status.message().to_string(),
        },
    }
}

/// Decodes a reply: the payload on success, the remote's error message otherwise.
pub fn decode_reply<T: DeserializeOwned>(addr: &str, reply: RaftReply) -> Result<T, PeerError> {
    if !reply.error.is_empty() {
        let message = decode::<String>(&reply.error).unwrap_or_else(|e| e);
        return Err(PeerError::Remote {
            addr: addr.to_string(),
            message,
        });
    }
    decode(&reply.payload).map_err(|reason| PeerError::Decode {
        addr: addr.to_string(),
        reason,
    })
}

/// Creates a [`PeerClient`] per replication target.
#[derive(Clone)]
pub struct NetworkFactory {
    pub(crate) me: MemberId,
    pub(crate) channels: Channels,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: MemberId, node: &Member) -> PeerClient {
        PeerClient {
            me: self.me,
            target,
            addr: node.rpc_addr.clone(),
            channels: self.channels.clone(),
            own_channel: false,
            wire: WireClient::new(self.channels.tls().clone(), node.rpc_addr.clone()),
        }
    }

    async fn new_snapshot_client(&mut self, target: MemberId, node: &Member) -> PeerClient {
        PeerClient {
            me: self.me,
            target,
            addr: node.rpc_addr.clone(),
            channels: self.channels.clone(),
            own_channel: true,
            wire: WireClient::new(self.channels.tls().clone(), node.rpc_addr.clone()),
        }
    }
}

/// The connection to one peer.
pub struct PeerClient {
    me: MemberId,
    target: MemberId,
    addr: String,
    channels: Channels,
    /// A channel of its own for each call (snapshots), else the shared one.
    own_channel: bool,
    /// AppendEntries, Vote and PreVote go over the members' own transport when the peer
    /// serves it.
    wire: WireClient,
}

fn to_rpc_error(e: PeerError) -> RPCError<TypeConfig> {
    match e {
        PeerError::Timeout { .. }
        | PeerError::Unreachable { .. }
        | PeerError::BadAddress { .. }
        | PeerError::Remote { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        PeerError::Decode { .. } => RPCError::Network(NetworkError::new(&e)),
    }
}

impl PeerClient {
    /// Calls the peer over the members' own transport, or with `grpc` when it does not serve
    /// it.
    async fn call_wire_or<Req, Resp, F, Fut>(
        &mut self,
        kind: WireKind,
        body: &Req,
        option: &RPCOption,
        grpc: F,
    ) -> Result<Resp, PeerError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftInternalClient<Channel>, tonic::Request<RaftRequest>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftReply>, tonic::Status>>,
    {
        if self.wire.usable() {
            match self
                .wire
                .call(kind, self.target, self.me, body, option.soft_ttl())
                .await
            {
                Ok(r) => return Ok(r),
                Err(WireError::Peer(e)) => return Err(e),
                Err(WireError::Unsupported) => {}
            }
        }
        self.call(body, option, grpc).await
    }

    fn client(&self) -> Result<RaftInternalClient<Channel>, PeerError> {
        let ch = if self.own_channel {
            self.channels.fresh(&self.addr)?
        } else {
            self.channels.get(&self.addr)?
        };
        Ok(RaftInternalClient::new(ch)
            .max_decoding_message_size(skiff_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(skiff_proto::MAX_MESSAGE_BYTES))
    }

    fn request<T: Serialize>(&self, body: &T, ttl: Duration) -> tonic::Request<RaftRequest> {
        let mut req = tonic::Request::new(RaftRequest {
            target: self.target,
            from: self.me,
            payload: encode(body),
        });
        req.set_timeout(ttl);
        req
    }

    async fn call<Req, Resp, F, Fut>(
        &self,
        body: &Req,
        option: &RPCOption,
        f: F,
    ) -> Result<Resp, PeerError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftInternalClient<Channel>, tonic::Request<RaftRequest>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftReply>, tonic::Status>>,
    {
        let client = self.client()?;
        let req = self.request(body, option.soft_ttl());
        let reply = f(client, req)
            .await
            .map_err(|s| status_to_peer_error(&self.addr, s))?;
        decode_reply(&self.addr, reply.into_inner())
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = super::types::SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call_wire_or(WireKind::Append, &rpc, &option, |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
        .map_err(|e| match e {
            PeerError::Timeout { .. } => RPCError::Timeout(Timeout {
                action: openraft::network::RPCTypes::AppendEntries,
                id: self.me,
                target: self.target,
                timeout: option.soft_ttl(),
            }),
            e => to_rpc_error(e),
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call_wire_or(WireKind::Vote, &rpc, &option, |mut c, r| async move {
            c.vote(r).await
        })
        .await
        .map_err(to_rpc_error)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call_wire_or(WireKind::PreVote, &rpc, &option, |mut c, r| async move {
            c.pre_vote(r).await
        })
        .await
        .map_err(to_rpc_error)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self
            .client()
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        let header = encode(&(vote, snapshot.meta.clone()));
        let data = snapshot.snapshot;
        let mut chunks = Vec::with_capacity(data.len() / SNAPSHOT_CHUNK + 1);
        let mut first = true;
        let mut rest: &[u8] = &data;
        loop {
            let n = rest.len().min(SNAPSHOT_CHUNK);
            chunks.push(SnapshotChunk {
                target: self.target,
                from: self.me,
                header: if first { header.clone() } else { Vec::new() },
                data: rest[..n].to_vec(),
            });
            first = false;
            rest = &rest[n..];
            if rest.is_empty() {
                break;
            }
        }
        let mut req = tonic::Request::new(tokio_stream::iter(chunks));
        req.set_timeout(option.hard_ttl().max(Duration::from_secs(30)));
        let addr = self.addr.clone();
        let call = async move { client.install_snapshot(req).await };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = call => {
                let reply = res.map_err(|s| StreamingError::Unreachable(Unreachable::new(&status_to_peer_error(&addr, s))))?;
                decode_reply(&addr, reply.into_inner())
                    .map_err(|e| StreamingError::Network(NetworkError::new(&e)))
            }
        }
    }
}
