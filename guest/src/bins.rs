//! Freed small blocks kept for the next allocation of their size class.
//!
//! An inference allocates and frees the same few buffers every time: the request, tract's
//! tensors (16-byte aligned), the response. In the guest each went to dlmalloc, whose
//! aligned path (`memalign`) allocates more than asked and gives back the excess, and whose
//! `free` coalesces neighbours: allocator calls were 7% of a digits MLP's inference in a
//! profile (docs/benchmarks.md, "Allocation"). Here a block of at most [`MAX_SIZE`] bytes
//! and an alignment of at most 16 is allocated with its class's size and an alignment of
//! 16, and when freed it goes onto its class's list (the link is written in the block
//! itself), from which the next allocation of that class takes it: a few loads and stores.
//!
//! Bounded: at most [`MAX_PER_CLASS`] blocks per class and [`MAX_CACHED`] bytes in all;
//! beyond that a freed block goes back to the system allocator. [`flush`] gives every cached
//! block back (the builder does before the snapshot, so that freed blocks are zeroed like
//! any other, see `capsule_build`).
//!
//! Classes: multiples of 16 up to 512 bytes, then four per power of two (a quarter of it
//! apart) up to 64 KiB, so a block is at most 25% larger than the request it serves.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Largest request served from the classes.
pub const MAX_SIZE: usize = 64 * 1024;
/// Alignment of every class block (tract's tensors ask for 16).
pub const ALIGN: usize = 16;
/// Most blocks kept per class.
pub const MAX_PER_CLASS: usize = 16;
/// Most bytes kept in all classes.
pub const MAX_CACHED: usize = 4 * 1024 * 1024;

/// Classes of 16 to 512 bytes, 16 apart.
const SMALL: usize = 32;
/// Classes in all: [`SMALL`], then four per power of two from 512 to 64 KiB.
const CLASSES: usize = SMALL + 4 * 7;

/// The class of a request of `size` bytes aligned to `align`, when the classes serve it.
pub fn class_of(size: usize, align: usize) -> Option<usize> {
    if size == 0 || size > MAX_SIZE || align > ALIGN {
        return None;
    }
    if size <= 512 {
        return Some(size.div_ceil(16) - 1);
    }
    // 2^p < size <= 2^(p + 1), p in 9..=15; classes 2^p * (5..=8) / 4.
    let p = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize;
    let quarter = 1 << (p - 2);
    Some(SMALL + (p - 9) * 4 + (size.div_ceil(quarter) - 5))
}

/// The size of class `class`'s blocks.
pub fn class_size(class: usize) -> usize {
    if class < SMALL {
        return (class + 1) * 16;
    }
    let p = 9 + (class - SMALL) / 4;
    (1 << (p - 2)) * (5 + (class - SMALL) % 4)
}

/// The layout class `class`'s blocks are allocated with.
fn class_layout(class: usize) -> Option<Layout> {
    Layout::from_size_align(class_size(class), ALIGN).ok()
}

/// Each class's list of freed blocks (the first block's address; each block holds the
/// next one's), its length, and the bytes held in all.
struct Lists {
    heads: [Cell<usize>; CLASSES],
    counts: [Cell<usize>; CLASSES],
    bytes: Cell<usize>,
}

thread_local! {
    static LISTS: Lists = const {
        Lists {
            heads: [const { Cell::new(0) }; CLASSES],
            counts: [const { Cell::new(0) }; CLASSES],
            bytes: Cell::new(0),
        }
    };
}

/// A block of `class`, from its list or from the system allocator (null when out of
/// memory).
///
/// # Safety
/// As [`GlobalAlloc::alloc`].
pub unsafe fn alloc(class: usize) -> *mut u8 {
    let popped = LISTS
        .try_with(|lists| {
            let head = lists.heads[class].get();
            if head == 0 {
                return None;
            }
            // SAFETY: `head` is a block of this class that `dealloc` put on the list, and
            // its first word holds the next block's address.
            let next = unsafe { (head as *const usize).read() };
            lists.heads[class].set(next);
            lists.counts[class].set(lists.counts[class].get() - 1);
            lists.bytes.set(lists.bytes.get() - class_size(class));
            Some(head as *mut u8)
        })
        .ok()
        .flatten();
    if let Some(block) = popped {
        return block;
    }
    match class_layout(class) {
        // SAFETY: a non-zero size and a valid alignment.
        Some(layout) => unsafe { System.alloc(layout) },
        None => std::ptr::null_mut(),
    }
}

/// Takes back a block of `class`: onto its list, or to the system allocator when the list or
/// the cache is full.
///
/// # Safety
/// `block` came from [`alloc`] of the same class and is no longer used.
pub unsafe fn dealloc(block: *mut u8, class: usize) {
    let size = class_size(class);
    let kept = LISTS
        .try_with(|lists| {
            let count = lists.counts[class].get();
            let bytes = lists.bytes.get();
            if count >= MAX_PER_CLASS || bytes + size > MAX_CACHED {
                return false;
            }
            // SAFETY: the block is at least 16 bytes, aligned to 16, and ours now.
            unsafe { (block as *mut usize).write(lists.heads[class].get()) };
            lists.heads[class].set(block as usize);
            lists.counts[class].set(count + 1);
            lists.bytes.set(bytes + size);
            true
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: allocated by `System` with this layout (`alloc`).
        unsafe { release(block, class) };
    }
}

/// Gives a block of `class` back to the system allocator.
///
/// # Safety
/// As [`dealloc`].
pub unsafe fn release(block: *mut u8, class: usize) {
    if let Some(layout) = class_layout(class) {
        // SAFETY: the caller's contract.
        unsafe { System.dealloc(block, layout) };
    }
}

/// Gives every cached block back to the system allocator, each first handed to `before`.
pub fn flush(mut before: impl FnMut(*mut u8, usize)) {
    let _ = LISTS.try_with(|lists| {
        for class in 0..CLASSES {
            let mut head = lists.heads[class].replace(0);
            while head != 0 {
                let block = head as *mut u8;
                // SAFETY: a block on the list: its first word is the next one's address.
                head = unsafe { (block as *const usize).read() };
                before(block, class_size(class));
                // SAFETY: a block of this class, taken off its list.
                unsafe { release(block, class) };
            }
            lists.counts[class].set(0);
        }
        lists.bytes.set(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_gets_a_class_at_most_a_quarter_larger() {
        let mut last = 0;
        for size in 1..=MAX_SIZE {
            let class = class_of(size, 8).expect("served");
            assert!(class < CLASSES, "size {size}");
            let block = class_size(class);
            assert!(block >= size, "size {size}: class {class} of {block} bytes");
            assert!(block.is_multiple_of(16), "size {size}: {block} bytes");
            if size > 512 {
                assert!(block * 4 <= size * 5 + 3 * 4, "size {size}: {block} bytes");
            }
            assert!(class >= last, "classes grow with the size");
            last = class;
            // The smallest class holding it.
            if class > 0 {
                assert!(class_size(class - 1) < size, "size {size}: class {class}");
            }
        }
        assert_eq!(class_of(MAX_SIZE, 16), Some(CLASSES - 1));
    }

    #[test]
    fn large_or_overaligned_requests_are_not_served() {
        assert_eq!(class_of(0, 1), None);
        assert_eq!(class_of(MAX_SIZE + 1, 1), None);
        assert_eq!(class_of(64, 32), None);
    }

    #[test]
    fn freed_blocks_come_back_lifo_and_the_lists_are_bounded() {
        flush(|_, _| {});
        let class = class_of(100, 16).expect("served");
        // SAFETY: blocks of `class`, each freed once.
        unsafe {
            let a = alloc(class);
            let b = alloc(class);
            assert!(!a.is_null() && !b.is_null() && a != b);
            assert!((a as usize).is_multiple_of(ALIGN));
            dealloc(a, class);
            dealloc(b, class);
            assert_eq!(alloc(class), b);
            assert_eq!(alloc(class), a);
            let blocks: Vec<_> = (0..MAX_PER_CLASS + 3).map(|_| alloc(class)).collect();
            for &block in &blocks {
                dealloc(block, class);
            }
            let mut flushed = 0;
            flush(|_, size| {
                assert_eq!(size, class_size(class));
                flushed += 1;
            });
            assert_eq!(flushed, MAX_PER_CLASS);
            dealloc(a, class);
            dealloc(b, class);
            flush(|_, _| {});
        }
    }

    #[test]
    fn the_cache_holds_at_most_its_bytes() {
        flush(|_, _| {});
        let class = class_of(MAX_SIZE, 16).expect("served");
        let classes: Vec<usize> = (CLASSES - 8..CLASSES).collect();
        let mut blocks = Vec::new();
        for &c in &classes {
            for _ in 0..MAX_PER_CLASS {
                // SAFETY: freed below, once.
                blocks.push((unsafe { alloc(c) }, c));
            }
        }
        assert!(classes.contains(&class));
        for &(block, c) in &blocks {
            // SAFETY: allocated above with class `c`.
            unsafe { dealloc(block, c) };
        }
        let mut bytes = 0;
        flush(|_, size| bytes += size);
        assert!(bytes <= MAX_CACHED, "{bytes} bytes cached");
        assert!(bytes > MAX_CACHED - MAX_SIZE, "{bytes} bytes cached");
    }
}
