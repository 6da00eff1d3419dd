//! A global allocator that counts live heap bytes and allocations, for the memory benchmarks
//! (`cache_memory`, `view_memory`). Include with
//! `#[path = "support/counting_alloc.rs"] mod counting_alloc;` and read [`live`] and [`allocs`]
//! around what is measured.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

/// Counts, then delegates every call to the system allocator unchanged.
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the only addition is arithmetic on two atomics, which neither
// allocates nor touches the memory handed out, so the caller's obligations (valid layouts,
// pointers from this allocator) are exactly `System`'s.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on as received (see the impl).
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` through `alloc`/`realloc` above, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `dealloc`; `new_size` is the caller's, passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap bytes allocated and not yet freed, by anyone in the process.
pub fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Allocations (and reallocations) so far.
#[allow(dead_code)]
pub fn allocs() -> usize {
    ALLOCS.load(Ordering::Relaxed)
}

#[path = "../../tests/support/proc_status.rs"]
mod proc_status;

/// The process's resident set, in KiB (0 if /proc cannot be read).
#[allow(dead_code)]
pub fn rss_kib() -> u64 {
    proc_status::vm_rss_kib("self")
}
