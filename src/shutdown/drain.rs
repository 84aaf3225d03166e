//! Draining a server's connections at shutdown (the webhook, the TLS gateway): after SIGTERM a
//! pod keeps serving while its endpoint is removed, and every connection is told to stop taking
//! requests in a way its client handles without failing one.
//!
//! A client pools its connections, so closing a listener is not enough: the apiserver (Go
//! net/http) keeps sending reviews on a pooled connection to a terminating pod until it breaks,
//! and a request written onto a connection that is being cut fails ("broken pipe"; a POST is
//! never retried). So, in phases:
//! - **Draining** (from the signal, for the shutdown delay): HTTP/2 connections get a GOAWAY as
//!   soon as they have carried a request (Go retries any stream the GOAWAY refused, and opens a
//!   new connection); HTTP/1 responses carry `Connection: close`, and the connection closes after
//!   that response. New connections are still accepted and served the same way: one request,
//!   then closed, so a client whose endpoint list is not yet updated is never refused.
//! - **Stopping** (the listener closes): every connection still open is shut down gracefully
//!   (an idle one closes, an open request finishes); the server waits for them, bounded.
//!
//! A fresh connection is never closed before its first request: hyper would close an idle
//! HTTP/1 connection, or one still reading the HTTP/2 preface, at once, and the client's first
//! request on a new connection is not retried.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, Version, header};
use hyper::service::Service;
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;

/// Where a server is in its shutdown; each phase follows the one before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Normal operation.
    Serving,
    /// Signalled: still accepting, but every connection is closed after its next request.
    Draining,
    /// The listener is closed; open connections finish their requests and close.
    Stopping,
}

/// The server's side of the drain: moves all its connections through the phases.
#[derive(Debug)]
pub struct Drain {
    phase: watch::Sender<Phase>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            phase: watch::Sender::new(Phase::Serving),
        }
    }
}

impl Drain {
    /// A server that is serving.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    fn advance(&self, to: Phase) {
        self.phase.send_if_modified(|phase| {
            let later = to > *phase;
            if later {
                *phase = to;
            }
            later
        });
    }

    /// Enters [`Phase::Draining`].
    pub fn start(&self) {
        self.advance(Phase::Draining);
    }

    /// Enters [`Phase::Stopping`].
    pub fn stop(&self) {
        self.advance(Phase::Stopping);
    }

    /// The accept loop's stop signal: waits for `signal`, drains for `delay`, then enters
    /// [`Phase::Stopping`] and resolves (the loop then closes its listener).
    pub async fn after(&self, signal: impl Future<Output = ()>, delay: Duration) {
        signal.await;
        self.start();
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "draining: connections close after their next request; still accepting while endpoints update"
            );
            tokio::time::sleep(delay).await;
        }
        self.stop();
    }

    /// Resolves once [`Phase::Stopping`] is entered.
    pub async fn stopped(&self) {
        let _ = self
            .phase
            .subscribe()
            .wait_for(|p| *p >= Phase::Stopping)
            .await;
    }

    /// The handle of one accepted connection.
    pub fn connection(&self) -> ConnectionDrain {
        ConnectionDrain {
            phase: self.phase.subscribe(),
            version: Arc::new(watch::Sender::new(None)),
        }
    }
}

/// One connection's view of the drain: wraps its service and drives it.
#[derive(Debug)]
pub struct ConnectionDrain {
    phase: watch::Receiver<Phase>,
    /// The HTTP version of the first request the connection carried.
    version: Arc<watch::Sender<Option<Version>>>,
}

impl ConnectionDrain {
    /// `inner`, noting the connection's HTTP version and adding `Connection: close` to HTTP/1
    /// responses once the drain has started.
    pub fn service<S>(&self, inner: S) -> DrainService<S> {
        DrainService {
            inner,
            phase: self.phase.clone(),
            version: self.version.clone(),
        }
    }

    /// Drives `connection` (serving the service from [`Self::service`]) through the drain.
    /// (Boxed: an `async fn` generic over hyper's connections trips the compiler's `Send`
    /// check at the call site, a known limitation with higher-ranked error conversions.)
    pub fn serve<C>(
        self,
        connection: C,
    ) -> Pin<Box<dyn Future<Output = Result<(), C::Error>> + Send>>
    where
        C: GracefulConnection + Send + 'static,
    {
        Box::pin(self.drive(connection))
    }

    async fn drive<C>(self, connection: C) -> Result<(), C::Error>
    where
        C: GracefulConnection,
    {
        // `noted` keeps the channel open whatever happens to the service.
        let Self {
            mut phase,
            version: noted,
        } = self;
        let mut version = noted.subscribe();
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => return result,
            _ = phase.wait_for(|p| *p >= Phase::Draining) => {}
        }
        // HTTP/2: GOAWAY once it has carried a request. HTTP/1: its responses now close it, so
        // only one left idle is closed, when the listener stops.
        let close_now = async {
            tokio::select! {
                _ = version.wait_for(|v| *v == Some(Version::HTTP_2)) => {}
                _ = phase.wait_for(|p| *p >= Phase::Stopping) => {}
            }
        };
        tokio::select! {
            result = connection.as_mut() => return result,
            () = close_now => {}
        }
        connection.as_mut().graceful_shutdown();
        connection.await
    }
}

/// A connection's service under the drain (see [`ConnectionDrain::service`]).
#[derive(Clone, Debug)]
pub struct DrainService<S> {
    inner: S,
    phase: watch::Receiver<Phase>,
    version: Arc<watch::Sender<Option<Version>>>,
}

impl<S, R, B> Service<Request<R>> for DrainService<S>
where
    S: Service<Request<R>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, request: Request<R>) -> Self::Future {
        let version = request.version();
        self.version
            .send_if_modified(|first| first.replace(version).is_none());
        let call = self.inner.call(request);
        let phase = self.phase.clone();
        Box::pin(async move {
            let mut response = call.await?;
            if version < Version::HTTP_2 && *phase.borrow() > Phase::Serving {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
#[path = "drain_tests.rs"]
mod tests;
