//! From a manifest descriptor to a verified image: follows image indexes to the host's
//! platform, reads the manifest and the config, and lists the layers to make present. Shared by
//! every source that has OCI/Docker v2 manifests (OCI layouts, OCI archives, registries).

use std::io::Read;

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::de::DeserializeOwned;
use tracing::warn;

use super::ImageError;
use super::blob::{self, HashingReader};

/// Manifests, indexes and configs larger than this are refused (they are small JSON documents).
pub(crate) const MAX_JSON_BLOB: u64 = 8 << 20;
/// How deep image indexes may nest.
const MAX_INDEX_DEPTH: usize = 4;

pub(crate) const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
pub(crate) const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// A place manifests, configs and layers are read from.
pub(crate) trait BlobSource: Sync {
    /// The source as the user named it (`oci:/dir`, `127.0.0.1:5000/app:1`), for errors.
    fn name(&self) -> &str;
    /// Reads the blob `desc` (a manifest, index or config of at most [`MAX_JSON_BLOB`]
    /// bytes) as a stream. The caller verifies size and digest.
    fn open_json(
        &self,
        kind: &'static str,
        desc: &Descriptor,
    ) -> Result<Box<dyn Read + Send + '_>, ImageError>;
    /// Opens the blob of `layer` for streaming. The caller verifies it.
    fn open_layer(&self, layer: &PlannedLayer) -> Result<Box<dyn Read + Send + '_>, ImageError>;
}

/// An image chosen from a source: config verified, layers listed (not yet fetched).
#[derive(Debug)]
pub(crate) struct Resolved {
    /// The platform-specific manifest's digest; `None` for `docker save` archives, which
    /// have no manifest in the registry sense.
    pub(crate) manifest_digest: Option<String>,
    pub(crate) config_digest: String,
    pub(crate) config: ImageConfiguration,
    /// Lowest (base) first.
    pub(crate) layers: Vec<PlannedLayer>,
}

/// One layer of a resolved image.
#[derive(Debug, Clone)]
pub(crate) struct PlannedLayer {
    /// The blob's digest (compressed form), when the source has one. Without it (docker
    /// archives), the diff-id alone verifies the content.
    pub(crate) digest: Option<String>,
    pub(crate) size: u64,
    pub(crate) media_type: String,
    pub(crate) diff_id: String,
    /// Where the source keeps it, when not addressed by digest (a docker archive's member).
    pub(crate) path: Option<String>,
}

/// Reads a small JSON blob, verifies its size and digest, and parses it.
pub(crate) fn read_json<T: DeserializeOwned>(
    src: &dyn BlobSource,
    kind: &'static str,
    desc: &Descriptor,
) -> Result<(String, T), ImageError> {
    let digest = blob::sha256_of(desc.digest(), kind)?.to_owned();
    if desc.size() > MAX_JSON_BLOB {
        return Err(ImageError::Invalid {
            kind,
            digest,
            reason: format!("{} bytes is too large (limit {MAX_JSON_BLOB})", desc.size()),
        });
    }
    let stream = src.open_json(kind, desc)?;
    let mut reader = HashingReader::new(stream, Some(desc.size()));
    let mut bytes = Vec::with_capacity(desc.size() as usize);
    let read = reader.read_to_end(&mut bytes);
    if reader.count() != desc.size() {
        return Err(ImageError::SizeMismatch {
            kind,
            digest,
            expected: desc.size(),
            got: reader.count(),
        });
    }
    read.map_err(|e| ImageError::Invalid {
        kind,
        digest: digest.clone(),
        reason: format!("reading: {e}"),
    })?;
    let got = reader.digest();
    if got != digest {
        return Err(ImageError::DigestMismatch { kind, digest, got });
    }
    parse_json(kind, &digest, &bytes).map(|v| (digest, v))
}

pub(crate) fn parse_json<T: DeserializeOwned>(
    kind: &'static str,
    digest: &str,
    bytes: &[u8],
) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Invalid {
        kind,
        digest: digest.to_owned(),
        reason: format!("invalid json: {e}"),
    })
}

/// Follows `desc` (an index or a manifest) to the host's platform and reads the manifest and
/// config.
pub(crate) fn resolve_descriptor(
    src: &dyn BlobSource,
    desc: Descriptor,
) -> Result<Resolved, ImageError> {
    let mut desc = desc;
    for _ in 0..=MAX_INDEX_DEPTH {
        let digest = blob::sha256_of(desc.digest(), "manifest")?.to_owned();
        let media_type = desc.media_type().to_string();
        if INDEX_TYPES.contains(&media_type.as_str()) {
            let (digest, index): (String, ImageIndex) = read_json(src, "index", &desc)?;
            let refs: Vec<&Descriptor> = index.manifests().iter().collect();
            desc = pick_platform(src.name(), &digest, &refs)?.clone();
            continue;
        }
        if !MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Err(ImageError::UnsupportedMediaType {
                kind: "manifest",
                digest,
                media_type,
            });
        }
        let (manifest_digest, manifest): (String, ImageManifest) =
            read_json(src, "manifest", &desc)?;
        return resolve_manifest(src, manifest_digest, &manifest);
    }
    Err(ImageError::Invalid {
        kind: "index",
        digest: desc.digest().to_string(),
        reason: format!("image indexes nested more than {MAX_INDEX_DEPTH} deep"),
    })
}

fn resolve_manifest(
    src: &dyn BlobSource,
    manifest_digest: String,
    manifest: &ImageManifest,
) -> Result<Resolved, ImageError> {
    let config_desc = manifest.config();
    let config_type = config_desc.media_type().to_string();
    let config_digest = blob::sha256_of(config_desc.digest(), "config")?.to_owned();
    if !CONFIG_TYPES.contains(&config_type.as_str()) {
        return Err(ImageError::UnsupportedMediaType {
            kind: "config",
            digest: config_digest,
            media_type: config_type,
        });
    }
    let (config_digest, config): (String, ImageConfiguration) =
        read_json(src, "config", config_desc)?;
    warn_other_platform(&manifest_digest, &config);
    let diff_ids = config.rootfs().diff_ids();
    let manifest_layers = manifest.layers();
    if diff_ids.len() != manifest_layers.len() {
        return Err(ImageError::Invalid {
            kind: "config",
            digest: config_digest,
            reason: format!(
                "rootfs has {} diff ids but manifest {manifest_digest} has {} layers",
                diff_ids.len(),
                manifest_layers.len()
            ),
        });
    }
    let mut layers = Vec::with_capacity(manifest_layers.len());
    for (desc, diff_id) in manifest_layers.iter().zip(diff_ids) {
        let digest = blob::sha256_of(desc.digest(), "layer")?.to_owned();
        layers.push(PlannedLayer {
            digest: Some(digest),
            size: desc.size(),
            media_type: desc.media_type().to_string(),
            diff_id: checked_diff_id(&config_digest, diff_id)?,
            path: None,
        });
    }
    Ok(Resolved {
        manifest_digest: Some(manifest_digest),
        config_digest,
        config,
        layers,
    })
}

pub(crate) fn checked_diff_id(config_digest: &str, diff_id: &str) -> Result<String, ImageError> {
    blob::parse_sha256(diff_id).ok_or_else(|| ImageError::Invalid {
        kind: "config",
        digest: config_digest.to_owned(),
        reason: format!("invalid diff id {diff_id:?} (only sha256 is supported)"),
    })
}

pub(crate) fn warn_other_platform(what: &str, config: &ImageConfiguration) {
    let (os, arch) = host_platform();
    if *config.os() != os || *config.architecture() != arch {
        warn!(
            image = %what,
            image_platform = %format!("{}/{}", config.os(), config.architecture()),
            "image is built for another platform than this host"
        );
    }
}

/// The descriptor among `descs` for this host's os/architecture.
pub(crate) fn pick_platform<'a>(
    source: &str,
    index: &str,
    descs: &[&'a Descriptor],
) -> Result<&'a Descriptor, ImageError> {
    let (os, arch) = host_platform();
    let matching = descs.iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == os && *p.architecture() == arch)
    });
    if let Some(d) = matching {
        return Ok(d);
    }
    // A lone manifest that does not say its platform is taken as is.
    if let [d] = descs
        && d.platform().is_none()
    {
        return Ok(d);
    }
    let have = descs
        .iter()
        .map(|d| match d.platform() {
            Some(p) => format!("{}/{}", p.os(), p.architecture()),
            None => format!("{} (no platform)", d.digest()),
        })
        .collect();
    Err(ImageError::NoPlatform {
        layout: source.to_owned(),
        index: index.to_owned(),
        platform: format!("{os}/{arch}"),
        have,
    })
}

/// The OCI os/architecture of this host.
pub(crate) fn host_platform() -> (Os, Arch) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        "x86" => Arch::i386,
        "arm" => Arch::ARM,
        "riscv64" => Arch::RISCV64,
        "powerpc64" => Arch::PowerPC64le,
        "s390x" => Arch::s390x,
        other => Arch::from(other),
    };
    (Os::Linux, arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_platform_is_linux() {
        let (os, _) = host_platform();
        assert_eq!(os, Os::Linux);
    }
}
