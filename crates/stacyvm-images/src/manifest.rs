//! Wire types of the OCI image spec and Docker's v2 schema 2: indexes
//! (manifest lists), manifests and image configs. Only the fields the store
//! uses are modelled; unknown fields are ignored.

use crate::ImageError;
use serde::{Deserialize, Serialize};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// `Accept` header of manifest requests: every format the store can read.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// The image config blob (`application/vnd.oci.image.config.v1+json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ContainerConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerConfig {
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// What a manifest endpoint returned.
#[derive(Debug)]
pub enum ManifestKind {
    Index(Index),
    Manifest(Manifest),
}

/// Decide what a manifest body is, from the `Content-Type` and the body's own
/// `mediaType`/shape.
pub fn parse_manifest(content_type: Option<&str>, body: &[u8]) -> Result<ManifestKind, ImageError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ImageError::Corrupt(format!("manifest is not JSON: {e}")))?;
    let ct = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim().to_string())
        .filter(|c| c.starts_with("application/vnd."));
    let media_type = ct.or_else(|| {
        value
            .get("mediaType")
            .and_then(|m| m.as_str())
            .map(str::to_string)
    });
    let kind = match media_type.as_deref() {
        Some(OCI_INDEX) | Some(DOCKER_LIST) => "index",
        Some(OCI_MANIFEST) | Some(DOCKER_MANIFEST) => "manifest",
        Some(m) if m.starts_with("application/vnd.docker.distribution.manifest.v1") => {
            return Err(ImageError::Unsupported(
                "Docker schema 1 manifests are deprecated and not supported".to_string(),
            ))
        }
        Some(m)
            if m.starts_with("application/vnd.docker.")
                || m.starts_with("application/vnd.oci.") =>
        {
            return Err(ImageError::Unsupported(format!(
                "manifest media type {m} is not supported"
            )))
        }
        // No (usable) media type: an OCI index or manifest may omit it.
        _ if value.get("manifests").is_some() => "index",
        _ if value.get("layers").is_some() => "manifest",
        _ => {
            return Err(ImageError::Corrupt(
                "manifest is neither an image index nor an image manifest".to_string(),
            ))
        }
    };
    if kind == "index" {
        let index: Index = serde_json::from_value(value)
            .map_err(|e| ImageError::Corrupt(format!("bad image index: {e}")))?;
        Ok(ManifestKind::Index(index))
    } else {
        let manifest: Manifest = serde_json::from_value(value)
            .map_err(|e| ImageError::Corrupt(format!("bad image manifest: {e}")))?;
        if manifest.schema_version != 2 {
            return Err(ImageError::Unsupported(format!(
                "manifest schema version {}",
                manifest.schema_version
            )));
        }
        Ok(ManifestKind::Manifest(manifest))
    }
}

/// The architecture name (GOARCH) of this machine.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// The index entry for `linux/<arch>`; for arm64 an entry without variant or
/// with `v8` is preferred.
pub fn pick_platform<'a>(index: &'a Index, arch: &str) -> Option<&'a Descriptor> {
    let candidates: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .collect();
    candidates
        .iter()
        .find(|d| {
            let v = d.platform.as_ref().and_then(|p| p.variant.as_deref());
            v.is_none() || (arch == "arm64" && v == Some("v8"))
        })
        .or(candidates.first())
        .copied()
}

/// Platforms listed in an index, for error messages.
pub fn platforms(index: &Index) -> String {
    let mut v: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| match &p.variant {
            Some(var) => format!("{}/{}/{}", p.os, p.architecture, var),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    v.dedup();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFormat {
    /// Plain tar or gzip; the magic bytes decide.
    TarMaybeGzip,
    Zstd,
}

pub fn layer_format(media_type: &str) -> Result<LayerFormat, ImageError> {
    let m = media_type;
    if m.contains("zstd") {
        return Ok(LayerFormat::Zstd);
    }
    let known = m.is_empty()
        || m.starts_with("application/vnd.oci.image.layer.")
        || m.starts_with("application/vnd.docker.image.rootfs.");
    if known {
        Ok(LayerFormat::TarMaybeGzip)
    } else {
        Err(ImageError::Unsupported(format!(
            "layer media type {m} is not a container filesystem layer"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_kinds() {
        let idx = br#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:a","size":1,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},{"digest":"sha256:b","size":1,"platform":{"os":"linux","architecture":"amd64"}},{"digest":"sha256:c","size":1,"platform":{"os":"unknown","architecture":"unknown"}}]}"#;
        let ManifestKind::Index(i) = parse_manifest(Some(OCI_INDEX), idx).unwrap() else {
            panic!("index expected")
        };
        assert_eq!(pick_platform(&i, "amd64").unwrap().digest, "sha256:b");
        assert_eq!(pick_platform(&i, "arm64").unwrap().digest, "sha256:a");
        assert!(pick_platform(&i, "s390x").is_none());
        assert_eq!(
            platforms(&i),
            "linux/arm64/v8, linux/amd64, unknown/unknown"
        );
        // Shape decides when the content type is generic.
        assert!(matches!(
            parse_manifest(Some("application/json"), idx).unwrap(),
            ManifestKind::Index(_)
        ));
        let man = br#"{"schemaVersion":2,"config":{"digest":"sha256:c","size":2},"layers":[]}"#;
        assert!(matches!(
            parse_manifest(None, man).unwrap(),
            ManifestKind::Manifest(_)
        ));
        assert!(matches!(
            parse_manifest(
                Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
                man
            ),
            Err(ImageError::Unsupported(_))
        ));
        assert!(matches!(
            parse_manifest(None, b"{}"),
            Err(ImageError::Corrupt(_))
        ));
        assert!(matches!(
            parse_manifest(None, b"nope"),
            Err(ImageError::Corrupt(_))
        ));
    }

    #[test]
    fn layer_formats() {
        assert_eq!(
            layer_format("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
            LayerFormat::TarMaybeGzip
        );
        assert_eq!(
            layer_format("application/vnd.oci.image.layer.v1.tar").unwrap(),
            LayerFormat::TarMaybeGzip
        );
        assert_eq!(
            layer_format("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            LayerFormat::Zstd
        );
        assert!(layer_format("application/vnd.cncf.helm.chart.content.v1.tar+gzip").is_err());
    }
}
