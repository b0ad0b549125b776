//! The kernel builds embedded in this library, and which one loads.
//!
//! `build.rs` compiles `kernels/moe.cu` once per CUDA toolkit it was given (nvcc 13.x, and a
//! CUDA 12.x NVRTC + nvFatbin from PyPI for wheels that must run on R535-R570 drivers), each
//! into a fatbin with cubins for several GPU architectures plus PTX. At run time the newest
//! build the installed driver supports is loaded (a driver of CUDA major version N loads the
//! cubins of any N.x toolkit: minor version compatibility; PTX JIT needs driver >= toolkit).
//! `STOLON_MOE_KERNELS=cuda12|cuda13` forces one build (for tests), `auto` or unset chooses.

use crate::{Error, Result};

/// One fatbin of the MoE kernels, built by one CUDA toolkit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelBuild {
    /// `cuda12`, `cuda13`: the name `STOLON_MOE_KERNELS` takes.
    pub name: &'static str,
    /// Toolkit (major, minor), e.g. (12, 8).
    pub toolkit: (u32, u32),
    /// The compiler and its full version, e.g. `nvcc 13.0.88`, `nvrtc 12.8`.
    pub compiler: &'static str,
    /// GPU architectures with a cubin, e.g. `sm_80`.
    pub cubins: &'static [&'static str],
    /// Virtual architectures with PTX (JIT-compiled for newer GPUs), e.g. `compute_80`.
    pub ptx: &'static [&'static str],
    /// The fatbin.
    pub fatbin: &'static [u8],
}

impl KernelBuild {
    /// e.g. `CUDA 12.8 (sm_80, sm_90a, sm_100a, PTX compute_80)`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.cubins.iter().map(|s| s.to_string()).collect();
        parts.extend(self.ptx.iter().map(|p| format!("PTX {p}")));
        format!(
            "CUDA {}.{} ({})",
            self.toolkit.0,
            self.toolkit.1,
            parts.join(", ")
        )
    }

    /// Whether a driver supporting CUDA `driver` (major, minor) can load this build's cubins.
    pub fn runs_on(&self, driver: (u32, u32)) -> bool {
        driver.0 >= self.toolkit.0
    }
}

/// The builds embedded in this library, oldest toolkit first (empty: built without nvcc).
pub static BUILDS: &[KernelBuild] = include!(concat!(env!("OUT_DIR"), "/moe_builds.rs"));

/// The environment variable that forces a build.
pub const ENV: &str = "STOLON_MOE_KERNELS";

/// Picks the build to load from `builds` (oldest first) for a driver supporting CUDA `driver`,
/// honouring `forced` (the value of [`ENV`]: `cuda12`, `cuda13`, or `auto` / empty / unset).
///
/// # Errors
/// [`Error::InvalidArgument`] for a value of [`ENV`] that names no toolkit;
/// [`Error::NoKernels`] when nothing was built; [`Error::KernelBuild`] when the forced build
/// is not in this library or no build runs on the driver.
pub fn select<'a>(
    builds: &'a [KernelBuild],
    driver: (u32, u32),
    forced: Option<&str>,
) -> Result<&'a KernelBuild> {
    let forced = match forced.map(str::trim) {
        None | Some("") | Some("auto") => None,
        Some(v) => {
            let ok = v
                .strip_prefix("cuda")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !ok {
                return Err(Error::InvalidArgument(format!(
                    "{ENV}={v:?}: expected auto or one of {}",
                    names(builds)
                )));
            }
            Some(v)
        }
    };
    if builds.is_empty() {
        return Err(Error::NoKernels);
    }
    let (dmaj, dmin) = driver;
    if let Some(name) = forced {
        let Some(b) = builds.iter().find(|b| b.name == name) else {
            return Err(Error::KernelBuild(format!(
                "{ENV}={name} but this library has no such build (it has {})",
                names(builds)
            )));
        };
        if !b.runs_on(driver) {
            return Err(Error::KernelBuild(format!(
                "{ENV}={name}: {} needs a driver for CUDA {}.x or newer, this one supports \
                 CUDA {dmaj}.{dmin}",
                b.describe(),
                b.toolkit.0
            )));
        }
        return Ok(b);
    }
    builds
        .iter()
        .filter(|b| b.runs_on(driver))
        .max_by_key(|b| b.toolkit)
        .ok_or_else(|| {
            Error::KernelBuild(format!(
                "the CUDA driver supports CUDA {dmaj}.{dmin}, older than every MoE kernel build \
                 in this library ({}); update the driver (R535+ for CUDA 12, R580+ for CUDA 13)",
                builds
                    .iter()
                    .map(KernelBuild::describe)
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        })
}

fn names(builds: &[KernelBuild]) -> String {
    if builds.is_empty() {
        return "none: built without kernels".to_string();
    }
    builds.iter().map(|b| b.name).collect::<Vec<_>>().join(", ")
}

/// The value of [`ENV`], if set.
pub fn forced_from_env() -> Option<String> {
    std::env::var(ENV).ok()
}

/// The build that loads here: [`select`] over [`BUILDS`] for the installed driver
/// (`cuDriverGetVersion`) and [`ENV`].
///
/// # Errors
/// As [`select`]; a CUDA error when the driver library cannot be loaded.
pub fn selected() -> Result<&'static KernelBuild> {
    let forced = forced_from_env();
    // A bad value, or a build this library lacks, is reported even without a driver.
    select(BUILDS, (u32::MAX, 0), forced.as_deref())?;
    let v = stolon_cuda::driver_version()?;
    select(BUILDS, (v.major, v.minor), forced.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    const B12: KernelBuild = KernelBuild {
        name: "cuda12",
        toolkit: (12, 8),
        compiler: "nvrtc 12.8",
        cubins: &["sm_80", "sm_90a", "sm_100a"],
        ptx: &["compute_80"],
        fatbin: b"12",
    };
    const B13: KernelBuild = KernelBuild {
        name: "cuda13",
        toolkit: (13, 0),
        compiler: "nvcc 13.0.88",
        cubins: &["sm_80", "sm_90a", "sm_100a"],
        ptx: &["compute_80"],
        fatbin: b"13",
    };
    const BOTH: &[KernelBuild] = &[B12, B13];

    #[test]
    fn newest_build_the_driver_runs() {
        assert_eq!(select(BOTH, (13, 0), None).unwrap().name, "cuda13");
        assert_eq!(select(BOTH, (13, 2), Some("auto")).unwrap().name, "cuda13");
        // R535..R570 drivers: CUDA 12.2 .. 12.8; minor version compatibility loads 12.8 cubins.
        for minor in [2, 4, 8, 9] {
            assert_eq!(select(BOTH, (12, minor), Some("")).unwrap().name, "cuda12");
        }
        // Order of the list does not matter.
        assert_eq!(select(&[B13, B12], (13, 0), None).unwrap().name, "cuda13");
    }

    #[test]
    fn too_old_a_driver_is_a_clear_error() {
        let e = select(BOTH, (11, 8), None).unwrap_err();
        assert!(matches!(e, Error::KernelBuild(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("CUDA 11.8") && msg.contains("CUDA 12.8 (sm_80"),
            "{msg}"
        );
        let e = select(&[B13], (12, 8), None).unwrap_err();
        assert!(e.to_string().contains("R580+"), "{e}");
    }

    #[test]
    fn forcing_picks_that_build_or_explains() {
        assert_eq!(select(BOTH, (13, 0), Some("cuda12")).unwrap().fatbin, b"12");
        assert_eq!(
            select(BOTH, (13, 0), Some(" cuda13 ")).unwrap().fatbin,
            b"13"
        );
        let e = select(BOTH, (12, 4), Some("cuda13")).unwrap_err();
        assert!(e.to_string().contains("supports CUDA 12.4"), "{e}");
        let e = select(&[B13], (13, 0), Some("cuda12")).unwrap_err();
        assert!(e.to_string().contains("has cuda13"), "{e}");
        for bad in ["cuda", "13", "cuda13.0", "CUDA13", "nvcc"] {
            let e = select(BOTH, (13, 0), Some(bad)).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e:?}");
            assert!(e.to_string().contains("cuda12, cuda13"), "{e}");
        }
    }

    #[test]
    fn no_builds_is_no_kernels() {
        assert!(matches!(select(&[], (13, 0), None), Err(Error::NoKernels)));
        assert!(matches!(
            select(&[], (13, 0), Some("cuda13")),
            Err(Error::NoKernels)
        ));
        assert!(matches!(
            select(&[], (13, 0), Some("x")),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn describe_names_every_architecture() {
        assert_eq!(
            B12.describe(),
            "CUDA 12.8 (sm_80, sm_90a, sm_100a, PTX compute_80)"
        );
    }

    #[test]
    fn embedded_builds_are_consistent() {
        let mut names: Vec<&str> = BUILDS.iter().map(|b| b.name).collect();
        names.dedup();
        assert_eq!(names.len(), BUILDS.len(), "one build per toolkit major");
        for b in BUILDS {
            assert_eq!(b.name, format!("cuda{}", b.toolkit.0));
            assert!(!b.fatbin.is_empty() && !b.cubins.is_empty(), "{b:?}");
        }
        assert!(BUILDS.windows(2).all(|w| w[0].toolkit < w[1].toolkit));
    }
}
