//! `skiff-monitor --data-dir DIR ID`: the per-container monitor as a small binary of its own
//! (`-` as the id: a spare, started ahead of need, which reads its container's id from stdin),
//! installed next to `skiff-agent` (without it the agent runs its built-in copy, `skiff-agent
//! __monitor`). A monitor is a container's parent for the container's whole life, so what it
//! costs is paid per container: this binary holds the runtime's monitor and none of the
//! agent (gRPC, TLS, the image client), so it starts faster and keeps fewer pages resident.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match args.as_slice() {
        [flag] if flag == "--version" => {
            println!("skiff-monitor {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        [flag, dir, id] if flag == "--data-dir" => match id.to_str() {
            Some(id) => ExitCode::from(skiff_runtime::monitor::main(&PathBuf::from(dir), id)),
            None => {
                eprintln!("skiff-monitor: the container id is not UTF-8");
                ExitCode::from(2)
            }
        },
        _ => {
            eprintln!(
                "usage: skiff-monitor --data-dir DIR ID (started by skiff-agent, one per container)"
            );
            ExitCode::from(2)
        }
    }
}
