//! The operator commands (`verify`, `gc`, `ls`, `warm`) run as the binary, as operators run them.

mod common;

use common::*;
use http::StatusCode;
use std::path::Path;
use std::process::Command;

fn regmirror(args: &[&str], config: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A config file for the commands: the test mirror's cache directory and upstream.
fn config_file(dir: &Path, cache: &Path, upstream: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("regmirror.toml");
    std::fs::write(
        &path,
        format!(
            "[cache]\ndir = {:?}\n{extra}\n[[registry]]\nname = \"docker.io\"\ndefault = true\n[[registry.upstream]]\nurl = \"{upstream}\"\n",
            cache.display().to_string()
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_removes_a_corrupt_blob_and_the_next_pull_refetches_it() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(300_000, 80);
    let digest = origin.add_blob(blob.clone());
    let good = origin.add_blob(random_bytes(1000, 81));
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    assert_eq!(get(&url).await.status, StatusCode::OK);
    assert_eq!(
        get(&mirror.url(&format!("/v2/library/app/blobs/{good}")))
            .await
            .status,
        StatusCode::OK
    );
    let cache = mirror.cache_dir();
    let mut config = mirror.app.config().clone();
    let dir = mirror.stop().await;

    let path = blob_path(&cache, &digest);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1234] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let file = config_file(dir.path(), &cache, &origin.url(), "");
    let (ok, out) = regmirror(&["verify"], &file);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("corrupt {digest}")), "{out}");
    assert!(out.contains("checked 2 objects"), "{out}");
    assert!(!path.exists());
    assert!(blob_path(&cache, &good).exists());

    config.cache.dir = cache.clone();
    let mirror = TestMirror::start_with(config, dir).await;
    let got = get(&mirror.url(&format!("/v2/library/app/blobs/{digest}"))).await;
    assert!(got.bytes()[..] == blob[..]);
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_evicts_unpinned_blobs_and_ls_lists_what_is_left() {
    let origin = FakeRegistry::start().await;
    let config_blob = origin.add_blob(b"{}".to_vec());
    let layer = origin.add_blob(random_bytes(5000, 82));
    let loose = origin.add_blob(random_bytes(7000, 83));
    let manifest = schema2_manifest(&config_blob, 2, &[(layer.clone(), 5000)]);
    let manifest_digest =
        origin.add_manifest("library/app", Some("1.0"), DOCKER_MANIFEST, manifest);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    assert_eq!(
        get_manifest(&mirror.url("/v2/library/app/manifests/1.0"))
            .await
            .status,
        StatusCode::OK
    );
    for d in [&config_blob, &layer, &loose] {
        assert_eq!(
            get(&mirror.url(&format!("/v2/library/app/blobs/{d}")))
                .await
                .status,
            StatusCode::OK
        );
    }
    let cache = mirror.cache_dir();
    let dir = mirror.stop().await;
    let file = config_file(
        dir.path(),
        &cache,
        &origin.url(),
        "pin = [\"docker.io/library/app:1.0\"]",
    );
    let (ok, out) = regmirror(&["gc", "--target", "0"], &file);
    assert!(ok, "{out}");
    assert!(out.contains("evicted 1 blobs (7000 bytes)"), "{out}");
    assert!(!blob_path(&cache, &loose).exists());
    assert!(blob_path(&cache, &layer).exists() && blob_path(&cache, &config_blob).exists());

    let (ok, out) = regmirror(&["ls"], &file);
    assert!(ok, "{out}");
    assert!(
        out.contains("library/app") && out.contains(&manifest_digest.to_string()),
        "{out}"
    );
    assert!(
        out.contains(&layer.to_string()) && !out.contains(&loose.to_string()),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_without_a_server_pulls_through_an_in_process_one() {
    let origin = FakeRegistry::start().await;
    let config_blob = origin.add_blob(b"{}".to_vec());
    let layer = origin.add_blob(random_bytes(5000, 84));
    let manifest = schema2_manifest(&config_blob, 2, &[(layer.clone(), 5000)]);
    origin.add_manifest("library/app", Some("1.0"), DOCKER_MANIFEST, manifest);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let file = config_file(dir.path(), &cache, &origin.url(), "");
    let (ok, out) = regmirror(&["warm", "app:1.0"], &file);
    assert!(ok, "{out}");
    assert!(
        out.contains("warmed app:1.0: 1 manifests, 2 blobs"),
        "{out}"
    );
    assert!(blob_path(&cache, &layer).exists() && blob_path(&cache, &config_blob).exists());
    let (ok, out) = regmirror(&["warm", "app:nope"], &file);
    assert!(!ok && out.contains("404"), "{out}");
}

/// Runs the binary under `script`, whose pseudo-terminal is its stderr: what a person at a
/// terminal sees.
fn regmirror_on_a_terminal(args: &[&str], config: &Path) -> (bool, String) {
    let mut line = format!("{:?}", env!("CARGO_BIN_EXE_regmirror"));
    for arg in args
        .iter()
        .copied()
        .chain(["--config", config.to_str().unwrap()])
    {
        line.push_str(&format!(" '{arg}'"));
    }
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("script (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    (out.status.success(), without_colours(&text))
}

/// `text` without its SGR escapes (colours), keeping those that move the cursor.
fn without_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("\x1b[") {
        plain.push_str(&rest[..start]);
        let escape = &rest[start..];
        let end = escape[2..]
            .find(|c: char| c.is_ascii_alphabetic())
            .map_or(escape.len(), |i| i + 3);
        if !escape[..end].ends_with('m') {
            plain.push_str(&escape[..end]);
        }
        rest = &escape[end..];
    }
    plain.push_str(rest);
    plain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_commands_draw_a_progress_bar_on_a_terminal_and_print_lines_when_piped() {
    let origin = FakeRegistry::start().await;
    let config_blob = origin.add_blob(b"{}".to_vec());
    let layer = origin.add_blob(random_bytes(3 << 20, 85));
    let manifest = schema2_manifest(&config_blob, 2, &[(layer.clone(), 3 << 20)]);
    origin.add_manifest("library/app", Some("1.0"), DOCKER_MANIFEST, manifest);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let file = config_file(dir.path(), &cache, &origin.url(), "");
    let (ok, out) = regmirror_on_a_terminal(&["warm", "app:1.0"], &file);
    assert!(ok, "{out}");
    // The bar's last state: the prefix, a full bar, bytes of the total, objects, rate.
    assert!(
        out.contains("warmed app:1.0: 1 manifests, 2 blobs"),
        "{out}"
    );
    assert!(
        out.contains("warm [=============================="),
        "no bar:\n{out}"
    );
    assert!(out.contains("3.00 MiB/3.00 MiB · 2/2 objects"), "{out}");
    assert!(
        out.contains('\r') || out.contains("\x1b["),
        "not drawn as a bar: {out:?}"
    );
    // Piped: plain lines, no bar.
    let (ok, out) = regmirror(&["warm", "app:1.0"], &file);
    assert!(ok, "{out}");
    assert!(
        out.contains("warm: 2/2 objects, 3.0 MiB of 3.0 MiB, "),
        "{out}"
    );
    assert!(
        !out.contains("[=") && !out.contains('\r'),
        "a bar in a pipe: {out:?}"
    );
    let (ok, out) = regmirror(&["verify"], &file);
    assert!(ok && out.contains("verify: 3/3 objects"), "{out}");
    let (ok, out) = regmirror_on_a_terminal(&["verify"], &file);
    assert!(
        ok && out.contains("verify [") && out.contains("3/3 objects"),
        "{out}"
    );
    let (ok, out) = regmirror_on_a_terminal(&["gc", "--target", "0"], &file);
    assert!(
        ok && out.contains("gc [") && out.contains("2/2 objects"),
        "{out}"
    );
    assert!(out.contains("evicted 2 blobs"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_verify_and_ls_act_through_a_running_server_whose_figures_stay_true() {
    let origin = FakeRegistry::start().await;
    let blobs: Vec<_> = (0..3)
        .map(|i| {
            let bytes = random_bytes(100_000, 85 + i);
            (origin.add_blob(bytes.clone()), bytes)
        })
        .collect();
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    for (digest, _) in &blobs {
        get(&mirror.url(&format!("/v2/library/app/blobs/{digest}")))
            .await
            .assert_content(digest);
    }
    mirror.settle().await;
    let lifecycle = mirror.app.cache().lifecycle();
    assert_eq!(lifecycle.usage().blob_bytes, 300_000);
    let cache = mirror.cache_dir();
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(dir.path(), &cache, &origin.url(), "");

    // verify: a corrupt blob goes, and the server forgets it at once.
    let (corrupt, _) = &blobs[0];
    let path = blob_path(&cache, corrupt);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[50_000] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let (ok, out) = regmirror(&["verify"], &file);
    assert!(ok && out.contains("acting through it"), "{out}");
    assert!(
        out.contains(&format!("corrupt {corrupt}: removed")),
        "{out}"
    );
    assert!(lifecycle.indexed_blob_size(corrupt).is_none());
    assert_eq!(lifecycle.usage().blob_bytes, 200_000);

    // ls: what the server holds.
    let (ok, out) = regmirror(&["ls"], &file);
    assert!(ok, "{out}");
    assert!(out.contains(&blobs[1].0.to_string()) && !out.contains(&corrupt.to_string()));

    // gc: evicted by the server itself; its usage figure says so at once.
    let (ok, out) = regmirror(&["gc", "--target", "0"], &file);
    assert!(ok, "{out}");
    assert!(out.contains("evicted 2 blobs (200000 bytes)"), "{out}");
    assert_eq!(lifecycle.usage().blob_bytes, 0);
    assert_eq!(mirror.metric("regmirror_cache_size_bytes", &[]).await, 0.0);
    // And everything is served again, byte-exact, from upstream.
    for (digest, bytes) in &blobs {
        let got = get(&mirror.url(&format!("/v2/library/app/blobs/{digest}"))).await;
        assert!(got.bytes()[..] == bytes[..]);
    }

    // A server without its socket is not worked around: the command refuses.
    std::fs::remove_file(cache.join("admin.sock")).unwrap();
    let (ok, out) = regmirror(&["gc", "--target", "0"], &file);
    assert!(!ok && out.contains("has no admin socket"), "{out}");
    mirror.settle().await;
    assert_eq!(
        lifecycle.usage().blob_bytes,
        300_000,
        "acted behind the server's back"
    );
}
