//! Provider certification records.
//!
//! `stacyvm certify --provider NAME` runs the provider conformance suite
//! against a fresh server and stores the outcome as one small JSON record per
//! provider in `<data_dir>/certifications/<provider>.json`. A record holds
//! for the host it was made on only: [`Certification::valid_for`] compares
//! the [`HostClass`] (kernel release, distribution, cgroup version, CPU model,
//! architecture) with the current one.
//!
//! Reading a record:
//!
//! ```no_run
//! use stacyvm_core::certification::{Certification, HostClass};
//! # fn f(data_dir: &std::path::Path) -> Result<(), stacyvm_core::certification::CertificationError> {
//! let host = HostClass::detect();
//! let certified = Certification::load(data_dir, "native")?
//!     .is_some_and(|c| c.certifies(&host));
//! # let _ = certified; Ok(()) }
//! ```

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of reading or writing certification records.
#[derive(Debug, thiserror::Error)]
pub enum CertificationError {
    /// The provider name cannot be used as a record file name.
    #[error("invalid provider name {0:?}")]
    InvalidProvider(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a certification record: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Cgroup layout of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// Only cgroup v1 hierarchies.
    V1,
    /// The unified hierarchy only.
    V2,
    /// v1 controllers plus a (usually empty) unified hierarchy.
    Hybrid,
    /// No cgroup filesystem mounted.
    None,
}

impl CgroupVersion {
    pub fn as_str(&self) -> &'static str {
        match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
            CgroupVersion::Hybrid => "hybrid",
            CgroupVersion::None => "none",
        }
    }

    /// The layout described by a `/proc/self/mountinfo` text.
    pub fn from_mountinfo(mountinfo: &str) -> CgroupVersion {
        let (mut v1, mut v2) = (false, false);
        for line in mountinfo.lines() {
            let Some((_, right)) = line.split_once(" - ") else {
                continue;
            };
            match right.split(' ').next() {
                Some("cgroup") => v1 = true,
                Some("cgroup2") => v2 = true,
                _ => {}
            }
        }
        match (v1, v2) {
            (true, true) => CgroupVersion::Hybrid,
            (true, false) => CgroupVersion::V1,
            (false, true) => CgroupVersion::V2,
            (false, false) => CgroupVersion::None,
        }
    }
}

/// What a certification depends on: the kind of host it was made on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostClass {
    /// `uname -r`.
    pub kernel_release: String,
    /// `PRETTY_NAME` of os-release.
    pub distro: String,
    pub cgroup_version: CgroupVersion,
    /// `model name` of `/proc/cpuinfo` (or the closest field there is).
    pub cpu_model: String,
    /// CPUs online.
    pub cpu_count: u32,
    /// `uname -m`.
    pub arch: String,
}

const UNKNOWN: &str = "unknown";

impl HostClass {
    /// Describe the running host. Never fails: what cannot be read is
    /// `unknown`.
    pub fn detect() -> HostClass {
        let (kernel_release, arch) = uname();
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let os_release = std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
            .unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_count = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(0)
            .max(cpuinfo_processors(&cpuinfo));
        HostClass {
            kernel_release,
            distro: pretty_name(&os_release).unwrap_or_else(|| UNKNOWN.to_string()),
            cgroup_version: CgroupVersion::from_mountinfo(&read("/proc/self/mountinfo")),
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| UNKNOWN.to_string()),
            cpu_count,
            arch,
        }
    }
}

fn uname() -> (String, String) {
    // SAFETY: utsname is plain old data; uname fills it and NUL-terminates
    // every field.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return (UNKNOWN.to_string(), std::env::consts::ARCH.to_string());
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&u.release), field(&u.machine))
}

/// `PRETTY_NAME` of an os-release file (quotes removed).
pub fn pretty_name(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|l| {
        let v = l.trim().strip_prefix("PRETTY_NAME=")?;
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        let v = v.replace("\\\"", "\"");
        (!v.is_empty()).then_some(v)
    })
}

/// The CPU model of a `/proc/cpuinfo` text (x86 `model name`, else the
/// fields other architectures use).
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    for key in [
        "model name",
        "Model",
        "cpu model",
        "Hardware",
        "cpu",
        "uarch",
    ] {
        let found = cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key && !v.trim().is_empty()).then(|| v.trim().to_string())
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

fn cpuinfo_processors(cpuinfo: &str) -> u32 {
    cpuinfo
        .lines()
        .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
        .count() as u32
}

/// The outcome of one `stacyvm certify` run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certification {
    pub provider: String,
    /// No check failed.
    pub passed: bool,
    /// When the run finished, RFC 3339 UTC.
    pub ran_at: String,
    pub host: HostClass,
    /// Version of the `stacyvm` binary that ran the suite.
    pub stacyvm_version: String,
    pub checks_passed: u32,
    pub checks_failed: u32,
    /// Checks of capabilities the provider does not claim.
    pub checks_skipped: u32,
}

fn valid_provider(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Certification {
    /// Directory of the records below a data directory.
    pub fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("certifications")
    }

    /// Path of a provider's record.
    pub fn path(data_dir: &Path, provider: &str) -> Result<PathBuf, CertificationError> {
        if !valid_provider(provider) {
            return Err(CertificationError::InvalidProvider(provider.to_string()));
        }
        Ok(Self::dir(data_dir).join(format!("{provider}.json")))
    }

    /// Whether the record was made on a host of the same class (kernel
    /// release, distribution, cgroup version, CPU model, architecture). The
    /// CPU count may differ.
    pub fn valid_for(&self, host: &HostClass) -> bool {
        let h = &self.host;
        h.kernel_release == host.kernel_release
            && h.distro == host.distro
            && h.cgroup_version == host.cgroup_version
            && h.cpu_model == host.cpu_model
            && h.arch == host.arch
    }

    /// Passed, and made on a host of this class: what `certified` means.
    pub fn certifies(&self, host: &HostClass) -> bool {
        self.passed && self.valid_for(host)
    }

    /// Write the record to `<data_dir>/certifications/<provider>.json`
    /// atomically (a temporary file renamed over the old record); creates
    /// the directory. Returns the record's path.
    pub fn save(&self, data_dir: &Path) -> Result<PathBuf, CertificationError> {
        let path = Self::path(data_dir, &self.provider)?;
        let dir = Self::dir(data_dir);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CertificationError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let text = serde_json::to_vec_pretty(self).map_err(|e| CertificationError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let tmp = dir.join(format!(".{}.json.{}", self.provider, std::process::id()));
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(&text)?;
            f.write_all(b"\n")?;
            f.sync_all()
        });
        if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, &path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&path)(e));
        }
        // Make the rename itself durable (best effort).
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(path)
    }

    /// A provider's record, `None` when there is none.
    pub fn load(
        data_dir: &Path,
        provider: &str,
    ) -> Result<Option<Certification>, CertificationError> {
        let path = Self::path(data_dir, provider)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CertificationError::Io { path, source }),
        };
        let c: Certification =
            serde_json::from_slice(&bytes).map_err(|e| CertificationError::Parse {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if c.provider != provider {
            return Err(CertificationError::Parse {
                path,
                message: format!("the record is for provider {:?}", c.provider),
            });
        }
        Ok(Some(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostClass {
        HostClass {
            kernel_release: "5.15.0-100-generic".into(),
            distro: "Ubuntu 22.04.4 LTS".into(),
            cgroup_version: CgroupVersion::Hybrid,
            cpu_model: "Intel(R) Xeon(R) CPU @ 2.20GHz".into(),
            cpu_count: 2,
            arch: "x86_64".into(),
        }
    }

    fn record() -> Certification {
        Certification {
            provider: "native".into(),
            passed: true,
            ran_at: "2026-05-10T10:00:00Z".into(),
            host: host(),
            stacyvm_version: "0.1.0".into(),
            checks_passed: 30,
            checks_failed: 0,
            checks_skipped: 2,
        }
    }

    #[test]
    fn serializes_with_stable_names() {
        let v = serde_json::to_value(record()).unwrap();
        assert_eq!(v["provider"], "native");
        assert_eq!(v["passed"], true);
        assert_eq!(v["ran_at"], "2026-05-10T10:00:00Z");
        assert_eq!(v["host"]["cgroup_version"], "hybrid");
        assert_eq!(v["host"]["cpu_count"], 2);
        assert_eq!(v["checks_skipped"], 2);
        let back: Certification = serde_json::from_value(v).unwrap();
        assert_eq!(back, record());
    }

    #[test]
    fn validity_follows_the_host_class() {
        let c = record();
        assert!(c.valid_for(&host()));
        assert!(c.certifies(&host()));
        let mut more_cpus = host();
        more_cpus.cpu_count = 64;
        assert!(c.valid_for(&more_cpus));
        let changes: [fn(&mut HostClass); 5] = [
            |h| h.kernel_release = "6.8.0".into(),
            |h| h.distro = "Debian GNU/Linux 12 (bookworm)".into(),
            |h| h.cgroup_version = CgroupVersion::V2,
            |h| h.cpu_model = "AMD EPYC 7B13".into(),
            |h| h.arch = "aarch64".into(),
        ];
        for change in changes {
            let mut h = host();
            change(&mut h);
            assert!(!c.valid_for(&h), "{h:?}");
        }
        let failed = Certification {
            passed: false,
            ..record()
        };
        assert!(failed.valid_for(&host()) && !failed.certifies(&host()));
    }

    #[test]
    fn save_and_load() {
        let dir = std::env::temp_dir().join(format!("stacyvm-cert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(Certification::load(&dir, "native").unwrap().is_none());
        let path = record().save(&dir).unwrap();
        assert_eq!(path, dir.join("certifications/native.json"));
        assert_eq!(Certification::load(&dir, "native").unwrap(), Some(record()));
        // Saving again replaces the record and leaves no temporary file.
        let again = Certification {
            passed: false,
            checks_failed: 1,
            ..record()
        };
        again.save(&dir).unwrap();
        assert_eq!(Certification::load(&dir, "native").unwrap(), Some(again));
        let names: Vec<_> = std::fs::read_dir(dir.join("certifications"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["native.json"]);
        // A record under another provider's name is refused.
        std::fs::write(
            dir.join("certifications/docker.json"),
            serde_json::to_vec(&record()).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            Certification::load(&dir, "docker"),
            Err(CertificationError::Parse { .. })
        ));
        std::fs::write(dir.join("certifications/docker.json"), b"{").unwrap();
        assert!(matches!(
            Certification::load(&dir, "docker"),
            Err(CertificationError::Parse { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn provider_names_are_file_names() {
        let dir = Path::new("/nonexistent");
        for bad in ["", "../x", "a/b", "Native", ".hidden"] {
            assert!(matches!(
                Certification::path(dir, bad),
                Err(CertificationError::InvalidProvider(_))
            ));
        }
        assert!(Certification::path(dir, "my-provider_2").is_ok());
    }

    #[test]
    fn parses_host_files() {
        assert_eq!(
            pretty_name("NAME=\"Debian\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n")
                .as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(
            pretty_name("PRETTY_NAME=Alpine\n").as_deref(),
            Some("Alpine")
        );
        assert_eq!(pretty_name("NAME=x\n"), None);
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpuinfo_processors(cpuinfo), 2);
        assert_eq!(
            cpu_model("processor : 0\nCPU part : 0xd0c\nModel : Raspberry Pi 4\n").as_deref(),
            Some("Raspberry Pi 4")
        );
        assert_eq!(cpu_model(""), None);
        let v1 = "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let v2 = "31 25 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let other = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n";
        assert_eq!(CgroupVersion::from_mountinfo(other), CgroupVersion::None);
        assert_eq!(
            CgroupVersion::from_mountinfo(&format!("{other}{v1}")),
            CgroupVersion::V1
        );
        assert_eq!(CgroupVersion::from_mountinfo(v2), CgroupVersion::V2);
        assert_eq!(
            CgroupVersion::from_mountinfo(&format!("{v1}{v2}")),
            CgroupVersion::Hybrid
        );
        let h = HostClass::detect();
        assert!(!h.kernel_release.is_empty() && !h.arch.is_empty() && h.cpu_count >= 1);
    }
}
