//! The fuzzer's global allocator: the system allocator plus a count of live bytes and their high-water mark, so
//! each input's peak memory can be compared with its size. A single request above `CAP` is refused with a message
//! naming the input (then the process aborts, as on any failed allocation): no input of a few kilobytes justifies a
//! gigabyte before its header is validated.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The input being run, for the message of a refused allocation (set by the driver).
pub static CASE: AtomicUsize = AtomicUsize::new(usize::MAX);
pub const CAP: usize = 1 << 30;

fn refuse(size: usize) {
    // No allocation here: digits into a stack buffer.
    fn digits(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return &buf[i..];
            }
        }
    }
    let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"\nqpeft-fuzz: input ");
    let _ = err.write_all(digits(CASE.load(Relaxed), &mut a));
    let _ = err.write_all(b" asked for one allocation of ");
    let _ = err.write_all(digits(size, &mut b));
    let _ = err.write_all(b" bytes (more than the 1 GiB cap)\n");
}

/// Counts a successful allocation of `size` bytes at `p`.
fn counted(p: *mut u8, size: usize) -> *mut u8 {
    if !p.is_null() {
        let now = LIVE.fetch_add(size, Relaxed) + size;
        PEAK.fetch_max(now, Relaxed);
    }
    p
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        counted(System.alloc(layout), layout.size())
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        counted(System.alloc_zeroed(layout), layout.size())
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CAP {
            refuse(new_size);
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// Starts a new high-water mark at the bytes live now, and returns them.
pub fn reset_peak() -> usize {
    let now = LIVE.load(Relaxed);
    PEAK.store(now, Relaxed);
    now
}

/// The most bytes live at once since `reset_peak`.
pub fn peak() -> usize {
    PEAK.load(Relaxed)
}
