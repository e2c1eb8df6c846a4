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

/// Largest estimated memory a reply's JSON may take once parsed. A parsed document costs far
/// more than its text: an object of one short member (`{"":0}`, 6 bytes) costs about 500
/// bytes, so the 16 MiB a reply may hold could take 1.6 GB. An image record, a token with a
/// large catalog or a page of image records takes a few MiB at most.
const MAX_JSON_COST: u64 = 64 << 20;

/// Builds the agent.
///
/// # Errors
/// The CA file cannot be read or holds no certificate.
pub fn agent(tls: &Tls) -> anyhow::Result<Agent> {
    agent_with(tls, Duration::from_secs(3600))
}

/// The agent, waiting up to `reply` for a reply's headers.
fn agent_with(tls: &Tls, reply: Duration) -> anyhow::Result<Agent> {
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
        .timeout_recv_response(Some(reply))
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
        parse_json(&self.body)
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
            write!(f, " (request {})", crate::common::printable(id))?;
        }
        Ok(())
    }
}

impl std::error::Error for StatusError {}

/// Parses a reply body as JSON, after making sure the document it describes stays within
/// [`MAX_JSON_COST`] once in memory (a first pass that builds nothing).
///
/// # Errors
/// The body is not JSON, or its document would be too large.
pub fn parse_json(body: &[u8]) -> anyhow::Result<serde_json::Value> {
    use serde::Deserializer as _;
    let mut de = serde_json::Deserializer::from_slice(body);
    let cost = de.deserialize_any(Cost).context("the reply is not JSON")?;
    de.end().context("the reply is not JSON")?;
    if cost > MAX_JSON_COST {
        anyhow::bail!(
            "the reply's JSON would take more than {} MiB of memory; refusing to parse it",
            MAX_JSON_COST >> 20
        );
    }
    serde_json::from_slice(body).context("the reply is not JSON")
}

/// A pass over a JSON document that builds nothing and estimates the bytes a
/// `serde_json::Value` of it would take (generous per node: an object's map allocates a node
/// of several entries however few it holds). The sums saturate rather than overflow.
struct Cost;

/// Bytes of one value, before what it holds.
const NODE: u64 = 48;
/// Bytes of an object's map before its members.
const MAP: u64 = 512;

impl<'de> serde::de::Visitor<'de> for Cost {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<u64, E> {
        Ok(NODE)
    }
    fn visit_i64<E>(self, _: i64) -> Result<u64, E> {
        Ok(NODE)
    }
    fn visit_u64<E>(self, _: u64) -> Result<u64, E> {
        Ok(NODE)
    }
    fn visit_f64<E>(self, _: f64) -> Result<u64, E> {
        Ok(NODE)
    }
    fn visit_str<E>(self, v: &str) -> Result<u64, E> {
        Ok(NODE + v.len() as u64)
    }
    fn visit_unit<E>(self) -> Result<u64, E> {
        Ok(NODE)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut total = NODE;
        // A vector grows by doubling: count each element twice.
        while let Some(c) = seq.next_element_seed(Cost)? {
            total = total.saturating_add(c.saturating_add(NODE));
        }
        Ok(total)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut total = NODE + MAP;
        while let Some(k) = map.next_key_seed(Cost)? {
            let v = map.next_value_seed(Cost)?;
            total = total.saturating_add(k.saturating_add(v));
        }
        Ok(total)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Cost {
    type Value = u64;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(self)
    }
}

/// Pulls a readable reason out of an OpenStack error body: JSON (`{"error": {"message"}}` from
/// Keystone, `{"message"}`/`{"explanation"}` from Glance's webob), else the text without tags.
pub fn reason(body: &[u8]) -> String {
    if let Ok(v) = parse_json(body) {
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

/// Text without HTML tags, on one line, clipped, and safe for a terminal: a server chooses
/// it, so control characters (C0, DEL, C1: ESC starts the sequences that set a terminal's
/// title, clear its screen or write its clipboard) and bidi overrides are shown escaped
/// ([`crate::common::printable`]), wherever the reason is printed.
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
        clip(&crate::common::printable(&words.join(" ")))
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
    tls: Tls,
    verbose: bool,
}

impl Http {
    /// A client around `agent`, which was built from `tls` (kept for [`Http::for_cleanup`]).
    pub fn new(agent: Agent, tls: &Tls, verbose: bool) -> Self {
        Http {
            agent,
            tls: tls.clone(),
            verbose,
        }
    }

    /// Lets a signal end any request of this client that waits on the server: once the
    /// command's handlers are installed, the first signal shuts down its connections (a
    /// blocked read or write then fails at once) and it sends nothing more. The cleanup that
    /// follows uses [`Http::for_cleanup`].
    pub fn stop_on_signal(&self) {
        crate::remote::cancel::watch_agent(&self.agent);
    }

    /// A new client on the same settings for the requests that clean up after a failure or a
    /// signal (this one may be shut down), waiting at most a minute for each reply.
    ///
    /// # Errors
    /// As [`agent`].
    pub fn for_cleanup(&self) -> anyhow::Result<Self> {
        Ok(Http {
            agent: agent_with(&self.tls, Duration::from_secs(60))?,
            tls: self.tls.clone(),
            verbose: self.verbose,
        })
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
        // Shown without userinfo, which holds credentials (an endpoint has no query: the one
        // a request has is glimpse's own, a listing's marker).
        let what = format!("{method} {}", crate::remote::url::without_userinfo(url));
        if self.verbose {
            errln!("glimpse: {what}");
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
            errln!("glimpse: {what} -> {status} (request id {id})");
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
        let what = format!("{method} {}", crate::remote::url::without_userinfo(url));
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
            proptest::prop_assert!(terminal_safe(&r), "{r:?}");
        }

        /// A message a server chose, with any characters: control characters (ESC, BEL, C1)
        /// and bidi overrides reach no terminal.
        #[test]
        fn any_server_text_is_terminal_safe(msg in "[\\x00-\\x{a0}\\x{200e}\\x{202a}-\\x{202e}\\x{2066}-\\x{2069}a-z]{0,300}") {
            let body = serde_json::json!({"message": msg}).to_string();
            for r in [reason(body.as_bytes()), reason(msg.as_bytes())] {
                proptest::prop_assert!(terminal_safe(&r), "{r:?}");
                proptest::prop_assert!(r.chars().count() <= 603);
            }
        }

        #[test]
        fn any_json_message_gives_a_short_plain_line(msg in "\\PC{0,2000}") {
            let body = serde_json::json!({"error": {"message": msg}}).to_string();
            let r = reason(body.as_bytes());
            proptest::prop_assert!(r.chars().count() <= 603);
            proptest::prop_assert!(!r.contains(['\n', '\r', '<']), "{r:?}");
        }
    }

    /// No character a terminal acts on: C0, DEL, C1, bidi controls.
    fn terminal_safe(s: &str) -> bool {
        !s.chars().any(|c| {
            c.is_control()
                || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
    }

    #[test]
    fn escape_sequences_from_a_server_are_shown_escaped() {
        // The campaign's 404 body (report remote-hostile F7): an OSC that sets the title, a
        // CSI that clears the screen, a colour, CR LF, a right-to-left override.
        let msg = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[31mRED\r\nX-Fake: 1\u{202e}\u{9b}2J";
        let body = serde_json::json!({"message": msg}).to_string();
        for r in [reason(body.as_bytes()), reason(msg.as_bytes())] {
            assert_eq!(
                r,
                "\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{1b}[31mRED X-Fake: 1\\u{202e}\\u{9b}2J"
            );
        }
        let e = StatusError {
            what: "GET x".into(),
            status: 500,
            reason: reason(b"x"),
            request_id: Some("req-\u{1b}[2J".into()),
        };
        assert_eq!(
            e.to_string(),
            "GET x failed with HTTP 500: x (request req-\\u{1b}[2J)"
        );
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

    /// A reply's JSON is parsed only when the document stays small in memory: 2 MiB of tiny
    /// objects would take about 180 MB as a `Value`.
    #[test]
    fn json_that_would_balloon_in_memory_is_refused_before_it_is_built() {
        let mut bomb = b"[".to_vec();
        while bomb.len() < 2 << 20 {
            bomb.extend_from_slice(br#"{"":0},"#);
        }
        bomb.extend_from_slice(br#"{"":0}]"#);
        let e = parse_json(&bomb).unwrap_err();
        assert!(format!("{e:#}").contains("more than 64 MiB"), "{e:#}");
        // As an error body, it gives a reason without parsing it.
        assert!(!reason(&bomb).is_empty());
        // A large real document parses: a catalog of 2,000 endpoints, a long record.
        let endpoints: Vec<serde_json::Value> = (0..2000)
            .map(|i| serde_json::json!({"id": format!("e{i}"), "interface": "public", "region": "RegionOne", "region_id": "RegionOne", "url": format!("https://image-{i}.example:9292")}))
            .collect();
        let doc =
            serde_json::json!({"token": {"catalog": [{"type": "image", "endpoints": endpoints}]}});
        let text = serde_json::to_vec(&doc).unwrap();
        assert_eq!(parse_json(&text).unwrap(), doc);
        assert!(parse_json(b"{} x").is_err(), "trailing bytes");
        assert!(parse_json(b"").is_err());
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
