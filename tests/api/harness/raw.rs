//! Raw HTTP/1.1 for what a well-behaved client refuses to send: hand-written requests on a
//! fresh connection, and a reader for whatever comes back (a response, or a closed connection).

use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{token, ApiClient, PATIENCE};

/// What came back on a raw connection.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A complete response.
    Response {
        status: u16,
        head: String,
        body: Vec<u8>,
    },
    /// The connection was closed or reset without a complete response.
    Closed,
}

impl Reply {
    /// The status code, unless the connection closed first.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            Self::Response { status, .. } => Some(*status),
            Self::Closed => None,
        }
    }

    /// The problem `code` of a problem+json response.
    pub(crate) fn code(&self) -> Option<String> {
        match self {
            Self::Response { head, body, .. }
                if head
                    .to_ascii_lowercase()
                    .contains("content-type: application/problem+json") =>
            {
                let body: Value = serde_json::from_slice(body).ok()?;
                body["code"].as_str().map(str::to_owned)
            }
            _ => None,
        }
    }
}

/// Where `needle` first occurs in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response (head and `Content-Length` body) or until the connection ends.
pub(crate) async fn read_reply(stream: &mut (impl AsyncRead + Unpin)) -> Reply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            if let Some(length) = length {
                if buf.len() >= end + 4 + length {
                    let body = buf[end + 4..end + 4 + length].to_vec();
                    let status = status_of(&head);
                    return Reply::Response { status, head, body };
                }
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    match find(&buf, b"\r\n\r\n") {
        Some(end) => {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            Reply::Response {
                status: status_of(&head),
                head,
                body: buf[end + 4..].to_vec(),
            }
        }
        None => Reply::Closed,
    }
}

/// The status code of a response head (0 if it has none).
pub(crate) fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Sends `request` on a new connection and reads the reply (bounded by [`PATIENCE`]).
pub(crate) async fn exchange(api: &ApiClient, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(api.addr()).await.expect("connect");
    // The server may answer and close before it has read everything (431, 413): not an error.
    let _ = stream.write_all(request).await;
    tokio::time::timeout(PATIENCE, read_reply(&mut stream))
        .await
        .expect("the server neither answered nor closed the connection")
}

/// A request with these raw bytes as its target and extra header lines.
pub(crate) fn raw_request(
    method: &str,
    target: &[u8],
    headers: &[Vec<u8>],
    body: &[u8],
) -> Vec<u8> {
    let mut request = format!("{method} ").into_bytes();
    request.extend_from_slice(target);
    request.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for header in headers {
        request.extend_from_slice(header);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body);
    request
}

/// An `Authorization` header line with a valid token for `user`.
pub(crate) fn bearer_line(user: &str) -> Vec<u8> {
    format!("Authorization: Bearer {}", token(user)).into_bytes()
}

/// `request` without its `Connection: close`.
pub(crate) fn keep_alive(request: Vec<u8>) -> Vec<u8> {
    let at = find(&request, b"Connection: close\r\n").expect("a raw request");
    [&request[..at], &request[at + 19..]].concat()
}

/// Asserts that `reply` announces `Connection: close` and that the server then closes `stream`.
pub(crate) async fn assert_closes(reply: &Reply, stream: &mut TcpStream, what: &str) {
    let Reply::Response { head, .. } = reply else {
        panic!("{what}: no response");
    };
    assert!(
        head.to_ascii_lowercase().contains("\r\nconnection: close"),
        "{what}: a connection whose request body was not read must not be reused: {head}"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "{what}: the connection stayed open");
}

/// Asserts a 4xx reply, or a connection the HTTP layer closed without answering when
/// `may_close`; never a 5xx.
pub(crate) fn assert_4xx(reply: &Reply, may_close: bool, what: &str) {
    match reply.status() {
        Some(status) => assert!((400..500).contains(&status), "{what}: {reply:?}"),
        None => assert!(
            may_close,
            "{what}: the connection was closed without an answer"
        ),
    }
}
