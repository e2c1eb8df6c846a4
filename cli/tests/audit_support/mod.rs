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
