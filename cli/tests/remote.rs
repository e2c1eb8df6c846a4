//! Images at HTTP(S) URLs, against a real nginx (`scripts/nginx-testenv.sh`) and Python's
//! `http.server`: every reading command gives for the URL what it gives for the local file,
//! `convert` from a URL writes the same bytes, and a server without range support is refused
//! except by `checksum`, which streams it.

mod remote_support;

use std::path::PathBuf;

use remote_support::{
    image, json, nginx, plain_server, run, scattered_vmdk, text, transfer_line, www,
};
use serde_json::Value;

const BIN: &str = "remote";

/// Every fixture: (name, raw length, qemu-img format, options).
const IMAGES: &[(&str, usize, &str, &[&str])] = &[
    ("disk.qcow2", 3 << 20, "qcow2", &[]),
    ("disk-zlib.qcow2", 3 << 20, "qcow2", &["-c"]),
    (
        "disk.vmdk",
        3 << 20,
        "vmdk",
        &["-o", "subformat=streamOptimized"],
    ),
    ("disk-sparse.vmdk", 3 << 20, "vmdk", &[]),
    ("disk.vhd", 3 << 20, "vpc", &[]),
    ("disk.vhdx", 3 << 20, "vhdx", &[]),
    ("disk.vdi", 3 << 20, "vdi", &[]),
    ("disk.raw", (3 << 20) + 512, "raw", &[]),
];

fn images() -> Vec<PathBuf> {
    IMAGES
        .iter()
        .map(|(n, len, f, o)| image(BIN, n, *len, f, o))
        .collect()
}

/// The OVAs of fixtures/hostile/ova, served too (list and check have things to say).
fn ovas() -> Vec<PathBuf> {
    let src = workspace_fixtures().join("hostile/ova");
    let mut v = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "ova") {
            let dst = www(BIN).join(p.file_name().unwrap());
            std::fs::copy(&p, &dst).unwrap();
            v.push(dst);
        }
    }
    v.sort();
    assert!(v.len() >= 5, "expected the hostile OVA fixtures");
    v
}

fn workspace_fixtures() -> PathBuf {
    remote_support::workspace().join("fixtures")
}

fn url(base: &str, p: &std::path::Path) -> String {
    format!("{base}/{}", p.file_name().unwrap().to_str().unwrap())
}

/// JSON without what differs between a URL and a file: the name, the transfer figures and
/// the allocated size (a server does not say which blocks its file has).
fn strip(mut v: Value) -> Value {
    fn one(v: &mut Value) {
        if let Some(m) = v.as_object_mut() {
            for k in ["filename", "transfer", "actual-size"] {
                m.remove(k);
            }
        }
    }
    match &mut v {
        Value::Array(a) => a.iter_mut().for_each(one),
        other => one(other),
    }
    v
}

fn same_json(args: &[&str], local: &str, remote: &str) {
    let mut a: Vec<&str> = args.to_vec();
    a.push(local);
    let l = run(&a);
    a.pop();
    a.push(remote);
    let r = run(&a);
    assert_eq!(
        l.status.code(),
        r.status.code(),
        "{args:?} exit status: local {:?} remote {:?}",
        text(&l),
        text(&r)
    );
    let (jl, jr) = (strip(json(&l)), strip(json(&r)));
    if args.first() == Some(&"measure") {
        // A local file's holes under stored data read as zeros and need no space (as for
        // qemu-img measure); a server says nothing of holes, so a URL may need more.
        assert_eq!(
            jl["fully-allocated"], jr["fully-allocated"],
            "{local} vs {remote}"
        );
        let need = |v: &Value| v["required"].as_u64().unwrap();
        assert!(need(&jr) >= need(&jl), "{jl} vs {jr}: {local} vs {remote}");
    } else {
        assert_eq!(jl, jr, "{args:?} on {local} vs {remote}");
    }
    if r.status.code() == Some(0) || args.contains(&"check") {
        let t = &json(&r)["transfer"];
        if !t.is_null() {
            assert!(t["requests"].as_u64().unwrap() >= 1, "{t}");
        }
    }
}

#[test]
fn every_reading_command_gives_the_same_answer_for_the_url() {
    let base = nginx(BIN);
    for p in images() {
        let local = p.to_str().unwrap();
        let u = url(base, &p);
        for args in [
            &["info", "--output", "json"][..],
            &["check", "--output", "json"],
            &["map", "--output", "json"],
            &["checksum", "--output", "json"],
            &["checksum", "--content", "--output", "json"],
            &["measure", "-O", "qcow2", "--output", "json"],
        ] {
            same_json(args, local, &u);
        }
        // JSON of a URL names it and says what it cost.
        let r = run(&["check", "--output", "json", &u]);
        let v = json(&r);
        assert_eq!(v["filename"], u.as_str());
        assert!(v["transfer"]["bytes"].as_u64().unwrap() > 0, "{v}");
        // compare: either side remote, and against itself
        for (a, b) in [
            (local, u.as_str()),
            (u.as_str(), local),
            (u.as_str(), u.as_str()),
        ] {
            let o = run(&["compare", a, b]);
            assert_eq!(o.status.code(), Some(0), "compare {a} {b}: {:?}", text(&o));
            assert_eq!(text(&o).0, "Images are identical.\n");
        }
        let human_l = text(&run(&["checksum", local])).0;
        let human_r = text(&run(&["checksum", &u])).0;
        assert_eq!(human_l.replace(local, "F"), human_r.replace(&u, "F"));
    }
    // images of different content differ remotely too
    let (a, b) = (&images()[0], &images()[7]);
    let o = run(&["compare", &url(base, a), &url(base, b)]);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
}

#[test]
fn ova_list_and_check_of_a_url_match_the_file() {
    let base = nginx(BIN);
    let mut listed = 0;
    for p in ovas() {
        let local = p.to_str().unwrap();
        let u = url(base, &p);
        for sub in ["list", "check"] {
            same_json(&["ova", sub, "--output", "json"], local, &u);
        }
        if run(&["ova", "list", &u]).status.success() {
            listed += 1;
        }
    }
    assert!(listed > 0, "no OVA could be listed at all");
}

#[test]
fn convert_from_a_url_writes_the_same_bytes_and_reads_the_source_once() {
    let base = nginx(BIN);
    let dir = tempfile::tempdir().unwrap();
    for p in images() {
        let u = url(base, &p);
        let size = std::fs::metadata(&p).unwrap().len();
        for (to, opts) in [
            ("qcow2", &[][..]),
            ("raw", &[]),
            ("vmdk", &["-o", "subformat=streamOptimized"][..]),
        ] {
            // the same file name: a VMDK descriptor names its extent
            let (df, du) = (dir.path().join("f"), dir.path().join("u"));
            std::fs::create_dir_all(&df).unwrap();
            std::fs::create_dir_all(&du).unwrap();
            let from_file = df.join(format!("out.{to}"));
            let from_url = du.join(format!("out.{to}"));
            let mut a = vec!["convert", "-O", to];
            a.extend_from_slice(opts);
            let o = run(&[&a[..], &[p.to_str().unwrap(), from_file.to_str().unwrap()]].concat());
            assert!(o.status.success(), "{:?}", text(&o));
            let o = run(&[&a[..], &["-v", &u, from_url.to_str().unwrap()]].concat());
            assert!(o.status.success(), "{:?}", text(&o));
            let (x, y) = (
                std::fs::read(&from_file).unwrap(),
                std::fs::read(&from_url).unwrap(),
            );
            assert!(
                x == y,
                "convert -O {to} of {u}: {} bytes from the file, {} from the URL",
                x.len(),
                y.len()
            );
            let (requests, bytes) = transfer_line(&text(&o).1);
            // once: at most the object plus the probe block and a few re-read table blocks
            assert!(
                bytes <= size + (1 << 20),
                "{u} -> {to}: {bytes} bytes over {requests} requests for a {size}-byte object"
            );
        }
    }
}

#[test]
fn convert_of_a_stream_vmdk_larger_than_the_cache_reads_it_once() {
    // Larger than the 32 MiB block cache, so a second pass over the grains would show.
    let base = nginx(BIN);
    let p = image(
        BIN,
        "big-stream.vmdk",
        160 << 20,
        "vmdk",
        &["-o", "subformat=streamOptimized"],
    );
    let size = std::fs::metadata(&p).unwrap().len();
    assert!(
        size > 48 << 20,
        "the fixture must outgrow the cache: {size} bytes"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let o = run(&[
        "convert",
        "-v",
        "-O",
        "raw",
        &url(base, &p),
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let (requests, bytes) = transfer_line(&text(&o).1);
    // One pass over the grains: a second one (the structural walk's, or blocks evicted between
    // planning and reading) would show as a multiple of the file. 1.011 times was measured.
    assert!(
        bytes <= size + (2 << 20),
        "{bytes} bytes over {requests} requests for a {size}-byte streamOptimized VMDK"
    );
    let local = dir.path().join("local.raw");
    let o = run(&[
        "convert",
        "-O",
        "raw",
        p.to_str().unwrap(),
        local.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&local).unwrap());
}

#[test]
fn checksum_of_a_url_fetches_each_byte_once() {
    let base = nginx(BIN);
    // Several readahead chunks and a short last block; and an object smaller than one block.
    for (name, len) in [("once.raw", (9 << 20) + 4096), ("small.raw", 100 << 10)] {
        let p = image(BIN, name, len, "raw", &[]);
        let o = run(&["checksum", "--output", "json", &url(base, &p)]);
        assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
        let v = json(&o);
        let t = &v["transfer"];
        assert_eq!(t["bytes"].as_u64(), Some(len as u64), "{name}: {t}");
        let l = json(&run(&["checksum", "--output", "json", p.to_str().unwrap()]));
        for k in ["md5", "sha512", "size"] {
            assert!(v[k].is_string() || v[k].is_u64(), "{name}: {v}");
            assert_eq!(v[k], l[k], "{name}: {k}");
        }
    }
}

#[test]
fn check_of_a_large_qcow2_reads_only_metadata() {
    let base = nginx(BIN);
    let p = image(BIN, "big.qcow2", 96 << 20, "qcow2", &[]);
    let size = std::fs::metadata(&p).unwrap().len();
    let o = run(&["check", "--output", "json", &url(base, &p)]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let t = &json(&o)["transfer"];
    let bytes = t["bytes"].as_u64().unwrap();
    assert!(
        bytes < 2 << 20,
        "check read {bytes} bytes of a {size}-byte qcow2 ({t})"
    );
}

#[test]
fn credentials_in_a_url_are_never_printed() {
    let base = nginx(BIN);
    let p = image(BIN, "disk.qcow2", 3 << 20, "qcow2", &[]);
    let secret = "X-Amz-Signature=5ecre7c0ffee";
    let signed = format!("{}?{secret}&X-Amz-Credential=AKIDEXAMPLE", url(base, &p));
    let with_user = signed.replacen("http://", "http://alice:pa55word@", 1);
    let missing = format!("{base}/no-such-image.qcow2?{secret}");
    for args in [
        vec!["info", "--output", "json", "-v", &signed],
        vec!["check", "-v", &signed],
        vec!["checksum", "-v", &with_user],
        vec!["map", "-v", &signed],
        vec!["info", "-v", &missing],
        vec!["check", "--output", "json", "-v", &missing],
        vec!["info", "-v", &with_user],
    ] {
        let o = run(&args);
        let (out, err) = text(&o);
        for s in ["5ecre7c0ffee", "AKIDEXAMPLE", "pa55word", "alice"] {
            assert!(
                !out.contains(s) && !err.contains(s),
                "{args:?} printed {s}:\n{out}\n{err}"
            );
        }
    }
    let o = run(&["info", &missing]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("HTTP 404"), "{:?}", text(&o));
}

#[test]
fn a_server_without_range_support_is_refused_but_checksum_streams_it() {
    let base = plain_server(BIN);
    let p = image(BIN, "disk.qcow2", 3 << 20, "qcow2", &[]);
    let u = url(base, &p);
    for args in [
        vec!["info", u.as_str()],
        vec!["check", u.as_str()],
        vec!["map", u.as_str()],
        vec!["checksum", "--content", u.as_str()],
        vec!["compare", u.as_str(), p.to_str().unwrap()],
        vec!["convert", "-O", "raw", u.as_str(), "/dev/null"],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {:?}", text(&o));
        assert!(
            text(&o).1.contains("does not support range requests"),
            "{args:?}: {:?}",
            text(&o)
        );
    }
    let l = run(&["checksum", "--output", "json", p.to_str().unwrap()]);
    let r = run(&["checksum", "--output", "json", "-v", &u]);
    assert!(r.status.success(), "{:?}", text(&r));
    assert_eq!(strip(json(&l)), strip(json(&r)));
    assert!(text(&r).1.contains("range requests not supported"));
}

/// A misbehaving HTTP/1.1 server on 127.0.0.1 (Python, raw sockets), serving [`www`]'s files
/// at `/<mode>/<file>?<run>` with misbehaviour `<mode>`; `/count/<mode>/<file>?<run>` answers
/// how many requests that URL had. Each run of glimpse uses its own query, so that counters
/// (which decide what each request gets) do not mix.
fn hostile() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| remote_support::python_server(BIN, HOSTILE_PY))
}

const HOSTILE_PY: &str = r#"
import os, re, socketserver, sys, threading, time
ROOT, OWNER = sys.argv[1], int(sys.argv[2])
COUNT, LOCK = {}, threading.Lock()
LM0, LM1 = 'Tue, 01 Dec 2026 10:00:00 GMT', 'Tue, 01 Dec 2026 11:00:00 GMT'

def load(name):
    with open(os.path.join(ROOT, name), 'rb') as f:
        return f.read()

def alt(data):
    return bytes(b ^ 0x5a for b in data)

class H(socketserver.StreamRequestHandler):
    def send(self, status, headers, body=b''):
        h = 'HTTP/1.1 %d X\r\n' % status + ''.join('%s: %s\r\n' % kv for kv in headers) + '\r\n'
        self.wfile.write(h.encode('latin-1') + body)
        self.wfile.flush()

    def handle(self):
        try:
            while self.one():
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass

    def one(self):
        line = self.rfile.readline(65537)
        if not line:
            return False
        path = line.decode().split(' ')[1]
        hdrs = {}
        while True:
            l = self.rfile.readline(65537)
            if l in (b'\r\n', b'\n', b''):
                break
            k, _, v = l.decode('latin-1').partition(':')
            hdrs[k.strip().lower()] = v.strip()
        path, _, query = path.partition('?')
        parts = path.split('/')
        if parts[1] == 'count':
            with LOCK:
                n = COUNT.get((parts[2], parts[3], query), 0)
            self.send(200, [('Content-Length', len(str(n))), ('Connection', 'close')],
                      str(n).encode())
            return False
        mode, f = parts[1], parts[2]
        with LOCK:
            n = COUNT.get((mode, f, query), 0)
            COUNT[(mode, f, query)] = n + 1
        return getattr(self, 'm_' + mode)(f, hdrs.get('range'), n)

    def ranged(self, data, rng, validators=(), total=None):
        size = len(data) if total is None else total
        m = re.match(r'bytes=(\d+)-(\d*)', rng or '')
        if not m:
            self.send(200, [('Content-Length', len(data))] + list(validators), data)
            return True
        a = int(m.group(1))
        b = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        body = (data[a:b + 1] + b'\0' * (b + 1 - a))[:b + 1 - a]
        self.send(206, [('Content-Length', len(body)),
                        ('Content-Range', 'bytes %d-%d/%d' % (a, b, size))] + list(validators), body)
        return True

    # no Range, no Content-Length: the body ends at the close, after half the file
    def m_close_trunc(self, f, rng, n):
        d = load(f)
        self.send(200, [('Connection', 'close')], d[:len(d) // 2])
        return False

    # no Range, a Content-Length, half the body, then the close
    def m_short_cl(self, f, rng, n):
        d = load(f)
        self.send(200, [('Content-Length', len(d)), ('Connection', 'close')], d[:len(d) // 2])
        return False

    # the first request gets the file, later ones another version
    def m_change_weak(self, f, rng, n):
        return self.ranged(load(f) if n == 0 else alt(load(f)), rng, [('ETag', 'W/"v%d"' % min(n, 1))])

    def m_change_lm_drop(self, f, rng, n):
        d = load(f) if n == 0 else alt(load(f))
        return self.ranged(d, rng, [('Last-Modified', LM0)] if n == 0 else [])

    def m_change_lm(self, f, rng, n):
        d = load(f) if n == 0 else alt(load(f))
        return self.ranged(d, rng, [('Last-Modified', LM0 if n == 0 else LM1)])

    def m_change_noval(self, f, rng, n):
        return self.ranged(load(f) if n == 0 else alt(load(f)), rng)

    # a consistent server that claims 2^64 - 1 bytes
    def m_huge(self, f, rng, n):
        return self.ranged(load(f), rng, [('ETag', '"v1"')], total=2 ** 64 - 1)

    def m_huge200(self, f, rng, n):
        self.send(200, [('Content-Length', 2 ** 63 + 5)], load(f))
        return False

    def m_redirect(self, f, rng, n):
        self.send(302, [('Location', 'http://elsewhere.example/b/%s?X-Sig=5ecre7' % f),
                        ('Content-Length', 0)])
        return True

    # a Content-Length past 2^64: a reply no retry will fix
    def m_cl_over(self, f, rng, n):
        self.send(200, [('Content-Length', 2 ** 70), ('Connection', 'close')], b'x')
        return False

    def m_forbidden(self, f, rng, n):
        self.send(403, [('Content-Length', 6)], b'denied')
        return True

    # 429 twice, then fine
    def m_busy(self, f, rng, n):
        if n < 2:
            self.send(429, [('Content-Length', 4), ('Retry-After', '0')], b'busy')
            return True
        return self.ranged(load(f), rng, [('ETag', '"v1"')])

    # the probe is fine; later requests get their headers, then nothing
    def m_stall_after(self, f, rng, n):
        if n == 0:
            return self.ranged(load(f), rng, [('ETag', '"v1"')])
        size = len(load(f))
        m = re.match(r'bytes=(\d+)-(\d*)', rng)
        a = int(m.group(1))
        b = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        self.send(206, [('Content-Length', b + 1 - a), ('Content-Range', 'bytes %d-%d/%d' % (a, b, size)),
                        ('ETag', '"v1"')])
        time.sleep(600)
        return False

    # the second request (the first after the probe) gets half its body, then the connection
    # stays open and silent; every other request is answered
    def m_stall_once(self, f, rng, n):
        if n != 1:
            return self.ranged(load(f), rng, [('ETag', '"v1"')])
        d = load(f)
        m = re.match(r'bytes=(\d+)-(\d*)', rng)
        a = int(m.group(1))
        b = min(int(m.group(2)) if m.group(2) else len(d) - 1, len(d) - 1)
        body = d[a:b + 1]
        self.send(206, [('Content-Length', len(body)),
                        ('Content-Range', 'bytes %d-%d/%d' % (a, b, len(d))), ('ETag', '"v1"')],
                  body[:len(body) // 2])
        time.sleep(600)
        return False

class S(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

server = S(('127.0.0.1', 0), H)
owner = OWNER
"#;

/// A raw file of `len` bytes under its own name (so each test has its own counters).
fn raw(name: &str, len: usize) -> PathBuf {
    image(BIN, name, len, "raw", &[])
}

/// The URL of `file` in `mode`, with a query of its own (fresh counters).
fn hurl(mode: &str, file: &str) -> String {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("{}/{mode}/{file}?run={n}", hostile())
}

/// Requests the hostile server saw for `url` (from [`hurl`]).
fn requests(url: &str) -> u64 {
    let path = url.strip_prefix(hostile()).unwrap();
    let mut s = std::net::TcpStream::connect(hostile().trim_start_matches("http://")).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET /count{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    r.rsplit("\r\n\r\n").next().unwrap().trim().parse().unwrap()
}

fn md5_of(data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    std::fs::write(&p, data).unwrap();
    let o = run(&["checksum", "--algo", "md5", p.to_str().unwrap()]);
    text(&o).0.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_body_of_unknown_or_short_length_never_gets_a_digest() {
    // F2: a server without Range and without Content-Length cuts the body at half: the end
    // of the connection looks like the end of the object, so such a server is refused.
    let p = raw("f2-trunc.raw", 3 << 20);
    let f = p.file_name().unwrap().to_str().unwrap();
    for args in [
        vec!["checksum"],
        vec!["checksum", "--output", "json"],
        vec!["info"],
        vec!["check"],
    ] {
        let u = hurl("close_trunc", f);
        let o = run(&[&args[..], &[u.as_str()]].concat());
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {out} {err}");
        assert!(
            err.contains("did not say the object's size"),
            "{args:?}: {err}"
        );
        assert!(!out.contains(&md5_of(&std::fs::read(&p).unwrap()[..3 << 19])));
        assert!(
            !out.contains("md5") && !out.contains("sha512"),
            "{args:?}: {out}"
        );
    }
    // A Content-Length, and a body that ends at half of it: an error, not a digest.
    let u = hurl("short_cl", f);
    let o = run(&["checksum", &u]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out} {err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("ended after"), "{err}");
}

#[test]
fn a_changed_weak_etag_or_a_dropped_last_modified_is_a_change() {
    // F3: the first request gets one version, every later one another.
    let p = raw("f3-change.raw", 3 << 20);
    let f = p.file_name().unwrap().to_str().unwrap();
    for mode in ["change_weak", "change_lm_drop", "change_lm"] {
        for args in [vec!["checksum"], vec!["checksum", "--content"]] {
            let u = hurl(mode, f);
            let o = run(&[&args[..], &[u.as_str()]].concat());
            let (out, err) = text(&o);
            assert_eq!(o.status.code(), Some(2), "{mode} {args:?}: {out} {err}");
            assert!(
                err.contains("changed on the server"),
                "{mode} {args:?}: {err}"
            );
            assert!(out.is_empty(), "{mode} {args:?}: {out}");
        }
    }
}

#[test]
fn checksum_of_a_server_without_validators_is_the_digest_of_one_response() {
    // F3: no ETag, no Last-Modified; the probe gets one version, later requests another.
    // The digest must be of one version (the one GET after the probe), never of a mix.
    let p = raw("f3-noval.raw", 3 << 20);
    let f = p.file_name().unwrap().to_str().unwrap();
    let data = std::fs::read(&p).unwrap();
    let other: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    let u = hurl("change_noval", f);
    let o = run(&["checksum", "--algo", "md5", "-v", &u]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out} {err}");
    let got = out.split_whitespace().next().unwrap();
    assert_eq!(got, md5_of(&other), "a digest of neither version: {out}");
    let (requests, bytes) = transfer_line(&err);
    assert_eq!((requests, bytes), (2, 256 * 1024 + (3 << 20)), "{err}");
    // The commands that read at offsets say that a change cannot be seen.
    let o = run(&["info", &u]);
    assert!(text(&o).1.contains("cannot be detected"), "{:?}", text(&o));
}

#[test]
fn a_huge_claimed_size_is_refused_at_once() {
    // F5 (and F8: a debug build computed the last block's range with an overflow).
    let p = raw("f5-huge.raw", 1 << 20);
    let f = p.file_name().unwrap().to_str().unwrap();
    for mode in ["huge", "huge200"] {
        let u = hurl(mode, f);
        for args in [vec!["checksum"], vec!["info"], vec!["check"]] {
            let start = std::time::Instant::now();
            let o = run(&[&args[..], &[u.as_str()]].concat());
            let (out, err) = text(&o);
            assert_eq!(o.status.code(), Some(2), "{mode} {args:?}: {out} {err}");
            assert!(err.contains("more than the 1099511627776"), "{mode}: {err}");
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    // The cap is --max-remote-size: a 1 MiB object is refused under 512k and read under 1M.
    let u = format!("{}/{f}", remote_support::nginx(BIN));
    let o = run(&["info", "--max-remote-size", "512k", &u]);
    let err = text(&o).1;
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("more than the 524288"), "{err}");
    assert!(err.contains("--max-remote-size"), "{err}");
    let o = run(&["info", "--max-remote-size", "1M", &u]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
}

#[test]
fn a_redirect_says_so_and_permanent_errors_are_not_retried() {
    // F11
    let p = raw("f11-redir.raw", 1 << 20);
    let f = p.file_name().unwrap().to_str().unwrap();
    let u = hurl("redirect", f);
    let o = run(&["info", &u]);
    let err = text(&o).1;
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("HTTP 302") && err.contains("redirect"),
        "{err}"
    );
    assert!(
        err.contains("to http://elsewhere.example/b/f11-redir.raw"),
        "{err}"
    );
    assert!(
        !err.contains("5ecre7"),
        "the Location's query was printed: {err}"
    );
    assert_eq!(requests(&u), 1);
    // 403 is final: one request
    let u = hurl("forbidden", f);
    let o = run(&["checksum", &u]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("HTTP 403"), "{:?}", text(&o));
    assert_eq!(requests(&u), 1);
    // so is a reply that breaks HTTP
    let u = hurl("cl_over", f);
    let o = run(&["checksum", &u]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("content-length"), "{:?}", text(&o));
    assert_eq!(requests(&u), 1);
    // 429 is transient: retried, and then the answer is right
    let o = run(&["checksum", "--algo", "md5", &hurl("busy", f)]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let want = md5_of(&std::fs::read(&p).unwrap());
    assert!(text(&o).0.starts_with(&want), "{:?}", text(&o));
}

#[test]
fn one_signal_stops_a_convert_blocked_on_a_stalled_server() {
    // F4: the probe is answered, then the server sends headers and nothing more.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let p = raw("f4-stall.raw", 3 << 20);
        let f = p.file_name().unwrap().to_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.raw");
        std::fs::write(&out, b"PRECIOUS").unwrap();
        let u = hurl("stall_after", f);
        let child = remote_support::glimpse()
            .args(["convert", "-O", "raw", &u, out.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // wait until the conversion is blocked on the request after the probe
        let t0 = std::time::Instant::now();
        while requests(&u) < 2 {
            assert!(t0.elapsed().as_secs() < 20, "no request after the probe");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let (status, err) =
            remote_support::signal_and_wait(child, sig, std::time::Duration::from_secs(5));
        assert_eq!(status.code(), Some(2), "signal {sig}: {err}");
        assert!(err.contains("interrupted"), "{err}");
        assert_eq!(std::fs::read(&out).unwrap(), b"PRECIOUS");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "a temporary file was left: {left:?}");
    }
}

#[test]
fn a_body_that_stalls_is_given_up_on_after_the_stall_limit_and_retried() {
    // F4: the first request after the probe sends half its body and then nothing, with the
    // connection open. It used to hold the read for the whole 300 s body budget; it now fails
    // after 30 s without a byte, and the retry gets the right bytes.
    let p = raw("f4-stall-once.raw", 3 << 20);
    let f = p.file_name().unwrap().to_str().unwrap();
    let u = hurl("stall_once", f);
    let start = std::time::Instant::now();
    let o = run(&["checksum", "--algo", "md5", &u]);
    let took = start.elapsed();
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    assert!(text(&o).0.starts_with(&md5_of(&std::fs::read(&p).unwrap())));
    assert!(
        took >= std::time::Duration::from_secs(29) && took < std::time::Duration::from_secs(60),
        "took {took:?}"
    );
}

#[test]
fn an_untrusted_certificate_is_not_retried() {
    // F11: a TLS failure fails the same way every time: one connection, not five.
    let dir = tempfile::tempdir().unwrap();
    let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
    let st = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is required for the TLS test");
    assert!(st.success());
    let count = dir.path().join("connections");
    let script = "import functools, http.server, os, ssl, sys, threading, time\n\
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
        ctx.load_cert_chain(sys.argv[1], sys.argv[2])\n\
        n = [0]\n\
        class S(http.server.ThreadingHTTPServer):\n    \
            def get_request(self):\n        \
                s, a = self.socket.accept()\n        \
                n[0] += 1\n        \
                open(sys.argv[4], 'w').write(str(n[0]))\n        \
                return ctx.wrap_socket(s, server_side=True), a\n\
        h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])\n\
        srv = S(('127.0.0.1', 0), h)\n\
        print(srv.server_address[1], flush=True)\n\
        def watch():\n    \
            while True:\n        \
                time.sleep(0.5)\n        \
                try:\n            os.kill(int(sys.argv[5]), 0)\n        \
                except OSError:\n            os._exit(0)\n\
        threading.Thread(target=watch, daemon=True).start()\n\
        srv.serve_forever()\n";
    let p = raw("f11-tls.raw", 1 << 20);
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&cert)
        .arg(&key)
        .arg(www(BIN))
        .arg(&count)
        .arg(std::process::id().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut port,
    )
    .unwrap();
    let u = format!(
        "https://127.0.0.1:{}/{}",
        port.trim(),
        p.file_name().unwrap().to_str().unwrap()
    );
    let o = run(&["info", &u]);
    let err = text(&o).1;
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.to_ascii_lowercase().contains("certificate"), "{err}");
    assert_eq!(std::fs::read_to_string(&count).unwrap(), "1", "{err}");
    // the same server is fine when told to trust it
    let o = run(&["checksum", "--insecure", &u]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_layout_that_makes_the_reader_jump_about_costs_a_bounded_transfer() {
    // 160 Ki grains, 80 MiB of file: more than the 32 MiB block cache, each table entry
    // about 4 MiB from the one before. Read in table order, every grain missed the cache and
    // the check would have fetched tens of GB.
    let bytes = scattered_vmdk(160 << 10, 8209);
    let size = bytes.len() as u64;
    let path = www(BIN).join("scattered.vmdk");
    std::fs::write(&path, &bytes).unwrap();
    let local = run(&["check", "--output", "json", path.to_str().unwrap()]);
    assert_eq!(local.status.code(), Some(0), "{:?}", text(&local));
    let url = format!("{}/scattered.vmdk", nginx(BIN));
    let o = run(&["check", "--output", "json", &url]);
    let v = json(&o);
    let sent = v["transfer"]["bytes"].as_u64().unwrap_or(0);
    // Either the check passes having read about the file, or it stops at the allowance.
    match o.status.code() {
        Some(0) => assert!(sent <= 4 * size + (64 << 20), "{sent} bytes for {size}"),
        Some(2) => {
            assert!(text(&o).1.contains("jump around"), "{:?}", text(&o));
            // a hard bound: reads in flight take their share before they are sent
            assert!(sent <= 4 * size + (64 << 20), "{sent} bytes for {size}");
        }
        other => panic!("{other:?}: {:?}", text(&o)),
    }
}

/// A qcow2 whose clusters a guest wrote in random order (host order a permutation of guest
/// order), made by qemu-io as a guest makes one, larger than the 32 MiB page cache.
fn random_order_qcow2(name: &str, cluster: usize, clusters: usize) -> PathBuf {
    let path = www(BIN).join(name);
    if path.exists() {
        return path;
    }
    let tmp = www(BIN).join(format!("{name}.making"));
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-o"])
        .arg(format!("cluster_size={cluster}"))
        .arg(&tmp)
        .arg((cluster * clusters).to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("qemu-img is required (Debian: qemu-utils)");
    assert!(st.success());
    // a fixed permutation (an LCG shuffle), each cluster a pattern of its own
    let mut order: Vec<usize> = (0..clusters).collect();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for i in (1..clusters).rev() {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    let script: String = order
        .iter()
        .map(|&i| format!("write -P {} {} {cluster}\n", i % 251 + 1, i * cluster))
        .collect();
    let mut child = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&tmp)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io is required (Debian: qemu-utils)");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "qemu-io");
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Campaign remote-hostile F2: a valid image written in random guest order (16 KiB clusters,
/// 48 MiB, more than the cache) is converted, content-digested and compared by URL with a
/// transfer close to its size. Each cache miss fetched a whole 256 KiB block, 4.5 times the
/// file in all, past the 4x + 64 MiB bound for a large one.
#[test]
fn a_random_order_image_is_read_about_once() {
    let base = nginx(BIN);
    let p = random_order_qcow2("shuffled16k.qcow2", 16 << 10, 3072);
    let size = std::fs::metadata(&p).unwrap().len();
    assert!(size > 48 << 20, "{size}");
    let u = url(base, &p);
    let dir = tempfile::tempdir().unwrap();
    let (from_url, from_file) = (dir.path().join("u.raw"), dir.path().join("f.raw"));
    let o = run(&[
        "convert",
        "-O",
        "raw",
        p.to_str().unwrap(),
        from_file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let local_content = json(&run(&[
        "checksum",
        "--content",
        "--output",
        "json",
        p.to_str().unwrap(),
    ]));
    let runs: [(&str, Vec<&str>); 3] = [
        (
            "convert",
            vec!["convert", "-v", "-O", "raw", &u, from_url.to_str().unwrap()],
        ),
        (
            "checksum --content",
            vec!["checksum", "-v", "--content", "--output", "json", &u],
        ),
        ("compare", vec!["compare", "-v", &u, p.to_str().unwrap()]),
    ];
    for (what, args) in runs {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(0), "{what}: {:?}", text(&o));
        let (requests, bytes) = transfer_line(&text(&o).1);
        // measured: 1.005 times the file (requests: about one per cluster)
        assert!(
            bytes <= size + size / 10,
            "{what}: {bytes} bytes over {requests} requests for a {size}-byte object"
        );
        if what == "checksum --content" {
            assert_eq!(json(&o)["content"], local_content["content"]);
        }
    }
    assert!(std::fs::read(&from_url).unwrap() == std::fs::read(&from_file).unwrap());
}
