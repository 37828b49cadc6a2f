//! `docker-archive:FILE[:NAME:TAG|:@N]`: the output of `docker save` (and of skopeo's
//! docker-archive transport), read in place.
//!
//! The archive's `manifest.json` lists, per image, its config file, its repo tags and its layer
//! tar files. There is no registry manifest and layer files carry no blob digest: the config is
//! verified against its file name (`<hex>.json` or `blobs/sha256/<hex>`, the image id), and each
//! layer against the config's diff-id while it is unpacked.

use std::io::{self, Read};

use oci_spec::image::{Descriptor, ImageConfiguration};
use serde::Deserialize;

use super::ImageError;
use super::blob::{self, HashingReader};
use super::files::{SourceFiles, TarFiles};
use super::manifest::{self, BlobSource, MAX_JSON_BLOB, PlannedLayer, Resolved};

/// Media type recorded for docker-archive layers; compression is detected by magic number.
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Which image of the archive: the only one, one by repo tag, or one by position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Select {
    Only,
    Tag(String),
    Index(usize),
}

/// An opened docker archive with one image chosen.
#[derive(Debug)]
pub(crate) struct DockerArchive {
    files: TarFiles,
    name: String,
    image: ArchiveImage,
}

impl DockerArchive {
    pub(crate) fn open(
        files: TarFiles,
        name: String,
        select: &Select,
    ) -> Result<DockerArchive, ImageError> {
        let err = |reason: String| ImageError::Layout {
            layout: name.clone(),
            reason,
        };
        let (file, len) = files.open("manifest.json").map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                err("not a docker archive (no manifest.json)".into())
            } else {
                err(format!("manifest.json: {e}"))
            }
        })?;
        if len > MAX_JSON_BLOB {
            return Err(err(format!(
                "manifest.json: larger than {MAX_JSON_BLOB} bytes"
            )));
        }
        let mut bytes = Vec::new();
        file.take(MAX_JSON_BLOB)
            .read_to_end(&mut bytes)
            .map_err(|e| err(format!("manifest.json: {e}")))?;
        let images: Vec<ArchiveImage> = serde_json::from_slice(&bytes)
            .map_err(|e| err(format!("manifest.json: invalid json: {e}")))?;
        let tags = || -> Vec<String> {
            images
                .iter()
                .flat_map(|i| i.repo_tags.iter().flatten().cloned())
                .collect()
        };
        let index = match select {
            Select::Only if images.len() == 1 => 0,
            Select::Only => {
                return Err(err(format!(
                    "holds {} images; name one as docker-archive:FILE:NAME:TAG or :@N (tags: {})",
                    images.len(),
                    tags().join(", ")
                )));
            }
            Select::Index(i) if *i < images.len() => *i,
            Select::Index(i) => {
                return Err(err(format!(
                    "no image @{i} (the archive holds {})",
                    images.len()
                )));
            }
            Select::Tag(tag) => {
                let found = images.iter().position(|i| {
                    i.repo_tags
                        .iter()
                        .flatten()
                        .any(|t| t == tag || normalize_tag(t) == normalize_tag(tag))
                });
                match found {
                    Some(i) => i,
                    None => {
                        return Err(ImageError::NoSuchTag {
                            layout: name.clone(),
                            tag: tag.clone(),
                            have: tags(),
                        });
                    }
                }
            }
        };
        let image = images
            .into_iter()
            .nth(index)
            .ok_or_else(|| err("no image".into()))?;
        Ok(DockerArchive { files, name, image })
    }

    pub(crate) fn resolve(&self) -> Result<Resolved, ImageError> {
        let config_path = self.image.config.as_str();
        let hex = config_path
            .strip_prefix("blobs/sha256/")
            .or_else(|| config_path.strip_suffix(".json"))
            .unwrap_or("");
        let (file, len) = self
            .files
            .open(config_path)
            .map_err(|e| ImageError::Layout {
                layout: self.name.clone(),
                reason: format!("config {config_path}: {e}"),
            })?;
        if len > MAX_JSON_BLOB {
            return Err(ImageError::Layout {
                layout: self.name.clone(),
                reason: format!("config {config_path}: larger than {MAX_JSON_BLOB} bytes"),
            });
        }
        let mut reader = HashingReader::new(file, Some(len));
        let mut bytes = Vec::with_capacity(len as usize);
        reader
            .read_to_end(&mut bytes)
            .map_err(|e| ImageError::Layout {
                layout: self.name.clone(),
                reason: format!("config {config_path}: {e}"),
            })?;
        let config_digest = reader.digest();
        let named = format!("sha256:{hex}");
        if blob::parse_sha256(&named).is_some() && named != config_digest {
            return Err(ImageError::DigestMismatch {
                kind: "config",
                digest: named,
                got: config_digest,
            });
        }
        let config: ImageConfiguration = manifest::parse_json("config", &config_digest, &bytes)?;
        manifest::warn_other_platform(&self.name, &config);
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != self.image.layers.len() {
            return Err(ImageError::Invalid {
                kind: "config",
                digest: config_digest,
                reason: format!(
                    "rootfs has {} diff ids but the archive lists {} layers",
                    diff_ids.len(),
                    self.image.layers.len()
                ),
            });
        }
        let mut layers = Vec::with_capacity(diff_ids.len());
        for (path, diff_id) in self.image.layers.iter().zip(diff_ids) {
            let diff_id = manifest::checked_diff_id(&config_digest, diff_id)?;
            let (_, size) = self.files.open(path).map_err(|e| ImageError::BlobMissing {
                kind: "layer",
                digest: format!("{diff_id} ({e})"),
                path: self.files.display(path),
            })?;
            layers.push(PlannedLayer {
                digest: None,
                size,
                media_type: DOCKER_LAYER.to_owned(),
                diff_id,
                path: Some(path.clone()),
            });
        }
        Ok(Resolved {
            manifest_digest: None,
            config_digest,
            config,
            layers,
        })
    }
}

/// A repo tag in its fully spelled-out form (`busybox` -> `docker.io/library/busybox:latest`),
/// so `demo/web:1` matches the `docker.io/demo/web:1` skopeo writes.
fn normalize_tag(tag: &str) -> String {
    tag.parse::<oci_client::Reference>()
        .map(|r| r.whole())
        .unwrap_or_else(|_| tag.to_owned())
}

impl BlobSource for DockerArchive {
    fn name(&self) -> &str {
        &self.name
    }

    fn open_json(
        &self,
        kind: &'static str,
        desc: &Descriptor,
    ) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        Err(ImageError::Invalid {
            kind,
            digest: desc.digest().to_string(),
            reason: "a docker archive has no blobs addressed by digest".into(),
        })
    }

    fn open_layer(&self, layer: &PlannedLayer) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        let path = layer.path.as_deref().ok_or_else(|| ImageError::Invalid {
            kind: "layer",
            digest: layer.diff_id.clone(),
            reason: "not a layer of this archive".into(),
        })?;
        let (file, _) = self.files.open(path).map_err(|source| ImageError::Io {
            path: self.files.display(path),
            source,
        })?;
        Ok(file)
    }
}
