//! `glance://IMAGE_ID` as an input and `upload URL`, against the real Glance test server
//! (`scripts/glance-testenv.sh`) and nginx (`scripts/nginx-testenv.sh`).

mod remote_support;
mod upload_support;

use serde_json::Value;

const BIN: &str = "remote_glance";

fn strip(mut v: Value) -> Value {
    if let Some(m) = v.as_object_mut() {
        for k in ["filename", "transfer", "actual-size"] {
            m.remove(k);
        }
    }
    v
}

/// glimpse with the test Glance's token and endpoint in the environment.
fn with_glance(url: &str, args: &[&str]) -> std::process::Output {
    remote_support::glimpse()
        .env("OS_AUTH_TOKEN", upload_support::TOKEN)
        .env("OS_IMAGE_URL", url)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn upload_from_a_url_then_read_it_back_as_glance_id() {
    let g = upload_support::glance(BIN);
    let base = remote_support::nginx(BIN);
    let p = remote_support::image(BIN, "disk.qcow2", 5 << 20, "qcow2", &[]);
    let local = p.to_str().unwrap();
    let (md5, sha512) = upload_support::digests(&p);
    let name = upload_support::unique("remote");
    let out = upload_support::upload(
        &g.url,
        &[
            "--name",
            &name,
            "--output",
            "json",
            "-v",
            &format!("{base}/disk.qcow2"),
        ],
    );
    let (o, e) = upload_support::text(&out);
    assert_eq!(out.status.code(), Some(0), "{o}\n{e}");
    let image = upload_support::json(&out);
    assert_eq!(image["status"], "active");
    assert_eq!(image["disk_format"], "qcow2");
    assert_eq!(image["checksum"], md5.as_str());
    assert_eq!(image["os_hash_value"], sha512.as_str());
    let id = image["id"].as_str().unwrap().to_string();
    assert!(
        upload_support::glance(BIN).download(&id) == std::fs::read(&p).unwrap(),
        "Glance stores the bytes served by nginx"
    );
    assert!(!e.contains(upload_support::TOKEN), "{e}");

    // glance://ID reads /v2/images/ID/file with the same credentials
    let src = format!("glance://{id}");
    for args in [
        &["info", "--output", "json"][..],
        &["check", "--output", "json"],
        &["checksum", "--output", "json"],
        &["checksum", "--content", "--output", "json"],
        &["map", "--output", "json"],
    ] {
        let l = remote_support::run(&[args, &[local]].concat());
        let r = with_glance(&g.url, &[args, &[src.as_str()]].concat());
        assert_eq!(
            r.status.code(),
            Some(0),
            "{args:?}: {:?}",
            remote_support::text(&r)
        );
        assert_eq!(
            strip(remote_support::json(&l)),
            strip(remote_support::json(&r)),
            "{args:?}"
        );
    }
    let r = with_glance(&g.url, &["check", "--output", "json", &src]);
    let v = remote_support::json(&r);
    assert_eq!(v["filename"], src.as_str());
    assert!(v["transfer"]["requests"].as_u64().unwrap() >= 1);
    let r = with_glance(&g.url, &["compare", &src, local]);
    assert_eq!(r.status.code(), Some(0), "{:?}", remote_support::text(&r));

    // without credentials: a clear error, no request sent
    let r = remote_support::run(&["info", &src]);
    assert_eq!(r.status.code(), Some(2));
    assert!(remote_support::text(&r).1.contains("credentials"));
    // an unknown image: Glance's 404
    let r = with_glance(
        &g.url,
        &["info", "glance://0d7f3f3e-0000-4000-8000-000000000000"],
    );
    assert_eq!(r.status.code(), Some(2));
    assert!(
        remote_support::text(&r).1.contains("HTTP 404"),
        "{:?}",
        remote_support::text(&r)
    );
    g.delete(&id);
}

#[test]
fn upload_from_a_server_without_ranges_is_refused_before_anything_is_created() {
    let g = upload_support::glance(BIN);
    let base = remote_support::plain_server(BIN);
    remote_support::image(BIN, "plain.qcow2", 1 << 20, "qcow2", &[]);
    let name = upload_support::unique("remote-plain");
    let out = upload_support::upload(&g.url, &["--name", &name, &format!("{base}/plain.qcow2")]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{:?}",
        upload_support::text(&out)
    );
    assert!(upload_support::text(&out)
        .1
        .contains("does not support range requests"));
    assert!(g.images_named(&name).is_empty(), "nothing was created");
}

/// A server for `upload URL` races: `/swap/GOOD/BAD` serves GOOD (strong ETag `"a"`) until a
/// request from offset 0 arrives a second time, then BAD (ETag `"b"`), honouring `If-Range`
/// and `If-Match`; `/noval/GOOD` serves GOOD with ranges and no validator at all;
/// `/stall/GOOD` answers a range that starts in neither the first nor the last MiB with its
/// headers and then nothing, after creating `GOOD.stalled` beside GOOD; `/count/GOOD` serves
/// GOOD and counts requests and connections, which `/conns/GOOD` returns as `REQUESTS CONNS`.
fn swap_server() -> &'static str {
    static S: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        const PY: &str = r#"
import http.server, os, re, sys, threading, time
root, owner = sys.argv[1], int(sys.argv[2])
lock = threading.Lock()
starts = {}
seen = {}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def log_message(self, *a):
        pass
    def do_GET(self):
        parts = self.path.split('/')
        mode, good = parts[1], parts[2]
        if mode == 'conns':
            with lock:
                reqs, conns = seen.get(good, (0, set()))
            return self.reply(200, [], ('%d %d' % (reqs, len(conns))).encode())
        if mode == 'count':
            with lock:
                reqs, conns = seen.setdefault(good, (0, set()))
                conns.add(self.client_address[1])
                seen[good] = (reqs + 1, conns)
        rng = self.headers.get('Range')
        m = re.match(r'bytes=(\d+)-(\d*)', rng or '')
        a = int(m.group(1)) if m else 0
        with lock:
            if a == 0:
                starts[self.path] = starts.get(self.path, 0) + 1
            swapped = mode == 'swap' and starts.get(self.path, 0) > 1
        name = parts[3] if swapped else good
        data = open(os.path.join(root, name), 'rb').read()
        if mode == 'stall' and m and (1 << 20) <= a < len(data) - (1 << 20):
            self.send_response(206)
            self.send_header('Content-Length', str(len(data) - a))
            self.send_header('Content-Range', 'bytes %d-%d/%d' % (a, len(data) - 1, len(data)))
            self.send_header('ETag', '"a"')
            self.end_headers()
            self.wfile.flush()
            open(os.path.join(root, good + '.stalled'), 'w').close()
            time.sleep(600)
            return
        tag = '"b"' if swapped else '"a"'
        val = [('ETag', tag)] if mode != 'noval' else []
        if mode == 'swap' and self.headers.get('If-Match') not in (None, tag):
            return self.reply(412, [], b'')
        if mode == 'swap' and self.headers.get('If-Range') not in (None, tag):
            m = None
        if not m:
            return self.reply(200, val, data)
        b = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
        self.reply(206, val + [('Content-Range', 'bytes %d-%d/%d' % (a, b, len(data)))],
                   data[a:b + 1])
    def reply(self, status, headers, body):
        self.send_response(status)
        for k, v in headers + [('Content-Length', str(len(body))), ('Accept-Ranges', 'bytes')]:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), H)
"#;
        remote_support::python_server(BIN, PY)
    })
}

#[test]
fn upload_sends_the_object_it_checked_or_nothing() {
    let g = upload_support::glance(BIN);
    let good = remote_support::image(BIN, "good.qcow2", 2 << 20, "qcow2", &[]);
    let bad = remote_support::www(BIN).join("backed.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/passwd",
            "-F",
            "raw",
        ])
        .arg(&bad)
        .arg("2M")
        .status()
        .expect("qemu-img must be installed");
    assert!(st.success());
    // As long as the good one: the size does not give the swap away.
    let len = std::fs::metadata(&good).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bad)
        .unwrap()
        .set_len(len)
        .unwrap();
    let (good_md5, good_sha512) = upload_support::digests(&good);
    // The object is replaced by an image with a backing file once the check has read it. The
    // upload sends the object it checked (from the blocks it holds, or pinned to its ETag),
    // or stops because the object changed and deletes its image; it never sends the other.
    let name = upload_support::unique("swapped");
    let out = upload_support::upload(
        &g.url,
        &[
            "--name",
            &name,
            "--output",
            "json",
            &format!("{}/swap/good.qcow2/backed.qcow2", swap_server()),
        ],
    );
    let (o, e) = upload_support::text(&out);
    if out.status.code() == Some(0) {
        let image = upload_support::json(&out);
        assert_eq!(image["checksum"], good_md5.as_str(), "{e}");
        assert_eq!(image["os_hash_value"], good_sha512.as_str());
        g.delete(image["id"].as_str().unwrap());
    } else {
        assert_eq!(out.status.code(), Some(2), "{o}\n{e}");
        assert!(e.contains("changed on the server"), "{e}");
        assert!(g.images_named(&name).is_empty(), "an image was left behind");
    }
    // A server with no validator cannot be pinned: refused before anything is created.
    let name = upload_support::unique("noval");
    let out = upload_support::upload(
        &g.url,
        &[
            "--name",
            &name,
            &format!("{}/noval/good.qcow2", swap_server()),
        ],
    );
    let (o, e) = upload_support::text(&out);
    assert_eq!(out.status.code(), Some(2), "{o}\n{e}");
    assert!(e.contains("no ETag or Last-Modified"), "{e}");
    assert!(g.images_named(&name).is_empty(), "nothing was created");
}

#[test]
fn one_signal_stops_an_upload_blocked_on_a_stalled_server_and_deletes_the_image() {
    let g = upload_support::glance(BIN);
    remote_support::image(BIN, "stalls.raw", 8 << 20, "raw", &[]);
    let flag = remote_support::www(BIN).join("stalls.raw.stalled");
    let _ = std::fs::remove_file(&flag);
    let name = upload_support::unique("stalled");
    let child = remote_support::glimpse()
        .args([
            "upload",
            "--os-auth-token",
            upload_support::TOKEN,
            "--os-image-url",
        ])
        .arg(&g.url)
        .args(["--name", &name])
        .arg(format!("{}/stall/stalls.raw", swap_server()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !flag.exists() {
        assert!(
            t0.elapsed().as_secs() < 60,
            "the upload never reached the stall"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The stall limit is 30 s: well before it, the signal must have ended the read.
    let (status, err) =
        remote_support::signal_and_wait(child, libc::SIGINT, std::time::Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    assert!(err.contains("deleted"), "{err}");
    assert!(g.images_named(&name).is_empty(), "an image was left behind");
}

#[test]
fn ranged_reads_reuse_their_connections() {
    remote_support::image(BIN, "reuse.raw", 16 << 20, "raw", &[]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let o = remote_support::run(&[
        "convert",
        "-O",
        "raw",
        &format!("{}/count/reuse.raw", swap_server()),
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{:?}", remote_support::text(&o));
    let mut resp = ureq::get(format!("{}/conns/reuse.raw", swap_server()))
        .call()
        .unwrap();
    let counts = resp.body_mut().read_to_string().unwrap();
    let (reqs, conns) = counts.split_once(' ').unwrap();
    let (reqs, conns): (u64, u64) = (reqs.parse().unwrap(), conns.parse().unwrap());
    // Each body is read to its end, so the agent keeps the connection for the next request.
    assert!(reqs >= 8, "{counts}");
    assert!(conns * 2 <= reqs, "{reqs} requests on {conns} connections");
}
