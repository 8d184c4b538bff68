//! Tensors read chunk by chunk: the interface a merger uses to pass over its inputs
//! several times without holding them whole (TIES and the other magnitude-trimming
//! methods find their cuts this way, see [`TaskMerge::merge_chunked`]).
//!
//! [`TaskMerge::merge_chunked`]: super::TaskMerge::merge_chunked

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// A chunk visitor of [`ChunkedInputs::fold_chunks`]: `f(acc, start, tensors)`.
///
/// ```
/// use modelfusion::merge::ChunkFn;
/// let count: &ChunkFn<'_, usize, f32> = &|acc, _start, xs| { *acc += xs[0].len(); Ok(()) };
/// let mut n = 0;
/// count(&mut n, 0, &[&[1.0, 2.0]])?;
/// assert_eq!(n, 2);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub type ChunkFn<'a, A, E> = dyn Fn(&mut A, usize, &[&[E]]) -> Result<()> + Sync + 'a;

/// Where a chunked merge hands its output: `out(start, elements)`.
///
/// ```
/// use modelfusion::merge::ChunkSink;
/// let sink: &ChunkSink<'_, f32> = &|start, xs| { assert!(start + xs.len() <= 4); Ok(()) };
/// assert!(sink(0, &[1.0, 2.0]).is_ok());
/// ```
pub type ChunkSink<'a, E> = dyn Fn(usize, &[E]) -> Result<()> + Sync + 'a;

/// The same flat range of every input tensor of one merge, served chunk by chunk (from
/// checkpoints on disk by [`io::merge_mapped`](crate::io::merge_mapped), or from memory
/// by [`SliceChunks`]). Every chunk but the last holds [`chunk_elems`](Self::chunk_elems)
/// elements.
///
/// ```
/// use modelfusion::merge::{ChunkedInputs, SliceChunks};
/// let (a, b) = ([1.0f32, 2.0, 3.0], [4.0f32, 5.0, 6.0]);
/// let c = SliceChunks::new(vec![&a[..], &b[..]], 2)?;
/// // One accumulator per worker: the sums of a + b over the chunks it visited.
/// let parts = c.fold_chunks(0..c.chunks(), &|| 0.0f32, &|acc, _start, xs| {
///     *acc += xs[0].iter().zip(xs[1]).map(|(x, y)| x + y).sum::<f32>();
///     Ok(())
/// })?;
/// assert_eq!(parts.iter().sum::<f32>(), 21.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub trait ChunkedInputs<E>: Sync {
    /// Elements per tensor.
    fn len(&self) -> usize;

    /// Whether the tensors are empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of input tensors.
    fn inputs(&self) -> usize;

    /// Elements per chunk (at least 1).
    fn chunk_elems(&self) -> usize;

    /// Number of chunks.
    fn chunks(&self) -> usize {
        self.len().div_ceil(self.chunk_elems())
    }

    /// Runs `f(acc, start, tensors)` for every chunk in `chunks` (chunk indices), where
    /// `tensors[i]` holds input `i`'s elements `start..start + len`, possibly in
    /// parallel: one accumulator (from `init`) per worker, returned in worker order
    /// (which chunks a worker visits is not specified; combine accumulators
    /// order-independently). The first error stops the pass.
    fn fold_chunks<A: Send>(
        &self,
        chunks: Range<usize>,
        init: &(dyn Fn() -> A + Sync),
        f: &ChunkFn<'_, A, E>,
    ) -> Result<Vec<A>>;

    /// Reads all of input `input` into `out` (of length [`len`](Self::len)), for
    /// settings that need whole tensors.
    fn read_whole(&self, input: usize, out: &mut [E]) -> Result<()>;
}

/// In-memory [`ChunkedInputs`] over slices of one length, e.g. to run a chunked merge on
/// loaded tensors with a chosen chunk size.
///
/// ```
/// use modelfusion::merge::{ChunkedInputs, SliceChunks};
/// let a = [0.0f32; 5];
/// let c = SliceChunks::new(vec![&a[..]], 2)?;
/// assert_eq!((c.len(), c.chunks()), (5, 3));
/// assert!(SliceChunks::new(vec![&a[..]], 0).is_err());
/// assert!(SliceChunks::new(vec![&a[..], &a[..2]], 2).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct SliceChunks<'a, E> {
    xs: Vec<&'a [E]>,
    chunk: usize,
}

impl<'a, E> SliceChunks<'a, E> {
    /// Chunks of `chunk_elems` over `xs` (non-empty, all of one length; `chunk_elems`
    /// positive).
    ///
    /// ```
    /// use modelfusion::merge::SliceChunks;
    /// let x = [1.0f64];
    /// assert!(SliceChunks::new(vec![&x[..]], 1 << 16).is_ok());
    /// assert!(SliceChunks::<f64>::new(vec![], 4).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(xs: Vec<&'a [E]>, chunk_elems: usize) -> Result<Self> {
        let first = xs
            .first()
            .ok_or_else(|| Error::empty("the chunked input tensors"))?;
        if chunk_elems == 0 {
            return Err(Error::invalid("chunk_elems", "must be positive"));
        }
        if let Some((i, x)) = xs.iter().enumerate().find(|(_, x)| x.len() != first.len()) {
            return Err(Error::shape(
                format!("chunked input {i}"),
                &[first.len()],
                &[x.len()],
            ));
        }
        Ok(SliceChunks {
            xs,
            chunk: chunk_elems,
        })
    }
}

impl<E: Copy + Sync> ChunkedInputs<E> for SliceChunks<'_, E> {
    fn len(&self) -> usize {
        self.xs[0].len()
    }

    fn inputs(&self) -> usize {
        self.xs.len()
    }

    fn chunk_elems(&self) -> usize {
        self.chunk
    }

    fn fold_chunks<A: Send>(
        &self,
        chunks: Range<usize>,
        init: &(dyn Fn() -> A + Sync),
        f: &ChunkFn<'_, A, E>,
    ) -> Result<Vec<A>> {
        let n = self.len();
        let workers = rayon::current_num_threads().clamp(1, chunks.len().max(1));
        (0..workers)
            .into_par_iter()
            .map(|w| {
                let mut acc = init();
                for j in chunks.clone().skip(w).step_by(workers) {
                    let start = j * self.chunk;
                    let end = (start + self.chunk).min(n);
                    let parts: Vec<&[E]> = self.xs.iter().map(|x| &x[start..end]).collect();
                    f(&mut acc, start, &parts)?;
                }
                Ok(acc)
            })
            .collect()
    }

    fn read_whole(&self, input: usize, out: &mut [E]) -> Result<()> {
        let x = self
            .xs
            .get(input)
            .ok_or_else(|| Error::invalid("input", format!("{input} of {}", self.xs.len())))?;
        if out.len() != x.len() {
            return Err(Error::shape(
                "whole-tensor buffer",
                &[x.len()],
                &[out.len()],
            ));
        }
        out.copy_from_slice(x);
        Ok(())
    }
}
