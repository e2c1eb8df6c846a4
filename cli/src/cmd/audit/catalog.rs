//! The Images API calls the audit makes: listing with filters and `next` links, one image's
//! record, the deactivate/reactivate actions, and the stored data as a stream.
//!
//! Everything Glance says is hostile input: ids go into URL paths only when they look like
//! ids, `next` links are followed only when they stay on the same endpoint with the same
//! filters (only the marker moves, to the page's last id), and each record is checked against
//! the filters asked for (see [`Filters::refuses`]).
//!
//! Metadata calls (listing, records, actions) wait at most [`API_TIMEOUT`] for a reply; the
//! data stream has no total limit, only [`STALL_TIMEOUT`] without a byte.

use std::io::Read;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use ureq::http::Method;
use ureq::Agent;

use crate::cmd::upload::http::{Body, Http, Secret, StatusError};

/// The listing filters (`GET /v2/images` query parameters).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// `owner=`.
    pub owner: Option<String>,
    /// `visibility=`.
    pub visibility: Option<String>,
    /// `status=`; `None` lists every status Glance shows.
    pub status: Option<String>,
    /// `disk_format=`.
    pub disk_format: Option<String>,
    /// `tag=` (repeated: images with every tag).
    pub tags: Vec<String>,
    /// `limit=`: images per page.
    pub page_size: u32,
}

/// How long a metadata call (a listing page, a record, an action) may wait for its reply.
pub const API_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the data stream of `--verify-digests` may go without a byte (it has no total
/// limit: a large image streams for as long as bytes keep coming).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(120);

impl Filters {
    /// Why `record` is not one the listing asked for, if it is not: Glance (or whatever sits
    /// in front of it) answered with an image outside the filters.
    pub fn refuses(&self, record: &Value) -> Option<String> {
        let text = |k: &str| record.get(k).and_then(Value::as_str);
        let pairs = [
            ("owner", &self.owner),
            ("status", &self.status),
            ("disk_format", &self.disk_format),
        ];
        for (k, want) in pairs {
            if let Some(want) = want {
                if text(k) != Some(want.as_str()) {
                    return Some(format!("{k} is not {want:?}"));
                }
            }
        }
        if let Some(want) = &self.visibility {
            if want != "all" && text("visibility") != Some(want.as_str()) {
                return Some(format!("visibility is not {want:?}"));
            }
        }
        let tags: Vec<&str> = match record.get("tags") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        for t in &self.tags {
            if !tags.contains(&t.as_str()) {
                return Some(format!("it has no tag {t:?}"));
            }
        }
        None
    }
}

/// Decodes a query component (`%XX`, and `+` for a space as Python's `urlencode` writes it).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0usize;
    while let Some(&c) = b.get(i) {
        let hex = b
            .get(i.saturating_add(1)..i.saturating_add(3))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (c, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i = i.saturating_add(3);
            }
            (b'+', _) => {
                out.push(b' ');
                i = i.saturating_add(1);
            }
            _ => {
                out.push(c);
                i = i.saturating_add(1);
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A listing URL's query: its decoded parameters other than `marker`, sorted, and its
/// markers.
fn query(url: &str) -> (Vec<(String, String)>, Vec<String>) {
    let q = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut params = Vec::new();
    let mut markers = Vec::new();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let (k, v) = (decode(k), decode(v));
        if k == "marker" {
            markers.push(v);
        } else {
            params.push((k, v));
        }
    }
    params.sort();
    (params, markers)
}

/// Checks that `next` (an absolute URL on the endpoint) lists the same images as `first`
/// from after `last`, the id of the page just read: the same parameters but the marker, and
/// the marker `last`. A link that changes the filters would audit (and deactivate) images
/// outside the ones asked for; one whose marker is elsewhere would skip images or loop.
///
/// # Errors
/// Says what differs.
pub fn check_next(first: &str, next: &str, last: Option<&str>) -> anyhow::Result<()> {
    let (want, _) = query(first);
    let (got, markers) = query(next);
    if got != want {
        bail!(
            "listing images: Glance's `next` link {:?} changes the listing's filters",
            clip(next)
        );
    }
    match (markers.as_slice(), last) {
        ([m], Some(last)) if m == last => Ok(()),
        _ => bail!(
            "listing images: Glance's `next` link {:?} does not resume after the page's last \
             image ({})",
            clip(next),
            last.unwrap_or("none")
        ),
    }
}

/// The Images API v2 for the audit.
pub struct Catalog<'a> {
    /// Listing pages: a signal shuts its connections down.
    list_http: Http,
    /// Records and actions: never shut down by a signal, so that a deactivation under way
    /// finishes and is reported.
    http: Http,
    /// For the data stream, which `Http` (bodies read in full) does not serve.
    agent: Agent,
    token: &'a Secret,
    /// The image service root, without `/v2`.
    root: String,
    verbose: bool,
}

/// Longest image id accepted (Glance's are 36-character UUIDs).
const MAX_ID: usize = 64;

/// An image id safe to put in a URL path: what Glance issues (UUIDs) and what a user might
/// type; never `/`, `.`, `?` or `%`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn check_id(id: &str) -> anyhow::Result<&str> {
    if valid_id(id) {
        Ok(id)
    } else {
        bail!("{:?} is not an image id", clip(id))
    }
}

/// At most 80 characters of something a server said, for a message.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", s.get(..i).unwrap_or_default()),
        None => s.to_string(),
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl<'a> Catalog<'a> {
    /// A client for the image service at `root` (no `/v2`).
    pub fn new(
        list_http: Http,
        http: Http,
        agent: Agent,
        token: &'a Secret,
        root: &str,
        verbose: bool,
    ) -> Self {
        Catalog {
            list_http,
            http,
            agent,
            token,
            root: root.trim_end_matches('/').to_string(),
            verbose,
        }
    }

    /// `{root}/v2/images/{id}`.
    fn image_url(&self, id: &str) -> anyhow::Result<String> {
        Ok(format!("{}/v2/images/{}", self.root, check_id(id)?))
    }

    /// `GET {root}/v2/images/{id}/file`: where the stored data is read from.
    ///
    /// # Errors
    /// The id is not an id.
    pub fn file_url(&self, id: &str) -> anyhow::Result<String> {
        Ok(format!("{}/file", self.image_url(id)?))
    }

    /// The first page's URL for `filters`, starting after `marker`.
    ///
    /// # Errors
    /// The marker is not an image id.
    pub fn first_page(&self, filters: &Filters, marker: Option<&str>) -> anyhow::Result<String> {
        let mut q = vec![format!("limit={}", filters.page_size.max(1))];
        // A stable order, so that `--marker` resumes exactly where a run stopped: Glance's
        // default sort (created_at) ties on images created in the same second.
        q.push("sort_key=id".into());
        q.push("sort_dir=asc".into());
        if let Some(m) = marker {
            q.push(format!("marker={}", check_id(m)?));
        }
        let pairs = [
            ("owner", &filters.owner),
            ("visibility", &filters.visibility),
            ("status", &filters.status),
            ("disk_format", &filters.disk_format),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                q.push(format!("{k}={}", encode(v)));
            }
        }
        for t in &filters.tags {
            q.push(format!("tag={}", encode(t)));
        }
        Ok(format!("{}/v2/images?{}", self.root, q.join("&")))
    }

    /// One page: its images and the URL of the next page, if any.
    ///
    /// # Errors
    /// Transport errors, Glance's reason, a reply that is not a page, or a `next` link that
    /// leaves the image endpoint.
    pub fn page(&self, url: &str) -> anyhow::Result<(Vec<Value>, Option<String>)> {
        let reply = self
            .list_http
            .expect(Method::GET, url, Some(self.token), Body::Empty)?;
        let mut doc = reply.json().context("listing images")?;
        let images = match doc.get_mut("images").map(Value::take) {
            Some(Value::Array(a)) => a,
            _ => bail!("listing images: Glance's reply has no `images` array"),
        };
        let next = match doc.get("next") {
            None | Some(Value::Null) => None,
            Some(Value::String(n)) => Some(self.next_url(n)?),
            Some(_) => bail!("listing images: Glance's `next` is not a string"),
        };
        Ok((images, next))
    }

    /// A `next` link as a URL on this endpoint. Glance sends a path (`/v2/images?marker=..`);
    /// anything that would take the token to another host or path is refused.
    fn next_url(&self, next: &str) -> anyhow::Result<String> {
        let path = match next.strip_prefix(&self.root) {
            Some(p) => p,
            None => next,
        };
        if !path.starts_with("/v2/images?") || path.contains(['#', '\\']) || path.contains("..") {
            bail!(
                "listing images: Glance's `next` link {:?} does not point at {}/v2/images",
                clip(next),
                self.root
            );
        }
        Ok(format!("{}{path}", self.root))
    }

    /// `GET /v2/images/{id}`.
    ///
    /// # Errors
    /// Transport errors, or Glance's reason (404 for an unknown id).
    pub fn get(&self, id: &str) -> anyhow::Result<Value> {
        let reply = self.http.expect(
            Method::GET,
            &self.image_url(id)?,
            Some(self.token),
            Body::Empty,
        )?;
        let v = reply.json().with_context(|| format!("image {id}"))?;
        if !v.is_object() {
            bail!("image {id}: Glance's reply is not an image record");
        }
        Ok(v)
    }

    fn action(&self, id: &str, action: &str) -> anyhow::Result<()> {
        let url = format!("{}/actions/{action}", self.image_url(id)?);
        // Glance refuses a body here (400 "A body is not expected"), and a POST without a
        // length goes out chunked, which counts as one: say Content-Length: 0.
        let mut nothing = std::io::empty();
        self.http.expect(
            Method::POST,
            &url,
            Some(self.token),
            Body::Stream(&mut nothing, 0),
        )?;
        Ok(())
    }

    /// `POST /v2/images/{id}/actions/deactivate` (admin only).
    ///
    /// # Errors
    /// Transport errors, or Glance's reason (403 without the admin role).
    pub fn deactivate(&self, id: &str) -> anyhow::Result<()> {
        self.action(id, "deactivate")
    }

    /// `POST /v2/images/{id}/actions/reactivate` (admin only).
    ///
    /// # Errors
    /// Transport errors, or Glance's reason.
    pub fn reactivate(&self, id: &str) -> anyhow::Result<()> {
        self.action(id, "reactivate")
    }

    /// The token and its header, for a reader of the image data.
    pub fn auth_headers(&self) -> Vec<(String, Secret)> {
        vec![("X-Auth-Token".to_string(), self.token.clone())]
    }

    /// The agent (TLS settings, no redirects).
    pub fn agent(&self) -> Agent {
        self.agent.clone()
    }

    /// `GET /v2/images/{id}/file` as a stream: the reader and the Content-Length, if sent.
    ///
    /// # Errors
    /// Transport errors, or Glance's reason (204 with no data is an error too).
    pub fn download(&self, id: &str) -> anyhow::Result<(Box<dyn Read + Send>, Option<u64>)> {
        let url = self.file_url(id)?;
        let what = format!("GET {url}");
        if self.verbose {
            errln!("glimpse: {what}");
        }
        let mut token = ureq::http::HeaderValue::from_str(self.token.expose())
            .map_err(|_| anyhow!("the token is not a valid header value"))?;
        token.set_sensitive(true);
        // No total limit on the body: an image streams as long as bytes keep coming.
        let resp = self
            .agent
            .get(&url)
            .config()
            .timeout_recv_response(Some(API_TIMEOUT))
            .timeout_per_read(Some(STALL_TIMEOUT))
            .timeout_recv_body(None)
            .build()
            .header("X-Auth-Token", token)
            .call()
            .with_context(|| format!("{what}: no reply"))?;
        let status = resp.status().as_u16();
        if self.verbose {
            errln!("glimpse: {what} -> {status}");
        }
        let len = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if status != 200 {
            let request_id = resp
                .headers()
                .get("x-openstack-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp
                .into_body()
                .into_with_config()
                .limit(64 << 10)
                .read_to_vec()
                .unwrap_or_default();
            let reason = if status == 204 {
                "no data is stored for this image".to_string()
            } else {
                crate::cmd::upload::http::reason(&body)
            };
            return Err(StatusError {
                what,
                status,
                reason,
                request_id,
            }
            .into());
        }
        // Encoded bytes are not the stored data: their digest would mismatch Glance's for no
        // fault of the image, or match a record that describes them and not the image.
        crate::remote::refuse_encoding(resp.headers()).map_err(|e| anyhow!("{what}: {e}"))?;
        let reader = resp.into_body().into_with_config().limit(u64::MAX).reader();
        Ok((Box::new(reader), len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client for URL-building tests (nothing is sent).
    fn catalog() -> Catalog<'static> {
        let http = || Http::new(Agent::new_with_defaults(), &Default::default(), false);
        let token: &'static Secret = Box::leak(Box::new(Secret::new("t")));
        Catalog::new(
            http(),
            http(),
            Agent::new_with_defaults(),
            token,
            "http://glance:9292/",
            false,
        )
    }

    #[test]
    fn ids_are_checked_before_they_reach_a_path() {
        assert!(valid_id("0b5ea1b4-5a4e-4b53-9d0e-1c9f3a3b6f10"));
        for bad in ["", "../x", "a/b", "a?b", "a%2f", "a.b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn filters_become_an_encoded_query() {
        let c = catalog();
        let f = Filters {
            owner: Some("p 1".into()),
            status: Some("active".into()),
            tags: vec!["a&b".into(), "c".into()],
            page_size: 50,
            ..Filters::default()
        };
        assert_eq!(
            c.first_page(&f, Some("abc-1")).unwrap(),
            "http://glance:9292/v2/images?limit=50&sort_key=id&sort_dir=asc&marker=abc-1&owner=p%201&status=active&tag=a%26b&tag=c"
        );
        assert!(c.first_page(&f, Some("../x")).is_err());
    }

    #[test]
    fn next_links_stay_on_the_endpoint() {
        let c = catalog();
        assert_eq!(
            c.next_url("/v2/images?marker=x&limit=2").unwrap(),
            "http://glance:9292/v2/images?marker=x&limit=2"
        );
        assert_eq!(
            c.next_url("http://glance:9292/v2/images?marker=x").unwrap(),
            "http://glance:9292/v2/images?marker=x"
        );
        for bad in [
            "http://evil/v2/images?marker=x",
            "//evil/v2/images?x",
            "/v2/images/../../x?",
            "/v2/other?x",
            "/v2/images?x#y",
        ] {
            assert!(c.next_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn next_links_keep_the_filters_and_resume_after_the_last_id() {
        let first =
            "http://g/v2/images?limit=2&sort_key=id&sort_dir=asc&owner=p%201&tag=a%26b&tag=c";
        // Glance's own link: its order, `+` for a space, the marker added
        let ok = "http://g/v2/images?tag=a%26b&tag=c&owner=p+1&limit=2&sort_key=id&sort_dir=asc&marker=x9";
        check_next(first, ok, Some("x9")).unwrap();
        for bad in [
            // a filter changed, dropped or added
            "http://g/v2/images?tag=zz&tag=c&owner=p+1&limit=2&sort_key=id&sort_dir=asc&marker=x9",
            "http://g/v2/images?tag=c&owner=p+1&limit=2&sort_key=id&sort_dir=asc&marker=x9",
            "http://g/v2/images?tag=a%26b&tag=c&owner=p+1&limit=2&sort_key=id&sort_dir=desc&marker=x9",
            "http://g/v2/images?tag=a%26b&tag=c&owner=p+1&limit=2&sort_key=id&sort_dir=asc&status=x&marker=x9",
            // a marker that is not the page's last id, or none, or two
            "http://g/v2/images?tag=a%26b&tag=c&owner=p+1&limit=2&sort_key=id&sort_dir=asc&marker=x1",
            "http://g/v2/images?tag=a%26b&tag=c&owner=p+1&limit=2&sort_key=id&sort_dir=asc",
            "http://g/v2/images?tag=a%26b&tag=c&owner=p+1&limit=2&sort_key=id&sort_dir=asc&marker=x9&marker=x9",
        ] {
            assert!(check_next(first, bad, Some("x9")).is_err(), "{bad}");
        }
        assert!(check_next(first, ok, None).is_err());
    }

    #[test]
    fn records_outside_the_filters_are_refused() {
        let f = Filters {
            owner: Some("p1".into()),
            status: Some("active".into()),
            visibility: Some("all".into()),
            tags: vec!["a".into(), "b".into()],
            ..Filters::default()
        };
        let good = serde_json::json!({"owner": "p1", "status": "active", "visibility": "private",
            "tags": ["b", "a", "c"]});
        assert_eq!(f.refuses(&good), None);
        for (k, v) in [
            ("owner", serde_json::json!("p2")),
            ("status", serde_json::json!(["active"])),
            ("tags", serde_json::json!(["a"])),
            ("tags", serde_json::json!("a,b")),
        ] {
            let mut r = good.clone();
            r[k] = v;
            assert!(f.refuses(&r).is_some(), "{r}");
        }
        let f = Filters {
            visibility: Some("public".into()),
            disk_format: Some("raw".into()),
            ..Filters::default()
        };
        assert!(f
            .refuses(&serde_json::json!({"visibility": "private", "disk_format": "raw"}))
            .is_some());
        assert!(f
            .refuses(&serde_json::json!({"visibility": "public", "disk_format": "qcow2"}))
            .is_some());
        assert_eq!(
            f.refuses(&serde_json::json!({"visibility": "public", "disk_format": "raw"})),
            None
        );
    }
}
