//! Remote reads through a fault-injecting proxy in front of a real nginx: connection resets,
//! a 503, a body cut short, an object replaced mid-read, and a server that returns a range
//! other than the one asked.

mod remote_support;

use std::sync::atomic::Ordering;

use remote_support::{image, json, nginx, run, text, www, Fault, FaultProxy};

const BIN: &str = "remote_faults";

fn fixture() -> (String, std::path::PathBuf) {
    let p = image(BIN, "disk.qcow2", 6 << 20, "qcow2", &[]);
    (p.file_name().unwrap().to_str().unwrap().to_string(), p)
}

/// `check --output json` of `name` through a proxy with `faults`.
fn check_through(faults: Vec<(usize, Fault)>, name: &str) -> (std::process::Output, FaultProxy) {
    let proxy = FaultProxy::start(nginx(BIN), faults);
    let o = run(&[
        "check",
        "--output",
        "json",
        &format!("{}/{name}", proxy.url),
    ]);
    (o, proxy)
}

#[test]
fn resets_503s_and_cut_bodies_are_retried() {
    let (name, p) = fixture();
    let local = json(&run(&["check", "--output", "json", p.to_str().unwrap()]));
    let clean = check_through(vec![], &name);
    assert_eq!(clean.0.status.code(), Some(0), "{:?}", text(&clean.0));
    let clean_gets = clean.1.gets.load(Ordering::SeqCst);
    for faults in [
        vec![(0, Fault::Reset)],
        vec![(0, Fault::Unavailable)],
        vec![(1, Fault::Reset), (2, Fault::Unavailable)],
        vec![(0, Fault::CutBody)],
        vec![(1, Fault::CutBody)],
    ] {
        let what = format!("{faults:?}");
        let n = faults.len();
        let (o, proxy) = check_through(faults, &name);
        assert_eq!(o.status.code(), Some(0), "{what}: {:?}", text(&o));
        let v = json(&o);
        assert_eq!(v["verdict"], local["verdict"], "{what}");
        assert_eq!(v["findings"], local["findings"], "{what}");
        // each fault cost one more request, and the JSON counts it
        assert_eq!(proxy.gets.load(Ordering::SeqCst), clean_gets + n, "{what}");
        assert_eq!(
            v["transfer"]["requests"].as_u64().unwrap(),
            (clean_gets + n) as u64,
            "{what}"
        );
    }
}

#[test]
fn a_server_that_keeps_failing_is_given_up_on() {
    let (name, _) = fixture();
    let faults = (0..20).map(|i| (i, Fault::Unavailable)).collect();
    let (o, proxy) = check_through(faults, &name);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    let err = text(&o).1;
    assert!(
        err.contains("gave up after 5 tries") && err.contains("HTTP 503"),
        "{err}"
    );
    assert_eq!(proxy.gets.load(Ordering::SeqCst), 5, "bounded retries");
}

#[test]
fn a_wrong_range_is_an_error() {
    let (name, _) = fixture();
    // the first request learns the object; the second asks for table blocks
    let (o, _) = check_through(vec![(1, Fault::ShiftRange(512))], &name);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    let err = text(&o).1;
    assert!(err.contains("the server returned bytes"), "{err}");
    let (o, _) = check_through(vec![(0, Fault::ShiftRange(4096))], &name);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(
        text(&o).1.contains("the server returned bytes"),
        "{:?}",
        text(&o)
    );
}

#[test]
fn an_object_replaced_mid_read_fails_instead_of_mixing_versions() {
    // its own file, since it is replaced
    let p = image(BIN, "replaced.qcow2", 6 << 20, "qcow2", &[]);
    let other = image(BIN, "other.vmdk", 6 << 20, "vmdk", &[]);
    let new_bytes = std::fs::read(&other).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = FaultProxy::start(
        nginx(BIN),
        vec![(
            2,
            Fault::Replace(www(BIN).join("replaced.qcow2"), new_bytes),
        )],
    );
    let o = run(&[
        "convert",
        "-O",
        "raw",
        &format!("{}/replaced.qcow2", proxy.url),
        dir.path().join("out.raw").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    let err = text(&o).1;
    assert!(err.contains("changed on the server"), "{err}");
    assert!(
        !dir.path().join("out.raw").exists(),
        "no output from a mixed read"
    );
    // every request after the first was pinned to the version first seen
    let heads = proxy.heads.lock().unwrap().clone();
    assert!(heads.len() >= 3);
    for h in &heads[1..] {
        assert!(
            h.to_ascii_lowercase().contains("if-range: \""),
            "unpinned request: {h}"
        );
    }
    let _ = p;
}

#[test]
fn checksum_of_a_url_resumes_a_cut_stream_and_rejects_a_replaced_one() {
    let (name, p) = fixture();
    let local = json(&run(&["checksum", "--output", "json", p.to_str().unwrap()]));
    for faults in [vec![(1, Fault::CutBody)], vec![(2, Fault::Reset)]] {
        let proxy = FaultProxy::start(nginx(BIN), faults);
        let o = run(&[
            "checksum",
            "--output",
            "json",
            &format!("{}/{name}", proxy.url),
        ]);
        assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
        assert_eq!(json(&o)["sha512"], local["sha512"]);
    }
    let replaced = image(BIN, "replaced-sum.qcow2", 6 << 20, "qcow2", &[]);
    let other = std::fs::read(image(BIN, "other-sum.vmdk", 6 << 20, "vmdk", &[])).unwrap();
    let proxy = FaultProxy::start(nginx(BIN), vec![(2, Fault::Replace(replaced, other))]);
    let o = run(&["checksum", &format!("{}/replaced-sum.qcow2", proxy.url)]);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(
        text(&o).1.contains("changed on the server"),
        "{:?}",
        text(&o)
    );
    assert!(text(&o).0.is_empty(), "no digest of a mixed read");
}
