//! An empty (0-byte) disk through every writer: the input the `convert_roundtrip` fuzz target
//! found on its first seed (layout bytes `00 00 00`). Every writer either writes an image that
//! qemu-img and our reader both read as a 0-byte disk, or refuses with `Invalid` before writing
//! anything where qemu could not open the result: sparse VMDK (capacity 0 means "descriptor
//! elsewhere" to qemu) and fixed VHD (a bare footer at offset 0, which qemu takes for the head
//! copy of a dynamic disk). qemu-img itself fails on both conversions.

mod support;

use std::fs::File;
use std::sync::Arc;

use glimpse_convert::pipeline::{convert, ConvertOptions};
use glimpse_convert::{create, Target, WriteOptions, WRITER_VARIANTS};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{open, ErrorKind, Format, Image, Limits, Source};
use support::qemu_virtual_size;

#[test]
fn an_empty_disk_through_every_writer() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("empty.raw");
    File::create(&raw).unwrap();
    let limits = Limits::tight();
    let src: Source = Arc::new(File::open(&raw).unwrap());
    let source: Arc<dyn Image> = Arc::from(open(src, Format::Raw, &limits).unwrap());
    assert_eq!(source.info().virtual_size, 0);

    for (i, &(format, opts, compress)) in WRITER_VARIANTS.iter().enumerate() {
        let out = dir.path().join(format!("out{i}.{format}"));
        let wopts = WriteOptions::parse(opts, compress).unwrap();
        let target = Target::File(File::create(&out).unwrap());
        let writer = match create(format, &wopts, target, 0) {
            Ok(w) => w,
            Err(e) => {
                let refusable =
                    format == Format::Vmdk || (format == Format::Vhd && opts.contains("fixed"));
                assert!(
                    refusable && e.kind() == ErrorKind::Invalid,
                    "{format} ({opts}) refused an empty disk: {e}"
                );
                assert_eq!(
                    std::fs::metadata(&out).unwrap().len(),
                    0,
                    "{format} ({opts}) wrote bytes before refusing"
                );
                continue;
            }
        };
        let reader = GuestReader::new(source.clone(), &limits);
        convert(source.clone(), writer, &reader, &ConvertOptions::default())
            .unwrap_or_else(|e| panic!("convert to {format} ({opts}): {e}"));

        let written = open(Arc::new(File::open(&out).unwrap()), format, &limits)
            .unwrap_or_else(|e| panic!("open the {format} ({opts}) output: {e}"));
        assert_eq!(written.info().virtual_size, 0, "{format} ({opts})");
        assert_eq!(qemu_virtual_size(&out, format), 0, "{format} ({opts})");
    }
}
