//! Vectorised element-wise kernels of the CPU encoder: exp, exact (erf) GELU, softmax rows,
//! LayerNorm rows, sums.
//!
//! Written as plain loops over lanes that LLVM vectorises, compiled three times (AVX-512,
//! AVX2 + FMA, and the crate's baseline) and picked at run time by what the CPU has: the
//! release build targets plain x86-64, and a kernel compiled only for that would use 4 of
//! the 16 lanes an AVX-512 core offers. Transcendentals are polynomials with an exact range
//! reduction, so a row of them costs a few vector instructions per 16 values instead of a
//! libm call per value (which is where the backend's `gelu` and `softmax` spend their time).

/// Lanes of the accumulators in reductions: LLVM does not reorder float sums by itself, so
/// the loops keep this many partial sums, which it maps onto vector registers.
const LANES: usize = 16;

/// Compiles `$body` once per instruction set and calls the best one the CPU supports.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma,bmi2")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi2")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                match level() {
                    // SAFETY: `level` checked that the CPU has these features.
                    Level::V4 => return unsafe { v4($($arg),*) },
                    Level::V3 => return unsafe { v3($($arg),*) },
                    Level::Base => {}
                }
            }
            generic($($arg),*)
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    V4,
    V3,
    Base,
}

/// The widest instruction set of this CPU that the kernels are compiled for.
fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let v3 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("bmi2");
            let v4 = v3
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq");
            if std::env::var_os("PROCESSOR_SIMD_BASELINE").is_some() {
                return Level::Base;
            }
            if v4 {
                return Level::V4;
            }
            if v3 {
                return Level::V3;
            }
        }
        Level::Base
    })
}

/// The instruction set the kernels run with on this CPU, for logs and benchmarks.
pub fn instruction_set() -> &'static str {
    match level() {
        Level::V4 => "avx512",
        Level::V3 => "avx2+fma",
        Level::Base => "baseline",
    }
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts: `LN2_HI` has 9 significant bits, so `n * LN2_HI` is exact for the
/// exponents f32 has, and the reduction `x - n * ln 2` loses nothing.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds to an integer and leaves that integer in the low bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^(hi + lo) for `lo` much smaller than `hi` (the split keeps the digits of an argument
/// computed as a sum). Relative error about 2 ulp; arguments are clamped to [-87, 88]
/// (results below 1.6e-38 come out as about that, not 0; nothing here needs smaller ones).
#[inline(always)]
fn exp_split(hi: f32, lo: f32) -> f32 {
    let sum = hi + lo;
    let (hi, lo) = if sum < -87.0 {
        (-87.0, 0.0)
    } else if sum > 88.0 {
        (88.0, 0.0)
    } else {
        (hi, lo)
    };
    let t = (hi + lo) * LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = (hi - n * LN2_HI) + lo - n * LN2_LO;
    // e^r on |r| <= ln2/2 (Taylor to r^7: truncation below 6e-9 relative).
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^n: n sits in the low bits of t's mantissa.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    p * scale
}

#[inline(always)]
fn exp(x: f32) -> f32 {
    exp_split(x, 0.0)
}

/// Exact GELU, `x * Φ(x)` with Φ the normal CDF, as PyTorch's `gelu` (not the tanh form).
/// Φ(x) = erfc(-x/√2)/2, with erfc from the Chebyshev fit in Numerical Recipes (`erfcc`,
/// fractional error below 1.2e-7 everywhere) and its `exp(-z²)` computed from an exact
/// split of x², so the relative error stays near 1e-7 also deep in the negative tail.
#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let z = (x * FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = 0.170_872_77;
    let poly = poly * t - 0.822_152_23;
    let poly = poly * t + 1.488_515_9;
    let poly = poly * t - 1.135_204;
    let poly = poly * t + 0.278_868_07;
    let poly = poly * t - 0.186_288_06;
    let poly = poly * t + 0.096_784_18;
    let poly = poly * t + 0.374_091_96;
    let poly = poly * t + 1.000_023_7;
    let poly = poly * t - 1.265_512_2;
    // z² = x²/2 from an exact split of x (xh keeps 12 significant bits, so xh² is exact):
    // rounding z = x/√2 first would cost 1e-7 relative in z, 1e-5 in e^(-z²) at z = 9.
    let xh = f32::from_bits(x.to_bits() & 0xffff_f000);
    let xl = x - xh;
    let small = 0.5 * ((2.0 * xh + xl) * xl);
    let erfc = t * exp_split(-0.5 * (xh * xh), poly - small);
    // erfc(z) for z = |x|/√2; Φ(x) = erfc/2 for x <= 0, 1 - erfc/2 above.
    let half = 0.5 * erfc;
    let cdf = if x <= 0.0 { half } else { 1.0 - half };
    // Far out (where the split above would overflow, and f32 has nothing left): Φ is 0 or 1.
    if x < -GELU_TAIL {
        -0.0
    } else if x > GELU_TAIL {
        x
    } else {
        x * cdf
    }
}

/// Beyond this, exact GELU is `x` (above) or under 1e-80 (below) in f32.
const GELU_TAIL: f32 = 20.0;

multiversion! {
    /// `x = gelu(x)`, element-wise.
    pub fn gelu(values: &mut [f32]) {
        for v in values.iter_mut() {
            *v = gelu_one(*v);
        }
    }
}

multiversion! {
    /// `x = e^x`, element-wise (tests and tools; softmax has its own loop).
    pub fn exp_in_place(values: &mut [f32]) {
        for v in values.iter_mut() {
            *v = exp(*v);
        }
    }
}

/// Sum of `values` in `LANES` partial sums.
#[inline(always)]
fn lane_sum(values: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

#[inline(always)]
fn lane_max(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

multiversion! {
    /// Softmax of each `row_len` row of `rows`, in place.
    pub fn softmax_rows(rows: &mut [f32], row_len: usize) {
        for row in rows.chunks_exact_mut(row_len) {
            let max = lane_max(row);
            for v in row.iter_mut() {
                *v = exp(*v - max);
            }
            let scale = 1.0 / lane_sum(row);
            for v in row.iter_mut() {
                *v *= scale;
            }
        }
    }
}

multiversion! {
    /// LayerNorm of each row of `rows` (rows of `gamma.len()` values), in place:
    /// `(x - mean) / sqrt(var + eps) * gamma + beta`, variance biased (as PyTorch).
    pub fn layer_norm_rows(rows: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let d = gamma.len();
        for row in rows.chunks_exact_mut(d) {
            let mean = lane_sum(row) / d as f32;
            let mut acc = [0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let rest: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
            for chunk in chunks {
                for (a, v) in acc.iter_mut().zip(chunk) {
                    *a += (v - mean) * (v - mean);
                }
            }
            let var = (acc.iter().sum::<f32>() + rest) / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * rstd * g + b;
            }
        }
    }
}

multiversion! {
    /// Adds `row` to every row of `rows`.
    pub fn add_row_in_place(rows: &mut [f32], row: &[f32]) {
        for dst in rows.chunks_exact_mut(row.len()) {
            for (d, r) in dst.iter_mut().zip(row) {
                *d += r;
            }
        }
    }
}

multiversion! {
    /// Copies `row` into every row of `dst`.
    pub fn fill_rows(dst: &mut [f32], row: &[f32]) {
        for dst in dst.chunks_exact_mut(row.len()) {
            dst.copy_from_slice(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Exact GELU in f64 (libm's erf is correctly rounded to about 1 ulp of f64).
    fn gelu_f64(x: f64) -> f64 {
        0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    fn relative(got: f32, want: f64) -> f64 {
        ((got as f64 - want) / want.abs().max(f64::MIN_POSITIVE)).abs()
    }

    #[test]
    fn gelu_is_within_a_millionth_relative_of_exact_from_minus_12_to_12() {
        // Below about -12.6, Φ(x) is under f32's smallest normal number (1.2e-38): the
        // result keeps fewer digits there, and is smaller than 1e-36 anyway.
        let xs: Vec<f32> = (-120_000..=120_000).map(|i| i as f32 * 1e-4).collect();
        let mut ys = xs.clone();
        gelu(&mut ys);
        let (mut worst, mut at) = (0f64, 0f32);
        for (&x, &y) in xs.iter().zip(&ys) {
            if x == 0.0 {
                assert_eq!(y, 0.0);
                continue;
            }
            let e = relative(y, gelu_f64(x as f64));
            if e > worst {
                (worst, at) = (e, x);
            }
        }
        assert!(worst <= 1e-6, "gelu: relative error {worst:e} at x = {at}");
    }

    #[test]
    fn gelu_of_large_inputs_is_x_or_zero() {
        let mut ys = vec![
            50.0f32,
            1e6,
            f32::MAX,
            f32::INFINITY,
            -50.0,
            -1e6,
            -f32::MAX,
            f32::NEG_INFINITY,
        ];
        gelu(&mut ys);
        assert_eq!(&ys[..4], &[50.0, 1e6, f32::MAX, f32::INFINITY]);
        assert!(ys[4..].iter().all(|y| *y == 0.0), "{ys:?}");
    }

    #[test]
    fn exp_is_within_3_ulp_on_the_range_softmax_uses() {
        let xs: Vec<f32> = (-870_000..=880_000).map(|i| i as f32 * 1e-4).collect();
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let e = relative(y, (x as f64).exp());
            assert!(
                e <= 3.0 * f32::EPSILON as f64,
                "exp({x}) = {y}: relative error {e:e}"
            );
        }
    }

    proptest! {
        #[test]
        fn softmax_rows_match_f64(row_len in 1usize..200, rows in 1usize..4, seed in any::<u64>()) {
            let mut rng = fastrand::Rng::with_seed(seed);
            let values: Vec<f32> = (0..rows * row_len).map(|_| rng.f32() * 40.0 - 20.0).collect();
            let mut got = values.clone();
            softmax_rows(&mut got, row_len);
            for (row, got) in values.chunks(row_len).zip(got.chunks(row_len)) {
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                for (&v, &g) in row.iter().zip(got) {
                    let want = (v as f64 - max).exp() / sum;
                    prop_assert!((g as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12,
                        "softmax {g} vs {want}");
                }
            }
        }

        #[test]
        fn layer_norm_rows_match_f64(d in 1usize..600, rows in 1usize..4, seed in any::<u64>()) {
            let mut rng = fastrand::Rng::with_seed(seed);
            let values: Vec<f32> = (0..rows * d).map(|_| rng.f32() * 8.0 - 3.0).collect();
            let gamma: Vec<f32> = (0..d).map(|_| rng.f32() + 0.5).collect();
            let beta: Vec<f32> = (0..d).map(|_| rng.f32() - 0.5).collect();
            let mut got = values.clone();
            layer_norm_rows(&mut got, &gamma, &beta, 1e-12);
            for (row, got) in values.chunks(d).zip(got.chunks(d)) {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                for i in 0..d {
                    let want = (row[i] as f64 - mean) / (var + 1e-12).sqrt() * gamma[i] as f64 + beta[i] as f64;
                    prop_assert!((got[i] as f64 - want).abs() <= 2e-5, "{} vs {want}", got[i]);
                }
            }
        }
    }
}
