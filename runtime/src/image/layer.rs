//! The content-addressed layer store: `layers/sha256/<diff-id hex>/`, each unpacked once,
//! verified, and shared by every image that has that layer.
//!
//! Any source of layer blobs (an OCI layout, later a registry) calls [`LayerStore::ensure`]
//! with a way to open the blob as a byte stream; the store decompresses, unpacks, and checks
//! size, digest and diff-id in one pass, and only then renames the result into place.
//!
//! **Invariant:** a layer is trusted only when `layers/complete/<hex>` exists. The unpacked
//! tree is flushed to disk (syncfs) before the rename that publishes it, the rename is made
//! durable, and only then is the marker written. A layer directory without its marker was torn
//! by a crash or a power loss somewhere in that sequence: it is removed and fetched again,
//! never used.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;
use tracing::{debug, info};

use super::ImageError;
use super::blob::{self, HashingReader};
use super::unpack;

/// Layer media types this store knows; the compression itself is recognised by magic number.
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const READ_BUF: usize = 256 << 10;

/// One layer to make present: the blob as the manifest describes it and the diff-id the
/// image config expects. Digests are validated `sha256:<hex>` strings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerBlob<'a> {
    /// The blob's digest; `None` when the source has none (a `docker save` archive), and
    /// then the diff-id alone verifies the content.
    pub(crate) digest: Option<&'a str>,
    pub(crate) size: u64,
    pub(crate) media_type: &'a str,
    pub(crate) diff_id: &'a str,
}

impl LayerBlob<'_> {
    /// The digest that names this layer in errors and progress.
    pub(crate) fn name(&self) -> &str {
        self.digest.unwrap_or(self.diff_id)
    }
}

#[derive(Debug)]
pub(crate) struct LayerStore {
    /// `root/layers/sha256`
    dir: PathBuf,
    /// `root/tmp`: unpacking happens here, on the same filesystem as `dir`.
    tmp: PathBuf,
    /// `root/locks`
    locks: PathBuf,
    /// `root/layers/complete`: one marker per layer known to be whole on disk.
    complete: PathBuf,
}

impl LayerStore {
    pub(crate) fn open(root: &Path) -> Result<LayerStore, ImageError> {
        let store = LayerStore {
            dir: root.join("layers/sha256"),
            tmp: root.join("tmp"),
            locks: root.join("locks"),
            complete: root.join("layers/complete"),
        };
        for d in [&store.dir, &store.tmp, &store.locks, &store.complete] {
            fs::create_dir_all(d).map_err(ImageError::io(d))?;
        }
        Ok(store)
    }

    fn path(&self, diff_id: &str) -> PathBuf {
        self.dir.join(blob::hex_of(diff_id))
    }

    fn marker(&self, diff_id: &str) -> PathBuf {
        self.complete.join(blob::hex_of(diff_id))
    }

    /// Whether the layer is in the store and known to be whole.
    fn is_complete(&self, diff_id: &str) -> bool {
        self.path(diff_id).is_dir() && self.marker(diff_id).is_file()
    }

    /// The layer's directory if it is in the store, whole (see the module's invariant).
    pub(crate) fn existing(&self, diff_id: &str) -> Option<PathBuf> {
        blob::parse_sha256(diff_id)?;
        self.is_complete(diff_id).then(|| self.path(diff_id))
    }

    /// Flushes the unpacked tree at `tmp`, renames it to `final_dir` and writes the marker,
    /// each step durable before the next.
    fn publish(&self, tmp: &Path, final_dir: &Path, diff_id: &str) -> Result<(), ImageError> {
        crate::durable::sync_filesystem(tmp).map_err(ImageError::io(tmp))?;
        fs::rename(tmp, final_dir).map_err(ImageError::io(final_dir))?;
        crate::durable::fsync_dir(&self.dir).map_err(ImageError::io(&self.dir))?;
        let marker = self.marker(diff_id);
        crate::durable::write_atomic(&marker, diff_id.as_bytes()).map_err(ImageError::io(&marker))
    }

    /// Returns the layer's directory, unpacking it first if it is not in the store. `open` is
    /// called only then. Two processes doing this for the same layer serialize on a lock file;
    /// the second finds the layer present. On any error nothing of the layer stays behind.
    pub(crate) fn ensure<R: Read>(
        &self,
        layer: &LayerBlob<'_>,
        open: impl FnOnce() -> Result<R, ImageError>,
    ) -> Result<PathBuf, ImageError> {
        let final_dir = self.path(layer.diff_id);
        if self.is_complete(layer.diff_id) {
            return Ok(final_dir);
        }
        if !LAYER_TYPES.contains(&layer.media_type) {
            return Err(ImageError::UnsupportedMediaType {
                kind: "layer",
                digest: layer.name().to_owned(),
                media_type: layer.media_type.to_owned(),
            });
        }
        let hex = blob::hex_of(layer.diff_id);
        let lock_path = self.locks.join(format!("{hex}.lock"));
        let lock = File::create(&lock_path).map_err(ImageError::io(&lock_path))?;
        lock.lock().map_err(ImageError::io(&lock_path))?;
        if self.is_complete(layer.diff_id) {
            debug!(
                diff_id = layer.diff_id,
                "layer unpacked by another process meanwhile"
            );
            return Ok(final_dir);
        }
        if final_dir.exists() {
            // We hold the lock and there is no marker: torn by a crash or power loss.
            tracing::warn!(
                diff_id = layer.diff_id,
                path = %final_dir.display(),
                "layer was not completely written (crash or power loss); fetching it again"
            );
            let doomed = self.tmp.join(format!("torn-{hex}"));
            remove_if_present(&doomed)?;
            fs::rename(&final_dir, &doomed).map_err(ImageError::io(&final_dir))?;
            remove_if_present(&doomed)?;
        }

        // We hold the lock, so a leftover temp dir is from a crashed unpack: start over.
        let tmp = self.tmp.join(format!("layer-{hex}"));
        remove_if_present(&tmp)?;
        fs::create_dir(&tmp).map_err(ImageError::io(&tmp))?;
        let result = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
            .map_err(ImageError::io(&tmp))
            .and_then(|()| open())
            .and_then(|reader| unpack_verified(reader, layer, &tmp))
            .and_then(|()| self.publish(&tmp, &final_dir, layer.diff_id));
        if let Err(e) = result {
            if let Err(rm) = fs::remove_dir_all(&tmp) {
                tracing::warn!(path = %tmp.display(), error = %rm, "cannot remove partial layer");
            }
            return Err(e);
        }
        info!(
            diff_id = layer.diff_id,
            digest = layer.name(),
            "layer unpacked"
        );
        Ok(final_dir)
        // `lock` is released when dropped.
    }
}

impl LayerStore {
    /// Removes every layer `keep(diff_id, dir)` says no, and everything in `tmp/` and
    /// `locks/`. The caller holds the store exclusively: no unpack is running. A layer leaves
    /// `layers/` by rename before it is deleted, so a crash midway leaves junk in `tmp/`, never
    /// half a layer in the store. Returns the removed diff ids and the bytes freed.
    pub(crate) fn prune(
        &self,
        keep: impl Fn(&str, &Path) -> bool,
    ) -> Result<(Vec<String>, u64), ImageError> {
        let mut removed = Vec::new();
        let mut bytes = 0u64;
        for entry in fs::read_dir(&self.dir).map_err(ImageError::io(&self.dir))? {
            let entry = entry.map_err(ImageError::io(&self.dir))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str() else { continue };
            let diff_id = format!("sha256:{hex}");
            let path = entry.path();
            let torn = !self.marker(&diff_id).is_file();
            if blob::parse_sha256(&diff_id).is_none() || (keep(&diff_id, &path) && !torn) {
                continue;
            }
            let doomed = self.tmp.join(format!("gc-{hex}"));
            remove_if_present(&doomed)?;
            // Marker first: a crash in between leaves a layer without one (torn, fetched
            // again), never a marker vouching for a layer being deleted.
            let marker = self.marker(&diff_id);
            crate::durable::remove(&marker).map_err(ImageError::io(&marker))?;
            fs::rename(&path, &doomed).map_err(ImageError::io(&path))?;
            debug!(%diff_id, "layer removed");
            removed.push(diff_id);
        }
        for dir in [&self.tmp, &self.locks] {
            for entry in fs::read_dir(dir).map_err(ImageError::io(dir))? {
                let path = entry.map_err(ImageError::io(dir))?.path();
                bytes += disk_usage(&path);
                let meta = fs::symlink_metadata(&path).map_err(ImageError::io(&path))?;
                let result = if meta.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                result.map_err(ImageError::io(&path))?;
            }
        }
        removed.sort();
        Ok((removed, bytes))
    }
}

/// Bytes allocated on disk under `path` (not following symlinks; hard links counted once per
/// link, as du -l would, which overcounts only layers that hard-link within themselves).
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir()
        && let Ok(entries) = fs::read_dir(path)
    {
        for entry in entries.flatten() {
            total += disk_usage(&entry.path());
        }
    }
    total
}

fn remove_if_present(path: &Path) -> Result<(), ImageError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ImageError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Decompresses and unpacks `reader` into `dest` while hashing both the blob and the tar
/// stream, then checks size, digest and diff-id. When unpacking fails, the rest of the blob is
/// still hashed: a blob that does not match its digest is reported as such (the cause), rather
/// than as whatever the damage did to gzip or tar.
fn unpack_verified<R: Read>(
    reader: R,
    layer: &LayerBlob<'_>,
    dest: &Path,
) -> Result<(), ImageError> {
    let mut raw = HashingReader::new(reader, Some(layer.size));
    let unpacked = unpack_stream(&mut raw, layer, dest);
    if unpacked.is_err() {
        let _ = raw.drain();
    }
    if raw.count() != layer.size && (raw.at_eof() || raw.count() > layer.size) {
        return Err(ImageError::SizeMismatch {
            kind: "layer",
            digest: layer.name().to_owned(),
            expected: layer.size,
            got: raw.count(),
        });
    }
    if raw.count() == layer.size
        && let Some(digest) = layer.digest
    {
        let got = raw.digest();
        if got != digest {
            return Err(ImageError::DigestMismatch {
                kind: "layer",
                digest: digest.to_owned(),
                got,
            });
        }
    }
    let diff_id = unpacked?;
    if diff_id != layer.diff_id {
        return Err(ImageError::DiffIdMismatch {
            digest: layer.name().to_owned(),
            expected: layer.diff_id.to_owned(),
            got: diff_id,
        });
    }
    Ok(())
}

/// Unpacks the (possibly compressed) blob read from `raw`, reading it to its end; returns the
/// diff-id (sha256 of the uncompressed tar stream).
fn unpack_stream<R: Read>(
    raw: &mut HashingReader<R>,
    layer: &LayerBlob<'_>,
    dest: &Path,
) -> Result<String, ImageError> {
    let stream_err = |source: io::Error| ImageError::Unpack {
        digest: layer.name().to_owned(),
        source,
    };
    let mut buffered = BufReader::with_capacity(READ_BUF, raw);
    let head = buffered.fill_buf().map_err(stream_err)?;
    let decompressed: Box<dyn Read + '_> = if head.starts_with(GZIP_MAGIC) {
        Box::new(MultiGzDecoder::new(&mut buffered))
    } else if head.starts_with(ZSTD_MAGIC) {
        Box::new(zstd::stream::read::Decoder::with_buffer(&mut buffered).map_err(stream_err)?)
    } else {
        Box::new(&mut buffered)
    };
    let mut tar_stream = HashingReader::new(decompressed, None);
    unpack::unpack(&mut tar_stream, dest, layer.name())?;
    // The tar reader stops at the end-of-archive marker; the diff-id covers the padding after
    // it, and the blob digest the whole blob.
    tar_stream.drain().map_err(stream_err)?;
    let diff_id = tar_stream.digest();
    drop(tar_stream);
    io::copy(&mut buffered, &mut io::sink()).map_err(stream_err)?;
    Ok(diff_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with_file(name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).expect("append");
        b.into_inner().expect("finish")
    }

    #[test]
    fn unpacks_plain_tar_once_and_rejects_bad_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::open(dir.path()).expect("open");
        let tar = tar_with_file("hello.txt", b"hi\n");
        let digest = blob::digest_bytes(&tar);
        let layer = LayerBlob {
            digest: Some(&digest),
            size: tar.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar",
            diff_id: &digest,
        };
        let path = store.ensure(&layer, || Ok(&tar[..])).expect("ensure");
        assert_eq!(fs::read(path.join("hello.txt")).expect("read"), b"hi\n");
        // Present: the blob is not even opened.
        let again = store
            .ensure(&layer, || -> Result<&[u8], ImageError> {
                panic!("reopened")
            })
            .expect("ensure again");
        assert_eq!(again, path);

        let mut bad = tar.clone();
        bad[600] ^= 0xff;
        let other = format!("sha256:{}", "0".repeat(64));
        let layer = LayerBlob {
            diff_id: &other,
            ..layer
        };
        let e = store.ensure(&layer, || Ok(&bad[..])).expect_err("corrupt");
        assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
        assert!(!store.path(&other).exists());
        assert_eq!(fs::read_dir(&store.tmp).expect("tmp").count(), 0);
    }

    /// A layer directory without its marker (a crash or power loss between unpacking and
    /// the marker) is never used: it is fetched and unpacked again, and prune drops it.
    #[test]
    fn a_torn_layer_is_fetched_again_and_never_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::open(dir.path()).expect("open");
        let tar = tar_with_file("hello.txt", b"hi\n");
        let digest = blob::digest_bytes(&tar);
        let layer = LayerBlob {
            digest: Some(&digest),
            size: tar.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar",
            diff_id: &digest,
        };
        let path = store.ensure(&layer, || Ok(&tar[..])).expect("ensure");
        assert!(store.existing(&digest).is_some());
        // Torn: the marker is gone and the tree half written.
        fs::remove_file(store.marker(&digest)).expect("drop marker");
        fs::write(path.join("hello.txt"), b"h").expect("truncate");
        assert_eq!(store.existing(&digest), None, "a torn layer is not offered");
        let opened = std::cell::Cell::new(false);
        let again = store
            .ensure(&layer, || {
                opened.set(true);
                Ok(&tar[..])
            })
            .expect("ensure again");
        assert!(opened.get(), "the blob is fetched again");
        assert_eq!(fs::read(again.join("hello.txt")).expect("read"), b"hi\n");
        assert!(store.existing(&digest).is_some());
        // Prune removes a torn layer even when an image still names it.
        fs::remove_file(store.marker(&digest)).expect("drop marker");
        let (removed, _) = store.prune(|_, _| true).expect("prune");
        assert_eq!(removed, std::slice::from_ref(&digest));
        assert!(!path.exists());
    }

    #[test]
    fn rejects_unknown_media_type_and_unpacks_zstd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::open(dir.path()).expect("open");
        let digest = format!("sha256:{}", "1".repeat(64));
        let layer = LayerBlob {
            digest: Some(&digest),
            size: 4,
            media_type: "application/x-foo",
            diff_id: &digest,
        };
        let e = store.ensure(&layer, || Ok(&b"abcd"[..])).expect_err("type");
        assert!(
            e.to_string()
                .contains("unsupported media type application/x-foo"),
            "{e}"
        );
        let tar = tar_with_file("z.txt", b"zstd\n");
        let diff_id = blob::digest_bytes(&tar);
        let zst = zstd::encode_all(&tar[..], 3).expect("zstd");
        let digest = blob::digest_bytes(&zst);
        let layer = LayerBlob {
            digest: Some(&digest),
            size: zst.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
            diff_id: &diff_id,
        };
        let path = store.ensure(&layer, || Ok(&zst[..])).expect("zstd");
        assert_eq!(fs::read(path.join("z.txt")).expect("read"), b"zstd\n");
    }

    #[test]
    fn without_a_blob_digest_the_diff_id_decides() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::open(dir.path()).expect("open");
        let tar = tar_with_file("a", b"a");
        let wrong = format!("sha256:{}", "2".repeat(64));
        let layer = LayerBlob {
            digest: None,
            size: tar.len() as u64,
            media_type: "application/vnd.docker.image.rootfs.diff.tar",
            diff_id: &wrong,
        };
        let e = store.ensure(&layer, || Ok(&tar[..])).expect_err("diff id");
        assert!(matches!(e, ImageError::DiffIdMismatch { .. }), "{e}");
        assert!(!store.path(&wrong).exists());
    }
}
