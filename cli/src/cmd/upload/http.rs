//! The HTTP side shared by Keystone and Glance: one ureq agent (rustls), TLS options as the
//! OpenStack clients take them, request logging that never shows a secret, and error replies
//! turned into the server's own reason.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use ureq::http::{self, Method};
use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};
use ureq::{Agent, SendBody};

/// A password or token. It has no `Display`, and `Debug` hides it, so it cannot reach a log by
/// accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// TLS settings: `--insecure` and `OS_CACERT`.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// Skip certificate verification.
    pub insecure: bool,
    /// A PEM bundle of trusted CA certificates that replaces the built-in roots.
    pub cacert: Option<std::path::PathBuf>,
}

/// Largest reply body read into memory: image records, token replies with a catalog and
/// error pages are far smaller.
const MAX_REPLY: u64 = 16 << 20;

/// Builds the agent.
///
/// # Errors
/// The CA file cannot be read or holds no certificate.
pub fn agent(tls: &Tls) -> anyhow::Result<Agent> {
    let mut tls_config = TlsConfig::builder();
    if tls.insecure {
        tls_config = tls_config.disable_verification(true);
    }
    if let Some(path) = &tls.cacert {
        tls_config = tls_config.root_certs(load_cacert(path)?);
    }
    let config = Agent::config_builder()
        .tls_config(tls_config.build())
        // Replies with 4xx/5xx carry the server's reason, which we want to show.
        .http_status_as_error(false)
        // A redirect could carry the token to another host: follow none.
        .max_redirects(0)
        .user_agent(concat!("glimpse/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(30)))
        // Glance answers a PUT only after it has stored and hashed the data.
        .timeout_recv_response(Some(Duration::from_secs(3600)))
        .timeout_recv_body(Some(Duration::from_secs(300)))
        .build();
    Ok(config.into())
}

fn load_cacert(path: &Path) -> anyhow::Result<RootCerts> {
    let pem = std::fs::read(path)
        .with_context(|| format!("{}: cannot read the CA bundle (OS_CACERT)", path.display()))?;
    let mut certs = Vec::new();
    for item in parse_pem(&pem) {
        if let PemItem::Certificate(c) =
            item.with_context(|| format!("{}: not a PEM CA bundle", path.display()))?
        {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        anyhow::bail!(
            "{}: no certificate in the CA bundle (OS_CACERT)",
            path.display()
        );
    }
    Ok(RootCerts::new_with_certs(&certs))
}

/// One reply, read in full (bodies are small; image data is only ever sent).
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The body as JSON.
    ///
    /// # Errors
    /// The body is not JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("the reply is not JSON")
    }
    /// True for 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A 4xx/5xx reply, with the server's reason.
#[derive(Debug)]
pub struct StatusError {
    /// e.g. `PUT http://.../v2/images/ID/file`.
    pub what: String,
    /// HTTP status.
    pub status: u16,
    /// The server's explanation.
    pub reason: String,
    /// `x-openstack-request-id`, when sent.
    pub request_id: Option<String>,
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} failed with HTTP {}: {}",
            self.what, self.status, self.reason
        )?;
        if let Some(id) = &self.request_id {
            write!(f, " (request {id})")?;
        }
        Ok(())
    }
}

impl std::error::Error for StatusError {}

/// Pulls a readable reason out of an OpenStack error body: JSON (`{"error": {"message"}}` from
/// Keystone, `{"message"}`/`{"explanation"}` from Glance's webob), else the text without tags.
pub fn reason(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let candidates = [
            v.pointer("/error/message"),
            v.pointer("/message"),
            v.pointer("/explanation"),
            v.pointer("/error/title"),
            v.pointer("/title"),
        ];
        if let Some(s) = candidates.into_iter().flatten().find_map(|s| s.as_str()) {
            // Glance's webob messages embed `<br />` even in JSON
            return plain(s);
        }
    }
    plain(&String::from_utf8_lossy(body))
}

/// Text without HTML tags, on one line, clipped.
fn plain(text: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    let words: Vec<&str> = out.split_whitespace().collect();
    if words.is_empty() {
        "(no reason given)".to_string()
    } else {
        clip(&words.join(" "))
    }
}

fn clip(s: &str) -> String {
    const MAX: usize = 600;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// A request body.
pub enum Body<'a> {
    /// No body.
    Empty,
    /// JSON with this content type.
    Json(&'static str, serde_json::Value),
    /// A stream of exactly this many bytes, `application/octet-stream`.
    Stream(&'a mut dyn std::io::Read, u64),
}

/// Sends requests with an optional token, logging method, URL, status and request id with
/// `-v`. Never logs headers or bodies, so secrets stay out of the log.
pub struct Http {
    agent: Agent,
    verbose: bool,
}

impl Http {
    /// A client around `agent`.
    pub fn new(agent: Agent, verbose: bool) -> Self {
        Http { agent, verbose }
    }

    /// Sends one request and reads the reply.
    ///
    /// # Errors
    /// Transport failures (connection refused or lost, TLS, timeouts). A 4xx/5xx is a `Reply`.
    pub fn send(
        &self,
        method: Method,
        url: &str,
        token: Option<&Secret>,
        body: Body<'_>,
    ) -> anyhow::Result<Reply> {
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(url)
            .header("Accept", "application/json");
        if let Some(t) = token {
            let mut v = http::HeaderValue::from_str(t.expose())
                .map_err(|_| anyhow!("the token is not a valid header value"))?;
            v.set_sensitive(true);
            req = req.header("X-Auth-Token", v);
        }
        let what = format!("{method} {url}");
        if self.verbose {
            eprintln!("glimpse: {what}");
        }
        let result = match body {
            Body::Empty => req
                .body(())
                .map_err(|e| anyhow!("{what}: {e}"))
                .and_then(|r| Ok(self.agent.run(r)?)),
            Body::Json(ct, v) => {
                let bytes = serde_json::to_vec(&v)?;
                req.header("Content-Type", ct)
                    .body(bytes)
                    .map_err(|e| anyhow!("{what}: {e}"))
                    .and_then(|r| Ok(self.agent.run(r)?))
            }
            Body::Stream(reader, len) => req
                .header("Content-Type", "application/octet-stream")
                .header("Content-Length", len)
                .body(SendBody::from_reader(reader))
                .map_err(|e| anyhow!("{what}: {e}"))
                .and_then(|r| Ok(self.agent.run(r)?)),
        };
        let resp = result.with_context(|| format!("{what}: no reply"))?;
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let bytes = body
            .into_with_config()
            .limit(MAX_REPLY)
            .read_to_vec()
            .with_context(|| format!("{what}: reading the reply"))?;
        let reply = Reply {
            status,
            headers: parts.headers,
            body: bytes,
        };
        if self.verbose {
            let id = reply.header("x-openstack-request-id").unwrap_or("-");
            eprintln!("glimpse: {what} -> {status} (request id {id})");
        }
        Ok(reply)
    }

    /// [`Http::send`], then a [`StatusError`] unless the status is 2xx.
    ///
    /// # Errors
    /// As `send`, plus the server's reason for a 4xx/5xx.
    pub fn expect(
        &self,
        method: Method,
        url: &str,
        token: Option<&Secret>,
        body: Body<'_>,
    ) -> anyhow::Result<Reply> {
        let what = format!("{method} {url}");
        let reply = self.send(method, url, token, body)?;
        if reply.ok() {
            return Ok(reply);
        }
        Err(StatusError {
            what,
            status: reply.status,
            reason: reason(&reply.body),
            request_id: reply.header("x-openstack-request-id").map(str::to_string),
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// An error body is whatever the server (or a proxy in front of it) sends: the reason
        /// made of it is one line without markup, at most 600 characters and an ellipsis.
        #[test]
        fn any_error_body_gives_a_short_plain_line(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
            let r = reason(&body);
            proptest::prop_assert!(!r.is_empty());
            proptest::prop_assert!(r.chars().count() <= 603, "{} chars", r.chars().count());
            proptest::prop_assert!(!r.contains(['\n', '\r', '<']), "{r:?}");
        }

        #[test]
        fn any_json_message_gives_a_short_plain_line(msg in "\\PC{0,2000}") {
            let body = serde_json::json!({"error": {"message": msg}}).to_string();
            let r = reason(body.as_bytes());
            proptest::prop_assert!(r.chars().count() <= 603);
            proptest::prop_assert!(!r.contains(['\n', '\r', '<']), "{r:?}");
        }
    }

    #[test]
    fn reasons_from_openstack_bodies() {
        assert_eq!(reason(br#"{"error": {"message": "The request you have made requires authentication.", "code": 401}}"#),
            "The request you have made requires authentication.");
        assert_eq!(
            reason(br#"{"message": "Image disk format does not match", "code": "415"}"#),
            "Image disk format does not match"
        );
        assert_eq!(reason(b"<html><body><h1>413 Request Entity Too Large</h1>\nImage exceeds the storage quota</body></html>"),
            "413 Request Entity Too Large Image exceeds the storage quota");
        assert_eq!(reason(b""), "(no reason given)");
        assert_eq!(
            reason(br#"{"message": "The request media type application/octet-stream is not supported by this server.<br /><br />\nImage disk_format qcow2 does not match stream data raw"}"#),
            "The request media type application/octet-stream is not supported by this server. Image disk_format qcow2 does not match stream data raw"
        );
        assert_eq!(reason(&[b'x'; 2000]).len(), 603);
    }

    #[test]
    fn a_bad_ca_bundle_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Tls {
            insecure: false,
            cacert: Some(dir.path().join("missing.pem")),
        };
        assert!(format!("{:#}", agent(&missing).unwrap_err()).contains("cannot read the CA bundle"));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = agent(&Tls {
            insecure: false,
            cacert: Some(empty),
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("no certificate"), "{e:#}");
        assert!(agent(&Tls {
            insecure: true,
            cacert: None
        })
        .is_ok());
    }

    #[test]
    fn secrets_do_not_debug_print() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(***)");
    }
}
