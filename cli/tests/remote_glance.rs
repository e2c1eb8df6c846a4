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
