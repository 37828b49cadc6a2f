//! Reading an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`): from a tag to
//! a verified image manifest and config.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::de::DeserializeOwned;
use tracing::warn;

use super::ImageError;
use super::blob::{self, HashingReader};

/// The annotation naming a manifest in `index.json`.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Manifests, indexes and configs larger than this are refused (they are small JSON documents).
const MAX_JSON_BLOB: u64 = 8 << 20;
/// How deep image indexes may nest.
const MAX_INDEX_DEPTH: usize = 4;

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// An opened OCI image layout directory.
#[derive(Debug)]
pub(crate) struct OciLayout {
    dir: PathBuf,
    /// `oci:DIR`, for error messages.
    name: String,
}

/// The image chosen from a layout: its manifest and config, both verified.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub(crate) manifest_digest: String,
    pub(crate) manifest: ImageManifest,
    pub(crate) config_digest: String,
    pub(crate) config: ImageConfiguration,
}

impl OciLayout {
    pub(crate) fn open(dir: &Path) -> Result<OciLayout, ImageError> {
        let layout = OciLayout {
            dir: dir.to_owned(),
            name: format!("oci:{}", dir.display()),
        };
        let marker = dir.join("oci-layout");
        let bytes = match read_capped(&marker) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(layout.err("not an OCI image layout (no oci-layout file)"));
            }
            Err(e) => return Err(layout.err(format!("oci-layout: {e}"))),
        };
        let version = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("imageLayoutVersion")?.as_str().map(str::to_owned));
        match version.as_deref() {
            Some("1.0.0") => Ok(layout),
            Some(v) => Err(layout.err(format!("unsupported imageLayoutVersion {v:?}"))),
            None => Err(layout.err("oci-layout: no imageLayoutVersion")),
        }
    }

    fn err(&self, reason: impl Into<String>) -> ImageError {
        ImageError::Layout {
            layout: self.name.clone(),
            reason: reason.into(),
        }
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(blob::hex_of(digest))
    }

    /// Opens the blob `digest` (a validated sha256 digest) after checking its size on disk.
    /// The caller verifies the digest while it reads.
    pub(crate) fn open_blob(
        &self,
        kind: &'static str,
        digest: &str,
        size: u64,
    ) -> Result<File, ImageError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                ImageError::BlobMissing {
                    kind,
                    digest: digest.to_owned(),
                    path: path.clone(),
                }
            } else {
                ImageError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let meta = file.metadata().map_err(ImageError::io(&path))?;
        if !meta.is_file() {
            return Err(ImageError::Invalid {
                kind,
                digest: digest.to_owned(),
                reason: format!("{} is not a regular file", path.display()),
            });
        }
        if meta.len() != size {
            return Err(ImageError::SizeMismatch {
                kind,
                digest: digest.to_owned(),
                expected: size,
                got: meta.len(),
            });
        }
        Ok(file)
    }

    /// Reads a small JSON blob, verifies its size and digest, and parses it.
    fn read_json<T: DeserializeOwned>(
        &self,
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
        let file = self.open_blob(kind, &digest, desc.size())?;
        let mut reader = HashingReader::new(file, Some(desc.size()));
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
        read.map_err(ImageError::io(self.blob_path(&digest)))?;
        let got = reader.digest();
        if got != digest {
            return Err(ImageError::DigestMismatch { kind, digest, got });
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
            kind,
            digest: digest.clone(),
            reason: format!("invalid json: {e}"),
        })?;
        Ok((digest, value))
    }

    /// Picks the manifest for `tag` (see [`super::ImageStore::import`]), follows indexes to the
    /// host's platform, and reads the manifest and config.
    pub(crate) fn resolve(&self, tag: Option<&str>) -> Result<Resolved, ImageError> {
        let index_path = self.dir.join("index.json");
        let bytes = read_capped(&index_path).map_err(|e| self.err(format!("index.json: {e}")))?;
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| self.err(format!("index.json: invalid json: {e}")))?;

        let mut tags: Vec<String> = Vec::new();
        for name in index.manifests().iter().filter_map(ref_name) {
            if !tags.contains(&name) {
                tags.push(name);
            }
        }
        let wanted = tag.unwrap_or("latest");
        let mut candidates: Vec<&Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| ref_name(d).as_deref() == Some(wanted))
            .collect();
        if candidates.is_empty() && tag.is_none() {
            // No TAG and no "latest": an index with one manifest, or untagged per-platform
            // manifests, still names one image.
            if index.manifests().len() == 1 || tags.is_empty() {
                candidates = index.manifests().iter().collect();
            }
        }
        let desc = match candidates.as_slice() {
            [] => {
                return Err(ImageError::NoSuchTag {
                    layout: self.name.clone(),
                    tag: wanted.to_owned(),
                    have: tags,
                });
            }
            [one] => (*one).clone(),
            several => self.pick_platform("index.json", several)?.clone(),
        };
        self.resolve_descriptor(desc, 0)
    }

    fn resolve_descriptor(&self, desc: Descriptor, depth: usize) -> Result<Resolved, ImageError> {
        let digest = blob::sha256_of(desc.digest(), "manifest")?.to_owned();
        let media_type = desc.media_type().to_string();
        if INDEX_TYPES.contains(&media_type.as_str()) {
            if depth >= MAX_INDEX_DEPTH {
                return Err(ImageError::Invalid {
                    kind: "index",
                    digest,
                    reason: format!("image indexes nested more than {MAX_INDEX_DEPTH} deep"),
                });
            }
            let (digest, index): (String, ImageIndex) = self.read_json("index", &desc)?;
            let refs: Vec<&Descriptor> = index.manifests().iter().collect();
            let next = self.pick_platform(&digest, &refs)?.clone();
            return self.resolve_descriptor(next, depth + 1);
        }
        if !MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Err(ImageError::UnsupportedMediaType {
                kind: "manifest",
                digest,
                media_type,
            });
        }
        let (manifest_digest, manifest): (String, ImageManifest) =
            self.read_json("manifest", &desc)?;
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
            self.read_json("config", config_desc)?;
        let (os, arch) = host_platform();
        if *config.os() != os || *config.architecture() != arch {
            warn!(
                manifest = %manifest_digest,
                image_platform = %format!("{}/{}", config.os(), config.architecture()),
                "image is built for another platform than this host"
            );
        }
        Ok(Resolved {
            manifest_digest,
            manifest,
            config_digest,
            config,
        })
    }

    /// The descriptor among `descs` for this host's os/architecture.
    fn pick_platform<'a>(
        &self,
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
            layout: self.name.clone(),
            index: index.to_owned(),
            platform: format!("{os}/{arch}"),
            have,
        })
    }
}

fn ref_name(d: &Descriptor) -> Option<String> {
    d.annotations().as_ref()?.get(REF_NAME).cloned()
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

/// Reads a small file (`index.json`, `oci-layout`), refusing anything absurdly large.
fn read_capped(path: &Path) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_JSON_BLOB + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_JSON_BLOB {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_JSON_BLOB} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn missing_marker_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = OciLayout::open(dir.path()).expect_err("no oci-layout");
        assert!(e.to_string().contains("not an OCI image layout"), "{e}");
        fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"2.0.0"}"#,
        )
        .expect("write");
        let e = OciLayout::open(dir.path()).expect_err("bad version");
        assert!(e.to_string().contains("2.0.0"), "{e}");
    }

    #[test]
    fn host_platform_is_linux() {
        let (os, _) = host_platform();
        assert_eq!(os, Os::Linux);
    }
}
