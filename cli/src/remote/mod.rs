//! Images at HTTP(S) URLs, read in place: [`HttpSource`] is a [`ReadAt`] that turns positional
//! reads into `Range` requests, through a bounded page cache, pinned to one version of the
//! object.
//!
//! # What a server must give
//! - **A size** (`Content-Range`'s total, else `Content-Length`), at most [`MAX_SIZE`]: a body
//!   whose end only the closing of the connection marks cannot be told from a truncated one,
//!   so such a server is refused (as qemu's curl driver does).
//! - **Validators** (`ETag`, strong or weak, and `Last-Modified`) are compared on every reply:
//!   any change, or one that was there and is gone, means the object changed, and the read
//!   fails. Only a strong ETag pins a read of several requests: without one (no validator, a
//!   weak ETag, only Last-Modified) `checksum` reads the object in one GET (its digest is of
//!   one response), `upload` refuses it, and the commands that read at offsets warn. Bytes
//!   read twice are compared ([`Inner::verify_cached`]).
//! - **No redirects**: none is followed (it could carry an auth token elsewhere); the error
//!   names the status and the `Location`.
//!
//! # Time
//! A reply must start within [`RESPONSE_TIMEOUT`], and no read may wait longer than
//! [`STALL_TIMEOUT`] for a byte; a slow body that keeps arriving is not cut. Transient failures
//! (connection trouble, timeouts, 408, 429, 5xx) are retried [`ATTEMPTS`] times within
//! [`RETRY_BUDGET`]; other 4xx are final. A SIGINT/SIGTERM stops a blocked read within
//! [`cancel::POLL`] ([`cancel`]).
//!
//! # Security
//! Every response is hostile input: sizes, `Content-Range` and validators are checked against
//! what was asked and what the first response said, and nothing a server says sizes an
//! allocation beyond what was asked for. URLs are shown without userinfo and query (a presigned
//! URL's signature is a credential), and header values are [`Secret`]s.

pub(crate) mod cancel;
mod pages;
mod readahead;
mod session;
pub(crate) mod url;

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use glimpse_formats::limits::Charge;
use glimpse_formats::ReadAt;
use ureq::http::{HeaderMap, Response};
use ureq::{Agent, Body};

use self::pages::{Pages, Streams, PAGE, WINDOW_MAX};
pub use self::session::{
    annotate, configure, display, is_remote, log_transfers, open, Config, Opts,
};
pub use self::url::{is_url, shown};
pub use crate::cmd::upload::http::Secret;

/// Bytes the first request asks for (format detection reads them).
pub const BLOCK: u64 = 256 << 10;
/// The page cache, charged to the command's memory budget.
const CACHE_BYTES: u64 = 32 << 20;
/// Reads at least this large go straight into the caller's buffer, bypassing the cache.
const DIRECT: usize = 1 << 20;
/// What the readahead of the misses in flight on one source may add, together, to the pages
/// they ask for: each thread that misses holds a buffer of its fetch until the cache has it,
/// and with a window of up to 4 MiB each, `compare URL URL` grew by 3.8 MB per rayon worker
/// (RAYON_NUM_THREADS=16: 274 MB, 249-262 MB with this bound).
const INFLIGHT_AHEAD: u64 = 2 * WINDOW_MAX;
/// Miss buffers a source keeps for reuse: a buffer allocated on one thread and freed on
/// another stays in the first one's allocator arena, so fresh ones per miss added up.
const SPARE_BUFFERS: usize = 2;
/// Tries per request (connection resets, timeouts, 408, 429, 5xx), with doubling backoff.
pub const ATTEMPTS: u32 = 5;
const BACKOFF: Duration = Duration::from_millis(100);
/// No new try of a request starts this long after its first: a server that fails slowly
/// (each try just under a timeout) holds a request for at most this plus one try.
pub const RETRY_BUDGET: Duration = Duration::from_secs(120);
/// How long a GET may take to send its status line and headers before it is retried.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one read may wait for the next byte of a reply: a server that sends nothing for
/// this long is stalled, and the try fails (a slow body that keeps arriving is not cut).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a ranged GET (at most 4 MiB) may take in all; the whole-object GET of a
/// server without range support has no such limit, only [`STALL_TIMEOUT`].
const RANGE_BODY_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest `Retry-After` (of a 429 or 503) glimpse waits; a server that asks for more
/// fails the request at once, with what it asked.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// The largest remote object glimpse reads: 1 TiB, the default `image_size_cap` of Glance
/// (so the largest image a default Glance stores). A server that claims more (up to 16 EiB)
/// would otherwise keep a `checksum` streaming for days.
pub const MAX_SIZE: u64 = 1 << 40;

/// What ranged reads of one object may transfer in all: this many times its size, plus
/// [`TRANSFER_SLACK`]. A parser reads each byte about once (a conversion once, a check of
/// its metadata far less), but a hostile layout can make it jump around so that every read
/// misses the cache and refetches a readahead window: a valid 32 MiB streamOptimized VMDK
/// whose grain tables list grains 4 MiB apart made `audit` read 12.4 GB (report audit-red 1).
pub const TRANSFER_FACTOR: u64 = 4;

/// The allowance every object has above [`TRANSFER_FACTOR`] times its size, for small objects.
pub const TRANSFER_SLACK: u64 = 64 << 20;

/// The request budget ([`Inner::min_fetch`]): requests an object may make of any size...
pub const FREE_REQUESTS: u64 = 4096;
/// ... and one more per page of the object (a random-order image of 4 KiB clusters reads each
/// in a request of its own), ...
pub const FREE_REQUEST_BYTES: u64 = PAGE;
/// ... after which requests must average this many bytes: an object of `S` bytes costs at
/// most `4096 + S / 4 KiB + (4 S + 64 MiB) / 256 KiB` requests (a 128 MiB object: 39,168;
/// the 80 MiB scattered VMDK that took 63,728 requests: about 26,500), and about one more per
/// thread reading at once.
pub const REQUEST_BYTES: u64 = 256 << 10;

/// What a source has cost on the wire so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Transfer {
    /// HTTP requests sent (retries included).
    pub requests: u64,
    /// Response body bytes received.
    pub bytes: u64,
}

impl Transfer {
    /// The `"transfer"` JSON object.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"requests": self.requests, "bytes": self.bytes})
    }
}

/// An object at an HTTP(S) URL, read with `Range` requests. Cheap to clone (clones share the
/// cache and the counters).
#[derive(Clone)]
pub struct HttpSource {
    inner: Arc<Inner>,
}

struct Inner {
    agent: Agent,
    url: String,
    shown: String,
    headers: Vec<(String, Secret)>,
    /// From `Content-Range`'s total (or `Content-Length` when ranges are not supported);
    /// always known once opened (an object of unknown size is refused).
    size: Option<u64>,
    /// As the first reply gave them, as bytes (an ETag may hold obs-text): a weak ETag too,
    /// and Last-Modified; neither can pin a range, but a change of either is a change of the
    /// object.
    etag: Option<Vec<u8>>,
    last_modified: Option<Vec<u8>>,
    ranges: bool,
    /// Pages of [`PAGE`] bytes ([`pages`]).
    cache: Pages,
    /// Pages being fetched right now (`[first, end)`), so that two readers do not fetch one
    /// page twice.
    inflight: Mutex<Vec<(u64, u64)>>,
    /// Buffers of finished misses, reused by the next ones ([`SPARE_BUFFERS`] at most).
    spare: Mutex<Vec<Vec<u8>>>,
    landed: Condvar,
    _charge: Option<Charge>,
    /// The readers running front to back, whose misses fetch ahead.
    streams: Streams,
    requests: AtomicU64,
    bytes: Arc<AtomicU64>,
    /// Bytes ranged reads have been allowed to receive: the first reply's, then each try's
    /// whole length before it is sent, so that reads in flight on several threads cannot pass
    /// the transfer bound together (they were checked against bytes received, and overshot it
    /// by up to 1.1 MiB: report remote-hostile F3). A try that fails keeps its share.
    reserved: AtomicU64,
    /// Whether a signal shuts `agent` down ([`cancel::watch_agent`]).
    watched: AtomicBool,
}

/// Why one attempt failed.
enum Fail {
    /// Worth another try: connection trouble, a timeout, a 5xx.
    Transient(String),
    /// Worth one more try, on another connection: a reply that breaks HTTP where the request
    /// may have gone out on a reused connection (stray bytes a server left after a reply), or
    /// a header block ureq misjudges after an interim 1xx reply.
    Once(String),
    /// A 429 or 503 whose `Retry-After` asks for this wait (at most [`MAX_RETRY_AFTER`]).
    Later(String, Duration),
    /// Final.
    Fatal(io::Error),
}

fn fatal(msg: impl Into<String>) -> Fail {
    Fail::Fatal(io::Error::other(msg.into()))
}

/// The message for a server that answers a ranged GET with the whole body.
pub const NO_RANGES: &str = "the server does not support range requests (it answered a ranged \
GET with the whole body): download the image first; only `glimpse checksum` can stream from it";

impl HttpSource {
    /// Opens `url`: the first request (a ranged GET of the first block, which detection needs
    /// anyway) learns the size, the validator (ETag, else Last-Modified) and whether the
    /// server honours `Range`. `headers` go on every request (an auth token).
    ///
    /// # Errors
    /// The server cannot be reached, answers with an error status, or its answer is
    /// inconsistent (a `Content-Range` that is not what was asked).
    pub fn open(agent: Agent, url: &str, headers: Vec<(String, Secret)>) -> anyhow::Result<Self> {
        Self::open_with_cache(agent, url, headers, CACHE_BYTES)
    }

    /// As [`HttpSource::open`], with a page cache of `cache_bytes` (at least one readahead
    /// window) charged to the command's budget instead of the default 32 MiB: a command that
    /// holds many sources at once (`audit -j N`) gives each a smaller one.
    ///
    /// # Errors
    /// As [`HttpSource::open`].
    pub fn open_with_cache(
        agent: Agent,
        url: &str,
        headers: Vec<(String, Secret)>,
        cache_bytes: u64,
    ) -> anyhow::Result<Self> {
        let cache_bytes = cache_bytes.max(WINDOW_MAX);
        let shown = shown(url);
        if !url::parses(url) {
            // Where ureq would send it is not what the text says (`http://u:pa/ss@h/` goes to
            // the host `u`): nothing is sent, and nothing of it is printed.
            anyhow::bail!(
                "{shown}: glimpse reads http(s)://[user:password@]host[:port]/path URLs; \
                 percent-encode '/', '?', '#' and '@' in a user name or password"
            );
        }
        let budget = crate::common::limits().budget();
        let charge = budget
            .charge(cache_bytes, "the HTTP block cache")
            .map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
        let mut inner = Inner {
            agent,
            url: url.to_string(),
            shown,
            headers,
            size: None,
            etag: None,
            last_modified: None,
            ranges: false,
            cache: Pages::new(usize::try_from(cache_bytes / PAGE).unwrap_or(8192)),
            inflight: Mutex::new(Vec::new()),
            spare: Mutex::new(Vec::new()),
            landed: Condvar::new(),
            _charge: Some(charge),
            streams: Streams::default(),
            requests: AtomicU64::new(0),
            bytes: Arc::new(AtomicU64::new(0)),
            reserved: AtomicU64::new(0),
            watched: AtomicBool::new(false),
        };
        let first = inner.probe()?;
        inner
            .reserved
            .store(inner.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        if let Some(block) = first {
            inner.keep(0, &block).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(HttpSource {
            inner: Arc::new(inner),
        })
    }

    /// Requests and body bytes so far.
    pub fn transfer(&self) -> Transfer {
        Transfer {
            requests: self.inner.requests.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
        }
    }

    /// True when the server answers `Range` requests (else only [`HttpSource::stream`] reads).
    pub fn ranges_supported(&self) -> bool {
        self.inner.ranges
    }

    /// The size, when the server said it.
    pub fn size_hint(&self) -> Option<u64> {
        self.inner.size
    }

    /// Why the object is not pinned, for a warning or a refusal; `None` when it is: when the
    /// server gave a strong ETag, which alone ties the bytes of two requests to one version of
    /// the object (RFC 9110 13.1.5, RFC 9111 3.4): a weak ETag or a Last-Modified (one-second
    /// resolution) may stay the same across a change.
    pub fn unpinned_reason(&self) -> Option<&'static str> {
        let i = &*self.inner;
        if i.pinned() {
            return None;
        }
        Some(match (&i.etag, &i.last_modified) {
            (Some(_), _) => {
                "the server sends only a weak ETag, which may stay the same when the object \
                 changes"
            }
            (None, Some(_)) => {
                "the server sends no ETag, only a Last-Modified, which may stay the same when \
                 the object changes within a second"
            }
            (None, None) => "the server sends no ETag or Last-Modified",
        })
    }

    /// The URL as it may be shown: no userinfo, no query, no fragment.
    pub fn shown(&self) -> &str {
        &self.inner.shown
    }

    /// The whole object, front to back: with several range requests in flight when the
    /// server answers ranges and gives a strong ETag, else one streamed GET
    /// ([`HttpSource::stream`]): without one, the bytes of several requests could come from
    /// several versions of the object; one response is one version.
    ///
    /// # Errors
    /// As [`HttpSource::stream`].
    pub fn sequential(&self) -> io::Result<Box<dyn Read + Send>> {
        match (self.inner.ranges && self.inner.pinned(), self.inner.size) {
            (true, Some(size)) => Ok(Box::new(readahead::Readahead::new(self.clone(), size))),
            _ => Ok(Box::new(self.stream()?)),
        }
    }

    /// The object's whole body, front to back, in one GET. A connection lost mid-body is
    /// resumed with a ranged GET pinned to the same version when the server supports ranges.
    ///
    /// # Errors
    /// As [`HttpSource::open`]; the object changed since it was opened.
    pub fn stream(&self) -> io::Result<Stream> {
        let mut s = Stream {
            src: self.clone(),
            body: None,
            chunk: Vec::new(),
            at: 0,
            pos: 0,
        };
        s.connect()?;
        Ok(s)
    }
}

impl Inner {
    fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn count_bytes(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// True when the first reply gave a strong ETag: only that pins a read made of several
    /// requests (the validators are compared on every reply all the same,
    /// [`Inner::check_same`]).
    fn pinned(&self) -> bool {
        self.strong_etag().is_some()
    }

    fn strong_etag(&self) -> Option<&Vec<u8>> {
        self.etag.as_ref().filter(|e| !e.starts_with(b"W/"))
    }

    /// The `If-Range` value: a strong ETag, else Last-Modified (a weak ETag cannot pin; a
    /// Last-Modified is no pin either, but it costs nothing to send).
    fn if_range(&self) -> Option<&Vec<u8>> {
        self.strong_etag().or(self.last_modified.as_ref())
    }

    /// Sends a GET with `range` (inclusive ends; no end: to the end of the object) and the
    /// pinning header. `here`: on this thread, where a signal ends the wait for the reply by
    /// shutting the connections down ([`cancel::watch_agent`]), but not a connect or a name
    /// lookup (those are bounded by their timeouts); else on a worker thread, whose wait a
    /// signal ends at any step ([`cancel::run`]) but which costs two thread wake-ups.
    fn get(
        &self,
        range: Option<(u64, Option<u64>)>,
        pin: bool,
        here: bool,
    ) -> Result<Response<Body>, Fail> {
        // The agent waits an hour for an answer (Glance answers a PUT only once it has stored
        // the data); a GET that has not started answering soon is retried instead. A ranged
        // GET is at most a few MiB; the whole-object GET is only bounded by the stall limit.
        let whole = !matches!(range, Some((_, Some(_))));
        let mut req = self
            .agent
            .get(&self.url)
            .config()
            .timeout_recv_response(Some(RESPONSE_TIMEOUT))
            .timeout_per_read(Some(STALL_TIMEOUT))
            .timeout_recv_body((!whole).then_some(RANGE_BODY_TIMEOUT))
            // ureq 3.5.2 compares the whole input buffer (the final reply's head and body
            // already read) with this limit after it skips an interim 1xx reply, and fails
            // with "response header is too big" when a 100/102/103 came first. The buffer is
            // the real bound on a head; with this limit at its size that check cannot trip.
            .max_response_header_size(self.agent.config().input_buffer_size().max(64 << 10))
            .build();
        match range {
            Some((a, Some(b))) => req = req.header("Range", format!("bytes={a}-{b}")),
            Some((a, None)) => req = req.header("Range", format!("bytes={a}-")),
            None => {}
        }
        if pin {
            if let Some(v) = self.if_range() {
                req = req.header("If-Range", v.as_slice());
            }
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.expose());
        }
        if !self.watched.load(Ordering::Relaxed) && cancel::watch_agent(&self.agent) {
            self.watched.store(true, Ordering::Relaxed);
        }
        self.count_request();
        let reply = if here {
            if cancel::cancelled() {
                return Err(Fail::Fatal(cancel::interrupted()));
            }
            req.call()
        } else {
            cancel::run(move || req.call()).map_err(Fail::Fatal)?
        };
        match reply {
            Ok(mut r) => {
                let status = r.status().as_u16();
                if status == 429 || status == 503 {
                    if let Some(ra) = header(r.headers(), "retry-after") {
                        return Err(retry_after(status, &ra));
                    }
                }
                if status >= 500 || status == 408 || status == 429 {
                    return Err(Fail::Transient(format!("HTTP {status}")));
                }
                if matches!(status, 301 | 302 | 303 | 307 | 308) {
                    let to = header(r.headers(), "location").map_or_else(
                        || "no Location given".into(),
                        |l| format!("to {}", url::shown_location(&l, &self.url)),
                    );
                    return Err(fatal(format!(
                        "HTTP {status}: the server redirects ({to}); glimpse follows no \
                         redirects (one could carry credentials to another host): give the \
                         final URL"
                    )));
                }
                if status >= 400 {
                    return Err(fatal(status_message(status, &mut r)));
                }
                refuse_encoding(r.headers()).map_err(fatal)?;
                Ok(r)
            }
            Err(e) => Err(classify(e)),
        }
    }

    /// Runs `attempt` up to [`ATTEMPTS`] times within [`RETRY_BUDGET`], backing off after
    /// transient failures. `attempt` is told whether it is the first try.
    fn retry<T>(&self, mut attempt: impl FnMut(bool) -> Result<T, Fail>) -> io::Result<T> {
        let start = Instant::now();
        let mut wait = BACKOFF;
        let mut last = String::new();
        let mut tries = 0;
        let mut once = false;
        let mut asked: Option<Duration> = None;
        while tries < ATTEMPTS {
            if tries > 0 {
                if start.elapsed() >= RETRY_BUDGET {
                    break;
                }
                match asked.take() {
                    Some(d) => cancel::sleep(d)?,
                    None => {
                        cancel::sleep(wait)?;
                        wait = wait.saturating_mul(2);
                    }
                }
            }
            tries += 1;
            match attempt(tries == 1) {
                Ok(v) => return Ok(v),
                // A signal shut the connections down ([`cancel::watch_agent`]): whatever the
                // read said, it is an interrupted one.
                Err(_) if cancel::cancelled() => return Err(cancel::interrupted()),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Transient(m)) => last = m,
                Err(Fail::Once(m)) if once => return Err(io::Error::other(m)),
                Err(Fail::Once(m)) => {
                    once = true;
                    last = m;
                }
                Err(Fail::Later(m, d)) => {
                    if start.elapsed().saturating_add(d) >= RETRY_BUDGET {
                        return Err(io::Error::other(format!(
                            "{m}, which would end past the {} s glimpse retries a request",
                            RETRY_BUDGET.as_secs()
                        )));
                    }
                    asked = Some(d);
                    last = m;
                }
            }
        }
        Err(io::Error::other(format!(
            "gave up after {tries} tries in {} s: {last}",
            start.elapsed().as_secs()
        )))
    }

    /// The first request. Returns the first block when the server sent it.
    fn probe(&mut self) -> anyhow::Result<Option<Arc<[u8]>>> {
        let shown = self.shown.clone();
        let this = &*self;
        let (size, ranges, etag, lm, block) = this
            .retry(|_| {
                // The first request goes out on a new connection: a reply that breaks HTTP is
                // the server's, not stray bytes of an earlier reply, and is final.
                let resp =
                    this.get(Some((0, Some(BLOCK - 1))), false, false)
                        .map_err(|e| match e {
                            Fail::Once(m) => fatal(m),
                            other => other,
                        })?;
                let status = resp.status().as_u16();
                let etag = header_bytes(resp.headers(), "etag");
                let lm = header_bytes(resp.headers(), "last-modified");
                match status {
                    206 => {
                        let (a, b, total) = content_range(resp.headers())?;
                        let total = total
                            .ok_or_else(|| fatal("the server did not say the object's size"))?;
                        check_size(total, session::max_size())?;
                        let want_end = total.min(BLOCK).saturating_sub(1);
                        if a != 0 || b != want_end {
                            return Err(fatal(format!(
                                "the server returned bytes {a}-{b} when bytes 0-{want_end} were \
                                 asked"
                            )));
                        }
                        let buf = this.read_body(resp, want_end + 1)?;
                        Ok((total, true, etag, lm, Some(Arc::from(buf))))
                    }
                    416 => {
                        // Only an empty object has no byte 0.
                        match content_range_star(resp.headers()) {
                            Some(0) => Ok((0, true, etag, lm, None)),
                            _ => Err(fatal("the server refused the range 0-")),
                        }
                    }
                    200 => {
                        let len = resp.body().content_length().ok_or_else(|| {
                            fatal(
                                "the server did not say the object's size (no Content-Length, \
                                 no range support): the end of its body could not be told from \
                                 a connection cut short, so it is not read",
                            )
                        })?;
                        check_size(len, session::max_size())?;
                        Ok((len, false, etag, lm, None))
                    }
                    s => Err(fatal(format!("unexpected HTTP {s} to a GET"))),
                }
            })
            .map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
        self.etag = etag;
        self.last_modified = lm;
        self.size = Some(size);
        self.ranges = ranges;
        Ok(block)
    }

    /// Reads exactly `len` body bytes (a short body is transient: the connection dropped).
    fn read_body(&self, resp: Response<Body>, len: u64) -> Result<Vec<u8>, Fail> {
        let n = usize::try_from(len).map_err(|_| fatal("range too large"))?;
        let mut buf = vec![0; n];
        read_body_into(resp, &mut buf, &self.bytes)?;
        Ok(buf)
    }

    /// Checks that a reply is the pinned object: the same validators (a missing one where the
    /// first reply had one counts as a change, weak ETags are compared too), the same total.
    fn check_same(&self, headers: &HeaderMap, total: Option<u64>) -> Result<(), Fail> {
        let changed = |what: &str| {
            fatal(format!(
                "the object changed on the server while it was being read (its {what} \
                 differs): start again"
            ))
        };
        if header_bytes(headers, "etag") != self.etag {
            return Err(changed("ETag"));
        }
        if header_bytes(headers, "last-modified") != self.last_modified {
            return Err(changed("Last-Modified"));
        }
        if total.is_some() && total != self.size {
            return Err(changed("size"));
        }
        Ok(())
    }

    /// Fills `buf` with the bytes at `offset` (all inside the object) in one ranged GET. The
    /// body is read on this thread, straight into `buf`: a signal ends a read blocked on a
    /// stalled server by shutting the agent's connections down ([`cancel::watch_agent`]).
    fn fetch(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if !self.ranges {
            return Err(io::Error::new(io::ErrorKind::Unsupported, NO_RANGES));
        }
        let end = offset
            .checked_add(buf.len() as u64 - 1)
            .ok_or_else(|| io::Error::other("range past 2^64"))?;
        let allowance = self
            .size
            .unwrap_or(0)
            .saturating_mul(TRANSFER_FACTOR)
            .saturating_add(TRANSFER_SLACK);
        let want = buf.len() as u64;
        // Each try takes its share of the allowance before it is sent.
        let reserve = || {
            self.reserved
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                    r.checked_add(want).filter(|&t| t <= allowance)
                })
                .map(drop)
                .map_err(|taken| {
                    fatal(format!(
                        "reading this object has already taken {taken} bytes in {} requests, \
                         and more would pass {allowance} ({TRANSFER_FACTOR} times its size and \
                         {} MiB): its layout makes the reader jump around; download it and \
                         inspect the file",
                        self.requests.load(Ordering::Relaxed),
                        TRANSFER_SLACK >> 20
                    ))
                })
        };
        // The first try sends from this thread: the server answered the request before (the
        // probe at least), and a ranged read is the step a `convert` makes hundreds of times,
        // where the worker's two wake-ups cost 10% of its time. A retry, which follows a
        // failure that can be a server gone away, waits on a worker.
        self.retry(|first| {
            reserve()?;
            let resp = self.get(Some((offset, Some(end))), true, first)?;
            match resp.status().as_u16() {
                206 => {}
                200 | 412 => {
                    return Err(fatal(
                        "the object changed on the server while it was being read (the server \
                         no longer matches its ETag/Last-Modified): start again",
                    ))
                }
                s => return Err(fatal(format!("unexpected HTTP {s} to a ranged GET"))),
            }
            let (a, b, total) = content_range(resp.headers())?;
            self.check_same(resp.headers(), total)?;
            if (a, b) != (offset, end) {
                return Err(fatal(format!(
                    "the server returned bytes {a}-{b} when bytes {offset}-{end} were asked"
                )));
            }
            read_body_into(resp, buf, &self.bytes)
        })
    }

    /// The `len` bytes at `offset` (all inside the object), in one ranged GET.
    fn fetch_vec(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.fetch(&mut buf, offset)?;
        Ok(buf)
    }

    /// As [`Inner::fetch`], but the whole pages that open the range come from the cache when
    /// they are there (the first block, which opening the source fetched): a front-to-back
    /// read does not fetch them again.
    fn fetch_after_cached(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        let first = match offset % PAGE {
            0 => self.cache.get(offset / PAGE)?,
            _ => None,
        };
        if first.is_none() {
            // The usual case: nothing cached, the fetched buffer is the chunk.
            return self.fetch_vec(len, offset);
        }
        let mut buf = vec![0; len];
        let mut done = 0usize;
        loop {
            let pos = offset.saturating_add(done as u64);
            if pos % PAGE != 0 {
                break;
            }
            let Some(block) = self.cache.get(pos / PAGE)? else {
                break;
            };
            let Some(dst) = buf.get_mut(done..done.saturating_add(block.len())) else {
                break;
            };
            dst.copy_from_slice(&block);
            done = done.saturating_add(block.len());
            if block.len() as u64 != PAGE {
                break;
            }
        }
        if let Some(rest) = buf.get_mut(done..) {
            self.fetch(rest, offset.saturating_add(done as u64))?;
        }
        Ok(buf)
    }

    /// Fails when `buf`, the bytes at `offset` just fetched, differ from a cached block they
    /// overlap: the server sent two contents under one strong ETag (an in-place rewrite its
    /// ETag did not see, or a cache in front of it serving a stale copy). Bytes are compared
    /// only where a large read fetches again what the cache holds (the first block, which
    /// detection read, when `convert` reads from the start); a front-to-back `checksum` takes
    /// the first block from the cache and fetches each byte once, so it compares nothing.
    fn verify_cached(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        let mut b = offset / PAGE;
        while let Some(start) = b.checked_mul(PAGE).filter(|&s| s < end) {
            if let Some(block) = self.cache.get(b)? {
                let lo = start.max(offset);
                let hi = start.saturating_add(block.len() as u64).min(end);
                let at = |x: u64, base: u64| usize::try_from(x.saturating_sub(base)).ok();
                let cached = at(lo, start)
                    .zip(at(hi, start))
                    .and_then(|(l, h)| block.get(l..h));
                let fetched = at(lo, offset)
                    .zip(at(hi, offset))
                    .and_then(|(l, h)| buf.get(l..h));
                if lo < hi && cached != fetched {
                    return Err(io::Error::other(format!(
                        "the object changed on the server while it was being read (bytes at \
                         {lo:#x} differ between two replies under the same ETag: the server \
                         changed the content without changing its ETag): start again"
                    )));
                }
            }
            b = b.saturating_add(1);
        }
        Ok(())
    }

    /// Keeps `bytes`, which start at page `first`, in the cache, page by page.
    fn keep(&self, first: u64, bytes: &[u8]) -> io::Result<()> {
        for (i, chunk) in bytes.chunks(PAGE as usize).enumerate() {
            self.cache.put(first.saturating_add(i as u64), chunk)?;
        }
        Ok(())
    }

    /// The least a cache miss must fetch now, by the request budget: nothing past what it
    /// asks for while the source has made at most [`Inner::free_requests`] requests; past
    /// them, each request must bring the bytes reserved so far up to [`REQUEST_BYTES`] per
    /// request past the free ones (at most [`WINDOW_MAX`] at once). So a command makes at
    /// most `free_requests + allowance / REQUEST_BYTES` requests of an object, however its
    /// layout makes the reader jump about; a reader that fetches each page about once (front
    /// to back, a random-order image of clusters of 4 KiB or more) never pays anything.
    fn min_fetch(&self, size: u64) -> u64 {
        let made = self.requests.load(Ordering::Relaxed);
        let free = self.free_requests(size);
        let Some(past) = made.checked_sub(free) else {
            return 0;
        };
        REQUEST_BYTES
            .saturating_mul(past.saturating_add(1))
            .saturating_sub(self.reserved.load(Ordering::Relaxed))
            .min(WINDOW_MAX)
    }

    /// Requests an object may make before [`Inner::min_fetch`] grows its fetches:
    /// [`FREE_REQUESTS`] and one per [`FREE_REQUEST_BYTES`] of the object: a reader that
    /// fetches each page of the object about once, however small its requests, pays nothing.
    fn free_requests(&self, size: u64) -> u64 {
        FREE_REQUESTS.saturating_add(size / FREE_REQUEST_BYTES)
    }

    /// Fetches the pages from `p` (not cached) to `last` (inclusive), and `window` bytes
    /// from page `p` on when that is more (a stream's readahead: it stops at the first page
    /// cached or being fetched), and at least [`Inner::min_fetch`] bytes (the request budget:
    /// cached pages are fetched again for it, and it starts before `p` near the object's
    /// end). Returns the bytes from page `p` on (the cache keeps all of them), and where page
    /// `p` starts in them; `None` when another reader is fetching page `p` (wait, then look in
    /// the cache again).
    fn load(
        &self,
        p: u64,
        last: u64,
        window: u64,
        size: u64,
    ) -> io::Result<Option<(Vec<u8>, usize)>> {
        let busy = |v: &[(u64, u64)], q: u64| v.iter().any(|&(a, b)| a <= q && q < b);
        let mut inflight = self
            .inflight
            .lock()
            .map_err(|_| io::Error::other("cache poisoned"))?;
        if busy(&inflight, p) {
            let _unused = self
                .landed
                .wait(inflight)
                .map_err(|_| io::Error::other("cache poisoned"))?;
            return Ok(None);
        }
        let pages = size.div_ceil(PAGE);
        if p >= pages || last < p {
            return Err(io::Error::other("a page past the end of the object"));
        }
        let mut end = last.saturating_add(1).min(pages);
        let held: u64 = inflight
            .iter()
            .map(|&(a, b)| b.saturating_sub(a))
            .fold(0, u64::saturating_add);
        let room = (INFLIGHT_AHEAD / PAGE).saturating_sub(held);
        let ahead = p.saturating_add((window / PAGE).min(room)).min(pages);
        while end < ahead && !busy(&inflight, end) && !self.cache.has(end) {
            end = end.saturating_add(1);
        }
        let least = self.min_fetch(size).div_ceil(PAGE);
        end = end.max(p.saturating_add(least).min(pages));
        let first = p.min(end.saturating_sub(least));
        inflight.push((first, end));
        drop(inflight);
        let result = page_span(first, end, size)
            .ok_or_else(|| io::Error::other("a page past the end of the object"))
            .and_then(|(start, stop)| {
                let len = usize::try_from(stop - start).map_err(io::Error::other)?;
                let mut buf = self
                    .spare
                    .lock()
                    .ok()
                    .and_then(|mut s| s.pop())
                    .unwrap_or_default();
                buf.clear();
                buf.resize(len, 0);
                self.fetch(&mut buf, start).map(|()| buf)
            });
        let kept = match &result {
            Ok(buf) => self.keep(first, buf),
            Err(_) => Ok(()),
        };
        if let Ok(mut inflight) = self.inflight.lock() {
            inflight.retain(|&r| r != (first, end));
        }
        self.landed.notify_all();
        kept?;
        let skip = usize::try_from((p - first).saturating_mul(PAGE)).map_err(io::Error::other)?;
        result.map(|buf| Some((buf, skip)))
    }

    /// Gives a miss's buffer back for the next miss to reuse.
    fn give_back(&self, buf: Vec<u8>) {
        if let Ok(mut s) = self.spare.lock() {
            if s.len() < SPARE_BUFFERS {
                s.push(buf);
            }
        }
    }

    /// A read of less than [`DIRECT`] bytes at `offset` (all inside the object), through the
    /// cache: a miss fetches what is asked, rounded out to pages, and a read that continues a
    /// stream also fetches ahead of it ([`pages`]).
    fn read_cached(&self, buf: &mut [u8], offset: u64, size: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        let end = offset.saturating_add(len);
        let last = end.saturating_sub(1) / PAGE;
        let miss = !self.cache.has(offset / PAGE);
        let mut window = self.streams.read(offset, len, miss);
        let mut done = 0usize;
        while let Some(dst) = buf.get_mut(done..).filter(|d| !d.is_empty()) {
            let pos = offset.saturating_add(done as u64);
            let p = pos / PAGE;
            let page_start = p.saturating_mul(PAGE);
            let within = usize::try_from(pos - page_start).map_err(io::Error::other)?;
            let mut copy = |src: &[u8]| {
                let src = src.get(within..).unwrap_or_default();
                let n = src.len().min(dst.len());
                if let (Some(d), Some(s)) = (dst.get_mut(..n), src.get(..n)) {
                    d.copy_from_slice(s);
                }
                n
            };
            let n = match self.cache.with(p, &mut copy)? {
                Some(n) => n,
                None => match self.load(p, last, window, size)? {
                    Some((fetched, skip)) => {
                        let n = copy(fetched.get(skip..).unwrap_or_default());
                        self.give_back(fetched);
                        n
                    }
                    None => continue,
                },
            };
            // One window per read.
            window = 0;
            if n == 0 {
                return Err(io::Error::other("an empty page"));
            }
            done = done.saturating_add(n);
        }
        Ok(())
    }
}

impl ReadAt for HttpSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let inner = &*self.inner;
        if !inner.ranges {
            return Err(io::Error::new(io::ErrorKind::Unsupported, NO_RANGES));
        }
        let size = self.size()?;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let avail = usize::try_from(size - offset).unwrap_or(usize::MAX);
        let len = buf.len().min(avail);
        let buf = buf.get_mut(..len).unwrap_or_default();
        if len >= DIRECT {
            // A stream that reads large and small pieces in turn (a guest reader's runs of
            // contiguous clusters, and the odd cluster between them) stays one stream.
            inner.streams.read(offset, len as u64, false);
            inner.fetch(buf, offset)?;
            inner.verify_cached(buf, offset)?;
            return Ok(len);
        }
        inner.read_cached(buf, offset, size)?;
        Ok(len)
    }

    fn size(&self) -> io::Result<u64> {
        self.inner
            .size
            .ok_or_else(|| io::Error::other("the server did not say the object's size"))
    }
}

/// The body of an [`HttpSource`], front to back.
pub struct Stream {
    src: HttpSource,
    /// The chunks a worker thread reads from the reply ([`pump`]), waited for in slices so
    /// that a signal ends the wait.
    body: Option<Receiver<io::Result<Vec<u8>>>>,
    chunk: Vec<u8>,
    at: usize,
    pos: u64,
}

/// Bytes per chunk a [`pump`] hands over; it holds at most three (two queued, one being read).
const PUMP_CHUNK: usize = 256 << 10;

impl Stream {
    /// True when a cut body can be resumed with a ranged GET pinned to the same version.
    fn resumable(&self) -> bool {
        self.src.inner.ranges && self.src.inner.pinned()
    }

    fn connect(&mut self) -> io::Result<()> {
        let inner = &*self.src.inner;
        let pos = self.pos;
        let resp = inner.retry(|_| {
            let resumed = pos > 0;
            let resp = inner.get(resumed.then_some((pos, None)), resumed, false)?;
            match resp.status().as_u16() {
                200 if !resumed => {
                    let len = resp.body().content_length();
                    inner.check_same(resp.headers(), len)?;
                }
                206 if resumed => {
                    let (a, _, total) = content_range(resp.headers())?;
                    inner.check_same(resp.headers(), total)?;
                    if a != pos {
                        return Err(fatal(format!(
                            "the server resumed at byte {a} when byte {pos} was asked"
                        )));
                    }
                }
                200 | 412 => {
                    return Err(fatal(
                        "the object changed on the server while it was being read: start again",
                    ))
                }
                s => return Err(fatal(format!("unexpected HTTP {s} to a GET"))),
            }
            Ok(resp)
        })?;
        let reader = resp.into_body().into_reader();
        let (tx, rx) = sync_channel(2);
        std::thread::Builder::new()
            .name("glimpse-http-body".into())
            .spawn(move || pump(reader, &tx))?;
        self.body = Some(rx);
        self.chunk = Vec::new();
        self.at = 0;
        Ok(())
    }
}

/// How long a whole-object body that has given every byte of the object may take to mark its
/// end before it is taken as ended.
const END_GRACE: Duration = Duration::from_secs(2);

/// After the last byte of a body: true when more bytes come within [`END_GRACE`]; false at
/// its end, a read error (every byte came), or no word in that time.
fn body_end(rx: &Receiver<io::Result<Vec<u8>>>) -> io::Result<bool> {
    let deadline = Instant::now() + END_GRACE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        match rx.recv_timeout(left.min(cancel::POLL)) {
            Ok(Ok(c)) => return Ok(!c.is_empty()),
            Ok(Err(_)) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(false),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if cancel::cancelled() {
                    return Err(cancel::interrupted());
                }
            }
        }
    }
}

/// Reads a reply's body into chunks until its end, an error, or the reader going away.
fn pump(mut r: ureq::BodyReader<'static>, tx: &SyncSender<io::Result<Vec<u8>>>) {
    loop {
        let mut buf = vec![0; PUMP_CHUNK];
        let got = loop {
            match r.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        let (msg, last) = match got {
            Ok(n) => {
                buf.truncate(n);
                (Ok(buf), n == 0)
            }
            Err(e) => (Err(e), true),
        };
        if tx.send(msg).is_err() || last {
            return;
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut tries = 0;
        loop {
            if let Some(src) = self.chunk.get(self.at..).filter(|s| !s.is_empty()) {
                let n = src.len().min(buf.len());
                if let (Some(d), Some(s)) = (buf.get_mut(..n), src.get(..n)) {
                    d.copy_from_slice(s);
                }
                self.at += n;
                return Ok(n);
            }
            let Some(rx) = self.body.as_ref() else {
                return Ok(0);
            };
            let size = self.src.inner.size;
            if size == Some(self.pos) {
                // Every byte of the object came: the body's end is only waited for briefly (a
                // chunked body whose last chunk never comes cost the stall limit, 30 s, and
                // then failed as cut short: report remote-hostile F8), and a byte more is
                // still an error.
                let more = body_end(rx)?;
                self.body = None;
                if more {
                    return Err(io::Error::other(
                        "the server sent more bytes than the object's size",
                    ));
                }
                return Ok(0);
            }
            let failure = match cancel::wait(rx)? {
                Some(Ok(c)) if c.is_empty() => {
                    match size.filter(|&s| self.pos < s) {
                        // The connection closed early.
                        // Not UnexpectedEof: readers turn that into "unexpected end of data"
                        // at an offset of their own, which hides what happened.
                        Some(s) => io::Error::other(format!(
                            "the body ended after {} of the {s} bytes the server announced",
                            self.pos
                        )),
                        None => {
                            self.body = None;
                            return Ok(0);
                        }
                    }
                }
                Some(Ok(c)) => {
                    self.pos = self.pos.saturating_add(c.len() as u64);
                    self.src.inner.count_bytes(c.len());
                    if size.is_some_and(|s| self.pos > s) {
                        return Err(io::Error::other(
                            "the server sent more bytes than the object's size",
                        ));
                    }
                    self.chunk = c;
                    self.at = 0;
                    continue;
                }
                Some(Err(e)) => io::Error::other(format!(
                    "the body ended after {} of the {} bytes the server announced: {e}",
                    self.pos,
                    size.unwrap_or(0)
                )),
                None => io::Error::other("the HTTP body reader stopped"),
            };
            if cancel::cancelled() {
                return Err(cancel::interrupted());
            }
            if !self.resumable() || tries >= ATTEMPTS {
                return Err(failure);
            }
            tries += 1;
            self.body = None;
            cancel::sleep(BACKOFF.saturating_mul(tries))?;
            self.connect()?;
        }
    }
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

/// A header's value as bytes (a validator may hold obs-text, 0x80-0xFF, which
/// [`header`] cannot give as text), without surrounding blanks.
fn header_bytes(h: &HeaderMap, name: &str) -> Option<Vec<u8>> {
    h.get(name).map(|v| v.as_bytes().trim_ascii().to_vec())
}

/// A 429 or 503 with `Retry-After: value`: a wait of at most [`MAX_RETRY_AFTER`] is waited
/// for; a longer one (or a date past it) fails at once, saying what the server asked.
fn retry_after(status: u16, value: &str) -> Fail {
    let wait = value
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
        .or_else(|| {
            let at = parse_http_date(value)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs();
            Some(Duration::from_secs(at.saturating_sub(now)))
        });
    match wait {
        Some(d) if d <= MAX_RETRY_AFTER => Fail::Later(
            format!("HTTP {status} (Retry-After: {value})"),
            d.max(BACKOFF),
        ),
        Some(d) => fatal(format!(
            "HTTP {status}: the server asks to retry after {} s (Retry-After: {value}), more \
             than the {} s glimpse waits: try again later",
            d.as_secs(),
            MAX_RETRY_AFTER.as_secs()
        )),
        // A value that is neither seconds nor a date: the usual backoff.
        None => Fail::Transient(format!("HTTP {status} (Retry-After: {value:?})")),
    }
}

/// Seconds since the epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form
/// RFC 9110 requires senders to use.
fn parse_http_date(v: &str) -> Option<u64> {
    let mut f = v.split_ascii_whitespace();
    let _weekday = f.next()?;
    let day: u64 = f.next()?.parse().ok()?;
    let month = f.next()?;
    let year: u64 = f.next()?.parse().ok()?;
    let mut hms = f.next()?.split(':').map(|x| x.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if f.next()? != "GMT" || f.next().is_some() || hms.next().is_some() {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = u64::try_from(MONTHS.iter().position(|&x| x == month)?).ok()?;
    if !(1970..=9999).contains(&year) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil, for years from 1970).
    let (y, mp) = if month >= 2 {
        (year, month.checked_sub(2)?)
    } else {
        (year.checked_sub(1)?, month.checked_add(10)?)
    };
    let era = y / 400;
    let yoe = y.checked_sub(era.checked_mul(400)?)?;
    let doy = (153u64.checked_mul(mp)?.checked_add(2)? / 5)
        .checked_add(day)?
        .checked_sub(1)?;
    let doe = yoe
        .checked_mul(365)?
        .checked_add(yoe / 4)?
        .checked_sub(yoe / 100)?
        .checked_add(doy)?;
    let days = era
        .checked_mul(146_097)?
        .checked_add(doe)?
        .checked_sub(719_468)?;
    days.checked_mul(86_400)?
        .checked_add(h.checked_mul(3600)?)?
        .checked_add(m.checked_mul(60)?)?
        .checked_add(sec)
}

/// `Content-Range: bytes A-B/TOTAL` (TOTAL may be `*`).
fn content_range(h: &HeaderMap) -> Result<(u64, u64, Option<u64>), Fail> {
    let v = header(h, "content-range")
        .ok_or_else(|| fatal("a partial reply (206) without Content-Range"))?;
    parse_content_range(&v)
        .ok_or_else(|| fatal(format!("a Content-Range that is not a byte range: {v:?}")))
}

fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.strip_prefix("bytes ")?.trim();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let a: u64 = a.trim().parse().ok()?;
    let b: u64 = b.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if a > b || total.is_some_and(|t| b >= t) {
        return None;
    }
    Some((a, b, total))
}

/// The total of `Content-Range: bytes */TOTAL` (a 416).
fn content_range_star(h: &HeaderMap) -> Option<u64> {
    header(h, "content-range")?
        .strip_prefix("bytes */")?
        .trim()
        .parse()
        .ok()
}

fn status_message(status: u16, resp: &mut Response<Body>) -> String {
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 << 10)
        .read_to_vec()
        .unwrap_or_default();
    format!("HTTP {status}: {}", crate::cmd::upload::http::reason(&body))
}

/// Connection trouble and timeouts are worth another try; a reply that breaks HTTP (a
/// Content-Length that is not a number) or a TLS failure (a certificate that is not trusted,
/// reported as invalid data) would fail the same way again.
fn classify(e: ureq::Error) -> Fail {
    match e {
        ureq::Error::Io(ref io) if io.kind() == io::ErrorKind::InvalidData => {
            Fail::Fatal(io::Error::other(e.to_string()))
        }
        // A reply that breaks HTTP may be stray bytes an earlier reply left on a pooled
        // connection (which ureq drops now): one more try goes out on another connection.
        // "response header is too big" can be ureq misjudging a head after a 1xx reply.
        ureq::Error::Protocol(_) | ureq::Error::LargeResponseHeader(..) => {
            Fail::Once(e.to_string())
        }
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::BodyStalled => Fail::Transient(e.to_string()),
        other => Fail::Fatal(io::Error::other(other.to_string())),
    }
}

/// True for a body read error that is ureq's "the reply breaks HTTP".
fn is_protocol(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|x| x.downcast_ref::<ureq::Error>())
        .is_some_and(|x| matches!(x, ureq::Error::Protocol(_)))
}

/// Refuses an object larger than `max` bytes (`--max-remote-size`, by default [`MAX_SIZE`]).
fn check_size(size: u64, max: u64) -> Result<(), Fail> {
    if size > max {
        return Err(fatal(format!(
            "the server says the object has {size} bytes, more than the {max} glimpse reads \
             from a URL (--max-remote-size; the default, 1T, is Glance's default \
             image_size_cap)"
        )));
    }
    Ok(())
}

/// `[start, end)` in bytes of pages `[p, end)` of an object of `size` bytes; `None` when
/// page `p` starts at or past the end (or past 2^64), or there are no pages.
fn page_span(p: u64, end: u64, size: u64) -> Option<(u64, u64)> {
    let start = p.checked_mul(PAGE)?;
    if start >= size || end <= p {
        return None;
    }
    let stop = end.checked_mul(PAGE).map_or(size, |e| e.min(size));
    Some((start, stop))
}

/// Refuses a reply whose body carries a `Content-Encoding` other than `identity`: glimpse
/// sends no `Accept-Encoding` and decodes nothing, so such a body is not the object's bytes
/// (RFC 9110 8.4, 12.5.3), whatever its length. Every reply of a remote read passes here
/// ([`Inner::get`]: the probe, ranged reads, the whole-object stream and its resumption, the
/// upload's source), and so does the data stream of `audit --verify-digests`: a digest or a
/// verdict of encoded bytes would be of something the server does not store.
///
/// # Errors
/// The message to show: the encoding, quoted.
pub(crate) fn refuse_encoding(h: &HeaderMap) -> Result<(), String> {
    for v in h.get_all("content-encoding") {
        let plain = v.to_str().is_ok_and(|t| {
            t.split(',')
                .map(str::trim)
                .all(|e| e.is_empty() || e.eq_ignore_ascii_case("identity"))
        });
        if !plain {
            let shown = String::from_utf8_lossy(v.as_bytes());
            return Err(format!(
                "the server sent the object with Content-Encoding: {}, which glimpse neither \
                 asks for nor decodes: its bytes are not the object's (serve the file as it is \
                 stored, without compression)",
                crate::common::printable(shown.trim())
            ));
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` body bytes (a short body is transient: the connection dropped).
fn read_body_into(resp: Response<Body>, buf: &mut [u8], bytes: &AtomicU64) -> Result<(), Fail> {
    // Only a body whose Content-Length is the length asked ends where ureq knows it ends; a
    // chunked or close-delimited one may not end for a while after its last byte (a server
    // that keeps the connection open and never sends the last chunk or the close).
    let delimited = resp.body().content_length() == Some(buf.len() as u64);
    let mut r = resp.into_body().into_reader();
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..) {
        if rest.is_empty() {
            break;
        }
        match r.read(rest) {
            Ok(0) => {
                return Err(Fail::Transient(format!(
                    "the body ended after {done} of {} bytes",
                    buf.len()
                )));
            }
            Ok(n) => {
                done += n;
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The body's framing is broken (a chunk size that is not a number): another try
            // of the same server would read the same.
            Err(e) if is_protocol(&e) => {
                return Err(fatal(format!("reading the body: {e}")));
            }
            Err(e) => return Err(Fail::Transient(format!("reading the body: {e}"))),
        }
    }
    // One more read sees the body's end, which hands the connection back to the agent's pool
    // for the next request (no new connect, no new TLS handshake). Only when the body was
    // length-delimited: then that read returns at once. Any other body is dropped unread to
    // its end, and so is its connection: waiting for a close or a last chunk that a server
    // never sends would cost [`STALL_TIMEOUT`] per request.
    if delimited {
        let _ = r.read(&mut [0u8; 1]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-9/10"), Some((0, 9, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("bytes 0-10/10"), None);
        assert_eq!(parse_content_range("bytes 0-1"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes -1-2/3"), None);
    }

    #[test]
    fn retry_after_is_waited_for_up_to_its_bound() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 12:00:00 GMT"),
            Some(951_825_600)
        );
        for bad in [
            "",
            "3600",
            "Sun, 06 Nov 1994 08:49:37",
            "Sun, 32 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
        assert!(matches!(retry_after(429, "2"), Fail::Later(_, d) if d == Duration::from_secs(2)));
        assert!(matches!(retry_after(503, "0"), Fail::Later(_, d) if d == BACKOFF));
        match retry_after(429, "3600") {
            Fail::Fatal(e) => assert!(e.to_string().contains("Retry-After: 3600"), "{e}"),
            _ => panic!("a wait of an hour"),
        }
        // a date in the past: at once; far ahead: refused
        assert!(matches!(
            retry_after(503, "Thu, 01 Jan 1970 00:00:00 GMT"),
            Fail::Later(..)
        ));
        assert!(matches!(
            retry_after(503, "Fri, 31 Dec 9999 23:59:59 GMT"),
            Fail::Fatal(_)
        ));
        assert!(matches!(retry_after(503, "soon"), Fail::Transient(_)));
    }

    #[test]
    fn page_spans_near_2_pow_64_do_not_overflow() {
        // The last page of a 2^64 - 1 byte object: its end, (p + 1) * PAGE, is 2^64.
        let size = u64::MAX;
        let last = size / PAGE;
        assert_eq!(page_span(last, last + 1, size), Some((last * PAGE, size)));
        assert_eq!(page_span(last, last + 16, size), Some((last * PAGE, size)));
        assert_eq!(
            page_span(last - 1, last + 15, size),
            Some(((last - 1) * PAGE, size))
        );
        assert_eq!(page_span(last + 1, last + 2, size), None);
        assert_eq!(page_span(u64::MAX, u64::MAX, size), None);
        assert_eq!(page_span(0, u64::MAX, size), Some((0, size)));
        // ordinary ones
        assert_eq!(page_span(0, 1, 10), Some((0, 10)));
        assert_eq!(page_span(1, 3, 3 * PAGE + 5), Some((PAGE, 3 * PAGE)));
        assert_eq!(
            page_span(3, 5, 3 * PAGE + 5),
            Some((3 * PAGE, 3 * PAGE + 5))
        );
        assert_eq!(page_span(0, 1, 0), None);
        assert_eq!(page_span(2, 2, 10 * PAGE), None);
    }

    #[test]
    fn any_content_encoding_but_identity_is_refused() {
        let with = |values: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(
                    "content-encoding",
                    ureq::http::HeaderValue::from_bytes(v).unwrap(),
                );
            }
            refuse_encoding(&h)
        };
        assert!(with(&[]).is_ok());
        for fine in [&b"identity"[..], b"IDENTITY", b"", b" identity , Identity"] {
            assert!(with(&[fine]).is_ok(), "{fine:?}");
        }
        for bad in [
            &[&b"gzip"[..]][..],
            &[b"identity, gzip"],
            &[b"identity", b"br"],
            &[b"x-\xe9"],
            &[b"deflate"],
        ] {
            let e = with(bad).unwrap_err();
            assert!(
                e.contains("Content-Encoding: ") && e.contains("decodes"),
                "{e}"
            );
        }
    }

    #[test]
    fn sizes_above_the_cap_are_refused() {
        assert!(check_size(MAX_SIZE, MAX_SIZE).is_ok());
        assert!(check_size(0, MAX_SIZE).is_ok());
        for s in [MAX_SIZE + 1, 1 << 63, u64::MAX] {
            match check_size(s, MAX_SIZE) {
                Err(Fail::Fatal(e)) => assert!(e.to_string().contains("--max-remote-size"), "{e}"),
                _ => panic!("{s} accepted"),
            }
        }
        // A larger cap, asked for: up to it, and no further.
        assert!(check_size(4 << 40, 4 << 40).is_ok());
        assert!(check_size((4 << 40) + 1, 4 << 40).is_err());
        assert!(check_size(u64::MAX, u64::MAX).is_ok());
    }

    proptest::proptest! {
        /// Any page numbers and size: a span lies inside the object, or there is none.
        #[test]
        fn page_spans_lie_inside_the_object(p: u64, n in 0u64..2048, size: u64) {
            if let Some((start, end)) = page_span(p, p.saturating_add(n), size) {
                proptest::prop_assert!(start < end && end <= size);
                proptest::prop_assert_eq!(start % PAGE, 0);
            }
        }

        /// A server's header is hostile input: any text either fails or gives a range that
        /// lies inside the size it names.
        #[test]
        fn any_content_range_is_refused_or_consistent(v in ".{0,64}") {
            if let Some((a, b, total)) = parse_content_range(&v) {
                proptest::prop_assert!(a <= b);
                proptest::prop_assert!(total.is_none_or(|t| b < t));
            }
        }

        #[test]
        fn well_formed_content_ranges_read_back(a: u64, len: u64, extra: u64, star: bool) {
            let b = a.saturating_add(len);
            let total = b.checked_add(1).and_then(|t| t.checked_add(extra));
            let v = match (star, total) {
                (false, Some(t)) => format!("bytes {a}-{b}/{t}"),
                _ => format!("bytes {a}-{b}/*"),
            };
            let want = (a, b, total.filter(|_| !star));
            proptest::prop_assert_eq!(parse_content_range(&v), Some(want));
        }
    }
}
