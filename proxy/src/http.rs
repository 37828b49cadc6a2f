//! HTTP awareness for the workload's ports that say `protocol = "http"`: the inbound side
//! serves HTTP/1 and HTTP/2 (told apart by the connection preface) and forwards each request
//! to the workload on 127.0.0.1 in the version it came in, recording per request its status
//! class and latency by caller, so that a rollout can compare versions (the proxy knows the
//! version of the workload it fronts).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::serve::Proxy;

type Body = BoxBody<Bytes, hyper::Error>;

/// Connections to the workload, pooled: one client per HTTP version.
pub struct AppClients {
    http1: Client<HttpConnector, Incoming>,
    http2: Client<HttpConnector, Incoming>,
}

impl Default for AppClients {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        AppClients {
            http1: Client::builder(TokioExecutor::new()).build(connector.clone()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
        }
    }
}

/// The status class a response counts under (`error`: the workload could not be reached).
pub fn class(status: Option<StatusCode>) -> &'static str {
    match status.map(|s| s.as_u16() / 100) {
        Some(1) => "1xx",
        Some(2) => "2xx",
        Some(3) => "3xx",
        Some(4) => "4xx",
        Some(5) => "5xx",
        _ => "error",
    }
}

fn bad_gateway(why: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("skiff mesh: {why}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// The workload's response, or why there is none.
async fn forward(
    p: &Proxy,
    mut req: Request<Incoming>,
    port: u16,
) -> Result<Response<Body>, &'static str> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let uri = format!("http://127.0.0.1:{port}{path}")
        .parse::<Uri>()
        .map_err(|_| "bad request target")?;
    *req.uri_mut() = uri;
    let client = if req.version() == Version::HTTP_2 {
        &p.http.http2
    } else {
        &p.http.http1
    };
    match client.request(req).await {
        Ok(r) => Ok(r.map(|b| b.boxed())),
        Err(e) => {
            debug!(error = %e, "the workload did not answer");
            Err("the workload did not answer")
        }
    }
}

/// Serves one inbound connection (already past TLS and `allow_from`) from `source`.
pub async fn serve<S>(p: Arc<Proxy>, io: S, port: u16, source: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let (p, source) = (p.clone(), source.clone());
        async move {
            let start = Instant::now();
            let (resp, status) = match forward(&p, req, port).await {
                Ok(r) => {
                    let s = r.status();
                    (r, Some(s))
                }
                Err(why) => (bad_gateway(why), None),
            };
            p.metrics.request(&source, class(status), start.elapsed());
            Ok::<_, Infallible>(resp)
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        debug!(error = %e, "HTTP connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(class(Some(StatusCode::OK)), "2xx");
        assert_eq!(class(Some(StatusCode::NOT_FOUND)), "4xx");
        assert_eq!(class(Some(StatusCode::SERVICE_UNAVAILABLE)), "5xx");
        assert_eq!(class(None), "error");
    }
}
