//! Copy-on-write memory images (Linux).
//!
//! Every capsule of one guest build shares one compiled code module whose memory starts
//! empty; the capsule's own state (the parsed and optimized model) is its memory image. Copying
//! that image into every fresh instance costs time and memory in proportion to the model (tens
//! of milliseconds for a ResNet-50-class capsule). Instead, the image is written once per
//! installed capsule into a sealed `memfd`, and every instance maps it privately: a fresh
//! instance costs a few system calls whatever the model's size, pages are shared between
//! instances until one writes to them, and only the pages an inference touches are ever
//! faulted in. Only the image's data is mapped from the file: its long runs of zeros (a
//! snapshot's free heap, where an inference puts its activations) stay anonymous memory, so
//! a write there takes one fresh zero page instead of filling the file's hole and copying it
//! (ResNet-50's first output with host kernels: 1.28-1.31x a warm inference in calm runs,
//! 1.33-1.38x before).
//!
//! wasmtime's own copy-on-write initialization works from a module's data segments, which the
//! shared code module does not have (that is what lets one compiled module serve every
//! capsule). So the engine installs [`CowMemoryCreator`] as its memory creator and hands it the
//! image of the instance being created through [`with_image`].
//!
//! The one departure from wasmtime's `MemoryCreator` contract ("memory should be zero
//! filled"): bytes past the memory's current size are the image, not zeros, until the memory
//! grows over them. The host grows a fresh instance to exactly the image's size before any
//! guest code runs (`LoadedCapsule::instantiate`), so the guest never observes the difference,
//! and growth past the image reveals zero pages as wasm requires.

use std::cell::RefCell;
use std::ffi::c_void;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Arc;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

use crate::{Error, Result};

/// A capsule's memory image in a sealed, anonymous, in-memory file.
#[derive(Debug)]
pub(crate) struct ImageFile {
    fd: OwnedFd,
    len: usize,
    /// The page-aligned ranges each instance maps from the file, in order; everything else
    /// of the image is zeros, left anonymous (see [`data_extents`]).
    extents: Vec<std::ops::Range<usize>>,
}

impl ImageFile {
    /// Writes `len` bytes of image (zeros, then every `(offset, bytes)` segment) into a new
    /// memfd and seals it against any further change. Zero ranges stay holes in the file.
    pub(crate) fn new<'a>(
        len: usize,
        segments: impl Iterator<Item = (u32, &'a [u8])>,
    ) -> Result<ImageFile> {
        let io = |what: &'static str| {
            move |e: rustix::io::Errno| Error::Io {
                context: format!("{what} the copy-on-write memory image"),
                source: std::io::Error::from(e),
            }
        };
        let fd = rustix::fs::memfd_create(
            "capsule-image",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(io("creating"))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(io("sizing"))?;
        // The segments are written through one shared mapping of the file: a snapshot has up
        // to ten thousand of them, and a `pwrite` each cost more than the copying itself.
        let mut ranges = Vec::new();
        let copy = |base: *mut u8| -> Result<()> {
            for (offset, data) in segments {
                let end = (offset as usize).checked_add(data.len());
                if end.is_none_or(|end| end > len) {
                    return Err(Error::InvalidCapsule(format!(
                        "a data segment at {offset} of {} bytes ends past the memory image ({len} bytes)",
                        data.len()
                    )));
                }
                if !data.is_empty() {
                    ranges.push(offset as usize..offset as usize + data.len());
                    // SAFETY: `base` maps `len` writable bytes of the file (below), and
                    // `offset + data.len() <= len` was just checked; `data` is process
                    // memory, not part of that fresh mapping, so the ranges do not overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr(),
                            base.add(offset as usize),
                            data.len(),
                        )
                    };
                }
            }
            Ok(())
        };
        if len == 0 {
            copy(std::ptr::null_mut())?;
        } else {
            // SAFETY: a new shared mapping of our own memfd, `len` bytes long as `ftruncate`
            // made it; nothing else maps it, and it is unmapped below before the seals.
            let base = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    len,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED,
                    &fd,
                    0,
                )
            }
            .map_err(io("mapping"))?;
            let copied = copy(base.cast());
            // SAFETY: the mapping made above, no longer used. The write seal requires that no
            // writable mapping is left.
            unsafe { rustix::mm::munmap(base, len) }.map_err(io("unmapping"))?;
            copied?;
        }
        rustix::fs::fcntl_add_seals(
            &fd,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
        )
        .map_err(io("sealing"))?;
        let extents = data_extents(len, ranges);
        tracing::debug!(
            image = len,
            mapped = extents.iter().map(|e| e.len()).sum::<usize>(),
            extents = extents.len(),
            "copy-on-write memory image"
        );
        Ok(ImageFile { fd, len, extents })
    }

    /// Size of the image in bytes.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }
}

/// Fewest bytes of zeros between two data ranges that an instance leaves anonymous rather
/// than mapping from the file.
const MIN_HOLE: usize = 256 << 10;
/// Most file mappings per instance: each costs a system call when an instance is created.
const MAX_EXTENTS: usize = 32;

/// The ranges of an image of `len` bytes to map from its file, given the `ranges` its data
/// segments cover: rounded out to host pages, merged, and then merged across every run of
/// zeros but the `MAX_EXTENTS - 1` longest of at least `MIN_HOLE` bytes.
///
/// Zeros mapped from the file cost twice: a write to one (the guest's heap, where the first
/// inference puts its activations) first fills the file's hole with a zero page, then copies
/// it. Left anonymous, the same write takes a fresh zero page. A snapshot's free heap,
/// hundreds of megabytes for a ResNet-50-class model, is such a run.
fn data_extents(
    len: usize,
    mut ranges: Vec<std::ops::Range<usize>>,
) -> Vec<std::ops::Range<usize>> {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<std::ops::Range<usize>> = Vec::new();
    for r in ranges {
        let start = r.start & !(HOST_PAGE - 1);
        let end = round_up(r.end).unwrap_or(len).min(len);
        match merged.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => merged.push(start..end),
        }
    }
    // The holes kept: the longest gaps between extents, at least MIN_HOLE each.
    let mut gaps: Vec<(usize, usize)> = merged
        .windows(2)
        .enumerate()
        .map(|(i, w)| (w[1].start - w[0].end, i))
        .filter(|&(gap, _)| gap >= MIN_HOLE)
        .collect();
    gaps.sort_unstable_by(|a, b| b.cmp(a));
    gaps.truncate(MAX_EXTENTS - 1);
    let mut kept = vec![false; merged.len()];
    for (_, i) in gaps {
        kept[i] = true;
    }
    let mut extents: Vec<std::ops::Range<usize>> = Vec::new();
    let mut split = true;
    for (r, hole_after) in merged.into_iter().zip(kept) {
        match extents.last_mut() {
            Some(last) if !split => last.end = r.end,
            _ => extents.push(r),
        }
        split = hole_after;
    }
    extents
}

thread_local! {
    /// The image for the next memory this thread's instantiation creates.
    static NEXT_IMAGE: RefCell<Option<Arc<ImageFile>>> = const { RefCell::new(None) };
}

/// Runs `instantiate` with `image` as the memory image of the memory it creates. Returns
/// whether the memory creator took the image (false means the engine did not create a memory
/// through [`CowMemoryCreator`], and the caller must initialize the memory itself).
pub(crate) fn with_image<R>(image: &Arc<ImageFile>, instantiate: impl FnOnce() -> R) -> (R, bool) {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            NEXT_IMAGE.with(|n| n.borrow_mut().take());
        }
    }
    NEXT_IMAGE.with(|n| *n.borrow_mut() = Some(Arc::clone(image)));
    let _clear = Clear;
    let result = instantiate();
    let taken = NEXT_IMAGE.with(|n| n.borrow().is_none());
    (result, taken)
}

/// The engine's memory creator: a virtual reservation (plus guard) per memory, with the
/// pending image, if any, mapped privately at its start.
#[derive(Debug, Default)]
pub(crate) struct CowMemoryCreator;

/// One linear memory: `mapped` bytes reserved at `base`, the first `size` readable and
/// writable, growth possible up to `capacity` without moving.
#[derive(Debug)]
struct CowMemory {
    base: NonNull<u8>,
    mapped: usize,
    capacity: usize,
    size: usize,
}

// SAFETY: the mapping is owned by this value alone (wasmtime owns the value and synchronizes
// access to the memory it describes); the raw pointer is only an address.
unsafe impl Send for CowMemory {}
// SAFETY: as above; `&CowMemory` gives out only the address and sizes.
unsafe impl Sync for CowMemory {}

const HOST_PAGE: usize = 4096;

fn round_up(n: usize) -> Option<usize> {
    n.checked_add(HOST_PAGE - 1).map(|n| n & !(HOST_PAGE - 1))
}

impl Drop for CowMemory {
    fn drop(&mut self) {
        // SAFETY: `base..base + mapped` is the mapping this value made and owns.
        if let Err(e) = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.mapped) } {
            tracing::error!(error = %e, "cannot unmap a linear memory");
        }
    }
}

// SAFETY: the memory is page aligned (mmap), its `capacity` bytes plus the guard the engine
// asked for stay reserved (inaccessible past `size`) for its whole life, and it never moves.
unsafe impl LinearMemory for CowMemory {
    fn byte_size(&self) -> usize {
        self.size
    }

    fn byte_capacity(&self) -> usize {
        self.capacity
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size > self.capacity {
            wasmtime::bail!(
                "cannot grow a memory of {} bytes to {new_size}: its reservation is {} bytes",
                self.size,
                self.capacity
            );
        }
        if new_size > self.size {
            let start = round_up(self.size).unwrap_or(self.capacity);
            let end = round_up(new_size)
                .unwrap_or(self.capacity)
                .min(self.capacity);
            if end > start {
                // SAFETY: `start..end` lies inside this value's own reservation.
                unsafe {
                    rustix::mm::mprotect(
                        self.base.as_ptr().add(start).cast(),
                        end - start,
                        MprotectFlags::READ | MprotectFlags::WRITE,
                    )
                }
                .map_err(std::io::Error::from)?;
            }
            self.size = new_size;
        }
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }
}

// SAFETY: every memory it returns is a fresh, exclusively owned mapping with the reservation
// and guard the engine asked for; the image exception is documented in the module docs.
unsafe impl MemoryCreator for CowMemoryCreator {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> std::result::Result<Box<dyn LinearMemory>, String> {
        let image = NEXT_IMAGE.with(|n| n.borrow_mut().take());
        let capacity = reserved_size_in_bytes
            .or(maximum)
            .unwrap_or(1 << 32)
            .max(minimum);
        let capacity = round_up(capacity).ok_or("memory reservation overflows")?;
        let mapped = capacity
            .checked_add(guard_size_in_bytes)
            .and_then(round_up)
            .ok_or("memory reservation overflows")?;
        // SAFETY: a fresh anonymous reservation, nothing else refers to it.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                mapped,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|e| format!("cannot reserve {mapped} bytes for a linear memory: {e}"))?;
        let base = NonNull::new(base.cast::<u8>()).ok_or("mmap returned a null address")?;
        let memory = CowMemory {
            base,
            mapped,
            capacity,
            size: 0,
        };
        if let Some(image) = image {
            if image.len > capacity {
                return Err(format!(
                    "a memory image of {} bytes does not fit a reservation of {capacity} bytes",
                    image.len
                ));
            }
            for extent in &image.extents {
                // SAFETY: maps over part of this memory's own reservation (MAP_FIXED
                // replaces part of the mapping made above, nothing else): the extents lie
                // within the image's `len <= capacity` bytes.
                unsafe {
                    rustix::mm::mmap(
                        memory.base.as_ptr().add(extent.start).cast::<c_void>(),
                        extent.len(),
                        ProtFlags::empty(),
                        MapFlags::PRIVATE | MapFlags::FIXED,
                        &image.fd,
                        extent.start as u64,
                    )
                }
                .map_err(|e| format!("cannot map the memory image: {e}"))?;
            }
        }
        let mut memory = memory;
        memory.grow_to(minimum).map_err(|e| format!("{e:#}"))?;
        Ok(Box::new(memory))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn memory(image: Option<&Arc<ImageFile>>, minimum: usize) -> Box<dyn LinearMemory> {
        let make = || {
            CowMemoryCreator.new_memory(
                MemoryType::new(0, None),
                minimum,
                None,
                Some(1 << 24),
                1 << 16,
            )
        };
        match image {
            Some(image) => {
                let (m, taken) = with_image(image, make);
                assert!(taken);
                m.unwrap()
            }
            None => make().unwrap(),
        }
    }

    #[test]
    fn an_image_shows_once_grown_and_writes_stay_private() {
        let data = [7u8; 100];
        let image =
            Arc::new(ImageFile::new(3 * 65536, [(65536 + 10, &data[..])].into_iter()).unwrap());
        let mut a = memory(Some(&image), 0);
        let mut b = memory(Some(&image), 0);
        assert_eq!(a.byte_size(), 0);
        a.grow_to(image.len()).unwrap();
        b.grow_to(image.len()).unwrap();
        // SAFETY: both memories are grown over the bytes read and written here.
        unsafe {
            let pa = a.as_ptr();
            let pb = b.as_ptr();
            assert_eq!(*pa.add(65536 + 10), 7);
            assert_eq!(*pa.add(65536 + 109), 7);
            assert_eq!(*pa.add(65536 + 110), 0);
            assert_eq!(*pa, 0);
            *pa.add(65536 + 10) = 1;
            assert_eq!(
                *pb.add(65536 + 10),
                7,
                "a write in one instance leaks into another"
            );
        }
        // Past the image, growth reveals zeros.
        a.grow_to(5 * 65536).unwrap();
        // SAFETY: grown above.
        unsafe { assert_eq!(*a.as_ptr().add(4 * 65536), 0) };
        // A third instance still sees the pristine image.
        let mut c = memory(Some(&image), 0);
        c.grow_to(image.len()).unwrap();
        // SAFETY: grown above.
        unsafe { assert_eq!(*c.as_ptr().add(65536 + 10), 7) };
    }

    #[test]
    fn zeros_between_data_stay_zero_and_private() {
        let (x, y) = ([3u8; 10], [5u8; 10]);
        let far = 3 << 20;
        let image = Arc::new(
            ImageFile::new(4 << 20, [(far as u32, &y[..]), (100, &x[..])].into_iter()).unwrap(),
        );
        assert_eq!(image.extents, [0..HOST_PAGE, far..far + HOST_PAGE]);
        let mut a = memory(Some(&image), 0);
        let mut b = memory(Some(&image), 0);
        a.grow_to(image.len()).unwrap();
        b.grow_to(image.len()).unwrap();
        // SAFETY: both memories are grown over the bytes read and written here.
        unsafe {
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            assert_eq!(
                (*pa.add(100), *pa.add(110), *pa.add(far), *pa.add(far + 10)),
                (3, 0, 5, 0)
            );
            assert_eq!(*pa.add(1 << 20), 0);
            *pa.add(1 << 20) = 9;
            *pa.add(far + 1) = 9;
            assert_eq!((*pb.add(1 << 20), *pb.add(far + 1)), (0, 5));
        }
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a list of one range, not the range's values
    fn extents_merge_small_gaps_and_keep_the_longest_holes() {
        let page = HOST_PAGE;
        // Rounded out to pages, overlaps merged, a gap under MIN_HOLE bridged.
        assert_eq!(
            data_extents(1 << 30, vec![10..20, 5000..6000, 15..4100, 9000..9001]),
            [0..3 * page]
        );
        assert_eq!(
            data_extents(1 << 30, vec![MIN_HOLE + page..MIN_HOLE + page + 1, 0..1]),
            [0..page, MIN_HOLE + page..MIN_HOLE + 2 * page]
        );
        assert!(data_extents(1 << 30, Vec::new()).is_empty());
        // Of many holes, only the longest MAX_EXTENTS - 1 stay holes.
        let ranges: Vec<_> = (0..2 * MAX_EXTENTS)
            .map(|i| {
                let at = i * 4 * MIN_HOLE + if i == 7 { MIN_HOLE } else { 0 };
                at..at + 1
            })
            .collect();
        let extents = data_extents(1 << 30, ranges);
        assert_eq!(extents.len(), MAX_EXTENTS);
        assert!(extents.iter().any(|e| e.end == 6 * 4 * MIN_HOLE + page));
        assert!(
            extents
                .windows(2)
                .all(|w| w[1].start - w[0].end >= 3 * MIN_HOLE)
        );
        // The data's end is clamped to the image.
        assert_eq!(
            data_extents(2 * page, vec![page..page + 1]),
            [page..2 * page]
        );
    }

    #[test]
    fn growth_stops_at_the_reservation() {
        let mut m = memory(None, 65536);
        assert_eq!(m.byte_size(), 65536);
        assert!(m.grow_to(1 << 24).is_ok());
        assert!(m.grow_to((1 << 24) + 65536).is_err());
    }

    #[test]
    fn segments_past_the_image_are_refused() {
        let data = [1u8; 16];
        let err = ImageFile::new(65536, [(65536 - 8, &data[..])].into_iter()).unwrap_err();
        assert!(
            err.to_string().contains("ends past the memory image"),
            "{err}"
        );
        let err = ImageFile::new(65536, [(u32::MAX, &data[..])].into_iter()).unwrap_err();
        assert!(err.to_string().contains("ends past"), "{err}");
    }

    #[test]
    fn an_image_too_large_for_the_reservation_is_refused() {
        let image = Arc::new(ImageFile::new(1 << 25, std::iter::empty()).unwrap());
        let (m, _) = with_image(&image, || {
            CowMemoryCreator.new_memory(MemoryType::new(0, None), 0, None, Some(1 << 24), 0)
        });
        assert!(m.is_err());
    }

    #[test]
    fn the_image_file_is_sealed() {
        let image = ImageFile::new(65536, std::iter::empty()).unwrap();
        assert!(rustix::io::pwrite(&image.fd, b"x", 0).is_err());
        assert!(rustix::fs::ftruncate(&image.fd, 0).is_err());
    }
}
