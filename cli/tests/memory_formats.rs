//! The memory ceiling on the inputs of the memory-amplification review that the format
//! parsers, not the commands, made expensive (docs/memory.md, "What a format holds beside its
//! tables"): gzip OVA disks held in memory (M2), the VMDK check's grain list (M4), OVF
//! attributes (M5) and the LUKS2 JSON area (M6). Each input is a few KiB to 16 MiB, generated
//! here; each command must stay far below 256 MiB of peak RSS (GNU time's `%M`), and the real
//! images beside them must still work.

mod support;

use std::path::Path;
use std::process::Command;

use support::qemu::img as qemu_img;
use support::rss::CEILING_KIB;
use support::s;

/// Writes the inputs: `python3 -c GEN MODE ARGS...`.
const GEN: &str = r#"
import sys, tarfile, io, gzip, struct, hashlib, string, subprocess
mode, out = sys.argv[1], sys.argv[2]

def tar(members):
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name); ti.size = len(data); ti.mtime = 0
            t.addfile(ti, io.BytesIO(data))

NS = 'xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"'

def envelope(files, disks):
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<Envelope %s><References>%s</References>'
            '<DiskSection><Info>d</Info>%s</DiskSection>'
            '<VirtualSystem ovf:id="vm"><Info>v</Info></VirtualSystem></Envelope>\n'
            % (NS, files, disks)).encode()

def wrap(raw, fmt, cap):
    gz = gzip.compress(raw, 6, mtime=0)
    files = '<File ovf:id="f1" ovf:href="disk1" ovf:size="%d" ovf:compression="gzip"/>' % len(gz)
    disks = '<Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="%d" ovf:format="%s"/>' % (cap, fmt)
    tar([("x.ovf", envelope(files, disks)), ("disk1", gz)])

if mode == "many-gz":
    # N disks, each a gzip member inflating to exactly 8 MiB (a 1 MiB qcow2 and zeros):
    # every disk fits the in-memory spool; "shared" names one member from every disk.
    n, shared, seed = int(sys.argv[3]), sys.argv[4] == "shared", sys.argv[5]
    raw = open(seed, "rb").read().ljust(8 << 20, b"\0")
    gz = gzip.compress(raw, 6, mtime=0)
    m = 1 if shared else n
    files = "".join('<File ovf:id="f%d" ovf:href="disk%d" ovf:size="%d" ovf:compression="gzip"/>'
                    % (i, i, len(gz)) for i in range(m))
    disks = "".join('<Disk ovf:diskId="d%d" ovf:fileRef="f%d" ovf:capacity="1048576" '
                    'ovf:format="http://www.qemu.org/qcow2"/>' % (i, 0 if shared else i)
                    for i in range(n))
    tar([("x.ovf", envelope(files, disks))] + [("disk%d" % i, gz) for i in range(m)])
elif mode == "vmdk-grains":
    # A sparse VMDK of 1-sector grains whose P * 128 grain tables all name the file's last
    # sector from every entry: P * 65536 grains for check to list, from 32 MiB that gzip to
    # 60 KiB.
    P = int(sys.argv[3]); S = 512; per = 512; gd = 3; G = 128 * P; gt0 = gd + P
    F = gt0 + 4 * G + 1; X = F - 1; E = (F - gd) * 128; cap = E * per
    desc = (b'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
            b'createType="monolithicSparse"\n# Extent description\nRW %d SPARSE "x.vmdk"\n' % cap)
    hdr = struct.pack("<IIIQQQQIQQQB4sH", 0x564d444b, 1, 1, cap, 1, 1, 2, per, 0, gd, 0, 0,
                      b"\n \r\n", 0)
    b = bytearray(F * S)
    b[0:len(hdr)] = hdr
    b[S:S + len(desc)] = desc
    gds = b"".join(struct.pack("<I", gt0 + 4 * k) for k in range(G))
    b[gd * S:gd * S + len(gds)] = gds
    gts = struct.pack("<I", X) * (per * G)
    b[gt0 * S:gt0 * S + len(gts)] = gts
    wrap(bytes(b), "http://www.vmware.com/interfaces/specifications/vmdk.html#monolithicSparse",
         cap * S)
elif mode == "attrs":
    # A descriptor of nearly 16 MiB: 63 empty attributes on each of its elements.
    size = int(sys.argv[3])
    names = list(string.ascii_letters) + ["z" + c for c in string.ascii_letters[:60]]
    el = "<a " + " ".join('%s=""' % n for n in names[:63]) + "/>"
    head = '<?xml version="1.0"?>\n<Envelope %s><References/>' % NS
    xml = (head + el * ((size - len(head) - 64) // len(el)) + "</Envelope>\n").encode()
    tar([("x.ovf", xml)])
elif mode == "luks-json":
    # A LUKS2 header whose 4 MiB JSON area is mostly one array of zeros, and a payload, in
    # a gzip OVA.
    hs = 4 << 20; off = 8 << 20
    b = bytearray(4096)
    b[0:6] = b"LUKS\xba\xbe"; struct.pack_into(">HQQ", b, 6, 2, hs, 7)
    b[24:29] = b"label"; b[72:78] = b"sha256"; b[168:172] = b"uuid"
    n = hs - 4096
    body = (b'{"segments":{"0":{"type":"crypt","offset":"%d","size":"dynamic","iv_tweak":"0",'
            b'"encryption":"aes-xts-plain64","sector_size":512}},"keyslots":{"0":{}},'
            b'"digests":{"0":{"hash":"sha256"}},"x":[' % off)
    k = (n - len(body) - 4) // 2
    js = (body + b"0," * (k - 1) + b"0]}").ljust(n, b"\0")
    b[448:480] = hashlib.sha256(bytes(b) + js).digest()
    raw = (bytes(b) + js).ljust(off + (1 << 20), b"\0")
    wrap(raw, "raw", 1 << 20)
elif mode == "items":
    # A valid appliance whose virtual system has N hardware items of 20 attributes each.
    n = int(sys.argv[3])
    attrs = " ".join('ovf:x%d="v%d"' % (i, i) for i in range(19))
    items = "".join('<Item ovf:required="false" %s><rasd:InstanceID>%d</rasd:InstanceID>'
                    '<rasd:ResourceType>10</rasd:ResourceType></Item>' % (attrs, i)
                    for i in range(n))
    raw = b"\0" * 65536
    gz = gzip.compress(raw, 6, mtime=0)
    xml = ('<?xml version="1.0" encoding="UTF-8"?>\n<Envelope %s '
           'xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">'
           '<References><File ovf:id="f1" ovf:href="disk1" ovf:compression="gzip"/></References>'
           '<DiskSection><Info>d</Info><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="65536" '
           'ovf:format="raw"/></DiskSection><VirtualSystem ovf:id="vm"><Info>v</Info>'
           '<VirtualHardwareSection><Info>h</Info>%s</VirtualHardwareSection></VirtualSystem>'
           '</Envelope>\n' % (NS, items)).encode()
    tar([("x.ovf", xml), ("disk1", gz)])
elif mode == "wrap":
    wrap(open(sys.argv[3], "rb").read(), sys.argv[4], int(sys.argv[5]))
"#;

fn gen(mode: &str, out: &Path, args: &[&str]) {
    let o = Command::new("python3")
        .args(["-c", GEN, mode])
        .arg(out)
        .args(args)
        .output()
        .expect("python3 must be installed");
    assert!(
        o.status.success(),
        "{mode}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `args`, requiring an exit code of `codes` and at most `max_kib` of peak RSS; returns
/// the standard output.
fn within(args: &[&str], codes: &[i32], max_kib: u64) -> String {
    support::rss::within(args, codes, max_kib, true).stdout
}

/// M2: 256 gzip disks of 8 MiB each were all held in memory at once (2 GB). Now the disks of
/// one archive hold at most 32 MiB in memory, charged to the budget, the rest spooled to
/// sparse files, and disks naming one member share one inflated copy.
#[test]
fn many_gzip_disks_do_not_each_hold_memory() {
    let t = tempfile::tempdir().unwrap();
    let seed = t.path().join("seed.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&seed), "1M"]);
    let shared = t.path().join("shared.ova");
    gen("many-gz", &shared, &["256", "shared", s(&seed)]);
    let distinct = t.path().join("distinct.ova");
    gen("many-gz", &distinct, &["256", "distinct", s(&seed)]);
    for cmd in [&["ova", "check"][..], &["check"], &["ova", "list"]] {
        let mut args = cmd.to_vec();
        args.push(s(&shared));
        within(&args, &[0, 1], 96 << 10);
    }
    // Distinct members: a valid appliance of 256 disks, every one of them checked.
    let out = within(&["ova", "check", s(&distinct)], &[0], 96 << 10);
    assert!(out.contains("pass"), "{out}");
    within(&["check", s(&distinct)], &[0], 96 << 10);
    let x = t.path().join("x");
    within(&["ova", "extract", s(&distinct), s(&x)], &[0, 1], 96 << 10);
}

/// M4: the VMDK check's grain list grew ahead of its charges, to 278 MB before the budget
/// refused it. It is now held in pieces charged before they are allocated (16 bytes an entry,
/// not 24): 8 Mi grains (P = 128) are checked in full, 16 Mi (P = 256) pass the budget and
/// fail cleanly inside it.
#[test]
fn the_vmdk_grain_list_stays_inside_the_budget() {
    let t = tempfile::tempdir().unwrap();
    for (p, limit) in [("128", false), ("256", true)] {
        let ova = t.path().join(format!("grains-{p}.ova"));
        gen("vmdk-grains", &ova, &[p]);
        let out = within(&["check", s(&ova)], &[1], CEILING_KIB);
        assert_eq!(out.contains("size.limit"), limit, "P = {p}: {out}");
        assert!(
            out.contains("vmdk.duplicate-grain") || limit,
            "P = {p}: {out}"
        );
    }
}

/// M5: 63 attributes on each of 50,521 elements of a 16 MiB descriptor took 242 MB and
/// passed. The whole descriptor may now carry 100,000 attributes.
#[test]
fn a_descriptor_of_millions_of_attributes_is_refused_cheaply() {
    let t = tempfile::tempdir().unwrap();
    let ova = t.path().join("attrs.ova");
    gen("attrs", &ova, &[&(16_000_000).to_string()]);
    let out = within(&["ova", "check", s(&ova)], &[1], 96 << 10);
    assert!(
        out.contains("ova.descriptor-malformed") && out.contains("100000 attributes in all"),
        "{out}"
    );
}

/// M6: a 4 MiB LUKS2 JSON area of `[0,0,...]` became a `serde_json::Value` of 105 MB. Only the
/// members glimpse reports are read now, and they still are (a LUKS2 header as cryptsetup
/// writes it is in formats/tests/luks.rs; qemu-img writes LUKS1, read as before).
#[test]
fn a_luks2_json_area_costs_no_more_than_its_text() {
    let t = tempfile::tempdir().unwrap();
    let ova = t.path().join("luks-json.ova");
    gen("luks-json", &ova, &[]);
    let out = within(&["info", "--output", "json", s(&ova)], &[0], 48 << 10);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let data = &v["format-specific"]["data"]["disk-details"];
    assert_eq!(data["cipher"], "aes-xts-plain64", "{out}");
    assert_eq!(data["key-slots"], 1, "{out}");
    assert_eq!(data["hash"], "sha256", "{out}");
    assert_eq!(data["payload-offset"], 8 << 20, "{out}");

    let luks = t.path().join("real.luks");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        "secret,id=s0,data=x",
        "-o",
        "key-secret=s0",
        s(&luks),
        "16M",
    ]);
    let out = within(&["info", "--output", "json", s(&luks)], &[0], 48 << 10);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let details = &v["format-specific"]["data"];
    assert_eq!(details["cipher"], "aes-xts-plain64", "{out}");
    assert_eq!(details["key-slots"], 1, "{out}");
    assert_eq!(details["hash"], "sha256", "{out}");
    assert!(details["payload-offset"].as_u64().is_some(), "{out}");
    // The same volume as the gzip disk of an appliance.
    let wrapped = t.path().join("real-luks.ova");
    let size = std::fs::metadata(&luks).unwrap().len().to_string();
    gen("wrap", &wrapped, &[s(&luks), "raw", &size]);
    within(&["info", s(&wrapped)], &[0], 48 << 10);
}

/// A large descriptor of a real shape (40,000 attributes, more than any real appliance's)
/// still passes under the new caps.
#[test]
fn a_large_real_descriptor_still_passes() {
    let t = tempfile::tempdir().unwrap();
    let ova = t.path().join("items.ova");
    gen("items", &ova, &["2000"]);
    let out = within(&["ova", "check", s(&ova)], &[0], 64 << 10);
    assert!(out.contains("pass"), "{out}");
}
