//! The configuration's parsing and validation, key by key.

use super::*;

#[test]
fn embedded_default_is_a_docker_hub_mirror() {
    let c = Config::parse("").unwrap();
    assert_eq!(c.server.listen, "0.0.0.0:5000".parse().unwrap());
    assert_eq!(c.cache.dir, PathBuf::from("./regmirror-data"));
    assert_eq!(c.registry.len(), 1);
    assert!(c.registry[0].default);
    assert_eq!(
        c.registry[0].upstream[0].url,
        "https://registry-1.docker.io"
    );
}

#[test]
fn contract_keys_parse() {
    let c = Config::parse(
        r#"
        [server]
        listen = "127.0.0.1:5000"
        [cache]
        dir = "/var/lib/regmirror"
        [[registry]]
        name = "docker.io"
        default = true
        [[registry.upstream]]
        url = "https://registry-1.docker.io"
        username = "u"
        password = "p"
        "#,
    )
    .unwrap();
    assert_eq!(c.cache.dir, PathBuf::from("/var/lib/regmirror"));
    assert_eq!(
        c.registry[0].upstream[0]
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "p"
    );
}

#[test]
fn unknown_keys_are_named() {
    let e = Config::parse("[server]\nlisten_addr = \"1.2.3.4:5\"\n").unwrap_err();
    assert!(e.to_string().contains("listen_addr"), "{e}");
}

#[test]
fn bad_values_are_named() {
    let e = Config::parse("[cache]\ntag_ttl = \"soon\"\n").unwrap_err();
    assert!(e.to_string().contains("tag_ttl"), "{e}");
    let text = "[[registry]]\nname = \"x.io\"\n[[registry.upstream]]\nurl = \"ftp://x\"\n";
    let e = Config::parse(text).unwrap_err();
    assert!(e.to_string().contains("registry[0].upstream[0].url"), "{e}");
    let text = "[[registry]]\nname = \"x.io\"\nupstream = []\n";
    assert!(Config::parse(text)
        .unwrap_err()
        .to_string()
        .contains("registry[0].upstream"));
    let text = "[[registry]]\nname = \"x.io\"\n[[registry.upstream]]\nurl = \"https://x\"\nusername = \"u\"\n";
    assert!(Config::parse(text)
        .unwrap_err()
        .to_string()
        .contains("username"));
}

#[test]
fn sizes_and_watermarks() {
    assert_eq!(parse_byte_size("200GiB"), Ok(200 << 30));
    assert_eq!(parse_byte_size("1.5 GB"), Ok(1_500_000_000));
    assert_eq!(parse_byte_size("4096"), Ok(4096));
    assert!(parse_byte_size("12 parsecs").is_err());
    let c = Config::parse("[cache]\nmax_size = \"10MiB\"\n").unwrap();
    assert_eq!(c.cache.max_size, Some(10 << 20));
    assert!(c.to_redacted_toml().contains("10MiB"));
    let e = Config::parse("[cache]\nmax_size = \"lots\"\n").unwrap_err();
    assert!(e.to_string().contains("max_size"), "{e}");
    let e = Config::parse("[cache]\nhigh_watermark = 0.5\nlow_watermark = 0.6\n").unwrap_err();
    assert!(e.to_string().contains("watermark"), "{e}");
    let e = Config::parse("[cache]\npin = [\"quay.io/x:1\"]\n").unwrap_err();
    assert!(e.to_string().contains("cache.pin[0]"), "{e}");
    let e = Config::parse("[cache]\nprefetch_downloads = 100000\n").unwrap_err();
    assert!(e.to_string().contains("cache.prefetch_downloads"), "{e}");
    let c = Config::parse("[cache]\nprefetch_downloads = 0\n").unwrap();
    assert_eq!(c.cache.prefetch_downloads, 0);
}

#[test]
fn secrets_are_redacted() {
    let text = "[[registry]]\nname = \"x.io\"\n[[registry.upstream]]\nurl = \"https://x\"\nusername = \"u\"\npassword = \"hunter2\"\n";
    let c = Config::parse(text).unwrap();
    let shown = c.to_redacted_toml();
    assert!(!shown.contains("hunter2"));
    assert!(shown.contains("<redacted>"));
    assert!(!format!("{c:?}").contains("hunter2"));
}

/// The commented block of `config.example.toml` below the line `header`, uncommented (lines
/// that are comments there too left out).
fn example_block(header: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches('#').trim_start())
        .filter(|l| !l.starts_with('#'))
        .collect();
    block.join("\n")
}

/// The commented `[shared_store]` block of `config.example.toml`, uncommented: every key it
/// documents parses and validates.
#[test]
fn example_shared_store_parses() {
    let block = example_block("# [shared_store]");
    assert!(
        block.lines().count() > 10,
        "no [shared_store] block in the example"
    );
    let c: SharedStoreConfig = toml::from_str(&block).unwrap();
    c.validate().unwrap();
    assert_eq!(c.url, "s3://regmirror-cache/prod");
    assert_eq!(c.max_uploads, 4);
    assert!(c.allow_http && c.ca_file.is_some() && c.secret_access_key_file.is_some());
}

/// The commented `[cluster]` block of `config.example.toml`, uncommented: every key it
/// documents parses and validates.
#[test]
fn example_cluster_parses() {
    let c: ClusterConfig = toml::from_str(&example_block("# [cluster]")).unwrap();
    c.validate().unwrap();
    assert_eq!(
        (c.self_url.as_deref(), c.peers.len()),
        (Some("http://10.0.0.11:5000"), 3)
    );
    assert!(c.secret_file.is_some());
    assert_eq!(c.timeout, std::time::Duration::from_secs(10));
}

/// `peers_dns` instead of `peers`: a host name and port, an optional scheme, never both keys.
#[test]
fn peers_by_dns_are_a_name_and_a_port_instead_of_a_list() {
    let parse = |keys: &str| {
        let text = format!("{keys}\nsecret = \"a-cluster-secret-of-some-length\"");
        let c: ClusterConfig = toml::from_str(&text).unwrap();
        c.validate().map(|()| c)
    };
    let c = parse("peers_dns = \"regmirror-peers.cache.svc.cluster.local:5000\"").unwrap();
    assert_eq!(
        c.dns_name(),
        Some(("http", "regmirror-peers.cache.svc.cluster.local", 5000))
    );
    let c = parse("peers_dns = \"https://peers:8443\"").unwrap();
    assert_eq!(c.dns_name(), Some(("https", "peers", 8443)));
    let c = parse("peers_dns = \"peers:5000\"\nself = \"http://[fd00::1]:5000/\"").unwrap();
    assert_eq!(c.dns_self_ip(), Some("fd00::1".parse().unwrap()));
    for bad in [
        "peers_dns = \"peers\"",
        "peers_dns = \"ftp://peers:21\"",
        "peers_dns = \"peers:port\"",
        "peers_dns = \"user@peers:5000\"",
        "peers_dns = \"peers:5000\"\npeers = [\"http://10.0.0.1:5000\"]",
        "peers_dns = \"peers:0\"",
        "peers_dns = \"peers:+5000\"",
        // With peers_dns, self is one of the addresses the name gives: an IP, same scheme and port.
        "peers_dns = \"peers:5000\"\nself = \"http://regmirror-0.peers:5000\"",
        "peers_dns = \"peers:5000\"\nself = \"http://10.0.0.1:5001\"",
        "peers_dns = \"peers:5000\"\nself = \"https://10.0.0.1:5000\"",
        "peers_dns = \"peers:5000\"\nself = \"10.0.0.1:5000\"",
        "peers_dns = \"peers:5000\"\nrecheck_after = \"2days\"",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let c = Config::parse(&text).unwrap();
    assert!(c.registry.iter().any(|r| r.default));
}

/// A reload loads the file again and validates what it loaded: a password read from a file (or
/// a variable) is not a second source.
#[test]
fn secrets_from_files_validate_again_once_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("upstream.password");
    std::fs::write(&password, "hunter2\n").unwrap();
    let path = dir.path().join("regmirror.toml");
    let text = format!(
        "[[registry]]\nname = \"docker.io\"\ndefault = true\n[[registry.upstream]]\n\
         url = \"https://registry-1.docker.io\"\nusername = \"me\"\npassword_file = {password:?}\n"
    );
    std::fs::write(&path, text).unwrap();
    let c = Config::load(&path).unwrap();
    let upstream = &c.registry[0].upstream[0];
    assert_eq!(
        upstream.password.as_ref().map(Secret::expose),
        Some("hunter2")
    );
    c.validate().unwrap();
    // Written in the configuration and in a file: refused.
    let both = format!(
        "{}password = \"other\"\n",
        std::fs::read_to_string(&path).unwrap()
    );
    assert!(Config::parse(&both).is_err());
}
