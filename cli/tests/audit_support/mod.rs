//! Shared by the audit test binaries: seeding a real Glance catalog through the Images API
//! (create, then PUT the bytes, as any client could; no glimpse in the way), reaching into the
//! file store of `scripts/glance-testenv.sh` to change stored bytes after an upload, running
//! `glimpse audit`, and downloading as an admin or as a plain member of the project.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::upload_support::{glimpse, Glance, TOKEN};

/// The validator of docs/json (the audit binaries do not include `support`, which has more).
#[path = "../support/schema.rs"]
pub mod schema;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root")
                .join("target")
        })
}

/// Where the test Glance of test binary `binary` keeps image `id`'s bytes (its `file` store).
pub fn stored_file(binary: &str, id: &str) -> PathBuf {
    target_dir()
        .join("glance-testenv")
        .join(binary)
        .join("images")
        .join(id)
}

/// Flips a few bytes in the middle of the stored copy of `id`, keeping its length: Glance's
/// record (size, checksum, os_hash_value) no longer matches what it serves.
pub fn corrupt_in_store(binary: &str, id: &str) {
    let p = stored_file(binary, id);
    let mut data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mid = data.len() / 2;
    for b in data.iter_mut().skip(mid).take(16) {
        *b ^= 0x5a;
    }
    std::fs::write(&p, &data).unwrap();
}

/// Creates an image and uploads `data` with a plain `PUT /v2/images/{id}/file`: nothing
/// checks it on the way except Glance itself (which inspects `container_format=bare` only).
/// Returns the id of the now active image.
pub fn seed(
    g: &Glance,
    name: &str,
    disk: &str,
    container: &str,
    data: &[u8],
    tags: &[&str],
) -> String {
    let a = agent();
    let mut resp = a
        .post(format!("{}/v2/images", g.url))
        .header("X-Auth-Token", TOKEN)
        .content_type("application/json")
        .send(
            json!({"name": name, "disk_format": disk, "container_format": container, "tags": tags})
                .to_string(),
        )
        .expect("creating an image");
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    assert_eq!(resp.status().as_u16(), 201, "create {name}: {body}");
    let rec: Value = serde_json::from_str(&body).unwrap();
    let id = rec["id"].as_str().unwrap().to_string();
    let mut resp = a
        .put(format!("{}/v2/images/{id}/file", g.url))
        .header("X-Auth-Token", TOKEN)
        .content_type("application/octet-stream")
        .send(data)
        .expect("uploading image data");
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    assert_eq!(
        resp.status().as_u16(),
        204,
        "upload of {name} ({disk}/{container}): {body}"
    );
    id
}

/// An image's record straight from Glance.
pub fn record(g: &Glance, id: &str) -> Value {
    let mut resp = agent()
        .get(format!("{}/v2/images/{id}", g.url))
        .header("X-Auth-Token", TOKEN)
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "show {id}");
    serde_json::from_slice(&resp.body_mut().read_to_vec().unwrap()).unwrap()
}

/// The HTTP status of a download of `id`, as an admin or as a member (the test identity
/// filter keeps identity headers a request already carries: here the roles).
pub fn download_status(g: &Glance, id: &str, admin: bool) -> u16 {
    let mut req = agent()
        .get(format!("{}/v2/images/{id}/file", g.url))
        .header("X-Auth-Token", TOKEN);
    if !admin {
        req = req.header("X-Roles", "member,reader");
    }
    let mut resp = req.call().unwrap();
    let _ = resp.body_mut().with_config().limit(1 << 30).read_to_vec();
    resp.status().as_u16()
}

/// `glimpse audit --os-auth-token TOKEN --os-image-url URL ARGS`.
pub fn audit_cmd(url: &str, args: &[&str]) -> Command {
    let mut c = glimpse();
    c.arg("audit")
        .args(["--os-auth-token", TOKEN, "--os-image-url", url])
        .args(args);
    c
}

/// Runs `glimpse audit`.
pub fn audit(url: &str, args: &[&str]) -> Output {
    audit_cmd(url, args).output().unwrap()
}

/// The JSON lines of an audit's stdout, each checked against docs/json/audit.json (the audit
/// line is a contract for pipelines, like every other JSON output).
pub fn lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let line: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}"));
            schema::assert_valid("audit.json", &line);
            line
        })
        .collect()
}

/// The ids of the lines, sorted.
pub fn ids(lines: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = lines
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// The finding codes of a line.
pub fn codes(line: &Value) -> Vec<String> {
    line["findings"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| f["code"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// What a [`Rewriter`] does with a reply body: given the request's head (`GET /v2/images?...
/// HTTP/1.1` and its headers) and Glance's reply body, the body to send back, or `None` to
/// close the connection without a reply (a reply lost after Glance acted).
pub type Rewrite = dyn Fn(&str, Vec<u8>) -> Option<Vec<u8>> + Send + Sync;

/// A loopback proxy in front of the real Glance that forwards every request as it came and
/// hands each reply body to a rewrite function: a hostile or broken gateway in front of
/// Glance (a `next` link that changes the filters, a repeated page, odd record fields). It is
/// not a mock: every request goes to glance-api, and the rewrite only changes what it said.
pub struct Rewriter {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Request lines seen.
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Rewriter {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`) that rewrites reply bodies.
    pub fn start(upstream: &str, rewrite: std::sync::Arc<Rewrite>) -> Rewriter {
        use std::net::TcpListener;
        let up = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (up, rw, seen) = (up.clone(), rewrite.clone(), seen.clone());
                std::thread::spawn(move || {
                    let _ = relay(client, &up, &*rw, &seen);
                });
            }
        });
        Rewriter { url, requests }
    }
}

fn find(h: &[u8], pat: &[u8]) -> Option<usize> {
    h.windows(pat.len()).position(|w| w == pat)
}

/// Reads one request (head and Content-Length body), forwards it with `Connection: close`,
/// reads the whole reply, rewrites its body and sends it back.
fn relay(
    mut client: std::net::TcpStream,
    upstream: &str,
    rewrite: &Rewrite,
    seen: &std::sync::Mutex<Vec<String>>,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    client.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 16384];
    let end = loop {
        if let Some(e) = find(&req, b"\r\n\r\n") {
            break e;
        }
        let n = client.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&req[..end]).into_owned();
    let line = head.lines().next().unwrap_or("").to_string();
    seen.lock().unwrap().push(line.clone());
    let len: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while req.len() < end + 4 + len {
        let n = client.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let mut out_head: Vec<String> = head
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(str::to_string)
        .collect();
    out_head.push("Connection: close".into());
    let mut server = std::net::TcpStream::connect(upstream)?;
    server.write_all(format!("{}\r\n\r\n", out_head.join("\r\n")).as_bytes())?;
    server.write_all(&req[end + 4..])?;
    let mut reply = Vec::new();
    server.read_to_end(&mut reply)?;
    let Some(rend) = find(&reply, b"\r\n\r\n") else {
        return client.write_all(&reply);
    };
    let rhead = String::from_utf8_lossy(&reply[..rend]).into_owned();
    let raw = reply[rend + 4..].to_vec();
    let chunked = rhead
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(&raw) } else { raw };
    let Some(body) = rewrite(&head, body) else {
        return client.shutdown(std::net::Shutdown::Both);
    };
    let kept: Vec<&str> = rhead
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            !l.starts_with("content-length:")
                && !l.starts_with("transfer-encoding:")
                && !l.starts_with("connection:")
        })
        .collect();
    client.write_all(
        format!(
            "{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            kept.join("\r\n"),
            body.len()
        )
        .as_bytes(),
    )?;
    client.write_all(&body)?;
    client.flush()
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(e) = find(raw, b"\r\n") {
        let size = String::from_utf8_lossy(&raw[..e]);
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        let start = e + 2;
        out.extend_from_slice(&raw[start..(start + n).min(raw.len())]);
        raw = &raw[(start + n + 2).min(raw.len())..];
    }
    out
}

/// A listing rewrite: applies `f` to the JSON of each `GET /v2/images?` reply (a page), with
/// the request line; other replies pass unchanged.
pub fn pages(f: impl Fn(&str, &mut Value) + Send + Sync + 'static) -> std::sync::Arc<Rewrite> {
    std::sync::Arc::new(move |head: &str, body: Vec<u8>| {
        let line = head.lines().next().unwrap_or("");
        if !line.starts_with("GET /v2/images?") {
            return Some(body);
        }
        Some(match serde_json::from_slice::<Value>(&body) {
            Ok(mut v) => {
                f(line, &mut v);
                v.to_string().into_bytes()
            }
            Err(_) => body,
        })
    })
}
