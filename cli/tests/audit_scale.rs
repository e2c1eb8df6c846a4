//! `glimpse audit` of a catalog of 1,000 small images on the real glance-api, with bounded
//! memory: peak RSS measured by `/usr/bin/time -f %M` stays under a fixed bound whatever the
//! catalog size and `-j`. Its own test binary, so that its Glance holds only this catalog.

mod audit_support;
mod upload_support;

use std::time::Instant;

use audit_support::{audit_cmd, lines, seed};
use upload_support::{glance, text, unique};

const BIN: &str = "audit_scale";
const IMAGES: usize = 1000;
/// The bound the audit must stay under, in KiB (256 MiB).
const MAX_RSS_KIB: u64 = 256 * 1024;

/// Seeds `IMAGES` small raw images with one tag, from a few threads (Glance serves two
/// requests at once; more threads only queue).
fn seed_catalog(tag: &str) {
    let g = glance(BIN);
    let started = Instant::now();
    let threads = 4;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in (t..IMAGES).step_by(threads) {
                    // 8 KiB of varied bytes, different per image
                    let data: Vec<u8> = (0..8192u32)
                        .map(|k| (k.wrapping_mul(31).wrapping_add(i as u32) % 251) as u8)
                        .collect();
                    seed(g, &format!("{tag}-{i}"), "raw", "bare", &data, &[tag]);
                }
            });
        }
    });
    eprintln!(
        "seeded {IMAGES} images in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Runs the audit under `/usr/bin/time -f %M`; returns (lines, peak RSS in KiB, seconds).
fn audit_timed(url: &str, args: &[&str]) -> (Vec<serde_json::Value>, u64, f64) {
    let inner = audit_cmd(url, args);
    let mut cmd = std::process::Command::new("/usr/bin/time");
    cmd.arg("-f").arg("RSS_KIB=%M").arg(inner.get_program());
    cmd.args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let started = Instant::now();
    let out = cmd
        .output()
        .expect("/usr/bin/time is required for this test (Debian package time)");
    let secs = started.elapsed().as_secs_f64();
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{stderr}",
        stdout.lines().take(5).collect::<Vec<_>>().join("\n")
    );
    let rss = stderr
        .lines()
        .find_map(|l| l.strip_prefix("RSS_KIB="))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no RSS from /usr/bin/time: {stderr}"));
    (lines(&out), rss, secs)
}

#[test]
fn a_catalog_of_1000_images_is_audited_with_bounded_memory() {
    let g = glance(BIN);
    let tag = unique("scale");
    seed_catalog(&tag);
    for jobs in ["8", "32"] {
        let (lines, rss, secs) = audit_timed(&g.url, &["--tag", &tag, "-j", jobs]);
        assert_eq!(lines.len(), IMAGES, "-j {jobs}");
        let mut ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), IMAGES, "-j {jobs}: an image was audited twice");
        assert!(lines.iter().all(|l| l["verdict"] == "pass"), "-j {jobs}");
        let bytes: u64 = lines
            .iter()
            .map(|l| l["bytes_read"].as_u64().unwrap())
            .sum();
        eprintln!(
            "-j {jobs}: {IMAGES} images in {secs:.1} s ({:.0} images/s), {} bytes read per image, peak RSS {} MiB",
            IMAGES as f64 / secs,
            bytes / IMAGES as u64,
            rss / 1024
        );
        assert!(
            rss < MAX_RSS_KIB,
            "-j {jobs}: peak RSS {rss} KiB is over {MAX_RSS_KIB} KiB"
        );
    }
}
