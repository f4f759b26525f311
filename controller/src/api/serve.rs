//! Serves the API's router on a listener, connection by connection: over TLS when the
//! controller has a certificate, with bounded handshakes and header reads.
//!
//! A connection's trouble (a failed or slow handshake, a client that sends garbage or
//! goes away) ends that connection, logged at debug; the accept loop goes on.
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::tls::{ServerConfig, TlsAcceptor};

/// How long a client may take to send a request's headers (slowloris); a kept-alive
/// connection that sends nothing for this long is closed too.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What a plain-HTTP request to the HTTPS port gets (then the connection is closed).
fn plain_http_answer() -> Vec<u8> {
    let body = r#"{"error":"this API speaks HTTPS: use an https:// URL"}"#;
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on `listener` until the task is dropped: HTTPS with `tls`, plain
/// HTTP without.
pub async fn serve(listener: TcpListener, router: Router, tls: Option<Arc<ServerConfig>>) {
    let acceptor = tls.map(TlsAcceptor::from);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, the listener is fine.
                tracing::warn!(error = %e, "API: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let router = router.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let result = match acceptor {
                None => serve_connection(stream, router).await,
                Some(acceptor) => serve_tls_connection(&acceptor, stream, router).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "API connection ended with an error");
            }
        });
    }
}

async fn serve_tls_connection(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    router: Router,
) -> Result<(), String> {
    // One deadline for everything before the first request: a client cannot hold the
    // connection longer by sending its handshake a byte at a time.
    let timeout = crate::tls::HANDSHAKE_TIMEOUT;
    let tls = match tokio::time::timeout(timeout, handshake(acceptor, stream)).await {
        Err(_) => {
            return Err(format!(
                "TLS handshake not done within {} s",
                timeout.as_secs()
            ))
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(tls))) => tls,
    };
    serve_connection(tls, router).await
}

/// The server side of the TLS handshake; `None` when the client went away first.
async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> Result<Option<crate::tls::TlsStream<TcpStream>>, String> {
    // A TLS client speaks first with a handshake record (0x16); a request line starts
    // with a letter. Tell a plain-HTTP client what is wrong instead of dropping it.
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Err(e) => Err(e.to_string()),
        Ok(0) => Ok(None),
        Ok(_) if first[0].is_ascii_uppercase() => {
            answer_plain_http(stream).await;
            Err("plain HTTP on the HTTPS port".into())
        }
        Ok(_) => acceptor
            .accept(stream)
            .await
            .map(Some)
            .map_err(|e| format!("TLS handshake failed: {e}")),
    }
}

/// Takes the request (what came in one read: the client must see the answer rather
/// than a reset for unread data), answers [`plain_http_answer`] and closes; a second
/// at most.
async fn answer_plain_http(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut request = [0u8; 8192];
        let _ = stream.read(&mut request).await?;
        stream.write_all(&plain_http_answer()).await?;
        stream.shutdown().await
    })
    .await;
}

async fn serve_connection<S>(stream: S, router: Router) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router))
        .await
        .map_err(|e| e.to_string())
}
