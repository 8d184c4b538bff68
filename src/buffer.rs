//! Large zero-filled buffers, backed by transparent huge pages where the OS allows:
//! merge outputs and the LAP's f32 copy of a cost matrix.

use crate::tensor::Scalar;

/// A zero-filled buffer of `n` elements: the allocator hands out zero pages lazily,
/// and on Linux a large buffer is marked for transparent huge pages before its first
/// touch (see [`merge::output_buffer`](crate::merge::output_buffer)).
pub(crate) fn zeros<E: Scalar>(n: usize) -> Vec<E> {
    let v = vec![E::zero(); n];
    advise_huge_pages(&v);
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<E>(v: &[E]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(v);
    if bytes < 2 * HUGE {
        return;
    }
    let start = v.as_ptr() as usize;
    let aligned = start.next_multiple_of(HUGE);
    let end = (start + bytes) / HUGE * HUGE;
    if end > aligned {
        // SAFETY: the range lies inside `v`'s allocation; MADV_HUGEPAGE only changes
        // how the kernel backs those pages, never their contents. A failure (e.g. THP
        // disabled) leaves ordinary pages, so the result is ignored.
        unsafe {
            libc::madvise(
                aligned as *mut libc::c_void,
                end - aligned,
                libc::MADV_HUGEPAGE,
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<E>(_: &[E]) {}
