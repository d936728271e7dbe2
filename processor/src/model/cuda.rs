//! Checks, before burn touches them, that what a `cuda` processor loads at run time is there:
//! the driver (`libcuda.so.1`), NVRTC (kernels are CUDA C++ compiled when first used) no newer
//! than the driver, and the CUDA headers NVRTC includes. Without this, a missing library is a
//! panic deep inside cudarc on a worker thread; with it, the processor exits with one line that
//! names what is missing and the fix.

use std::path::PathBuf;

use crate::config::Precision;

/// A CUDA version as the driver and cudarc write it: `major * 1000 + minor * 10` (13000 = 13.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion {
    /// e.g. 13
    pub major: u32,
    /// e.g. 0
    pub minor: u32,
}

impl CudaVersion {
    /// From the driver's integer form (`cuDriverGetVersion`, `CUDARC_CUDA_VERSION`).
    pub fn from_int(version: u32) -> Self {
        CudaVersion {
            major: version / 1000,
            minor: (version % 1000) / 10,
        }
    }
}

impl std::fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The CUDA version this binary's bindings were built for (`CUDA_VERSION` of
/// scripts/build-cuda), if the build said.
pub fn built_for() -> Option<CudaVersion> {
    option_env!("CUDARC_CUDA_VERSION")
        .and_then(|v| v.parse().ok())
        .map(CudaVersion::from_int)
}

/// Whether versions fit together: NVRTC emits PTX for its own CUDA version, which a driver
/// older than that refuses to load (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION` at the first
/// kernel); bindings built for a newer CUDA than the driver's may call missing functions.
pub fn check_versions(
    driver: CudaVersion,
    nvrtc: CudaVersion,
    built_for: Option<CudaVersion>,
) -> Result<(), String> {
    if nvrtc > driver {
        return Err(format!(
            "NVRTC {nvrtc} is newer than the driver's CUDA {driver}: the kernels it compiles \
             would not load. Install NVRTC {}.x or older (or a newer driver), or put that one \
             first on LD_LIBRARY_PATH",
            driver.major
        ));
    }
    if let Some(built) = built_for {
        if built > driver {
            return Err(format!(
                "this processor was built for CUDA {built} but the driver supports CUDA {driver}: \
                 rebuild it with CUDA_VERSION={}{:03} scripts/build-cuda, or upgrade the driver",
                driver.major,
                driver.minor * 10
            ));
        }
    }
    Ok(())
}

/// The CUDA headers NVRTC is pointed at (`$CUDA_PATH/include`, else the first of
/// /usr/local/cuda, /opt/cuda, /usr with nvcc, as cubecl looks), and the files a model of
/// `dtype` needs there (the fused attention kernel works in f16 on tensor cores whatever the
/// model's dtype, so it needs the f16 header too).
pub fn check_headers(
    cuda_path: Option<PathBuf>,
    dtype: Precision,
    fused_attention: bool,
) -> Result<PathBuf, String> {
    let Some(root) = cuda_path else {
        return Err("no CUDA headers: NVRTC compiles kernels with the CUDA headers, found under \
                    $CUDA_PATH/include (default /usr/local/cuda/include); install the CUDA \
                    toolkit's headers (cuda-cudart-dev and cuda-nvrtc-dev packages) or set CUDA_PATH"
            .to_string());
    };
    let include = root.join("include");
    if !include.is_dir() {
        return Err(format!(
            "{} does not exist: set CUDA_PATH to the CUDA installation whose include/ NVRTC \
             should use",
            include.display()
        ));
    }
    let mut needed = Vec::new();
    if dtype == Precision::F16 || fused_attention {
        needed.push("cuda_fp16.h");
    }
    if dtype == Precision::Bf16 {
        needed.push("cuda_bf16.h");
    }
    for header in needed {
        if !include.join(header).is_file() {
            return Err(format!(
                "{} is missing: model.dtype = {dtype:?}{} needs it to compile kernels; install \
                 the CUDA toolkit's headers there or set CUDA_PATH to a CUDA installation",
                include.join(header).display(),
                if fused_attention {
                    " with fused attention"
                } else {
                    ""
                }
            ));
        }
    }
    Ok(include)
}

/// A candidate list in a sentence: the usual names (`libcuda.so.1`, `libcuda.so.13`,
/// `libcuda.so`) and how many others cudarc also tried.
#[cfg(feature = "cuda")]
fn tried(names: &[String]) -> String {
    let mut unique: Vec<&str> = names.iter().map(String::as_str).collect();
    unique.sort_unstable();
    unique.dedup();
    let usual = |n: &&str| {
        let stem = n.split(".so").next().unwrap_or(n);
        !stem.contains(|c: char| c.is_ascii_digit())
            && [".so", ".so.1", ".so.12", ".so.13"]
                .iter()
                .any(|end| n.ends_with(end))
    };
    let mut shown: Vec<&str> = unique.iter().copied().filter(usual).collect();
    shown.sort_by_key(|n| std::cmp::Reverse(n.len()));
    match unique.len() - shown.len() {
        0 => shown.join(", "),
        others => format!("{} and {others} other names", shown.join(", ")),
    }
}

/// Loads the first library of `names` that the dynamic loader finds.
#[cfg(feature = "cuda")]
fn open_first(names: &[String]) -> Option<(libloading::Library, String)> {
    names.iter().find_map(|name| {
        // SAFETY: loading the CUDA driver or NVRTC runs their initialisers, which is what
        // burn would do a moment later anyway.
        unsafe { libloading::Library::new(name) }
            .ok()
            .map(|lib| (lib, name.clone()))
    })
}

/// What [`check`] found.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
pub struct CudaRuntime {
    /// The driver library that loaded and its CUDA version.
    pub driver: (String, CudaVersion),
    /// The NVRTC library that loaded and its version.
    pub nvrtc: (String, CudaVersion),
    /// GPUs the driver sees.
    pub devices: usize,
    /// The headers NVRTC will use.
    pub include: PathBuf,
}

/// Checks the driver, the GPU `index`, NVRTC and the headers, in that order; the error is one
/// sentence naming what is missing and the fix.
#[cfg(feature = "cuda")]
pub fn check(index: usize, dtype: Precision, fused_attention: bool) -> anyhow::Result<CudaRuntime> {
    use std::os::raw::c_int;

    let names = cudarc::get_lib_name_candidates("cuda");
    let Some((driver_lib, driver_name)) = open_first(&names) else {
        anyhow::bail!(
            "the CUDA driver library is not there (looked for {}): install the NVIDIA driver \
             (it provides libcuda.so.1), or add its directory to LD_LIBRARY_PATH; on Kubernetes, \
             request an nvidia.com/gpu so the device plugin mounts it",
            tried(&names)
        );
    };
    // SAFETY: the signatures are those of the CUDA driver API (cuda.h), stable since CUDA 2.
    let (driver, devices) =
        unsafe {
            let get_version = driver_lib
                .get::<unsafe extern "C" fn(*mut c_int) -> c_int>(b"cuDriverGetVersion\0")?;
            let init = driver_lib.get::<unsafe extern "C" fn(u32) -> c_int>(b"cuInit\0")?;
            let count = driver_lib
                .get::<unsafe extern "C" fn(*mut c_int) -> c_int>(b"cuDeviceGetCount\0")?;
            let mut version = 0;
            let code = get_version(&mut version);
            anyhow::ensure!(
                code == 0,
                "{driver_name}: cuDriverGetVersion failed (CUresult {code})"
            );
            let code = init(0);
            anyhow::ensure!(
            code == 0,
            "{driver_name} loaded but cuInit failed (CUresult {code}{}): no usable GPU for this \
             process (check nvidia-smi, the container's GPU request and CUDA_VISIBLE_DEVICES)",
            if code == 100 { ", no CUDA-capable device" } else { "" }
        );
            let mut devices = 0;
            let code = count(&mut devices);
            anyhow::ensure!(
                code == 0,
                "{driver_name}: cuDeviceGetCount failed (CUresult {code})"
            );
            (CudaVersion::from_int(version as u32), devices as usize)
        };
    anyhow::ensure!(
        index < devices,
        "model.devices lists GPU {index}, but the driver sees {devices} GPU(s) (indices 0 to {}); \
         check CUDA_VISIBLE_DEVICES",
        devices.saturating_sub(1)
    );

    let names = cudarc::get_lib_name_candidates("nvrtc");
    let Some((nvrtc_lib, nvrtc_name)) = open_first(&names) else {
        anyhow::bail!(
            "NVRTC, which compiles the GPU kernels, is not there (looked for {}): install it \
             for CUDA {}.x or older (package cuda-nvrtc-{}-x, or the CUDA toolkit), or add its \
             directory to LD_LIBRARY_PATH",
            tried(&names),
            driver.major,
            driver.major
        );
    };
    // SAFETY: nvrtcVersion(int*, int*) from nvrtc.h.
    let nvrtc = unsafe {
        let version = nvrtc_lib
            .get::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int>(b"nvrtcVersion\0")?;
        let (mut major, mut minor) = (0, 0);
        let code = version(&mut major, &mut minor);
        anyhow::ensure!(
            code == 0,
            "{nvrtc_name}: nvrtcVersion failed (nvrtcResult {code})"
        );
        CudaVersion {
            major: major as u32,
            minor: minor as u32,
        }
    };
    check_versions(driver, nvrtc, built_for()).map_err(anyhow::Error::msg)?;
    let include = check_headers(cubecl::cuda::install::cuda_path(), dtype, fused_attention)
        .map_err(anyhow::Error::msg)?;
    // Hopper's asynchronous-copy kernels include CCCL's <cuda/barrier>; without it they fail
    // when first compiled, so say so now (other kernels still work).
    if !include.join("cuda/barrier").is_file() && !include.join("cccl/cuda/barrier").is_file() {
        tracing::warn!(
            include = %include.display(),
            "CCCL headers (cuda/barrier) not found: kernels that need them will fail to compile; \
             install the CUDA toolkit's cuda-cccl package"
        );
    }
    Ok(CudaRuntime {
        driver: (driver_name, driver),
        nvrtc: (nvrtc_name, nvrtc),
        devices,
        include,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32) -> CudaVersion {
        CudaVersion { major, minor }
    }

    #[test]
    fn versions_read_as_the_driver_writes_them() {
        assert_eq!(CudaVersion::from_int(13000), v(13, 0));
        assert_eq!(CudaVersion::from_int(12080), v(12, 8));
        assert_eq!(CudaVersion::from_int(12040).to_string(), "12.4");
    }

    #[test]
    fn nvrtc_newer_than_the_driver_is_refused_with_the_fix() {
        let err = check_versions(v(12, 8), v(13, 0), None).unwrap_err();
        assert!(
            err.contains("NVRTC 13.0 is newer than the driver's CUDA 12.8"),
            "{err}"
        );
        assert!(err.contains("12.x or older"), "{err}");
        assert!(check_versions(v(13, 0), v(13, 0), None).is_ok());
        assert!(check_versions(v(13, 0), v(12, 8), None).is_ok());
    }

    #[test]
    fn a_binary_built_for_a_newer_cuda_than_the_driver_says_how_to_rebuild() {
        let err = check_versions(v(12, 4), v(12, 4), Some(v(13, 0))).unwrap_err();
        assert!(err.contains("built for CUDA 13.0"), "{err}");
        assert!(err.contains("CUDA_VERSION=12040"), "{err}");
        assert!(check_versions(v(13, 0), v(13, 0), Some(v(13, 0))).is_ok());
    }

    #[test]
    fn missing_headers_are_named() {
        let err = check_headers(None, Precision::F32, false).unwrap_err();
        assert!(err.contains("CUDA_PATH"), "{err}");

        let root = std::env::temp_dir().join(format!("cuda-headers-{}", std::process::id()));
        std::fs::create_dir_all(root.join("include")).unwrap();
        assert_eq!(
            check_headers(Some(root.clone()), Precision::F32, false).unwrap(),
            root.join("include")
        );
        let err = check_headers(Some(root.clone()), Precision::F16, false).unwrap_err();
        assert!(err.contains("cuda_fp16.h is missing"), "{err}");
        let err = check_headers(Some(root.clone()), Precision::F32, true).unwrap_err();
        assert!(
            err.contains("cuda_fp16.h is missing") && err.contains("fused"),
            "{err}"
        );
        std::fs::write(root.join("include/cuda_fp16.h"), "").unwrap();
        assert!(check_headers(Some(root.clone()), Precision::F16, true).is_ok());
        let err = check_headers(Some(root.clone()), Precision::Bf16, false).unwrap_err();
        assert!(err.contains("cuda_bf16.h is missing"), "{err}");
        let err = check_headers(Some(root.join("nowhere")), Precision::F32, false).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        std::fs::remove_dir_all(root).unwrap();
    }
}
