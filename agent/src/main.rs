//! `skiff-agent`: the node agent. The container runtime, images, networking and DNS are built
//! by their own issues; until then this binary only says so.

fn main() -> std::process::ExitCode {
    eprintln!(
        "skiff-agent {}: the node agent is not built yet (see the runtime issue)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
