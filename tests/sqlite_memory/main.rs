//! SQLite on the process's allocator, as the `renewd` binary sets it up
//! (`store::sqlite::memory`). A test binary of its own: the setting is
//! global to the process and must come before SQLite's first use, which
//! no test in a shared binary can promise. Without it, nothing shows
//! whether SQLite really runs through these functions: every other test
//! runs SQLite on its defaults (the C library's malloc, statistics on).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use libsqlite3_sys as ffi;

/// Counts allocations, to see SQLite's go through Rust's allocator.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn sqlite_allocates_through_the_process_allocator_with_its_statistics_off() {
    // SAFETY: the first thing this test binary does with SQLite, and the
    // only test in it.
    assert!(
        unsafe { renewd::store::sqlite::memory::configure() },
        "SQLite took the allocator and the statistics setting"
    );

    // The store works on it: migrations, a write and a read.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("renewd.db").display());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = renewd::store::sqlite::SqliteStore::open(&url, 2)
            .await
            .unwrap();
        renewd::store::Store::migrate(&store).await.unwrap();
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM subscriptions")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(n, 0);
    });

    unsafe {
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        let p = ffi::sqlite3_malloc(13);
        assert!(!p.is_null());
        assert!(
            ALLOCATIONS.load(Ordering::SeqCst) > before,
            "sqlite3_malloc went through Rust's allocator"
        );
        // SQLite's own allocator rounds 13 up to 16; this one keeps it.
        assert_eq!(ffi::sqlite3_msize(p), 13);
        ffi::sqlite3_free(p);
        assert_eq!(ffi::sqlite3_memory_used(), 0, "statistics are off");
        // Once started, SQLite refuses to be reconfigured.
        assert_eq!(
            ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 1 as std::ffi::c_int),
            ffi::SQLITE_MISUSE
        );
    }
    // A second call answers as the first did, and touches nothing.
    assert!(unsafe { renewd::store::sqlite::memory::configure() });
}
