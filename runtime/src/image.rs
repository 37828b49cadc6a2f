//! Images on this host: pulls from OCI registries and imports OCI layouts, OCI archives and
//! `docker save` archives into a content-addressed layer store, and remembers what it has.
//!
//! References:
//!
//! ```text
//! HOST[:PORT]/NAME[:TAG|@DIGEST]     a registry (also written docker://...)
//! oci:DIR[:TAG]                      an OCI image layout directory
//! oci-archive:FILE.tar[:TAG]         a tar of an OCI image layout (skopeo, buildah)
//! docker-archive:FILE.tar[:NAME:TAG|:@N]   the output of `docker save`
//! ```
//!
//! Store layout (under the root the agent passes, `DATA_DIR/images`):
//!
//! ```text
//! layers/sha256/<diff-id hex>/   one unpacked layer, used as an overlayfs lowerdir
//! images/<sha256(reference)>.json   one image (see `ImageRecord`)
//! locks/<diff-id hex>.lock       held (flock) while that layer is being unpacked
//! tmp/layer-<diff-id hex>/       a layer being unpacked; renamed into layers/ when verified
//! store.lock                     shared by pulls and container creation, exclusive for prune
//! ```
//!
//! **Invariant:** a directory under `layers/sha256/` is complete and verified: it only appears
//! there by `rename(2)` after the blob's size and digest and the tar stream's diff-id were
//! checked, and it leaves by `rename(2)` into `tmp/` before it is deleted. Anything under `tmp/`
//! is disposable.
//!
//! Whiteouts are stored in overlayfs form (`.wh.NAME` becomes a 0:0 character device `NAME`,
//! `.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on its directory), so a container's
//! rootfs is an overlay mount of the layer dirs with no copying.

mod blob;
mod docker;
mod files;
mod layer;
mod layout;
mod manifest;
mod registry;
mod unpack;
mod xattr;

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::{debug, info, warn};

use layer::{LayerBlob, LayerStore};
use manifest::{BlobSource, PlannedLayer, Resolved};

pub use registry::RegistryOptions;

/// How many layers are fetched and unpacked at once.
const PARALLEL_LAYERS: usize = 3;

/// Images and their unpacked layers under one root (the agent passes `DATA_DIR/images`).
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    images: PathBuf,
    layers: LayerStore,
}

/// An image in the store: what the runtime needs to build a container's rootfs and process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Image {
    /// The normalized reference (see [`ImageStore::normalize`]).
    pub reference: String,
    /// Digest of the (platform-specific) image manifest, `sha256:<hex>`; `None` for images
    /// from `docker save` archives.
    pub manifest_digest: Option<String>,
    /// The image id: the config's digest.
    pub id: String,
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
    /// The config's digest (Docker's image id).
    pub id: String,
    pub manifest_digest: Option<String>,
    /// Number of layers.
    pub layers: usize,
    /// Sum of the sizes of the image's layer blobs as pulled (compressed), in bytes.
    pub size: u64,
}

/// When `container run` pulls its image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Only when the store does not have it (Kubernetes' IfNotPresent). Local sources
    /// (`oci:`, archives) are always re-read: that is cheap and follows their tags.
    #[default]
    Missing,
    Always,
    Never,
}

impl std::str::FromStr for PullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "missing" | "if-not-present" => Ok(PullPolicy::Missing),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            other => Err(format!(
                "unknown pull policy {other:?} (missing, always or never)"
            )),
        }
    }
}

/// What `prune` removed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PruneReport {
    /// References of image records removed (`prune --all`).
    pub images: Vec<String>,
    /// Diff ids of layers removed.
    pub layers: Vec<String>,
    /// Bytes freed on disk (unpacked layers and leftovers).
    pub bytes: u64,
}

/// Why an image could not be pulled, imported or listed. Messages name the reference, path or
/// digest.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    /// The layout or archive itself is unusable (missing `oci-layout`, bad `index.json`, ...).
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
    /// The layer stream could not be read (bad compression, bad tar, broken download).
    #[error("layer {digest}: {source}")]
    Unpack {
        digest: String,
        #[source]
        source: io::Error,
    },
    /// The registry refused or could not be reached.
    #[error("{reference}: {reason}")]
    Registry { reference: String, reason: String },
    #[error("credentials file {}: {reason}", path.display())]
    Credentials { path: PathBuf, reason: String },
    #[error("image {0} is not in the store (pull it first, or use a pull policy other than never)")]
    NotPresent(String),
    #[error("image {reference} is used by container {container} (remove it first, or use --force)")]
    InUse {
        reference: String,
        container: String,
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

/// What the store remembers about one image (`images/<sha256(reference)>.json`).
#[derive(Debug, Serialize, Deserialize)]
struct ImageRecord {
    reference: String,
    #[serde(default)]
    manifest_digest: Option<String>,
    config_digest: String,
    config: ImageConfig,
    /// Lowest (base) first.
    layers: Vec<LayerRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LayerRecord {
    diff_id: String,
    #[serde(default)]
    digest: Option<String>,
    media_type: String,
    size: u64,
}

/// The file or directory a local image source (`oci:DIR`, `oci-archive:FILE`,
/// `docker-archive:FILE`) reads, as written; `None` for a registry reference.
pub fn local_source_path(reference: &str) -> Result<Option<PathBuf>, ImageError> {
    Ok(match Source::parse(reference)? {
        Source::Oci { dir, .. } => Some(dir),
        Source::OciArchive { file, .. } | Source::DockerArchive { file, .. } => Some(file),
        Source::Registry(_) => None,
    })
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Oci {
        dir: PathBuf,
        tag: Option<String>,
    },
    OciArchive {
        file: PathBuf,
        tag: Option<String>,
    },
    DockerArchive {
        file: PathBuf,
        select: docker::Select,
    },
    Registry(Box<oci_client::Reference>),
}

impl Source {
    fn parse(reference: &str) -> Result<Source, ImageError> {
        let bad = |reason: &str| ImageError::BadReference {
            reference: reference.to_owned(),
            reason: reason.to_owned(),
        };
        // `oci:DIR[:TAG]` and `oci-archive:FILE[:TAG]` split at the first `:` as skopeo does:
        // the path cannot contain `:`.
        let path_and_tag = |rest: &str| -> Result<(PathBuf, Option<String>), ImageError> {
            let (path, tag) = match rest.split_once(':') {
                Some((path, tag)) => (path, (!tag.is_empty()).then_some(tag)),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            if let Some(tag) = tag
                && tag.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(bad("tag contains whitespace or control characters"));
            }
            Ok((PathBuf::from(path), tag.map(str::to_owned)))
        };
        if let Some(rest) = reference.strip_prefix("oci:") {
            let (dir, tag) = path_and_tag(rest)?;
            return Ok(Source::Oci { dir, tag });
        }
        if let Some(rest) = reference.strip_prefix("oci-archive:") {
            let (file, tag) = path_and_tag(rest)?;
            return Ok(Source::OciArchive { file, tag });
        }
        if let Some(rest) = reference.strip_prefix("docker-archive:") {
            let (file, select) = match rest.split_once(':') {
                None => (rest, docker::Select::Only),
                Some((file, "")) => (file, docker::Select::Only),
                Some((file, sel)) => match sel.strip_prefix('@') {
                    Some(n) => (
                        file,
                        docker::Select::Index(n.parse().map_err(|_| bad("@N must be a number"))?),
                    ),
                    None => (file, docker::Select::Tag(sel.to_owned())),
                },
            };
            if file.is_empty() {
                return Err(bad("empty path"));
            }
            return Ok(Source::DockerArchive {
                file: PathBuf::from(file),
                select,
            });
        }
        if reference.contains("://") && !reference.starts_with("docker://") {
            return Err(bad(
                "unknown transport (use HOST/NAME[:TAG], oci:, oci-archive: or docker-archive:)",
            ));
        }
        Ok(Source::Registry(Box::new(registry::parse_reference(
            reference,
        )?)))
    }

    /// The reference as recorded in the store: paths made absolute (symlinks resolved),
    /// registry references with their registry and tag spelled out.
    fn normalize(&self) -> Result<String, ImageError> {
        let canonical = |prefix: &str, path: &Path| {
            fs::canonicalize(path).map_err(|source| ImageError::Layout {
                layout: format!("{prefix}:{}", path.display()),
                reason: source.to_string(),
            })
        };
        Ok(match self {
            Source::Oci { dir, tag } => {
                let dir = canonical("oci", dir)?;
                match tag {
                    Some(tag) => format!("oci:{}:{tag}", dir.display()),
                    None => format!("oci:{}", dir.display()),
                }
            }
            Source::OciArchive { file, tag } => {
                let file = canonical("oci-archive", file)?;
                match tag {
                    Some(tag) => format!("oci-archive:{}:{tag}", file.display()),
                    None => format!("oci-archive:{}", file.display()),
                }
            }
            Source::DockerArchive { file, select } => {
                let file = canonical("docker-archive", file)?;
                match select {
                    docker::Select::Only => format!("docker-archive:{}", file.display()),
                    docker::Select::Tag(t) => format!("docker-archive:{}:{t}", file.display()),
                    docker::Select::Index(i) => {
                        format!("docker-archive:{}:@{i}", file.display())
                    }
                }
            }
            Source::Registry(r) => r.whole(),
        })
    }

    fn is_registry(&self) -> bool {
        matches!(self, Source::Registry(_))
    }
}

/// Options of one pull.
#[derive(Default)]
pub struct PullOptions<'a> {
    pub registry: RegistryOptions,
    /// Per-layer progress bars (drawn only when stderr is a terminal).
    pub progress: Option<&'a MultiProgress>,
}

/// A shared (pull, container creation) or exclusive (prune) hold on the store.
#[derive(Debug)]
pub struct StoreHold {
    _file: fs::File,
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

    /// Takes the store lock shared: layers this process is about to use (pull, then create a
    /// container record naming them) are not pruned meanwhile. Blocks while a prune runs.
    pub fn hold(&self) -> Result<StoreHold, ImageError> {
        self.lock(false)
    }

    fn lock(&self, exclusive: bool) -> Result<StoreHold, ImageError> {
        let path = self.root.join("store.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ImageError::io(&path))?;
        if exclusive {
            file.lock()
        } else {
            file.lock_shared()
        }
        .map_err(ImageError::io(&path))?;
        Ok(StoreHold { _file: file })
    }

    /// The reference as the store records it (absolute paths, registry and tag spelled out).
    pub fn normalize(reference: &str) -> Result<String, ImageError> {
        Source::parse(reference)?.normalize()
    }

    /// Imports a local reference or pulls a registry one with default options.
    pub fn import(&self, reference: &str) -> Result<Image, ImageError> {
        self.pull(reference, &PullOptions::default())
    }

    /// Makes the image `reference` present: resolves it at its source (following image
    /// indexes to this host's platform), verifies manifest and config, and fetches and unpacks
    /// the layers that are not in the store yet, several at once. Present layers are neither
    /// fetched nor unpacked again; concurrent pulls of one layer (in any process) fetch it
    /// once. Records the image under its normalized reference.
    #[tracing::instrument(skip_all, fields(image = %reference))]
    pub fn pull(&self, reference: &str, opts: &PullOptions<'_>) -> Result<Image, ImageError> {
        let source = Source::parse(reference)?;
        let normalized = source.normalize()?;
        let _hold = self.hold()?;
        let started = Instant::now();
        let (src, resolved): (Box<dyn BlobSource>, Resolved) = match &source {
            Source::Oci { dir, tag } => {
                let dir = fs::canonicalize(dir).map_err(ImageError::io(dir))?;
                let layout = layout::OciLayout::open(
                    Box::new(files::DirFiles::new(&dir)),
                    format!("oci:{}", dir.display()),
                )?;
                let resolved = layout.resolve(tag.as_deref())?;
                (Box::new(layout), resolved)
            }
            Source::OciArchive { file, tag } => {
                let name = format!("oci-archive:{}", file.display());
                let files = files::TarFiles::open(file).map_err(|e| ImageError::Layout {
                    layout: name.clone(),
                    reason: e.to_string(),
                })?;
                let layout = layout::OciLayout::open(Box::new(files), name)?;
                let resolved = layout.resolve(tag.as_deref())?;
                (Box::new(layout), resolved)
            }
            Source::DockerArchive { file, select } => {
                let name = format!("docker-archive:{}", file.display());
                let files = files::TarFiles::open(file).map_err(|e| ImageError::Layout {
                    layout: name.clone(),
                    reason: e.to_string(),
                })?;
                let archive = docker::DockerArchive::open(files, name, select)?;
                let resolved = archive.resolve()?;
                (Box::new(archive), resolved)
            }
            Source::Registry(r) => {
                let src = registry::RegistrySource::new((**r).clone(), &opts.registry)?;
                let resolved = src.resolve()?;
                (Box::new(src), resolved)
            }
        };
        let layers = self.ensure_layers(&*src, &resolved.layers, opts.progress)?;
        drop(src);

        let config = image_config(&resolved.config);
        let record = ImageRecord {
            reference: normalized.clone(),
            manifest_digest: resolved.manifest_digest.clone(),
            config_digest: resolved.config_digest.clone(),
            config: config.clone(),
            layers: resolved
                .layers
                .iter()
                .map(|l| LayerRecord {
                    diff_id: l.diff_id.clone(),
                    digest: l.digest.clone(),
                    media_type: l.media_type.clone(),
                    size: l.size,
                })
                .collect(),
        };
        self.write_record(&record)?;
        info!(
            manifest = ?record.manifest_digest,
            layers = layers.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "image ready"
        );
        Ok(Image {
            reference: normalized,
            manifest_digest: resolved.manifest_digest,
            id: resolved.config_digest,
            config,
            layers,
        })
    }

    /// The image for `reference` following `policy`: from the store, or pulled.
    pub fn ensure(
        &self,
        reference: &str,
        policy: PullPolicy,
        opts: &PullOptions<'_>,
    ) -> Result<Image, ImageError> {
        let source = Source::parse(reference)?;
        match policy {
            PullPolicy::Always => self.pull(reference, opts),
            PullPolicy::Missing if !source.is_registry() => self.pull(reference, opts),
            PullPolicy::Missing => match self.get(reference)? {
                Some(image) => Ok(image),
                None => self.pull(reference, opts),
            },
            PullPolicy::Never => self
                .get(reference)?
                .ok_or_else(|| ImageError::NotPresent(reference.to_owned())),
        }
    }

    /// Fetches and unpacks the layers not in the store, up to [`PARALLEL_LAYERS`] at once.
    /// Returns their dirs in order. The first failure stops the others from starting.
    fn ensure_layers(
        &self,
        src: &dyn BlobSource,
        layers: &[PlannedLayer],
        progress: Option<&MultiProgress>,
    ) -> Result<Vec<PathBuf>, ImageError> {
        let results: Mutex<Vec<Option<Result<PathBuf, ImageError>>>> =
            Mutex::new((0..layers.len()).map(|_| None).collect());
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let bars: Vec<Option<ProgressBar>> = layers
            .iter()
            .map(|l| progress.map(|mp| mp.add(layer_bar(l))))
            .collect();
        let work = || {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= layers.len() || failed.load(Ordering::Relaxed) {
                    return;
                }
                let l = &layers[i];
                let bar = bars[i].clone();
                let blob = LayerBlob {
                    digest: l.digest.as_deref(),
                    size: l.size,
                    media_type: &l.media_type,
                    diff_id: &l.diff_id,
                };
                let fetched = AtomicBool::new(false);
                let result = self.layers.ensure(&blob, || {
                    fetched.store(true, Ordering::Relaxed);
                    let reader = src.open_layer(l)?;
                    Ok(Counted {
                        inner: reader,
                        bar: bar.clone(),
                    })
                });
                if let Some(bar) = &bar {
                    match &result {
                        Ok(_) if fetched.load(Ordering::Relaxed) => {
                            bar.set_position(l.size);
                            bar.finish_with_message("done");
                        }
                        Ok(_) => bar.finish_with_message("already present"),
                        Err(_) => bar.abandon_with_message("failed"),
                    }
                }
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                lock(&results)[i] = Some(result);
            }
        };
        // This thread is one of the workers, and layers already in the store need none: an
        // image whose layers are all there (the usual case at a container start) starts no
        // thread.
        let missing = layers
            .iter()
            .filter(|l| self.layers.existing(&l.diff_id).is_none())
            .count();
        std::thread::scope(|scope| {
            for _ in 1..PARALLEL_LAYERS.min(missing) {
                scope.spawn(work);
            }
            work();
        });
        let mut out = Vec::with_capacity(layers.len());
        let mut first_err = None;
        for (r, bar) in lock(&results).drain(..).zip(&bars) {
            match r {
                Some(Ok(p)) => out.push(p),
                Some(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                None => {
                    if let Some(bar) = bar {
                        bar.abandon_with_message("skipped");
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// The image recorded under `reference` (normalized), if it is in the store with all its
    /// layers. Does not read the source.
    pub fn get(&self, reference: &str) -> Result<Option<Image>, ImageError> {
        let normalized = Source::parse(reference)?.normalize()?;
        let Some(record) = read_record(&self.record_path(&normalized))? else {
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
            id: record.config_digest,
            config: record.config,
            layers,
        }))
    }

    fn records(&self) -> Result<Vec<(PathBuf, ImageRecord)>, ImageError> {
        let entries = fs::read_dir(&self.images).map_err(ImageError::io(&self.images))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(ImageError::io(&self.images))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match read_record(&path) {
                Ok(Some(r)) => out.push((path, r)),
                Ok(None) => {}
                Err(e) => warn!(error = %e, "skipping unreadable image record"),
            }
        }
        out.sort_by(|a, b| a.1.reference.cmp(&b.1.reference));
        Ok(out)
    }

    /// Lists images (reference, id, manifest digest, layer count, size), by reference.
    /// Unreadable records are skipped with a warning.
    pub fn list(&self) -> Result<Vec<ImageSummary>, ImageError> {
        Ok(self
            .records()?
            .into_iter()
            .map(|(_, r)| ImageSummary {
                size: r.layers.iter().map(|l| l.size).sum(),
                layers: r.layers.len(),
                reference: r.reference,
                id: r.config_digest,
                manifest_digest: r.manifest_digest,
            })
            .collect())
    }

    /// Forgets the image `reference` (its layers stay until [`ImageStore::prune`]). `users`
    /// are the (container id, normalized image reference) pairs of existing containers: an
    /// image one of them uses is refused unless `force`.
    pub fn remove(
        &self,
        reference: &str,
        users: &[(String, String)],
        force: bool,
    ) -> Result<String, ImageError> {
        let normalized = Source::parse(reference)?.normalize()?;
        let path = self.record_path(&normalized);
        if !path.exists() {
            return Err(ImageError::NotPresent(normalized));
        }
        if !force && let Some((id, _)) = users.iter().find(|(_, r)| *r == normalized) {
            return Err(ImageError::InUse {
                reference: normalized,
                container: id.clone(),
            });
        }
        fs::remove_file(&path).map_err(ImageError::io(&path))?;
        info!(image = %normalized, "image removed");
        Ok(normalized)
    }

    /// Garbage collection: removes every layer that no image record and no container (`in_use`,
    /// their layer dirs) uses, and what interrupted pulls left in `tmp/` and `locks/`. With
    /// `all`, first removes the image records no container uses. Holds the store exclusively,
    /// so it waits for running pulls and blocks new ones meanwhile.
    pub fn prune(&self, in_use: &HashSet<PathBuf>, all: bool) -> Result<PruneReport, ImageError> {
        let _hold = self.lock(true)?;
        let mut report = PruneReport::default();
        let mut keep: HashSet<String> = HashSet::new();
        for (path, record) in self.records()? {
            let used_by_container = record.layers.iter().all(|l| {
                self.layers
                    .existing(&l.diff_id)
                    .is_some_and(|p| in_use.contains(&p))
            }) && !record.layers.is_empty();
            if all && !used_by_container {
                fs::remove_file(&path).map_err(ImageError::io(&path))?;
                report.images.push(record.reference);
                continue;
            }
            keep.extend(record.layers.into_iter().map(|l| l.diff_id));
        }
        let (layers, bytes) = self
            .layers
            .prune(|diff_id, dir| keep.contains(diff_id) || in_use.contains(dir))?;
        report.layers = layers;
        report.bytes = bytes;
        info!(
            images = report.images.len(),
            layers = report.layers.len(),
            bytes = report.bytes,
            "image store pruned"
        );
        Ok(report)
    }

    fn record_path(&self, normalized_reference: &str) -> PathBuf {
        let name = hex::encode(Sha256::digest(normalized_reference.as_bytes()));
        self.images.join(format!("{name}.json"))
    }

    /// Writes the record atomically and durably, so a reader never sees half of it. A record
    /// already there with the same bytes (a local image imported again, unchanged) is left as
    /// it is: no write, no fsync.
    fn write_record(&self, record: &ImageRecord) -> Result<(), ImageError> {
        let path = self.record_path(&record.reference);
        let json = serde_json::to_vec_pretty(record).map_err(|e| ImageError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        if fs::read(&path).is_ok_and(|old| old == json) {
            return Ok(());
        }
        crate::durable::write_atomic(&path, &json).map_err(|source| ImageError::Io {
            path: path.clone(),
            source,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn layer_bar(l: &PlannedLayer) -> ProgressBar {
    let name = l.digest.as_deref().unwrap_or(&l.diff_id);
    let short = blob::hex_of(name).get(..12).unwrap_or(name).to_owned();
    let bar = ProgressBar::new(l.size);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}")
    {
        bar.set_style(style);
    }
    bar.set_prefix(short);
    bar.set_message("waiting");
    bar
}

/// A layer stream that advances its progress bar.
struct Counted<R> {
    inner: R,
    bar: Option<ProgressBar>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(bar) = &self.bar {
            if bar.position() == 0 {
                bar.set_message("pulling");
            }
            bar.inc(n as u64);
        }
        Ok(n)
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
        let oci = |dir: &str, tag: Option<&str>| Source::Oci {
            dir: PathBuf::from(dir),
            tag: tag.map(str::to_owned),
        };
        assert_eq!(
            Source::parse("oci:/x/y:v2").expect("valid"),
            oci("/x/y", Some("v2"))
        );
        assert_eq!(Source::parse("oci:rel").expect("valid"), oci("rel", None));
        assert_eq!(Source::parse("oci:/x:").expect("valid"), oci("/x", None));
        assert_eq!(
            Source::parse("oci-archive:/a.tar:v1").expect("valid"),
            Source::OciArchive {
                file: PathBuf::from("/a.tar"),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            Source::parse("docker-archive:/d.tar:web:1").expect("valid"),
            Source::DockerArchive {
                file: PathBuf::from("/d.tar"),
                select: docker::Select::Tag("web:1".into())
            }
        );
        assert_eq!(
            Source::parse("docker-archive:/d.tar:@2").expect("valid"),
            Source::DockerArchive {
                file: PathBuf::from("/d.tar"),
                select: docker::Select::Index(2)
            }
        );
        let r = Source::parse("127.0.0.1:5000/demo/web").expect("registry");
        assert!(r.is_registry());
        assert_eq!(
            r.normalize().expect("norm"),
            "127.0.0.1:5000/demo/web:latest"
        );
        let r = Source::parse("docker://127.0.0.1:5000/demo/web:2").expect("registry");
        assert_eq!(r.normalize().expect("norm"), "127.0.0.1:5000/demo/web:2");
        for bad in [
            "oci:",
            "oci::tag",
            "oci:/x:a b",
            "docker-archive:",
            "docker-archive:/x:@n",
            "ftp://x/y",
            "/x",
            "Upper/Case",
        ] {
            let e = Source::parse(bad).expect_err(bad);
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
