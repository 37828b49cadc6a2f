//! The rules of a [`JobSpec`] that its field types cannot express.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{
    ByteSize, CheckKind, ContainerSpec, JobSpec, Lifecycle, MAX_CONTAINERS, MAX_CPU, MAX_REPLICAS,
    MIN_MEMORY, NetworkMode, Port, Protocol, ReplicaCount, RestartPolicy, Service, SpecError,
    Volume, VolumeKind,
};

/// The longest name (job, namespace, service, port): one DNS label.
pub const MAX_NAME_LEN: usize = 63;

/// Signal names accepted as `stop_signal`, with their Linux numbers.
pub const KNOWN_SIGNALS: [(&str, i32); 11] = [
    ("SIGHUP", 1),
    ("SIGINT", 2),
    ("SIGQUIT", 3),
    ("SIGABRT", 6),
    ("SIGKILL", 9),
    ("SIGUSR1", 10),
    ("SIGUSR2", 12),
    ("SIGALRM", 14),
    ("SIGTERM", 15),
    ("SIGWINCH", 28),
    ("SIGPWR", 30),
];

/// The Linux number of a signal named in [`KNOWN_SIGNALS`] (`"SIGTERM"` is 15).
pub fn signal_number(name: &str) -> Option<i32> {
    KNOWN_SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, number)| *number)
}

/// Checks a name used in DNS (job, namespace, service, port): 1 to 63 of `[a-z0-9-]`, starting
/// and ending with a letter or digit. `kind` names the thing in the message ("job name"); the
/// error's `field` is empty for the caller to fill in.
pub fn validate_name(kind: &str, s: &str) -> Result<(), SpecError> {
    let reason = if s.is_empty() {
        "it is empty".to_owned()
    } else if s.len() > MAX_NAME_LEN {
        format!(
            "it is {} characters long, more than {MAX_NAME_LEN}",
            s.len()
        )
    } else if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        format!("it contains {c:?} (use lowercase letters, digits and '-')")
    } else if s.starts_with('-') || s.ends_with('-') {
        "it must start and end with a letter or digit".to_owned()
    } else {
        return Ok(());
    };
    Err(SpecError::new(
        "",
        format!("{s:?} is not a valid {kind}: {reason}"),
    ))
}

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::new(field, message)
}

/// [`validate_name`] for `field`.
fn name_at(field: &str, kind: &str, s: &str) -> Result<(), SpecError> {
    validate_name(kind, s).map_err(|e| err(field, e.message))
}

pub(crate) fn validate(spec: &JobSpec) -> Result<(), SpecError> {
    name_at("name", "job name", &spec.name)?;
    name_at("namespace", "namespace", &spec.namespace)?;
    if spec.replicas > MAX_REPLICAS {
        return Err(err(
            "replicas",
            format!("must be at most {MAX_REPLICAS}, found {}", spec.replicas),
        ));
    }
    validate_volumes(&spec.volumes)?;
    if spec.containers.is_empty() {
        return Err(err("containers", "must hold at least one container"));
    }
    if spec.containers.len() > MAX_CONTAINERS {
        return Err(err(
            "containers",
            format!(
                "must hold at most {MAX_CONTAINERS} containers, found {}",
                spec.containers.len()
            ),
        ));
    }
    for (i, c) in spec.containers.iter().enumerate() {
        let at = format!("containers[{i}]");
        name_at(&format!("{at}.name"), "container name", &c.name)?;
        if let Some(j) = spec.containers[..i].iter().position(|d| d.name == c.name) {
            return Err(err(
                format!("{at}.name"),
                format!("{:?} is already the name of containers[{j}]", c.name),
            ));
        }
        validate_container(&at, c, &spec.volumes)?;
    }
    if !spec
        .containers
        .iter()
        .any(|c| c.lifecycle == Lifecycle::Main)
    {
        return Err(err(
            "containers",
            "needs at least one main container (lifecycle = \"main\", the default)",
        ));
    }
    validate_ports(&spec.ports, spec.network.mode)?;
    if let Some(service) = &spec.service {
        if spec.network.mode == NetworkMode::None {
            return Err(err(
                "service",
                "a job in network mode none has no address to publish (use bridge or host)",
            ));
        }
        validate_service(service, &spec.ports)?;
    }
    for (i, c) in spec.placement.constraints.iter().enumerate() {
        c.check().map_err(|reason| {
            err(
                format!("placement.constraints[{i}]"),
                format!("{:?} is not a valid constraint: {reason}", c.to_string()),
            )
        })?;
    }
    validate_update(spec)?;
    if let Some(d) = &spec.disconnect
        && !(MIN_STOP_AFTER..=MAX_STOP_AFTER).contains(&d.stop_after)
    {
        return Err(err(
            "disconnect.stop_after",
            format!(
                "must be between {} and {}, found {}",
                fmt_duration(MIN_STOP_AFTER),
                fmt_duration(MAX_STOP_AFTER),
                fmt_duration(d.stop_after)
            ),
        ));
    }
    if let Some(mesh) = &spec.mesh {
        if spec.network.mode != NetworkMode::Bridge {
            return Err(err(
                "mesh",
                "the mesh sidecar needs network mode bridge (an address of the allocation's own)",
            ));
        }
        validate_service_refs("mesh.upstreams", &mesh.upstreams)?;
        validate_service_refs("mesh.allow_from", &mesh.allow_from)?;
    }
    Ok(())
}

fn validate_container(at: &str, c: &ContainerSpec, volumes: &[Volume]) -> Result<(), SpecError> {
    validate_image(&format!("{at}.image"), &c.image)?;
    validate_argv(&format!("{at}.command"), &c.command)?;
    validate_argv(&format!("{at}.args"), &c.args)?;
    validate_env(at, &c.env)?;
    if signal_number(&c.stop_signal).is_none() {
        let names: Vec<&str> = KNOWN_SIGNALS.iter().map(|(n, _)| *n).collect();
        return Err(err(
            format!("{at}.stop_signal"),
            format!(
                "{:?} is not a known signal (expected one of {})",
                c.stop_signal,
                names.join(", ")
            ),
        ));
    }
    if c.lifecycle == Lifecycle::Init && c.restart == RestartPolicy::Always {
        return Err(err(
            format!("{at}.restart"),
            "an init container runs to completion: restart must be never or on-failure",
        ));
    }
    validate_resources(at, &c.resources)?;
    validate_devices(at, &c.devices)?;
    for (i, m) in c.volumes.iter().enumerate() {
        let field = format!("{at}.volumes[{i}]");
        if !volumes.iter().any(|v| v.name == m.name) {
            let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
            let expected = if names.is_empty() {
                "the job declares no [[volumes]]".to_owned()
            } else {
                format!("expected one of {}", names.join(", "))
            };
            return Err(err(
                format!("{field}.name"),
                format!("{:?} does not name a volume ({expected})", m.name),
            ));
        }
        check_abs_path(&format!("{field}.path"), &m.path, "mount path")?;
        if ["/", "/proc", "/sys", "/dev"]
            .iter()
            .any(|p| m.path == *p || (*p != "/" && m.path.starts_with(&format!("{p}/"))))
        {
            return Err(err(
                format!("{field}.path"),
                format!(
                    "{} is reserved (the container's root, /proc, /sys and /dev are the runtime's)",
                    m.path
                ),
            ));
        }
        if let Some(j) = c.volumes[..i].iter().position(|n| n.path == m.path) {
            return Err(err(
                format!("{field}.path"),
                format!("{} is already the path of volumes[{j}]", m.path),
            ));
        }
    }
    Ok(())
}

/// An absolute path written plainly: no empty, `.` or `..` components, no trailing `/`, no
/// NUL, at most 4096 bytes.
fn check_abs_path(field: &str, path: &str, what: &str) -> Result<(), SpecError> {
    let plain = path.starts_with('/')
        && path.len() <= 4096
        && !path.contains('\0')
        && (path == "/"
            || path[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."));
    if plain {
        Ok(())
    } else {
        Err(err(
            field,
            format!(
                "{path:?} is not a plain absolute {what} (start with '/', no '.', '..' or empty \
                 components, no trailing '/')"
            ),
        ))
    }
}

/// The largest tmpfs volume.
const MAX_TMPFS: ByteSize = ByteSize::gib(64);

fn validate_volumes(volumes: &[Volume]) -> Result<(), SpecError> {
    for (i, v) in volumes.iter().enumerate() {
        let at = format!("volumes[{i}]");
        name_at(&format!("{at}.name"), "volume name", &v.name)?;
        if let Some(j) = volumes[..i].iter().position(|w| w.name == v.name) {
            return Err(err(
                format!("{at}.name"),
                format!("{:?} is already the name of volumes[{j}]", v.name),
            ));
        }
        match (v.kind, &v.path) {
            (VolumeKind::Host, None) => {
                return Err(err(
                    format!("{at}.path"),
                    "a host volume needs the directory on the node",
                ));
            }
            (VolumeKind::Host, Some(p)) => {
                check_abs_path(&format!("{at}.path"), p, "directory")?;
                if p == "/" {
                    return Err(err(format!("{at}.path"), "the node's root is not a volume"));
                }
            }
            (kind, Some(_)) => {
                return Err(err(
                    format!("{at}.path"),
                    format!("only a host volume has a path (this one is {kind})"),
                ));
            }
            (_, None) => {}
        }
        match (v.kind, v.size) {
            (VolumeKind::Tmpfs, Some(size)) if size < ByteSize::mib(1) || size > MAX_TMPFS => {
                return Err(err(
                    format!("{at}.size"),
                    format!("must be from 1Mi to {MAX_TMPFS}, found {size}"),
                ));
            }
            (VolumeKind::Tmpfs, _) | (_, None) => {}
            (kind, Some(_)) => {
                return Err(err(
                    format!("{at}.size"),
                    format!("only a tmpfs volume has a size (this one is {kind})"),
                ));
            }
        }
    }
    Ok(())
}

/// Device paths under `/dev/`, plain (no `.`, `..` or empty components), each once;
/// permissions out of `r`, `w`, `m`, each at most once.
fn validate_devices(at: &str, devices: &[super::DeviceGrant]) -> Result<(), SpecError> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, d) in devices.iter().enumerate() {
        let rel = d.path.strip_prefix("/dev/").unwrap_or("");
        if rel.is_empty()
            || d.path.len() > 255
            || rel
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0'))
        {
            return Err(err(
                format!("{at}.devices[{i}].path"),
                format!("{:?} is not a device path under /dev/", d.path),
            ));
        }
        if !seen.insert(d.path.as_str()) {
            return Err(err(
                format!("{at}.devices[{i}].path"),
                format!("{} is granted twice", d.path),
            ));
        }
        let mut letters = std::collections::BTreeSet::new();
        if d.permissions.is_empty()
            || !d
                .permissions
                .chars()
                .all(|c| matches!(c, 'r' | 'w' | 'm') && letters.insert(c))
        {
            return Err(err(
                format!("{at}.devices[{i}].permissions"),
                format!("{:?} is not made of r, w and m, each once", d.permissions),
            ));
        }
    }
    Ok(())
}

fn validate_image(field: &str, image: &str) -> Result<(), SpecError> {
    if image.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(err(field, format!("{image:?} must not contain whitespace")));
    }
    Ok(())
}

fn validate_argv(field: &str, argv: &[String]) -> Result<(), SpecError> {
    for (i, arg) in argv.iter().enumerate() {
        if arg.contains('\0') {
            return Err(err(
                format!("{field}[{i}]"),
                "must not contain a NUL character",
            ));
        }
    }
    if argv.first().is_some_and(String::is_empty) {
        return Err(err(
            format!("{field}[0]"),
            "the program to run must not be empty",
        ));
    }
    Ok(())
}

fn is_env_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn validate_env(at: &str, env: &BTreeMap<String, String>) -> Result<(), SpecError> {
    for (key, value) in env {
        let field = format!("{at}.env.{key}");
        if !is_env_name(key) {
            return Err(err(
                field,
                format!(
                    "{key:?} is not a valid environment variable name \
                     (use letters, digits and '_', not starting with a digit)"
                ),
            ));
        }
        if value.contains('\0') {
            return Err(err(field, "must not contain a NUL character"));
        }
    }
    Ok(())
}

fn validate_resources(at: &str, r: &super::Resources) -> Result<(), SpecError> {
    if !(r.cpu.is_finite() && r.cpu > 0.0 && r.cpu <= MAX_CPU) {
        return Err(err(
            format!("{at}.resources.cpu"),
            format!(
                "must be more than 0 and at most {MAX_CPU} cores, found {}",
                r.cpu
            ),
        ));
    }
    if r.memory < MIN_MEMORY {
        return Err(err(
            format!("{at}.resources.memory"),
            format!("must be at least {MIN_MEMORY}, found {}", r.memory),
        ));
    }
    if r.pids == 0 {
        return Err(err(format!("{at}.resources.pids"), "must be at least 1"));
    }
    Ok(())
}

fn validate_ports(ports: &[Port], mode: NetworkMode) -> Result<(), SpecError> {
    for (i, p) in ports.iter().enumerate() {
        name_at(&format!("ports[{i}].name"), "port name", &p.name)?;
        if p.port == 0 {
            return Err(err(
                format!("ports[{i}].port"),
                "must be between 1 and 65535, found 0",
            ));
        }
        if let Some(j) = ports[..i].iter().position(|q| q.name == p.name) {
            return Err(err(
                format!("ports[{i}].name"),
                format!("{:?} is already the name of ports[{j}]", p.name),
            ));
        }
        if let Some(j) = ports[..i]
            .iter()
            .position(|q| q.port == p.port && q.protocol == p.protocol)
        {
            return Err(err(
                format!("ports[{i}].port"),
                format!("{}/{} is already used by ports[{j}]", p.port, p.protocol),
            ));
        }
        let Some(host) = p.host_port else { continue };
        match mode {
            NetworkMode::Bridge => {}
            NetworkMode::Host => {
                return Err(err(
                    format!("ports[{i}].host_port"),
                    "in network mode host the port is the node's already (leave host_port out)",
                ));
            }
            NetworkMode::None => {
                return Err(err(
                    format!("ports[{i}].host_port"),
                    "a job in network mode none cannot be reached from outside",
                ));
            }
        }
        if host == 0 {
            return Err(err(
                format!("ports[{i}].host_port"),
                "must be between 1 and 65535, found 0",
            ));
        }
        if let Some(j) = ports[..i]
            .iter()
            .position(|q| q.host_port == Some(host) && q.protocol == p.protocol)
        {
            return Err(err(
                format!("ports[{i}].host_port"),
                format!("{host}/{} is already published by ports[{j}]", p.protocol),
            ));
        }
    }
    Ok(())
}

/// The port `name` refers to, or an error at `field` listing the names it could be.
fn port_named<'a>(field: &str, name: &str, ports: &'a [Port]) -> Result<&'a Port, SpecError> {
    ports.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
        let expected = if names.is_empty() {
            "the job declares no ports".to_owned()
        } else {
            format!("expected one of {}", names.join(", "))
        };
        err(field, format!("{name:?} does not name a port ({expected})"))
    })
}

fn tcp_port_named(field: &str, name: &str, ports: &[Port]) -> Result<(), SpecError> {
    let port = port_named(field, name, ports)?;
    if !port.protocol.is_tcp() {
        return Err(err(
            field,
            format!(
                "port {name:?} is {}, this check needs a tcp port",
                port.protocol
            ),
        ));
    }
    Ok(())
}

fn validate_service(service: &Service, ports: &[Port]) -> Result<(), SpecError> {
    if let Some(name) = &service.name {
        name_at("service.name", "service name", name)?;
    }
    port_named("service.port", &service.port, ports)?;
    for (i, tag) in service.tags.iter().enumerate() {
        if tag.is_empty() || tag.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(
                format!("service.tags[{i}]"),
                format!("{tag:?} is not a valid tag (it must be non-empty, without whitespace)"),
            ));
        }
    }
    let Some(check) = &service.check else {
        return Ok(());
    };
    match &check.kind {
        CheckKind::Http {
            path,
            port,
            expected_status,
        } => {
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(err(
                    "service.check.http",
                    format!(
                        "{path:?} is not a request path (it must start with '/', without whitespace)"
                    ),
                ));
            }
            tcp_port_named(
                "service.check.port",
                port.as_deref().unwrap_or(&service.port),
                ports,
            )?;
            if !(100..=599).contains(expected_status) {
                return Err(err(
                    "service.check.expected_status",
                    format!("must be an http status from 100 to 599, found {expected_status}"),
                ));
            }
        }
        CheckKind::Tcp { port } => tcp_port_named("service.check.tcp", port, ports)?,
        CheckKind::Exec { command } => {
            if command.is_empty() {
                return Err(err("service.check.exec", "must name a command to run"));
            }
            validate_argv("service.check.exec", command)?;
        }
    }
    if check.interval.is_zero() {
        return Err(err("service.check.interval", "must be longer than 0s"));
    }
    if check.timeout.is_zero() {
        return Err(err("service.check.timeout", "must be longer than 0s"));
    }
    if check.timeout >= check.interval {
        return Err(err(
            "service.check.timeout",
            format!(
                "must be shorter than interval ({}), found {}",
                fmt_duration(check.interval),
                fmt_duration(check.timeout)
            ),
        ));
    }
    if check.healthy_threshold == 0 {
        return Err(err("service.check.healthy_threshold", "must be at least 1"));
    }
    if check.unhealthy_threshold == 0 {
        return Err(err(
            "service.check.unhealthy_threshold",
            "must be at least 1",
        ));
    }
    Ok(())
}

/// The shortest `disconnect.stop_after`: a node's heartbeats go every second.
const MIN_STOP_AFTER: Duration = Duration::from_secs(1);
/// The longest `disconnect.stop_after`.
const MAX_STOP_AFTER: Duration = Duration::from_secs(24 * 3600);

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn validate_update(spec: &JobSpec) -> Result<(), SpecError> {
    let Some(u) = &spec.update else {
        return Ok(());
    };
    let (surge, unavailable) = (
        u.max_surge.resolve(spec.replicas, true),
        u.max_unavailable.resolve(spec.replicas, false),
    );
    if surge == 0 && unavailable == 0 {
        let mut message =
            "max_surge and max_unavailable must not both be 0 (a rollout could never start)"
                .to_owned();
        if matches!(u.max_surge, ReplicaCount::Percent(_))
            || matches!(u.max_unavailable, ReplicaCount::Percent(_))
        {
            message.push_str(&format!(
                "; {} and {} of {} replicas are 0 and 0",
                u.max_surge, u.max_unavailable, spec.replicas
            ));
        }
        return Err(err("update.max_surge", message));
    }
    if u.progress_deadline <= u.min_healthy {
        return Err(err(
            "update.progress_deadline",
            format!(
                "must be longer than min_healthy ({}), found {}",
                fmt_duration(u.min_healthy),
                fmt_duration(u.progress_deadline)
            ),
        ));
    }
    if u.healthy_deadline <= u.min_healthy || u.healthy_deadline > u.progress_deadline {
        return Err(err(
            "update.healthy_deadline",
            format!(
                "must be longer than min_healthy ({}) and no longer than progress_deadline ({}), found {}",
                fmt_duration(u.min_healthy),
                fmt_duration(u.progress_deadline),
                fmt_duration(u.healthy_deadline)
            ),
        ));
    }
    if u.drain_delay > Duration::from_secs(600) {
        return Err(err(
            "update.drain_delay",
            format!("must be at most 10m, found {}", fmt_duration(u.drain_delay)),
        ));
    }
    if u.canary > spec.replicas {
        return Err(err(
            "update.canary",
            format!(
                "must be at most replicas ({}), found {}",
                spec.replicas, u.canary
            ),
        ));
    }
    if let Some(a) = &u.analysis {
        if u.canary == 0 {
            return Err(err(
                "update.analysis",
                "needs canaries to compare (set update.canary)",
            ));
        }
        let http = spec.ports.iter().any(|p| p.protocol == Protocol::Http);
        if spec.mesh.is_none() || !http {
            return Err(err(
                "update.analysis",
                "needs the mesh's request metrics: a [mesh] section and a port with protocol = \"http\"",
            ));
        }
        if !(a.max_error_rate_increase.is_finite()
            && (0.0..=100.0).contains(&a.max_error_rate_increase))
        {
            return Err(err(
                "update.analysis.max_error_rate_increase",
                format!(
                    "must be 0 to 100 (percentage points), found {}",
                    a.max_error_rate_increase
                ),
            ));
        }
        if a.interval < Duration::from_secs(1) {
            return Err(err(
                "update.analysis.interval",
                format!("must be at least 1s, found {}", fmt_duration(a.interval)),
            ));
        }
        if a.min_requests == 0 {
            return Err(err("update.analysis.min_requests", "must be at least 1"));
        }
    }
    Ok(())
}

/// Services named as `name` (same namespace) or `name.namespace`.
fn validate_service_refs(field: &str, refs: &[String]) -> Result<(), SpecError> {
    for (i, r) in refs.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let (name, namespace) = match r.split_once('.') {
            Some((name, namespace)) => (name, Some(namespace)),
            None => (r.as_str(), None),
        };
        name_at(&at, "service name", name).map_err(|e| {
            err(
                &at,
                format!("{} (write a service as name or name.namespace)", e.message),
            )
        })?;
        if let Some(namespace) = namespace {
            name_at(&at, "namespace", namespace)?;
        }
        if refs[..i].contains(r) {
            return Err(err(at, format!("{r:?} is listed twice")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_label_rules() {
        for ok in ["web", "a", "web-2", "0", &"a".repeat(63)] {
            assert_eq!(validate_name("job name", ok), Ok(()), "{ok}");
        }
        for (bad, reason) in [
            ("", "it is empty"),
            ("Web", "it contains 'W'"),
            ("web_1", "it contains '_'"),
            ("-web", "start and end"),
            ("web-", "start and end"),
            (&"a".repeat(64), "more than 63"),
        ] {
            let e = validate_name("job name", bad).unwrap_err();
            assert!(e.message.contains(reason), "{bad}: {}", e.message);
            assert!(e.field.is_empty());
        }
        assert_eq!(
            validate_name("job name", "Web").unwrap_err().to_string(),
            "\"Web\" is not a valid job name: it contains 'W' (use lowercase letters, digits and '-')"
        );
    }

    #[test]
    fn env_names() {
        for ok in ["FOO", "_x", "a1_B"] {
            assert!(is_env_name(ok), "{ok}");
        }
        for bad in ["", "1FOO", "A=B", "A-B", "A B", "é"] {
            assert!(!is_env_name(bad), "{bad}");
        }
    }

    #[test]
    fn signals() {
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("SIGKILL"), Some(9));
        assert_eq!(signal_number("TERM"), None);
    }
}
