//! Property tests of layer unpacking, through the public import of an OCI layout
//! ([`ImageStore::import`] of `oci:DIR`), with generated layer tars: path traversal (`..`,
//! absolute paths, in short names, GNU long names and PAX paths), symlinks pointing out of the
//! layer followed by entries through them, hard links to outside, whiteouts (valid and not),
//! odd modes, owners, times and devices, xattrs, duplicate names; then the same archives
//! truncated or corrupted (plain, gzip, zstd), and random bytes.
//!
//! Properties: nothing panics; nothing is written outside the store (the temp dir holding it
//! holds only it, a directory next to it that links and paths aim at is unchanged, no entry
//! named with this run's marker exists anywhere but in a published layer); an archive with an
//! entry that must be refused is refused, and a refused layer leaves nothing behind; a clean
//! tree of files is unpacked as written.
//!
//! Unpacking keeps owners and creates device nodes, so this needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;
use sha2::{Digest, Sha256};
use skiff_runtime::image::{ImageError, ImageStore};

fn is_root() -> bool {
    skiff_testkit::require(&[skiff_testkit::Need::Root])
}

/// `cases` cases, or `PROPTEST_CASES` when set (for a longer hunt by hand).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(cases),
        max_shrink_iters: 512,
        // Failures are reported with their input; no regression files next to the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Names made with this prefix must never appear outside a published layer.
fn marker_prefix() -> String {
    format!("zzskiffesc{}x", std::process::id())
}

/// Where the sandboxes go: a tmpfs when there is one (the store syncs its filesystem on every
/// layer it publishes, cheap on tmpfs), else the usual temp dir.
fn base_dir() -> PathBuf {
    static BASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let writable =
            tempfile::tempdir_in(shm).is_ok_and(|d| fs::write(d.path().join("probe"), b"").is_ok());
        if writable {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        }
    })
    .clone()
}

// ---------------------------------------------------------------------------------------------
// The model of a layer: entries with symbolic paths, resolved against one case's directories.

/// One path component as generated; `@OUT` is the absolute path of the outside directory,
/// `@REL` the relative path to it from the layer being unpacked, `@OUTIN` and `@OUTNAME`
/// where those land when resolved inside the layer, `@MARKn` a marker name.
fn plain_component() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        8 => select(vec!["a", "b", "c", "etc", "tmp", "sym", "victim", "vdir", "hl"]),
        3 => select(vec!["@MARK0", "@MARK1", "@MARK2"]),
        1 => select(vec![".", ""]),
        1 => select(vec![".wh.a", ".wh.b", ".wh.sym", ".wh.victim", ".wh..wh..opq", ".wh..wh.x"]),
    ]
}

/// Anything, including what must be refused.
fn hostile_component() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        6 => plain_component(),
        2 => Just(".."),
        1 => select(vec![".wh.", ".wh..", ".wh..."]),
        1 => select(vec!["@OUT", "@REL"]),
    ]
}

#[derive(Debug, Clone)]
struct SymPath {
    absolute: bool,
    comps: Vec<&'static str>,
    trailing_slash: bool,
}

impl SymPath {
    fn of(comps: Vec<&'static str>) -> SymPath {
        SymPath {
            absolute: false,
            comps,
            trailing_slash: false,
        }
    }
}

/// A relative path of plain components.
fn plain_path() -> impl Strategy<Value = SymPath> {
    (
        prop::collection::vec(plain_component(), 1..4),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(mut comps, trailing_slash)| {
            // Not the layer root.
            if comps.iter().all(|c| matches!(*c, "." | "")) {
                comps.push("a");
            }
            SymPath {
                absolute: false,
                comps,
                trailing_slash,
            }
        })
}

fn hostile_path() -> impl Strategy<Value = SymPath> {
    (
        prop::bool::weighted(0.3),
        prop::collection::vec(hostile_component(), 0..5),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(absolute, comps, trailing_slash)| SymPath {
            absolute,
            comps,
            trailing_slash,
        })
}

/// Where a link points: lean towards the outside.
fn outward_target() -> impl Strategy<Value = SymPath> {
    prop_oneof![
        3 => select(vec![
            vec!["@OUT"],
            vec!["@OUT", "victim"],
            vec!["@OUT", "vdir"],
            vec!["@REL"],
            vec!["@REL", "victim"],
            vec!["@REL", "vdir"],
            vec!["..", "..", "..", ".."],
            vec!["..", "..", "..", "..", "..", "..", "..", "..", "tmp"],
            vec!["sym", "victim"],
            vec!["sym", "vdir", "inner"],
        ])
        .prop_map(SymPath::of),
        1 => select(vec![vec![], vec!["etc", "passwd"], vec!["tmp"], vec!["dev", "shm"]])
            .prop_map(|comps| SymPath { absolute: true, comps, trailing_slash: false }),
        1 => hostile_path().prop_map(|mut p| {
            // Not empty: that is refused as a link without a target.
            if !p.absolute && p.comps.iter().all(|c| c.is_empty()) {
                p.comps.push("x");
            }
            p
        }),
    ]
}

/// A symlink's target: anywhere (symlinks may point anywhere; following them must not).
fn symlink_target() -> impl Strategy<Value = SymPath> {
    prop_oneof![2 => plain_path(), 3 => outward_target()]
}

/// The directories of one case.
struct Dirs {
    /// The outside directory, which links and absolute paths aim at.
    outside: PathBuf,
    marker: String,
}

impl Dirs {
    fn render(&self, p: &SymPath) -> Vec<u8> {
        let outside_name = self
            .outside
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parts: Vec<String> = p
            .comps
            .iter()
            .map(|c| match *c {
                // The layer unpacks in STORE/tmp/layer-HEX; STORE is SANDBOX/store, and the
                // outside directory is next to SANDBOX.
                "@OUT" => self.outside.display().to_string(),
                "@REL" => format!("../../../../{outside_name}"),
                // Where those land when resolved inside the layer instead.
                "@OUTIN" => self.outside.display().to_string()[1..].to_owned(),
                "@OUTNAME" => outside_name.clone(),
                c if c.starts_with("@MARK") => format!("{}{}", self.marker, &c[5..]),
                c => c.to_owned(),
            })
            .collect();
        let mut s = parts.join("/");
        if p.absolute && !s.starts_with('/') {
            s.insert(0, '/');
        }
        if p.trailing_slash {
            s.push('/');
        }
        s.into_bytes()
    }
}

#[derive(Debug, Clone)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(SymPath),
    Hardlink(SymPath),
    Fifo,
    CharDev(u32, u32),
    BlockDev(u32, u32),
}

/// How a name (or link name) is stored in the archive.
#[derive(Debug, Clone, Copy)]
enum NameForm {
    /// In the header's 100-byte field (a GNU long name entry when longer).
    Header,
    /// In a PAX extended header (`path` / `linkpath`), the header holding a decoy.
    Pax,
}

#[derive(Debug, Clone)]
struct Ent {
    path: SymPath,
    kind: Kind,
    form: NameForm,
    mode: u32,
    /// Random bytes for the mode field instead of an octal number.
    raw_mode: Option<[u8; 8]>,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(&'static str, Vec<u8>)>,
}

fn kind(hostile: bool) -> impl Strategy<Value = Kind> {
    let hardlink_target = if hostile {
        prop_oneof![1 => plain_path(), 2 => outward_target()].boxed()
    } else {
        plain_path().boxed()
    };
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Kind::File),
        3 => Just(Kind::Dir),
        3 => symlink_target().prop_map(Kind::Symlink),
        2 => hardlink_target.prop_map(Kind::Hardlink),
        1 => Just(Kind::Fifo),
        1 => (0u32..4096, 0u32..1 << 20).prop_map(|(a, b)| Kind::CharDev(a, b)),
        1 => (0u32..4096, 0u32..1 << 20).prop_map(|(a, b)| Kind::BlockDev(a, b)),
    ]
}

fn id(hostile: bool) -> BoxedStrategy<u64> {
    if !hostile {
        return prop_oneof![3 => Just(0u64), 1 => 0u64..70_000, 1 => Just(u64::from(u32::MAX))]
            .boxed();
    }
    prop_oneof![
        1 => 0u64..70_000,
        1 => (u64::from(u32::MAX) + 1)..=u64::MAX,
    ]
    .boxed()
}

fn xattr_name(hostile: bool) -> BoxedStrategy<&'static str> {
    // Not user.*: the kernel refuses those on symlinks and device nodes (see
    // `user_xattrs_on_a_symlink`).
    let harmless = select(vec![
        "trusted.t",
        "trusted.overlay.opaque",
        "trusted.overlay.redirect",
        "bogus",
    ]);
    if hostile {
        prop_oneof![
            harmless,
            select(vec!["user.a", "security.capability", "", "user."])
        ]
        .boxed()
    } else {
        harmless.boxed()
    }
}

/// An entry; a hostile one may be anything, a plain one is one a layer could hold.
fn ent(hostile: bool) -> impl Strategy<Value = Ent> {
    (
        if hostile {
            hostile_path().boxed()
        } else {
            plain_path().boxed()
        },
        kind(hostile),
        prop_oneof![4 => Just(NameForm::Header), 1 => Just(NameForm::Pax)],
        prop_oneof![
            4 => select(vec![0o644u32, 0o755, 0o600, 0o1777, 0o4755, 0o2755, 0, 0o7777]),
            2 => any::<u32>(),
        ],
        if hostile {
            prop::option::weighted(0.2, any::<[u8; 8]>()).boxed()
        } else {
            Just(None).boxed()
        },
        (id(hostile), id(hostile)),
        prop_oneof![
            4 => 0u64..2_000_000_000,
            1 => any::<u64>(),
        ],
        prop::collection::vec(
            (
                xattr_name(hostile),
                prop::collection::vec(any::<u8>(), 0..8),
            ),
            0..2,
        ),
    )
        .prop_map(
            |(path, kind, form, mode, raw_mode, (uid, gid), mtime, xattrs)| Ent {
                path,
                kind,
                form,
                mode,
                raw_mode,
                uid,
                gid,
                mtime,
                xattrs,
            },
        )
}

/// A symlink `sym` (or a marker name) aimed outside, then entries written through it: the
/// classic escape. Often the layer first holds the directories the link's target names when
/// resolved inside the layer, so that the writes through it succeed (inside).
fn escape_attempt() -> impl Strategy<Value = Vec<Ent>> {
    (
        prop::bool::weighted(0.6),
        ent(false),
        select(vec!["sym", "@MARK0"]),
        outward_target(),
        prop::collection::vec(
            (
                ent(false),
                prop::collection::vec(
                    select(vec![
                        "victim",
                        "vdir",
                        "inner",
                        "@MARK1",
                        ".wh.victim",
                        ".wh..wh..opq",
                    ]),
                    1..3,
                ),
            ),
            1..4,
        ),
    )
        .prop_map(|(prepare, link, name, target, through)| {
            let mut out = Vec::new();
            if prepare {
                for comps in [
                    vec!["@OUTIN"],
                    vec!["@OUTIN", "vdir"],
                    vec!["@OUTNAME"],
                    vec!["@OUTNAME", "vdir"],
                    vec!["dev", "shm"],
                ] {
                    out.push(Ent {
                        path: SymPath::of(comps),
                        kind: Kind::Dir,
                        ..link.clone()
                    });
                }
            }
            out.push(Ent {
                path: SymPath::of(vec![name]),
                kind: Kind::Symlink(target),
                ..link
            });
            for (mut e, rest) in through {
                let mut comps = vec![name];
                comps.extend(rest);
                e.path = SymPath::of(comps);
                out.push(e);
            }
            out
        })
}

/// A layer's entries: mostly plain, an escape attempt, and now and then a hostile entry.
fn layer_entries() -> impl Strategy<Value = Vec<Ent>> {
    (
        prop::collection::vec(ent(false), 0..5),
        prop::option::weighted(0.7, escape_attempt()),
        prop::collection::vec(ent(false), 0..3),
        prop::option::weighted(0.3, ent(true)),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(mut ents, escape, more, hostile, at)| {
            ents.extend(escape.into_iter().flatten());
            ents.extend(more);
            if let Some(h) = hostile {
                let i = at.index(ents.len() + 1);
                ents.insert(i, h);
            }
            ents
        })
}

/// One PAX record: `LEN key=value\n`, LEN counting the whole record.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len += 1;
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

fn set_field(field: &mut [u8], value: &[u8]) {
    field.fill(0);
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

fn append_long(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, value: &[u8]) {
    let mut data = value.to_vec();
    data.push(0);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    set_field(&mut h.as_old_mut().name, b"././@LongLink");
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &data[..]).expect("append to a Vec");
}

/// The layer tar of `ents`.
fn build_tar(ents: &[Ent], dirs: &Dirs) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in ents {
        let path = dirs.render(&e.path);
        let (kind, data, link): (tar::EntryType, &[u8], Option<Vec<u8>>) = match &e.kind {
            Kind::File(d) => (tar::EntryType::Regular, d, None),
            Kind::Dir => (tar::EntryType::Directory, &[], None),
            Kind::Symlink(t) => (tar::EntryType::Symlink, &[], Some(dirs.render(t))),
            Kind::Hardlink(t) => (tar::EntryType::Link, &[], Some(dirs.render(t))),
            Kind::Fifo => (tar::EntryType::Fifo, &[], None),
            Kind::CharDev(..) => (tar::EntryType::Char, &[], None),
            Kind::BlockDev(..) => (tar::EntryType::Block, &[], None),
        };
        let mut pax = Vec::new();
        for (name, value) in &e.xattrs {
            pax.extend(pax_record(&format!("SCHILY.xattr.{name}"), value));
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(e.mode);
        if let Some(raw) = e.raw_mode {
            h.as_old_mut().mode = raw;
        }
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        if let Kind::CharDev(major, minor) | Kind::BlockDev(major, minor) = e.kind {
            h.set_device_major(major).expect("gnu header");
            h.set_device_minor(minor).expect("gnu header");
        }
        match e.form {
            NameForm::Header => {
                if path.len() > 100 {
                    append_long(&mut b, tar::EntryType::GNULongName, &path);
                }
                set_field(&mut h.as_old_mut().name, &path);
                if let Some(link) = &link {
                    if link.len() > 100 {
                        append_long(&mut b, tar::EntryType::GNULongLink, link);
                    }
                    set_field(&mut h.as_old_mut().linkname, link);
                }
            }
            NameForm::Pax => {
                pax.extend(pax_record("path", &path));
                set_field(&mut h.as_old_mut().name, b"decoy");
                if let Some(link) = &link {
                    pax.extend(pax_record("linkpath", link));
                    set_field(&mut h.as_old_mut().linkname, b"decoy");
                }
            }
        }
        if !pax.is_empty() {
            let mut x = tar::Header::new_ustar();
            x.set_entry_type(tar::EntryType::XHeader);
            set_field(&mut x.as_old_mut().name, b"PaxHeaders/x");
            x.set_size(pax.len() as u64);
            x.set_mode(0o644);
            x.set_cksum();
            b.append(&x, &pax[..]).expect("append to a Vec");
        }
        h.set_cksum();
        b.append(&h, data).expect("append to a Vec");
    }
    b.into_inner().expect("finish a Vec")
}

/// The path's components as the unpacker reads them: `None` when it must refuse it (absolute,
/// or with a `..`).
fn clean(p: &[u8]) -> Option<Vec<&[u8]>> {
    if p.first() == Some(&b'/') {
        return None;
    }
    let mut out = Vec::new();
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// Whether this entry must make the unpacker refuse the layer, whatever came before it.
fn must_refuse(e: &Ent, dirs: &Dirs) -> Option<String> {
    let path = dirs.render(&e.path);
    let show = String::from_utf8_lossy(&path).into_owned();
    let Some(comps) = clean(&path) else {
        return Some(format!("{show:?} escapes the layer"));
    };
    let Some(name) = comps.last() else {
        return (!matches!(e.kind, Kind::Dir))
            .then(|| format!("{show:?} is the layer root and not a directory"));
    };
    if let Some(target) = name.strip_prefix(b".wh.") {
        return matches!(target, b"" | b"." | b"..").then(|| format!("{show:?}: invalid whiteout"));
    }
    if e.uid > u64::from(u32::MAX) || e.gid > u64::from(u32::MAX) {
        return Some(format!("{show:?}: owner {}:{} out of range", e.uid, e.gid));
    }
    match &e.kind {
        Kind::Hardlink(t) | Kind::Symlink(t) if dirs.render(t).is_empty() => {
            Some(format!("{show:?}: link without a target"))
        }
        Kind::Hardlink(t) => {
            let target = dirs.render(t);
            match clean(&target) {
                None => Some(format!(
                    "{show:?}: hard link to {:?} escapes the layer",
                    String::from_utf8_lossy(&target)
                )),
                Some(tc) if tc.is_empty() => Some(format!("{show:?}: hard link to the root")),
                _ => None,
            }
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Importing one layer, and checking that nothing escaped.

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn put_blob(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let digest = sha256(bytes);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).expect("blobs dir");
    fs::write(dir.join(&digest["sha256:".len()..]), bytes).expect("write blob");
    (digest, bytes.len() as u64)
}

/// Writes an OCI layout at `layout` whose image has one layer: `blob`, of `media_type`, whose
/// uncompressed tar has the diff-id `diff_id`.
fn write_layout(layout: &Path, blob: &[u8], media_type: &str, diff_id: &str) {
    fs::create_dir_all(layout).expect("layout dir");
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let (digest, size) = put_blob(layout, blob);
    let config = serde_json::json!({
        "architecture": host_arch(), "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let (config_digest, config_size) =
        put_blob(layout, &serde_json::to_vec(&config).expect("json"));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": media_type, "digest": digest, "size": size}],
    });
    let (manifest_digest, manifest_size) =
        put_blob(layout, &serde_json::to_vec(&manifest).expect("json"));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("index.json");
}

/// What is observable of a path without following symlinks: type, size, mode, owner, link
/// count, mtime, and a regular file's content or a symlink's target.
fn describe(path: &Path) -> String {
    let Ok(m) = fs::symlink_metadata(path) else {
        return "missing".to_owned();
    };
    let content = if m.is_file() {
        fs::read(path).map(|b| sha256(&b)).unwrap_or_default()
    } else if m.file_type().is_symlink() {
        fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_default()
    } else {
        String::new()
    };
    format!(
        "mode {:o} owner {}:{} links {} size {} mtime {} {content}",
        m.mode(),
        m.uid(),
        m.gid(),
        m.nlink(),
        if m.is_dir() { 0 } else { m.len() },
        if m.is_dir() { 0 } else { m.mtime() },
    )
}

/// Every path under `root` (not following symlinks), described.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        out.insert(p.clone(), describe(&p));
        if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir())
            && let Ok(rd) = fs::read_dir(&p)
        {
            for e in rd.flatten() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Every path under `root` whose name starts with `prefix` (not following symlinks).
fn find_named(root: &Path, prefix: &str, recursive: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with(prefix) {
                out.push(p.clone());
            }
            if recursive && e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    out
}

/// One case: a sandbox holding only the store, an outside directory next to it, the layout
/// elsewhere.
struct Case {
    sandbox: tempfile::TempDir,
    outside: tempfile::TempDir,
    src: tempfile::TempDir,
    dirs: Dirs,
    before: BTreeMap<PathBuf, String>,
    sandbox_meta: String,
}

impl Case {
    fn new(base: &Path) -> Case {
        let sandbox = tempfile::tempdir_in(base).expect("sandbox");
        let outside = tempfile::tempdir_in(base).expect("outside");
        let src = tempfile::tempdir_in(base).expect("layout dir");
        fs::write(outside.path().join("victim"), b"victim\n").expect("victim");
        fs::set_permissions(
            outside.path().join("victim"),
            fs::Permissions::from_mode(0o640),
        )
        .expect("chmod victim");
        fs::create_dir(outside.path().join("vdir")).expect("vdir");
        fs::write(outside.path().join("vdir/inner"), b"inner\n").expect("inner");
        let before = snapshot(outside.path());
        let dirs = Dirs {
            outside: outside.path().to_owned(),
            marker: marker_prefix(),
        };
        let sandbox_meta = describe_dir(sandbox.path());
        Case {
            sandbox,
            outside,
            src,
            dirs,
            before,
            sandbox_meta,
        }
    }

    fn store_root(&self) -> PathBuf {
        self.sandbox.path().join("store")
    }

    fn import(&self, blob: &[u8], media_type: &str, diff_id: &str) -> Result<PathBuf, ImageError> {
        let layout = self.src.path().join("layout");
        write_layout(&layout, blob, media_type, diff_id);
        let store = ImageStore::open(&self.store_root())?;
        let image = store.import(&format!("oci:{}", layout.display()))?;
        Ok(image.layers.first().cloned().unwrap_or_default())
    }

    /// Nothing was written outside the store, and a refused layer left nothing behind.
    fn check_contained(&self, result: &Result<PathBuf, ImageError>) -> Result<(), TestCaseError> {
        let top: Vec<String> = fs::read_dir(self.sandbox.path())
            .expect("read sandbox")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        prop_assert_eq!(
            &top,
            &["store".to_owned()],
            "the sandbox holds only the store"
        );
        prop_assert_eq!(
            describe_dir(self.sandbox.path()),
            self.sandbox_meta.clone(),
            "the sandbox's own mode or owner changed"
        );
        let root = self.store_root();
        let allowed: BTreeSet<&str> = ["images", "layers", "tmp", "locks", "store.lock"].into();
        for e in fs::read_dir(&root).expect("read store").flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            prop_assert!(
                allowed.contains(name.as_str()),
                "unexpected {} in the store",
                name
            );
        }
        for e in fs::read_dir(root.join("layers"))
            .expect("read layers")
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            prop_assert!(
                name == "sha256" || name == "complete",
                "unexpected layers/{}",
                name
            );
        }
        prop_assert_eq!(
            fs::read_dir(root.join("tmp")).expect("read tmp").count(),
            0,
            "something left in the store's tmp"
        );
        let layers = root.join("layers/sha256");
        let published: Vec<PathBuf> = fs::read_dir(&layers)
            .expect("read layers/sha256")
            .flatten()
            .map(|e| e.path())
            .collect();
        match result {
            Ok(layer) => {
                prop_assert_eq!(&published, &vec![layer.clone()], "one layer, published");
            }
            Err(_) => prop_assert!(published.is_empty(), "a refused layer was kept"),
        }
        let after = snapshot(self.outside.path());
        prop_assert_eq!(&after, &self.before, "the outside directory changed");
        let marked = find_named(self.sandbox.path(), &self.dirs.marker, true);
        for p in marked {
            prop_assert!(
                p.starts_with(&layers),
                "{} written outside the layer",
                p.display()
            );
        }
        let base = self
            .sandbox
            .path()
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        for dir in [base, std::env::temp_dir(), PathBuf::from("/")] {
            let found = find_named(&dir, &self.dirs.marker, false);
            prop_assert!(found.is_empty(), "escaped: {:?}", found);
        }
        Ok(())
    }
}

fn describe_dir(p: &Path) -> String {
    fs::symlink_metadata(p)
        .map(|m| format!("{:o} {}:{}", m.mode(), m.uid(), m.gid()))
        .unwrap_or_default()
}

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

#[derive(Debug, Clone, Copy)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

fn compress(tar: &[u8], c: Compression) -> (Vec<u8>, &'static str) {
    match c {
        Compression::None => (tar.to_vec(), TAR),
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).expect("gzip to a Vec");
            (gz.finish().expect("gzip to a Vec"), TAR_GZ)
        }
        Compression::Zstd => (zstd::encode_all(tar, 1).expect("zstd"), TAR_ZSTD),
    }
}

#[derive(Debug, Clone)]
enum Damage {
    Truncate(prop::sample::Index),
    Flip(Vec<(prop::sample::Index, u8)>),
    Insert(prop::sample::Index, Vec<u8>),
    /// Overwrite a 512-byte block's header fields with random bytes (checksum fixed up).
    Header(prop::sample::Index, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Damage::Truncate),
        prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8)
            .prop_map(Damage::Flip),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..600)
        )
            .prop_map(|(i, b)| Damage::Insert(i, b)),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 345..=345)
        )
            .prop_map(|(i, b)| Damage::Header(i, b)),
    ]
}

fn apply_damage(bytes: &mut Vec<u8>, d: &Damage) {
    if bytes.is_empty() {
        return;
    }
    match d {
        Damage::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        Damage::Flip(flips) => {
            for (i, x) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
        }
        Damage::Insert(i, b) => {
            let i = i.index(bytes.len() + 1);
            bytes.splice(i..i, b.iter().copied());
        }
        Damage::Header(i, b) => {
            let blocks = bytes.len() / 512;
            if blocks == 0 {
                return;
            }
            let at = i.index(blocks) * 512;
            // Everything of a GNU header but the name (0..100), checksum (148..156) and type
            // (156): mode, ids, size, mtime, link name, magic, device numbers...
            let block = &mut bytes[at..at + 512];
            block[100..148].copy_from_slice(&b[..48]);
            block[157..500].copy_from_slice(&b[2..345]);
            let mut h = tar::Header::new_old();
            h.as_mut_bytes().copy_from_slice(block);
            h.set_cksum();
            block.copy_from_slice(h.as_bytes());
        }
    }
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        3 => Just(Compression::None),
        1 => Just(Compression::Gzip),
        1 => Just(Compression::Zstd),
    ]
}

// ---------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(config(256))]

    /// Archives of hostile entries: never a panic, never a write outside the store, and a
    /// layer with an entry that must be refused is refused.
    #[test]
    fn hostile_archives_stay_inside(
        ents in layer_entries(),
        c in compression(),
    ) {
        if !is_root() {
            return Ok(());
        }
        let case = Case::new(&base_dir());
        let tar = build_tar(&ents, &case.dirs);
        let (blob, media_type) = compress(&tar, c);
        let result = case.import(&blob, media_type, &sha256(&tar));
        case.check_contained(&result)?;
        if let Some(why) = ents.iter().find_map(|e| must_refuse(e, &case.dirs)) {
            prop_assert!(result.is_err(), "accepted although {}", why);
        }
        if let Err(e) = &result {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    /// The same archives truncated or corrupted, before or after compression: never a panic,
    /// never a write outside the store.
    #[test]
    fn damaged_archives_stay_inside(
        ents in layer_entries(),
        c in compression(),
        damages in prop::collection::vec(damage(), 1..3),
        after_compression in any::<bool>(),
    ) {
        if !is_root() {
            return Ok(());
        }
        let case = Case::new(&base_dir());
        let mut tar = build_tar(&ents, &case.dirs);
        let (blob, media_type, diff_id) = if after_compression {
            let (mut blob, media_type) = compress(&tar, c);
            for d in &damages {
                apply_damage(&mut blob, d);
            }
            (blob, media_type, sha256(&tar))
        } else {
            for d in &damages {
                apply_damage(&mut tar, d);
            }
            let (blob, media_type) = compress(&tar, c);
            (blob, media_type, sha256(&tar))
        };
        let result = case.import(&blob, media_type, &diff_id);
        case.check_contained(&result)?;
    }

    /// Random bytes as a layer, under each media type: never a panic, never a write outside.
    #[test]
    fn random_bytes_stay_inside(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        media_type in select(vec![TAR, TAR_GZ, TAR_ZSTD]),
        magic in select(vec![&b""[..], &[0x1f, 0x8b][..], &[0x28, 0xb5, 0x2f, 0xfd][..]]),
    ) {
        if !is_root() {
            return Ok(());
        }
        let case = Case::new(&base_dir());
        let mut blob = magic.to_vec();
        blob.extend_from_slice(&bytes);
        let result = case.import(&blob, media_type, &sha256(&blob));
        case.check_contained(&result)?;
    }
}

/// A clean tree: relative paths of plain names, no path inside another that is a file.
fn clean_tree() -> impl Strategy<Value = BTreeMap<String, (Vec<u8>, u32, u32)>> {
    prop::collection::btree_map(
        "[a-z]{1,6}(/[a-z]{1,6}){0,3}",
        (
            prop::collection::vec(any::<u8>(), 0..300),
            0u32..0o10000,
            0u32..100_000,
        ),
        1..12,
    )
    .prop_map(|mut files| {
        let paths: Vec<String> = files.keys().cloned().collect();
        files.retain(|p, _| {
            !paths.iter().any(|q| {
                q.len() > p.len() && q.starts_with(p.as_str()) && q.as_bytes()[p.len()] == b'/'
            })
        });
        files
    })
}

proptest! {
    #![proptest_config(config(128))]

    /// Files with any content, mode and owner in a tree of plain directories are unpacked as
    /// written, compressed or not.
    #[test]
    fn clean_trees_unpack_as_written(files in clean_tree(), c in compression()) {
        if !is_root() {
            return Ok(());
        }
        let case = Case::new(&base_dir());
        let mut b = tar::Builder::new(Vec::new());
        for (path, (data, mode, owner)) in &files {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_uid(u64::from(*owner));
            h.set_gid(u64::from(*owner) + 1);
            h.set_mtime(1_000_000);
            b.append_data(&mut h, path, &data[..]).expect("append to a Vec");
        }
        let tar = b.into_inner().expect("finish a Vec");
        let (blob, media_type) = compress(&tar, c);
        let result = case.import(&blob, media_type, &sha256(&tar));
        case.check_contained(&result)?;
        let layer = match result {
            Ok(layer) => layer,
            Err(e) => return Err(TestCaseError::fail(format!("clean tree refused: {e}"))),
        };
        for (path, (data, mode, owner)) in &files {
            let p = layer.join(path);
            let m = fs::symlink_metadata(&p).map_err(|e| TestCaseError::fail(format!("{path}: {e}")))?;
            prop_assert!(m.is_file(), "{} is not a file", path);
            prop_assert_eq!(&fs::read(&p).expect("read back"), data, "{} content", path);
            prop_assert_eq!(m.mode() & 0o7777, *mode, "{} mode", path);
            prop_assert_eq!((m.uid(), m.gid()), (*owner, *owner + 1), "{} owner", path);
            prop_assert_eq!(m.mtime(), 1_000_000, "{} mtime", path);
        }
    }
}

/// A `user.*` xattr on a symlink (or a device node or fifo): the kernel refuses it with EPERM.
/// The unpacker skips it with a warning and unpacks the layer, as containerd's unpacker (and
/// overlaybd's, modelled on it) does for exactly this case (EPERM, `user.` prefix, neither a
/// regular file nor a directory); it used to refuse the whole layer. Found while tuning
/// `hostile_archives_stay_inside`.
#[test]
fn user_xattrs_on_a_symlink() {
    if !is_root() {
        return;
    }
    let case = Case::new(&base_dir());
    let ents = [Ent {
        path: SymPath::of(vec!["link"]),
        kind: Kind::Symlink(SymPath::of(vec!["target"])),
        form: NameForm::Header,
        mode: 0o777,
        raw_mode: None,
        uid: 0,
        gid: 0,
        mtime: 1_000_000,
        xattrs: vec![("user.a", b"v".to_vec())],
    }];
    let tar = build_tar(&ents, &case.dirs);
    let result = case.import(&tar, TAR, &sha256(&tar));
    let layer = match result {
        Ok(layer) => layer,
        Err(e) => panic!("layer refused: {e}"),
    };
    let link = fs::symlink_metadata(layer.join("link")).expect("the link is unpacked");
    assert!(link.file_type().is_symlink());
    assert_eq!(
        fs::read_link(layer.join("link")).expect("readlink"),
        std::path::Path::new("target")
    );
}
