//! Structural checks of a Parallels image: the format extension's features, and the BAT's
//! entries against the header, the BAT, the extension clusters and each other.

use md5::{Digest, Md5};

use super::header::{
    features, DirtyBitmap, EXT_HEADER_LEN, EXT_MAGIC, FEATURE_DIRTY_BITMAP, HEADER_LEN, SECTOR,
};
use super::{BitmapInfo, ParallelsImage, MAX_REPORTED};
use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::limits::Limits;
use crate::ranges::{overlap_finding, Region};

fn ext_err(msg: String, at: u64) -> Error {
    Error::corrupt(msg).at(at).code("parallels.extension")
}

/// Parses a format extension cluster read at file offset `at`: its magic and MD5 checksum
/// (errors: qemu refuses the image), then each feature. A dirty bitmap is kept; an unknown
/// feature, flags qemu does not support, or a bitmap qemu would refuse are findings.
///
/// # Errors
/// `Corrupt` (`parallels.extension`) for a wrong magic, a wrong checksum, or features that
/// run past the cluster.
pub fn parse_extension(
    cluster: &[u8],
    at: u64,
    disk_sectors: u64,
) -> Result<(Vec<BitmapInfo>, Vec<Finding>)> {
    let magic = cluster
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    if magic != EXT_MAGIC {
        return Err(ext_err(
            format!("format extension magic {magic:#018x} (expected {EXT_MAGIC:#018x})"),
            at,
        ));
    }
    let body = cluster.get(EXT_HEADER_LEN..).unwrap_or_default();
    let sum = Md5::digest(body);
    if cluster.get(8..EXT_HEADER_LEN) != Some(&sum[..]) {
        return Err(ext_err(
            "format extension checksum does not match its cluster".to_string(),
            at.saturating_add(8),
        ));
    }
    let mut bitmaps = Vec::new();
    let mut out = Vec::new();
    for f in features(cluster).map_err(|e| e.at(at))? {
        let fat = at.saturating_add(f.data_at as u64).saturating_sub(24);
        if f.magic != FEATURE_DIRTY_BITMAP {
            out.push(
                Finding::reject(
                    "parallels.unknown-extension",
                    format!(
                        "unknown format extension feature {:#018x} (qemu refuses the image)",
                        f.magic
                    ),
                )
                .at(fat),
            );
            continue;
        }
        if f.flags != 0 {
            out.push(
                Finding::reject(
                    "parallels.extension",
                    format!(
                        "dirty bitmap feature with flags {:#x}, which qemu does not support",
                        f.flags
                    ),
                )
                .at(fat),
            );
        }
        let end = f.data_at.saturating_add(f.data_size as usize);
        let data = cluster.get(f.data_at..end).unwrap_or_default();
        match DirtyBitmap::parse(data) {
            Ok(b) => {
                out.extend(bitmap_findings(&b, disk_sectors, fat));
                bitmaps.push(BitmapInfo {
                    bitmap: b,
                    offset: at.saturating_add(f.data_at as u64),
                });
            }
            Err(e) => out.push(Finding::from_error(&e.at(fat).code("parallels.extension"))),
        }
    }
    Ok((bitmaps, out))
}

fn bitmap_findings(b: &DirtyBitmap, disk_sectors: u64, at: u64) -> Vec<Finding> {
    let mut out = Vec::new();
    if b.size != disk_sectors {
        out.push(
            Finding::reject(
                "parallels.extension",
                format!(
                    "dirty bitmap covers {} sectors; the disk has {disk_sectors}",
                    b.size
                ),
            )
            .at(at),
        );
    }
    let g = u64::from(b.granularity).saturating_mul(SECTOR);
    if !g.is_power_of_two() || g > u64::from(u32::MAX) {
        out.push(
            Finding::reject(
                "parallels.extension",
                format!(
                    "dirty bitmap granularity of {} sectors is not a power of two qemu accepts",
                    b.granularity
                ),
            )
            .at(at),
        );
    }
    out
}

/// The check of [`ParallelsImage`]: clusters inside the header and BAT or the extension,
/// clusters off the data area's grid, two guest clusters on one host cluster, and the
/// extension's clusters overlapping the header, the BAT or each other.
///
/// # Errors
/// `LimitExceeded` when the budget cannot cover the BAT walk.
pub fn check(img: &ParallelsImage, limits: &Limits) -> Result<Vec<Finding>> {
    // Only allocated entries are listed, by BAT index (4 bytes each), so the list is bounded
    // by the file's clusters, not by the virtual size: an empty 12 TiB image, which glimpse
    // writes, checks in no memory, and a full one in as much again as its BAT.
    let allocated = img.bat.iter().filter(|&&e| e != 0).count();
    let _held = limits
        .budget()
        .charge((allocated as u64).saturating_mul(4), "Parallels BAT check")?;
    let mut used: Vec<u32> = Vec::new();
    used.try_reserve_exact(allocated)
        .map_err(|_| Error::limit("Parallels check: cannot allocate"))?;
    let mut out = Vec::new();
    let cs = img.cluster;
    let (mut inside, mut off_grid) = (0usize, 0usize);
    for (i, &e) in img.bat.iter().enumerate() {
        if e == 0 {
            continue;
        }
        let host = img.host_of(e);
        if host.saturating_add(cs) > img.file_size {
            continue; // reported at open
        }
        let at = HEADER_LEN.saturating_add((i as u64).saturating_mul(4));
        // The BAT has at most u32::MAX entries (its count is a 32-bit header field).
        used.push(u32::try_from(i).unwrap_or(u32::MAX));
        if host < img.data_start {
            push_capped(&mut out, &mut inside, || {
                Finding::reject(
                    "parallels.cluster-in-metadata",
                    format!("BAT entry {i} points at {host:#x}, before the data area at {:#x} (inside the header and BAT)", img.data_start),
                )
                .at(at)
            });
        } else if host.saturating_sub(img.data_start).checked_rem(cs) != Some(0) {
            push_capped(&mut out, &mut off_grid, || {
                Finding::warn(
                    "parallels.cluster-misaligned",
                    format!("BAT entry {i} points at {host:#x}, not a whole number of clusters after the data area at {:#x}", img.data_start),
                )
                .at(at)
            });
        }
    }
    summarise(&mut out, "parallels.cluster-in-metadata", inside);
    summarise(&mut out, "parallels.cluster-misaligned", off_grid);
    used.sort_unstable_by_key(|&i| (host_at(img, i), i));
    out.extend(duplicates(img, &used));
    out.extend(metadata_findings(img, &used));
    Ok(out)
}

/// Counts one more finding of a kind in `n`, and adds the one `make` builds while no more than
/// [`MAX_REPORTED`] have been counted ([`summarise`] gives the total past that).
fn push_capped(out: &mut Vec<Finding>, n: &mut usize, make: impl FnOnce() -> Finding) {
    *n = n.saturating_add(1);
    if *n <= MAX_REPORTED {
        out.push(make());
    }
}

fn summarise(out: &mut Vec<Finding>, code: &'static str, n: usize) {
    if n > MAX_REPORTED {
        out.push(Finding::reject(code, format!("{n} BAT entries in all")));
    }
}

/// The host offset of BAT entry `i`.
fn host_at(img: &ParallelsImage, i: u32) -> u64 {
    img.bat.get(i as usize).map_or(0, |&e| img.host_of(e))
}

/// Two guest clusters whose host clusters share bytes (`used`: BAT indices sorted by host
/// offset).
fn duplicates(img: &ParallelsImage, used: &[u32]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut n = 0usize;
    let cs = img.cluster;
    for w in used.windows(2) {
        if let [ia, ib] = w {
            let (a, b) = (host_at(img, *ia), host_at(img, *ib));
            if a.saturating_add(cs) > b {
                push_capped(&mut out, &mut n, || {
                    Finding::reject(
                        "parallels.duplicate-cluster",
                        format!("BAT entries {ia} and {ib} use the same host bytes ({a:#x} and {b:#x}): a write to one guest cluster changes the other"),
                    )
                    .at(HEADER_LEN.saturating_add(u64::from(*ib).saturating_mul(4)))
                });
            }
        }
    }
    if n > MAX_REPORTED {
        out.push(Finding::reject(
            "parallels.duplicate-cluster",
            format!("{n} shared host clusters in all"),
        ));
    }
    out
}

/// The extension cluster and the dirty bitmap clusters: inside the file, clear of the header,
/// the BAT and each other, and of every data cluster.
fn metadata_findings(img: &ParallelsImage, used: &[u32]) -> Vec<Finding> {
    let mut out = Vec::new();
    let cs = img.cluster;
    // The spec holds extension clusters to the rules of data clusters: not below the data
    // offset, so the header's region runs to the data area (or the BAT's end, if later).
    let bat_end = HEADER_LEN.saturating_add((img.bat.len() as u64).saturating_mul(4));
    let head = bat_end.max(img.data_start);
    let mut regions = vec![Region::new("the header and BAT", 0, head)];
    if let Some(ext) = img.ext {
        regions.push(Region::new("the format extension cluster", ext, cs));
    }
    for b in &img.bitmaps {
        for &e in b.bitmap.l1.iter().filter(|&&e| e > 1) {
            let host = e.saturating_mul(SECTOR);
            if host.saturating_add(cs) > img.file_size {
                out.push(
                    Finding::reject(
                        "parallels.extension",
                        format!("a dirty bitmap cluster at {host:#x} passes the end of the file ({} bytes)", img.file_size),
                    )
                    .at(b.offset),
                );
                continue;
            }
            regions.push(Region::new("a dirty bitmap cluster", host, cs));
        }
    }
    for r in regions.iter().skip(1) {
        let first = used.partition_point(|&i| host_at(img, i).saturating_add(cs) <= r.start);
        if let Some((h, i)) = used
            .get(first)
            .map(|&i| (host_at(img, i), i))
            .filter(|&(h, _)| h < r.end())
        {
            out.push(
                Finding::reject(
                    "parallels.cluster-in-metadata",
                    format!(
                        "BAT entry {i} points at {h:#x}, inside {} ({:#x}..{:#x})",
                        r.name,
                        r.start,
                        r.end()
                    ),
                )
                .at(HEADER_LEN.saturating_add(u64::from(i).saturating_mul(4))),
            );
        }
    }
    out.extend(overlap_finding(
        "parallels.metadata-overlap",
        &mut regions,
        "writing one destroys the other",
    ));
    out
}
