//! Parsing, validation, canonical form and diff of whole specs.

use std::time::Duration;

use super::*;

const WEB_TOML: &str = include_str!("../../tests/data/web.toml");
const MINIMAL_TOML: &str = include_str!("../../tests/data/minimal.toml");
const DNS_JSON: &str = include_str!("../../tests/data/dns.json");

/// Parses a spec as the parser sees it, fields not supported yet included.
fn parse(text: &str) -> JobSpec {
    parse_job_spec_unchecked(text, SpecFormat::Auto).unwrap()
}

fn toml_err(text: &str) -> SpecError {
    parse_job_spec_unchecked(text, SpecFormat::Toml).unwrap_err()
}

/// A valid spec with `extra` appended (TOML).
fn with(extra: &str) -> String {
    format!("name = \"web\"\nimage = \"x\"\n{extra}")
}

const WITH_HTTP_PORT: &str = "[[ports]]\nname = \"http\"\nport = 8080\n";

#[test]
fn design_example_parses_with_every_field() {
    let spec = parse(WEB_TOML);
    assert_eq!(spec.name, "web");
    assert_eq!(spec.namespace(), "default");
    assert_eq!(spec.key(), "default/web");
    assert_eq!(spec.replicas, 3);
    assert_eq!(spec.containers[0].image, "127.0.0.1:5000/demo/web:1.0");
    assert_eq!(spec.containers[0].command, ["/bin/httpd"]);
    assert_eq!(spec.containers[0].args, ["-f", "-p", "8080", "-h", "/www"]);
    assert_eq!(
        spec.containers[0].env.get("GREETING").map(String::as_str),
        Some("hello")
    );
    assert_eq!(spec.containers[0].restart, RestartPolicy::OnFailure);
    assert_eq!(
        spec.containers[0].resources,
        Resources {
            cpu: 0.25,
            memory: ByteSize::mib(64),
            pids: 256
        }
    );
    assert_eq!(
        spec.ports,
        [Port {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Tcp,
            host_port: None,
        }]
    );
    let service = spec.service.as_ref().unwrap();
    assert_eq!(
        service.name.as_deref(),
        Some("web"),
        "defaults to the job name"
    );
    assert_eq!(spec.service_name(), Some("web"));
    assert_eq!(service.port, "http");
    let check = service.check.as_ref().unwrap();
    assert_eq!(
        check.kind,
        CheckKind::Http {
            path: "/".into(),
            port: Some("http".into()),
            expected_status: 200
        }
    );
    assert_eq!(check.interval, Duration::from_secs(2));
    assert_eq!(check.timeout, Duration::from_secs(1));
    assert_eq!((check.healthy_threshold, check.unhealthy_threshold), (1, 3));
    assert_eq!(spec.placement.constraints.len(), 1);
    assert_eq!(spec.placement.constraints[0].to_string(), "zone != b");
    assert!(spec.placement.spread);
    assert_eq!(spec.update, Some(UpdateStrategy::default()));
    assert_eq!(
        spec.mesh,
        Some(Mesh {
            upstreams: vec!["api".into()],
            allow_from: vec!["frontend".into()],
            mode: MeshMode::Strict,
        })
    );
    // Not in the example: defaults.
    assert!(!spec.containers[0].init);
    assert_eq!(spec.containers[0].stop_signal, "SIGTERM");
    assert_eq!(spec.containers[0].stop_grace, Duration::from_secs(10));
}

#[test]
fn minimal_spec_gets_every_default() {
    let spec = parse(MINIMAL_TOML);
    assert_eq!(spec, JobSpec::new("hello", "busybox"));
    assert_eq!(spec.replicas, 1);
    assert_eq!(spec.containers[0].resources.cpu, 0.1);
    assert_eq!(spec.containers[0].resources.memory, ByteSize::mib(64));
    assert_eq!(spec.containers[0].resources.pids, 256);
    assert_eq!(spec.containers[0].restart, RestartPolicy::OnFailure);
    assert_eq!(spec.update, None);
    let update = UpdateStrategy::default();
    assert_eq!(update.max_surge, ReplicaCount::Count(1));
    assert_eq!(update.max_unavailable, ReplicaCount::Count(0));
    assert_eq!(update.healthy_deadline, Duration::from_secs(180));
    assert_eq!(update.drain_delay, Duration::from_secs(5));
    assert_eq!((update.canary, update.auto_promote), (0, false));
    assert_eq!(update.min_healthy, Duration::from_secs(5));
    assert_eq!(update.progress_deadline, Duration::from_secs(300));
    assert!(update.auto_rollback);
    assert!(spec.service.is_none() && spec.mesh.is_none());
    assert_eq!(spec.service_name(), None);
}

#[test]
fn json_is_accepted() {
    let spec = parse(DNS_JSON);
    assert_eq!(spec.key(), "infra/dns");
    assert!(spec.containers[0].init);
    assert_eq!(spec.containers[0].stop_signal, "SIGQUIT");
    assert_eq!(signal_number(&spec.containers[0].stop_signal), Some(3));
    assert_eq!(spec.containers[0].resources.cpu, 1.0);
    assert_eq!(spec.containers[0].resources.memory, ByteSize::mib(128));
    assert_eq!(spec.ports[0].protocol, Protocol::Udp);
    assert_eq!(spec.ports[1].protocol, Protocol::Tcp);
    let check = spec.service.as_ref().unwrap().check.as_ref().unwrap();
    assert_eq!(
        check.kind,
        CheckKind::Tcp {
            port: "dns-tcp".into()
        }
    );
    assert_eq!(check.timeout, Duration::from_secs(2));
    assert_eq!(check.unhealthy_threshold, 2);
    let update = spec.update.clone().expect("update");
    assert_eq!(update.max_unavailable, ReplicaCount::Count(1));
    assert_eq!(update.progress_deadline, Duration::from_secs(600));
    assert_eq!(
        spec,
        parse_job_spec_unchecked(DNS_JSON, SpecFormat::Json).unwrap()
    );
}

#[test]
fn auto_detects_json_by_its_first_character() {
    assert_eq!(SpecFormat::Auto.detect("  \n {\"a\": 1}"), SpecFormat::Json);
    assert_eq!(SpecFormat::Auto.detect("name = \"x\""), SpecFormat::Toml);
    assert_eq!(SpecFormat::Toml.detect("{"), SpecFormat::Toml);
    let json = "\n  {\"name\": \"hello\", \"image\": \"busybox\"}";
    assert_eq!(parse(json), parse(MINIMAL_TOML));
    // Explicit TOML is not second-guessed: an inline table is not a TOML document.
    assert!(parse_job_spec(json, SpecFormat::Toml).is_err());
}

#[test]
fn canonical_json_round_trips() {
    let exec_check = with(&format!(
        "{WITH_HTTP_PORT}[service]\nport = \"http\"\ntags = [\"a\"]\n\
         check = {{ exec = [\"cat\", \"/ready\"], interval = \"1m 30s\", timeout = \"500ms\" }}\n"
    ));
    for text in [WEB_TOML, MINIMAL_TOML, DNS_JSON, exec_check.as_str()] {
        let spec = parse(text);
        let json = spec.to_canonical_json();
        let back = parse_job_spec_unchecked(&json, SpecFormat::Json).unwrap();
        assert_eq!(back, spec, "{json}");
        assert_eq!(back.to_canonical_json(), json, "stable");
    }
}

#[test]
fn canonical_json_is_complete() {
    let json = parse(WEB_TOML).to_canonical_json();
    for part in [
        r#""name":"web""#,
        r#""namespace":"default""#,
        r#""restart":"on-failure""#,
        r#""stop_signal":"SIGTERM""#,
        r#""stop_grace":"10s""#,
        r#""memory":"64Mi""#,
        r#""protocol":"tcp""#,
        r#""check":{"http":"/","port":"http","expected_status":200,"interval":"2s","timeout":"1s","healthy_threshold":1,"unhealthy_threshold":3}"#,
        r#""constraints":["zone != b"]"#,
        r#""progress_deadline":"5m""#,
    ] {
        assert!(json.contains(part), "{part} missing from {json}");
    }
}

#[test]
fn formatting_and_explicit_defaults_compare_equal() {
    let explicit = r#"
        name = "hello"
        namespace = "default"
        replicas = 1
        image = "busybox"
        command = []
        args = []
        env = {}
        restart = "on-failure"
        init = false
        stop_signal = "SIGTERM"
        stop_grace = "10s"
        ports = []
        resources = { cpu = 0.1, memory = 67108864, pids = 256 }
        placement = { constraints = [], spread = false }
    "#;
    assert_eq!(parse(explicit), parse(MINIMAL_TOML));

    let terse = with(&format!(
        "{WITH_HTTP_PORT}[service]\nport = \"http\"\ncheck = {{ http = \"/\" }}\n\
         [placement]\nconstraints = [\"zone!=b\", \"disk in(ssd,nvme)\"]\n"
    ));
    let spelled = with(&format!(
        "{WITH_HTTP_PORT}[service]\nname = \"web\"\nport = \"http\"\n\
         check = {{ http = \"/\", port = \"http\", expected_status = 200, interval = \"10s\", \
         timeout = \"2s\", healthy_threshold = 1, unhealthy_threshold = 3 }}\n\
         [placement]\nconstraints = [\"zone != b\", \"disk in (ssd, nvme)\"]\n"
    ));
    assert_eq!(parse(&terse), parse(&spelled));
    assert_eq!(
        parse(&terse).to_canonical_json(),
        parse(&spelled).to_canonical_json()
    );
}

#[test]
fn negative_replicas_names_the_field_and_line() {
    let e = toml_err("name = \"web\"\nimage = \"x\"\nreplicas = -1\n");
    assert_eq!(e.field, "replicas");
    assert_eq!(e.line, Some(3));
    assert_eq!(
        e.to_string(),
        "replicas: expected a non-negative integer, found -1 (line 3)"
    );
    let e = parse_job_spec(
        "{\"name\": \"web\",\n\"image\": \"x\",\n\"replicas\": -1}",
        SpecFormat::Json,
    )
    .unwrap_err();
    assert_eq!((e.field.as_str(), e.line), ("replicas", Some(3)));
}

#[test]
fn unknown_fields_list_the_expected_ones() {
    let e = toml_err(
        "name = \"web\"\nimage = \"x\"\n\n[resources]\ncpu = 0.5\nmemory = \"64Mi\"\ncpus = 2\n",
    );
    assert_eq!(
        e.to_string(),
        "resources.cpus: unknown field (expected one of cpu, memory, pids) (line 7)"
    );
    let e = toml_err(&with("replica = 2\n"));
    assert_eq!((e.field.as_str(), e.line), ("replica", Some(3)));
    assert!(
        e.message
            .starts_with("unknown field (expected one of name, namespace, replicas")
    );
    let e = parse_job_spec(
        "{\"name\": \"web\", \"image\": \"x\",\n\"mesh\": {\"upstream\": []}}",
        SpecFormat::Json,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "mesh.upstream: unknown field (expected one of upstreams, allow_from, mode) (line 2)"
    );
    let e = toml_err(&with(
        "[service]\nport = \"http\"\ncheck = { http = \"/\", intervall = \"2s\" }\n",
    ));
    assert_eq!(e.field, "service.check.intervall");
}

#[test]
fn missing_required_fields() {
    assert_eq!(
        toml_err("name = \"web\"\n").to_string(),
        "image: missing required field (give `image` for one container, or [[containers]])"
    );
    let e = toml_err(&with("\n[[ports]]\nport = 80\n"));
    assert_eq!(
        e.to_string(),
        "ports[0].name: missing required field (line 4)"
    );
}

#[test]
fn bad_memory_size() {
    let text = "name = \"web\"\nimage = \"x\"\nreplicas = 2\n\n[[ports]]\nname = \"http\"\n\
                port = 80\n[resources]\nmemory = \"64Qi\"\n";
    assert_eq!(
        toml_err(text).to_string(),
        "resources.memory: \"64Qi\" is not a size (use e.g. 64Mi, 1Gi, 512M) (line 9)"
    );
    let e = toml_err(&with("[resources]\nmemory = \"1Mi\"\n"));
    assert_eq!(
        e.to_string(),
        "resources.memory: must be at least 4Mi, found 1Mi (line 4)"
    );
    let e = toml_err(&with("resources = { memory = -5 }\n"));
    assert_eq!(e.field, "resources.memory");
    assert_eq!(
        parse(&with("resources = { memory = \"512M\" }\n")).containers[0]
            .resources
            .memory,
        ByteSize(512_000_000)
    );
}

#[test]
fn disconnect_stop_after_is_bounded_and_named_when_wrong() {
    let e = toml_err(&with("[disconnect]\nstop_after = \"500ms\"\n"));
    assert_eq!(e.field, "disconnect.stop_after");
    assert_eq!(e.message, "must be between 1s and 1day, found 500ms");
    let e = toml_err(&with("[disconnect]\nstop_after = \"soon\"\n"));
    assert_eq!(e.field, "disconnect.stop_after");
    let e = toml_err(&with("[disconnect]\nstop_afte = \"5s\"\n"));
    assert!(e.to_string().contains("stop_afte"), "{e}");
    let spec = parse(&with("[disconnect]\nstop_after = \"20s\"\n"));
    assert_eq!(
        spec.disconnect.map(|d| d.stop_after),
        Some(std::time::Duration::from_secs(20))
    );
}

#[test]
fn bad_constraint_names_its_index_and_reason() {
    let e = toml_err(&with(
        "[placement]\nconstraints = [\n  \"zone = a\",\n  \"disk in (ssd)\",\n  \"zone ~ b\",\n]\n",
    ));
    assert_eq!(e.field, "placement.constraints[2]");
    assert_eq!(e.line, Some(7));
    assert_eq!(
        e.message,
        "\"zone ~ b\" is not a valid constraint: expected an operator (=, !=, in, not in) \
         after \"zone\", found \"~ b\""
    );
}

#[test]
fn service_port_must_name_a_port() {
    let e = toml_err(&with(&format!(
        "{WITH_HTTP_PORT}[service]\nport = \"web\"\n"
    )));
    assert_eq!(
        e.to_string(),
        "service.port: \"web\" does not name a port (expected one of http) (line 7)"
    );
}

#[test]
fn check_needs_exactly_one_kind() {
    let two = format!(
        "{WITH_HTTP_PORT}[service]\nport = \"http\"\ncheck = {{ http = \"/\", tcp = \"http\" }}\n"
    );
    assert_eq!(
        toml_err(&with(&two)).to_string(),
        "service.check: exactly one of http, tcp or exec must be given, found http and tcp (line 8)"
    );
    let none =
        format!("{WITH_HTTP_PORT}[service]\nport = \"http\"\ncheck = {{ interval = \"2s\" }}\n");
    let e = toml_err(&with(&none));
    assert_eq!(e.field, "service.check");
    assert!(e.message.ends_with("found none"), "{e}");
    let status_on_tcp = format!(
        "{WITH_HTTP_PORT}[service]\nport = \"http\"\ncheck = {{ tcp = \"http\", expected_status = 204 }}\n"
    );
    assert_eq!(
        toml_err(&with(&status_on_tcp)).message,
        "expected_status applies only to http checks, not tcp"
    );
}

#[test]
fn check_timeout_must_be_shorter_than_interval() {
    let text = with(&format!(
        "{WITH_HTTP_PORT}[service]\nport = \"http\"\n\
         check = {{ http = \"/\", interval = \"2s\", timeout = \"2s\" }}\n"
    ));
    assert_eq!(
        toml_err(&text).to_string(),
        "service.check.timeout: must be shorter than interval (2s), found 2s (line 8)"
    );
    // The default timeout (2s) against a short interval.
    let text = with(&format!(
        "{WITH_HTTP_PORT}[service]\nport = \"http\"\ncheck = {{ tcp = \"http\", interval = \"1s\" }}\n"
    ));
    assert_eq!(toml_err(&text).field, "service.check.timeout");
}

#[test]
fn check_ports_must_exist_and_be_tcp() {
    let ports = "[[ports]]\nname = \"http\"\nport = 80\n[[ports]]\nname = \"dns\"\nport = 53\nprotocol = \"udp\"\n";
    let e = toml_err(&with(&format!(
        "{ports}[service]\nport = \"http\"\ncheck = {{ tcp = \"dns\" }}\n"
    )));
    assert_eq!(
        e.to_string(),
        "service.check.tcp: port \"dns\" is udp, this check needs a tcp port (line 12)"
    );
    let e = toml_err(&with(&format!(
        "{ports}[service]\nport = \"http\"\ncheck = {{ http = \"/\", port = \"admin\" }}\n"
    )));
    assert_eq!(e.field, "service.check.port");
    assert_eq!(
        e.message,
        "\"admin\" does not name a port (expected one of http, dns)"
    );
    let e = toml_err(&with(&format!(
        "{ports}[service]\nport = \"http\"\ncheck = {{ http = \"healthz\" }}\n"
    )));
    assert_eq!(e.field, "service.check.http");
}

#[test]
fn duplicate_ports() {
    let e = toml_err(&with(
        "[[ports]]\nname = \"http\"\nport = 80\n\n[[ports]]\nname = \"http\"\nport = 81\n",
    ));
    assert_eq!(
        e.to_string(),
        "ports[1].name: \"http\" is already the name of ports[0] (line 8)"
    );
    let e = toml_err(&with(
        "[[ports]]\nname = \"a\"\nport = 80\n[[ports]]\nname = \"b\"\nport = 80\n",
    ));
    assert_eq!(
        e.to_string(),
        "ports[1].port: 80/tcp is already used by ports[0] (line 8)"
    );
    // The same number on another protocol is fine.
    parse(&with(
        "[[ports]]\nname = \"a\"\nport = 53\n[[ports]]\nname = \"b\"\nport = 53\nprotocol = \"udp\"\n",
    ));
    let e = toml_err(&with("[[ports]]\nname = \"a\"\nport = 0\n"));
    assert_eq!(
        e.to_string(),
        "ports[0].port: must be between 1 and 65535, found 0 (line 5)"
    );
}

#[test]
fn names_must_be_lowercase_dns_labels() {
    let e = toml_err("name = \"Web\"\nimage = \"x\"\n");
    assert_eq!(
        e.to_string(),
        "name: \"Web\" is not a valid job name: it contains 'W' \
         (use lowercase letters, digits and '-') (line 1)"
    );
    assert_eq!(
        toml_err("name = \"web\"\nnamespace = \"-x\"\nimage = \"x\"\n").field,
        "namespace"
    );
    let e = toml_err(&with(&format!(
        "{WITH_HTTP_PORT}[service]\nname = \"w_b\"\nport = \"http\"\n"
    )));
    assert_eq!(e.field, "service.name");
    let e = toml_err(&with("[mesh]\nupstreams = [\"api\", \"Auth.prod\"]\n"));
    assert_eq!(e.field, "mesh.upstreams[1]");
    parse(&with(
        "[mesh]\nupstreams = [\"api\", \"auth.prod\"]\nallow_from = [\"frontend\"]\n",
    ));
}

#[test]
fn env_keys_must_be_variable_names() {
    let e = toml_err(&with("env = { GOOD = \"1\", \"1BAD\" = \"2\" }\n"));
    assert_eq!(
        e.to_string(),
        "env.1BAD: \"1BAD\" is not a valid environment variable name \
         (use letters, digits and '_', not starting with a digit) (line 3)"
    );
    assert_eq!(
        toml_err(&with("env = { \"A=B\" = \"2\" }\n")).field,
        "env.A=B"
    );
}

#[test]
fn syntax_errors_give_a_line() {
    let e = toml_err("name = \"web\"\nimage = \"x\"\nreplicas = = 3\n");
    assert_eq!(e.field, "");
    assert_eq!(e.line, Some(3));
    let e = toml_err("name = \"web\"\n\n[service\nport = \"x\"\n");
    assert_eq!(e.line, Some(3));
    let e =
        parse_job_spec("{\n\"name\": \"web\"\n\"image\": \"x\"}", SpecFormat::Json).unwrap_err();
    assert_eq!((e.field.as_str(), e.line), ("", Some(3)));
    assert!(!e.message.contains(" at line "), "{e}");
    let e = parse_job_spec(
        "{\"name\": \"web\", \"image\": \"x\"} trailing",
        SpecFormat::Json,
    )
    .unwrap_err();
    assert_eq!(e.line, Some(1));
}

#[test]
fn other_rules() {
    for (extra, field) in [
        ("replicas = 1001\n", "replicas"),
        ("replicas = 1.5\n", "replicas"),
        ("restart = \"sometimes\"\n", "restart"),
        ("stop_signal = \"TERM\"\n", "stop_signal"),
        ("stop_grace = \"soon\"\n", "stop_grace"),
        ("command = [\"\"]\n", "command[0]"),
        ("args = [\"a\\u0000b\"]\n", "args[0]"),
        ("resources = { cpu = 0 }\n", "resources.cpu"),
        ("resources = { cpu = 513 }\n", "resources.cpu"),
        ("resources = { cpu = nan }\n", "resources.cpu"),
        ("resources = { pids = 0 }\n", "resources.pids"),
        ("update = { max_surge = 0 }\n", "update.max_surge"),
        (
            "update = { min_healthy = \"10m\" }\n",
            "update.progress_deadline",
        ),
        (
            "mesh = { allow_from = [\"a\", \"a\"] }\n",
            "mesh.allow_from[1]",
        ),
    ] {
        let e = toml_err(&with(extra));
        assert_eq!(e.field, field, "{extra}: {e}");
        assert_eq!(e.line, Some(3), "{extra}: {e}");
        assert!(!e.message.ends_with('.'), "{e}");
    }
    assert_eq!(
        toml_err(&with("update = { max_surge = 0 }\n")).message,
        "max_surge and max_unavailable must not both be 0 (a rollout could never start)"
    );
    let e = toml_err("name = \"web\"\nimage = \"demo/web 1.0\"\n");
    assert_eq!(
        e.to_string(),
        "image: \"demo/web 1.0\" must not contain whitespace (line 2)"
    );
    assert_eq!(toml_err("name = \"web\"\nimage = \"\"\n").field, "image");
}

#[test]
fn validate_works_on_specs_built_in_code() {
    let mut spec = JobSpec::new("api", "demo/api:2");
    assert_eq!(spec.validate(), Ok(()));
    spec.ports.push(Port {
        name: "grpc".into(),
        port: 7000,
        protocol: Protocol::Tcp,
        host_port: None,
    });
    spec.service = Some(Service {
        name: None,
        port: "grpc".into(),
        tags: vec![],
        check: Some(Check::new(CheckKind::Http {
            path: "/healthz".into(),
            port: None,
            expected_status: 200,
        })),
    });
    assert_eq!(spec.validate(), Ok(()));
    // Normalizing fills in what parsing fills in, so the spec equals its parsed canonical form.
    spec.normalize();
    assert_eq!(
        parse_job_spec(&spec.to_canonical_json(), SpecFormat::Json).unwrap(),
        spec
    );
    spec.replicas = 5000;
    let e = spec.validate().unwrap_err();
    assert_eq!(e.to_string(), "replicas: must be at most 1000, found 5000");
    spec.replicas = 1;
    spec.placement.constraints.push(Constraint {
        key: "zone".into(),
        op: ConstraintOp::Eq,
        values: vec![],
    });
    assert_eq!(
        spec.validate().unwrap_err().field,
        "placement.constraints[0]"
    );
}

#[test]
fn oversized_specs_are_rejected_before_parsing() {
    let huge = format!(
        "name = \"web\"\nimage = \"x\"\n#{}\n",
        "x".repeat(MAX_SPEC_BYTES)
    );
    let e = toml_err(&huge);
    assert!(e.message.contains("more than the limit"), "{e}");
}

#[test]
fn diff_lists_leaf_changes_in_path_order() {
    let old = parse(WEB_TOML);
    let mut new = old.clone();
    new.replicas = 5;
    new.containers[0].env.insert("FOO".into(), "x".into());
    new.containers[0].env.remove("GREETING");
    new.containers[0].args.push("-v".into());
    new.ports[0].port = 8081;
    new.ports.push(Port {
        name: "metrics".into(),
        port: 9100,
        protocol: Protocol::Tcp,
        host_port: None,
    });
    new.containers[0].resources.memory = ByteSize::mib(128);
    new.mesh = None;
    let lines: Vec<String> = diff_specs(&old, &new)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            r#"containers[0].args: ["-f","-p","8080","-h","/www"] -> ["-f","-p","8080","-h","/www","-v"]"#,
            r#"containers[0].env.FOO: (none) -> "x""#,
            r#"containers[0].env.GREETING: "hello" -> (none)"#,
            r#"containers[0].resources.memory: "64Mi" -> "128Mi""#,
            r#"mesh.allow_from: ["frontend"] -> (none)"#,
            r#"mesh.upstreams: ["api"] -> (none)"#,
            r#"ports[0].port: 8080 -> 8081"#,
            r#"ports[1].name: (none) -> "metrics""#,
            r#"ports[1].port: (none) -> 9100"#,
            r#"ports[1].protocol: (none) -> "tcp""#,
            "replicas: 3 -> 5",
        ]
    );
    assert!(diff_specs(&old, &old).is_empty());
    // Spelling differences are not changes.
    assert!(diff_specs(&old, &parse(&old.to_canonical_json())).is_empty());
}

#[test]
fn diff_of_a_check_change() {
    let old = parse(WEB_TOML);
    let mut new = old.clone();
    if let Some(check) = new.service.as_mut().and_then(|s| s.check.as_mut()) {
        check.kind = CheckKind::Tcp {
            port: "http".into(),
        };
    }
    let lines: Vec<String> = diff_specs(&old, &new)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            r#"service.check.expected_status: 200 -> (none)"#,
            r#"service.check.http: "/" -> (none)"#,
            r#"service.check.port: "http" -> (none)"#,
            r#"service.check.tcp: (none) -> "http""#,
        ]
    );
}

#[test]
fn field_change_serializes() {
    let change = FieldChange {
        path: "replicas".into(),
        old: Some("3".into()),
        new: Some("5".into()),
    };
    assert_eq!(change.to_string(), "replicas: 3 -> 5");
    let json = serde_json::to_string(&change).unwrap();
    assert_eq!(json, r#"{"path":"replicas","old":"3","new":"5"}"#);
    assert_eq!(serde_json::from_str::<FieldChange>(&json).unwrap(), change);
}

#[test]
fn every_field_is_implemented_now() {
    // The canary analysis needs the mesh and an HTTP port; with them it is accepted.
    let text = with(
        "\n[[ports]]\nname = \"http\"\nport = 80\nprotocol = \"http\"\n[mesh]\n\
         [update]\ncanary = 1\n[update.analysis]\nmin_requests = 10\n",
    );
    let spec = parse_job_spec(&text, SpecFormat::Toml).expect("analysis");
    let a = spec.update_strategy().analysis.expect("analysis");
    assert_eq!((a.min_requests, a.interval), (10, Duration::from_secs(30)));
    assert!(parse_job_spec(&with("init = true\n"), SpecFormat::Toml).is_ok());
    let spec = parse_job_spec(
        &with("\n[mesh]\nupstreams = [\"api\"]\nmode = \"permissive\"\n"),
        SpecFormat::Toml,
    )
    .expect("mesh");
    assert_eq!(spec.mesh.map(|m| m.mode), Some(MeshMode::Permissive));
    let e =
        parse_job_spec(&with("\n[mesh]\nmode = \"open\"\n"), SpecFormat::Toml).expect_err("mode");
    assert!(e.to_string().contains("open"), "{e}");
    let spec =
        parse_job_spec(&with("\n[update]\nmax_surge = 2\n"), SpecFormat::Toml).expect("update");
    assert_eq!(spec.update_strategy().max_surge, ReplicaCount::Count(2));
    assert!(NOT_SUPPORTED_YET.is_empty());
}

#[test]
fn update_counts_are_integers_or_percentages() {
    let spec = parse(&with(
        "replicas = 10\n[update]\nmax_surge = \"25%\"\nmax_unavailable = \"10%\"\ncanary = 2\n\
         drain_delay = \"1s\"\nhealthy_deadline = \"30s\"\n",
    ));
    let u = spec.update_strategy();
    assert_eq!(u.max_surge, ReplicaCount::Percent(25));
    assert_eq!(u.max_surge.resolve(10, true), 3, "surge rounds up");
    assert_eq!(u.max_unavailable.resolve(10, false), 1);
    assert_eq!(
        ReplicaCount::Percent(10).resolve(5, false),
        0,
        "unavailable rounds down"
    );
    assert_eq!(u.canary, 2);
    // Written back as it was given.
    let json = spec.to_canonical_json();
    assert!(json.contains("\"max_surge\":\"25%\""), "{json}");
    assert_eq!(parse_job_spec(&json, SpecFormat::Json).expect("json"), spec);
    for (extra, field, says) in [
        ("max_surge = \"150%\"\n", "update.max_surge", "percentage"),
        ("max_surge = \"x%\"\n", "update.max_surge", "percentage"),
        ("max_surge = -1\n", "update.max_surge", "non-negative"),
        ("max_surge = 1.5\n", "update.max_surge", "non-negative"),
        (
            "max_surge = \"0%\"\nmax_unavailable = \"10%\"\n",
            "update.max_surge",
            "are 0 and 0",
        ),
        ("canary = 9\n", "update.canary", "at most replicas"),
        (
            "healthy_deadline = \"1s\"\n",
            "update.healthy_deadline",
            "longer than min_healthy",
        ),
        (
            "healthy_deadline = \"6m\"\n",
            "update.healthy_deadline",
            "progress_deadline",
        ),
        (
            "drain_delay = \"1h\"\n",
            "update.drain_delay",
            "at most 10m",
        ),
        ("[update.analysis]\n", "update.analysis", "canaries"),
        (
            "canary = 1\n[update.analysis]\n",
            "update.analysis",
            "protocol = \"http\"",
        ),
    ] {
        let e = toml_err(&with(&format!("replicas = 3\n[update]\n{extra}")));
        assert_eq!(e.field, field, "{extra}: {e}");
        assert!(e.message.contains(says), "{extra}: {e}");
    }
}

#[test]
fn devices_are_paths_under_dev_with_rwm_permissions() {
    let spec = parse(&with(
        "[[devices]]\npath = \"/dev/fuse\"\n[[devices]]\npath = \"/dev/net/tun\"\npermissions = \"rwm\"\n",
    ));
    assert_eq!(spec.containers[0].devices.len(), 2);
    assert_eq!(spec.containers[0].devices[0].permissions, "rw");
    for (extra, field) in [
        ("[[devices]]\npath = \"/etc/passwd\"\n", "devices[0].path"),
        ("[[devices]]\npath = \"/dev/../etc\"\n", "devices[0].path"),
        ("[[devices]]\npath = \"/dev/\"\n", "devices[0].path"),
        (
            "[[devices]]\npath = \"/dev/fuse\"\n[[devices]]\npath = \"/dev/fuse\"\n",
            "devices[1].path",
        ),
        (
            "[[devices]]\npath = \"/dev/fuse\"\npermissions = \"rx\"\n",
            "devices[0].permissions",
        ),
        (
            "[[devices]]\npath = \"/dev/fuse\"\npermissions = \"rr\"\n",
            "devices[0].permissions",
        ),
    ] {
        let e = toml_err(&with(extra));
        assert_eq!(e.field, field, "{e}");
    }
}

const GROUP_TOML: &str = r#"name = "app"
replicas = 2

[[containers]]
name = "migrate"
lifecycle = "init"
image = "reg/app:1"
command = ["/bin/sh", "-c", "echo ready > /data/state"]
volumes = [{ name = "data", path = "/data" }]

[[containers]]
name = "web"
image = "reg/app:1"
volumes = [{ name = "data", path = "/data", read_only = true }]
[containers.resources]
memory = "32Mi"

[[containers]]
name = "shipper"
lifecycle = "sidecar"
image = "reg/ship:1"
init = true

[[volumes]]
name = "data"

[[volumes]]
name = "scratch"
type = "tmpfs"
size = "8Mi"

[network]
mode = "bridge"

[[ports]]
name = "http"
port = 8080
host_port = 18080
"#;

#[test]
fn a_group_parses_with_lifecycles_volumes_and_host_ports() {
    let spec = parse(GROUP_TOML);
    let names: Vec<(&str, Lifecycle)> = spec
        .containers
        .iter()
        .map(|c| (c.name.as_str(), c.lifecycle))
        .collect();
    assert_eq!(
        names,
        [
            ("migrate", Lifecycle::Init),
            ("web", Lifecycle::Main),
            ("shipper", Lifecycle::Sidecar)
        ]
    );
    assert_eq!(spec.main().map(|c| c.name.as_str()), Some("web"));
    assert!(spec.containers[2].init);
    assert!(spec.containers[1].volumes[0].read_only);
    assert_eq!(spec.volumes[0].kind, VolumeKind::Ephemeral, "the default");
    assert_eq!(spec.volumes[1].size, Some(ByteSize::mib(8)));
    assert_eq!(spec.network.mode, NetworkMode::Bridge);
    assert_eq!(spec.ports[0].host_port, Some(18080));
    assert_eq!(spec.node_ports(), [(18080, Protocol::Tcp)]);
    // The allocation asks for the sum: 64 + 32 + 64 MiB, 0.3 cores.
    let total = spec.total_resources();
    assert_eq!(total.memory, ByteSize::mib(160));
    assert!((total.cpu - 0.3).abs() < 1e-9);
    assert_eq!(total.pids, 768);
    // The canonical form parses back equal.
    let back = parse_job_spec_unchecked(&spec.to_canonical_json(), SpecFormat::Json).unwrap();
    assert_eq!(back, spec);
}

#[test]
fn the_shorthand_is_one_main_container_named_after_the_job() {
    let short = parse("name = \"web\"\nimage = \"reg/web:1\"\ncommand = [\"httpd\"]\n");
    let long = parse(
        "name = \"web\"\n[[containers]]\nname = \"web\"\nimage = \"reg/web:1\"\ncommand = [\"httpd\"]\n",
    );
    assert_eq!(short, long);
    assert_eq!(short.containers.len(), 1);
    assert_eq!(short.containers[0].lifecycle, Lifecycle::Main);
    // Errors in the shorthand name the top-level field, with its line.
    let e = toml_err("name = \"web\"\nimage = \"\"\n");
    assert_eq!((e.field.as_str(), e.line), ("image", Some(2)), "{e}");
    let e = toml_err("name = \"web\"\nimage = \"x\"\n[resources]\nmemory = \"1Mi\"\n");
    assert_eq!(e.field, "resources.memory", "{e}");
    // A node that applied an old spec (devices at the top level) still reads it.
    let old = parse("{\"name\":\"web\",\"image\":\"x\",\"devices\":[{\"path\":\"/dev/fuse\"}]}");
    assert_eq!(old.containers[0].devices[0].path, "/dev/fuse");
}

#[test]
fn bad_groups_are_refused_naming_the_field() {
    let c = |extra: &str| {
        format!("name = \"app\"\n[[containers]]\nname = \"web\"\nimage = \"x\"\n{extra}")
    };
    for (text, field, says) in [
        ("name = \"app\"\n".to_owned(), "", "missing required field"),
        (
            "name = \"app\"\nimage = \"y\"\n[[containers]]\nname = \"a\"\nimage = \"x\"\n"
                .to_owned(),
            "",
            "",
        ),
        (
            "name = \"app\"\ncommand = [\"x\"]\n[[containers]]\nname = \"a\"\nimage = \"x\"\n"
                .to_owned(),
            "command",
            "set it on each container",
        ),
        (
            c("[[containers]]\nname = \"web\"\nimage = \"y\"\n"),
            "containers[1].name",
            "already the name",
        ),
        (
            c("lifecycle = \"sidecar\"\n"),
            "containers",
            "at least one main container",
        ),
        (
            c("lifecycle = \"init\"\nrestart = \"always\"\n"),
            "containers[0].restart",
            "never or on-failure",
        ),
        (
            c("volumes = [{ name = \"nope\", path = \"/d\" }]\n"),
            "containers[0].volumes[0].name",
            "does not name a volume",
        ),
        (
            c("volumes = [{ name = \"v\", path = \"d\" }]\n[[volumes]]\nname = \"v\"\n"),
            "containers[0].volumes[0].path",
            "plain absolute",
        ),
        (
            c("volumes = [{ name = \"v\", path = \"/a/../b\" }]\n[[volumes]]\nname = \"v\"\n"),
            "containers[0].volumes[0].path",
            "plain absolute",
        ),
        (
            c("volumes = [{ name = \"v\", path = \"/proc/x\" }]\n[[volumes]]\nname = \"v\"\n"),
            "containers[0].volumes[0].path",
            "reserved",
        ),
        (
            c("[[volumes]]\nname = \"v\"\ntype = \"host\"\n"),
            "volumes[0].path",
            "needs the directory",
        ),
        (
            c("[[volumes]]\nname = \"v\"\ntype = \"host\"\npath = \"/srv/../etc\"\n"),
            "volumes[0].path",
            "plain absolute",
        ),
        (
            c("[[volumes]]\nname = \"v\"\ntype = \"named\"\npath = \"/srv\"\n"),
            "volumes[0].path",
            "only a host volume",
        ),
        (
            c("[[volumes]]\nname = \"v\"\ntype = \"tmpfs\"\nsize = \"1Ki\"\n"),
            "volumes[0].size",
            "from 1Mi",
        ),
        (
            c("[[volumes]]\nname = \"v\"\n[[volumes]]\nname = \"v\"\n"),
            "volumes[1].name",
            "already the name",
        ),
        (
            c("[network]\nmode = \"none\"\n[[ports]]\nname = \"p\"\nport = 80\nhost_port = 8080\n"),
            "ports[0].host_port",
            "cannot be reached",
        ),
        (
            c("[network]\nmode = \"host\"\n[[ports]]\nname = \"p\"\nport = 80\nhost_port = 8080\n"),
            "ports[0].host_port",
            "the node's already",
        ),
        (
            c(
                "[[ports]]\nname = \"p\"\nport = 80\nhost_port = 8080\n[[ports]]\nname = \"q\"\nport = 81\nhost_port = 8080\n",
            ),
            "ports[1].host_port",
            "already published",
        ),
        (
            c(
                "[network]\nmode = \"none\"\n[[ports]]\nname = \"p\"\nport = 80\n[service]\nport = \"p\"\n",
            ),
            "service",
            "no address to publish",
        ),
    ] {
        let e = toml_err(&text);
        if field.is_empty() {
            // No container at all, or both forms at once.
            assert_eq!(e.field, "image", "{e}");
            assert!(
                e.message.contains("one-container shorthand") || e.message.contains(says),
                "{e}"
            );
            continue;
        }
        assert_eq!(e.field, field, "{text}\n{e}");
        assert!(e.message.contains(says), "{e}");
        assert!(e.line.is_some(), "a line for {field}: {e}");
    }
}

#[test]
fn host_network_mode_takes_every_port_on_the_node() {
    let spec = parse(&with(
        "[network]\nmode = \"host\"\n[[ports]]\nname = \"http\"\nport = 8080\n[[ports]]\nname = \"dns\"\nport = 53\nprotocol = \"udp\"\n",
    ));
    assert_eq!(
        spec.node_ports(),
        [(53, Protocol::Udp), (8080, Protocol::Tcp)]
    );
    let bridge = parse(&with("[[ports]]\nname = \"http\"\nport = 8080\n"));
    assert!(
        bridge.node_ports().is_empty(),
        "no host_port: nothing on the node"
    );
}
