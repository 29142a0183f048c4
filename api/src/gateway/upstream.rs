//! The gateway's HTTP/1.1 client to the agents' listeners: keep-alive connections pooled per
//! node, each driven by the task of the request that uses it.
//!
//! A general-purpose client (hyper-util's, under reqwest) runs every connection in a task of
//! its own: a request hands its head to that task, the task writes it, reads the answer and hands
//! it back, two wake-ups between tasks (often between threads) per invocation. Here the request's
//! own task polls the connection: while it waits for the response head ([`Links::send`]) and
//! then, through the response body it returns ([`Relay`]), while the body streams to the caller.
//! When the response has been read to its end, the connection goes back to its node's idle list;
//! a response dropped before its end closes it (HTTP/1.1 cannot abandon half a response).
//!
//! - A pooled connection the agent has closed meanwhile is found out before use (polled once, it
//!   ends), or by the request it refuses before sending anything: the request then goes on a new
//!   connection. A request that was sent and then lost its connection is not resent here (the
//!   gateway decides that: only idempotent requests go to another node).
//! - Redirects are never followed: a function's redirect is its caller's to follow (following it
//!   would carry the node's invoke secret to wherever the function points).
//! - Bounds: at most [`MAX_IDLE`] idle connections per node, each idle at most [`IDLE_FOR`];
//!   connecting times out after [`CONNECT_TIMEOUT`]; the head and the whole body share one
//!   deadline set by the caller.

use std::{
    error::Error as StdError,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    http::{HeaderValue, Request, Response, header},
};
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::limits::Permit;

/// Most idle connections kept per node.
pub const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed instead of reused.
pub const IDLE_FOR: Duration = Duration::from_secs(60);
/// Connecting to a node gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

type Connection = http1::Connection<TokioIo<TcpStream>, Body>;

/// What the exchange on a connection is: the handle requests are sent through, and the
/// connection itself, which only moves when polled.
struct Io {
    tx: http1::SendRequest<Body>,
    conn: Connection,
    /// The connection has ended (closed or failed): never polled again, never reused.
    ended: bool,
}

impl Io {
    /// Moves the connection along; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.ended && Pin::new(&mut self.conn).poll(cx).is_ready() {
            self.ended = true;
        }
        !self.ended
    }
}

/// One keep-alive connection, and the waker its parts are polled with.
struct Link {
    io: Io,
    inline: Arc<Inline>,
    waker: Waker,
    idle_since: Instant,
}

/// A connection's parts wake each other while one task polls them all: the connection, having
/// read the response head, completes the request's future; having read body bytes, wakes the
/// body. Such a wake would make the task poll itself again, through the scheduler (which then
/// also wakes an idle worker thread to share the work: a futex call and a thread switch per
/// invocation when the gateway is not busy). So the parts get this waker instead: a wake while
/// the task is polling them marks them to be polled once more at once, in the same poll; only a
/// wake from elsewhere (the socket is readable, the caller's body has more) wakes the task.
struct Inline {
    state: AtomicU8,
    task: AtomicWaker,
}

/// [`Inline::state`]: not being polled; being polled; being polled and woken since.
const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

impl Wake for Inline {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Err(IDLE) = self.state.compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire) {
            self.task.wake();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Closing the connection wakes its parts; nobody is waiting for them any more, least of
        // all the task that last polled them.
        self.inline.task.take();
    }
}

impl Link {
    fn new(tx: http1::SendRequest<Body>, conn: Connection) -> Link {
        let inline = Arc::new(Inline { state: AtomicU8::new(IDLE), task: AtomicWaker::new() });
        let waker = Waker::from(inline.clone());
        Link { io: Io { tx, conn, ended: false }, inline, waker, idle_since: Instant::now() }
    }

    /// Polls `f` on the connection's parts for the task of `cx`, again as long as the parts woke
    /// each other meanwhile (see [`Inline`]).
    ///
    /// A wake that comes with a `Ready` result is dropped: every `Ready` given out here is
    /// followed by another poll of the same connection (the response's next frame, or the drop
    /// that pools or closes it), which does what the wake asked.
    fn poll<T>(&mut self, cx: &mut Context<'_>, mut f: impl FnMut(&mut Io, &mut Context<'_>) -> Poll<T>) -> Poll<T> {
        self.inline.task.register(cx.waker());
        let mut own = Context::from_waker(&self.waker);
        loop {
            self.inline.state.store(POLLING, Ordering::Release);
            let polled = f(&mut self.io, &mut own);
            let woken = self.inline.state.swap(IDLE, Ordering::AcqRel) == WOKEN;
            if polled.is_ready() || !woken {
                return polled;
            }
        }
    }
}

/// Why a request did not get a response head.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// No connection could be made (the node is down or unreachable).
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    /// The deadline passed first.
    #[error("no answer before the deadline")]
    Timeout,
    /// A new connection closed before it could carry the request.
    #[error("the connection closed before the request could be sent")]
    Closed,
    /// The connection failed or closed before the response head (the request may have been sent).
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl Failure {
    /// Whether the node could not be reached at all.
    pub fn is_connect(&self) -> bool {
        matches!(self, Failure::Connect(..))
    }

    /// Whether the deadline passed.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Failure::Timeout)
    }
}

/// The pooled connections to one node's listener (`http://host:port`; the path is the
/// request's).
pub struct Links {
    /// `host:port`, what is connected to.
    addr: String,
    /// The `Host` header of every request.
    host: HeaderValue,
    idle: Mutex<Vec<Link>>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// `host:port` of a plain `http` URL.
fn address(base: &url::Url) -> Option<String> {
    if base.scheme() != "http" {
        return None;
    }
    Some(format!("{}:{}", base.host_str()?, base.port_or_known_default()?))
}

impl Links {
    /// The links to the listener at `base`; `None` unless it is a plain `http` URL with a host.
    pub fn new(base: &url::Url) -> Option<Links> {
        let addr = address(base)?;
        let host = HeaderValue::from_str(&addr).ok()?;
        Some(Links { addr, host, idle: Mutex::new(Vec::new()) })
    }

    /// Whether these links lead to `base`'s listener.
    pub fn serve(&self, base: &url::Url) -> bool {
        address(base).is_some_and(|a| a == self.addr)
    }

    /// Idle connections now pooled.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn take(&self) -> Option<Link> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest are at the front; the newest is the likeliest to be alive.
        let stale = idle.iter().take_while(|l| l.idle_since.elapsed() > IDLE_FOR).count();
        idle.drain(..stale);
        idle.pop()
    }

    /// Pools `link` if its last exchange is complete and it can carry another request.
    fn put(&self, mut link: Link) {
        // Nobody waits on it now (whoever takes it next polls it for their own task), and what
        // this last poll wakes must not wake the task that read the response.
        link.inline.task.take();
        if !link.io.drive(&mut Context::from_waker(Waker::noop())) || !link.io.tx.is_ready() {
            return;
        }
        link.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(link);
        }
    }

    async fn connect(&self) -> Result<Link, Failure> {
        let fail = |e| Failure::Connect(self.addr.clone(), e);
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr.as_str()))
            .await
            .map_err(|_| fail(std::io::ErrorKind::TimedOut.into()))?
            .map_err(fail)?;
        // Heads and small bodies go out at once, not after Nagle's wait for an acknowledgement.
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::handshake(TokioIo::new(stream)).await?;
        Ok(Link::new(tx, conn))
    }

    /// Sends `req` (origin-form URI; its `Host` is set here) on a pooled or new connection and
    /// waits for the response head until `deadline`. The response's body keeps the connection
    /// until it has been read or dropped, and must end by `deadline` too.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Relay>, Failure> {
        req.headers_mut().insert(header::HOST, self.host.clone());
        let exchange = async {
            let mut req = Some(req);
            loop {
                let (mut link, pooled) = match self.take() {
                    Some(link) => (link, true),
                    None => (self.connect().await?, false),
                };
                let ready = std::future::poll_fn(|cx| {
                    link.poll(cx, |io, cx| {
                        if !io.drive(cx) {
                            return Poll::Ready(false);
                        }
                        io.tx.poll_ready(cx).map(|r| r.is_ok())
                    })
                });
                if !ready.await {
                    if pooled {
                        continue;
                    }
                    return Err(Failure::Closed);
                }
                // Made inside the poll: handing the request over wakes the connection.
                let mut sending: Option<Pin<Box<Sending>>> = None;
                let sent = std::future::poll_fn(|cx| {
                    link.poll(cx, |io, cx| {
                        let sending = sending.get_or_insert_with(|| {
                            Box::pin(io.tx.try_send_request(req.take().expect("the request is sent once")))
                        });
                        if let Poll::Ready(r) = sending.as_mut().poll(cx) {
                            return Poll::Ready(r);
                        }
                        io.drive(cx);
                        sending.as_mut().poll(cx)
                    })
                })
                .await;
                match sent {
                    Ok(res) => return Ok((res, link)),
                    Err(mut e) => match e.take_message() {
                        // Refused before any of it was written: a pooled connection that had
                        // closed. The request is whole; it goes on another connection.
                        Some(r) if pooled => req = Some(r),
                        _ => return Err(Failure::Http(e.into_error())),
                    },
                }
            }
        };
        let (res, link) = tokio::time::timeout_at(deadline, exchange).await.map_err(|_| Failure::Timeout)??;
        let links = self.clone();
        Ok(res.map(|body| Relay {
            body,
            link: Some(link),
            links,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            permit: None,
        }))
    }
}

/// The future of one request handed to a connection.
type Sending = dyn Future<Output = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Body>>>> + Send;

/// A response body from an agent, relayed as it arrives; it drives its connection, and pools it
/// again once read to the end.
pub struct Relay {
    body: Incoming,
    link: Option<Link>,
    links: Arc<Links>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The caller's admission, held until the response is done.
    permit: Option<Permit>,
}

impl Relay {
    /// Keeps `permit` until the response is done (read to its end, or dropped).
    pub fn hold(&mut self, permit: Permit) {
        self.permit = Some(permit);
    }
}

impl http_body::Body for Relay {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.link = None;
            return Poll::Ready(Some(Err("the response did not end before the function's deadline".into())));
        }
        let body = &mut this.body;
        let frame = match &mut this.link {
            // Bytes reach the body when the connection reads them.
            Some(link) => link.poll(cx, |io, cx| {
                io.drive(cx);
                Pin::new(&mut *body).poll_frame(cx)
            }),
            None => Pin::new(body).poll_frame(cx),
        };
        if let Poll::Ready(None) = frame
            && let Some(link) = this.link.take()
        {
            this.links.put(link);
        }
        frame.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // A server stops polling a body whose declared length has been sent: it is whole then.
        if http_body::Body::is_end_stream(&self.body)
            && let Some(link) = self.link.take()
        {
            self.links.put(link);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// How a stand-in listener answers each request.
    #[derive(Clone, Copy, PartialEq)]
    enum Answer {
        /// `200 ok`, keeping the connection.
        Ok,
        /// `200 ok`, then closing the connection (as an agent does with an idle one).
        OkThenClose,
        /// Nothing, ever.
        Never,
    }

    /// A minimal HTTP/1.1 listener: counts connections, reads each request head and its
    /// `content-length` body, answers as told.
    async fn listener(answer: Answer) -> (url::Url, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = url::Url::parse(&format!("http://{}", l.local_addr().unwrap())).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if buf.len() < end + 4 + length {
                            continue;
                        }
                        buf.drain(..end + 4 + length);
                        match answer {
                            Answer::Never => std::future::pending::<()>().await,
                            _ => s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap(),
                        }
                        if answer == Answer::OkThenClose {
                            return;
                        }
                    }
                });
            }
        });
        (base, accepted)
    }

    /// Links to a new stand-in listener, and its count of accepted connections.
    async fn links_to(answer: Answer) -> (Arc<Links>, Arc<AtomicUsize>) {
        let (base, accepted) = listener(answer).await;
        (Arc::new(Links::new(&base).unwrap()), accepted)
    }

    fn post(body: &'static str) -> Request<Body> {
        let mut r = Request::new(Body::from(body));
        *r.method_mut() = axum::http::Method::POST;
        *r.uri_mut() = "/invoke/x".parse().unwrap();
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        r
    }

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(10)
    }

    async fn text(links: &Arc<Links>, req: Request<Body>) -> String {
        let res = links.send(req, soon()).await.unwrap();
        assert_eq!(res.status(), 200);
        let bytes = axum::body::to_bytes(Body::new(res.into_body()), 1 << 20).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_response_read_to_its_end_gives_its_connection_back_for_the_next_request() {
        let (links, accepted) = links_to(Answer::Ok).await;
        for i in 0..3 {
            assert_eq!(text(&links, post("ping")).await, "ok", "request {i}");
            assert_eq!(links.idle(), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection carried all three");

        // A response dropped before its end closes its connection instead.
        let res = links.send(post("ping"), soon()).await.unwrap();
        assert_eq!(links.idle(), 0, "the connection is the response's while it is read");
        drop(res);
        assert_eq!(links.idle(), 0);
        assert_eq!(text(&links, post("ping")).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_pooled_connection_the_listener_closed_is_replaced_without_failing_the_request() {
        let (links, accepted) = links_to(Answer::OkThenClose).await;
        assert_eq!(text(&links, post("one")).await, "ok");
        // The listener closes it after answering; a request with a body still goes through.
        assert_eq!(text(&links, post("two")).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn no_answer_before_the_deadline_is_a_timeout_and_no_listener_is_a_connect_failure() {
        let (links, _) = links_to(Answer::Never).await;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        let failure = links.send(post("ping"), deadline).await.err().unwrap();
        assert!(failure.is_timeout(), "{failure}");
        assert_eq!(links.idle(), 0);

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = url::Url::parse(&format!("http://{}", closed.local_addr().unwrap())).unwrap();
        drop(closed);
        let failure = Arc::new(Links::new(&gone).unwrap()).send(post("ping"), soon()).await.err().unwrap();
        assert!(failure.is_connect(), "{failure}");
    }

    #[test]
    fn only_plain_http_listeners_are_served() {
        let links = Links::new(&url::Url::parse("http://10.0.0.7:9000/base").unwrap()).unwrap();
        assert_eq!(links.addr, "10.0.0.7:9000");
        assert!(links.serve(&url::Url::parse("http://10.0.0.7:9000/other").unwrap()));
        assert!(!links.serve(&url::Url::parse("http://10.0.0.8:9000").unwrap()));
        assert!(Links::new(&url::Url::parse("https://10.0.0.7").unwrap()).is_none());
    }
}
