//! The framing of one tunneled flow: an HTTP/2 `CONNECT` request whose authority is the
//! backend (`10.0.1.5:8080`, `[fd00::5]:8080`), as Istio's HBONE does, plus a header naming the
//! service the client called. A health probe of a backend is the same request with a
//! [`PROBE_HEADER`]: the receiving agent runs the check itself and answers with its outcome.
//! This module builds the request on the sending side and checks every part of it on the
//! receiving side.

use std::net::SocketAddr;

use http::{Method, Request, StatusCode};

/// The header naming the service the client's kernel balanced the flow for.
pub const SERVICE_HEADER: &str = "mesh-service";

/// Marks a request as a health probe of the backend (value `1`), not a flow.
pub const PROBE_HEADER: &str = "mesh-probe";

/// Why a probe failed, in the answer of the agent that ran it.
pub const PROBE_ERROR_HEADER: &str = "mesh-probe-error";

/// The request that has the agent in front of `backend` (a backend of `service`) probe it.
pub fn probe_request(backend: SocketAddr, service: &str) -> Request<()> {
    let mut request = self::request(backend, Some(service));
    request
        .headers_mut()
        .insert(PROBE_HEADER, http::HeaderValue::from_static("1"));
    request
}

/// Whether a received request is a health probe.
pub fn is_probe<T>(request: &Request<T>) -> bool {
    request
        .headers()
        .get(PROBE_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1")
}

/// The request that opens a flow to `backend`.
pub fn request(backend: SocketAddr, service: Option<&str>) -> Request<()> {
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .uri(backend.to_string());
    if let Some(service) = service {
        builder = builder.header(SERVICE_HEADER, service);
    }
    // A SocketAddr always prints as an authority and a service name is a DNS label.
    builder
        .body(())
        .expect("a CONNECT request to an address is well formed")
}

/// What a well-formed request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub backend: SocketAddr,
    pub service: Option<String>,
}

/// Why a request was refused, before any policy or catalog lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("the request has no authority")]
    NoAuthority,
    #[error("authority {0:?} is not an IP:port")]
    Authority(String),
    #[error("a CONNECT request carries no path or scheme (got {0:?})")]
    Path(String),
    #[error("header {SERVICE_HEADER} is not a service name")]
    Service,
}

impl FrameError {
    /// The status answered for it.
    pub fn status(&self) -> StatusCode {
        match self {
            FrameError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks a received request.
pub fn parse<T>(request: &Request<T>) -> Result<Target, FrameError> {
    if request.method() != Method::CONNECT {
        return Err(FrameError::Method(request.method().to_string()));
    }
    let uri = request.uri();
    if uri.scheme().is_some()
        || uri
            .path_and_query()
            .is_some_and(|p| !p.as_str().is_empty() && p.as_str() != "/")
    {
        return Err(FrameError::Path(uri.to_string()));
    }
    let authority = uri.authority().ok_or(FrameError::NoAuthority)?;
    let backend: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| FrameError::Authority(authority.to_string()))?;
    if backend.port() == 0 || backend.ip().is_unspecified() || backend.ip().is_multicast() {
        return Err(FrameError::Authority(authority.to_string()));
    }
    let service = match request.headers().get(SERVICE_HEADER) {
        None => None,
        Some(value) => {
            let name = value.to_str().map_err(|_| FrameError::Service)?;
            let valid = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(FrameError::Service);
            }
            Some(name.to_owned())
        }
    };
    Ok(Target { backend, service })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for backend in ["10.0.1.5:8080", "[fd00::5]:443"] {
            let backend: SocketAddr = backend.parse().unwrap();
            let request = request(backend, Some("payments"));
            assert_eq!(
                parse(&request).unwrap(),
                Target {
                    backend,
                    service: Some("payments".into())
                }
            );
        }
        let bare = request("10.0.1.5:80".parse().unwrap(), None);
        assert_eq!(parse(&bare).unwrap().service, None);
        assert!(!is_probe(&bare));
        let backend: SocketAddr = "10.0.1.5:80".parse().unwrap();
        let probe = probe_request(backend, "web");
        assert!(is_probe(&probe));
        assert_eq!(
            parse(&probe).unwrap(),
            Target {
                backend,
                service: Some("web".into())
            }
        );
    }

    #[test]
    fn refuses_malformed_requests() {
        let build = |method: Method, uri: &str, service: Option<&[u8]>| {
            let mut b = Request::builder().method(method).uri(uri);
            if let Some(s) = service {
                b = b.header(SERVICE_HEADER, http::HeaderValue::from_bytes(s).unwrap());
            }
            b.body(()).unwrap()
        };
        let cases = [
            (
                build(Method::GET, "10.0.0.1:80", None),
                FrameError::Method("GET".into()),
            ),
            (
                build(Method::POST, "http://10.0.0.1:80/x", None),
                FrameError::Method("POST".into()),
            ),
            (build(Method::CONNECT, "/", None), FrameError::NoAuthority),
            (
                build(Method::CONNECT, "backend:80", None),
                FrameError::Authority("backend:80".into()),
            ),
            (
                build(Method::CONNECT, "10.0.0.1", None),
                FrameError::Authority("10.0.0.1".into()),
            ),
            (
                build(Method::CONNECT, "10.0.0.1:0", None),
                FrameError::Authority("10.0.0.1:0".into()),
            ),
            (
                build(Method::CONNECT, "0.0.0.0:80", None),
                FrameError::Authority("0.0.0.0:80".into()),
            ),
            (
                build(Method::CONNECT, "[fd00::1]", None),
                FrameError::Authority("[fd00::1]".into()),
            ),
            (
                build(Method::CONNECT, "http://10.0.0.1:80/x", None),
                FrameError::Path("http://10.0.0.1:80/x".into()),
            ),
            (
                build(Method::CONNECT, "10.0.0.1:80", Some(b"Pay ments")),
                FrameError::Service,
            ),
            (
                build(Method::CONNECT, "10.0.0.1:80", Some(b"")),
                FrameError::Service,
            ),
            (
                build(Method::CONNECT, "10.0.0.1:80", Some(b"\xff")),
                FrameError::Service,
            ),
        ];
        for (request, want) in cases {
            assert_eq!(parse(&request), Err(want.clone()), "{request:?}");
        }
        assert_eq!(
            FrameError::Method("GET".into()).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(FrameError::NoAuthority.status(), StatusCode::BAD_REQUEST);
    }
}
