//! The configuration: layering, provenance and checks, through `Config::load`.

use super::{load::OVERRIDE_ORIGIN, *};

fn with_env(vars: &[(&str, &str)]) -> Sources {
    Sources {
        env: vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Sources::default()
    }
}

fn with_files(files: Vec<PathBuf>) -> Sources {
    Sources {
        files,
        ..Sources::default()
    }
}

#[test]
fn embedded_default_is_loopback_plaintext() {
    let config = Config::embedded();
    assert_eq!(config.server.listen, "127.0.0.1:50051".parse().unwrap());
    assert!(!config.tls.enabled && !config.auth.enabled);
    assert!(!config.is_insecure_exposed());
    assert_eq!(config.greeter.max_name_bytes, 1024);
}

#[test]
fn env_overrides_embedded_and_names_the_variable_on_error() {
    let config = Config::load(&with_env(&[("GREETER__GREETER__MAX_NAME_BYTES", "16")])).unwrap();
    assert_eq!(config.greeter.max_name_bytes, 16);

    let err = Config::load(&with_env(&[("GREETER__GREETER__MAX_NAME_BYTES", "lots")])).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("greeter.max_name_bytes"), "{err}");
    assert!(
        err.origin.contains("GREETER__GREETER__MAX_NAME_BYTES"),
        "{err}"
    );
}

#[test]
fn env_list_is_comma_separated() {
    let config = Config::load(&with_env(&[(
        "GREETER__GREETER__STREAM_GREETINGS",
        "Hi,Yo",
    )]))
    .unwrap();
    assert_eq!(config.greeter.stream_greetings, ["Hi", "Yo"]);
}

#[test]
fn insecure_guard_names_key_and_opt_out() {
    let sources = Sources {
        overrides: vec![("server.listen".into(), "0.0.0.0:50051".into())],
        ..Sources::default()
    };
    let err = Config::load(&sources).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("server.listen"));
    assert_eq!(err.origin, OVERRIDE_ORIGIN);
    assert!(
        err.message.contains("server.allow_insecure = true"),
        "{err}"
    );

    let mut opted_out = sources.clone();
    opted_out
        .overrides
        .push(("server.allow_insecure".into(), "true".into()));
    assert!(Config::load(&opted_out).unwrap().is_insecure_exposed());
}

fn with_overrides(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::load(&Sources {
        overrides: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Sources::default()
    })
}

#[test]
fn zero_durations_that_cannot_work_are_refused() {
    for key in [
        "tls.handshake_timeout",
        "tls.reload_interval",
        "auth.reload_interval",
        "connection.first_call_timeout",
        "health.watch_max_age",
    ] {
        let error = with_overrides(&[(key, "0s")]).unwrap_err();
        assert_eq!(error.key.as_deref(), Some(key), "{error}");
        assert!(error.message.contains("above zero"), "{error}");
    }
    for key in [
        "limits.max_anonymous_calls",
        "limits.max_anonymous_calls_per_connection",
        "limits.max_buffered_request_bytes",
        "health.max_watch_streams",
    ] {
        let error = with_overrides(&[(key, "0")]).unwrap_err();
        assert_eq!(error.key.as_deref(), Some(key), "{error}");
    }
    with_overrides(&[("limits.max_connections_per_peer", "0")]).expect("0: no cap");
}

#[test]
fn a_log_filter_the_subscriber_cannot_parse_is_refused() {
    let error = with_overrides(&[("log.filter", "info,greeter=loud")]).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("log.filter"), "{error}");
    assert!(error.message.contains("not a valid log filter"), "{error}");
    with_overrides(&[("log.filter", "info,greeter::access=off")]).expect("a valid filter");
}

#[test]
fn a_later_file_removes_a_map_entry_with_an_empty_string() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("later.toml");
    std::fs::write(
        &file,
        "[auth.policy]\n\"/grpc.reflection.v1.ServerReflection/*\" = \"\"\n\
         \"/helloworld.Greeter/SayHello\" = \"open\"\n\
         [deadline.methods]\n\"/helloworld.Greeter/SayHelloBidiStream\" = \"\"\n",
    )
    .unwrap();
    let config = Config::load(&with_files(vec![file])).unwrap();
    let policy = &config.auth.policy;
    assert!(!policy.contains_key("/grpc.reflection.v1.ServerReflection/*"));
    assert_eq!(policy["/helloworld.Greeter/SayHello"], "open");
    assert_eq!(policy["/helloworld.Greeter/*"], "greeter", "others stay");
    let methods = &config.deadline.methods;
    assert!(!methods.contains_key("/helloworld.Greeter/SayHelloBidiStream"));
    assert!(
        methods.contains_key("/grpc.health.v1.Health/*"),
        "others stay"
    );
}

#[test]
fn deadline_patterns_are_checked_like_policy_patterns() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.toml");
    std::fs::write(
        &file,
        "[deadline.methods.\"helloworld.Greeter/SayHello\"]\ndefault = \"1s\"\nmax = \"2s\"\n",
    )
    .unwrap();
    let error = Config::load(&with_files(vec![file])).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("deadline.methods"), "{error}");
    assert!(error.message.contains("a pattern is"), "{error}");
}

#[test]
fn tls_and_auth_settings_must_agree() {
    let key_of = |pairs: &[(&str, &str)]| with_overrides(pairs).unwrap_err().key.unwrap();
    assert_eq!(key_of(&[("tls.client_ca", "ca.pem")]), "tls.client_ca");
    assert_eq!(
        key_of(&[("tls.client_auth", "required")]),
        "tls.client_auth"
    );
    assert_eq!(
        key_of(&[("auth.enabled", "true"), ("auth.mode", "client_cert")]),
        "auth.mode"
    );
    assert_eq!(
        key_of(&[("auth.enabled", "true"), ("auth.tokens_file", "")]),
        "auth.tokens_file"
    );
    assert_eq!(
        key_of(&[("auth.enabled", "true"), ("auth.policy.bad", "x")]),
        "auth.policy"
    );
    assert!(with_overrides(&[("auth.enabled", "true")]).is_ok());
}

#[test]
fn exposed_addresses_need_both_tls_and_auth() {
    let exposed = [("server.listen", "0.0.0.0:1"), ("tls.enabled", "true")];
    assert_eq!(
        with_overrides(&exposed).unwrap_err().key.as_deref(),
        Some("server.listen")
    );
    let secured = [exposed[0], exposed[1], ("auth.enabled", "true")];
    assert!(!with_overrides(&secured).unwrap().is_insecure_exposed());
}

#[test]
fn probe_listen_is_optional() {
    assert_eq!(Config::embedded().probe.listen, None);
    let config = with_overrides(&[("probe.listen", "127.0.0.1:8081")]).unwrap();
    assert_eq!(config.probe.listen, Some("127.0.0.1:8081".parse().unwrap()));
    assert_eq!(
        with_overrides(&[("probe.listen", "nope")])
            .unwrap_err()
            .key
            .as_deref(),
        Some("probe.listen")
    );
}

#[test]
fn metrics_listen_defaults_to_a_free_loopback_port_and_can_be_disabled() {
    assert_eq!(
        Config::embedded().metrics.listen,
        Some("127.0.0.1:0".parse().unwrap())
    );
    assert_eq!(
        with_overrides(&[("metrics.listen", "")])
            .unwrap()
            .metrics
            .listen,
        None
    );
    assert_eq!(
        with_overrides(&[("metrics.listen", "9090")])
            .unwrap_err()
            .key
            .as_deref(),
        Some("metrics.listen")
    );
}

#[test]
fn env_var_names_follow_the_documented_scheme() {
    assert_eq!(env_var_name("server.listen"), "GREETER__SERVER__LISTEN");
}

#[test]
fn show_round_trips_through_toml() {
    let config = Config::embedded();
    let again: Config = toml::from_str(&config.to_toml()).unwrap();
    assert_eq!(config, again);
}

#[test]
fn unix_mode_is_octal_text_in_files_and_the_environment() {
    let config = Config::load(&with_env(&[("GREETER__SERVER__UNIX_MODE", "0660")])).unwrap();
    assert_eq!(config.server.unix_mode, 0o660);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mode.toml");
    std::fs::write(&file, "[server]\nunix_mode = \"0640\"\n").unwrap();
    let sources = with_files(vec![file.clone()]);
    assert_eq!(Config::load(&sources).unwrap().server.unix_mode, 0o640);

    // 0o660 in TOML is the number 432: refused rather than guessed at.
    std::fs::write(&file, "[server]\nunix_mode = 0o660\n").unwrap();
    let err = Config::load(&sources).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("server.unix_mode"));
    assert!(err.origin.ends_with("mode.toml"), "{err}");
    assert!(err.message.contains("a quoted octal file mode"), "{err}");

    let err = Config::load(&with_env(&[("GREETER__SERVER__UNIX_MODE", "1777")])).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("server.unix_mode"), "{err}");
}

#[test]
fn allowed_origins_are_origins() {
    let origins = |value: &str| {
        Config::load(&with_env(&[("GREETER__WEB__ALLOWED_ORIGINS", value)]))
            .map(|config| config.web.allowed_origins)
    };
    assert_eq!(
        origins("https://app.example,http://127.0.0.1:8080").unwrap(),
        ["https://app.example", "http://127.0.0.1:8080"]
    );
    assert_eq!(origins("*").unwrap(), ["*"]);
    for bad in [
        "https://app.example/",
        "https://app.example/path",
        "app.example",
        "ftp://app.example",
        "*,https://app.example",
        "https://App.example",
        "https://app.example:443",
        "http://app.example:80",
    ] {
        let err = origins(bad).unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("web.allowed_origins"),
            "{bad}: {err}"
        );
    }
}

/// `config/production.toml` over the embedded default, as the production Deployment loads it.
fn production() -> Config {
    Config::load(&with_files(vec![
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/production.toml"),
    ]))
    .unwrap()
}

#[test]
fn web_is_on_for_the_quick_start_and_off_in_production() {
    assert!(Config::embedded().web.enabled);
    let production = production();
    assert!(!production.web.enabled);
}

#[test]
fn tracing_is_off_by_default_and_checked_when_on() {
    assert!(!Config::embedded().tracing.enabled);
    // Off, nothing of it is used, so nothing of it is refused.
    with_overrides(&[("tracing.sample_ratio", "2")]).expect("tracing is off");
    let on = |key: &'static str, value: &'static str| {
        with_overrides(&[("tracing.enabled", "true"), (key, value)])
    };
    on("tracing.protocol", "http/protobuf").expect("a valid protocol");
    for (key, value) in [
        ("tracing.sample_ratio", "2"),
        ("tracing.sample_ratio", "-0.1"),
        ("tracing.endpoint", "otel-collector:4317"),
        ("tracing.endpoint", "ftp://collector"),
        ("tracing.max_queue_size", "0"),
        ("tracing.max_export_batch_size", "0"),
        ("tracing.scheduled_delay", "0s"),
        ("tracing.export_timeout", "0s"),
        ("tracing.ca_file", "/ca.pem"),
        ("tracing.cert_file", "/cert.pem"),
    ] {
        let error = on(key, value).unwrap_err();
        assert_eq!(error.key.as_deref(), Some(key), "{key} = {value}: {error}");
    }
}

#[test]
fn keepalive_needs_a_timeout_only_when_it_pings() {
    let error = with_overrides(&[("connection.keepalive_timeout", "0s")]).unwrap_err();
    assert_eq!(
        error.key.as_deref(),
        Some("connection.keepalive_timeout"),
        "{error}"
    );
    with_overrides(&[
        ("connection.keepalive_interval", "0s"),
        ("connection.keepalive_timeout", "0s"),
    ])
    .expect("no pings, no timeout needed");
}

#[test]
fn certificate_auth_needs_tls_that_asks_for_client_certificates() {
    let tls_without_client_certs = [
        ("tls.enabled", "true"),
        ("tls.cert", "server.pem"),
        ("tls.key", "server.key"),
        ("auth.enabled", "true"),
        ("auth.mode", "client_cert"),
    ];
    let error = with_overrides(&tls_without_client_certs).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("auth.mode"), "{error}");
    assert!(error.message.contains("tls.client_auth"), "{error}");
}

#[test]
fn a_map_entry_of_the_wrong_type_says_what_is_expected() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, "[auth.policy]\n\"/helloworld.Greeter/*\" = 5\n").unwrap();
    let error = Config::load(&with_files(vec![file])).unwrap_err();
    assert!(
        error
            .message
            .contains("a value, or \"\" to remove the entry"),
        "{error}"
    );
}

#[test]
fn quota_is_off_for_the_quick_start_and_on_in_production() {
    assert!(!Config::embedded().quota.enabled);
    let production = production();
    assert!(production.quota.enabled);
    assert_eq!(
        (production.quota.rate, production.quota.burst),
        (100.0, 200)
    );
}

#[test]
fn quota_entries_take_integer_rates_and_bad_ones_name_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("quota.toml");
    std::fs::write(
        &file,
        "[quota]\nenabled = true\nrate = 5\n[quota.identities.\"ci-bot\"]\nclass = \"token\"\nrate = 1000\nburst = 2000\n\
         [quota.methods.\"/helloworld.Greeter/SayHelloBidiStream\"]\nrate = 0.5\nburst = 2\n",
    )
    .unwrap();
    let config = Config::load(&with_files(vec![file.clone()])).unwrap();
    assert_eq!(config.quota.rate, 5.0);
    assert_eq!(config.quota.identities["ci-bot"].burst, 2000);
    assert_eq!(
        config.quota.methods["/helloworld.Greeter/SayHelloBidiStream"].rate,
        0.5
    );

    let bad = dir.path().join("bad.toml");
    for (text, key, message) in [
        (
            "[quota]\nrate = 0\nburst = 10\n",
            "quota.rate",
            "quota.rate = 0:",
        ),
        ("[quota]\nburst = 0\n", "quota.burst", "quota.burst = 0:"),
        (
            "[quota.identities.\"ci-bot\"]\nclass = \"token\"\nrate = 10\nburst = 0\n",
            "quota.identities",
            "quota.identities.\"ci-bot\".burst = 0:",
        ),
        (
            "[quota.identities.sa]\nclass = \"jwt\"\nrate = 10\nburst = 1\n",
            "quota.identities",
            "quota.identities.\"sa\": a JWT identity names its issuer",
        ),
        (
            "[quota.identities.sa]\nclass = \"jwt\"\nissuer = \"https://nobody\"\nrate = 10\nburst = 1\n",
            "quota.identities",
            "quota.identities.\"sa\": issuer \"https://nobody\" is not one of auth.jwt.issuers",
        ),
        (
            "[quota.methods.\"helloworld.Greeter/*\"]\nrate = 10\nburst = 1\n",
            "quota.methods",
            "a pattern is",
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        let error = Config::load(&with_files(vec![file.clone(), bad.clone()])).unwrap_err();
        assert_eq!(error.key.as_deref(), Some(key), "{error}");
        assert!(error.message.contains(message), "{error}");
        assert!(error.origin.contains("bad.toml"), "{error}");
    }
}

#[test]
fn client_crl_files_need_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crl.toml");
    std::fs::write(&file, "[tls]\nclient_crl_files = [\"ca.crl\"]\n").unwrap();
    let error = Config::load(&with_files(vec![file])).unwrap_err();
    assert_eq!(
        error.key.as_deref(),
        Some("tls.client_crl_files"),
        "{error}"
    );
    assert!(error.message.contains("set tls.client_auth"), "{error}");
    assert!(error.origin.contains("crl.toml"), "{error}");
}

#[test]
fn connect_is_on_for_the_quick_start_and_off_in_production() {
    assert!(Config::embedded().connect.enabled);
    assert!(Config::embedded().serves_http1());
    let production = production();
    assert!(!production.connect.enabled);
    assert!(!production.serves_http1());
}

#[test]
fn a_bad_value_in_a_file_names_the_file_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("names.toml");
    std::fs::write(&file, "[greeter]\nmax_name_bytes = \"lots\"\n").unwrap();
    let error = Config::load(&with_files(vec![file.clone()])).unwrap_err();
    assert_eq!(
        error.key.as_deref(),
        Some("greeter.max_name_bytes"),
        "{error}"
    );
    assert_eq!(error.origin, file.display().to_string(), "{error}");
}

/// A mistake found only in the merged config is blamed on the layer that set the key: not on a
/// later file, a variable or an override that set other keys.
#[test]
fn a_mistake_found_after_merging_names_the_layer_that_set_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.toml");
    let second = dir.path().join("second.toml");
    std::fs::write(&first, "[server]\nlisten = \"0.0.0.0:50051\"\n").unwrap();
    std::fs::write(&second, "[greeter]\nmax_name_bytes = 16\n").unwrap();
    let mut sources = Sources {
        files: vec![first.clone(), second],
        env: vec![("GREETER__GREETER__MAX_NAME_BYTES".into(), "20".into())],
        overrides: vec![("greeter.max_name_bytes".into(), "24".into())],
    };
    let error = Config::load(&sources).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("server.listen"), "{error}");
    assert_eq!(error.origin, first.display().to_string(), "{error}");

    sources
        .env
        .push(("GREETER__SERVER__LISTEN".into(), "0.0.0.0:50052".into()));
    let error = Config::load(&sources).unwrap_err();
    assert_eq!(
        error.origin, "environment variable GREETER__SERVER__LISTEN",
        "{error}"
    );
}

#[test]
fn sources_from_the_process_read_its_environment() {
    let sources = Sources::from_process(
        vec!["a.toml".into()],
        vec![("server.listen".into(), "127.0.0.1:1".into())],
    );
    assert_eq!(sources.files, [PathBuf::from("a.toml")]);
    assert_eq!(sources.overrides.len(), 1);
    assert_eq!(sources.env.len(), std::env::vars().count());
}

#[test]
fn an_enum_value_no_variant_has_lists_those_accepted_naming_key_and_layer() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mtls.toml");
    std::fs::write(&file, "[tls]\nclient_auth = \"require\"\n").unwrap();
    let error = Config::load(&with_files(vec![file])).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("tls.client_auth"), "{error}");
    assert!(error.origin.contains("mtls.toml"), "{error}");
    assert_eq!(
        error.message,
        r#""require" is not accepted: give one of "none", "optional", "required""#
    );
    let error = Config::load(&Sources {
        env: vec![("GREETER__LOG__FORMAT".into(), "xml".into())],
        ..Sources::default()
    })
    .unwrap_err();
    assert!(error.origin.contains("GREETER__LOG__FORMAT"), "{error}");
    assert!(
        error
            .message
            .contains(r#"give one of "auto", "text", "json""#),
        "{error}"
    );
}

#[test]
fn a_method_pattern_that_names_nothing_served_is_refused_with_the_closest() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        (
            "[auth.policy]\n\"/helloworld.Greeter/SayHelo\" = \"greeter\"\n",
            "auth.policy",
        ),
        (
            "[deadline.methods.\"/helloworld.Greeter/SayHelo\"]\ndefault = \"1s\"\nmax = \"2s\"\n",
            "deadline.methods",
        ),
        (
            "[quota.methods.\"/helloworld.Greeter/SayHelo\"]\nrate = 1.0\nburst = 1\n",
            "quota.methods",
        ),
    ] {
        let file = dir.path().join("typo.toml");
        std::fs::write(&file, text).unwrap();
        let error = Config::load(&with_files(vec![file])).unwrap_err();
        assert_eq!(error.key.as_deref(), Some(key), "{error}");
        assert!(error.origin.contains("typo.toml"), "{error}");
        assert!(
            error.message.ends_with(
                "names no served method; did you mean \"/helloworld.Greeter/SayHello\"?"
            ),
            "{error}"
        );
    }
}

#[test]
fn config_show_names_the_layer_of_each_value_not_from_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("layer.toml");
    std::fs::write(
        &file,
        "[log]\nformat = \"json\"\n[auth.policy]\n\"*\" = \"open\"\n",
    )
    .unwrap();
    let sources = Sources {
        env: vec![("GREETER__LOG__FILTER".into(), "warn".into())],
        overrides: vec![("server.listen".into(), "127.0.0.1:7000".into())],
        ..with_files(vec![file.clone()])
    };
    let shown = Config::load(&sources)
        .unwrap()
        .to_toml_with_origins(&sources);
    let line = |prefix: &str| {
        shown
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix}: {shown}"))
            .to_owned()
    };
    assert_eq!(
        line("format = "),
        format!("format = \"json\"  # {}", file.display())
    );
    assert_eq!(
        line("filter = "),
        "filter = \"warn\"  # environment variable GREETER__LOG__FILTER"
    );
    assert_eq!(
        line("listen = \"127.0.0.1:7000\""),
        "listen = \"127.0.0.1:7000\"  # the command line"
    );
    assert_eq!(
        line("\"*\" = "),
        format!("\"*\" = \"open\"  # {}", file.display())
    );
    // The embedded default's values carry no comment.
    assert_eq!(line("max_name_bytes = "), "max_name_bytes = 1024");
}

/// Two clusters' issuers and a rule for `shop` without `issuer`: the rule would admit the `shop`
/// of both, so the file is refused, naming the key and the file.
#[test]
fn a_jwt_rule_without_issuer_is_refused_when_several_issuers_are_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwt.toml");
    let issuer = |iss: &str| {
        format!(
            "[[auth.jwt.issuers]]\nissuer = \"{iss}\"\njwks_file = \"j.json\"\naudiences = [\"greeter\"]\n"
        )
    };
    let rule = "[[auth.jwt.rules]]\nclaim = \"sub\"\npattern = \"system:serviceaccount:shop:*\"\n\
                scopes = [\"greeter\"]\n";
    let text = format!(
        "[auth]\nenabled = true\ntokens_file = \"t.toml\"\n{}{}{rule}",
        issuer("https://a.example"),
        issuer("https://b.example"),
    );
    std::fs::write(&file, &text).unwrap();
    let error = Config::load(&with_files(vec![file.clone()])).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("auth.jwt.rules"), "{error}");
    assert!(error.message.contains("names no issuer"), "{error}");
    assert_eq!(error.origin, file.display().to_string(), "{error}");

    std::fs::write(&file, format!("{text}issuer = \"https://b.example\"\n")).unwrap();
    assert!(Config::load(&with_files(vec![file])).is_ok());
}
