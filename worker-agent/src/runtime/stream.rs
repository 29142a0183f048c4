//! Bodies that stream both ways between the listener and a running function.
//!
//! - Request: with a declared length, the listener hands the runtime a [`Stdin`] (the length,
//!   which becomes `CONTENT_LENGTH`, and the body's chunks as they arrive), fed into the
//!   function's stdin while it runs.
//! - Response: the runtime writes stdout into a [`Stdout`], which holds it back until its CGI
//!   header block is complete (or the first [`cgi::MAX_HEADER_BLOCK`] bytes hold none), then
//!   sends the [`Head`] and every later byte through a [`ResponseSink`] as the function writes
//!   it. The response limit counts every byte; at the end, [`Stdout::finish`] gives the
//!   invocation's [`Response`]: the buffered one when no head was sent (today's behaviour, also
//!   for failures), else the head that went out, with the failure (if any) that happened after.
//!
//! The body channel is unbounded: what it can hold is bounded by the response limit, the same
//! bound the buffered response had.

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Response, cgi};

/// A request body that streams into the function's stdin.
#[derive(Debug)]
pub struct Stdin {
    /// Its declared length (`CONTENT_LENGTH`).
    pub length: u64,
    /// Its chunks, as they arrive; closed at its end (or when it broke off).
    pub chunks: mpsc::Receiver<Bytes>,
}

/// The streams of one invocation; the default is a buffered invocation (the body is
/// `Invocation::body`, the response comes back whole in the outcome).
#[derive(Debug, Default)]
pub struct Io {
    /// The rest of the request body, after `Invocation::body`.
    pub stdin: Option<Stdin>,
    /// Where the response goes as soon as its head is known.
    pub response: Option<ResponseSink>,
}

/// The status and headers of a response that streams.
#[derive(Debug)]
pub struct Head {
    /// Status and headers (no body).
    pub response: Response,
    /// Whether the invocation is a cold start.
    pub cold_start: bool,
}

/// The runtime's end of a streamed response.
#[derive(Debug)]
pub struct ResponseSink {
    head: Option<oneshot::Sender<Head>>,
    body: mpsc::UnboundedSender<Bytes>,
    /// Sent along with the head (the invoker knows it before the function runs).
    pub cold_start: bool,
}

/// The listener's end of a streamed response: the head, once known (never, when the response
/// did not stream: the outcome holds it then), then the body's chunks.
#[derive(Debug)]
pub struct ResponseSource {
    /// The head; closed without one when the response comes back whole.
    pub head: oneshot::Receiver<Head>,
    /// The body after the head; closed when the function has ended.
    pub body: mpsc::UnboundedReceiver<Bytes>,
}

/// A connected sink and source.
pub fn response_channel() -> (ResponseSink, ResponseSource) {
    let (head_tx, head) = oneshot::channel();
    let (body_tx, body) = mpsc::unbounded_channel();
    (ResponseSink { head: Some(head_tx), body: body_tx, cold_start: false }, ResponseSource { head, body })
}

/// A function's stdout, bounded by the response limit, streamed once its head is known.
#[derive(Debug)]
pub struct Stdout {
    buf: Vec<u8>,
    total: usize,
    limit: usize,
    sink: Option<ResponseSink>,
    head: Option<Response>,
    /// The header block is invalid: the response never streams (it is a failure).
    invalid: bool,
    overflowed: bool,
}

impl Stdout {
    /// Stdout of at most `limit` bytes, streamed into `sink` when there is one.
    pub fn new(limit: usize, sink: Option<ResponseSink>) -> Stdout {
        Stdout { buf: Vec::new(), total: 0, limit, sink, head: None, invalid: false, overflowed: false }
    }

    /// Takes `bytes`; false (and none of them kept) when they go beyond the limit: the function
    /// must be stopped.
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        if self.total.saturating_add(bytes.len()) > self.limit {
            self.overflowed = true;
            return false;
        }
        self.total += bytes.len();
        let Some(sink) = &mut self.sink else {
            self.buf.extend_from_slice(bytes);
            return true;
        };
        if self.head.is_some() {
            if !bytes.is_empty() {
                let _ = sink.body.send(Bytes::copy_from_slice(bytes));
            }
            return true;
        }
        let before = self.buf.len();
        self.buf.extend_from_slice(bytes);
        // Looked at again only when a line ended or the block's bound was crossed.
        let window = cgi::MAX_HEADER_BLOCK + 4;
        if self.invalid || before > window || !(bytes.contains(&b'\n') || self.buf.len() > window) {
            return true;
        }
        if let Some((head, body_start)) = cgi::head(&self.buf) {
            if head.failure.is_some() {
                self.invalid = true;
                return true;
            }
            if let Some(tx) = sink.head.take() {
                let _ = tx.send(Head { response: head.clone(), cold_start: sink.cold_start });
            }
            if body_start < self.buf.len() {
                let _ = sink.body.send(Bytes::copy_from_slice(&self.buf[body_start..]));
            }
            self.buf = Vec::new();
            self.head = Some(head);
        }
        true
    }

    /// Whether bytes beyond the limit were refused.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Whether the head went out already.
    pub fn streaming(&self) -> bool {
        self.head.is_some()
    }

    /// The invocation's response, given its failure if it failed; closes the stream. When the
    /// head went out, that is the response (with the failure after it, the body is then cut).
    pub fn finish(&mut self, failure: Option<Response>) -> Response {
        self.sink = None;
        let buf = std::mem::take(&mut self.buf);
        match (self.head.take(), failure) {
            (None, Some(failure)) => failure,
            (None, None) => cgi::parse(buf),
            (Some(head), failure) => Response { body: Vec::new(), failure: failure.and_then(|f| f.failure), ..head },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::FailureReason;

    #[test]
    fn the_head_goes_out_once_the_block_is_complete_and_the_rest_follows() {
        let (sink, mut source) = response_channel();
        let mut out = Stdout::new(1024, Some(sink));
        assert!(out.push(b"Status: 201\r\nX-A: 1\r\n"));
        assert!(source.head.try_recv().is_err() && !out.streaming());
        assert!(out.push(b"\r\nfirst"));
        let head = source.head.try_recv().unwrap();
        assert_eq!(head.response.status, 201);
        assert_eq!(source.body.try_recv().unwrap(), "first");
        assert!(out.push(b" second"));
        assert_eq!(source.body.try_recv().unwrap(), " second");
        let r = out.finish(Some(Response::failed(FailureReason::Timeout, "late")));
        assert_eq!((r.status, r.failure), (201, Some(FailureReason::Timeout)));
        assert!(source.body.try_recv().is_err());
    }

    #[test]
    fn without_a_block_the_head_waits_for_the_bound_or_the_end_and_limits_hold() {
        let (sink, mut source) = response_channel();
        let mut out = Stdout::new(64 << 10, Some(sink));
        assert!(out.push(b"plain text\n"));
        assert!(!out.streaming());
        assert!(out.push(&vec![b'x'; cgi::MAX_HEADER_BLOCK]));
        assert_eq!(source.head.try_recv().unwrap().response.status, 200);
        assert!(source.body.try_recv().unwrap().starts_with(b"plain text\n"));
        assert!(!out.push(&vec![b'y'; 64 << 10]) && out.overflowed());

        let (sink, mut source) = response_channel();
        let mut out = Stdout::new(1024, Some(sink));
        assert!(out.push(b"Status: 99\n\nbad"));
        assert_eq!(out.finish(None).failure, Some(FailureReason::InvalidResponse));
        assert!(source.head.try_recv().is_err(), "an invalid block never streams");
    }
}
