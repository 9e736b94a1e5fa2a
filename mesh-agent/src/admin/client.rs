//! The admin API's client, used by the CLI (`status`, `services`, `endpoints`, `nodes`,
//! `policies`, `certs`, `flows`).

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::{AdminError, FlowQuery};
use crate::telemetry::flows::Flow;

/// Sends `GET path` to the agent and returns the response once its status is a success.
async fn get(socket: &Path, path: &str) -> Result<Response<Incoming>, AdminError> {
    request(hyper::Method::GET, socket, path).await
}

/// Sends `METHOD path` to the agent and returns the response once its status is a success.
async fn request(
    method: hyper::Method,
    socket: &Path,
    path: &str,
) -> Result<Response<Incoming>, AdminError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|cause| AdminError::Connect {
            path: socket.display().to_string(),
            cause,
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "mesh-agent")
        .body(Full::new(Bytes::new()))
        .map_err(|e| AdminError::Status {
            status: hyper::StatusCode::BAD_REQUEST,
            body: e.to_string(),
        })?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.into_body().collect().await?.to_bytes();
    Err(AdminError::Status {
        status,
        body: String::from_utf8_lossy(&body).trim().to_owned(),
    })
}

/// Fetches one JSON document.
pub async fn fetch<T: DeserializeOwned>(socket: &Path, path: &str) -> Result<T, AdminError> {
    let body = get(socket, path).await?.into_body().collect().await?;
    Ok(serde_json::from_slice(&body.to_bytes())?)
}

/// Sends `POST path` and decodes the JSON answer.
pub async fn post<T: DeserializeOwned>(socket: &Path, path: &str) -> Result<T, AdminError> {
    let body = request(hyper::Method::POST, socket, path)
        .await?
        .into_body()
        .collect()
        .await?;
    Ok(serde_json::from_slice(&body.to_bytes())?)
}

/// Streams flows to `each` as they arrive, until the agent closes the stream (without
/// `follow`: after the recent ones).
pub async fn flows(
    socket: &Path,
    query: &FlowQuery,
    mut each: impl FnMut(Flow),
) -> Result<(), AdminError> {
    let query = serde_urlencoded::to_string(query).map_err(|e| AdminError::Status {
        status: hyper::StatusCode::BAD_REQUEST,
        body: e.to_string(),
    })?;
    let mut body = get(socket, &format!("/v1/flows?{query}"))
        .await?
        .into_body();
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            each(serde_json::from_slice(&line)?);
        }
    }
    Ok(())
}
