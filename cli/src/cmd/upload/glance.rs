//! The Images API v2 calls glimpse makes, and the upload body that hashes what it sends.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context};
use md5::{Digest as _, Md5};
use serde_json::Value;
use sha2::Sha512;
use ureq::http::Method;

use super::http::{Body, Http, Reply, Secret, StatusError};

/// True when a request failed before anything reached the server: the name did not resolve,
/// the connection was refused or timed out, or TLS failed. A create that failed so made no
/// image.
pub fn never_reached(e: &anyhow::Error) -> bool {
    use ureq::Timeout;
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<ureq::Error>(),
            Some(
                ureq::Error::HostNotFound
                    | ureq::Error::ConnectionFailed
                    | ureq::Error::Timeout(Timeout::Resolve | Timeout::Connect)
                    | ureq::Error::Tls(_)
                    | ureq::Error::Rustls(_),
            )
        )
    }) || io_errors(e).any(unreachable)
}

/// True when the server closed or reset the connection while glimpse was still sending.
pub fn connection_lost(e: &anyhow::Error) -> bool {
    io_errors(e).any(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )
    })
}

/// The I/O errors in `e`'s chain, plain or inside a ureq error.
fn io_errors(e: &anyhow::Error) -> impl Iterator<Item = &std::io::Error> {
    e.chain()
        .filter_map(|c| match c.downcast_ref::<ureq::Error>() {
            Some(ureq::Error::Io(io)) => Some(io),
            _ => c.downcast_ref::<std::io::Error>(),
        })
}

/// A refused connection, or a name the resolver does not know (std reports getaddrinfo's
/// failure as an uncategorised error with this text).
fn unreachable(io: &std::io::Error) -> bool {
    io.kind() == std::io::ErrorKind::ConnectionRefused
        || io
            .to_string()
            .contains("failed to lookup address information")
}

/// The HTTP status of a request that failed with one (a [`StatusError`] in `e`'s chain).
pub fn status_of(e: &anyhow::Error) -> Option<u16> {
    e.chain()
        .find_map(|c| c.downcast_ref::<StatusError>())
        .map(|s| s.status)
}

/// The Images API v2 with one token.
pub struct Glance<'a> {
    http: &'a Http,
    token: &'a Secret,
    /// `{image root}/v2`.
    v2: String,
}

impl<'a> Glance<'a> {
    /// A client for the image service at `root` (no `/v2`).
    pub fn new(http: &'a Http, token: &'a Secret, root: &str) -> Self {
        Glance {
            http,
            token,
            v2: format!("{root}/v2"),
        }
    }

    fn image_url(&self, id: &str) -> String {
        format!("{}/images/{id}", self.v2)
    }

    fn record(reply: &Reply, what: &str) -> anyhow::Result<Value> {
        let v = reply
            .json()
            .with_context(|| format!("{what}: Glance's reply"))?;
        if !v.is_object() {
            return Err(anyhow!("{what}: Glance's reply is not an image record"));
        }
        Ok(v)
    }

    /// `POST /v2/images`: a `queued` record.
    ///
    /// # Errors
    /// Transport errors, or Glance's reason for refusing.
    pub fn create(&self, body: Value) -> anyhow::Result<Value> {
        let url = format!("{}/images", self.v2);
        let reply = self.http.expect(
            Method::POST,
            &url,
            Some(self.token),
            Body::Json("application/json", body),
        )?;
        Self::record(&reply, "image create")
    }

    /// `GET /v2/images/{id}`.
    ///
    /// # Errors
    /// Transport errors, or Glance's reason.
    pub fn get(&self, id: &str) -> anyhow::Result<Value> {
        let reply = self.http.expect(
            Method::GET,
            &self.image_url(id),
            Some(self.token),
            Body::Empty,
        )?;
        Self::record(&reply, "image show")
    }

    /// `PATCH /v2/images/{id}` with a JSON patch.
    ///
    /// # Errors
    /// Transport errors, or Glance's reason.
    pub fn patch(&self, id: &str, ops: Value) -> anyhow::Result<Value> {
        let ct = "application/openstack-images-v2.1-json-patch";
        let reply = self.http.expect(
            Method::PATCH,
            &self.image_url(id),
            Some(self.token),
            Body::Json(ct, ops),
        )?;
        Self::record(&reply, "image update")
    }

    /// `DELETE /v2/images/{id}`.
    ///
    /// # Errors
    /// Transport errors, or Glance's reason.
    pub fn delete(&self, id: &str) -> anyhow::Result<()> {
        self.http.expect(
            Method::DELETE,
            &self.image_url(id),
            Some(self.token),
            Body::Empty,
        )?;
        Ok(())
    }

    /// `PUT /v2/images/{id}/file` (or `/stage`), streaming `len` bytes from `body`. Called at
    /// most once per image: a second PUT after a refused one fails with 500 on Glance.
    ///
    /// # Errors
    /// Transport errors (including the body reader's), or Glance's reason.
    pub fn put_data(
        &self,
        id: &str,
        stage: bool,
        body: &mut dyn Read,
        len: u64,
    ) -> anyhow::Result<()> {
        let url = format!(
            "{}/{}",
            self.image_url(id),
            if stage { "stage" } else { "file" }
        );
        self.http
            .expect(Method::PUT, &url, Some(self.token), Body::Stream(body, len))?;
        Ok(())
    }

    /// `POST /v2/images/{id}/import` with the `glance-direct` method.
    ///
    /// # Errors
    /// Transport errors, or Glance's reason.
    pub fn import(&self, id: &str) -> anyhow::Result<()> {
        let url = format!("{}/import", self.image_url(id));
        let body = serde_json::json!({"method": {"name": "glance-direct"}});
        self.http.expect(
            Method::POST,
            &url,
            Some(self.token),
            Body::Json("application/json", body),
        )?;
        Ok(())
    }

    /// The message of the newest failed task of an image, when Glance has one.
    pub fn failed_task_message(&self, id: &str) -> Option<String> {
        let url = format!("{}/tasks", self.image_url(id));
        let reply = self
            .http
            .expect(Method::GET, &url, Some(self.token), Body::Empty)
            .ok()?;
        let v = reply.json().ok()?;
        v.get("tasks")?
            .as_array()?
            .iter()
            .filter(|t| t.get("status").and_then(Value::as_str) == Some("failure"))
            .filter_map(|t| t.get("message").and_then(Value::as_str))
            .map(str::to_string)
            .next_back()
    }
}

/// Digests of what was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// md5, hex (Glance's `checksum`).
    pub md5: String,
    /// sha512, hex (Glance's `os_hash_value` with `os_hash_algo` sha512).
    pub sha512: String,
    /// Bytes sent.
    pub size: u64,
}

/// Size of the blocks read from the file and handed to the hashers: large enough for few
/// syscalls, small enough that the bounded queues below keep memory to a few MiB.
const BLOCK: usize = 1 << 20;
/// Blocks queued per hasher before the reader waits.
const QUEUE: usize = 4;

type Block = Arc<Vec<u8>>;

/// Reads the file once, in blocks, hands each block to an md5 thread and a sha512 thread, and
/// serves the same bytes to the HTTP body. Memory stays bounded by the two queues.
pub struct HashingBody<'a> {
    file: Box<dyn Read + Send>,
    remaining: u64,
    block: Block,
    pos: usize,
    senders: Vec<SyncSender<Block>>,
    hashers: Vec<JoinHandle<String>>,
    interrupted: &'a AtomicBool,
    progress: Option<indicatif::ProgressBar>,
    sent: u64,
}

impl<'a> HashingBody<'a> {
    /// A body of exactly `len` bytes of `file` (from its current position): a local file or a
    /// remote object read front to back.
    pub fn new(
        file: Box<dyn Read + Send>,
        len: u64,
        interrupted: &'a AtomicBool,
        progress: Option<indicatif::ProgressBar>,
    ) -> Self {
        let mut senders = Vec::new();
        let mut hashers = Vec::new();
        let (tx, rx) = sync_channel::<Block>(QUEUE);
        senders.push(tx);
        hashers.push(std::thread::spawn(move || {
            let mut h = Md5::new();
            for b in rx {
                h.update(&b[..]);
            }
            hex(&h.finalize())
        }));
        let (tx, rx) = sync_channel::<Block>(QUEUE);
        senders.push(tx);
        hashers.push(std::thread::spawn(move || {
            let mut h = Sha512::new();
            for b in rx {
                h.update(&b[..]);
            }
            hex(&h.finalize())
        }));
        HashingBody {
            file,
            remaining: len,
            block: Arc::new(Vec::new()),
            pos: 0,
            senders,
            hashers,
            interrupted,
            progress,
            sent: 0,
        }
    }

    fn next_block(&mut self) -> io::Result<()> {
        if self.interrupted.load(Ordering::SeqCst) {
            return Err(io::Error::other("interrupted by a signal"));
        }
        let want = usize::try_from(self.remaining.min(BLOCK as u64)).unwrap_or(BLOCK);
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match self.file.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file shrank during the upload",
                    ))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    if self.interrupted.load(Ordering::SeqCst) {
                        return Err(io::Error::other("interrupted by a signal"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let block = Arc::new(buf);
        for tx in &self.senders {
            tx.send(Arc::clone(&block))
                .map_err(|_| io::Error::other("a hashing thread stopped"))?;
        }
        self.remaining -= want as u64;
        self.block = block;
        self.pos = 0;
        Ok(())
    }

    /// Waits for the hashers. Fails unless every byte was sent.
    ///
    /// # Errors
    /// The body was not read to its end, or a hasher panicked.
    pub fn finish(mut self) -> anyhow::Result<Digests> {
        if let Some(p) = &self.progress {
            p.finish_and_clear();
        }
        self.senders.clear();
        let mut out = Vec::new();
        for h in self.hashers.drain(..) {
            out.push(h.join().map_err(|_| anyhow!("a hashing thread panicked"))?);
        }
        if self.remaining != 0 || self.pos != self.block.len() {
            return Err(anyhow!("the upload stopped after {} bytes", self.sent));
        }
        let mut it = out.into_iter();
        Ok(Digests {
            md5: it.next().unwrap_or_default(),
            sha512: it.next().unwrap_or_default(),
            size: self.sent,
        })
    }
}

impl Read for HashingBody<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.block.len() {
            if self.remaining == 0 {
                return Ok(0);
            }
            self.next_block()?;
        }
        let avail = &self.block[self.pos..];
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.pos += n;
        self.sent += n as u64;
        if let Some(p) = &self.progress {
            p.set_position(self.sent);
        }
        Ok(n)
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hashing_body_sends_every_byte_once_and_digests_them() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(3 * BLOCK + 12345)).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let f2 = f.try_clone().unwrap();
        use std::io::Seek;
        let mut f = f2;
        f.rewind().unwrap();
        let stop = AtomicBool::new(false);
        let mut body = HashingBody::new(Box::new(f), data.len() as u64, &stop, None);
        let mut sent = Vec::new();
        let mut buf = [0u8; 7000];
        loop {
            let n = body.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            sent.extend_from_slice(&buf[..n]);
        }
        assert_eq!(sent, data);
        let d = body.finish().unwrap();
        assert_eq!(d.size, data.len() as u64);
        assert_eq!(d.md5, hex(&Md5::digest(&data)));
        assert_eq!(d.sha512, hex(&Sha512::digest(&data)));
    }

    #[test]
    fn hashing_body_stops_on_the_signal_flag_and_on_a_short_file() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 100]).unwrap();
        use std::io::Seek;
        f.rewind().unwrap();
        let stop = AtomicBool::new(true);
        let mut body = HashingBody::new(Box::new(f.try_clone().unwrap()), 100, &stop, None);
        assert!(body.read(&mut [0u8; 10]).is_err());
        assert!(body.finish().is_err());
        f.rewind().unwrap();
        let go = AtomicBool::new(false);
        let mut body = HashingBody::new(Box::new(f), 200, &go, None);
        assert_eq!(
            body.read(&mut [0u8; 10]).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
