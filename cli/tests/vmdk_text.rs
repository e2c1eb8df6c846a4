//! Report wild-diff F0 through the commands: an ISO whose system area holds VMDK descriptor
//! text qemu reads once the format is declared vmdk is refused by `check` and by `upload`
//! (before anything is sent), with the policy's `image.vmdk-descriptor-text` (the same policy
//! `audit` runs on stored data). The format cases are in `formats/tests/vmdk_text.rs`.

mod support;

use std::process::Command;

use support::{glimpse, json_of, s};

#[test]
fn check_and_upload_refuse_descriptor_text_in_an_iso_system_area() {
    let d = tempfile::tempdir().unwrap();
    let content = d.path().join("c");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("a.txt"), b"a\n").unwrap();
    let iso = d.path().join("t.iso");
    let st = Command::new("genisoimage")
        .args(["-quiet", "-o", s(&iso), s(&content)])
        .status()
        .expect("genisoimage must be installed");
    assert!(st.success());
    let clean = json_of(&glimpse(&["check", "--output", "json", s(&iso)]));
    assert_eq!(clean["verdict"], "pass", "{clean}");
    let mut bytes = std::fs::read(&iso).unwrap();
    let text = b"createType=\"vmfs\"\nRW 1 VMFS \"/etc/hostname\"\n";
    bytes[..text.len()].copy_from_slice(text);
    std::fs::write(&iso, &bytes).unwrap();
    let o = glimpse(&["check", "--output", "json", s(&iso)]);
    assert_eq!(o.status.code(), Some(1));
    let v = json_of(&o);
    assert_eq!(v["format"], "iso");
    assert_eq!(v["verdict"], "reject");
    assert!(
        support::codes(&v).contains(&"image.vmdk-descriptor-text".to_string()),
        "{v}"
    );
    for declared in [&[][..], &["--disk-format", "iso"][..]] {
        let mut args = vec!["upload", "--name", "x"];
        args.extend(declared);
        args.push(s(&iso));
        let o = glimpse(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("image.vmdk-descriptor-text"), "{err}");
        assert!(err.contains("nothing was sent"), "{err}");
    }
}
