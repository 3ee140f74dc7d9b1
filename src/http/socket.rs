//! A client connection's socket, as hyper sees it. hyper answers a request it cannot parse
//! by itself, before any handler runs: 400 (a malformed request line or header), 414 (a URI
//! too long) or 431 (a request head over [`super::MAX_BUF`]), each with an empty body and
//! no request id, then closes. [`Socket`] recognises such an answer as hyper writes it and
//! writes the contract's instead: the same status, a JSON body with the `bad_request` code
//! and a message, `X-Request-Id`, `Connection: close`. Every other write passes through
//! untouched; the test is a look at a response's first bytes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::app::App;

pub struct Socket {
    inner: TcpStream,
    app: Arc<App>,
    /// hyper's error answer being replaced: our bytes, how many are written, and how many
    /// of hyper's to report written once they all are.
    replacing: Option<(Vec<u8>, usize, usize)>,
}

impl Socket {
    pub fn new(inner: TcpStream, app: Arc<App>) -> Self {
        Socket {
            inner,
            app,
            replacing: None,
        }
    }

    /// Write our answer in place of hyper's (`claimed` bytes of it).
    fn poll_replace(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let (bytes, written, claimed) = self.replacing.as_mut().expect("replacing");
        while *written < bytes.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        let claimed = *claimed;
        self.replacing = None;
        Poll::Ready(Ok(claimed))
    }
}

/// hyper's own answer to a request it could not parse, recognised by its first bytes: a
/// status hyper answers by itself, and no request id (every answer of ours carries one).
/// Returns the status line and the message for the client.
fn hypers_error(head: &[u8]) -> Option<(&'static str, &'static str)> {
    let (line, message) = match head.get(..12)? {
        b"HTTP/1.1 400" => ("400 Bad Request", "malformed HTTP request"),
        b"HTTP/1.1 414" => ("414 URI Too Long", "request target too long"),
        b"HTTP/1.1 431" => (
            "431 Request Header Fields Too Large",
            "request line and headers over 16 KiB",
        ),
        _ => return None,
    };
    let ours = head.windows(14).any(|w| w.eq_ignore_ascii_case(b"x-request-id: "));
    (!ours).then_some((line, message))
}

/// The contract's answer in place of hyper's.
pub fn error_answer(status_line: &str, code: &str, message: &str, request_id: &str, extra: &str) -> Vec<u8> {
    let body = serde_json::json!({"error": code, "message": message}).to_string();
    format!(
        "HTTP/1.1 {status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\
         x-request-id: {request_id}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_none()
            && let Some((line, message)) = hypers_error(buf)
        {
            let answer = error_answer(line, "bad_request", message, &this.app.next_request_id(), "");
            this.replacing = Some((answer, 0, buf.len()));
        }
        if this.replacing.is_some() {
            return this.poll_replace(cx);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_none()
            && let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some((line, message)) = hypers_error(first)
        {
            let answer = error_answer(line, "bad_request", message, &this.app.next_request_id(), "");
            let claimed = bufs.iter().map(|b| b.len()).sum();
            this.replacing = Some((answer, 0, claimed));
        }
        if this.replacing.is_some() {
            return this.poll_replace(cx);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_answers_are_told_from_ours() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(
            hypers_error(hyper_431).map(|(l, _)| l),
            Some("431 Request Header Fields Too Large")
        );
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert!(hypers_error(hyper_400).is_some());
        let ours_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nx-request-id: a-1\r\n\r\n{}";
        assert!(hypers_error(ours_400).is_none());
        let sold_out = b"HTTP/1.1 410 Gone\r\ncontent-length: 2\r\n\r\n{}";
        assert!(hypers_error(sold_out).is_none());
        assert!(hypers_error(b"HTTP/1.1 4").is_none());
    }

    #[test]
    fn the_answer_is_json_with_its_length() {
        let a = String::from_utf8(error_answer(
            "431 Request Header Fields Too Large",
            "bad_request",
            "m",
            "r-1",
            "",
        ))
        .unwrap();
        let (head, body) = a.split_once("\r\n\r\n").unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "bad_request");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("x-request-id: r-1"));
    }
}
