//! The LUKS header of a qcow2 encrypted with crypt_method 2: where qemu looks for it and what
//! it must find there before it opens the image at all (block/qcow2.c, `qcow2_read_extensions`
//! and `qcow2_do_open`; crypto/block-luks.c). glimpse never decrypts anything: it checks only
//! that the header qemu will parse is there, so that an image qemu cannot open does not pass.

use std::sync::Arc;

use crate::finding::Finding;
use crate::io::{read_up_to, Source, Window};
use crate::limits::Limits;

use super::header::{Extensions, Header};

/// crypt_method 2: LUKS, its header in the clusters the encryption header extension names.
const CRYPT_LUKS: u32 = 2;

/// The only LUKS version qemu reads (crypto/block-luks.c: "LUKS version %u is not supported").
const LUKS_VERSION: [u8; 2] = [0, 1];

fn refused(message: String, at: u64) -> Finding {
    Finding::reject("qcow2.encryption-header", message).at(at)
}

/// Findings for the encryption header extension and the LUKS header it points at. A header
/// that lies past the end of the file is left to the structural check, which reports it
/// (`table.out-of-bounds`).
pub(super) fn findings(
    src: &Source,
    h: &Header,
    ext: &Extensions,
    limits: &Limits,
    out: &mut Vec<Finding>,
) {
    let luks = h.crypt_method == CRYPT_LUKS;
    let (off, len) = match (ext.crypto, luks) {
        (None, false) => return,
        (Some(_), false) => {
            out.push(refused(
                format!(
                    "an encryption header extension, but crypt_method {} is not LUKS: qemu \
                     refuses to open the image",
                    h.crypt_method
                ),
                32,
            ));
            return;
        }
        (None, true) => {
            out.push(refused(
                "LUKS encryption (crypt_method 2) without its encryption header extension: \
                 qemu refuses to open the image"
                    .into(),
                32,
            ));
            return;
        }
        (Some(r), true) => r,
    };
    if off.checked_rem(h.cluster_size()) != Some(0) {
        out.push(refused(
            format!(
                "the encryption header at {off:#x} does not start on a cluster boundary: qemu \
                 refuses to open the image"
            ),
            off,
        ));
        return;
    }
    let Ok(window) = Window::new(Arc::clone(src), off, len) else {
        return;
    };
    let window: Source = Arc::new(window);
    let head = match read_up_to(window.as_ref(), 0, 8) {
        Ok(v) => v,
        Err(e) => {
            out.push(refused(
                format!("the encryption header cannot be read: {}", e.message()),
                off,
            ));
            return;
        }
    };
    if head.get(..6) != Some(&crate::luks::MAGIC[..]) {
        out.push(refused(
            "the encryption header has no LUKS magic: qemu refuses to open the image".into(),
            off,
        ));
        return;
    }
    if head.get(6..8) != Some(&LUKS_VERSION[..]) {
        out.push(refused(
            "the encryption header is not LUKS version 1, the only one qemu opens".into(),
            off.saturating_add(6),
        ));
        return;
    }
    // The rest of the 592-byte header, and the key material's end (the payload offset)
    // within the extension's length: qemu reads the key slots through the extension only.
    if let Err(e) = crate::luks::open(window, limits) {
        out.push(refused(
            format!(
                "the encryption header is not a LUKS header qemu opens: {}",
                e.message()
            ),
            off.saturating_add(e.offset().unwrap_or(0)),
        ));
    }
}
