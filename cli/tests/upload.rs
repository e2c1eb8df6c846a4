//! `glimpse upload` against a real glance-api (glance 33 under uWSGI, started by
//! `scripts/glance-testenv.sh`). Nothing here mocks Glance: the proxy only forwards bytes,
//! and the Keystone responder serves a recorded token reply whose catalog points at the real
//! Glance.

#[path = "support/schema.rs"]
#[allow(dead_code)]
mod schema;
mod upload_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use upload_support::{
    digests, glance, glimpse, json, raw_file, spawn_upload, text, unique, upload, Proxy, PutMode,
    TOKEN,
};

const BIN: &str = "upload";

#[test]
fn raw_upload_ends_active_with_matching_digests_and_no_secret_in_the_log() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 3 * 1024 * 1024 + 4097);
    let (md5, sha512) = digests(&file);
    let name = unique("raw");
    let out = upload(
        &g.url,
        &[
            "--name",
            &name,
            "--output",
            "json",
            "-v",
            "--property",
            "os_distro=debian",
            "--property",
            "hw_disk_bus=virtio",
            "--tag",
            "ci",
            "--tag",
            "glimpse",
            "--min-ram",
            "256",
            "--visibility",
            "private",
            file.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let img = json(&out);
    assert_eq!(img["status"], "active");
    assert_eq!(img["name"], name.as_str());
    assert_eq!(img["disk_format"], "raw");
    assert_eq!(img["container_format"], "bare");
    assert_eq!(img["size"], 3 * 1024 * 1024 + 4097);
    assert_eq!(img["virtual_size"], 3 * 1024 * 1024 + 4097);
    assert_eq!(img["checksum"], md5.as_str());
    assert_eq!(img["os_hash_algo"], "sha512");
    assert_eq!(img["os_hash_value"], sha512.as_str());
    assert_eq!(img["min_disk"], 1, "3 MiB rounds up to 1 GiB");
    assert_eq!(img["min_ram"], 256);
    assert_eq!(img["visibility"], "private");
    assert_eq!(img["os_distro"], "debian");
    assert_eq!(img["hw_disk_bus"], "virtio");
    let mut tags: Vec<&str> = img["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tags.sort();
    assert_eq!(tags, ["ci", "glimpse"]);

    // what Glance holds is byte for byte the file
    let id = img["id"].as_str().unwrap();
    assert_eq!(g.download(id), std::fs::read(&file).unwrap());
    let listed = g.images_named(&name);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["checksum"], md5.as_str());

    // -v logs requests and Glance's request ids, never the token
    assert!(
        stderr.contains("POST ") && stderr.contains("/v2/images"),
        "{stderr}"
    );
    assert!(stderr.contains("request id req-"), "{stderr}");
    assert!(
        !stderr.contains(TOKEN) && !stdout.contains(TOKEN),
        "the token leaked:\n{stdout}\n{stderr}"
    );
    g.delete(id);
}

#[test]
fn human_output_is_a_field_value_table_and_protected_is_set_last() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "small.img", 100_000);
    let name = unique("human");
    let out = upload(
        &g.url,
        &[
            "--name",
            &name,
            "--protected",
            "--min-disk",
            "3",
            file.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("+-")
            && lines[1].starts_with("| Field")
            && lines[1].contains("| Value"),
        "{stdout}"
    );
    let row = |field: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("| {field} ")))
            .map(|l| l.split('|').nth(2).unwrap().trim().to_string())
            .unwrap_or_else(|| panic!("no {field} row in\n{stdout}"))
    };
    assert_eq!(row("status"), "active");
    assert_eq!(row("name"), name);
    assert_eq!(row("protected"), "true");
    assert_eq!(row("min_disk"), "3");
    assert_eq!(row("checksum"), digests(&file).0);
    let listed = g.images_named(&name);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["protected"], true);
    g.delete(listed[0]["id"].as_str().unwrap());
}

#[test]
fn a_format_mismatch_is_refused_locally_and_nothing_is_sent() {
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::Pass);
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 64 * 1024);
    let name = unique("mismatch");
    let out = upload(
        &proxy.url,
        &[
            "--name",
            &name,
            "--disk-format",
            "qcow2",
            file.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("format.mismatch"), "{stderr}");
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    assert_eq!(
        proxy.connections.load(Ordering::SeqCst),
        0,
        "a request reached Glance"
    );
    assert!(g.images_named(&name).is_empty());

    // the same with JSON output: the verdict and findings
    let out = upload(
        &proxy.url,
        &[
            "--name",
            &name,
            "--disk-format",
            "vmdk",
            "--output",
            "json",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["verdict"], "reject");
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["code"] == "format.mismatch"),
        "{v}"
    );
    assert_eq!(proxy.connections.load(Ordering::SeqCst), 0);
}

#[test]
fn policy_flags_apply_before_upload() {
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::Pass);
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "big.raw", 2 * 1024 * 1024);
    let name = unique("sizecap");
    let out = upload(
        &proxy.url,
        &[
            "--name",
            &name,
            "--max-virtual-size",
            "1M",
            file.to_str().unwrap(),
        ],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("size.limit"), "{stderr}");
    // ami/ari/aki must be plain bytes, and their container must match
    let out = upload(
        &proxy.url,
        &[
            "--name",
            &name,
            "--disk-format",
            "ami",
            "--container-format",
            "bare",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("to match"), "{:?}", text(&out));
    assert_eq!(proxy.connections.load(Ordering::SeqCst), 0);
    assert!(g.images_named(&name).is_empty());
}

#[test]
fn amazon_kernel_and_uninspectable_pairs_upload() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "vmlinuz", 50_000);
    let name = unique("aki");
    let out = upload(
        &g.url,
        &[
            "--name",
            &name,
            "--disk-format",
            "aki",
            "--container-format",
            "aki",
            "--output",
            "json",
            file.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(json(&out)["disk_format"], "aki");
    g.delete(json(&out)["id"].as_str().unwrap());

    // ploop is inspected like every format: raw bytes declared ploop are a mismatch, refused
    // before anything is sent; --force uploads them with the findings on stderr.
    let name = unique("ploop");
    let args = [
        "--name",
        &name,
        "--disk-format",
        "ploop",
        "--output",
        "json",
        file.to_str().unwrap(),
    ];
    let out = upload(&g.url, &args);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("format.mismatch"), "{stderr}");
    let mut forced = vec!["--force"];
    forced.extend(args);
    let out = upload(&g.url, &forced);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("format.mismatch"), "{stderr}");
    assert_eq!(json(&out)["status"], "active");
    g.delete(json(&out)["id"].as_str().unwrap());
}

#[test]
fn an_upload_glance_rejects_leaves_no_image_behind() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 256 * 1024);
    let name = unique("glance-415");
    // --force overrides our own check; Glance's inspector (container bare) then refuses raw
    // bytes declared as qcow2 with 415 and keeps the image queued: glimpse must delete it.
    let out = upload(
        &g.url,
        &[
            "--name",
            &name,
            "--disk-format",
            "qcow2",
            "--force",
            file.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert!(stderr.contains("HTTP 415"), "{stderr}");
    assert!(stderr.contains("deleted"), "{stderr}");
    assert!(g.images_named(&name).is_empty(), "an image was left behind");

    // --keep-on-failure keeps it, queued, for a post-mortem
    let out = upload(
        &g.url,
        &[
            "--name",
            &name,
            "--disk-format",
            "qcow2",
            "--force",
            "--keep-on-failure",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("kept"), "{:?}", text(&out));
    let left = g.images_named(&name);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["status"], "queued");
    g.delete(left[0]["id"].as_str().unwrap());
}

#[test]
fn a_killed_connection_leaves_no_image_behind() {
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::CutAfter(1024 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 6 * 1024 * 1024);
    let name = unique("cut");
    let out = upload(&proxy.url, &["--name", &name, "-v", file.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("the upload failed"), "{stderr}");
    assert!(stderr.contains("deleted"), "{stderr}");
    // exactly one PUT: never retried on the same image
    let puts = proxy
        .heads()
        .iter()
        .filter(|h| h.starts_with("PUT "))
        .count();
    assert_eq!(puts, 1, "{:?}", proxy.heads());
    assert!(g.images_named(&name).is_empty(), "an image was left behind");
}

/// SIGINT, SIGHUP (a closed ssh session) and SIGTERM sent twice (a second signal does not cut
/// the cleanup short): each stops the upload and the half-made image is deleted.
#[test]
fn a_signal_during_the_upload_deletes_the_image() {
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::Throttle(16 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 8 * 1024 * 1024);
    for (sig, sig_name, times) in [
        (libc::SIGINT, "SIGINT", 1),
        (libc::SIGHUP, "SIGHUP", 1),
        (libc::SIGTERM, "SIGTERM", 2),
    ] {
        let name = unique("signal");
        let before = proxy.put_bytes.load(Ordering::SeqCst);
        let child = spawn_upload(&proxy.url, &name, &file);
        proxy.wait_for_put_bytes(before + 64 * 1024);
        let pid = i32::try_from(child.id()).unwrap();
        for _ in 0..times {
            // SAFETY: sending a signal to our own child process.
            assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        }
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{sig_name}: {stdout}\n{stderr}");
        assert!(
            stderr.contains(&format!("interrupted by {sig_name}")),
            "{stderr}"
        );
        assert!(stderr.contains("deleted"), "{sig_name}: {stderr}");
        assert!(
            g.images_named(&name).is_empty(),
            "{sig_name}: an image was left behind"
        );
    }
}

#[test]
fn the_import_flow_ends_active_and_a_failed_import_is_cleaned_up() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 1024 * 1024 + 17);
    let (md5, sha512) = digests(&file);
    let name = unique("import");
    let out = upload(
        &g.url,
        &[
            "--name",
            &name,
            "--import",
            "--output",
            "json",
            "-v",
            file.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("/stage") && stderr.contains("/import"),
        "{stderr}"
    );
    let img = json(&out);
    assert_eq!(img["status"], "active");
    assert_eq!(img["checksum"], md5.as_str());
    assert_eq!(img["os_hash_value"], sha512.as_str());
    assert_eq!(img["size"], 1024 * 1024 + 17);
    g.delete(img["id"].as_str().unwrap());

    // Glance accepts the import request (202) for raw bytes declared qcow2, then its task
    // fails: glimpse must notice, say so and delete the image.
    let name = unique("import-fail");
    let out = upload(
        &g.url,
        &[
            "--name",
            &name,
            "--import",
            "--force",
            "--disk-format",
            "qcow2",
            file.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("the import failed"), "{stderr}");
    assert!(stderr.contains("deleted"), "{stderr}");
    assert!(g.images_named(&name).is_empty(), "an image was left behind");
}

/// A loopback responder for `POST /v3/auth/tokens` that serves the recorded Keystone reply
/// (with `@GLANCE_URL@` replaced) and records each request body.
struct Keystone {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Keystone {
    fn start(glance_url: &str, subject_token: &'static str, password: &'static str) -> Keystone {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v3", listener.local_addr().unwrap());
        let ok = include_str!("fixtures/keystone/token-password-scoped.json")
            .replace("@GLANCE_URL@", glance_url);
        let unauthorized = include_str!("fixtures/keystone/unauthorized.json");
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let b = bodies.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let request_line = line.clone();
                let mut len = 0usize;
                loop {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0u8; len];
                reader.read_exact(&mut body).unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let good = request_line.starts_with("POST /v3/auth/tokens ")
                    && body.pointer("/auth/identity/password/user/password")
                        == Some(&Value::from(password));
                b.lock().unwrap().push(body);
                let reply = if good {
                    format!(
                        "HTTP/1.1 201 Created\r\nX-Subject-Token: {subject_token}\r\nContent-Type: application/json\r\n\
                         x-openstack-request-id: req-keystone-1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ok}",
                        ok.len()
                    )
                } else {
                    format!(
                        "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n{unauthorized}",
                        unauthorized.len()
                    )
                };
                let _ = conn.write_all(reply.as_bytes());
            }
        });
        Keystone { url, bodies }
    }
}

const PASSWORD: &str = "pa55-w0rd-never-printed";
const SUBJECT_TOKEN: &str = "gAAAAABsubject-token-from-keystone-5f1e2d3c";

#[test]
fn keystone_password_auth_finds_the_image_endpoint_and_uploads() {
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::Pass);
    let ks = Keystone::start(&proxy.url, SUBJECT_TOKEN, PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 200_000);
    let name = unique("keystone");
    let out = glimpse()
        .args([
            "upload",
            "-v",
            "--output",
            "json",
            "--name",
            &name,
            file.to_str().unwrap(),
        ])
        .env("OS_AUTH_URL", &ks.url)
        .env("OS_USERNAME", "glimpse-ci")
        .env("OS_PASSWORD", PASSWORD)
        .env("OS_PROJECT_NAME", "glimpse-test")
        .env("OS_USER_DOMAIN_NAME", "Default")
        .env("OS_PROJECT_DOMAIN_NAME", "Default")
        .env("OS_REGION_NAME", "RegionOne")
        .env("OS_INTERFACE", "public")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(json(&out)["status"], "active");
    for secret in [PASSWORD, SUBJECT_TOKEN] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a secret leaked:\n{stdout}\n{stderr}"
        );
    }
    assert!(stderr.contains("/v3/auth/tokens -> 201"), "{stderr}");
    // the request Keystone got
    let bodies = ks.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1);
    let auth = &bodies[0]["auth"];
    assert_eq!(auth["identity"]["methods"], serde_json::json!(["password"]));
    assert_eq!(auth["identity"]["password"]["user"]["name"], "glimpse-ci");
    assert_eq!(
        auth["identity"]["password"]["user"]["domain"]["name"],
        "Default"
    );
    assert_eq!(auth["scope"]["project"]["name"], "glimpse-test");
    // Glance was reached through the catalog's RegionOne public endpoint, with the subject token
    let heads = proxy.heads();
    assert!(heads.iter().any(|h| h.starts_with("PUT ")), "{heads:?}");
    for h in &heads {
        assert!(
            h.to_ascii_lowercase().contains(&format!(
                "x-auth-token: {}",
                SUBJECT_TOKEN.to_ascii_lowercase()
            )),
            "{h}"
        );
    }
    g.delete(json(&out)["id"].as_str().unwrap());
}

#[test]
fn keystone_failures_are_clear_and_create_nothing() {
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::Pass);
    let ks = Keystone::start(&proxy.url, SUBJECT_TOKEN, PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 10_000);
    let base = |pw: &str, region: &str| {
        let mut c = glimpse();
        c.args(["upload", "-v", file.to_str().unwrap()])
            .env("OS_AUTH_URL", &ks.url)
            .env("OS_USER_ID", "ee4dfb6e5540447cb3741905149d9b6e")
            .env("OS_PASSWORD", pw)
            .env("OS_PROJECT_ID", "a6944d763bf64ee6a275f1263fae0352")
            .env("OS_REGION_NAME", region);
        c
    };
    let out = base("wrong-password", "RegionOne").output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("HTTP 401") && stderr.contains("requires authentication"),
        "{stderr}"
    );
    assert!(!stdout.contains("wrong-password") && !stderr.contains("wrong-password"));

    let out = base(PASSWORD, "RegionNine").output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("no image endpoint") && stderr.contains("RegionNine"),
        "{stderr}"
    );
    assert!(!stderr.contains(PASSWORD) && !stderr.contains(SUBJECT_TOKEN));
    assert_eq!(
        proxy.connections.load(Ordering::SeqCst),
        0,
        "Glance was contacted"
    );
    let bodies = ks.bodies.lock().unwrap().clone();
    assert_eq!(
        bodies[1]["auth"]["identity"]["password"]["user"]["id"],
        "ee4dfb6e5540447cb3741905149d9b6e"
    );
    assert_eq!(
        bodies[1]["auth"]["scope"]["project"]["id"],
        "a6944d763bf64ee6a275f1263fae0352"
    );
}

#[test]
fn os_cloud_reads_clouds_yaml() {
    let g = glance(BIN);
    let ks = Keystone::start(&g.url, SUBJECT_TOKEN, PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 30_000);
    let clouds = dir.path().join("clouds.yaml");
    std::fs::write(
        &clouds,
        format!(
            "clouds:\n  other:\n    auth:\n      auth_url: http://127.0.0.1:1/v3\n  ci:\n    auth:\n      auth_url: {}\n      \
             username: glimpse-ci\n      password: \"{PASSWORD}\"\n      project_name: glimpse-test\n      \
             user_domain_name: Default\n      project_domain_name: Default\n    region_name: RegionOne\n    \
             interface: public\n    identity_api_version: 3\n",
            ks.url
        ),
    )
    .unwrap();
    let name = unique("clouds-yaml");
    let out = glimpse()
        .args([
            "upload",
            "--output",
            "json",
            "-v",
            "--name",
            &name,
            file.to_str().unwrap(),
        ])
        .env("OS_CLOUD", "ci")
        .env("OS_CLIENT_CONFIG_FILE", &clouds)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stdout.contains(PASSWORD) && !stderr.contains(PASSWORD));
    assert_eq!(json(&out)["status"], "active");
    g.delete(json(&out)["id"].as_str().unwrap());

    let out = glimpse()
        .args(["upload", file.to_str().unwrap()])
        .env("OS_CLOUD", "missing")
        .env("OS_CLIENT_CONFIG_FILE", &clouds)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains("no cloud named \"missing\""),
        "{:?}",
        text(&out)
    );
}

#[test]
fn help_and_errors_never_show_secrets() {
    let out = glimpse()
        .args(["upload", "--help"])
        .env("OS_PASSWORD", PASSWORD)
        .env("OS_AUTH_TOKEN", TOKEN)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout.contains("--os-auth-token") && stdout.contains("--keep-on-failure"));
    assert!(!stdout.contains(PASSWORD) && !stdout.contains(TOKEN) && !stderr.contains(PASSWORD));
    // a token without an endpoint: a usage error that does not echo the token
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 1000);
    let out = glimpse()
        .args(["upload", file.to_str().unwrap()])
        .env("OS_AUTH_TOKEN", TOKEN)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("OS_IMAGE_URL"), "{stderr}");
    assert!(!stderr.contains(TOKEN) && !stdout.contains(TOKEN));
}

/// A child process killed when the test ends, pass or fail.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is required for the TLS test");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tls_is_verified_and_os_cacert_and_insecure_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        d,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=glimpse test CA",
                "-days",
                "2",
            ],
        ]
        .concat(),
    );
    openssl(
        d,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        d.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
    // An HTTPS server that answers every POST with 501: enough to see the TLS handshake pass.
    let script = "import http.server, ssl, sys\n\
                  srv = http.server.HTTPServer(('127.0.0.1', 0), http.server.BaseHTTPRequestHandler)\n\
                  ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
                  ctx.load_cert_chain(sys.argv[1], sys.argv[2])\n\
                  srv.socket = ctx.wrap_socket(srv.socket, server_side=True)\n\
                  print(srv.server_address[1], flush=True)\n\
                  srv.serve_forever()\n";
    let mut server = KillOnDrop(
        std::process::Command::new("python3")
            .args(["-c", script])
            .arg(d.join("leaf.pem"))
            .arg(d.join("leaf.key"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is required"),
    );
    let mut port = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let url = format!("https://127.0.0.1:{}", port.trim());
    let file = raw_file(d, "disk.raw", 1000);
    let run = |extra: &[&str], cacert: Option<&std::path::Path>| {
        let mut c = glimpse();
        c.args(["upload", "--os-auth-token", TOKEN, "--os-image-url", &url])
            .args(extra)
            .arg(&file);
        if let Some(p) = cacert {
            c.env("OS_CACERT", p);
        }
        c.output().unwrap()
    };
    // the built-in roots do not know our CA: refused before any HTTP exchange
    let out = run(&[], None);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.to_ascii_lowercase().contains("certificate") || stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    // OS_CACERT trusts it: the handshake passes and the server's 501 comes back
    let out = run(&[], Some(&d.join("ca.pem")));
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("HTTP 501"), "{stderr}");
    // --insecure skips verification
    let out = run(&["--insecure"], None);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("HTTP 501"), "{stderr}");
    assert!(!stderr.contains(TOKEN));
}

/// Glance made the image but its reply to the create never arrived (a reset, a gateway error):
/// glimpse chose the id, so it still deletes that image, and says so in its JSON.
#[test]
fn a_lost_create_reply_leaves_no_image_behind() {
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::DropReply("POST /v2/images "));
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 64 * 1024);
    let name = unique("lostcreate");
    let out = upload(
        &proxy.url,
        &["--name", &name, "--output", "json", file.to_str().unwrap()],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("creating the image"), "{stderr}");
    assert!(
        stderr.contains("deleted; nothing was left behind"),
        "{stderr}"
    );
    let creates = proxy
        .heads()
        .iter()
        .filter(|h| h.starts_with("POST /v2/images "))
        .count();
    assert_eq!(creates, 1, "{:?}", proxy.heads());
    assert!(g.images_named(&name).is_empty(), "an image was left behind");
    let v = json(&out);
    assert_eq!(v["left_behind"], false, "{v}");
    let id = v["image_id"].as_str().unwrap();
    assert_eq!(id.len(), 36, "{id}");
    assert!(
        proxy
            .heads()
            .iter()
            .any(|h| h.starts_with(&format!("DELETE /v2/images/{id} "))),
        "{:?}",
        proxy.heads()
    );
    schema::assert_valid("upload.json", &v);
}

/// A signal while Glance has not answered yet (the create, the PUT, which Glance answers only
/// once the data is stored, or the verifying GET) ends the wait at once; the image is deleted
/// over a new connection.
#[test]
fn a_signal_while_glance_holds_its_reply_ends_the_wait_and_deletes_the_image() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 256 * 1024);
    for held in ["POST /v2/images ", "PUT ", "GET /v2/images/"] {
        let proxy = Proxy::start(&g.url, PutMode::HoldReply(held, Duration::from_secs(120)));
        let name = unique("held");
        let child = spawn_upload(&proxy.url, &name, &file);
        let child = KillOnDrop(child);
        // Glance has answered the held request (the proxy holds the answer) once its next
        // step would start; wait until the held request went out, then a little.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !proxy.heads().iter().any(|h| h.starts_with(held)) {
            assert!(Instant::now() < deadline, "{held}: {:?}", proxy.heads());
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        let pid = i32::try_from(child.0.id()).unwrap();
        let signalled = Instant::now();
        // SAFETY: sending SIGINT to our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        let mut child = child;
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                signalled.elapsed() < Duration::from_secs(30),
                "{held}: still waiting 30 s after SIGINT"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        child
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(status.code(), Some(2), "{held}: {stderr}");
        assert!(stderr.contains("interrupted by SIGINT"), "{held}: {stderr}");
        assert!(
            stderr.contains("deleted; nothing was left behind"),
            "{held}: {stderr}"
        );
        assert!(
            g.images_named(&name).is_empty(),
            "{held}: an image was left behind"
        );
    }
}

/// `--protected` is set last, after the verification; when the reply to that PATCH is lost,
/// the image (protected by then) is unprotected and deleted, not left undeletable.
#[test]
fn a_lost_reply_to_protecting_leaves_no_protected_image() {
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::DropReply("PATCH "));
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 64 * 1024);
    let name = unique("protect");
    let out = upload(
        &proxy.url,
        &["--name", &name, "--protected", file.to_str().unwrap()],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("deleted; nothing was left behind"),
        "{stderr}"
    );
    assert!(g.images_named(&name).is_empty(), "an image was left behind");
}

/// The gate's two formats cannot be overridden through `--property`, and the other core
/// attributes are refused there too; nothing is sent.
#[test]
fn core_attributes_are_refused_as_properties() {
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 64 * 1024);
    for prop in [
        "disk_format=ploop",
        "container_format=ova",
        "id=0b5b7d8e-0000-4000-8000-000000000000",
        "status=active",
        "name=x",
    ] {
        let out = upload(
            "http://127.0.0.1:1",
            &["--property", prop, file.to_str().unwrap()],
        );
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{prop}: {stdout}\n{stderr}");
        assert!(stderr.contains("core attribute"), "{prop}: {stderr}");
    }
}

/// A write into the file while it is being sent (a disk still attached to a running VM):
/// the bytes Glance got are not the ones checked, though their digests match what was sent.
#[test]
fn a_file_written_during_the_upload_is_not_left_in_glance() {
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::Throttle(16 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 4 * 1024 * 1024);
    let name = unique("inplace");
    let child = spawn_upload(&proxy.url, &name, &file);
    proxy.wait_for_put_bytes(64 * 1024);
    // Overwrite the last MiB in place (not yet sent), through another descriptor.
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::End(-(1 << 20))).unwrap();
    f.write_all(&vec![0xA5u8; 1 << 20]).unwrap();
    drop(f);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("was modified"), "{stderr}");
    assert!(stderr.contains("deleted"), "{stderr}");
    assert!(g.images_named(&name).is_empty(), "an image was left behind");
}

/// Endpoints are printed without the credentials a URL may carry, and one with a query (which
/// would swallow the `/v2/...` appended to it) is refused.
#[test]
fn endpoint_urls_never_show_their_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let file = raw_file(dir.path(), "disk.raw", 1000);
    let out = upload(
        "http://svc:URLPASSWORD@127.0.0.1:1",
        &["-v", file.to_str().unwrap()],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("http://127.0.0.1:1/v2/images"), "{stderr}");
    assert!(!stderr.contains("URLPASSWORD") && !stdout.contains("URLPASSWORD"));
    // A create that never reached Glance (connection refused) made nothing to delete.
    assert!(stderr.contains("nothing was created"), "{stderr}");
    assert!(!stderr.contains("DELETE"), "{stderr}");
    let out = upload(
        "http://127.0.0.1:1/?sig=URLSIGNATURE",
        &[file.to_str().unwrap()],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("has a query or fragment"), "{stderr}");
    assert!(!stderr.contains("URLSIGNATURE") && !stdout.contains("URLSIGNATURE"));
}
