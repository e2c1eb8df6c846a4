//! The Images API calls the audit makes: listing with filters and `next` links, one image's
//! record, the deactivate/reactivate actions, and the stored data as a stream.
//!
//! Everything Glance says is hostile input: ids go into URL paths only when they look like
//! ids, `next` links are followed only when they stay on the same endpoint, and a page that
//! does not advance ends the listing with an error instead of looping.

use std::io::Read;

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

/// The Images API v2 for the audit.
pub struct Catalog<'a> {
    http: &'a Http,
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
    pub fn new(http: &'a Http, agent: Agent, token: &'a Secret, root: &str, verbose: bool) -> Self {
        Catalog {
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
            .http
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
        let req = ureq::http::Request::builder()
            .method(Method::GET)
            .uri(&url)
            .header("X-Auth-Token", token)
            .body(())
            .map_err(|e| anyhow!("{what}: {e}"))?;
        let resp = self
            .agent
            .run(req)
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
        let reader = resp.into_body().into_with_config().limit(u64::MAX).reader();
        Ok((Box::new(reader), len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client for URL-building tests (nothing is sent).
    fn catalog() -> Catalog<'static> {
        let http: &'static Http = Box::leak(Box::new(Http::new(
            Agent::new_with_defaults(),
            &Default::default(),
            false,
        )));
        let token: &'static Secret = Box::leak(Box::new(Secret::new("t")));
        Catalog::new(
            http,
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
}
