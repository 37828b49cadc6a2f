//! Authorization of every gRPC call, as a tower layer on the server: the method's path says
//! what it needs ([`Need`]), the client certificate says who calls. The certificate's
//! revocation and expiry are checked on every call, so they apply to open connections too.
//! The caller's [`Peer`] is put in the request's extensions for handlers that must check
//! more (a node acts only as itself).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::context::TlsContext;
use crate::identity::{Identity, Need};
use crate::pki::{CertInfo, now_unix, parse_cert};

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub identity: Identity,
    pub serial: String,
}

/// The caller of a request, when it presented a certificate.
pub fn peer_of<T>(req: &tonic::Request<T>) -> Option<&Peer> {
    req.extensions().get::<Peer>()
}

/// Maps a method path (`/skiff.v1.Jobs/ApplyJob`) to what it needs.
pub type Policy = fn(&str) -> Need;

#[derive(Clone)]
pub struct AuthzLayer {
    ctx: Arc<TlsContext>,
    policy: Policy,
    cache: Arc<Mutex<HashMap<Vec<u8>, CertInfo>>>,
}

impl AuthzLayer {
    pub fn new(ctx: Arc<TlsContext>, policy: Policy) -> AuthzLayer {
        AuthzLayer {
            ctx,
            policy,
            cache: Arc::default(),
        }
    }

    fn info(&self, der: &[u8]) -> Result<CertInfo, String> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = cache.get(der) {
            return Ok(i.clone());
        }
        let info = parse_cert(der).map_err(|e| e.to_string())?;
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(der.to_vec(), info.clone());
        Ok(info)
    }

    /// The caller's identity if it may call `path`, else the status to answer.
    pub fn check(&self, path: &str, leaf: Option<&[u8]>) -> Result<Option<Peer>, tonic::Status> {
        let need = (self.policy)(path);
        let Some(der) = leaf else {
            return if need == Need::Nothing {
                Ok(None)
            } else {
                Err(tonic::Status::unauthenticated(
                    "a client certificate from the cluster CA is required",
                ))
            };
        };
        let info = self
            .info(der)
            .map_err(|e| tonic::Status::unauthenticated(format!("client certificate: {e}")))?;
        if self.ctx.is_revoked(&info.serial) {
            return Err(tonic::Status::unauthenticated(format!(
                "certificate {} of {} is revoked",
                info.serial, info.identity
            )));
        }
        if info.not_after <= now_unix() {
            return Err(tonic::Status::unauthenticated(format!(
                "certificate {} of {} has expired",
                info.serial, info.identity
            )));
        }
        if !info.identity.satisfies(need) {
            return Err(tonic::Status::permission_denied(format!(
                "{} may not call {path} (it needs {})",
                info.identity,
                need_str(need)
            )));
        }
        Ok(Some(Peer {
            identity: info.identity,
            serial: info.serial,
        }))
    }
}

fn need_str(need: Need) -> &'static str {
    match need {
        Need::Nothing => "nothing",
        Need::Member => "a controller member",
        Need::Node => "a node",
        Need::Reader => "the reader role",
        Need::Operator => "the operator role",
        Need::Admin => "the admin role",
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            layer: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Authz<S> {
    layer: AuthzLayer,
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let info = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .cloned();
        let certs = info.as_ref().and_then(|i| i.peer_certs());
        let leaf = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
        let path = req.uri().path().to_string();
        match self.layer.check(&path, leaf) {
            Ok(peer) => {
                if let Some(peer) = peer {
                    req.extensions_mut().insert(peer);
                }
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(req).await })
            }
            Err(status) => {
                let remote = info.as_ref().and_then(|i| i.get_ref().remote_addr());
                tracing::warn!(path, remote = ?remote, reason = %status.message(), "call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
