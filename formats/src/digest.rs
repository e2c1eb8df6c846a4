//! Digests: file digests in one pass (Glance's `checksum` and `os_hash_value`), and the
//! format-independent content digest (see `docs/content-digest.md`).

use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use rayon::prelude::*;
use sha2::Digest as _;

use crate::error::{Error, Result};
use crate::io::ReadAt;
use crate::reader::{ChunkPlanner, GuestReader};

/// A file digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algo {
    /// MD5: Glance's `checksum`.
    Md5,
    /// SHA-1.
    Sha1,
    /// SHA-256.
    Sha256,
    /// SHA-512: Glance's `os_hash_value` with `os_hash_algo=sha512`.
    Sha512,
}

impl Algo {
    /// Lowercase name (`md5`, `sha512`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Algo::Md5 => "md5",
            Algo::Sha1 => "sha1",
            Algo::Sha256 => "sha256",
            Algo::Sha512 => "sha512",
        }
    }
}

impl std::str::FromStr for Algo {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "md5" => Ok(Algo::Md5),
            "sha1" => Ok(Algo::Sha1),
            "sha256" => Ok(Algo::Sha256),
            "sha512" => Ok(Algo::Sha512),
            _ => Err(format!(
                "unknown digest algorithm {s:?} (md5, sha1, sha256, sha512)"
            )),
        }
    }
}

/// A running digest of any [`Algo`].
pub enum Hasher {
    /// MD5.
    Md5(md5::Md5),
    /// SHA-1.
    Sha1(sha1::Sha1),
    /// SHA-256.
    Sha256(sha2::Sha256),
    /// SHA-512.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A fresh hasher.
    pub fn new(algo: Algo) -> Self {
        match algo {
            Algo::Md5 => Hasher::Md5(md5::Md5::new()),
            Algo::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
    /// Absorbs bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }
    /// The lowercase hex digest.
    pub fn hex(self) -> String {
        match self {
            Hasher::Md5(h) => hex(&h.finalize()),
            Hasher::Sha1(h) => hex(&h.finalize()),
            Hasher::Sha256(h) => hex(&h.finalize()),
            Hasher::Sha512(h) => hex(&h.finalize()),
        }
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(
        String::with_capacity(bytes.len().saturating_mul(2)),
        |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        },
    )
}

/// Read size for file digests.
const FILE_BLOCK: usize = 4 << 20;

/// Computes every algorithm in `algos` over the whole of `src` in one pass: one thread reads,
/// and each algorithm runs on its own thread, so the wall time is that of the slowest
/// algorithm rather than their sum. `progress` is called with bytes read so far.
///
/// # Errors
/// `Io` when the source cannot be read.
pub fn file_digests(
    src: &dyn ReadAt,
    algos: &[Algo],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<(Algo, String)>> {
    let size = src.size()?;
    let mut off = 0u64;
    fan_out(algos, progress, || {
        if off >= size {
            return Ok(None);
        }
        let n =
            usize::try_from(size.saturating_sub(off).min(FILE_BLOCK as u64)).unwrap_or(FILE_BLOCK);
        let mut buf = vec![0u8; n];
        src.read_exact_at(&mut buf, off)
            .map_err(|e| Error::from(e).at(off))?;
        off = off.saturating_add(n as u64);
        Ok(Some(buf))
    })
}

/// As [`file_digests`] for a stream (a pipe, stdin) read once to its end: no size is known
/// beforehand, and nothing seeks. Returns the byte count with the digests.
///
/// # Errors
/// `Io` when the stream cannot be read.
pub fn stream_digests(
    src: &mut dyn std::io::Read,
    algos: &[Algo],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(u64, Vec<(Algo, String)>)> {
    let mut total = 0u64;
    let digests = fan_out(algos, progress, || {
        let mut buf = vec![0u8; FILE_BLOCK];
        let mut filled = 0;
        while filled < buf.len() {
            match src.read(buf.get_mut(filled..).unwrap_or_default()) {
                Ok(0) => break,
                Ok(n) => filled = filled.saturating_add(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::from(e).at(total)),
            }
        }
        buf.truncate(filled);
        total = total.saturating_add(filled as u64);
        Ok((filled > 0).then_some(buf))
    })?;
    Ok((total, digests))
}

/// Feeds every block `next` returns (until `None`) to one hasher thread per algorithm.
fn fan_out(
    algos: &[Algo],
    progress: &(dyn Fn(u64) + Sync),
    mut next: impl FnMut() -> Result<Option<Vec<u8>>>,
) -> Result<Vec<(Algo, String)>> {
    std::thread::scope(|s| -> Result<Vec<(Algo, String)>> {
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for &algo in algos {
            let (tx, rx) = sync_channel::<Arc<Vec<u8>>>(4);
            senders.push(tx);
            handles.push(s.spawn(move || {
                let mut h = Hasher::new(algo);
                for block in rx {
                    h.update(&block);
                }
                (algo, h.hex())
            }));
        }
        let mut done = 0u64;
        let result = loop {
            match next() {
                Ok(Some(buf)) => {
                    done = done.saturating_add(buf.len() as u64);
                    let block = Arc::new(buf);
                    for tx in &senders {
                        let _ = tx.send(block.clone());
                    }
                    progress(done);
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        drop(senders);
        let out: Vec<(Algo, String)> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
        result.map(|()| out)
    })
}

/// Block size of the content digest.
pub const CONTENT_BLOCK: u64 = 64 * 1024;
/// Domain-separation prefix of the content digest (version 1).
pub const CONTENT_PREFIX: &[u8] = b"glimpse-content-v1\0";

/// Sector that the content digest rounds the virtual size up to.
pub const CONTENT_SECTOR: u64 = 512;

/// The size the content digest states: the virtual size rounded up to a 512-byte sector.
/// qemu-img rounds every image it creates up to a sector (a 440-byte raw becomes a 512-byte
/// qcow2), so a sub-sector tail of zeros is not a different disk.
pub fn digest_size(size: u64) -> u64 {
    size.div_ceil(CONTENT_SECTOR).saturating_mul(CONTENT_SECTOR)
}

/// Computes the content digest of the guest disk: the same for the same guest bytes in every
/// format and compression. The construction is specified in `docs/content-digest.md`:
///
/// `SHA-256(prefix ‖ le64(virtual size rounded up to 512) ‖ le64(block size) ‖ records)`, where the disk is cut
/// into 64 KiB blocks (the last padded with zeros), every maximal run of `k` all-zero blocks is
/// the record `0x00 ‖ le64(k)`, and every other block is `0x01 ‖ SHA-256(block)`.
///
/// Blocks that the mapping says are zero or unallocated are never read; the others are read
/// and hashed in parallel.
///
/// # Errors
/// Read or decompression errors.
pub fn content_digest(
    reader: &GuestReader,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<String> {
    let image = reader.image().clone();
    let size = image.info().virtual_size;
    let mut outer = sha2::Sha256::new();
    outer.update(CONTENT_PREFIX);
    outer.update(digest_size(size).to_le_bytes());
    outer.update(CONTENT_BLOCK.to_le_bytes());
    let mut zero_run = 0u64;
    let mut planner = ChunkPlanner::new(image.as_ref(), CONTENT_BLOCK);
    const BATCH: usize = 512; // 32 MiB of blocks per parallel batch
                              // Per batch: the blocks to read, and the record order as runs of zero blocks and indices
                              // into the batch. Zero runs are folded as they come, so a 1 TiB empty disk holds one item.
    enum Item {
        Zeros(u64),
        Block(usize),
    }
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        let mut items: Vec<Item> = Vec::new();
        let mut last_end = 0;
        for plan in planner.by_ref() {
            let plan = plan?;
            last_end = plan.guest.saturating_add(plan.len);
            if plan.read {
                items.push(Item::Block(batch.len()));
                batch.push(plan);
                if batch.len() == BATCH {
                    break;
                }
            } else {
                // A zero span of whole blocks (and perhaps the short last one): one addition
                // however long it is.
                let blocks = plan.len.div_ceil(CONTENT_BLOCK);
                if let Some(Item::Zeros(k)) = items.last_mut() {
                    *k = k.saturating_add(blocks);
                } else {
                    items.push(Item::Zeros(blocks));
                }
            }
        }
        if items.is_empty() {
            break;
        }
        let digests: Vec<Option<[u8; 32]>> = batch
            .par_iter()
            .map(|p| -> Result<Option<[u8; 32]>> {
                let mut buf = vec![0u8; CONTENT_BLOCK as usize];
                let len = usize::try_from(p.len).map_err(|_| Error::limit("block too large"))?;
                reader.read_at(buf.get_mut(..len).unwrap_or_default(), p.guest)?;
                if buf.iter().all(|&b| b == 0) {
                    return Ok(None);
                }
                Ok(Some(sha2::Sha256::digest(&buf).into()))
            })
            .collect::<Result<_>>()?;
        for item in items {
            match item {
                Item::Zeros(k) => zero_run = zero_run.saturating_add(k),
                Item::Block(i) => match digests.get(i).copied().flatten() {
                    None => zero_run = zero_run.saturating_add(1),
                    Some(d) => {
                        if zero_run > 0 {
                            outer.update([0u8]);
                            outer.update(zero_run.to_le_bytes());
                            zero_run = 0;
                        }
                        outer.update([1u8]);
                        outer.update(d);
                    }
                },
            }
        }
        progress(last_end, size);
    }
    if zero_run > 0 {
        outer.update([0u8]);
        outer.update(zero_run.to_le_bytes());
    }
    progress(size, size);
    Ok(hex(&outer.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{open, Format, Limits, Source};

    fn digest_of(data: Vec<u8>) -> String {
        let src: Source = Arc::new(data);
        let img = open(src, Format::Raw, &Limits::default()).unwrap();
        let r = GuestReader::new(Arc::from(img), &Limits::default());
        content_digest(&r, &|_, _| {}).unwrap()
    }

    #[test]
    fn content_digest_matches_the_documented_construction() {
        // 3 blocks: zero, data, zero (partial): records 00‖1, 01‖H(b1), 00‖1.
        let mut data = vec![0u8; 2 * 65536 + 100];
        data[65536] = 5;
        let mut b1 = vec![0u8; 65536];
        b1[0] = 5;
        let mut h = sha2::Sha256::new();
        h.update(CONTENT_PREFIX);
        // The size is rounded up to a 512-byte sector.
        h.update((2 * 65536 + 512u64).to_le_bytes());
        h.update(65536u64.to_le_bytes());
        h.update([0u8]);
        h.update(1u64.to_le_bytes());
        h.update([1u8]);
        h.update(sha2::Sha256::digest(&b1));
        h.update([0u8]);
        h.update(1u64.to_le_bytes());
        assert_eq!(digest_of(data), hex(&h.finalize()));
    }

    #[test]
    fn a_sub_sector_tail_is_rounded_up_to_a_sector() {
        // qemu-img rounds a 440-byte raw up to a 512-byte qcow2: the same disk.
        let mut data = vec![0u8; 440];
        data[3] = 9;
        let mut padded = data.clone();
        padded.resize(512, 0);
        assert_eq!(digest_of(data.clone()), digest_of(padded.clone()));
        padded.resize(1024, 0);
        assert_ne!(digest_of(data), digest_of(padded));
        assert_eq!(digest_size(0), 0);
        assert_eq!(digest_size(1), 512);
        assert_eq!(digest_size(u64::MAX), u64::MAX);
    }

    /// An empty disk whose mapping ends every extent at a 512 MiB boundary, like qcow2's.
    struct Empty(crate::image::ImageInfo, Source);
    impl crate::image::Image for Empty {
        fn core(&self) -> crate::ImageCore<'_> {
            crate::ImageCore {
                info: &self.0,
                findings: &[],
                source: &self.1,
            }
        }
        fn extent_at(&self, guest: u64, span: u64) -> Result<crate::image::Extent> {
            Ok(crate::image::Extent {
                start: guest,
                len: span.min((512 << 20) - guest % (512 << 20)),
                kind: crate::image::ExtentKind::Unallocated,
            })
        }
    }

    #[test]
    fn an_empty_disk_costs_one_step_per_extent_not_per_block() {
        // 1 TiB + 100 bytes: 2049 extents, 16 million blocks.
        let size = (1u64 << 40) + 100;
        let img = Empty(
            crate::image::ImageInfo::new(Format::Qcow2, size),
            Arc::new(Vec::new()),
        );
        let r = GuestReader::new(Arc::new(img), &Limits::default());
        let t = std::time::Instant::now();
        let got = content_digest(&r, &|_, _| {}).unwrap();
        assert!(t.elapsed().as_secs() < 10);
        let mut h = sha2::Sha256::new();
        h.update(CONTENT_PREFIX);
        h.update(((1u64 << 40) + 512).to_le_bytes());
        h.update(65536u64.to_le_bytes());
        h.update([0u8]);
        h.update(((1u64 << 40) / 65536 + 1).to_le_bytes());
        assert_eq!(got, hex(&h.finalize()));
    }

    #[test]
    fn file_digests_are_the_usual_ones() {
        let data = b"hello world\n".to_vec();
        let d = file_digests(&data, &[Algo::Md5, Algo::Sha512], &|_| {}).unwrap();
        assert_eq!(
            d[0],
            (Algo::Md5, "6f5902ac237024bdd0c176cb93063dc4".to_string())
        );
        assert!(d[1].1.starts_with("db3974a97f2407b7"));
    }

    #[test]
    fn stream_digests_equal_file_digests_across_blocks() {
        let data: Vec<u8> = (0..FILE_BLOCK + 12345).map(|i| (i % 251) as u8).collect();
        let algos = [Algo::Md5, Algo::Sha512];
        let want = file_digests(&data, &algos, &|_| {}).unwrap();
        let (n, got) = stream_digests(&mut data.as_slice(), &algos, &|_| {}).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(got, want);
        let (n, empty) = stream_digests(&mut std::io::empty(), &[Algo::Md5], &|_| {}).unwrap();
        assert_eq!(n, 0);
        assert_eq!(empty[0].1, "d41d8cd98f00b204e9800998ecf8427e");
    }
}
