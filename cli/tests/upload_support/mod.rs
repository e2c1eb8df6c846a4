//! Shared by the upload test binaries: a real glance-api started through the project's own
//! `scripts/glance-testenv.sh` (once per test binary, stopped by the script's owner watcher when
//! the binary exits), the `glimpse` binary with a clean OpenStack environment, a loopback
//! TCP proxy in front of Glance that records request heads and can cut or slow uploads, and
//! helpers to look images up directly in Glance.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md5::{Digest as _, Md5};
use serde_json::Value;
use sha2::Sha512;

/// The test Glance.
pub struct Glance {
    /// e.g. `http://127.0.0.1:40123`.
    pub url: String,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Starts (once per test binary) the glance-api of `scripts/glance-testenv.sh` in
/// `target/glance-testenv/<binary>`, sharing one venv. Panics loudly when it cannot: these tests
/// never skip.
pub fn glance(binary: &str) -> &'static Glance {
    static G: OnceLock<Glance> = OnceLock::new();
    G.get_or_init(|| {
        let base = target_dir().join("glance-testenv");
        let dir = base.join(binary);
        let script = workspace().join("scripts/glance-testenv.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(&dir)
            .arg("--owner-pid")
            .arg(std::process::id().to_string())
            .env("GLANCE_VENV", base.join("venv"))
            .output()
            .expect("running scripts/glance-testenv.sh (bash is required)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "scripts/glance-testenv.sh start failed ({}): the upload tests need python3 (>= 3.11) with venv and \
             access to PyPI on first use.\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let url = stdout
            .lines()
            .find_map(|l| l.strip_prefix("GLANCE_URL="))
            .unwrap_or_else(|| panic!("no GLANCE_URL in the script's output: {stdout}"))
            .to_string();
        Glance { url }
    })
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

impl Glance {
    /// Every image with this name, straight from Glance (any status).
    pub fn images_named(&self, name: &str) -> Vec<Value> {
        let mut resp = agent()
            .get(format!("{}/v2/images", self.url))
            .query("name", name)
            .header("X-Auth-Token", "test")
            .call()
            .expect("listing images");
        assert_eq!(resp.status().as_u16(), 200);
        let v: Value = serde_json::from_slice(&resp.body_mut().read_to_vec().unwrap()).unwrap();
        v["images"].as_array().cloned().unwrap_or_default()
    }

    /// The stored bytes of an image.
    pub fn download(&self, id: &str) -> Vec<u8> {
        let mut resp = agent()
            .get(format!("{}/v2/images/{id}/file", self.url))
            .header("X-Auth-Token", "test")
            .call()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap()
    }

    /// Deletes an image (unprotecting it first).
    pub fn delete(&self, id: &str) {
        let url = format!("{}/v2/images/{id}", self.url);
        let _ = agent()
            .patch(&url)
            .header("X-Auth-Token", "test")
            .content_type("application/openstack-images-v2.1-json-patch")
            .send(r#"[{"op": "replace", "path": "/protected", "value": false}]"#);
        let resp = agent()
            .delete(&url)
            .header("X-Auth-Token", "test")
            .call()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 204, "deleting {id}");
    }
}

/// A name no other test (or earlier run) uses.
pub fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "glimpse-test-{tag}-{}-{t}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
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

/// `glimpse upload --os-auth-token TOKEN --os-image-url URL ...`.
pub fn upload(url: &str, args: &[&str]) -> Output {
    glimpse()
        .arg("upload")
        .args(["--os-auth-token", TOKEN, "--os-image-url", url])
        .args(args)
        .output()
        .unwrap()
}

/// Starts `glimpse upload` of `file` named `name` to `url` with the test token, stdout and
/// stderr piped, without waiting.
pub fn spawn_upload(url: &str, name: &str, file: &Path) -> std::process::Child {
    glimpse()
        .arg("upload")
        .args([
            "--os-auth-token",
            TOKEN,
            "--os-image-url",
            url,
            "--name",
            name,
        ])
        .arg(file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// An arbitrary token: the test identity filter accepts any.
pub const TOKEN: &str = "gAAAAABtest-token-7d3c1b9e0f2a4c6e8b1d3f5a7c9e0b2d";

/// stdout and stderr as text, for messages.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Writes `len` bytes of varied content with a zero run in the middle.
pub fn raw_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let mut data = Vec::with_capacity(len);
    let mut x: u32 = 0x1234_5678;
    for i in 0..len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.push(if (len / 3..len / 2).contains(&i) {
            0
        } else {
            x as u8
        });
    }
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    p
}

/// (md5, sha512) hex of a file.
pub fn digests(path: &Path) -> (String, String) {
    let data = std::fs::read(path).unwrap();
    (hex(&Md5::digest(&data)), hex(&Sha512::digest(&data)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses stdout as JSON.
pub fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", text(o)))
}

/// What the proxy does with a PUT's body.
#[derive(Clone, Copy, Debug)]
pub enum PutMode {
    /// Forward it.
    Pass,
    /// Close both sides after this many request bytes.
    CutAfter(usize),
    /// Forward slowly: this many bytes every 20 ms.
    Throttle(usize),
    /// Forward every request, but hold Glance's reply to the requests whose head starts with
    /// this for this long (a Glance or gateway slow to answer).
    HoldReply(&'static str, Duration),
    /// Forward every request, but drop Glance's reply to the requests whose head starts with
    /// this and close the connection (a reply lost on the way, after Glance acted).
    DropReply(&'static str),
}

/// A loopback TCP proxy in front of the real Glance. It is not a mock: every byte goes to and
/// comes from glance-api. It records the head of each request, counts connections, and can cut
/// or slow a PUT.
pub struct Proxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Request heads seen (method line and headers).
    pub heads: Arc<Mutex<Vec<String>>>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// Bytes of PUT bodies forwarded so far.
    pub put_bytes: Arc<AtomicUsize>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(upstream: &str, mode: PutMode) -> Proxy {
        let up = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let put_bytes = Arc::new(AtomicUsize::new(0));
        let (h, c, pb) = (heads.clone(), connections.clone(), put_bytes.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (h, pb, up) = (h.clone(), pb.clone(), up.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, &up, mode, &h, &pb);
                });
            }
        });
        Proxy {
            url,
            heads,
            connections,
            put_bytes,
        }
    }

    /// Waits up to a minute until `n` bytes of PUT bodies went through; panics otherwise.
    pub fn wait_for_put_bytes(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.put_bytes.load(Ordering::SeqCst) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the upload never got {n} bytes through: {:?}",
                self.heads()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Request heads seen so far.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

fn serve(
    mut client: TcpStream,
    upstream: &str,
    mode: PutMode,
    heads: &Mutex<Vec<String>>,
    put_bytes: &AtomicUsize,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut server = TcpStream::connect(upstream)?;
    // Glance answers with Connection: close, so one request per connection: the reply copier
    // runs until the server closes.
    let mut back = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let mut head_done = false;
    let mut is_put = false;
    let mut body_sent = 0usize;
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        if !head_done {
            head.extend_from_slice(chunk);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                head_done = true;
                let text = String::from_utf8_lossy(&head[..end]).into_owned();
                is_put = text.starts_with("PUT ");
                back = Some(replies(&server, &client, mode, &text)?);
                heads.lock().unwrap().push(text);
                let body_start = end + 4;
                server.write_all(&head[..body_start])?;
                let rest = head[body_start..].to_vec();
                body_sent += rest.len();
                if is_put {
                    put_bytes.fetch_add(rest.len(), Ordering::SeqCst);
                }
                server.write_all(&rest)?;
            } else if head.len() > 1 << 20 {
                break;
            }
            continue;
        }
        if is_put {
            match mode {
                PutMode::Pass => {}
                PutMode::CutAfter(limit) => {
                    if body_sent + chunk.len() > limit {
                        let keep = limit.saturating_sub(body_sent);
                        server.write_all(&chunk[..keep])?;
                        put_bytes.fetch_add(keep, Ordering::SeqCst);
                        // the connection dies mid-upload, for both sides
                        let _ = client.shutdown(Shutdown::Both);
                        let _ = server.shutdown(Shutdown::Both);
                        if let Some(b) = back {
                            let _ = b.join();
                        }
                        return Ok(());
                    }
                }
                PutMode::HoldReply(..) | PutMode::DropReply(_) => {}
                PutMode::Throttle(step) => {
                    while chunk.len() > step {
                        server.write_all(&chunk[..step])?;
                        put_bytes.fetch_add(step, Ordering::SeqCst);
                        body_sent += step;
                        chunk = &chunk[step..];
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            put_bytes.fetch_add(chunk.len(), Ordering::SeqCst);
        }
        body_sent += chunk.len();
        server.write_all(chunk)?;
    }
    let _ = server.shutdown(Shutdown::Write);
    if let Some(b) = back {
        let _ = b.join();
    }
    Ok(())
}

/// Starts copying Glance's reply to the request whose head is `head` back to the client, held
/// or dropped as `mode` says.
fn replies(
    server: &TcpStream,
    client: &TcpStream,
    mode: PutMode,
    head: &str,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut s2 = server.try_clone()?;
    let mut c2 = client.try_clone()?;
    let head = head.to_string();
    Ok(std::thread::spawn(move || {
        match mode {
            PutMode::HoldReply(prefix, hold) if head.starts_with(prefix) => {
                // Glance has answered once its first bytes arrive: only then hold them.
                let mut first = [0u8; 1];
                if matches!(s2.read(&mut first), Ok(1)) {
                    std::thread::sleep(hold);
                    let _ = c2.write_all(&first);
                }
            }
            PutMode::DropReply(prefix) if head.starts_with(prefix) => {
                let _ = std::io::copy(&mut s2, &mut std::io::sink());
                let _ = c2.shutdown(Shutdown::Both);
                return;
            }
            _ => {}
        }
        let _ = std::io::copy(&mut s2, &mut c2);
        let _ = c2.shutdown(Shutdown::Write);
    }))
}
