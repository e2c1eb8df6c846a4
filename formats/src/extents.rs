//! Walking a guest range extent by extent, on top of the one `mapping` entry point.
//!
//! [`Extents`] yields what `mapping` says, in order, each extent starting where the last
//! ended. [`Merged`] joins neighbours of the same kind into [`Run`]s, as `glimpse map` prints
//! them (and as `qemu-img map` does): formats cut their extents at table boundaries that say
//! nothing about the guest data.
//!
//! [`Holes`] looks under data extents: a stored range whose bytes lie in a hole of the source
//! file (a preallocated qcow2, a static VDI, a fixed VHD, all made sparse) reads as zeros
//! without being read, and comes out as a [`RunKind::Hole`], as qemu's block status asks the
//! file underneath (`SEEK_DATA`/`SEEK_HOLE`) and calls such ranges zero. The content walk
//! ([`Extents::content`]) and the chunk planner cut their data extents the same way
//! ([`HoleSplit`]), so the content readers never read a hole.

use crate::error::{Error, Result};
use crate::image::{Extent, ExtentKind, Image};
use crate::io::LinearMap;

/// The extents backing guest bytes `start..end`, in order. Each one starts where the last
/// ended; together they cover the range exactly, unless `mapping` fails: then the error is
/// the last item.
///
/// # Security
/// One `mapping` call per item, and every extent is at least one byte long, so the walk ends.
/// A hostile image can still cut its mapping into many short extents: bound the walk (for
/// example with [`Iterator::take`]) where that matters.
pub struct Extents<'a> {
    image: &'a dyn Image,
    pos: u64,
    end: u64,
    /// Asks `content_mapping`, which may join zero and unallocated bytes, and cuts data
    /// extents at the holes of the source file (the parts in holes are zero).
    content: Option<HoleSplit>,
}

impl<'a> Extents<'a> {
    /// The extents of guest bytes `start..end` of `image` (`end` is cut to the virtual size).
    pub fn new(image: &'a dyn Image, start: u64, end: u64) -> Self {
        Extents {
            image,
            pos: start,
            end: end.min(image.info().virtual_size),
            content: None,
        }
    }

    /// As [`Extents::new`], for a reader of guest content only: through
    /// [`content_mapping`](crate::image::Image::content_extent_at), so a run that reads as zeros
    /// may join marked-zero and unallocated bytes (and be reported as either), and with the
    /// stored data that lies in holes of the source file as zero extents ([`HoleSplit`]): a
    /// sparse fixed VHD or static VDI of 2 TiB is not read through its holes.
    pub fn content(image: &'a dyn Image, start: u64, end: u64) -> Self {
        Extents {
            content: Some(HoleSplit::default()),
            ..Extents::new(image, start, end)
        }
    }

    /// The extents of the whole guest disk.
    pub fn all(image: &'a dyn Image) -> Self {
        Extents::new(image, 0, u64::MAX)
    }

    /// Where the next extent starts (the end of the range once the walk is over).
    pub fn next_start(&self) -> u64 {
        self.pos
    }
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Result<Extent>> {
        let left = self.end.checked_sub(self.pos).filter(|n| *n > 0)?;
        let image = self.image;
        let e = match &mut self.content {
            Some(split) => image
                .content_mapping(self.pos, left)
                .and_then(|e| split.content(image.source(), &e)),
            None => image.mapping(self.pos, left),
        };
        match e {
            Ok(e) => {
                self.pos = e.end();
                Some(Ok(e))
            }
            Err(err) => {
                self.pos = self.end;
                Some(Err(err))
            }
        }
    }
}

/// What backs a [`Run`]: an extent's kind without what differs from one unit to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Stored uncompressed, linearly from `host` in the source.
    Data {
        /// Source offset of the run's first guest byte.
        host: u64,
    },
    /// Compressed units (any number, wherever they are stored).
    Compressed,
    /// Reads as zeros, explicitly marked so.
    Zero,
    /// Not allocated in this image; reads as zeros.
    Unallocated,
    /// Stored linearly from `host` like [`RunKind::Data`], but the host range is a hole of
    /// the source file, so it reads as zeros (only [`Holes`] yields it).
    Hole {
        /// Source offset of the run's first guest byte.
        host: u64,
    },
}

impl RunKind {
    /// True when the run reads as zeros without reading anything: zero, unallocated, or a
    /// hole of the source file.
    pub fn reads_as_zero(&self) -> bool {
        matches!(
            self,
            RunKind::Zero | RunKind::Unallocated | RunKind::Hole { .. }
        )
    }
}

impl From<ExtentKind> for RunKind {
    fn from(k: ExtentKind) -> Self {
        match k {
            ExtentKind::Data { host } => RunKind::Data { host },
            ExtentKind::Compressed { .. } => RunKind::Compressed,
            ExtentKind::Zero => RunKind::Zero,
            ExtentKind::Unallocated => RunKind::Unallocated,
        }
    }
}

/// Neighbouring extents of the same kind, joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
    /// What backs it.
    pub kind: RunKind,
}

impl Run {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    /// Joins `next` onto the end of this run when it continues it: it starts where this run
    /// ends, has the same kind, and for data, is stored right after it. Returns whether it
    /// did.
    pub fn join(&mut self, next: &Run) -> bool {
        let follows = self.start.checked_add(self.len) == Some(next.start);
        let continues = match (self.kind, next.kind) {
            (RunKind::Data { host: a }, RunKind::Data { host: b })
            | (RunKind::Hole { host: a }, RunKind::Hole { host: b }) => {
                a.checked_add(self.len) == Some(b)
            }
            (a, b) => a == b,
        };
        match self.len.checked_add(next.len) {
            Some(len) if follows && continues => {
                self.len = len;
                true
            }
            _ => false,
        }
    }
}

impl From<&Extent> for Run {
    fn from(e: &Extent) -> Self {
        Run {
            start: e.start,
            len: e.len,
            kind: e.kind.into(),
        }
    }
}

impl From<Extent> for Run {
    fn from(e: Extent) -> Self {
        Run::from(&e)
    }
}

/// Cuts data extents where their host range enters or leaves a hole of the source file: the
/// one hole finder of every walk that looks under stored data ([`Holes`] for `map` and
/// `compare -s`; [`Extents::content`] and the chunk planner for the content readers and
/// `measure`). The holes
/// are found as raw finds them ([`LinearMap`]: `SEEK_DATA`/`SEEK_HOLE`, the last few host
/// runs remembered), so a data extent inside a host run already seen costs no system call.
#[derive(Default)]
pub(crate) struct HoleSplit {
    map: LinearMap,
    /// The source's size, asked once, at the first data extent.
    size: Option<u64>,
}

impl HoleSplit {
    /// The first piece of `e`, and whether it lies in a hole: all of `e` (not in a hole)
    /// unless it is data that ends inside `src`, else the part up to where its host range
    /// enters or leaves a hole. A data extent past the end of the source is left whole:
    /// reading it fails, as it should.
    ///
    /// # Errors
    /// `Io` from the size and hole queries.
    pub(crate) fn piece(&mut self, src: &crate::io::Source, e: &Extent) -> Result<(Extent, bool)> {
        let ExtentKind::Data { host } = e.kind else {
            return Ok((*e, false));
        };
        let size = match self.size {
            Some(n) => n,
            None => *self.size.insert(src.size()?),
        };
        let Some(end) = host.checked_add(e.len).filter(|end| *end <= size) else {
            return Ok((*e, false));
        };
        let h = self.map.extent(src.as_ref(), host, end, size)?;
        let piece = Extent {
            len: h.len.clamp(1, e.len),
            ..*e
        };
        Ok((piece, !matches!(h.kind, ExtentKind::Data { .. })))
    }

    /// [`HoleSplit::piece`] for a reader of guest content: the piece in a hole is zero.
    ///
    /// # Errors
    /// As [`HoleSplit::piece`].
    pub(crate) fn content(&mut self, src: &crate::io::Source, e: &Extent) -> Result<Extent> {
        let (piece, hole) = self.piece(src, e)?;
        Ok(match hole {
            true => Extent {
                kind: ExtentKind::Zero,
                ..piece
            },
            false => piece,
        })
    }
}

/// The extents of a walk as [`Run`]s, with every data extent cut where its host range enters
/// or leaves a hole of the source file: the parts in a hole come out as [`RunKind::Hole`].
/// The holes are found as raw finds them ([`LinearMap`], `SEEK_DATA`/`SEEK_HOLE`, the last
/// few host runs remembered), so a data run inside one host run costs no system call. Sources
/// that know no holes (a network, a decrypting layer) say everything is data: their runs are
/// unchanged. A data extent that passes the end of the source is left as it is (reading it
/// fails, as it should).
///
/// # Security
/// Each item is one extent of `inner` or a piece of one that starts where the last ended and
/// is at least one byte long: the walk ends after at most as many steps as the host runs it
/// crosses, and keeps no more state than [`LinearMap`]'s few runs.
pub struct Holes<'a, I> {
    inner: I,
    src: &'a crate::io::Source,
    split: HoleSplit,
    /// The rest of a data extent not yet yielded.
    rest: Option<Extent>,
    /// Set after an error: the walk is over.
    done: bool,
    /// False: data extents pass unchanged (see [`Holes::looking`]).
    look: bool,
}

impl<'a, I: Iterator<Item = Result<Extent>>> Holes<'a, I> {
    /// Splits the extents `inner` yields, which map into `image`'s source.
    pub fn new(image: &'a dyn Image, inner: I) -> Self {
        Holes {
            inner,
            src: image.source(),
            split: HoleSplit::default(),
            rest: None,
            done: false,
            look: true,
        }
    }

    /// Whether to look for holes at all: with `false` every extent passes as its [`Run`]
    /// (`glimpse map` does not look where qemu's driver does not, so that its fields agree).
    pub fn looking(mut self, look: bool) -> Self {
        self.look = look;
        self
    }

    /// The first piece of `e`: all of it unless it is data inside the source, else the part
    /// up to where the host range enters or leaves a hole; the remainder is kept in `rest`.
    fn piece(&mut self, e: Extent) -> Result<Run> {
        let ExtentKind::Data { host } = e.kind else {
            return Ok(Run::from(&e));
        };
        if !self.look {
            return Ok(Run::from(&e));
        }
        let (piece, hole) = self.split.piece(self.src, &e)?;
        let len = piece.len;
        if let (Some(rest_len), Some(start), Some(h2)) = (
            e.len.checked_sub(len).filter(|n| *n > 0),
            e.start.checked_add(len),
            host.checked_add(len),
        ) {
            self.rest = Some(Extent {
                start,
                len: rest_len,
                kind: ExtentKind::Data { host: h2 },
            });
        }
        let kind = match hole {
            false => RunKind::Data { host },
            true => RunKind::Hole { host },
        };
        Ok(Run {
            start: e.start,
            len,
            kind,
        })
    }
}

impl<I: Iterator<Item = Result<Extent>>> Iterator for Holes<'_, I> {
    type Item = Result<Run>;

    fn next(&mut self) -> Option<Result<Run>> {
        if self.done {
            return None;
        }
        let e = match self.rest.take() {
            Some(e) => Ok(e),
            None => self.inner.next()?,
        };
        let r = e.and_then(|e| self.piece(e));
        // Nothing more after an error, as for `Extents`.
        self.done = r.is_err();
        Some(r)
    }
}

/// The [`Run`]s of an extent walk: every maximal sequence of neighbouring extents of the same
/// kind (data stored contiguously) joined into one. An error from the walk comes after the
/// run in progress and ends the iteration.
pub struct Merged<I> {
    inner: I,
    pending: Option<Run>,
    failed: Option<Error>,
}

impl<T: Into<Run>, I: Iterator<Item = Result<T>>> Merged<I> {
    /// Merges the extents (or runs) `inner` yields.
    pub fn new(inner: I) -> Self {
        Merged {
            inner,
            pending: None,
            failed: None,
        }
    }
}

impl<'a> Merged<Extents<'a>> {
    /// The runs of the whole guest disk of `image`.
    pub fn all(image: &'a dyn Image) -> Self {
        Merged::new(Extents::all(image))
    }
}

impl<'a> Merged<Holes<'a, Extents<'a>>> {
    /// The runs of the whole guest disk of `image`, with the data that lies in holes of its
    /// source file as [`RunKind::Hole`] when `look` ([`Holes`]): what `glimpse map` prints.
    pub fn all_with_holes(image: &'a dyn Image, look: bool) -> Self {
        Merged::new(Holes::new(image, Extents::all(image)).looking(look))
    }
}

impl<T: Into<Run>, I: Iterator<Item = Result<T>>> Iterator for Merged<I> {
    type Item = Result<Run>;

    fn next(&mut self) -> Option<Result<Run>> {
        if let Some(err) = self.failed.take() {
            return Some(Err(err));
        }
        loop {
            match self.inner.next() {
                None => return self.pending.take().map(Ok),
                Some(Err(err)) => match self.pending.take() {
                    Some(run) => {
                        self.failed = Some(err);
                        return Some(Ok(run));
                    }
                    None => return Some(Err(err)),
                },
                Some(Ok(e)) => {
                    let run: Run = e.into();
                    if let Some(p) = self.pending.as_mut() {
                        if p.join(&run) {
                            continue;
                        }
                    }
                    if let Some(done) = self.pending.replace(run) {
                        return Some(Ok(done));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Codec, ImageCore, ImageInfo};
    use crate::{Finding, Format, Source};
    use std::sync::Arc;

    /// An image whose mapping is a fixed list of extents, cut to what is asked.
    struct Listed {
        info: ImageInfo,
        src: Source,
        extents: Vec<(u64, ExtentKind)>,
        fail_at: Option<u64>,
    }

    impl Image for Listed {
        fn core(&self) -> ImageCore<'_> {
            ImageCore::new(&self.info, &[] as &[Finding], &self.src)
        }
        fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
            if self.fail_at == Some(guest) {
                return Err(Error::corrupt("broken table"));
            }
            let mut start = 0;
            for &(len, kind) in &self.extents {
                if guest < start + len {
                    let skip = guest - start;
                    let kind = match kind {
                        ExtentKind::Data { host } => ExtentKind::Data { host: host + skip },
                        ExtentKind::Compressed {
                            codec,
                            host,
                            stored_len,
                            unit_size,
                            skip: s,
                        } => ExtentKind::Compressed {
                            codec,
                            host,
                            stored_len,
                            unit_size,
                            skip: s + skip,
                        },
                        k => k,
                    };
                    return Ok(Extent {
                        start: guest,
                        len: (start + len - guest).min(span),
                        kind,
                    });
                }
                start += len;
            }
            Err(Error::invalid("past the list"))
        }
    }

    fn listed(extents: Vec<(u64, ExtentKind)>, fail_at: Option<u64>) -> Listed {
        let size = extents.iter().map(|(l, _)| l).sum();
        Listed {
            info: ImageInfo::new(Format::Raw, size),
            src: Arc::new(vec![0u8; 1 << 16]),
            extents,
            fail_at,
        }
    }

    fn compressed(host: u64) -> ExtentKind {
        ExtentKind::Compressed {
            codec: Codec::Deflate,
            host,
            stored_len: 512,
            unit_size: 4096,
            skip: 0,
        }
    }

    fn run(start: u64, len: u64, kind: RunKind) -> Run {
        Run { start, len, kind }
    }

    #[test]
    fn extents_cover_a_range_in_order() {
        let img = listed(
            vec![
                (100, ExtentKind::Data { host: 0 }),
                (50, ExtentKind::Zero),
                (10, ExtentKind::Unallocated),
            ],
            None,
        );
        let img: &dyn Image = &img;
        let got: Vec<Extent> = Extents::new(img, 40, 155).collect::<Result<_>>().unwrap();
        assert_eq!(
            got,
            vec![
                Extent {
                    start: 40,
                    len: 60,
                    kind: ExtentKind::Data { host: 40 }
                },
                Extent {
                    start: 100,
                    len: 50,
                    kind: ExtentKind::Zero
                },
                Extent {
                    start: 150,
                    len: 5,
                    kind: ExtentKind::Unallocated
                },
            ]
        );
        // The end is cut to the virtual size; an empty range yields nothing.
        assert_eq!(Extents::new(img, 150, u64::MAX).count(), 1);
        assert_eq!(Extents::new(img, 160, u64::MAX).count(), 0);
        assert_eq!(Extents::new(img, 50, 50).count(), 0);
        assert_eq!(Extents::all(img).count(), 3);
    }

    #[test]
    fn an_error_ends_the_walk() {
        let img = listed(
            vec![(100, ExtentKind::Zero), (100, ExtentKind::Zero)],
            Some(100),
        );
        let mut it = Extents::all(&img);
        assert!(it.next().unwrap().is_ok());
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
        assert_eq!(it.next_start(), 200);
    }

    #[test]
    fn merged_joins_neighbours_of_one_kind() {
        let img = listed(
            vec![
                (10, ExtentKind::Data { host: 1000 }),
                (10, ExtentKind::Data { host: 1010 }), // stored right after: joined
                (10, ExtentKind::Data { host: 5000 }), // elsewhere: a new run
                (10, ExtentKind::Zero),
                (10, ExtentKind::Zero),
                (10, ExtentKind::Unallocated), // reads as zero too, but another kind
                (10, compressed(100)),
                (10, compressed(9000)), // compressed units join wherever they are
                (10, ExtentKind::Unallocated),
            ],
            None,
        );
        let got: Vec<Run> = Merged::all(&img).collect::<Result<_>>().unwrap();
        assert_eq!(
            got,
            vec![
                run(0, 20, RunKind::Data { host: 1000 }),
                run(20, 10, RunKind::Data { host: 5000 }),
                run(30, 20, RunKind::Zero),
                run(50, 10, RunKind::Unallocated),
                run(60, 20, RunKind::Compressed),
                run(80, 10, RunKind::Unallocated),
            ]
        );
    }

    #[test]
    fn merged_yields_the_run_in_progress_then_the_error() {
        let img = listed(
            vec![
                (10, ExtentKind::Zero),
                (10, ExtentKind::Zero),
                (10, ExtentKind::Zero),
            ],
            Some(20),
        );
        let mut it = Merged::all(&img);
        assert_eq!(it.next().unwrap().unwrap(), run(0, 20, RunKind::Zero));
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
        let img = listed(vec![(10, ExtentKind::Zero)], Some(0));
        let mut it = Merged::all(&img);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
    }

    /// Data extents are cut where their host range enters or leaves a hole of the file;
    /// holes come out as `Hole`, data that passes the end of the file stays data, and with
    /// `looking(false)` nothing is cut.
    #[test]
    fn holes_of_the_source_file_read_as_zero() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("glimpse-holes-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 4096], 65536).unwrap();
        f.flush().unwrap();
        let src: Source = Arc::new(std::fs::File::open(&path).unwrap());
        let _ = std::fs::remove_file(&path);
        let img = Listed {
            info: ImageInfo::new(Format::Raw, 3 << 20),
            src,
            extents: vec![
                (1 << 20, ExtentKind::Data { host: 0 }),
                (1 << 20, ExtentKind::Zero),
                (1 << 20, ExtentKind::Data { host: 1 << 19 }), // passes the file's end
            ],
            fail_at: None,
        };
        let img: &dyn Image = &img;
        let got: Vec<Run> = Merged::new(Holes::new(img, Extents::all(img)))
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(
            got,
            vec![
                run(0, 65536, RunKind::Hole { host: 0 }),
                run(65536, 4096, RunKind::Data { host: 65536 }),
                run(69632, (1 << 20) - 69632, RunKind::Hole { host: 69632 }),
                run(1 << 20, 1 << 20, RunKind::Zero),
                run(2 << 20, 1 << 20, RunKind::Data { host: 1 << 19 }),
            ]
        );
        assert!(got[0].kind.reads_as_zero() && !got[1].kind.reads_as_zero());
        let plain: Vec<Run> = Merged::all_with_holes(img, false)
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(plain.len(), 3);
        assert_eq!(plain[0], run(0, 1 << 20, RunKind::Data { host: 0 }));
    }

    #[test]
    fn join_refuses_gaps_and_overflow() {
        let mut a = run(0, 10, RunKind::Zero);
        assert!(!a.join(&run(11, 5, RunKind::Zero)));
        let mut b = run(0, 10, RunKind::Data { host: u64::MAX - 5 });
        assert!(!b.join(&run(10, 5, RunKind::Data { host: 4 })));
        assert_eq!(a.end(), 10);
    }
}
