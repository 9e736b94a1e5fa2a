//! Giving freed heap memory back to the kernel. glibc keeps what a large change freed (a
//! 20,000-service config replaced by a small one) in its arenas, so the agent's resident
//! memory would stay at its high-water mark; `malloc_trim` returns the free pages.

/// Returns the heap's free pages to the kernel; after a config change, off the runtime's
/// threads (it walks every arena). A no-op where the C library is not glibc.
pub fn give_back_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only reads and releases the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
