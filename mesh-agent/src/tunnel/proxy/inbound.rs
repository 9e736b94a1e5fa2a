//! The inbound listener (default `0.0.0.0:15008`): terminates mutual TLS from peer agents,
//! accepts their HTTP/2 `CONNECT` streams, checks each against the catalog and the policy, and
//! connects the allowed ones to their backend from a marked socket. A peer's health probe of a
//! backend is run here, where the backend's kernel admits the agent's marked sockets.
//!
//! A draining agent tells each connection to go away (HTTP/2 graceful shutdown: GOAWAY, then
//! the streams already open finish), so peers' pools dial again and reach the successor
//! through the same listening socket; each connection and stream counts as open until done.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::telemetry::{
    access_log::{self, FlowEnd, FlowResult},
    log_limit::LogLimit,
};

use crate::{
    model::identity::SpiffeId,
    tunnel::authz::Verdict,
    tunnel::identity::certs::{handshake_failure_reason, session_peer},
    tunnel::proxy::connect,
    tunnel::proxy::relay::relay,
    tunnel::proxy::socket::dial_marked,
    tunnel::proxy::stats::{ActiveStream, INBOUND},
    tunnel::proxy::tuning,
    tunnel::Tunnel,
};

/// Warnings about refused peers and flows: one line per period (the counters count each).
static REFUSED_PEER: LogLimit = LogLimit::new(crate::telemetry::log_limit::PERIOD);
static REFUSED_FLOW: LogLimit = LogLimit::new(crate::telemetry::log_limit::PERIOD);

/// How long a peer may take to finish the TLS handshake, and then to send the HTTP/2 preface.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound of a peer's probe of a backend whose service has no active check here.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts peer agents until the task is dropped.
pub async fn serve(tunnel: Arc<Tunnel>, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = match tunnel.limits.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(over) => {
                tunnel.stats.handshake(INBOUND, over.label());
                REFUSED_PEER.warn(|suppressed| {
                    tracing::warn!(%peer, reason = over.label(), suppressed, "refused a peer: too many tunnel connections");
                });
                continue;
            }
        };
        let tunnel = Arc::clone(&tunnel);
        let tracked = tunnel.drain.track();
        tokio::spawn(async move {
            let _tracked = tracked;
            let _admitted = admitted;
            connection(tunnel, tcp, peer).await;
        });
    }
}

/// What happened on a tunnel connection.
enum Event<T> {
    Accepted(Option<Result<T, h2::Error>>),
    GoAway,
}

async fn connection(tunnel: Arc<Tunnel>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let acceptor = TlsAcceptor::from(Arc::clone(&tunnel.credentials.current().server));
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            let reason = handshake_failure_reason(&error);
            REFUSED_PEER.warn(|suppressed| {
                tracing::warn!(%peer, reason, %error, suppressed, "refused a peer: TLS handshake failed");
            });
            tunnel.stats.handshake(INBOUND, reason);
            return;
        }
        Err(_) => {
            REFUSED_PEER.warn(|suppressed| {
                tracing::warn!(%peer, suppressed, "refused a peer: TLS handshake timed out");
            });
            tunnel.stats.handshake(INBOUND, "timeout");
            return;
        }
    };
    let Some(peer_cert) = session_peer(tls.get_ref().1.peer_certificates()) else {
        // The verifier admits no certificate without an identity; this is a bug if reached.
        tracing::error!(%peer, "refused a peer: no identity after the handshake");
        tunnel.stats.handshake(INBOUND, "bad_identity");
        return;
    };
    tunnel.stats.handshake(INBOUND, "ok");
    // One line per pooled connection (not per flow): which certificate the peer presents.
    let status = peer_cert.status();
    tracing::info!(%peer, identity = %status.identity, serial = %status.serial,
        not_after = %status.not_after, "tunnel connection accepted");
    let caller = peer_cert.identity;
    // An authenticated peer must send the HTTP/2 preface promptly too: a connection that
    // never does is closed, not held.
    let mut h2 = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tuning::server().handshake(tls))
        .await
    {
        Ok(Ok(h2)) => h2,
        Ok(Err(error)) => {
            tunnel.stats.handshake(INBOUND, "h2_failed");
            REFUSED_PEER.warn(|suppressed| {
                tracing::warn!(%peer, %caller, %error, suppressed, "HTTP/2 handshake failed");
            });
            return;
        }
        Err(_) => {
            tunnel.stats.handshake(INBOUND, "preface_timeout");
            REFUSED_PEER.warn(|suppressed| {
                tracing::warn!(%peer, %caller, suppressed, "closed a tunnel connection: no HTTP/2 preface in time");
            });
            return;
        }
    };
    let going_away = tunnel.drain.going_away();
    tokio::pin!(going_away);
    let mut told = false;
    loop {
        let event = tokio::select! {
            accepted = h2.accept() => Event::Accepted(accepted),
            () = &mut going_away, if !told => Event::GoAway,
        };
        match event {
            Event::GoAway => {
                tracing::debug!(%peer, %caller, "draining: tunnel connection told to go away");
                h2.graceful_shutdown();
                told = true;
            }
            Event::Accepted(None) => return,
            Event::Accepted(Some(Ok((request, respond)))) => {
                let tunnel = Arc::clone(&tunnel);
                let caller = caller.clone();
                let tracked = tunnel.drain.track();
                tokio::spawn(async move {
                    let _tracked = tracked;
                    stream(&tunnel, &caller, peer, request, respond).await;
                });
            }
            Event::Accepted(Some(Err(error))) => {
                tracing::debug!(%peer, %caller, %error, "tunnel connection ended");
                return;
            }
        }
    }
}

/// Runs this agent's check of `target`'s backend for a peer and answers 200 (passed) or 503
/// with the reason in [`connect::PROBE_ERROR_HEADER`].
async fn probe(
    tunnel: &Tunnel,
    caller: &SpiffeId,
    target: &connect::Target,
    mut respond: SendResponse<Bytes>,
) {
    let Some(check) = tunnel.authz().probe_check(target, PROBE_TIMEOUT) else {
        REFUSED_FLOW.warn(|suppressed| {
            tracing::warn!(%caller, backend = %target.backend, service = ?target.service, suppressed,
                "refused a probe: the target is no backend of an mTLS service here");
        });
        tunnel.stats.flow(INBOUND, "unknown_target");
        return refuse(&mut respond, StatusCode::NOT_FOUND);
    };
    let mut response = Response::new(());
    match crate::health::probe::probe(target.backend, &check).await {
        Ok(()) => tunnel.stats.flow(INBOUND, "probe_passed"),
        Err(error) => {
            tracing::debug!(%caller, backend = %target.backend, %error, "probe failed");
            tunnel.stats.flow(INBOUND, "probe_failed");
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            if let Ok(reason) = http::HeaderValue::from_str(&error.to_string()) {
                response
                    .headers_mut()
                    .insert(connect::PROBE_ERROR_HEADER, reason);
            }
        }
    }
    // The peer may have given up on the probe; nothing is owed to it then.
    let _ = respond.send_response(response, true);
}

fn refuse(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    // The stream may already be gone (peer reset); nothing is owed to it then.
    let _ = respond.send_response(response, true);
}

async fn stream(
    tunnel: &Tunnel,
    caller: &SpiffeId,
    peer: SocketAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    let stats = &tunnel.stats;
    let target = match connect::parse(&request) {
        Ok(target) => target,
        Err(error) => {
            REFUSED_FLOW.warn(|suppressed| {
                tracing::warn!(%caller, %error, suppressed, "refused a malformed flow request");
            });
            stats.flow(INBOUND, "malformed");
            return refuse(&mut respond, error.status());
        }
    };
    if connect::is_probe(&request) {
        return probe(tunnel, caller, &target, respond).await;
    }
    let ended = |service: Option<&str>, sent, received, result| {
        access_log::record(&FlowEnd {
            side: "inbound",
            source: caller,
            client: peer,
            service,
            backend: target.backend,
            sent,
            received,
            duration: started.elapsed(),
            result,
        });
    };
    let verdict = tunnel.authz().check(&target, caller);
    match &verdict {
        Verdict::UnknownTarget => {
            REFUSED_FLOW.warn(|suppressed| {
                tracing::warn!(%caller, backend = %target.backend, service = ?target.service, suppressed,
                    "refused a flow: the target is no backend of an mTLS service here (this node does not announce it)");
            });
            stats.flow(INBOUND, "unknown_target");
            ended(
                target.service.as_deref(),
                0,
                0,
                FlowResult::Refused("unknown_target"),
            );
            return refuse(&mut respond, StatusCode::NOT_FOUND);
        }
        Verdict::Deny(service, decision) => {
            REFUSED_FLOW.warn(|suppressed| {
                tracing::warn!(%caller, service, backend = %target.backend, %decision, suppressed, "authorization: denied");
            });
            stats.authz(service, decision.label(), &caller.to_string());
            stats.flow(INBOUND, "denied");
            ended(Some(service), 0, 0, FlowResult::Refused("denied"));
            return refuse(&mut respond, StatusCode::FORBIDDEN);
        }
        Verdict::Allow(decisions) => {
            for (service, decision) in decisions {
                tracing::debug!(%caller, service, backend = %target.backend, %decision, "authorization: allowed");
                stats.authz(service, decision.label(), &caller.to_string());
            }
        }
    }
    let backend = match dial_marked(target.backend).await {
        Ok(backend) => backend,
        Err(error) => {
            REFUSED_FLOW.warn(|suppressed| {
                tracing::warn!(%caller, backend = %target.backend, %error, suppressed, "backend unreachable");
            });
            stats.flow(INBOUND, "backend_unreachable");
            ended(
                target.service.as_deref(),
                0,
                0,
                FlowResult::Refused("backend_unreachable"),
            );
            return refuse(&mut respond, StatusCode::BAD_GATEWAY);
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(error) => {
            tracing::debug!(%caller, %error, "the peer gave up on the flow");
            return;
        }
    };
    stats.flow(INBOUND, "opened");
    let _active = ActiveStream::new(&stats.streams_active);
    let (totals, result) = relay(
        backend,
        send,
        request.into_body(),
        &stats.bytes_sent,
        &stats.bytes_received,
    )
    .await;
    let result = match result {
        Ok(()) => FlowResult::Closed,
        Err(error) => {
            tracing::debug!(%caller, backend = %target.backend, %error, "flow reset");
            FlowResult::Reset
        }
    };
    // The relay's TCP side is the backend here: what it sent went back to the client.
    ended(
        target.service.as_deref(),
        totals.received,
        totals.sent,
        result,
    );
}
