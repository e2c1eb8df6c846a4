//! The archive's shared state: each disk file opened once, one metadata budget and one inflate cap
//! for all disks.

use std::io::Write;
use std::sync::Arc;

use super::*;
use crate::error::ErrorKind;
use crate::io::ReadAt;

/// A minimal ISO 9660 image (primary descriptor and terminator): its parser reads 64 KiB.
fn iso() -> Vec<u8> {
    let mut v = vec![0u8; 18 * 2048];
    let pvd = 16 * 2048;
    v[pvd] = 1;
    v[pvd + 1..pvd + 6].copy_from_slice(b"CD001");
    v[pvd + 6] = 1;
    v[pvd + 80..pvd + 84].copy_from_slice(&18u32.to_le_bytes());
    v[pvd + 84..pvd + 88].copy_from_slice(&18u32.to_be_bytes());
    v[pvd + 128..pvd + 130].copy_from_slice(&2048u16.to_le_bytes());
    v[pvd + 130..pvd + 132].copy_from_slice(&2048u16.to_be_bytes());
    let term = 17 * 2048;
    v[term] = 255;
    v[term + 1..term + 6].copy_from_slice(b"CD001");
    v[term + 6] = 1;
    v
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// An appliance of `disks` (name, stored bytes, gzip), descriptor first.
fn appliance(disks: &[(&str, Vec<u8>, bool)]) -> Source {
    let mut files = String::new();
    let mut ds = String::new();
    for (i, (name, data, gz)) in disks.iter().enumerate() {
        let comp = if *gz {
            r#" ovf:compression="gzip""#
        } else {
            ""
        };
        files += &format!(
            r#"<File ovf:id="f{i}" ovf:href="{name}" ovf:size="{}"{comp}/>"#,
            data.len()
        );
        ds += &format!(r#"<Disk ovf:diskId="d{i}" ovf:fileRef="f{i}" ovf:capacity="1"/>"#);
    }
    let xml = format!(
        r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References>{files}</References><DiskSection><Info>d</Info>{ds}</DiskSection></Envelope>"#
    );
    let mut b = ::tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = ::tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add("vm.ovf", xml.as_bytes());
    for (name, data, _) in disks {
        add(name, data);
    }
    Arc::new(b.into_inner().unwrap())
}

#[test]
fn each_disk_is_opened_once() {
    let o = read_ova(appliance(&[("a.iso", iso(), false)]), &Limits::default()).unwrap();
    let first = o.open_inner(0, &Limits::default()).unwrap();
    let left = o.shared.metadata.left();
    let again = o.open_inner(0, &Limits::default()).unwrap();
    assert!(Arc::ptr_eq(&first, &again));
    assert_eq!(
        o.shared.metadata.left(),
        left,
        "a second open charges nothing"
    );
    let img = o.open_disk(0, &Limits::default()).unwrap();
    assert!(std::ptr::addr_eq(img.inner(), first.as_ref()));
    // A failed open is remembered too, with the same code.
    let e1 = o.open_inner(5, &Limits::default()).err().unwrap();
    assert_eq!(e1.kind(), ErrorKind::Usage);
}

/// Disks naming one member share one open of it (one image, charged once), whatever their
/// number; the same member read another way (gzip) is another file.
#[test]
fn disks_naming_one_member_share_one_open() {
    let disks: Vec<_> = (0..16).map(|_| ("a.iso", iso(), false)).collect();
    let o = read_ova(appliance(&disks), &Limits::default()).unwrap();
    let first = o.open_inner(0, &Limits::default()).unwrap();
    let left = o.shared.metadata.left();
    for i in 1..16 {
        assert_eq!(o.shared.file_of(i), o.shared.file_of(0));
        let again = o.open_inner(i, &Limits::default()).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "disk {i}");
        let img = o.open_disk(i, &Limits::default()).unwrap();
        assert!(std::ptr::addr_eq(img.inner(), first.as_ref()));
    }
    assert_eq!(o.shared.metadata.left(), left, "later disks charge nothing");

    let o = read_ova(
        appliance(&[("a.iso", iso(), false), ("a.iso", gzip(&iso()), true)]),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(o.disks[0].member, o.disks[1].member);
    assert_ne!(o.shared.file_of(0), o.shared.file_of(1));
}

#[test]
fn the_disks_share_the_archives_metadata_budget() {
    let disks = [("a.iso", iso(), false), ("b.iso", iso(), false)];
    // A command's budget is the archive's: its disks charge the command.
    let limits = Limits::default().per_command();
    let o = read_ova(appliance(&disks), &limits).unwrap();
    assert!(o.shared.metadata == limits.budget());
    // Without one, the archive makes one budget for all its disks, charged with the archive's
    // own tables (descriptor, manifest) and given back as they go.
    let o = read_ova(appliance(&disks), &Limits::default()).unwrap();
    assert!(o.shared.metadata != Limits::default().budget());
    let before = o.shared.metadata.left();
    o.open_inner(0, &Limits::default()).unwrap();
    o.open_inner(1, &Limits::default()).unwrap();
    assert!(o.shared.metadata.left() <= before);
}

#[test]
fn the_disks_share_one_inflate_cap() {
    let raw = vec![7u8; 3000];
    let disks = [("a.img", gzip(&raw), true), ("b.img", gzip(&raw), true)];
    let limits = Limits {
        max_inflated_bytes: 4000,
        ..Limits::default()
    };
    let o = read_ova(appliance(&disks), &limits).unwrap();
    assert_eq!(o.open_inner(0, &limits).unwrap().info().virtual_size, 3000);
    let e = o.open_inner(1, &limits).err().unwrap();
    assert_eq!(e.finding_code(), "ova.gzip-limit");
    // Each alone fits: a fresh read of the archive starts a fresh cap.
    let o = read_ova(appliance(&disks), &limits).unwrap();
    assert!(o.open_inner(1, &limits).is_ok());
}

#[test]
fn a_standalone_descriptor_is_read_under_the_callers_limits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.ovf");
    let xml =
        r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><References/></Envelope>"#;
    std::fs::write(&path, xml).unwrap();
    assert!(read_ovf_dir(&path, &Limits::default()).is_ok());
    let tiny = Limits {
        max_metadata_bytes: 10,
        ..Limits::default()
    };
    let e = read_ovf_dir(&path, &tiny).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded);
}

/// An archive in memory that counts the reads touching given offsets.
struct Counting {
    data: Vec<u8>,
    watched: Vec<u64>,
    hits: Vec<std::sync::atomic::AtomicUsize>,
}

impl Counting {
    fn new(data: Vec<u8>, watched: Vec<u64>) -> Self {
        let hits = watched.iter().map(|_| Default::default()).collect();
        Counting {
            data,
            watched,
            hits,
        }
    }
    fn hits(&self) -> Vec<usize> {
        self.hits
            .iter()
            .map(|h| h.load(std::sync::atomic::Ordering::SeqCst))
            .collect()
    }
    fn reset(&self) {
        for h in &self.hits {
            h.store(0, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl ReadAt for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let end = offset + buf.len() as u64;
        for (w, h) in self.watched.iter().zip(&self.hits) {
            if offset <= *w && *w < end {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        self.data.as_slice().read_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.data.len() as u64)
    }
}

#[test]
fn the_gate_reads_the_archive_once_and_opens_each_disk_once() {
    let src = appliance(&[("a.iso", iso(), false), ("b.iso", iso(), false)]);
    let mut bytes = vec![0u8; usize::try_from(src.size().unwrap()).unwrap()];
    src.read_exact_at(&mut bytes, 0).unwrap();
    let o = read_ova(src, &Limits::default()).unwrap();
    // Watched: the second disk's tar header, the descriptor's data, the second disk's
    // primary volume descriptor (what detecting and opening an ISO read).
    let disk1 = o.members[2].offset;
    let watched = vec![disk1 - 512, o.members[0].offset, disk1 + 16 * 2048];
    let counting = Arc::new(Counting::new(bytes, watched));
    let src: Source = counting.clone();
    let det = crate::detect::detect(src.as_ref()).unwrap();
    counting.reset();
    let policy = crate::policy::Policy::default();
    let limits = Limits::default();
    let mut report = crate::policy::inspect_detected(src, det, &policy, &limits).unwrap();
    let disks = crate::policy::every_disk(&mut report, &policy, &limits).unwrap();
    assert_eq!(disks.len(), 2);
    let [header, descriptor, pvd] = counting.hits()[..] else {
        panic!("three watched offsets");
    };
    assert_eq!(header, 1, "the archive's headers are walked once");
    assert_eq!(descriptor, 1, "the descriptor is read once");
    assert_eq!(pvd, 2, "the second disk is detected once and opened once");
}

/// An appliance `ova extract` accepts: one ISO disk whose capacity is its size.
fn extractable() -> Ova {
    let disk = iso();
    let xml = format!(
        r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References><File ovf:id="f0" ovf:href="a.iso" ovf:size="{}"/></References><DiskSection><Info>d</Info><Disk ovf:diskId="d0" ovf:fileRef="f0" ovf:capacity="{}" ovf:capacityAllocationUnits="byte"/></DiskSection></Envelope>"#,
        disk.len(),
        disk.len()
    );
    let mut b = ::tar::Builder::new(Vec::new());
    for (name, data) in [("vm.ovf", xml.as_bytes()), ("a.iso", &disk[..])] {
        let mut h = ::tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    let src: Source = Arc::new(b.into_inner().unwrap());
    read_ova(src, &Limits::default()).unwrap()
}

/// A failed (or interrupted) extraction removes only the directories it created: a directory
/// that existed before stays, however the destination spells its way to it (`new/../keep`
/// names it only once `new` exists), and the signal handler's hook is given only created ones.
#[test]
fn a_failed_extract_removes_only_the_directories_it_created() {
    use std::cell::RefCell;
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let keep = root.join("keep");
    std::fs::create_dir(&keep).unwrap();
    let ova = extractable();
    let registered = RefCell::new(Vec::new());
    let hook = |p: &std::path::Path| -> Box<dyn std::any::Any> {
        if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
            registered.borrow_mut().push(p.to_path_buf());
        }
        Box::new(())
    };
    let fail = || -> Result<()> { Err(Error::invalid("stopped before the renames")) };
    let hooks = ExtractHooks {
        cancel: None,
        temp: Some(&hook),
        before_commit: Some(&fail),
    };
    for (dir, made) in [
        // `new` is made, `new/..` and `new/../keep` exist already.
        ("new/../keep", vec!["new"]),
        ("a/b/../../keep", vec!["a", "a/b"]),
        // A fresh directory reached through `..` is made, and removed.
        (
            "n2/../fresh/sub",
            vec!["n2", "n2/../fresh", "n2/../fresh/sub"],
        ),
        ("keep", vec![]),
    ] {
        registered.borrow_mut().clear();
        let e = ova
            .extract_with(&root.join(dir), &Limits::default(), &hooks)
            .unwrap_err();
        assert!(e.to_string().contains("stopped before the renames"), "{e}");
        let want: Vec<_> = made.iter().map(|m| root.join(m)).collect();
        assert_eq!(*registered.borrow(), want, "{dir}");
        assert!(keep.is_dir(), "{dir}: the existing directory was removed");
        let mut left: Vec<_> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["keep"], "{dir}");
        assert_eq!(std::fs::read_dir(&keep).unwrap().count(), 0, "{dir}");
    }
    // The same spelling succeeds into the existing directory, which keeps what is written.
    let done = ova
        .extract(&root.join("new/../keep"), &Limits::default())
        .unwrap();
    assert!(!done.rejected, "{:?}", done.findings);
    assert_eq!(std::fs::read(keep.join("a.iso")).unwrap(), iso());
    // The directory made on the way stays, as any directory a successful extract makes.
    assert!(root.join("new").is_dir());
}

/// A standalone descriptor's hrefs, every kind of them, are its file references; reading them
/// opens nothing beside the descriptor.
#[test]
fn a_descriptor_reports_every_href_as_a_file_reference() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("x.ovf");
    std::fs::write(
        &path,
        r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References><File ovf:id="a" ovf:href="disk1.vmdk"/><File ovf:id="b" ovf:href="../up.vmdk"/><File ovf:id="c" ovf:href="http://host/d.vmdk"/></References></Envelope>"#,
    )
    .unwrap();
    let d = read_ovf_dir(&path, &Limits::default()).unwrap();
    let refs = d.file_references();
    let got: Vec<_> = refs.iter().map(|r| (r.kind, r.target.as_str())).collect();
    use crate::image::RefKind::Href;
    assert_eq!(
        got,
        [
            (Href, "disk1.vmdk"),
            (Href, "../up.vmdk"),
            (Href, "http://host/d.vmdk")
        ]
    );
}
