//! The HTTP server loop of the node and the hub.
//!
//! `axum::serve` sets no timer on hyper's connections, and without one hyper has no
//! header-read timeout: a client that opens a connection and sends its headers a byte at a
//! time (or never finishes them) holds the connection, its task and its buffers for as long
//! as it likes, and a few thousand such clients hold every file descriptor. [`serve`] runs an
//! axum router on any [`Listener`] with a timer and a header-read timeout
//! ([`HEADER_READ_TIMEOUT`]), gives handlers the remote address as
//! `ConnectInfo<SocketAddr>`, and shuts down gracefully: when `stop` resolves it stops
//! accepting, lets every connection finish the requests it is serving, and returns once they
//! are closed.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tower_layer::Layer;

/// How long a client has to send a request's headers, from the moment the connection is
/// ready for its next request; past it the connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `stop` resolves (see the module's documentation).
pub async fn serve<L>(listener: L, router: Router, stop: impl Future<Output = ()> + Send)
where
    L: Listener<Addr = SocketAddr>,
{
    serve_with(listener, router, stop, HEADER_READ_TIMEOUT).await;
}

/// [`serve`] with another header-read timeout.
pub async fn serve_with<L>(
    mut listener: L,
    router: Router,
    stop: impl Future<Output = ()> + Send,
    header_read_timeout: Duration,
) where
    L: Listener<Addr = SocketAddr>,
{
    // Connections watch `draining` to start their graceful shutdown, and hold `open` until
    // they close; `serve` returns when no one holds it.
    let (drain, draining) = tokio::sync::watch::channel(false);
    let (open, closed) = tokio::sync::mpsc::channel::<()>(1);
    let mut stop = pin!(stop);
    loop {
        let (io, remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let service =
            TowerToHyperService::new(axum::Extension(ConnectInfo(remote)).layer(router.clone()));
        let mut draining = draining.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let mut conn = pin!(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = drained(&mut draining) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%remote, error = %e, "connection ended");
            }
            drop(open);
        });
    }
    let _ = drain.send(true);
    drop(open);
    let mut closed = closed;
    // `recv` returns None once every connection has dropped its sender.
    let _ = closed.recv().await;
}

/// Resolves when the server starts draining (or is gone).
async fn drained(draining: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = draining.wait_for(|d| *d).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(timeout: Duration) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route(
            "/",
            axum::routing::get(|ConnectInfo(remote): ConnectInfo<SocketAddr>| async move {
                remote.ip().to_string()
            }),
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(serve_with(
            listener,
            router,
            async move {
                let _ = rx.await;
            },
            timeout,
        ));
        (addr, tx)
    }

    /// A client that sends part of its headers and then nothing is disconnected after the
    /// header-read timeout (with `axum::serve` it was held forever); a complete request is
    /// answered, with the remote address as `ConnectInfo`.
    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        let (addr, _stop) = start(Duration::from_millis(300)).await;
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        ok.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("127.0.0.1"), "{answer}");

        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest))
            .await
            .expect("the server closes the connection");
        // Closed (0 bytes, or hyper's 408 before closing), well before the test's 10 s.
        assert!(read.is_ok());
        let text = String::from_utf8_lossy(&rest);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }

    /// On `stop`, a request in flight still gets its answer, and `serve` returns once the
    /// connection is closed.
    #[tokio::test]
    async fn stopping_lets_requests_in_flight_finish() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let entered = std::sync::Arc::new(std::sync::Mutex::new(Some(entered_tx)));
        let router = Router::new().route(
            "/",
            axum::routing::get(move || {
                let entered = entered.clone();
                async move {
                    if let Some(tx) = entered.lock().ok().and_then(|mut e| e.take()) {
                        let _ = tx.send(());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    "done"
                }
            }),
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router, async move {
            let _ = stop_rx.await;
        }));
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        entered_rx.await.unwrap();
        stop_tx.send(()).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns after the last connection")
            .unwrap();
    }
}
