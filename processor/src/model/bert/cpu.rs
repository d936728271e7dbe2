//! The encoder on the CPU backend, fused: what burn's composite ops cost around the matrix
//! products (a fresh buffer per op, scalar `erf` and `exp`, head reshape copies, padding
//! computed and then masked, one parallel region per op) is done here in few passes over
//! buffers that live as long as the model.
//!
//! - **No padding.** The batch's real tokens are packed into one `[tokens, hidden]` matrix:
//!   projections and the feed-forward block multiply only those, and attention runs per
//!   (input, head) over that input's own tokens. A mixed batch costs the sum of its inputs'
//!   lengths, not `inputs x longest`.
//! - **Fused attention per head**: scores, softmax and the value product of one head of one
//!   input, with the scores (at most `len x len`) in a per-thread scratch buffer; the heads
//!   are read from and written to the packed matrices through strides (no reshape copies).
//! - **Fused epilogues**: bias and residual are put in the output buffer before the product
//!   accumulates into it; GELU, softmax and LayerNorm are the vectorised kernels of
//!   [`super::simd`].
//! - **Matrix products** are the `gemm` crate's, the library burn's CPU backend (flex) calls
//!   for its own matmul: no GEMM is written here. Each runs on one thread.
//! - **Threads**: the encoder shares work out itself rather than in every product. A batch
//!   whose inputs cut into one equal-cost group per thread runs each group through all the
//!   layers on its own thread, with no hand-off between threads until the end; any other
//!   batch (one input, mixed lengths) cuts its token rows into one run per thread (each of
//!   at least [`MIN_ROWS`] rows), with three hand-offs per layer (after the q|k|v
//!   projection, after attention, after the feed-forward block); a batch of fewer tokens,
//!   or a pool of one thread, runs on the calling thread. gemm's own threads (a parallel
//!   region in every product) made a single input 16-30% slower (Xeon, MiniLM, 2 threads).
//!
//! burn 0.22's model code runs on a dispatch backend (the same `Tensor` type on every
//! device), which has no hook for a backend-specific op inside a model; flex hands a
//! tensor's buffer over without copying (`into_data` / `from_data`), so this path takes the
//! embeddings' output from burn and gives the hidden states back to it. Other devices (CUDA,
//! whose fusion compiler fuses the element-wise ops itself) and other float types keep the
//! composite encoder in `encoder.rs`, which the tests compare this one against.

use std::cell::RefCell;
use std::sync::Mutex;

use gemm::Parallelism;
use rayon::prelude::*;

use super::simd;

/// Attention whose products each need fewer multiply-adds than this (over all inputs and
/// heads) stays on the calling thread: splitting it costs more than it saves.
const PARALLEL_ATTENTION: usize = 128 * 1024;

/// A batch left whole is shared out by token rows only if each thread gets at least this
/// many: below, the hand-offs cost more than the rows.
const MIN_ROWS: usize = 8;

/// How much slower than an even share the slowest group of a split batch may be (see
/// [`split`]). A group per thread needs no hand-off inside a layer, where sharing the rows
/// of a whole batch (`layers_by_rows`) needs three: 3-15% faster on batches of equal
/// lengths, but up to 10% slower on mixed ones where the groups' times drifted 5-8% apart
/// (Xeon, MiniLM, 2 threads).
const MAX_IMBALANCE: f64 = 1.04;

/// Cost of attention per `len² x hidden` in [`split`]'s model, in multiply-adds of the
/// projections: its 2 (scores and value product) taken 4 times over, since its small
/// per-head products and softmax run slower (calibrated on MiniLM on one thread: inputs of
/// 8-128 tokens, mean 68, cost ~11% more per token than 16-token ones).
const ATTENTION_WEIGHT: f64 = 8.0;

/// One layer's parameters, matrices `[in, out]` row-major.
pub struct CpuLayer {
    pub qkv_weight: Vec<f32>,
    pub qkv_bias: Vec<f32>,
    pub attention_out_weight: Vec<f32>,
    pub attention_out_bias: Vec<f32>,
    pub attention_norm: (Vec<f32>, Vec<f32>),
    pub intermediate_weight: Vec<f32>,
    pub intermediate_bias: Vec<f32>,
    pub output_weight: Vec<f32>,
    pub output_bias: Vec<f32>,
    pub output_norm: (Vec<f32>, Vec<f32>),
}

/// Buffers reused across layers and batches; they grow to the largest batch seen (bounded
/// by the scheduler's `max_tokens`) and stay.
#[derive(Default)]
struct Scratch {
    qkv: Vec<f32>,
    context: Vec<f32>,
    intermediate: Vec<f32>,
}

/// The work of one input of `len` tokens in a layer, in multiply-adds of the projections.
fn input_cost(len: usize, hidden: usize, intermediate: usize) -> f64 {
    let (len, h, i) = (len as f64, hidden as f64, intermediate as f64);
    len * (4.0 * h * h + 2.0 * h * i) + ATTENTION_WEIGHT * len * len * h
}

/// Where to cut a batch of `lengths` into one contiguous group of inputs per thread, if
/// that is worth it: the groups' costs (projections per token, attention per token pair)
/// must balance to within [`MAX_IMBALANCE`], since the slowest group sets the time.
/// Each group's size in inputs; `None` when the batch has fewer inputs than `threads` (a
/// group each would leave threads idle), does not balance, or a group would have fewer than
/// [`MIN_ROWS`] tokens: it is then shared out by rows, or kept on the calling thread.
fn split(
    lengths: &[usize],
    threads: usize,
    hidden: usize,
    intermediate: usize,
) -> Option<Vec<usize>> {
    let groups = threads;
    if groups < 2 || lengths.len() < groups {
        return None;
    }
    let cost = |len: usize| input_cost(len, hidden, intermediate);
    let total: f64 = lengths.iter().map(|&l| cost(l)).sum();
    // Group sizes (in inputs): cut where the running cost is nearest each share.
    let mut sizes = Vec::with_capacity(groups);
    let (mut done, mut first) = (0.0, 0);
    for g in 1..groups {
        let target = total * g as f64 / groups as f64;
        let mut end = first + 1;
        let mut upto = done + cost(lengths[first]);
        // Leave at least one input for each later group.
        while end < lengths.len() - (groups - g) {
            let next = upto + cost(lengths[end]);
            if (next - target).abs() >= (upto - target).abs() {
                break;
            }
            upto = next;
            end += 1;
        }
        sizes.push(end - first);
        (done, first) = (upto, end);
    }
    sizes.push(lengths.len() - first);
    let (mut start, mut slowest, mut fewest_rows) = (0, 0f64, usize::MAX);
    for &n in &sizes {
        let group = &lengths[start..start + n];
        slowest = slowest.max(group.iter().map(|&l| cost(l)).sum());
        fewest_rows = fewest_rows.min(group.iter().sum());
        start += n;
    }
    // A group of fewer rows is not worth a thread (and one of a single row would take gemm's
    // vector-matrix path, whose sums round differently).
    (slowest <= MAX_IMBALANCE * total / groups as f64 && fewest_rows >= MIN_ROWS).then_some(sizes)
}

/// `values` (rows of `width`) cut into consecutive runs of `rows` rows each.
fn cut<'a>(mut values: &'a mut [f32], rows: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut runs = Vec::with_capacity(rows.len());
    for &n in rows {
        let (run, rest) = values.split_at_mut(n * width);
        runs.push(run);
        values = rest;
    }
    runs
}

/// The rows of a batch (or of a group of its inputs) that one pass over the layers works on:
/// the token states and the scratch buffers, all packed in input order.
struct Part<'a> {
    x: &'a mut [f32],
    qkv: &'a mut [f32],
    context: &'a mut [f32],
    intermediate: &'a mut [f32],
    lengths: &'a [usize],
}

impl<'a> Part<'a> {
    /// Cuts this part into consecutive groups of `sizes` inputs each.
    fn split(self, sizes: &[usize], hidden: usize, intermediate_width: usize) -> Vec<Part<'a>> {
        let mut groups = Vec::with_capacity(sizes.len());
        let mut rest = self.lengths;
        for &n in sizes {
            let (own, later) = rest.split_at(n);
            groups.push(own);
            rest = later;
        }
        let tokens: Vec<usize> = groups.iter().map(|g| g.iter().sum()).collect();
        let x = cut(self.x, &tokens, hidden);
        let qkv = cut(self.qkv, &tokens, 3 * hidden);
        let context = cut(self.context, &tokens, hidden);
        let intermediate = cut(self.intermediate, &tokens, intermediate_width);
        x.into_iter()
            .zip(qkv)
            .zip(context)
            .zip(intermediate)
            .zip(groups)
            .map(|((((x, qkv), context), intermediate), lengths)| Part {
                x,
                qkv,
                context,
                intermediate,
                lengths,
            })
            .collect()
    }
}

/// The fused encoder.
pub struct CpuEncoder {
    layers: Vec<CpuLayer>,
    hidden: usize,
    heads: usize,
    intermediate: usize,
    eps: f32,
    /// The buffers of the batch being computed. A worker owns its model, so the lock is free;
    /// a model shared by several threads (tools, tests) gives a second caller buffers of its
    /// own instead of waiting (waiting could deadlock: a rayon thread that holds the lock may
    /// take another caller's job while it waits in a join).
    scratch: Mutex<Scratch>,
}

thread_local! {
    /// Attention scores of one (input, head): `len x len`, per thread.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A raw pointer that may cross into rayon's threads: each task writes a disjoint region.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint writes, joined before the buffer is touched again.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// The read-only counterpart of [`SendPtr`].
#[derive(Clone, Copy)]
struct ConstPtr(*const f32);
// SAFETY: only read, while no task writes the buffer.
unsafe impl Send for ConstPtr {}
unsafe impl Sync for ConstPtr {}

impl ConstPtr {
    /// The pointer (a method, so that closures capture the whole `ConstPtr`).
    fn get(self) -> *const f32 {
        self.0
    }
}

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `SendPtr`).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst[m x n] (+)= scale * a[m x k] * b[k x n]`, each matrix given by its pointer and its
/// row and column strides (in elements).
///
/// # Safety
/// Every pointer must address its matrix for those strides; `dst` must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    accumulate: bool,
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    scale: f32,
    parallelism: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2,
        dst.1,
        accumulate,
        a.0,
        a.2,
        a.1,
        b.0,
        b.2,
        b.1,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    );
}

/// `out[rows x n] += x[rows x k] * w[k x n]`, all contiguous row-major, on the calling
/// thread (the encoder splits work across threads itself, see [`CpuEncoder::forward`]).
fn accumulate_product(out: &mut [f32], x: &[f32], w: &[f32], (k, n): (usize, usize)) {
    let rows = x.len() / k;
    assert!(out.len() == rows * n && w.len() == k * n);
    if rows == 0 {
        return;
    }
    // SAFETY: the asserts above bound every index the strides reach; `out` is borrowed
    // mutably, so it aliases neither input.
    unsafe {
        matmul(
            (rows, n, k),
            (out.as_mut_ptr(), n as isize, 1),
            true,
            (x.as_ptr(), k as isize, 1),
            (w.as_ptr(), n as isize, 1),
            1.0,
            Parallelism::None,
        );
    }
}

impl CpuEncoder {
    /// An encoder of `layers` for `heads` attention heads.
    pub fn new(layers: Vec<CpuLayer>, hidden: usize, heads: usize, eps: f64) -> Self {
        let intermediate = layers.first().map_or(0, |l| l.intermediate_bias.len());
        CpuEncoder {
            layers,
            hidden,
            heads,
            intermediate,
            eps: eps as f32,
            scratch: Mutex::new(Scratch::default()),
        }
    }

    /// Runs every layer over `x`, the packed `[sum(lengths), hidden]` token states of inputs
    /// of `lengths` tokens each (in order), in place.
    pub fn forward(&self, x: &mut [f32], lengths: &[usize]) {
        let tokens: usize = lengths.iter().sum();
        assert_eq!(
            x.len(),
            tokens * self.hidden,
            "packed states and lengths disagree"
        );
        let mut own = Scratch::default();
        let mut shared = match self.scratch.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let scratch: &mut Scratch = match shared.as_deref_mut() {
            Some(scratch) => scratch,
            None => &mut own,
        };
        let (h, i) = (self.hidden, self.intermediate);
        scratch.qkv.resize(tokens * 3 * h, 0.0);
        scratch.context.resize(tokens * h, 0.0);
        scratch.intermediate.resize(tokens * i, 0.0);
        let whole = Part {
            x,
            qkv: &mut scratch.qkv,
            context: &mut scratch.context,
            intermediate: &mut scratch.intermediate,
            lengths,
        };
        let threads = rayon::current_num_threads();
        if let Some(groups) = split(lengths, threads, h, i) {
            // Each thread runs every layer over its own inputs: no hand-off between threads
            // inside a layer (see [`split`]).
            let parts = whole.split(&groups, h, i);
            parts
                .into_par_iter()
                .with_max_len(1)
                .for_each(|part| self.layers(part));
        } else if threads > 1 && tokens >= 2 * MIN_ROWS {
            self.layers_by_rows(whole, threads.min(tokens / MIN_ROWS));
        } else {
            self.layers(whole);
        }
    }

    /// Every layer over a part, on the calling thread.
    fn layers(
        &self,
        Part {
            x,
            qkv,
            context,
            intermediate,
            lengths,
        }: Part<'_>,
    ) {
        for layer in &self.layers {
            self.project_qkv(layer, x, qkv);
            self.attention(qkv, context, lengths, false);
            self.finish_layer(layer, x, context, intermediate);
        }
    }

    /// Every layer over a part on `chunks` threads: the token rows are cut into `chunks` runs
    /// of equal size (within one row) for the steps that work row by row (projections,
    /// feed-forward block, LayerNorm), and attention is shared out by (input, head); three
    /// parallel steps per layer, each product single-threaded. For a batch that [`split`]
    /// leaves whole (one input, or lengths too uneven).
    fn layers_by_rows(
        &self,
        Part {
            x,
            qkv,
            context,
            intermediate,
            lengths,
        }: Part<'_>,
        chunks: usize,
    ) {
        let (h, i) = (self.hidden, self.intermediate);
        // Runs of equal size (one row more for the first few): a run of a single row would
        // take gemm's vector-matrix path, whose sums round differently.
        let tokens = x.len() / h;
        let runs: Vec<usize> = (0..chunks)
            .map(|c| tokens / chunks + usize::from(c < tokens % chunks))
            .collect();
        for layer in &self.layers {
            let x_runs = cut(&mut x[..], &runs, h);
            let qkv_runs = cut(&mut qkv[..], &runs, 3 * h);
            x_runs
                .into_par_iter()
                .zip(qkv_runs)
                .with_max_len(1)
                .for_each(|(x, qkv)| self.project_qkv(layer, x, qkv));
            self.attention(qkv, context, lengths, true);
            let x_runs = cut(&mut x[..], &runs, h);
            let context_runs = cut(&mut context[..], &runs, h);
            let intermediate_runs = cut(&mut intermediate[..], &runs, i);
            x_runs
                .into_par_iter()
                .zip(context_runs)
                .zip(intermediate_runs)
                .with_max_len(1)
                .for_each(|((x, context), intermediate)| {
                    self.finish_layer(layer, x, context, intermediate)
                });
        }
    }

    /// `qkv = x * W_qkv + b` for some rows (q, k and v of a token side by side).
    fn project_qkv(&self, layer: &CpuLayer, x: &[f32], qkv: &mut [f32]) {
        let h = self.hidden;
        simd::fill_rows(qkv, &layer.qkv_bias);
        accumulate_product(qkv, x, &layer.qkv_weight, (h, 3 * h));
    }

    /// The rest of a layer after attention, for some rows (each row needs only its own):
    /// `x = LayerNorm(context * W_o + b_o + x)`, then
    /// `x = LayerNorm(gelu(x * W_1 + b_1) * W_2 + b_2 + x)`.
    fn finish_layer(
        &self,
        layer: &CpuLayer,
        x: &mut [f32],
        context: &[f32],
        intermediate: &mut [f32],
    ) {
        let (h, i) = (self.hidden, self.intermediate);
        simd::add_row_in_place(x, &layer.attention_out_bias);
        accumulate_product(x, context, &layer.attention_out_weight, (h, h));
        self.layer_norm(x, &layer.attention_norm);
        simd::fill_rows(intermediate, &layer.intermediate_bias);
        accumulate_product(intermediate, x, &layer.intermediate_weight, (h, i));
        simd::gelu(intermediate);
        simd::add_row_in_place(x, &layer.output_bias);
        accumulate_product(x, intermediate, &layer.output_weight, (i, h));
        self.layer_norm(x, &layer.output_norm);
    }

    fn layer_norm(&self, x: &mut [f32], (gamma, beta): &(Vec<f32>, Vec<f32>)) {
        simd::layer_norm_rows(x, gamma, beta, self.eps);
    }

    /// `context[t, head]` = softmax(q k^T / sqrt(d)) v over the tokens of `t`'s own input, for
    /// every head, reading q, k and v from the packed `[tokens, 3 * hidden]` matrix.
    fn attention(&self, qkv: &[f32], context: &mut [f32], lengths: &[usize], parallel: bool) {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut starts = Vec::with_capacity(lengths.len());
        let mut start = 0;
        for &len in lengths {
            starts.push(start);
            start += len;
        }
        let out = SendPtr(context.as_mut_ptr());
        let qkv_ptr = ConstPtr(qkv.as_ptr());
        let one = |(input, head): (usize, usize)| {
            let (len, first) = (lengths[input], starts[input]);
            if len == 0 {
                return;
            }
            SCORES.with_borrow_mut(|scores| {
                scores.resize(len * len, 0.0);
                let row = (3 * h) as isize;
                let base = qkv_ptr.get().wrapping_add(first * 3 * h + head * d);
                // SAFETY: q, k and v of this input's tokens and this head lie inside `qkv`
                // (rows first..first+len, columns head*d.. of each third); the context
                // block written (same rows, columns head*d..head*d+d) belongs to this task
                // alone; `scores` is this thread's own.
                unsafe {
                    let (q, k, v) = (base, base.add(h), base.add(2 * h));
                    // scores = scale * q k^T: k^T's rows are k's columns.
                    matmul(
                        (len, len, d),
                        (scores.as_mut_ptr(), len as isize, 1),
                        false,
                        (q, row, 1),
                        (k, 1, row),
                        scale,
                        Parallelism::None,
                    );
                    simd::softmax_rows(scores, len);
                    matmul(
                        (len, d, len),
                        (out.get().add(first * h + head * d), h as isize, 1),
                        false,
                        (scores.as_ptr(), len as isize, 1),
                        (v, row, 1),
                        1.0,
                        Parallelism::None,
                    );
                }
            });
        };
        let tasks = lengths.len() * heads;
        let work: usize = lengths.iter().map(|&l| l * l * d).sum::<usize>() * heads;
        if parallel && tasks > 1 && work >= PARALLEL_ATTENTION {
            (0..tasks)
                .into_par_iter()
                .map(|t| (t / heads, t % heads))
                .for_each(one);
        } else {
            (0..tasks).map(|t| (t / heads, t % heads)).for_each(one);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // MiniLM's widths.
    const H: usize = 384;
    const I: usize = 1536;

    /// Checks that `sizes` cuts a batch of `inputs` into one non-empty group per thread.
    fn check_groups(inputs: usize, threads: usize, sizes: &[usize]) {
        assert_eq!(sizes.len(), threads, "{sizes:?}");
        assert!(sizes.iter().all(|&n| n > 0), "an empty group: {sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), inputs, "{sizes:?}");
    }

    #[test]
    fn equal_inputs_split_evenly_across_the_threads() {
        assert_eq!(split(&[16; 32], 2, H, I), Some(vec![16, 16]));
        assert_eq!(split(&[16; 32], 3, H, I), Some(vec![11, 10, 11]));
        assert_eq!(split(&[16; 2], 2, H, I), Some(vec![1, 1]));
    }

    #[test]
    fn nothing_to_split_or_too_uneven_keeps_the_batch_whole() {
        assert_eq!(split(&[16; 32], 1, H, I), None);
        assert_eq!(split(&[512], 2, H, I), None);
        // Fewer inputs than threads: a group each would leave threads idle.
        assert_eq!(split(&[128, 128], 4, H, I), None);
        // One long input beside a short one: its thread would take all the time.
        assert_eq!(split(&[512, 8], 2, H, I), None);
        assert_eq!(split(&[128, 8, 8], 2, H, I), None);
        // Seven equal inputs on two threads: 4 against 3.
        assert_eq!(split(&[16; 7], 2, H, I), None);
        // Balanced, but too few tokens a group to be worth a thread.
        assert_eq!(split(&[1, 1], 2, H, I), None);
        assert_eq!(split(&[2; 6], 2, H, I), None);
        assert_eq!(split(&[4; 4], 2, H, I), Some(vec![2, 2]));
    }

    #[test]
    fn mixed_lengths_split_by_cost_not_by_count() {
        let lengths: Vec<usize> = (1..=40).map(|i| i * 3).collect();
        let sizes = split(&lengths, 2, H, I).expect("a split");
        check_groups(lengths.len(), 2, &sizes);
        // The long inputs sit at the end: the second group takes fewer of them.
        assert!(sizes[0] > sizes[1] + 10, "{sizes:?}");
    }

    proptest::proptest! {
        #[test]
        fn every_split_gives_each_thread_a_group(
            lengths in proptest::collection::vec(1usize..=512, 1..80),
            threads in 1usize..=16,
        ) {
            if let Some(sizes) = split(&lengths, threads, H, I) {
                check_groups(lengths.len(), threads, &sizes);
            }
        }
    }

    /// A small encoder with random weights (2 layers, hidden 64, 4 heads).
    fn random_encoder(seed: u64) -> CpuEncoder {
        let (h, i) = (64, 256);
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut values = |n: usize, scale: f32| -> Vec<f32> {
            (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect()
        };
        let layers = (0..2)
            .map(|_| CpuLayer {
                qkv_weight: values(h * 3 * h, 0.2),
                qkv_bias: values(3 * h, 0.1),
                attention_out_weight: values(h * h, 0.2),
                attention_out_bias: values(h, 0.1),
                attention_norm: (vec![1.0; h], values(h, 0.1)),
                intermediate_weight: values(h * i, 0.2),
                intermediate_bias: values(i, 0.1),
                output_weight: values(i * h, 0.1),
                output_bias: values(h, 0.1),
                output_norm: (vec![1.0; h], values(h, 0.1)),
            })
            .collect();
        CpuEncoder::new(layers, h, 4, 1e-12)
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool")
    }

    #[test]
    fn every_way_of_sharing_threads_out_computes_the_same_states() {
        let encoder = random_encoder(11);
        let h = encoder.hidden;
        let mut rng = fastrand::Rng::with_seed(5);
        let one = pool(1);
        let batches: Vec<Vec<usize>> = vec![
            vec![1],
            vec![2],
            vec![15],
            vec![16],
            vec![17],
            vec![100],
            vec![1, 1],
            vec![8, 8],
            vec![16; 7],
            vec![16; 32],
            vec![3, 200, 5],
            vec![128, 8, 8],
            (1..=20).map(|i| i * 3).collect(),
        ];
        for threads in [2, 3, 5, 12] {
            let many = pool(threads);
            for lengths in &batches {
                let tokens: usize = lengths.iter().sum();
                let input: Vec<f32> = (0..tokens * h).map(|_| rng.f32() * 2.0 - 1.0).collect();
                let mut shared = input.clone();
                many.install(|| encoder.forward(&mut shared, lengths));
                let mut alone = input.clone();
                one.install(|| encoder.forward(&mut alone, lengths));
                let threaded = shared
                    .iter()
                    .zip(&alone)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // Each product runs on one thread over at least 8 rows either way: the same
                // sums in the same order.
                assert!(
                    threaded <= 1e-6,
                    "{lengths:?} on {threads} threads: {threaded} from one thread"
                );
                // Each input by itself: within the batch-invariance bound.
                let mut start = 0;
                for &len in lengths {
                    let mut by_itself = input[start * h..(start + len) * h].to_vec();
                    one.install(|| encoder.forward(&mut by_itself, &[len]));
                    let batched = &shared[start * h..(start + len) * h];
                    let diff = by_itself
                        .iter()
                        .zip(batched)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        diff <= 1e-5,
                        "{lengths:?}: an input of {len} differs by {diff}"
                    );
                    start += len;
                }
            }
        }
    }
}
