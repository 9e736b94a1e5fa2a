//! The admin API: HTTP/1.1 with JSON bodies over a Unix socket, and its client for the CLI.
//!
//! Routes: `GET /v1/status` → [`StatusReport`]. The socket is created by the running agent
//! (removing a stale one first) and removed when it exits.

use std::{convert::Infallible, io, path::Path, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};

use crate::status::StatusReport;

/// Why the admin API could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on admin socket {path}: {cause}")]
    Listen { path: String, cause: io::Error },
    #[error("cannot reach the agent at {path}: {cause} (is `mesh-agent run` running with this --admin-socket?)")]
    Connect { path: String, cause: io::Error },
    #[error("admin API request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("admin API answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("admin API sent an unreadable answer: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Produces the status report on demand.
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> Result<StatusReport, String>;
}

/// Binds the admin socket; `serve` then answers on it.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |cause| AdminError::Listen {
        path: path.display().to_string(),
        cause,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    UnixListener::bind(path).map_err(err)
}

/// Answers admin requests until the task is dropped.
pub async fn serve(listener: UnixListener, cause: Arc<dyn StatusSource>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin socket accept failed");
                continue;
            }
        };
        let cause = Arc::clone(&cause);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let cause = Arc::clone(&cause);
                async move { Ok::<_, Infallible>(route(&request, cause.as_ref())) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

fn route(request: &Request<Incoming>, cause: &dyn StatusSource) -> Response<Full<Bytes>> {
    match (request.method().as_str(), request.uri().path()) {
        ("GET", "/v1/status") => match cause.status() {
            Ok(report) => match serde_json::to_vec(&report) {
                Ok(body) => respond(StatusCode::OK, body),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.to_string().into_bytes(),
                ),
            },
            Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, e.into_bytes()),
        },
        _ => respond(StatusCode::NOT_FOUND, b"no such route\n".to_vec()),
    }
}

fn respond(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Fetches the status from a running agent.
pub async fn fetch_status(socket: &Path) -> Result<StatusReport, AdminError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|cause| AdminError::Connect {
            path: socket.display().to_string(),
            cause,
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get("/v1/status")
        .header("host", "mesh-agent")
        .body(Full::new(Bytes::new()))
        .map_err(|e| AdminError::Status {
            status: StatusCode::BAD_REQUEST,
            body: e.to_string(),
        })?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(AdminError::Status {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(serde_json::from_slice(&body)?)
}
