//! Shared by the remote-input test binaries: a real nginx started through the project's own
//! `scripts/nginx-testenv.sh`, Python's `http.server` (a server without range support), a
//! fault-injecting HTTP proxy on loopback in front of nginx, and fixture images made with
//! qemu-img. Nothing here stands in for a server: the proxy forwards every request to nginx
//! and only drops, delays, rewrites or replaces what the test asks for.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// The directory every server of this test binary serves: `target/remote-tests/<binary>/www`,
/// emptied once per run.
pub fn www(binary: &str) -> &'static Path {
    static W: OnceLock<PathBuf> = OnceLock::new();
    W.get_or_init(|| {
        let d = target_dir().join("remote-tests").join(binary).join("www");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// nginx from `scripts/nginx-testenv.sh`, serving [`www`]; started once per test binary and
/// stopped by the script's owner watcher when the binary exits. Panics loudly when it
/// cannot start: these tests never skip.
pub fn nginx(binary: &str) -> &'static str {
    static N: OnceLock<String> = OnceLock::new();
    N.get_or_init(|| {
        let dir = target_dir().join("remote-tests").join(binary).join("nginx");
        let out = Command::new("bash")
            .arg(workspace().join("scripts/nginx-testenv.sh"))
            .arg("start")
            .arg(&dir)
            .arg(www(binary))
            .arg("--owner-pid")
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .output()
            .expect("running scripts/nginx-testenv.sh (bash is required)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "scripts/nginx-testenv.sh start failed ({}): the remote tests need /usr/sbin/nginx \
             (Debian: nginx-light; scripts/test.sh installs it).\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("NGINX_URL="))
            .unwrap_or_else(|| panic!("no NGINX_URL in the script's output: {stdout}"))
            .to_string()
    })
}

/// Sends `sig` to `child` and waits for it to exit, failing if it still runs `within` after
/// the signal; returns its exit status and stderr (stdout and stderr must be piped).
pub fn signal_and_wait(
    mut child: std::process::Child,
    sig: i32,
    within: Duration,
) -> (std::process::ExitStatus, String) {
    // SAFETY: a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    let sent = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < within,
            "still running {within:?} after one signal {sig}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = child.wait_with_output().unwrap();
    (status, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The end of a Python test server script: prints the port `server` listens on, serves until
/// the process whose pid is `owner` (the test binary) has gone, then exits. The script defines
/// `server` and `owner` and imports `os`, `threading` and `time`.
pub const SERVE_UNTIL_THE_OWNER_EXITS: &str = r#"
print(server.server_address[1], flush=True)
def watch():
    while True:
        time.sleep(0.5)
        try:
            os.kill(owner, 0)
        except OSError:
            os._exit(0)
threading.Thread(target=watch, daemon=True).start()
server.serve_forever()
"#;

/// Python's `http.server` (no range support) serving [`www`], once per test binary; it exits
/// by itself when this process has gone.
pub fn plain_server(binary: &str) -> &'static str {
    static P: OnceLock<String> = OnceLock::new();
    P.get_or_init(|| {
        const PY: &str = r#"
import functools, http.server, os, sys, threading, time
owner = int(sys.argv[2])
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
class Quiet(handler.func):
    def log_message(self, *a):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
    functools.partial(Quiet, directory=sys.argv[1]))
"#;
        python_server(binary, PY)
    })
}

/// Starts the Python test server `script` (which defines `server` and `owner`, and imports
/// `os`, `threading` and `time`; [`SERVE_UNTIL_THE_OWNER_EXITS`] is appended) with [`www`] and
/// this process's id as its arguments, and returns its URL. It exits by itself when this
/// process has gone.
pub fn python_server(binary: &str, script: &str) -> String {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(format!("{script}{SERVE_UNTIL_THE_OWNER_EXITS}"))
        .arg(www(binary))
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is required for the test servers");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // reaped when it exits (it follows this process's lifetime)
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("a Python test server did not start: {line:?}"));
    format!("http://127.0.0.1:{port}")
}

/// Makes (once) `www/name` by converting a deterministic raw disk of `len` bytes with
/// qemu-img to `format` (with `opts`), and returns its local path.
pub fn image(binary: &str, name: &str, len: usize, format: &str, opts: &[&str]) -> PathBuf {
    // tests run in parallel and share fixtures: one maker at a time
    static MAKING: Mutex<()> = Mutex::new(());
    let _one = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = www(binary);
    let out = dir.join(name);
    if out.exists() {
        return out;
    }
    let raw = dir.join(format!("{name}.src.raw"));
    std::fs::write(&raw, disk_bytes(len, name.len() as u32)).unwrap();
    if format == "raw" {
        std::fs::rename(&raw, &out).unwrap();
        return out;
    }
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", format])
        .args(opts)
        .arg(&raw)
        .arg(&out)
        .status()
        .expect("qemu-img is required (Debian: qemu-utils)");
    assert!(st.success(), "qemu-img convert to {format} failed");
    std::fs::remove_file(&raw).unwrap();
    out
}

/// Varied bytes with zero runs (so images have both data and holes).
pub fn disk_bytes(len: usize, seed: u32) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9 ^ seed;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if (i / (256 << 10)) % 3 == 1 {
                0
            } else {
                x as u8
            }
        })
        .collect()
}

/// `glimpse` with no OpenStack variables from the caller's environment.
pub fn glimpse() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_glimpse"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OS_") {
            c.env_remove(k);
        }
    }
    c
}

/// Runs glimpse with `args`.
pub fn run(args: &[&str]) -> Output {
    glimpse().args(args).output().unwrap()
}

/// stdout and stderr as text.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Parses stdout as JSON.
pub fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", text(o)))
}

/// `(requests, bytes)` from the `-v` line `NAME: transfer: N requests, M bytes`.
pub fn transfer_line(stderr: &str) -> (u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains(": transfer: "))
        .unwrap_or_else(|| panic!("no transfer line in {stderr}"));
    let nums: Vec<u64> = line
        .rsplit(": transfer: ")
        .next()
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// What the proxy does with the n-th GET (0-based, counted over the proxy's life).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Close the connection without answering.
    Reset,
    /// Answer 503 without asking nginx.
    Unavailable,
    /// Forward the head and half the body, then close.
    CutBody,
    /// Ask nginx for the range shifted by this many bytes (the answer names what nginx sent).
    ShiftRange(u64),
    /// Before forwarding, replace the served file with these bytes (a new version: new ETag).
    Replace(PathBuf, Vec<u8>),
    /// After nginx answered, rewrite the served file with these bytes (of its size) and give
    /// it back its modification time: nginx's ETag (mtime and size) and Last-Modified stay the
    /// same over other content from the next GET on, as from a server whose validators lie.
    RewriteKeepingEtag(PathBuf, Vec<u8>),
    /// In the reply, set header `.0` to `.1` (any bytes), or remove it (`None`).
    SetHeader(&'static str, Option<Vec<u8>>),
    /// Send the reply without its Content-Length (its end marked by nothing), then keep the
    /// connection open.
    NoLength,
    /// Send the reply's body as one chunk without the last (`0`) chunk, then keep the
    /// connection open.
    ChunkedNoEnd,
    /// Send an interim reply with this 1xx status right before the reply, in one write.
    Interim(u16),
    /// Send stray bytes 50 ms after the reply and keep the connection open for the next
    /// request.
    Trailing,
    /// Answer 429 with this `Retry-After` without asking nginx.
    RetryAfter(&'static str),
    /// Answer 302 with this `Location` without asking nginx.
    Redirect(String),
    /// Answer this status with an empty body without asking nginx.
    Status(u16),
    /// Answer this status with this body (any bytes) without asking nginx.
    StatusBody(u16, Vec<u8>),
}

/// `fault` for each GET in `range`, as [`FaultProxy::start`] takes them.
pub fn every(range: std::ops::Range<usize>, fault: &Fault) -> Vec<(usize, Fault)> {
    range.map(|n| (n, fault.clone())).collect()
}

/// Splits a reply into its head's lines (status line first) and body.
fn split_reply(resp: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a reply head");
    let head = resp[..end]
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
        .collect();
    (head, resp[end + 4..].to_vec())
}

fn join_reply(head: &[Vec<u8>], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in head {
        out.extend_from_slice(l);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn is_header(line: &[u8], name: &str) -> bool {
    line.len() > name.len()
        && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
        && line[name.len()] == b':'
}

/// Without `name`, and with `name: value` when there is a value.
fn set_header(head: &mut Vec<Vec<u8>>, name: &str, value: Option<&[u8]>) {
    head.retain(|l| !is_header(l, name));
    if let Some(v) = value {
        let mut l = format!("{name}: ").into_bytes();
        l.extend_from_slice(v);
        head.push(l);
    }
}

/// An HTTP/1.1 proxy on loopback in front of `upstream`, one request at a time per
/// connection, each forwarded on its own connection to the upstream.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// GET requests seen.
    pub gets: Arc<AtomicUsize>,
    /// Request heads seen.
    pub heads: Arc<Mutex<Vec<String>>>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` that applies `faults` (by GET number).
    pub fn start(upstream: &str, faults: Vec<(usize, Fault)>) -> FaultProxy {
        let up = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let gets = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let mut by_get: HashMap<usize, Vec<Fault>> = HashMap::new();
        for (n, f) in faults {
            by_get.entry(n).or_default().push(f);
        }
        let faults = Arc::new(Mutex::new(by_get));
        let (g, h) = (gets.clone(), heads.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (g, h, f, up) = (g.clone(), h.clone(), faults.clone(), up.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, &up, &g, &h, &f);
                });
            }
        });
        FaultProxy { url, gets, heads }
    }
}

fn read_head(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        // bytes, not UTF-8: a header may carry obs-text (an ETag sent back in If-Range)
        let mut raw = Vec::new();
        if r.read_until(b'\n', &mut raw)? == 0 {
            return Ok(None);
        }
        let l = String::from_utf8_lossy(&raw).trim_end().to_string();
        if l.is_empty() {
            return Ok(Some(lines));
        }
        lines.push(l);
    }
}

fn serve(
    client: TcpStream,
    upstream: &str,
    gets: &AtomicUsize,
    heads: &Mutex<Vec<String>>,
    faults: &Mutex<HashMap<usize, Vec<Fault>>>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut out = client.try_clone()?;
    let mut reader = BufReader::new(client);
    while let Some(mut head) = read_head(&mut reader)? {
        heads.lock().unwrap().push(head.join("\n"));
        let n = gets.fetch_add(1, Ordering::SeqCst);
        let all = faults.lock().unwrap().remove(&n).unwrap_or_default();
        // The fault that decides what happens to the request; SetHeader ones rewrite the reply.
        let fault = all
            .iter()
            .find(|f| !matches!(f, Fault::SetHeader(..)))
            .cloned();
        match &fault {
            Some(Fault::Reset) => {
                let _ = out.shutdown(Shutdown::Both);
                return Ok(());
            }
            Some(Fault::Unavailable) => {
                out.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nRetry-After: 0\r\n\r\nbusy",
                )?;
                continue;
            }
            Some(Fault::RetryAfter(v)) => {
                out.write_all(
                    format!(
                        "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 4\r\nRetry-After: {v}\r\n\r\nbusy"
                    )
                    .as_bytes(),
                )?;
                continue;
            }
            Some(Fault::Redirect(to)) => {
                out.write_all(
                    format!("HTTP/1.1 302 Found\r\nContent-Length: 0\r\nLocation: {to}\r\n\r\n")
                        .as_bytes(),
                )?;
                continue;
            }
            Some(Fault::Status(code)) => {
                out.write_all(
                    format!("HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                )?;
                continue;
            }
            Some(Fault::StatusBody(code, body)) => {
                out.write_all(
                    format!(
                        "HTTP/1.1 {code} Whatever\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                )?;
                out.write_all(body)?;
                continue;
            }
            Some(Fault::ShiftRange(by)) => {
                for l in head.iter_mut() {
                    let lower = l.to_ascii_lowercase();
                    if let Some(r) = lower.strip_prefix("range: bytes=") {
                        let (a, b) = r.split_once('-').unwrap();
                        let a: u64 = a.parse::<u64>().unwrap() + by;
                        let b = b
                            .parse::<u64>()
                            .map(|b| (b + by).to_string())
                            .unwrap_or_default();
                        *l = format!("Range: bytes={a}-{b}");
                    }
                }
            }
            Some(Fault::Replace(path, data)) => {
                let tmp = path.with_extension("replacing");
                std::fs::write(&tmp, data)?;
                // a visibly newer mtime, so that Last-Modified changes too
                let later = std::time::SystemTime::now() + Duration::from_secs(5);
                std::fs::File::options()
                    .write(true)
                    .open(&tmp)?
                    .set_modified(later)?;
                std::fs::rename(&tmp, path)?;
            }
            _ => {}
        }
        // Validators the proxy rewrites are its own: nginx would not know them in If-Range.
        let own = all.iter().any(|f| {
            matches!(f, Fault::SetHeader(n, _) if n.eq_ignore_ascii_case("etag")
                || n.eq_ignore_ascii_case("last-modified"))
        });
        // Forward on a fresh connection that the upstream closes after answering.
        let mut up = TcpStream::connect(upstream)?;
        let mut req = String::new();
        for l in &head {
            let lower = l.to_ascii_lowercase();
            let dropped =
                lower.starts_with("connection:") || (own && lower.starts_with("if-range:"));
            if !dropped {
                req.push_str(l);
                req.push_str("\r\n");
            }
        }
        req.push_str("Connection: close\r\n\r\n");
        up.write_all(req.as_bytes())?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp)?;
        if let Some(Fault::RewriteKeepingEtag(path, data)) = &fault {
            let mtime = std::fs::metadata(path)?.modified()?;
            std::fs::write(path, data)?;
            std::fs::File::options()
                .write(true)
                .open(path)?
                .set_modified(mtime)?;
        }
        let (mut head, mut body) = split_reply(&resp);
        for f in &all {
            if let Fault::SetHeader(name, value) = f {
                set_header(&mut head, name, value.as_deref());
            }
        }
        let mut keep_open = false;
        let mut before = Vec::new();
        match &fault {
            Some(Fault::NoLength) => {
                set_header(&mut head, "Content-Length", None);
                set_header(&mut head, "Connection", None);
                keep_open = true;
            }
            Some(Fault::ChunkedNoEnd) => {
                set_header(&mut head, "Content-Length", None);
                set_header(&mut head, "Connection", None);
                set_header(&mut head, "Transfer-Encoding", Some(b"chunked"));
                let mut chunked = format!("{:x}\r\n", body.len()).into_bytes();
                chunked.extend_from_slice(&body);
                chunked.extend_from_slice(b"\r\n");
                body = chunked;
                keep_open = true;
            }
            Some(Fault::Trailing) => {
                set_header(&mut head, "Connection", None);
                keep_open = true;
            }
            Some(Fault::Interim(code)) => {
                before = format!("HTTP/1.1 {code} Interim\r\n\r\n").into_bytes();
            }
            _ => {}
        }
        let resp = [before, join_reply(&head, &body)].concat();
        if keep_open {
            out.write_all(&resp)?;
            if let Some(Fault::Trailing) = fault {
                // after the reply was read and its connection pooled (bytes that came with
                // the reply ureq sees, and drops the connection)
                std::thread::sleep(Duration::from_millis(50));
                out.write_all(b"GARBAGE GARBAGE GARBAGE GARBAGE GARBAGE GARBAGE GARBAGE!!\r\n")?;
            }
            continue;
        }
        if let Some(Fault::CutBody) = fault {
            let end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let body = resp.len() - end;
            out.write_all(&resp[..end + body / 2])?;
            let _ = out.shutdown(Shutdown::Both);
            return Ok(());
        }
        out.write_all(&resp)?;
        // The upstream said Connection: close; so does the reply: one request per connection.
        let _ = out.shutdown(Shutdown::Both);
        return Ok(());
    }
    Ok(())
}

/// A valid streamOptimized VMDK of `n` one-sector compressed grains (all of one 64 KiB
/// pattern) whose grain tables name them `prime` slots apart, so that reading the grains in
/// table order jumps about the file (report audit-red 1).
pub fn scattered_vmdk(n: u32, prime: u32) -> Vec<u8> {
    use std::io::Write as _;
    const S: usize = 512;
    const GS: u64 = 128;
    let cap = u64::from(n) * GS;
    let ngt = n.div_ceil(512);
    let header = |gd: u64| {
        let mut h = Vec::with_capacity(S);
        h.extend_from_slice(b"KDMV");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&0x30003u32.to_le_bytes());
        for v in [cap, GS, 1, 1] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h.extend_from_slice(&512u32.to_le_bytes());
        for v in [0u64, gd, 0] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h.extend_from_slice(&[0, b'\n', b' ', b'\r', b'\n']);
        h.extend_from_slice(&1u16.to_le_bytes());
        h.resize(S, 0);
        h
    };
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"streamOptimized\"\n\nRW {cap} SPARSE \"s.vmdk\"\n\n\
         ddb.adapterType = \"ide\"\n"
    );
    let mut out = Vec::new();
    out.extend_from_slice(&[0u8; S]); // header, written last
    let mut d = desc.into_bytes();
    d.resize(S, 0);
    out.extend_from_slice(&d);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&[7u8; 64 << 10]).unwrap();
    let data = z.finish().unwrap();
    assert!(data.len() + 12 <= S);
    let first: u64 = 2;
    // A metadata marker sector: its sector count, no data, its type (1 grain table, 2 grain
    // directory, 3 footer).
    let marker = |sectors: u64, kind: u32| {
        let mut m = Vec::with_capacity(S);
        m.extend_from_slice(&sectors.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(&kind.to_le_bytes());
        m.resize(S, 0);
        m
    };
    // Slot k holds the grain of LBA index inv[k].
    let perm: Vec<u32> = (0..n)
        .map(|i| ((u64::from(i) * u64::from(prime)) % u64::from(n)) as u32)
        .collect();
    let mut inv = vec![0u32; n as usize];
    for (i, &k) in perm.iter().enumerate() {
        inv[k as usize] = i as u32;
    }
    for &i in &inv {
        let mut g = Vec::with_capacity(S);
        g.extend_from_slice(&(u64::from(i) * GS).to_le_bytes());
        g.extend_from_slice(&(data.len() as u32).to_le_bytes());
        g.extend_from_slice(&data);
        g.resize(S, 0);
        out.extend_from_slice(&g);
    }
    let mut sec = first + u64::from(n);
    let mut gt_secs = Vec::new();
    for t in 0..ngt {
        out.extend_from_slice(&marker(4, 1));
        sec += 1;
        gt_secs.push(sec as u32);
        let mut gt = Vec::with_capacity(4 * S);
        for i in t * 512..n.min((t + 1) * 512) {
            gt.extend_from_slice(&((first + u64::from(perm[i as usize])) as u32).to_le_bytes());
        }
        gt.resize(4 * S, 0);
        out.extend_from_slice(&gt);
        sec += 4;
    }
    let gd_sectors = (u64::from(ngt) * 4).div_ceil(S as u64);
    out.extend_from_slice(&marker(gd_sectors, 2));
    sec += 1;
    let gd_at = sec;
    let mut gd: Vec<u8> = gt_secs.iter().flat_map(|s| s.to_le_bytes()).collect();
    gd.resize(gd_sectors as usize * S, 0);
    out.extend_from_slice(&gd);
    out.extend_from_slice(&marker(1, 3));
    out.extend_from_slice(&header(gd_at));
    out.extend_from_slice(&[0u8; S]);
    out[..S].copy_from_slice(&header(gd_at));
    out
}
