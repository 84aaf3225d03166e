//! The admin port every role serves (`/metrics`, `/healthz`, `/readyz`): HTTP/1 only, as
//! Prometheus and the kubelet speak it, and bounded. The chart admits any source on it by
//! default (the kubelet's probes come from the node, Prometheus from wherever it runs), so a
//! pod could otherwise open connections and leave them idle, each holding a task and its
//! buffers, until the process (the fail-closed webhook, say) runs out of memory or descriptors.
//! Here a request head must arrive within [`HEADER_READ_TIMEOUT`] (an idle kept-alive connection
//! is closed after it too), and one client address holds at most [`MAX_CONNECTIONS_PER_CLIENT`]
//! connections: more are closed on accept.

use std::{future::Future, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, task::JoinSet};

use crate::per_client::PerClient;

/// A client that has not sent a whole request head by then is disconnected. The kubelet's
/// probes time out after 1 s by default, and a scrape sends its head at once.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections from one client address at most. The kubelet's probes (from the node's
/// address) and a Prometheus need a few.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 16;

/// Serves `router` on `listener` until `shutdown` resolves; connections still open then are
/// closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let per_client = PerClient::new(MAX_CONNECTIONS_PER_CLIENT);
    let mut open = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while open.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "failed to accept an admin connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(client_slot) = per_client.admit(peer.ip()) else {
            tracing::debug!(%peer, "closed an admin connection over the per-client cap");
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        open.spawn(async move {
            let _client_slot = client_slot;
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/healthz", get(|| async { "ok" }));
        tokio::spawn(serve(listener, router, std::future::pending()));
        addr
    }

    async fn connect_from(ip: [u8; 4], addr: SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((ip, 0))).unwrap();
        socket.connect(addr).await.unwrap()
    }

    async fn healthz(stream: &mut tokio::net::TcpStream) -> String {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn is_closed(stream: &tokio::net::TcpStream) -> bool {
        let mut buf = [0u8; 1];
        match stream.try_read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_and_others_are_served() {
        let addr = server().await;
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS_PER_CLIENT {
            held.push(connect_from([127, 0, 0, 3], addr).await);
        }
        let over = connect_from([127, 0, 0, 3], addr).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(is_closed(&over), "a connection over the cap was kept");
        assert!(held.iter().all(|c| !is_closed(c)));
        let mut probe = connect_from([127, 0, 0, 1], addr).await;
        assert!(healthz(&mut probe).await.starts_with("HTTP/1.1 200"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_after_the_header_timeout() {
        let addr = server().await;
        let mut idle = connect_from([127, 0, 0, 1], addr).await;
        assert!(healthz(&mut idle).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(HEADER_READ_TIMEOUT + Duration::from_secs(1)).await;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(1), idle.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "still open: {read:?}"
        );
    }
}
