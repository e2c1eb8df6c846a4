//! Images at HTTP(S) URLs, read in place: [`HttpSource`] is a [`ReadAt`] that turns positional
//! reads into `Range` requests, through a bounded block cache, pinned to one version of the
//! object.
//!
//! # Security
//! Every response is hostile input: sizes, `Content-Range` and validators are checked against
//! what was asked and what the first response said, and nothing a server says sizes an
//! allocation beyond what was asked for. URLs are shown without userinfo and query (a presigned
//! URL's signature is a credential), and header values are [`Secret`]s.

mod readahead;
mod session;
mod url;

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use glimpse_formats::limits::Charge;
use glimpse_formats::lru::Lru;
use glimpse_formats::ReadAt;
use ureq::http::{HeaderMap, Response};
use ureq::{Agent, Body};

pub use self::session::{
    annotate, configure, display, is_remote, log_transfers, open, Config, Opts,
};
pub use self::url::{is_url, shown};
pub use crate::cmd::upload::http::Secret;

/// Bytes per cached block: a small read costs at most this much transfer.
pub const BLOCK: u64 = 256 << 10;
/// The block cache, charged to the command's memory budget.
const CACHE_BYTES: u64 = 32 << 20;
/// Reads at least this large go straight into the caller's buffer, bypassing the cache.
const DIRECT: usize = 1 << 20;
/// Blocks fetched in one request when reads run front to back (4 MiB).
const READAHEAD_BLOCKS: u64 = 16;
/// Tries per request (connection resets, timeouts, 5xx), with doubling backoff.
const ATTEMPTS: u32 = 5;
const BACKOFF: Duration = Duration::from_millis(100);
/// How long a GET may take to start answering before it is retried.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// From `Content-Range`'s total (or `Content-Length` when ranges are not supported).
    size: Option<u64>,
    etag: Option<String>,
    last_modified: Option<String>,
    ranges: bool,
    cache: Lru<u64, Arc<[u8]>>,
    /// Blocks being fetched right now, so that two readers do not fetch one block twice.
    inflight: Mutex<Vec<u64>>,
    landed: Condvar,
    _charge: Option<Charge>,
    /// Consecutive misses that each followed a cached block.
    streak: AtomicU64,
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// Why one attempt failed.
enum Fail {
    /// Worth another try: connection trouble, a timeout, a 5xx.
    Transient(String),
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

    /// As [`HttpSource::open`], with a block cache of `cache_bytes` (at least one readahead
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
        let cache_bytes = cache_bytes.max(BLOCK.saturating_mul(READAHEAD_BLOCKS));
        let shown = shown(url);
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
            cache: Lru::new(
                cache_bytes,
                usize::try_from(cache_bytes / BLOCK).unwrap_or(128),
            ),
            inflight: Mutex::new(Vec::new()),
            landed: Condvar::new(),
            _charge: Some(charge),
            streak: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        };
        let first = inner.probe()?;
        if let Some(block) = first {
            inner
                .cache
                .put(0, block.clone(), block.len() as u64)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
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

    /// The URL as it may be shown: no userinfo, no query, no fragment.
    pub fn shown(&self) -> &str {
        &self.inner.shown
    }

    /// The whole object, front to back: with several range requests in flight when the
    /// server answers ranges, else one streamed GET ([`HttpSource::stream`]).
    ///
    /// # Errors
    /// As [`HttpSource::stream`].
    pub fn sequential(&self) -> io::Result<Box<dyn Read + Send>> {
        match (self.inner.ranges, self.inner.size) {
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

    /// Sends a GET with `range` (inclusive ends; no end: to the end of the object) and the
    /// pinning header.
    fn get(&self, range: Option<(u64, Option<u64>)>, pin: bool) -> Result<Response<Body>, Fail> {
        // The agent waits an hour for an answer (Glance answers a PUT only once it has stored
        // the data); a GET that has not started answering in a minute is retried instead.
        let mut req = self
            .agent
            .get(&self.url)
            .config()
            .timeout_recv_response(Some(RESPONSE_TIMEOUT))
            .build();
        match range {
            Some((a, Some(b))) => req = req.header("Range", format!("bytes={a}-{b}")),
            Some((a, None)) => req = req.header("Range", format!("bytes={a}-")),
            None => {}
        }
        if pin {
            if let Some(v) = self.etag.as_ref().or(self.last_modified.as_ref()) {
                req = req.header("If-Range", v.as_str());
            }
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.expose());
        }
        self.count_request();
        match req.call() {
            Ok(r) => {
                let status = r.status().as_u16();
                if status >= 500 {
                    return Err(Fail::Transient(format!("HTTP {status}")));
                }
                Ok(r)
            }
            Err(e) => Err(classify(e)),
        }
    }

    /// Runs `attempt` up to [`ATTEMPTS`] times, backing off after transient failures.
    fn retry<T>(&self, mut attempt: impl FnMut() -> Result<T, Fail>) -> io::Result<T> {
        let mut wait = BACKOFF;
        let mut last = String::new();
        for i in 0..ATTEMPTS {
            if i > 0 {
                std::thread::sleep(wait);
                wait = wait.saturating_mul(2);
            }
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Transient(m)) => last = m,
            }
        }
        Err(io::Error::other(format!(
            "gave up after {ATTEMPTS} tries: {last}"
        )))
    }

    /// The first request. Returns the first block when the server sent it.
    fn probe(&mut self) -> anyhow::Result<Option<Arc<[u8]>>> {
        let shown = self.shown.clone();
        let this = &*self;
        let (size, ranges, etag, lm, block) = this
            .retry(|| {
                let mut resp = this.get(Some((0, Some(BLOCK - 1))), false)?;
                let status = resp.status().as_u16();
                let etag = header(resp.headers(), "etag");
                let lm = header(resp.headers(), "last-modified");
                match status {
                    206 => {
                        let (a, b, total) = content_range(resp.headers())?;
                        let total = total
                            .ok_or_else(|| fatal("the server did not say the object's size"))?;
                        let want_end = total.min(BLOCK).saturating_sub(1);
                        if a != 0 || b != want_end {
                            return Err(fatal(format!(
                                "the server returned bytes {a}-{b} when bytes 0-{want_end} were \
                                 asked"
                            )));
                        }
                        let buf = this.read_body(&mut resp, want_end + 1)?;
                        Ok((Some(total), true, etag, lm, Some(Arc::from(buf))))
                    }
                    416 => {
                        // Only an empty object has no byte 0.
                        match content_range_star(resp.headers()) {
                            Some(0) => Ok((Some(0), true, etag, lm, None)),
                            _ => Err(fatal("the server refused the range 0-")),
                        }
                    }
                    200 => {
                        let len = resp.body().content_length();
                        Ok((len, false, etag, lm, None))
                    }
                    s => Err(fatal(status_message(s, &mut resp))),
                }
            })
            .map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
        // A weak ETag cannot pin a range; fall back to Last-Modified then.
        self.etag = etag.filter(|e| !e.starts_with("W/"));
        self.last_modified = lm;
        self.size = size;
        self.ranges = ranges;
        Ok(block)
    }

    /// Reads exactly `len` body bytes (a short body is transient: the connection dropped).
    fn read_body(&self, resp: &mut Response<Body>, len: u64) -> Result<Vec<u8>, Fail> {
        let n = usize::try_from(len).map_err(|_| fatal("range too large"))?;
        let mut buf = vec![0; n];
        self.read_body_into(resp, &mut buf)?;
        Ok(buf)
    }

    fn read_body_into(&self, resp: &mut Response<Body>, buf: &mut [u8]) -> Result<(), Fail> {
        let mut r = resp.body_mut().as_reader();
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
                    )))
                }
                Ok(n) => {
                    done += n;
                    self.count_bytes(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fail::Transient(format!("reading the body: {e}"))),
            }
        }
        Ok(())
    }

    /// Checks that a reply is the pinned object: same validator, same total.
    fn check_same(&self, headers: &HeaderMap, total: Option<u64>) -> Result<(), Fail> {
        let changed = || {
            fatal(
                "the object changed on the server while it was being read (its ETag, \
                 Last-Modified or size differs): start again",
            )
        };
        if let Some(e) = &self.etag {
            if header(headers, "etag").as_ref() != Some(e) {
                return Err(changed());
            }
        } else if let Some(lm) = &self.last_modified {
            if header(headers, "last-modified").is_some_and(|v| &v != lm) {
                return Err(changed());
            }
        }
        if total.is_some() && total != self.size {
            return Err(changed());
        }
        Ok(())
    }

    /// Fills `buf` with the bytes at `offset` (all inside the object) in one ranged GET.
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
        self.retry(|| {
            let mut resp = self.get(Some((offset, Some(end))), true)?;
            match resp.status().as_u16() {
                206 => {}
                200 | 412 => {
                    return Err(fatal(
                        "the object changed on the server while it was being read (the server \
                         no longer matches its ETag/Last-Modified): start again",
                    ))
                }
                s => return Err(fatal(status_message(s, &mut resp))),
            }
            let (a, b, total) = content_range(resp.headers())?;
            self.check_same(resp.headers(), total)?;
            if (a, b) != (offset, end) {
                return Err(fatal(format!(
                    "the server returned bytes {a}-{b} when bytes {offset}-{end} were asked"
                )));
            }
            self.read_body_into(&mut resp, buf)
        })
    }

    /// As [`Inner::fetch`], but the whole blocks that open the range come from the cache when
    /// they are there (the first block, which opening the source fetched): a front-to-back
    /// read does not fetch them again.
    fn fetch_after_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        loop {
            let pos = offset.saturating_add(done as u64);
            if pos % BLOCK != 0 {
                break;
            }
            let Some(block) = self.cache.get(pos / BLOCK).map_err(io::Error::other)? else {
                break;
            };
            let Some(dst) = buf.get_mut(done..done + block.len()) else {
                break;
            };
            dst.copy_from_slice(&block);
            done += block.len();
            if block.len() as u64 != BLOCK {
                break;
            }
        }
        match buf.get_mut(done..) {
            Some(rest) => self.fetch(rest, offset.saturating_add(done as u64)),
            None => Ok(()),
        }
    }

    /// Block `b`, from the cache or the server; on a miss after block `b - 1` (reads running
    /// front to back), up to [`READAHEAD_BLOCKS`] uncached blocks in one request.
    fn block(&self, b: u64, size: u64) -> io::Result<Arc<[u8]>> {
        loop {
            if let Some(v) = self.cache.get(b).map_err(io::Error::other)? {
                return Ok(v);
            }
            let mut inflight = self
                .inflight
                .lock()
                .map_err(|_| io::Error::other("cache poisoned"))?;
            if inflight.contains(&b) {
                let _unused = self
                    .landed
                    .wait(inflight)
                    .map_err(|_| io::Error::other("cache poisoned"))?;
                continue;
            }
            let blocks = size.div_ceil(BLOCK);
            // Metadata reads jump around; a read that follows the previous block doubles the
            // window (up to READAHEAD_BLOCKS), anything else starts again at one block.
            let sequential = b > 0 && self.cache.get(b - 1).ok().flatten().is_some();
            let window = if sequential {
                let s = self.streak.fetch_add(1, Ordering::Relaxed).min(4);
                (1u64 << s).min(READAHEAD_BLOCKS)
            } else {
                self.streak.store(0, Ordering::Relaxed);
                1
            };
            let mut n = 1;
            if sequential {
                while n < window
                    && b + n < blocks
                    && !inflight.contains(&(b + n))
                    && self.cache.get(b + n).ok().flatten().is_none()
                {
                    n += 1;
                }
            }
            inflight.extend(b..b + n);
            drop(inflight);
            let start = b * BLOCK;
            let end = ((b + n) * BLOCK).min(size);
            let result = usize::try_from(end - start)
                .map_err(io::Error::other)
                .and_then(|len| {
                    let mut buf = vec![0u8; len];
                    self.fetch(&mut buf, start).map(|()| buf)
                });
            let mut first = None;
            if let Ok(buf) = &result {
                for (i, chunk) in buf.chunks(BLOCK as usize).enumerate() {
                    let block: Arc<[u8]> = Arc::from(chunk);
                    if i == 0 {
                        first = Some(block.clone());
                    }
                    let _ = self.cache.put(b + i as u64, block, chunk.len() as u64);
                }
            }
            if let Ok(mut inflight) = self.inflight.lock() {
                inflight.retain(|x| !(b..b + n).contains(x));
            }
            self.landed.notify_all();
            result?;
            return first.ok_or_else(|| io::Error::other("empty block"));
        }
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
            inner.fetch(buf, offset)?;
            return Ok(len);
        }
        let b = offset / BLOCK;
        let block = inner.block(b, size)?;
        let within = usize::try_from(offset - b * BLOCK).map_err(io::Error::other)?;
        let src = block.get(within..).unwrap_or_default();
        let n = src.len().min(len);
        if let (Some(d), Some(s)) = (buf.get_mut(..n), src.get(..n)) {
            d.copy_from_slice(s);
        }
        Ok(n)
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
    body: Option<ureq::BodyReader<'static>>,
    pos: u64,
}

impl Stream {
    fn connect(&mut self) -> io::Result<()> {
        let inner = &*self.src.inner;
        let pos = self.pos;
        let resp = inner.retry(|| {
            let resumed = pos > 0;
            let mut resp = inner.get(resumed.then_some((pos, None)), resumed)?;
            match resp.status().as_u16() {
                200 if !resumed => {
                    let len = resp.body().content_length();
                    if inner.ranges {
                        inner.check_same(resp.headers(), len)?;
                    } else if len.is_some() && len != inner.size {
                        return Err(fatal(
                            "the object changed on the server while it was being read (its \
                             size differs): start again",
                        ));
                    }
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
                s => return Err(fatal(status_message(s, &mut resp))),
            }
            Ok(resp)
        })?;
        self.body = Some(resp.into_body().into_reader());
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut tries = 0;
        loop {
            let Some(body) = self.body.as_mut() else {
                return Ok(0);
            };
            match body.read(buf) {
                Ok(0) => {
                    if self.src.inner.size.is_some_and(|s| self.pos < s) {
                        // The connection closed early.
                        if !self.src.inner.ranges || tries >= ATTEMPTS {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the body ended early",
                            ));
                        }
                    } else {
                        self.body = None;
                        return Ok(0);
                    }
                }
                Ok(n) => {
                    self.pos += n as u64;
                    self.src.inner.count_bytes(n);
                    if self.src.inner.size.is_some_and(|s| self.pos > s) {
                        return Err(io::Error::other(
                            "the server sent more bytes than the object's size",
                        ));
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if !self.src.inner.ranges || tries >= ATTEMPTS {
                        return Err(e);
                    }
                }
            }
            tries += 1;
            self.body = None;
            std::thread::sleep(BACKOFF.saturating_mul(tries));
            self.connect()?;
        }
    }
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
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

fn classify(e: ureq::Error) -> Fail {
    match e {
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::Protocol(_)
        | ureq::Error::BodyStalled => Fail::Transient(e.to_string()),
        other => Fail::Fatal(io::Error::other(other.to_string())),
    }
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

    proptest::proptest! {
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
