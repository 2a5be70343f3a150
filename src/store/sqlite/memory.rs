//! SQLite's memory, from the process's allocator.
//!
//! Bundled SQLite allocates with the C library's `malloc` and, by default,
//! counts every allocation under a global mutex (`SQLITE_CONFIG_MEMSTATUS`).
//! renewd never reads those counts, and its binary's allocator (mimalloc,
//! `src/main.rs`) is faster than glibc's with many threads freeing what
//! others made: glibc's malloc, free and the count's mutex were about 4% of
//! a simulated year's samples, nearly all of them SQLite's (renewd bench,
//! "time travel").
//!
//! [`configure`] must run before any SQLite call starts SQLite (opening a
//! connection, `sqlite3_malloc`, ...): after that SQLite refuses to be
//! reconfigured, and keeps its defaults (which are correct, only slower).

use std::alloc::{alloc, dealloc, realloc, Layout};
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use libsqlite3_sys as ffi;

/// Each block starts with its size (SQLite asks for it, `xSize`), as
/// SQLite's own allocator does; 8 bytes keep the block 8-aligned, which is
/// what SQLite requires (glibc's blocks are 16-aligned; SQLite needs no
/// more than 8).
const HEADER: usize = 8;
const ALIGN: usize = 8;

fn layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(HEADER)?, ALIGN).ok()
}

unsafe extern "C" fn x_malloc(n: c_int) -> *mut c_void {
    let Some(layout) = usize::try_from(n).ok().and_then(layout) else {
        return std::ptr::null_mut();
    };
    // SAFETY: the layout is never zero-sized (it holds the header).
    let block = unsafe { alloc(layout) };
    // SAFETY: a block just allocated with `layout`, or null.
    unsafe { headed(block, layout) }
}

/// Writes the size into a new block's header and returns what SQLite gets:
/// the bytes after it (null for a failed allocation).
///
/// # Safety
/// `block` is null or was just allocated with `layout`.
unsafe fn headed(block: *mut u8, layout: Layout) -> *mut c_void {
    if block.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: the block holds at least HEADER bytes, 8-aligned.
    unsafe {
        block.cast::<usize>().write(layout.size() - HEADER);
        block.add(HEADER).cast()
    }
}

/// The block's start and layout, from the pointer SQLite holds.
///
/// # Safety
/// `p` came from `x_malloc` or `x_realloc` and was not freed.
unsafe fn block_of(p: *mut c_void) -> (*mut u8, Layout) {
    // SAFETY: per the contract, the header sits HEADER bytes before `p`.
    let block = unsafe { p.cast::<u8>().sub(HEADER) };
    // SAFETY: as above; the size was written by x_malloc or x_realloc.
    let size = unsafe { block.cast::<usize>().read() };
    // SAFETY: this layout was valid when the block was made.
    let layout = unsafe { Layout::from_size_align_unchecked(size + HEADER, ALIGN) };
    (block, layout)
}

unsafe extern "C" fn x_free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    // SAFETY: SQLite frees only what its xMalloc/xRealloc returned.
    let (block, layout) = unsafe { block_of(p) };
    // SAFETY: the block was allocated with this layout.
    unsafe { dealloc(block, layout) };
}

unsafe extern "C" fn x_realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    if p.is_null() {
        // SAFETY: the same contract as x_malloc.
        return unsafe { x_malloc(n) };
    }
    let Some(new) = usize::try_from(n).ok().and_then(layout) else {
        return std::ptr::null_mut();
    };
    // SAFETY: SQLite reallocates only what its xMalloc/xRealloc returned.
    let (block, old) = unsafe { block_of(p) };
    // SAFETY: the block was allocated with `old`; the new size is non-zero
    // and fits a layout of the same alignment.
    let moved = unsafe { realloc(block, old, new.size()) };
    // SAFETY: the block now has layout `new` (or the realloc failed, null,
    // and the old block is left as it was).
    unsafe { headed(moved, new) }
}

unsafe extern "C" fn x_size(p: *mut c_void) -> c_int {
    if p.is_null() {
        return 0;
    }
    // SAFETY: SQLite asks only about what its xMalloc/xRealloc returned.
    let (_, layout) = unsafe { block_of(p) };
    c_int::try_from(layout.size() - HEADER).unwrap_or(c_int::MAX)
}

/// SQLite never asks about sizes near `c_int::MAX` or below zero (it caps
/// allocations below 0x7fffff00); those come back unrounded.
unsafe extern "C" fn x_roundup(n: c_int) -> c_int {
    n.checked_add(7).map_or(n, |m| m & !7)
}

unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_shutdown(_: *mut c_void) {}

/// Gives SQLite the process's allocator and turns its memory statistics
/// off. Returns whether SQLite took both (false once SQLite has started:
/// it then keeps its defaults, and nothing changes). Only the first call
/// does anything; later ones return its answer.
///
/// # Safety
/// No other thread may be using SQLite, or starting it, during the first
/// call: `sqlite3_config` writes SQLite's global settings without a lock,
/// and a thread starting SQLite meanwhile could read half of them (this
/// allocator's `xMalloc` with the C library's `xFree`).
#[must_use]
pub unsafe fn configure() -> bool {
    static TAKEN: OnceLock<bool> = OnceLock::new();
    *TAKEN.get_or_init(|| {
        // SQLite copies the methods (`sqlite3GlobalConfig.m = *arg`).
        let methods = ffi::sqlite3_mem_methods {
            xMalloc: Some(x_malloc),
            xFree: Some(x_free),
            xRealloc: Some(x_realloc),
            xSize: Some(x_size),
            xRoundup: Some(x_roundup),
            xInit: Some(x_init),
            xShutdown: Some(x_shutdown),
            pAppData: std::ptr::null_mut(),
        };
        // SAFETY: per this function's contract nothing else is using SQLite
        // now; before SQLite has started these only set its configuration
        // (afterwards SQLite refuses with SQLITE_MISUSE and changes nothing).
        unsafe {
            ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 0 as c_int) == ffi::SQLITE_OK
                && ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &raw const methods)
                    == ffi::SQLITE_OK
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_keep_their_size_and_contents_through_realloc() {
        unsafe {
            let p = x_malloc(13).cast::<u8>();
            assert!(!p.is_null());
            assert_eq!(p as usize % ALIGN, 0, "SQLite needs 8-aligned blocks");
            assert_eq!(x_size(p.cast()), 13);
            for i in 0..13 {
                p.add(i).write(i as u8);
            }
            let q = x_realloc(p.cast(), 4000).cast::<u8>();
            assert!(!q.is_null());
            assert_eq!(q as usize % ALIGN, 0);
            assert_eq!(x_size(q.cast()), 4000);
            let kept: Vec<u8> = (0..13).map(|i| q.add(i).read()).collect();
            assert_eq!(kept, (0..13).collect::<Vec<u8>>());
            let r = x_realloc(q.cast(), 5).cast::<u8>();
            assert!(!r.is_null());
            assert_eq!(x_size(r.cast()), 5);
            assert_eq!(r.add(4).read(), 4);
            x_free(r.cast());
        }
    }

    #[test]
    fn null_pointers_are_answered_as_sqlite_expects() {
        unsafe {
            assert_eq!(x_size(std::ptr::null_mut()), 0);
            x_free(std::ptr::null_mut());
            let p = x_realloc(std::ptr::null_mut(), 24);
            assert!(!p.is_null(), "realloc of NULL allocates");
            assert_eq!(x_size(p), 24);
            x_free(p);
        }
    }

    /// SQLite itself never asks for these (it checks sizes first); the
    /// answers are NULL rather than a block of the wrong size. The
    /// refused realloc fails before the allocator is called, and leaves
    /// the block as it was.
    #[test]
    fn negative_sizes_are_refused_and_leave_the_block() {
        unsafe {
            assert!(x_malloc(-1).is_null());
            let p = x_malloc(24);
            assert!(x_realloc(p, -5).is_null());
            assert_eq!(x_size(p), 24);
            x_free(p);
        }
    }

    #[test]
    fn sizes_round_up_to_eight() {
        unsafe {
            assert_eq!(x_roundup(13), 16);
            assert_eq!(x_roundup(16), 16);
            assert_eq!(x_roundup(1), 8);
            assert_eq!(x_roundup(c_int::MAX), c_int::MAX);
        }
    }
}
