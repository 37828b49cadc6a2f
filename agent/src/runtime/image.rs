//! Images on this host: imports `oci:DIR[:TAG]` OCI image layouts into a content-addressed
//! layer store and remembers what was imported.
//!
//! Store layout (under the root the agent passes, `DATA_DIR/images`):
//!
//! ```text
//! layers/sha256/<diff-id hex>/   one unpacked layer, used as an overlayfs lowerdir
//! images/<sha256(reference)>.json   one imported image (see `ImageRecord`)
//! locks/<diff-id hex>.lock       held (flock) while that layer is being unpacked
//! tmp/layer-<diff-id hex>/       a layer being unpacked; renamed into layers/ when verified
//! ```
//!
//! **Invariant:** a directory under `layers/sha256/` is complete and verified: it only appears
//! there by `rename(2)` after the blob's size and digest and the tar stream's diff-id were
//! checked. Anything under `tmp/` is disposable.
//!
//! Whiteouts are stored in overlayfs form (`.wh.NAME` becomes a 0:0 character device `NAME`,
//! `.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on its directory), so a container's
//! rootfs is an overlay mount of the layer dirs with no copying.

mod blob;
mod layer;
mod layout;
mod unpack;
mod xattr;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::{debug, info, warn};

use layer::{LayerBlob, LayerStore};
use layout::OciLayout;

/// Images and their unpacked layers under one root (the agent passes `DATA_DIR/images`).
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    images: PathBuf,
    layers: LayerStore,
}

/// An imported image: what the runtime needs to build a container's rootfs and process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Image {
    /// The normalized reference: `oci:/absolute/dir` or `oci:/absolute/dir:TAG`.
    pub reference: String,
    /// Digest of the (platform-specific) image manifest, `sha256:<hex>`.
    pub manifest_digest: String,
    /// The image's execution defaults.
    pub config: ImageConfig,
    /// Unpacked layer dirs, lowest (base) first.
    pub layers: Vec<PathBuf>,
}

/// The execution defaults of an image (the `config` object of an OCI image configuration).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub stop_signal: Option<String>,
}

/// One line of `image ls`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageSummary {
    pub reference: String,
    pub manifest_digest: String,
    /// Number of layers.
    pub layers: usize,
    /// Sum of the sizes of the image's layer blobs as stored (compressed), in bytes.
    pub size: u64,
}

/// Why an image could not be imported or listed. Messages name the reference, path or digest.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    /// The layout itself is unusable (missing `oci-layout`, bad `index.json`, ...).
    #[error("{layout}: {reason}")]
    Layout { layout: String, reason: String },
    #[error("{layout}: no manifest tagged {tag:?} (have: {})", list_or_none(have))]
    NoSuchTag {
        layout: String,
        tag: String,
        have: Vec<String>,
    },
    #[error(
        "{layout}: index {index} has no manifest for {platform} (have: {})",
        list_or_none(have)
    )]
    NoPlatform {
        layout: String,
        index: String,
        platform: String,
        have: Vec<String>,
    },
    #[error("{kind} {digest}: blob missing ({})", path.display())]
    BlobMissing {
        kind: &'static str,
        digest: String,
        path: PathBuf,
    },
    #[error("{kind} {digest}: size mismatch (expected {expected} bytes, got {got})")]
    SizeMismatch {
        kind: &'static str,
        digest: String,
        expected: u64,
        got: u64,
    },
    #[error("{kind} {digest}: digest mismatch (got {got})")]
    DigestMismatch {
        kind: &'static str,
        digest: String,
        got: String,
    },
    #[error("layer {digest}: diff id mismatch (config says {expected}, got {got})")]
    DiffIdMismatch {
        digest: String,
        expected: String,
        got: String,
    },
    #[error("{kind} {digest}: unsupported media type {media_type}")]
    UnsupportedMediaType {
        kind: &'static str,
        digest: String,
        media_type: String,
    },
    /// A manifest, index or config that parses badly or says something impossible.
    #[error("{kind} {digest}: {reason}")]
    Invalid {
        kind: &'static str,
        digest: String,
        reason: String,
    },
    /// One tar entry of a layer was refused or could not be created.
    #[error("layer {digest}: entry {entry:?}: {reason}")]
    Entry {
        digest: String,
        entry: String,
        reason: String,
    },
    /// The layer stream could not be read (bad compression, bad tar).
    #[error("layer {digest}: {source}")]
    Unpack {
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

impl ImageError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io { path, source }
    }
}

/// What the store remembers about one imported image (`images/<sha256(reference)>.json`).
#[derive(Debug, Serialize, Deserialize)]
struct ImageRecord {
    reference: String,
    manifest_digest: String,
    config_digest: String,
    config: ImageConfig,
    /// Lowest (base) first.
    layers: Vec<LayerRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LayerRecord {
    diff_id: String,
    digest: String,
    media_type: String,
    size: u64,
}

/// A parsed `oci:DIR[:TAG]` reference.
#[derive(Debug, Clone, PartialEq)]
struct OciReference {
    dir: PathBuf,
    tag: Option<String>,
}

impl OciReference {
    /// Splits at the first `:` after `oci:`, as skopeo does: DIR cannot contain `:`.
    fn parse(reference: &str) -> Result<OciReference, ImageError> {
        let bad = |reason: &str| ImageError::BadReference {
            reference: reference.to_owned(),
            reason: reason.to_owned(),
        };
        let Some(rest) = reference.strip_prefix("oci:") else {
            return Err(bad("only oci:DIR[:TAG] references are supported for now"));
        };
        let (dir, tag) = match rest.split_once(':') {
            Some((dir, tag)) => (dir, (!tag.is_empty()).then_some(tag)),
            None => (rest, None),
        };
        if dir.is_empty() {
            return Err(bad("empty directory"));
        }
        if let Some(tag) = tag
            && tag.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(bad("tag contains whitespace or control characters"));
        }
        Ok(OciReference {
            dir: PathBuf::from(dir),
            tag: tag.map(str::to_owned),
        })
    }

    /// The reference with DIR made absolute (symlinks resolved), as recorded in the store.
    fn normalize(&self) -> Result<(PathBuf, String), ImageError> {
        let dir = fs::canonicalize(&self.dir).map_err(|source| ImageError::Layout {
            layout: format!("oci:{}", self.dir.display()),
            reason: source.to_string(),
        })?;
        let reference = match &self.tag {
            Some(tag) => format!("oci:{}:{tag}", dir.display()),
            None => format!("oci:{}", dir.display()),
        };
        Ok((dir, reference))
    }
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<ImageStore, ImageError> {
        let root = std::path::absolute(root).map_err(ImageError::io(root))?;
        let images = root.join("images");
        fs::create_dir_all(&images).map_err(ImageError::io(&images))?;
        let layers = LayerStore::open(&root)?;
        Ok(ImageStore {
            root,
            images,
            layers,
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Imports `oci:DIR[:TAG]` (an OCI image layout as written by skopeo/umoci).
    ///
    /// Picks the manifest of `index.json` annotated `org.opencontainers.image.ref.name` = TAG
    /// (TAG defaults to `latest`; with no TAG and no `latest`, the index's only manifest),
    /// follows image indexes to the host's platform, verifies every blob's size and digest
    /// and unpacks the layers that are not in the store yet. Importing again is cheap: present
    /// layers are neither read nor unpacked again.
    #[tracing::instrument(skip_all, fields(image = %reference))]
    pub fn import(&self, reference: &str) -> Result<Image, ImageError> {
        let parsed = OciReference::parse(reference)?;
        let (dir, normalized) = parsed.normalize()?;
        let layout = OciLayout::open(&dir)?;
        let resolved = layout.resolve(parsed.tag.as_deref())?;
        let diff_ids = resolved.config.rootfs().diff_ids();
        let manifest_layers = resolved.manifest.layers();
        if diff_ids.len() != manifest_layers.len() {
            return Err(ImageError::Invalid {
                kind: "config",
                digest: resolved.config_digest.clone(),
                reason: format!(
                    "rootfs has {} diff ids but manifest {} has {} layers",
                    diff_ids.len(),
                    resolved.manifest_digest,
                    manifest_layers.len()
                ),
            });
        }

        let mut layers = Vec::with_capacity(manifest_layers.len());
        let mut records = Vec::with_capacity(manifest_layers.len());
        for (desc, diff_id) in manifest_layers.iter().zip(diff_ids) {
            let digest = blob::sha256_of(desc.digest(), "layer")?.to_owned();
            let diff_id = blob::parse_sha256(diff_id).ok_or_else(|| ImageError::Invalid {
                kind: "config",
                digest: resolved.config_digest.clone(),
                reason: format!("invalid diff id {diff_id:?} (only sha256 is supported)"),
            })?;
            let media_type = desc.media_type().to_string();
            let lb = LayerBlob {
                digest: &digest,
                size: desc.size(),
                media_type: &media_type,
                diff_id: &diff_id,
            };
            let path = self
                .layers
                .ensure(&lb, || layout.open_blob("layer", &digest, desc.size()))?;
            layers.push(path);
            records.push(LayerRecord {
                diff_id,
                digest,
                media_type,
                size: desc.size(),
            });
        }

        let config = image_config(&resolved.config);
        let record = ImageRecord {
            reference: normalized.clone(),
            manifest_digest: resolved.manifest_digest.clone(),
            config_digest: resolved.config_digest.clone(),
            config: config.clone(),
            layers: records,
        };
        self.write_record(&record)?;
        info!(manifest = %record.manifest_digest, layers = layers.len(), "image imported");
        Ok(Image {
            reference: normalized,
            manifest_digest: resolved.manifest_digest,
            config,
            layers,
        })
    }

    /// The image recorded under `reference` (normalized as `import` does), if it was imported
    /// and all its layers are still in the store. Does not read the layout.
    pub fn get(&self, reference: &str) -> Result<Option<Image>, ImageError> {
        let (_, normalized) = OciReference::parse(reference)?.normalize()?;
        let path = self.record_path(&normalized);
        let Some(record) = read_record(&path)? else {
            return Ok(None);
        };
        let mut layers = Vec::with_capacity(record.layers.len());
        for l in &record.layers {
            let Some(path) = self.layers.existing(&l.diff_id) else {
                debug!(diff_id = %l.diff_id, "layer of a recorded image is missing");
                return Ok(None);
            };
            layers.push(path);
        }
        Ok(Some(Image {
            reference: record.reference,
            manifest_digest: record.manifest_digest,
            config: record.config,
            layers,
        }))
    }

    /// Lists imported images (reference, manifest digest, layer count, size), by reference.
    /// Unreadable records are skipped with a warning.
    pub fn list(&self) -> Result<Vec<ImageSummary>, ImageError> {
        let entries = fs::read_dir(&self.images).map_err(ImageError::io(&self.images))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(ImageError::io(&self.images))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match read_record(&path) {
                Ok(Some(r)) => out.push(ImageSummary {
                    size: r.layers.iter().map(|l| l.size).sum(),
                    layers: r.layers.len(),
                    reference: r.reference,
                    manifest_digest: r.manifest_digest,
                }),
                Ok(None) => {}
                Err(e) => warn!(error = %e, "skipping unreadable image record"),
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    fn record_path(&self, normalized_reference: &str) -> PathBuf {
        let name = hex::encode(Sha256::digest(normalized_reference.as_bytes()));
        self.images.join(format!("{name}.json"))
    }

    /// Writes the record atomically (temp file + rename), so a reader never sees half of it.
    fn write_record(&self, record: &ImageRecord) -> Result<(), ImageError> {
        let path = self.record_path(&record.reference);
        // Unique among this process's threads and other processes.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_extension(format!("json.tmp.{}.{seq}", std::process::id()));
        let json = serde_json::to_vec_pretty(record).map_err(|e| ImageError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&tmp);
            ImageError::Io {
                path: path.clone(),
                source,
            }
        })
    }
}

fn read_record(path: &Path) -> Result<Option<ImageRecord>, ImageError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ImageError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ImageError::Io {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })
}

fn image_config(config: &oci_spec::image::ImageConfiguration) -> ImageConfig {
    let Some(c) = config.config() else {
        return ImageConfig::default();
    };
    ImageConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().unwrap_or_default(),
        user: c.user().clone().unwrap_or_default(),
        stop_signal: c.stop_signal().clone().filter(|s| !s.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let r = OciReference::parse("oci:/x/y:v2").expect("valid");
        assert_eq!(r.dir, PathBuf::from("/x/y"));
        assert_eq!(r.tag.as_deref(), Some("v2"));
        let r = OciReference::parse("oci:rel").expect("valid");
        assert_eq!(r.dir, PathBuf::from("rel"));
        assert_eq!(r.tag, None);
        let r = OciReference::parse("oci:/x:").expect("valid");
        assert_eq!(r.tag, None);
        for bad in ["docker://x", "oci:", "oci::tag", "oci:/x:a b", "/x"] {
            let e = OciReference::parse(bad).expect_err(bad);
            assert!(e.to_string().starts_with("invalid image reference"), "{e}");
        }
    }

    #[test]
    fn error_messages_name_tags_and_digests() {
        let e = ImageError::NoSuchTag {
            layout: "oci:/x".into(),
            tag: "v2".into(),
            have: vec!["latest".into(), "1.0".into()],
        };
        assert_eq!(
            e.to_string(),
            r#"oci:/x: no manifest tagged "v2" (have: latest, 1.0)"#
        );
        let e = ImageError::DigestMismatch {
            kind: "layer",
            digest: "sha256:ab12".into(),
            got: "sha256:cd34".into(),
        };
        assert_eq!(
            e.to_string(),
            "layer sha256:ab12: digest mismatch (got sha256:cd34)"
        );
    }

    #[test]
    fn list_skips_garbage_and_missing_layers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::open(dir.path()).expect("open");
        fs::write(dir.path().join("images/junk.json"), b"{").expect("write");
        fs::write(dir.path().join("images/notes.txt"), b"x").expect("write");
        assert!(store.list().expect("list").is_empty());
        let missing = dir.path().join("missing-layout");
        let e = store
            .import(&format!("oci:{}", missing.display()))
            .expect_err("missing dir");
        assert!(e.to_string().contains("missing-layout"), "{e}");
    }
}
