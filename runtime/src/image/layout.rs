//! Reading an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) from a
//! directory or an archive of one: from a tag to a verified image manifest and config.

use std::io::{self, Read};

use oci_spec::image::{Descriptor, ImageIndex};

use super::ImageError;
use super::blob;
use super::files::SourceFiles;
use super::manifest::{self, BlobSource, MAX_JSON_BLOB, PlannedLayer, Resolved};

/// The annotation naming a manifest in `index.json`.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An opened OCI image layout.
#[derive(Debug)]
pub(crate) struct OciLayout {
    files: Box<dyn SourceFiles>,
    /// `oci:DIR` or `oci-archive:FILE`, for error messages.
    name: String,
}

impl OciLayout {
    pub(crate) fn open(files: Box<dyn SourceFiles>, name: String) -> Result<OciLayout, ImageError> {
        let layout = OciLayout { files, name };
        let bytes = match layout.read_small("oci-layout") {
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

    /// Reads a small file (`index.json`, `oci-layout`), refusing anything absurdly large.
    fn read_small(&self, path: &str) -> io::Result<Vec<u8>> {
        let (file, len) = self.files.open(path)?;
        if len > MAX_JSON_BLOB {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {MAX_JSON_BLOB} bytes"),
            ));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(MAX_JSON_BLOB).read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Opens the blob `digest` (a validated sha256 digest) after checking its size.
    /// The caller verifies the digest while it reads.
    fn open_blob(
        &self,
        kind: &'static str,
        digest: &str,
        size: u64,
    ) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        let path = format!("blobs/sha256/{}", blob::hex_of(digest));
        let (file, len) = self.files.open(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                ImageError::BlobMissing {
                    kind,
                    digest: digest.to_owned(),
                    path: self.files.display(&path),
                }
            } else {
                ImageError::Io {
                    path: self.files.display(&path),
                    source,
                }
            }
        })?;
        if len != size {
            return Err(ImageError::SizeMismatch {
                kind,
                digest: digest.to_owned(),
                expected: size,
                got: len,
            });
        }
        Ok(file)
    }

    /// Picks the manifest for `tag` (see [`super::ImageStore::import`]), follows indexes to the
    /// host's platform, and reads the manifest and config.
    pub(crate) fn resolve(&self, tag: Option<&str>) -> Result<Resolved, ImageError> {
        let bytes = self
            .read_small("index.json")
            .map_err(|e| self.err(format!("index.json: {e}")))?;
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
            several => manifest::pick_platform(&self.name, "index.json", several)?.clone(),
        };
        manifest::resolve_descriptor(self, desc)
    }
}

impl BlobSource for OciLayout {
    fn name(&self) -> &str {
        &self.name
    }

    fn open_json(
        &self,
        kind: &'static str,
        desc: &Descriptor,
    ) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        let digest = blob::sha256_of(desc.digest(), kind)?;
        self.open_blob(kind, digest, desc.size())
    }

    fn open_layer(&self, layer: &PlannedLayer) -> Result<Box<dyn Read + Send + '_>, ImageError> {
        let digest = layer.digest.as_deref().ok_or_else(|| ImageError::Invalid {
            kind: "layer",
            digest: layer.diff_id.clone(),
            reason: "no blob digest".into(),
        })?;
        self.open_blob("layer", digest, layer.size)
    }
}

fn ref_name(d: &Descriptor) -> Option<String> {
    d.annotations().as_ref()?.get(REF_NAME).cloned()
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::files::DirFiles;
    use super::*;

    #[test]
    fn missing_marker_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = || OciLayout::open(Box::new(DirFiles::new(dir.path())), "oci:x".into());
        let e = open().expect_err("no oci-layout");
        assert!(e.to_string().contains("not an OCI image layout"), "{e}");
        fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"2.0.0"}"#,
        )
        .expect("write");
        let e = open().expect_err("bad version");
        assert!(e.to_string().contains("2.0.0"), "{e}");
    }
}
