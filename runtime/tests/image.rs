//! Image import on this host: OCI layouts from the busybox fixture script and hand-crafted
//! layers, unpacked into a real store. Unpacking keeps owners, device nodes and
//! `trusted.*` xattrs, so most tests need root; they say so and return when not run as root.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};
use skiff_runtime::image::{ImageError, ImageStore};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/make-busybox-image.sh"
);

fn is_root() -> bool {
    skiff_testkit::require(&[skiff_testkit::Need::Root])
}

/// Runs the fixture script: an OCI layout of busybox at `dir` with `tags`.
fn busybox_layout(dir: &Path, whiteouts: bool, tags: &[&str]) -> Result<()> {
    let out = Command::new("sh")
        .arg(FIXTURE)
        .arg(dir)
        .args(tags)
        .env("FIXTURE_WHITEOUTS", if whiteouts { "1" } else { "0" })
        .output()
        .context("running the fixture script")?;
    ensure!(
        out.status.success(),
        "fixture script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn oci(dir: &Path) -> String {
    format!("oci:{}", dir.display())
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn put_blob(layout: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let digest = sha256(bytes);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join(&digest["sha256:".len()..]), bytes)?;
    Ok((digest, bytes.len() as u64))
}

/// Writes an OCI layout whose image has the given (uncompressed) layer tars, gzipped.
/// Returns the manifest digest.
fn write_layout(layout: &Path, layers: &[Vec<u8>], tag: &str) -> Result<String> {
    fs::create_dir_all(layout)?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar)?;
        let (digest, size) = put_blob(layout, &gz.finish()?)?;
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size,
        }));
        diff_ids.push(sha256(tar));
    }
    let config = serde_json::json!({
        "architecture": host_arch(), "os": "linux",
        "config": {"Entrypoint": ["/bin/app"], "User": "1000:1000", "StopSignal": "SIGINT"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (config_digest, config_size) = put_blob(layout, &serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": descs,
    });
    let (manifest_digest, manifest_size) = put_blob(layout, &serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(manifest_digest)
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_000_000);
    h
}

/// Sets a header's name field to raw bytes, bypassing the tar crate's refusal of `..`.
fn set_raw_name(h: &mut tar::Header, name: &[u8]) {
    let bytes = h.as_mut_bytes();
    bytes[..100].fill(0);
    bytes[..name.len()].copy_from_slice(name);
    h.set_cksum();
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let cpath = CString::new(path.as_os_str().as_bytes()).ok()?;
    let cname = CString::new(name).ok()?;
    skiff_runtime::sys::lgetxattr(&cpath, &cname).ok()
}

fn layer_dirs(store_root: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(store_root.join("layers/sha256"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    v.sort();
    Ok(v)
}

fn tmp_is_empty(store_root: &Path) -> Result<bool> {
    Ok(fs::read_dir(store_root.join("tmp"))?.next().is_none())
}

#[test]
fn t10_imports_busybox_layout() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("busybox");
    busybox_layout(&layout, false, &["latest"])?;
    let store = ImageStore::open(&tmp.path().join("store"))?;

    let image = store.import(&oci(&layout))?;
    assert_eq!(image.layers.len(), 2);
    assert!(
        image
            .manifest_digest
            .as_deref()
            .is_some_and(|d| d.starts_with("sha256:"))
    );
    assert_eq!(image.config.cmd, vec!["/bin/sh"]);
    assert!(image.config.entrypoint.is_empty());
    assert_eq!(image.config.working_dir, "/");
    assert_eq!(
        image.config.env,
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    );
    for l in &image.layers {
        assert!(l.is_dir(), "{}", l.display());
        assert!(l.starts_with(tmp.path().join("store/layers/sha256")));
    }
    let (base, top) = (&image.layers[0], &image.layers[1]);

    let busybox = fs::symlink_metadata(base.join("bin/busybox"))?;
    assert!(busybox.is_file());
    assert_eq!(busybox.permissions().mode() & 0o7777, 0o755);
    assert_eq!(busybox.len(), fs::metadata("/bin/busybox")?.len());
    assert_eq!((busybox.uid(), busybox.gid()), (0, 0));
    assert_eq!(fs::read_link(base.join("bin/sh"))?, Path::new("busybox"));
    assert_eq!(
        fs::read_link(base.join("bin/uptime"))?,
        Path::new("busybox")
    );
    assert_eq!(
        fs::symlink_metadata(base.join("tmp"))?.permissions().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        fs::symlink_metadata(base.join("root"))?
            .permissions()
            .mode()
            & 0o7777,
        0o700
    );
    assert_eq!(fs::read_dir(base.join("proc"))?.count(), 0);
    assert_eq!(
        fs::read_to_string(base.join("www/index.html"))?,
        "hello from skiff\n"
    );
    let passwd = fs::read_to_string(base.join("etc/passwd"))?;
    assert!(
        passwd.starts_with("root:x:0:0:root:/root:/bin/sh\n"),
        "{passwd}"
    );
    assert_eq!(fs::read_to_string(top.join("etc/skiff-release"))?, "2\n");
    assert!(top.join("opt/data/file").is_file());
    assert!(!top.join("bin").exists(), "layers are unpacked separately");
    // Tar mtimes are kept (the fixture sets them all to 0).
    assert_eq!(busybox.mtime(), 0);
    assert_eq!(fs::symlink_metadata(base.join("www"))?.mtime(), 0);

    let list = store.list()?;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].reference, image.reference);
    assert_eq!(list[0].manifest_digest, image.manifest_digest);
    assert_eq!(list[0].layers, 2);
    assert!(list[0].size > 1_000_000, "{}", list[0].size);
    let got = store.get(&oci(&layout))?.context("recorded image")?;
    assert_eq!(got.layers, image.layers);
    assert_eq!(got.config, image.config);
    assert!(tmp_is_empty(store.root())?);
    Ok(())
}

#[test]
fn t11_reimport_reuses_layers() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("busybox");
    busybox_layout(&layout, false, &["latest", "1.0"])?;
    let store = ImageStore::open(&tmp.path().join("store"))?;

    let first = store.import(&oci(&layout))?;
    let before = fs::symlink_metadata(first.layers[0].join("bin/busybox"))?;
    let again = store.import(&format!("{}:1.0", oci(&layout)))?;
    let third = store.import(&oci(&layout))?;
    assert_eq!(first.layers, again.layers);
    assert_eq!(first.layers, third.layers);
    assert_eq!(first.manifest_digest, again.manifest_digest);
    let after = fs::symlink_metadata(first.layers[0].join("bin/busybox"))?;
    assert_eq!(
        (before.ino(), before.ctime(), before.ctime_nsec()),
        (after.ino(), after.ctime(), after.ctime_nsec())
    );
    assert_eq!(layer_dirs(store.root())?.len(), 2, "each layer once");

    let refs: Vec<String> = store.list()?.into_iter().map(|s| s.reference).collect();
    assert_eq!(refs, vec![oci(&layout), format!("{}:1.0", oci(&layout))]);
    Ok(())
}

#[test]
fn t12_concurrent_imports_unpack_once() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("busybox");
    busybox_layout(&layout, true, &["latest"])?;
    let root = tmp.path().join("store");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (root, reference) = (root.clone(), oci(&layout));
                // One store per thread, as separate processes would have.
                s.spawn(move || ImageStore::open(&root).and_then(|st| st.import(&reference)))
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut layers = None;
    for r in results {
        let image = r.map_err(|_| anyhow::anyhow!("import thread panicked"))??;
        assert_eq!(
            *layers.get_or_insert_with(|| image.layers.clone()),
            image.layers
        );
    }
    assert_eq!(layer_dirs(&root)?.len(), 3);
    assert!(tmp_is_empty(&root)?);
    Ok(())
}

#[test]
fn t20_whiteouts_become_overlay_form() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("busybox");
    busybox_layout(&layout, true, &["latest"])?;
    let store = ImageStore::open(&tmp.path().join("store"))?;
    let image = store.import(&oci(&layout))?;
    assert_eq!(image.layers.len(), 3);
    let top = &image.layers[2];

    let wh = fs::symlink_metadata(top.join("etc/skiff-release"))?;
    assert!(wh.file_type().is_char_device(), "whiteout is a char device");
    assert_eq!(wh.rdev(), 0);
    assert_eq!((wh.uid(), wh.gid()), (0, 0));
    assert!(!top.join("etc/.wh.skiff-release").exists());
    assert!(!top.join("opt/data/.wh..wh..opq").exists());
    assert_eq!(
        get_xattr(&top.join("opt/data"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(get_xattr(&top.join("opt"), "trusted.overlay.opaque"), None);
    assert_eq!(fs::read_to_string(top.join("opt/data/new"))?, "new data\n");
    Ok(())
}

/// Unmounts on drop, so a failing assertion does not leave the mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("unmounting {}: {e}", self.0.display());
        }
    }
}

#[test]
fn t21_overlay_mount_shows_merged_view() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("busybox");
    busybox_layout(&layout, true, &["latest"])?;
    let store = ImageStore::open(&tmp.path().join("store"))?;
    let image = store.import(&oci(&layout))?;

    // overlayfs lists the top layer first.
    let lower: Vec<String> = image
        .layers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let target = tmp.path().join("rootfs");
    fs::create_dir(&target)?;
    nix::mount::mount(
        Some("overlay"),
        &target,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(format!("lowerdir={}", lower.join(":")).as_str()),
    )
    .context("mounting overlay")?;
    let _guard = Mounted(target.clone());

    assert!(
        !target.join("etc/skiff-release").exists(),
        "whiteout hides the file"
    );
    assert!(fs::symlink_metadata(target.join("etc/skiff-release")).is_err());
    let data: Vec<_> = fs::read_dir(target.join("opt/data"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(data, vec!["new"], "opaque dir shows only the top layer");
    assert_eq!(
        fs::read_to_string(target.join("www/index.html"))?,
        "hello from skiff\n"
    );
    assert_eq!(fs::read_link(target.join("bin/sh"))?, Path::new("busybox"));
    assert!(target.join("etc/passwd").is_file());
    let out = Command::new(target.join("bin/busybox"))
        .arg("true")
        .status()?;
    assert!(out.success());
    Ok(())
}

/// Flips one byte in the middle of the largest layer blob; returns its digest.
fn corrupt_biggest_blob(layout: &Path, truncate: bool) -> Result<String> {
    let mut biggest: Option<(u64, PathBuf)> = None;
    for e in fs::read_dir(layout.join("blobs/sha256"))? {
        let e = e?;
        let len = e.metadata()?.len();
        if biggest.as_ref().is_none_or(|(l, _)| len > *l) {
            biggest = Some((len, e.path()));
        }
    }
    let (len, path) = biggest.context("no blobs")?;
    let mut bytes = fs::read(&path)?;
    if truncate {
        bytes.truncate(len as usize / 2);
    } else {
        bytes[len as usize / 2] ^= 0x55;
    }
    fs::write(&path, bytes)?;
    let name = path
        .file_name()
        .context("name")?
        .to_string_lossy()
        .into_owned();
    Ok(format!("sha256:{name}"))
}

#[test]
fn t50_corrupt_layer_is_rejected_and_leaves_nothing() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("busybox");
    busybox_layout(&layout, false, &["latest"])?;
    let digest = corrupt_biggest_blob(&layout, false)?;
    let store = ImageStore::open(&tmp.path().join("store"))?;

    let err = store
        .import(&oci(&layout))
        .expect_err("corrupt layer accepted");
    let msg = err.to_string();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("layer {digest}: digest mismatch (got sha256:")),
        "{msg}"
    );
    // Layers are fetched in parallel: the good one may be kept, the bad one never is.
    assert!(no_busybox_layer(store.root())?, "corrupt layer left");
    assert!(tmp_is_empty(store.root())?, "no partial unpack left");
    assert!(store.list()?.is_empty());
    Ok(())
}

#[test]
fn t51_truncated_layer_is_rejected() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("busybox");
    busybox_layout(&layout, false, &["latest"])?;
    let digest = corrupt_biggest_blob(&layout, true)?;
    let store = ImageStore::open(&tmp.path().join("store"))?;

    let err = store
        .import(&oci(&layout))
        .expect_err("truncated layer accepted");
    let msg = err.to_string();
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("layer {digest}: size mismatch")),
        "{msg}"
    );
    assert!(no_busybox_layer(store.root())?, "truncated layer left");
    assert!(tmp_is_empty(store.root())?);
    Ok(())
}

/// Whether no layer in the store is the busybox layer (the fixture's biggest).
fn no_busybox_layer(store_root: &Path) -> Result<bool> {
    Ok(layer_dirs(store_root)?
        .iter()
        .all(|d| !d.join("bin/busybox").exists()))
}

#[test]
fn t52_missing_tag_lists_the_tags() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("busybox");
    busybox_layout(&layout, false, &["latest", "1.0"])?;
    let store = ImageStore::open(&tmp.path().join("store"))?;
    let err = store
        .import(&format!("{}:v2", oci(&layout)))
        .expect_err("no such tag");
    assert_eq!(
        err.to_string(),
        format!(
            r#"{}: no manifest tagged "v2" (have: latest, 1.0)"#,
            oci(&layout)
        )
    );
    let err = store
        .import(&oci(&tmp.path().join("nope")))
        .expect_err("no layout");
    assert!(err.to_string().contains("nope"), "{err}");
    Ok(())
}

#[test]
fn t53_corrupt_manifest_and_config_are_rejected() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("l");
    let manifest = write_layout(&layout, &[], "latest")?;
    let path = layout
        .join("blobs/sha256")
        .join(&manifest["sha256:".len()..]);
    let mut bytes = fs::read(&path)?;
    bytes[10] = b' ';
    fs::write(&path, bytes)?;
    let store = ImageStore::open(&tmp.path().join("store"))?;
    let err = store.import(&oci(&layout)).expect_err("corrupt manifest");
    assert!(
        err.to_string()
            .starts_with(&format!("manifest {manifest}: digest mismatch")),
        "{err}"
    );
    Ok(())
}

fn tar_of(entries: impl FnOnce(&mut tar::Builder<Vec<u8>>) -> Result<()>) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    entries(&mut b)?;
    Ok(b.into_inner()?)
}

fn assert_refused(tmp: &Path, name: &str, layer: Vec<u8>, expect: &str) -> Result<()> {
    let layout = tmp.join(name);
    write_layout(&layout, &[layer], "latest")?;
    let store = ImageStore::open(&tmp.join(format!("store-{name}")))?;
    let err = store.import(&oci(&layout)).expect_err(name);
    let msg = err.to_string();
    assert!(matches!(err, ImageError::Entry { .. }), "{name}: {msg}");
    assert!(msg.contains(expect), "{name}: {msg}");
    assert!(layer_dirs(store.root())?.is_empty(), "{name}: layer left");
    assert!(tmp_is_empty(store.root())?, "{name}: partial unpack left");
    Ok(())
}

#[test]
fn t54_path_traversal_is_refused() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let evil = tmp.path().join("evil");

    let dotdot = tar_of(|b| {
        let mut h = header(tar::EntryType::Regular, 0o644, 5);
        set_raw_name(&mut h, b"../evil");
        b.append(&h, &b"evil\n"[..])?;
        Ok(())
    })?;
    assert_refused(
        tmp.path(),
        "dotdot",
        dotdot,
        r#"entry "../evil": path escapes the layer dir"#,
    )?;

    let nested = tar_of(|b| {
        let mut h = header(tar::EntryType::Regular, 0o644, 5);
        set_raw_name(&mut h, b"a/../../evil");
        b.append(&h, &b"evil\n"[..])?;
        Ok(())
    })?;
    assert_refused(tmp.path(), "nested", nested, "path escapes the layer dir")?;

    let absolute = tar_of(|b| {
        let mut h = header(tar::EntryType::Regular, 0o644, 5);
        set_raw_name(&mut h, evil.as_os_str().as_bytes());
        b.append(&h, &b"evil\n"[..])?;
        Ok(())
    })?;
    assert_refused(tmp.path(), "absolute", absolute, "absolute path refused")?;

    let hardlink = tar_of(|b| {
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        h.set_path("passwd")?;
        h.as_gnu_mut().context("gnu header")?.linkname[..19]
            .copy_from_slice(b"../../../etc/passwd");
        h.set_cksum();
        b.append(&h, &[][..])?;
        Ok(())
    })?;
    assert_refused(tmp.path(), "hardlink", hardlink, "hard link target")?;
    assert!(!evil.exists(), "nothing written outside");

    // A symlink to / followed by a path through it stays inside the layer.
    let marker = format!("skiff-escape-{}", std::process::id());
    let through = tar_of(|b| {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "up", "/")?;
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "dots", "../../../../../../..")?;
        let mut h = header(tar::EntryType::Regular, 0o644, 3);
        b.append_data(&mut h, format!("up/tmp/{marker}"), &b"in\n"[..])?;
        let mut h = header(tar::EntryType::Regular, 0o644, 3);
        b.append_data(&mut h, format!("dots/tmp/{marker}-2"), &b"in\n"[..])?;
        Ok(())
    })?;
    let layout = tmp.path().join("through");
    write_layout(&layout, &[through], "latest")?;
    let store = ImageStore::open(&tmp.path().join("store-through"))?;
    let image = store.import(&oci(&layout))?;
    let l = &image.layers[0];
    assert!(
        !Path::new("/tmp").join(&marker).exists(),
        "escaped through a symlink"
    );
    assert!(
        !Path::new("/tmp").join(format!("{marker}-2")).exists(),
        "escaped through .."
    );
    assert_eq!(fs::read_to_string(l.join("tmp").join(&marker))?, "in\n");
    assert_eq!(
        fs::read_to_string(l.join("tmp").join(format!("{marker}-2")))?,
        "in\n"
    );
    Ok(())
}

#[test]
fn t30_special_files_survive() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let layer = tar_of(|b| {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, "dev", &[][..])?;
        let mut h = header(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(1)?;
        h.set_device_minor(3)?;
        b.append_data(&mut h, "dev/null", &[][..])?;
        let mut h = header(tar::EntryType::Block, 0o660, 0);
        h.set_device_major(7)?;
        h.set_device_minor(0)?;
        b.append_data(&mut h, "dev/loop0", &[][..])?;
        let mut h = header(tar::EntryType::Fifo, 0o600, 0);
        b.append_data(&mut h, "dev/fifo", &[][..])?;
        // No directory entries for these parents: they are created 0755.
        let mut h = header(tar::EntryType::Regular, 0o4755, 4);
        h.set_uid(1234);
        h.set_gid(5678);
        b.append_pax_extensions([
            ("SCHILY.xattr.user.skiff", &b"hello"[..]),
            ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
        ])?;
        b.append_data(&mut h, "usr/bin/suid", &b"#!x\n"[..])?;
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        b.append_link(&mut h, "usr/bin/suid-link", "usr/bin/suid")?;
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        h.set_uid(1000);
        b.append_link(&mut h, "usr/bin/link", "suid")?;
        let mut h = header(tar::EntryType::Directory, 0o1777, 0);
        b.append_data(&mut h, "scratch", &[][..])?;
        // A later entry replaces an earlier one.
        let mut h = header(tar::EntryType::Regular, 0o644, 3);
        b.append_data(&mut h, "scratch/f", &b"one"[..])?;
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "scratch/f", "elsewhere")?;
        // A long name (GNU long-name header).
        let long = format!("deep/{}/file", "d".repeat(150));
        let mut h = header(tar::EntryType::Regular, 0o640, 2);
        b.append_data(&mut h, &long, &b"ok"[..])?;
        Ok(())
    })?;
    let layout = tmp.path().join("special");
    write_layout(&layout, &[layer], "v1")?;
    let store = ImageStore::open(&tmp.path().join("store"))?;
    let image = store.import(&format!("{}:v1", oci(&layout)))?;
    assert_eq!(image.config.entrypoint, vec!["/bin/app"]);
    assert_eq!(image.config.user, "1000:1000");
    assert_eq!(image.config.stop_signal.as_deref(), Some("SIGINT"));
    let l = &image.layers[0];

    let null = fs::symlink_metadata(l.join("dev/null"))?;
    assert!(null.file_type().is_char_device());
    assert_eq!(
        (
            nix::sys::stat::major(null.rdev()),
            nix::sys::stat::minor(null.rdev())
        ),
        (1, 3)
    );
    assert_eq!(null.permissions().mode() & 0o7777, 0o666);
    let lp = fs::symlink_metadata(l.join("dev/loop0"))?;
    assert!(lp.file_type().is_block_device());
    assert_eq!(nix::sys::stat::major(lp.rdev()), 7);
    assert!(
        fs::symlink_metadata(l.join("dev/fifo"))?
            .file_type()
            .is_fifo()
    );

    let suid = fs::symlink_metadata(l.join("usr/bin/suid"))?;
    assert_eq!(
        suid.permissions().mode() & 0o7777,
        0o4755,
        "setuid kept after chown"
    );
    assert_eq!((suid.uid(), suid.gid()), (1234, 5678));
    assert_eq!(suid.mtime(), 1_000_000);
    assert_eq!(
        get_xattr(&l.join("usr/bin/suid"), "user.skiff").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        get_xattr(&l.join("usr/bin/suid"), "trusted.overlay.redirect"),
        None,
        "overlay xattrs from a layer are dropped"
    );
    let link = fs::symlink_metadata(l.join("usr/bin/suid-link"))?;
    assert_eq!(link.ino(), suid.ino(), "hard link");
    assert_eq!(suid.nlink(), 2);
    let sym = fs::symlink_metadata(l.join("usr/bin/link"))?;
    assert!(sym.file_type().is_symlink());
    assert_eq!(sym.uid(), 1000);
    assert_eq!(
        fs::symlink_metadata(l.join("usr"))?.permissions().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        fs::symlink_metadata(l.join("scratch"))?
            .permissions()
            .mode()
            & 0o7777,
        0o1777
    );
    assert_eq!(fs::read_link(l.join("scratch/f"))?, Path::new("elsewhere"));
    assert_eq!(
        fs::read_to_string(l.join(format!("deep/{}/file", "d".repeat(150))))?,
        "ok"
    );
    Ok(())
}

#[test]
fn t40_image_index_picks_the_host_platform() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("multi");
    busybox_layout(&layout, false, &["latest"])?;
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let real = index["manifests"][0].clone();
    let other_arch = if host_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let fake = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", "e".repeat(64)), "size": 100,
        "platform": {"architecture": other_arch, "os": "linux"},
    });
    let mut real_entry = real.clone();
    real_entry
        .as_object_mut()
        .context("object")?
        .remove("annotations");
    let nested = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [fake, real_entry],
    });
    let (nested_digest, nested_size) = put_blob(&layout, &serde_json::to_vec(&nested)?)?;
    let only_other = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [fake],
    });
    let (other_digest, other_size) = put_blob(&layout, &serde_json::to_vec(&only_other)?)?;
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.index.v1+json",
             "digest": nested_digest, "size": nested_size,
             "annotations": {"org.opencontainers.image.ref.name": "multi"}},
            {"mediaType": "application/vnd.oci.image.index.v1+json",
             "digest": other_digest, "size": other_size,
             "annotations": {"org.opencontainers.image.ref.name": "foreign"}},
        ],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&top)?)?;

    let store = ImageStore::open(&tmp.path().join("store"))?;
    let image = store.import(&format!("{}:multi", oci(&layout)))?;
    assert_eq!(image.manifest_digest.as_deref(), real["digest"].as_str());
    assert_eq!(image.layers.len(), 2);

    let err = store
        .import(&format!("{}:foreign", oci(&layout)))
        .expect_err("no host platform");
    let msg = err.to_string();
    assert!(matches!(err, ImageError::NoPlatform { .. }), "{msg}");
    assert!(
        msg.contains(&format!("(have: linux/{other_arch})")),
        "{msg}"
    );
    // No TAG and no "latest": several manifests, so it must be named.
    let err = store.import(&oci(&layout)).expect_err("ambiguous");
    if !err
        .to_string()
        .contains(r#"no manifest tagged "latest" (have: multi, foreign)"#)
    {
        bail!("unexpected error: {err}");
    }
    Ok(())
}
