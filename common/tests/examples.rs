//! Every example spec under `tests/data/` parses through the public API, and its canonical JSON
//! parses back to an equal spec with no diff; every spec under `deploy/examples/` is accepted as
//! `skiff apply` accepts it (nothing in it refused as not supported yet).

#![allow(clippy::unwrap_used)] // a test may unwrap
use std::fs;
use std::path::Path;

use skiff_common::{SpecFormat, diff_specs, parse_job_spec, parse_job_spec_unchecked};

#[test]
fn every_example_parses_and_round_trips() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut seen = 0;
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let text = fs::read_to_string(&path).unwrap();
        let spec = parse_job_spec_unchecked(&text, SpecFormat::Auto)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let back = parse_job_spec_unchecked(&spec.to_canonical_json(), SpecFormat::Json).unwrap();
        assert_eq!(back, spec, "{}", path.display());
        assert!(diff_specs(&spec, &back).is_empty(), "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 3, "expected the example specs in {}", dir.display());
}

#[test]
fn deploy_examples_are_accepted_as_apply_accepts_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut seen = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        parse_job_spec(&text, SpecFormat::Toml)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(seen >= 1, "expected example specs in {}", dir.display());
}
