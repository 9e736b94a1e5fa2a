//! The admin API: HTTP/1.1 with JSON bodies over a Unix socket (server here, client in
//! [`client`]). The socket is created by the running agent (a stale one is removed first) and
//! removed when it exits.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /v1/status` | [`StatusReport`]: node, services, counters |
//! | `GET /v1/services` | `[ServiceStatus]` |
//! | `GET /v1/endpoints` | `[EndpointStatus]`: every backend with its state and connection count |
//! | `GET /v1/nodes` | `[NodeStatus]`: this node and every gossip member, alive or dead |
//! | `POST /v1/endpoints/register?service=&address=&weight=` | [`Changed`]: announce an endpoint this node hosts |
//! | `POST /v1/endpoints/deregister?service=&address=` | [`Changed`]: withdraw a registered endpoint |
//! | `GET /v1/policies` | `[PolicyStatus]`: the authorization rules in force (`[]` without mTLS) |
//! | `GET /v1/certs` | `[CertStatus]`: certificates loaded: identity, serial, expiry (`[]` without mTLS) |
//! | `GET /v1/flows?service=&verdict=&identity=&limit=&follow=` | recent flows as NDJSON; with `follow=true` the response stays open and streams new flows |
//! | `GET /v1/applied` | [`Applied`] as NDJSON, the latest first, then one line per write of the kernel maps (stays open) |
//! | `POST /v1/log-level?filter=` | [`Changed`]: the log filter (`RUST_LOG` syntax) from now on |
//! | `POST /v1/takeover` with `Upgrade: mesh-takeover/1` | root only: `101`, then the connection carries the [`takeover`] protocol |

pub mod client;
pub mod takeover;
pub mod types;

use std::{convert::Infallible, io, net::SocketAddr, path::Path, sync::Arc};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{wrappers::BroadcastStream, StreamExt as _};

use self::takeover::Successor;

use crate::{
    admin::types::{EndpointStatus, NodeStatus, StatusReport},
    catalog::Endpoint,
    telemetry::{
        applied::{Applied, AppliedFeed},
        flows::{FlowFilter, FlowLog},
    },
};

/// Why the admin API could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on admin socket {path}: {cause}")]
    Listen { path: String, cause: io::Error },
    #[error("cannot reach the agent at {path}: {cause} (is `mesh-agent run` running with this --admin-socket?)")]
    Connect { path: String, cause: io::Error },
    #[error("admin API request failed")]
    Http(#[from] hyper::Error),
    #[error("admin API answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("admin API sent an unreadable answer")]
    Decode(#[from] serde_json::Error),
}

/// What the admin API shows of the running agent.
pub trait AgentView: Send + Sync + 'static {
    fn status(&self) -> Result<StatusReport, String>;
    fn endpoints(&self) -> Result<Vec<EndpointStatus>, String>;
    fn nodes(&self) -> Vec<NodeStatus>;
    fn flows(&self) -> &FlowLog;
    /// The agent's writes of the kernel maps.
    fn applied(&self) -> Arc<AppliedFeed>;
    /// Adds (or reweights) an endpoint this node announces; whether anything changed.
    fn register(&self, endpoint: Endpoint) -> Result<bool, String>;
    /// Withdraws a registered endpoint; whether it was registered.
    fn deregister(&self, service: &str, address: SocketAddr) -> Result<bool, String>;
    fn policies(&self) -> Vec<crate::admin::types::PolicyStatus>;
    fn certs(&self) -> Vec<crate::tunnel::identity::certs::CertStatus>;
    /// Hands the agent's sockets to `successor` (the agent then drains); an error when a
    /// takeover is already under way.
    fn take_over(&self, successor: Successor) -> Result<(), String>;
}

/// Query of the `register` and `deregister` routes.
#[derive(Debug, Serialize, Deserialize)]
pub struct EndpointQuery {
    pub service: String,
    pub address: SocketAddr,
    /// `register` only (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// The query of `POST /v1/log-level`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLevelQuery {
    /// `RUST_LOG` syntax: `debug`, `info,mesh_agent::gossip=debug`.
    pub filter: String,
}

/// Answer of the `register` and `deregister` routes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Changed {
    pub changed: bool,
}

/// Query of `GET /v1/flows`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FlowQuery {
    #[serde(flatten)]
    pub filter: FlowFilter,
    /// Most recent flows to send first (default 100).
    pub limit: Option<usize>,
    /// Keep the response open and stream new flows.
    #[serde(default)]
    pub follow: bool,
}

type Body = BoxBody<Bytes, Infallible>;

/// Admin changes refused because the caller was not root (named in each refusal's log line).
static REFUSED_CHANGES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Binds the admin socket (non-blocking), mode 0600 whatever the umask, in a directory
/// created 0700 if missing; `serve` then answers on it.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, AdminError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let err = |cause| AdminError::Listen {
        path: path.display().to_string(),
        cause,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // The socket is created with the umask's mode: make that 0600 for the bind (other
    // threads' files meanwhile only come out stricter), and set it explicitly after.
    // SAFETY: umask only changes this process's file-creation mask.
    let previous = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(previous) };
    let listener = bound.map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

/// Answers admin requests until the task is dropped.
pub async fn serve(listener: UnixListener, agent: Arc<dyn AgentView>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin socket accept failed");
                continue;
            }
        };
        // Who is calling (the socket file is root's; a takeover checks it again).
        let caller = stream.peer_cred().ok();
        let agent = Arc::clone(&agent);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let agent = Arc::clone(&agent);
                async move {
                    Ok::<_, Infallible>(if request.uri().path() == takeover::PATH {
                        take_over(request, caller, agent)
                    } else {
                        answer(request, caller, agent).await
                    })
                }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

/// Answers on a blocking thread: reports are computed from the published view (at 20,000
/// services that takes a while) and a registration waits for the controller, neither on the
/// runtime's thread that gossip and the other requests share.
async fn answer(
    request: Request<Incoming>,
    caller: Option<tokio::net::unix::UCred>,
    agent: Arc<dyn AgentView>,
) -> Response<Body> {
    match tokio::task::spawn_blocking(move || route(&request, caller, agent)).await {
        Ok(response) => response,
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request failed inside the agent\n",
        ),
    }
}

fn route(
    request: &Request<Incoming>,
    caller: Option<tokio::net::unix::UCred>,
    agent: Arc<dyn AgentView>,
) -> Response<Body> {
    if request.method() == hyper::Method::POST {
        // Changes are root's, whoever could open the socket.
        if caller.is_none_or(|c| c.uid() != 0) {
            let refused = REFUSED_CHANGES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            tracing::warn!(
                ?caller,
                refused,
                path = request.uri().path(),
                "refused an admin change: the caller is not root"
            );
            return text(StatusCode::FORBIDDEN, "only root may change the agent\n");
        }
        return post(request, agent.as_ref());
    }
    if request.method() != hyper::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
    }
    match request.uri().path() {
        "/v1/status" => json(agent.status()),
        "/v1/services" => json(agent.status().map(|s| s.services)),
        "/v1/endpoints" => json(agent.endpoints()),
        "/v1/nodes" => json(Ok::<_, String>(agent.nodes())),
        "/v1/policies" => json(Ok::<_, String>(agent.policies())),
        "/v1/certs" => json(Ok::<_, String>(agent.certs())),
        "/v1/flows" => {
            match serde_urlencoded::from_str::<FlowQuery>(request.uri().query().unwrap_or_default())
            {
                Ok(query) => flows(&agent, query),
                Err(e) => text(StatusCode::BAD_REQUEST, &format!("bad flows query: {e}\n")),
            }
        }
        "/v1/applied" => ndjson(Vec::<Applied>::new(), Some(agent.applied().follow())),
        _ => text(StatusCode::NOT_FOUND, "no such route\n"),
    }
}

/// `POST /v1/takeover`: checks the caller and the upgrade, answers `101` and gives the
/// upgraded connection to the agent.
fn take_over(
    mut request: Request<Incoming>,
    caller: Option<tokio::net::unix::UCred>,
    agent: Arc<dyn AgentView>,
) -> Response<Body> {
    if request.method() != hyper::Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only POST is served\n");
    }
    let Some(caller) = caller.filter(|c| c.uid() == 0) else {
        tracing::warn!(?caller, "refused a takeover: the caller is not root");
        return text(StatusCode::FORBIDDEN, "only root may take over the agent\n");
    };
    let upgrade = request.headers().get(header::UPGRADE);
    if upgrade.is_none_or(|u| u.as_bytes() != takeover::PROTOCOL.as_bytes()) {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("a takeover needs Upgrade: {}\n", takeover::PROTOCOL),
        );
    }
    let pid = caller.pid().and_then(|p| u32::try_from(p).ok());
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let (stream, early) = match upgrade.await.map(|u| u.downcast::<TokioIo<UnixStream>>()) {
            Ok(Ok(parts)) => (parts.io.into_inner(), parts.read_buf),
            Ok(Err(_)) => {
                tracing::warn!("takeover: the connection did not upgrade as expected");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "takeover: the connection did not upgrade");
                return;
            }
        };
        let successor = match Successor::asking(stream, early, pid).await {
            Ok(successor) => successor,
            Err(error) => {
                tracing::warn!(?pid, %error, "takeover: the successor did not ask");
                return;
            }
        };
        if let Err(error) = agent.take_over(successor) {
            tracing::warn!(?pid, error, "refused a takeover");
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        header::UPGRADE,
        header::HeaderValue::from_static(takeover::PROTOCOL),
    );
    response
}

/// The `POST` routes: registering endpoints, the log filter.
fn post(request: &Request<Incoming>, agent: &dyn AgentView) -> Response<Body> {
    let query = request.uri().query().unwrap_or_default();
    if request.uri().path() == "/v1/log-level" {
        return match serde_urlencoded::from_str::<LogLevelQuery>(query) {
            Ok(q) => match crate::telemetry::log_level::set(&q.filter) {
                Ok(()) => json(Ok::<_, String>(Changed { changed: true })),
                Err(e) => text(StatusCode::BAD_REQUEST, &format!("log filter {e}\n")),
            },
            Err(e) => text(
                StatusCode::BAD_REQUEST,
                &format!("bad log-level query: {e}\n"),
            ),
        };
    }
    let parsed = serde_urlencoded::from_str::<EndpointQuery>(query);
    let result = match (request.uri().path(), parsed) {
        (path, Err(e)) if path.starts_with("/v1/endpoints/") => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("bad endpoint query: {e}\n"),
            );
        }
        ("/v1/endpoints/register", Ok(q)) => agent.register(Endpoint {
            service: q.service.into(),
            address: q.address,
            weight: q.weight.unwrap_or(1),
        }),
        ("/v1/endpoints/deregister", Ok(q)) => agent.deregister(&q.service, q.address),
        _ => return text(StatusCode::NOT_FOUND, "no such route\n"),
    };
    match result {
        Ok(changed) => json(Ok::<_, String>(Changed { changed })),
        Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
    }
}

/// Recent flows as NDJSON, then (when following) every new one as it happens.
fn flows(agent: &Arc<dyn AgentView>, query: FlowQuery) -> Response<Body> {
    let limit = query.limit.unwrap_or(100);
    // Subscribe before reading the history so nothing falls between the two.
    let live = agent.flows().subscribe();
    let recent = agent.flows().recent(&query.filter, limit);
    let filter = query.filter;
    let updates = query.follow.then(|| {
        BroadcastStream::new(live).filter_map(move |flow| {
            // A lagging follower skips what it missed rather than slowing anyone down.
            let flow = flow.ok()?;
            filter.matches(&flow).then_some(flow)
        })
    });
    ndjson(recent, updates)
}

/// An NDJSON answer: one line per item of `first`, then, when given, one per item of `live`
/// as it comes (the response then stays open until the stream ends or the client goes).
fn ndjson<T, S>(first: Vec<T>, live: Option<S>) -> Response<Body>
where
    T: Serialize,
    S: tokio_stream::Stream<Item = T> + Send + Sync + 'static,
{
    let line = |item: &T| {
        let mut line = serde_json::to_vec(item).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, Infallible>(Frame::data(Bytes::from(line)))
    };
    let history = tokio_stream::iter(first.iter().map(line).collect::<Vec<_>>());
    let body: Body = match live {
        Some(live) => StreamBody::new(history.chain(live.map(move |item| line(&item)))).boxed(),
        None => StreamBody::new(history).boxed(),
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

fn json<T: Serialize>(result: Result<T, String>) -> Response<Body> {
    match result.and_then(|value| serde_json::to_vec(&value).map_err(|e| e.to_string())) {
        Ok(body) => {
            let mut response = respond(StatusCode::OK, body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    respond(status, body.as_bytes().to_vec())
}

fn respond(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response
}
