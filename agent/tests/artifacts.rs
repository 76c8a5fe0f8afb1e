//! The artifact store against a real loopback HTTP(S) server, real archives and real OCI
//! layouts: what lands on disk is read back (contents, modes, owners), what is refused is
//! refused with its reason and leaves nothing visible, and interrupted fetches (a dropped
//! future, a `kill -9`) leave a store the next instance cleans and completes.

#[path = "artifacts/build.rs"]
mod build;
#[path = "artifacts/image.rs"]
mod image;
#[path = "artifacts/server.rs"]
mod server;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use corral_agent::artifact::{
    ArtifactError, ArtifactStore, EntryKind, Ownership, Phase, Progress, StoreConfig,
};
use corral_agent::spec::artifact::{
    ArtifactSpec, Digest, FetchPolicy, ImageSpec, RawArtifact, RawImage,
};
use tokio::sync::{Semaphore, watch};

use build::{E, gzip, sha256, tar, zip, zstd};
use server::{Route, Server};

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir.join("artifacts"));
    c.fetch.retry_delay = Duration::from_millis(10);
    c.fetch.connect_timeout = Duration::from_secs(5);
    c.fetch.idle_timeout = Duration::from_secs(5);
    c
}

fn open(dir: &Path) -> ArtifactStore {
    ArtifactStore::open(config(dir)).expect("open store")
}

fn artifact(url: &str, sha: Option<&str>) -> ArtifactSpec {
    RawArtifact {
        url: Some(url.into()),
        sha256: sha.map(Into::into),
        format: None,
        mount: Some("/app".into()),
    }
    .validate(FetchPolicy::default())
    .expect("valid artifact spec")
}

fn image_spec(url: &str, digest: &str) -> ImageSpec {
    RawImage {
        url: Some(url.into()),
        digest: Some(digest.into()),
        persist: None,
    }
    .validate(FetchPolicy::default())
    .expect("valid image spec")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Nothing unpacked or stored is visible, and no unpack leftovers (partial downloads may
/// stay: they are resumed).
fn assert_nothing_visible(state: &Path) {
    let a = state.join("artifacts");
    assert_eq!(names(&a.join("trees")), Vec::<String>::new(), "trees/");
    assert_eq!(names(&a.join("images")), Vec::<String>::new(), "images/");
    assert_eq!(names(&a.join("sha256")), Vec::<String>::new(), "sha256/");
    let leftovers: Vec<String> = names(&a.join("tmp"))
        .into_iter()
        .filter(|n| !n.ends_with(".part"))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new(), "tmp/");
}

/// A file of `size` pseudo-random bytes (incompressible).
fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// `files` files of `size` bytes each in `dirs` directories (round robin).
fn many_files(files: usize, dirs: usize, size: usize) -> Vec<u8> {
    let data = noise(size, 5);
    let names: Vec<String> = (0..files).map(|i| format!("d{}/f{i}", i % dirs)).collect();
    let entries: Vec<E<'_>> = names
        .iter()
        .map(|n| E::File(n.as_bytes(), &data, 0o644))
        .collect();
    tar(&entries)
}

/// A server with `/slow.tar` (one 4 MiB file) sent 64 KiB every 20 ms; the tar and its digest.
async fn slow_server(seed: u64) -> (Server, Arc<Vec<u8>>, String) {
    let server = Server::start().await;
    let body = Arc::new(tar(&[E::File(b"big", &noise(4 << 20, seed), 0o644)]));
    let sha = sha256(&body);
    server.route(
        "/slow.tar",
        Route::Slow {
            body: body.clone(),
            chunk: 64 << 10,
            delay: Duration::from_millis(20),
        },
    );
    (server, body, sha)
}

/// Where a request asked to start (`Range: bytes=N-`).
fn range_start(seen: &server::Seen) -> Option<u64> {
    seen.range
        .as_deref()?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

fn progress() -> (watch::Sender<Progress>, watch::Receiver<Progress>) {
    watch::channel(Progress {
        phase: Phase::Fetching,
        done: 0,
        total: None,
    })
}

/// Runs an artifact fetch until `until` holds for its progress, then drops it.
async fn drop_fetch_when(
    store: &ArtifactStore,
    spec: &ArtifactSpec,
    until: impl Fn(&Progress) -> bool,
) {
    let (tx, mut rx) = progress();
    let fetch = store.ensure_artifact(spec, Ownership::Root, Some(tx));
    tokio::pin!(fetch);
    loop {
        tokio::select! {
            r = &mut fetch => panic!("finished too early: {r:?}"),
            changed = rx.changed() => {
                changed.expect("progress");
                if until(&rx.borrow()) { return; }
            }
        }
    }
}

/// The artifact at `url` (with `sha`), root-owned.
async fn fetch(
    store: &ArtifactStore,
    url: &str,
    sha: Option<&str>,
) -> Result<corral_agent::artifact::ArtifactTree, ArtifactError> {
    store
        .ensure_artifact(&artifact(url, sha), Ownership::Root, None)
        .await
}

fn web_tar() -> Vec<u8> {
    tar(&[
        E::Dir(b"./", 0o755),
        E::Dir(b"bin/", 0o755),
        E::File(b"bin/web", b"#!/bin/sh\necho web\n", 0o755),
        E::File(b"bin/suid", b"#!/bin/sh\n", 0o4755),
        E::File(b"static/index.html", b"<h1>v1</h1>\n", 0o666),
        E::Symlink(b"current", b"static/index.html"),
        E::HardLink(b"bin/web2", b"bin/web"),
        E::CharDev(b"dev-null"),
        E::Fifo(b"fifo"),
    ])
}

#[tokio::test]
async fn fetches_verifies_and_unpacks_over_http_then_serves_from_cache() {
    let server = Server::start().await;
    let archive = gzip(&web_tar());
    let sha = sha256(&archive);
    server.route("/web-1.tar.gz", Route::Bytes(Arc::new(archive.clone())));
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let spec = artifact(&server.url("/web-1.tar.gz"), Some(&sha));
    let (tx, rx) = progress();
    let tree = store
        .ensure_artifact(&spec, Ownership::Root, Some(tx))
        .await
        .expect("fetched");
    assert_eq!(tree.digest.hex(), sha);
    let p = &tree.path.clone();
    assert_eq!(
        std::fs::read(p.join("bin/web")).expect("read"),
        b"#!/bin/sh\necho web\n"
    );
    assert_eq!(
        std::fs::read_link(p.join("current")).expect("link"),
        Path::new("static/index.html")
    );
    // Hard link shares the inode; device node and fifo skipped.
    let web = std::fs::metadata(p.join("bin/web")).expect("stat");
    assert_eq!(
        std::fs::metadata(p.join("bin/web2")).expect("stat").ino(),
        web.ino()
    );
    assert!(!p.join("dev-null").exists() && std::fs::symlink_metadata(p.join("fifo")).is_err());
    // Read-only and without setuid: write bits and 0o6000 dropped.
    assert_eq!(web.mode() & 0o7777, 0o555);
    assert_eq!(
        std::fs::metadata(p.join("bin/suid")).expect("stat").mode() & 0o7777,
        0o555
    );
    assert_eq!(
        std::fs::metadata(p.join("static/index.html"))
            .expect("stat")
            .mode()
            & 0o7777,
        0o444
    );
    assert_eq!(std::fs::metadata(p).expect("stat").mode() & 0o7777, 0o555);
    if is_root() {
        assert_eq!(
            (web.uid(), web.gid()),
            (0, 0),
            "root-owned, not the archive's 1000"
        );
    }
    // The blob is kept, read-only, under its digest.
    let blob = state.path().join("artifacts/sha256").join(&sha);
    assert_eq!(std::fs::read(&blob).expect("blob"), archive);
    assert_eq!(
        std::fs::metadata(&blob).expect("stat").mode() & 0o777,
        0o444
    );
    // Progress reached the whole.
    let last = *rx.borrow();
    assert!(
        (last.phase == Phase::Fetching && last.done == archive.len() as u64)
            || last.phase == Phase::Unpacking,
        "{last:?}"
    );
    // Listed with its size and its lease.
    let list = store.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].kind, EntryKind::Artifact);
    assert_eq!(list[0].leases, 1);
    assert!(list[0].size >= archive.len() as u64, "{:?}", list[0]);
    drop(tree);
    assert_eq!(store.list()[0].leases, 0);
    // Again: no request reaches the server.
    let again = store
        .ensure_artifact(&spec, Ownership::Root, None)
        .await
        .expect("cached");
    assert_eq!(server.requests("/web-1.tar.gz"), 1);
    assert_eq!(again.path, p.to_path_buf());
}

#[tokio::test]
async fn ownership_maps_to_the_service_user() {
    if !is_root() {
        eprintln!("skipping: chown needs root");
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let file = state.path().join("web.tar");
    std::fs::write(&file, web_tar()).expect("write");
    let store = open(state.path());
    let tree = store
        .ensure_artifact(
            &artifact(file.to_str().expect("utf8"), None),
            Ownership::User {
                uid: 4321,
                gid: 8765,
            },
            None,
        )
        .await
        .expect("unpacked");
    for rel in ["", "bin", "bin/web", "static/index.html", "current"] {
        let m = std::fs::symlink_metadata(tree.path.join(rel)).expect("stat");
        assert_eq!((m.uid(), m.gid()), (4321, 8765), "{rel}");
    }
    assert!(
        tree.path
            .ends_with(format!("{}@4321.8765", tree.digest.hex()))
    );
    // The root-owned tree of the same archive is a separate tree.
    let root = fetch(&store, file.to_str().expect("utf8"), None)
        .await
        .expect("unpacked");
    assert_ne!(root.path, tree.path);
    assert_eq!(
        std::fs::metadata(root.path.join("bin/web"))
            .expect("stat")
            .uid(),
        0
    );
}

#[tokio::test]
async fn a_wrong_digest_is_refused_with_both_digests_and_nothing_is_stored() {
    let server = Server::start().await;
    let archive = gzip(&web_tar());
    server.route("/web.tar.gz", Route::Bytes(Arc::new(archive.clone())));
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let wrong = sha256(b"something else");
    let err = fetch(&store, &server.url("/web.tar.gz"), Some(&wrong))
        .await
        .expect_err("mismatch");
    let text = err.to_string();
    assert!(
        matches!(err, ArtifactError::DigestMismatch { .. }),
        "{text}"
    );
    assert!(text.contains(&server.url("/web.tar.gz")), "{text}");
    assert!(
        text.contains(&wrong) && text.contains(&sha256(&archive)),
        "{text}"
    );
    assert_nothing_visible(state.path());
    assert_eq!(
        names(&state.path().join("artifacts/tmp")),
        Vec::<String>::new()
    );
    // Same for a local file.
    let file = state.path().join("web.tar.gz");
    std::fs::write(&file, &archive).expect("write");
    let err = fetch(&store, file.to_str().expect("utf8"), Some(&wrong))
        .await
        .expect_err("mismatch");
    assert!(matches!(err, ArtifactError::DigestMismatch { .. }), "{err}");
    assert_nothing_visible(state.path());
}

#[tokio::test]
async fn http_errors_404_is_final_500_is_retried() {
    let server = Server::start().await;
    server.route("/boom.tar", Route::Status(500));
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let sha = sha256(b"x");
    let err = fetch(&store, &server.url("/missing.tar"), Some(&sha))
        .await
        .expect_err("404");
    assert!(err.to_string().contains("HTTP 404 Not Found"), "{err}");
    assert_eq!(server.requests("/missing.tar"), 1, "a 404 is not retried");
    let err = fetch(&store, &server.url("/boom.tar"), Some(&sha))
        .await
        .expect_err("500");
    let text = err.to_string();
    assert!(text.contains("HTTP 500 Internal Server Error"), "{text}");
    assert!(text.contains("gave up after 3 attempts"), "{text}");
    assert_eq!(server.requests("/boom.tar"), 3);
    assert_nothing_visible(state.path());
}

#[tokio::test]
async fn a_truncated_download_is_resumed_with_range() {
    let server = Server::start().await;
    let body = Arc::new(gzip(&tar(&[E::File(b"big", &noise(3 << 20, 7), 0o644)])));
    let sha = sha256(&body);
    server.route(
        "/cut.tar.gz",
        Route::Truncate {
            body: body.clone(),
            cut: 1 << 20,
            times: 1,
        },
    );
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let tree = fetch(&store, &server.url("/cut.tar.gz"), Some(&sha))
        .await
        .expect("resumed");
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].range, None);
    let resumed_at = range_start(&seen[1]).expect("a Range request");
    assert!(resumed_at > 0 && resumed_at <= 1 << 20, "{resumed_at}");
    assert_eq!(
        std::fs::metadata(tree.path.join("big"))
            .expect("stat")
            .len(),
        3 << 20
    );

    // A server that always cuts the body short: refused after the attempts, with why.
    server.route(
        "/always-cut.tar.gz",
        Route::Truncate {
            body: body.clone(),
            cut: 1000,
            times: usize::MAX,
        },
    );
    let sha2 = sha256(b"other");
    let err = fetch(&store, &server.url("/always-cut.tar.gz"), Some(&sha2))
        .await
        .expect_err("truncated");
    assert!(
        err.to_string().contains("gave up after 3 attempts"),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_that_stalls_mid_body_hits_the_idle_timeout() {
    let server = Server::start().await;
    let body = Arc::new(noise(1 << 20, 3));
    server.route(
        "/stall.tar",
        Route::Stall {
            body: body.clone(),
            after: 4096,
        },
    );
    let state = tempfile::tempdir().expect("tempdir");
    let mut c = config(state.path());
    c.fetch.idle_timeout = Duration::from_millis(300);
    c.fetch.attempts = 2;
    let store = ArtifactStore::open(c).expect("open");
    let err = fetch(&store, &server.url("/stall.tar"), Some(&sha256(&body)))
        .await
        .expect_err("stalled");
    let text = err.to_string();
    assert!(text.contains("idle timeout"), "{text}");
    assert!(text.contains("gave up after 2 attempts"), "{text}");
    // The second attempt resumed after the bytes the first one got.
    let seen = server.seen();
    assert_eq!(seen[1].range.as_deref(), Some("bytes=4096-"), "{seen:?}");
    assert_nothing_visible(state.path());
}

#[tokio::test]
async fn redirects_are_limited_and_never_change_scheme() {
    let server = Server::start().await;
    let archive = Arc::new(web_tar());
    let sha = sha256(&archive);
    server.route("/real.tar", Route::Bytes(archive.clone()));
    server.route("/hop.tar", Route::Redirect("/real.tar".into()));
    server.route(
        "/to-https.tar",
        Route::Redirect(format!("https://{}/real.tar", server.addr)),
    );
    server.route("/to-file.tar", Route::Redirect("file:///etc/passwd".into()));
    server.route("/loop.tar", Route::Redirect("/loop.tar".into()));
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let ok = fetch(&store, &server.url("/hop.tar"), Some(&sha))
        .await
        .expect("a same-scheme redirect is followed");
    assert!(ok.path.join("bin/web").exists());
    let other = sha256(b"never");
    for (path, needle) in [
        ("/to-https.tar", "a redirect to another scheme is refused"),
        ("/to-file.tar", "a redirect to another scheme is refused"),
        ("/loop.tar", "more than 5 redirects"),
    ] {
        let before = server.requests(path);
        let err = fetch(&store, &server.url(path), Some(&other))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(needle), "{path}: {err}");
        let tries = server.requests(path) - before;
        if path == "/loop.tar" {
            assert_eq!(
                tries, 6,
                "{path}: the first request and 5 redirects, not retried"
            );
        } else {
            assert_eq!(tries, 1, "{path}: not retried");
        }
    }
    assert_eq!(
        server.requests("/real.tar"),
        1,
        "the https redirect was not followed"
    );
}

#[tokio::test]
async fn plain_http_beyond_loopback_needs_the_stores_policy_too() {
    // A spec validated under a looser policy than the store's is still refused, before any
    // connection (192.0.2.1 is a documentation address nobody answers on).
    let spec = RawArtifact {
        url: Some("http://192.0.2.1/a.tar".into()),
        sha256: Some(sha256(b"x")),
        format: None,
        mount: Some("/app".into()),
    }
    .validate(FetchPolicy { allow_http: true })
    .expect("valid under the open policy");
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let err = store
        .ensure_artifact(&spec, Ownership::Root, None)
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("only allowed to a loopback host"),
        "{err}"
    );
    assert_nothing_visible(state.path());
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (CA DER, server config).
fn tls_pair() -> (Vec<u8>, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
    let key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("leaf");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    (issuer.der().to_vec(), config)
}

#[tokio::test]
async fn https_with_the_hosts_roots_plus_a_private_ca() {
    let (ca, server_config) = tls_pair();
    let server = Server::start_tls(server_config).await;
    let archive = Arc::new(zstd(&web_tar()));
    let sha = sha256(&archive);
    server.route("/web.tar.zst", Route::Bytes(archive.clone()));
    let state = tempfile::tempdir().expect("tempdir");
    // Without the CA: refused for the certificate, and not retried.
    let untrusting = open(state.path());
    let err = fetch(&untrusting, &server.url("/web.tar.zst"), Some(&sha))
        .await
        .expect_err("untrusted");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    assert!(!err.to_string().contains("attempts"), "not retried: {err}");
    drop(untrusting);
    let mut c = config(state.path());
    c.fetch.extra_roots = vec![ca];
    let store = ArtifactStore::open(c).expect("open");
    let tree = fetch(&store, &server.url("/web.tar.zst"), Some(&sha))
        .await
        .expect("trusted");
    assert!(tree.path.join("static/index.html").is_file());
}

#[tokio::test]
async fn at_most_n_fetches_run_at_once_and_one_per_digest() {
    let server = Server::start().await;
    let gate = Arc::new(Semaphore::new(0));
    let mut specs = Vec::new();
    for i in 0..5u64 {
        let body = Arc::new(tar(&[E::File(b"f", &noise(1000, i + 1), 0o644)]));
        let path = format!("/a{i}.tar");
        specs.push(artifact(&server.url(&path), Some(&sha256(&body))));
        server.route(
            &path,
            Route::Gated {
                body,
                gate: gate.clone(),
            },
        );
    }
    let state = tempfile::tempdir().expect("tempdir");
    let mut c = config(state.path());
    c.fetch.max_concurrent = 2;
    let store = ArtifactStore::open(c).expect("open");
    let mut tasks = Vec::new();
    // The first artifact twice: one download serves both.
    for spec in specs.iter().chain(std::iter::once(&specs[0])) {
        let (store, spec) = (store.clone(), spec.clone());
        tasks.push(tokio::spawn(async move {
            store.ensure_artifact(&spec, Ownership::Root, None).await
        }));
    }
    // Let requests pile up against the closed gate, then open it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.seen().len() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.seen().len(), 2, "only two fetches may be in flight");
    gate.add_permits(100);
    for t in tasks {
        t.await.expect("join").expect("fetched");
    }
    assert!(server.max_active() <= 2, "{}", server.max_active());
    assert_eq!(server.requests("/a0.tar"), 1, "one download per digest");
    assert_eq!(server.seen().len(), 5);
}

#[tokio::test]
async fn local_files_need_no_network_and_imports_serve_remote_specs_offline() {
    let state = tempfile::tempdir().expect("tempdir");
    let archive = gzip(&web_tar());
    let sha = sha256(&archive);
    let file = state.path().join("web-1.tar.gz");
    std::fs::write(&file, &archive).expect("write");
    let store = open(state.path());
    for url in [
        file.to_str().expect("utf8").to_string(),
        format!("file://{}", file.display()),
    ] {
        let tree = fetch(&store, &url, None).await.expect("local");
        assert_eq!(tree.digest.hex(), sha, "hashed while copied");
    }
    drop(store);

    // Air-gapped: a second store has the archive only by import; the spec names a server
    // that does not exist.
    let other = tempfile::tempdir().expect("tempdir");
    let store = open(other.path());
    let digest = store.import(&file).await.expect("import");
    assert_eq!(digest.hex(), sha);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = dead.local_addr().expect("addr").port();
    drop(dead);
    let tree = fetch(
        &store,
        &format!("http://127.0.0.1:{port}/web-1.tar.gz"),
        Some(&sha),
    )
    .await
    .expect("served from the imported blob");
    assert!(tree.path.join("bin/web").is_file());
    let entry = &store.list()[0];
    assert!(entry.owners.contains("import"), "{entry:?}");
}

/// Unpacks `archive` (of `name`, format from its extension) from a local file.
async fn unpack(state: &Path, name: &str, archive: &[u8]) -> Result<PathBuf, ArtifactError> {
    let file = state.join(name);
    std::fs::write(&file, archive).expect("write");
    let store = open(state);
    let tree = fetch(&store, file.to_str().expect("utf8"), None).await?;
    Ok(tree.path.clone())
}

/// Refused with `needle` in the message, nothing unpacked, no leftovers; blob kept (it was
/// verified — it is the archive that is bad).
async fn refused(name: &str, archive: &[u8], needle: &str) -> String {
    let state = tempfile::tempdir().expect("tempdir");
    let err = unpack(state.path(), name, archive)
        .await
        .expect_err("must be refused");
    let text = err.to_string();
    assert!(
        matches!(err, ArtifactError::Unpack { .. }),
        "{name}: {text}"
    );
    assert!(text.contains(needle), "{name}: {text}");
    let a = state.path().join("artifacts");
    assert_eq!(
        names(&a.join("trees")),
        Vec::<String>::new(),
        "{name}: trees/"
    );
    assert_eq!(names(&a.join("tmp")), Vec::<String>::new(), "{name}: tmp/");
    text
}

#[tokio::test]
async fn hostile_archives_are_refused_and_nothing_escapes() {
    let outside = tempfile::tempdir().expect("tempdir");
    let out = outside.path().to_str().expect("utf8").as_bytes().to_vec();
    let through = "writing through a symlink is refused";
    let whole = gzip(&tar(&[E::File(b"f", &noise(1 << 20, 9), 0o644)]));
    // (file name, archive, what the refusal says)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot.tar",
            tar(&[
                E::File(b"ok", b"x", 0o644),
                E::File(b"../evil", b"x", 0o644),
            ]),
            "entry \"../evil\": a \"..\" component",
        ),
        (
            "abs.tar",
            tar(&[E::File(b"/tmp/corral-abs-evil", b"x", 0o644)]),
            "an absolute path",
        ),
        (
            "through-symlink.tar",
            tar(&[E::Symlink(b"x", &out), E::File(b"x/evil", b"pwned", 0o644)]),
            "\"x\" on its path is a symlink: writing through a symlink is refused",
        ),
        // A relative symlink that climbs out, then a file below it.
        (
            "through-relative.tar.gz",
            gzip(&tar(&[
                E::Symlink(b"up", b"../../../../../../.."),
                E::File(b"up/tmp/evil", b"pwned", 0o644),
            ])),
            through,
        ),
        (
            "hardlink-out.tar",
            tar(&[E::HardLink(b"passwd", b"../../../../etc/passwd")]),
            "\"..\" component",
        ),
        (
            "hardlink-abs.tar",
            tar(&[E::HardLink(b"passwd", b"/etc/passwd")]),
            "an absolute path",
        ),
        (
            "hardlink-via-symlink.tar",
            tar(&[
                E::Symlink(b"etc", b"/etc"),
                E::HardLink(b"passwd", b"etc/passwd"),
            ]),
            through,
        ),
        (
            "hardlink-missing.tar",
            tar(&[E::HardLink(b"a", b"nowhere")]),
            "not in the tree",
        ),
        // zip: the same rules.
        (
            "dotdot.zip",
            zip(&[("../evil", b"x", 0o644)]),
            "\"..\" component",
        ),
        (
            "through-symlink.zip",
            zip(&[("x", &out, 0o120777), ("x/evil", b"pwned", 0o644)]),
            through,
        ),
        // Not archives at all, or cut short.
        ("garbage.tar.gz", b"definitely not gzip".to_vec(), ""),
        (
            "cut.tar.gz",
            whole[..whole.len() / 2].to_vec(),
            "entry \"f\": reading the archive",
        ),
        (
            "garbage.zip",
            b"PK not really".to_vec(),
            "not a zip archive",
        ),
    ];
    for (name, archive, needle) in cases {
        refused(name, &archive, needle).await;
    }
    assert!(!Path::new("/tmp/corral-abs-evil").exists());
    assert_eq!(
        names(outside.path()),
        Vec::<String>::new(),
        "nothing written outside"
    );
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(status.success(), "mount tmpfs");
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_fetch_cleanly() {
    if !is_root() {
        eprintln!("skipping: mounting a small tmpfs needs root");
        return;
    }
    let disk = SmallDisk::new("8m");
    let state = disk.0.path();
    let work = tempfile::tempdir().expect("tempdir");
    // The archive itself does not fit.
    let big = work.path().join("big.tar");
    std::fs::write(&big, tar(&[E::File(b"f", &noise(12 << 20, 1), 0o644)])).expect("write");
    let store = open(state);
    let err = fetch(&store, big.to_str().expect("utf8"), None)
        .await
        .expect_err("no space");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    assert_nothing_visible(state);
    // The archive fits, what it unpacks to does not.
    let text: Vec<u8> = (0..12 << 20).map(|i| b"abcdefgh\n"[i % 9]).collect();
    let small = work.path().join("small.tar.gz");
    std::fs::write(&small, gzip(&tar(&[E::File(b"text", &text, 0o644)]))).expect("write");
    let err = fetch(&store, small.to_str().expect("utf8"), None)
        .await
        .expect_err("no space");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    assert_eq!(names(&state.join("artifacts/trees")), Vec::<String>::new());
    assert_eq!(names(&state.join("artifacts/tmp")), Vec::<String>::new());
    drop(store);
}

#[tokio::test]
async fn devices_and_fifos_are_skipped_and_setuid_dropped() {
    let state = tempfile::tempdir().expect("tempdir");
    let path = unpack(
        state.path(),
        "dev.tar",
        &tar(&[
            E::CharDev(b"null"),
            E::Fifo(b"pipe"),
            E::File(b"tool", b"x", 0o6755),
            E::Dir(b"shared", 0o1777),
            E::Dir(b"twice", 0o700),
            E::Dir(b"twice", 0o755),
        ]),
    )
    .await
    .expect("unpacked");
    assert!(std::fs::symlink_metadata(path.join("null")).is_err());
    assert!(std::fs::symlink_metadata(path.join("pipe")).is_err());
    assert_eq!(
        std::fs::metadata(path.join("tool")).expect("stat").mode() & 0o7777,
        0o555
    );
    assert_eq!(
        std::fs::metadata(path.join("shared")).expect("stat").mode() & 0o7777,
        0o1555,
        "sticky kept, write bits dropped"
    );
    assert_eq!(
        std::fs::metadata(path.join("twice")).expect("stat").mode() & 0o7777,
        0o555,
        "the last entry of a directory decides its mode"
    );
}

#[tokio::test]
async fn zip_archives_unpack_with_links_and_modes() {
    let state = tempfile::tempdir().expect("tempdir");
    let path = unpack(
        state.path(),
        "app.zip",
        &zip(&[
            ("app/", b"", 0o755),
            ("app/run.sh", b"#!/bin/sh\necho zip\n", 0o755),
            ("app/link", b"run.sh", 0o120777),
        ]),
    )
    .await
    .expect("unpacked");
    assert_eq!(
        std::fs::read(path.join("app/run.sh")).expect("read"),
        b"#!/bin/sh\necho zip\n"
    );
    assert_eq!(
        std::fs::read_link(path.join("app/link")).expect("link"),
        Path::new("run.sh")
    );
    assert_eq!(
        std::fs::metadata(path.join("app/run.sh"))
            .expect("stat")
            .mode()
            & 0o777,
        0o555
    );
}

#[tokio::test]
async fn a_compression_bomb_is_refused_with_the_numbers() {
    // 40 MiB of zeros: gzip makes it about 40 KiB, a ratio near 1000:1.
    let zeros = vec![0u8; 40 << 20];
    let bomb = build::gzip_best(&tar(&[E::File(b"zeros", &zeros, 0o644)]));
    assert!(bomb.len() * 500 < zeros.len(), "{}", bomb.len());
    let text = refused("bomb.tar.gz", &bomb, "expands more than 200:1").await;
    assert!(
        text.contains(&format!("from {} archive bytes", bomb.len())),
        "{text}"
    );
    let zbomb = zstd(&tar(&[E::File(b"zeros", &zeros, 0o644)]));
    refused("bomb.tar.zst", &zbomb, "expands more than 200:1").await;
    let zipbomb = zip(&[("zeros", &zeros, 0o644)]);
    refused("bomb.zip", &zipbomb, "expands more than 200:1").await;
}

#[tokio::test]
async fn a_10_gb_sparse_file_is_refused_by_the_size_limit() {
    let work = tempfile::tempdir().expect("tempdir");
    let sparse = work.path().join("sparse");
    let file = std::fs::File::create(&sparse).expect("create");
    file.set_len(10 * 1000 * 1000 * 1000).expect("truncate");
    drop(file);
    let out = work.path().join("sparse.tar");
    let status = std::process::Command::new("tar")
        .args(["--sparse", "-cf"])
        .arg(&out)
        .arg("-C")
        .arg(work.path())
        .arg("sparse")
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => {
            eprintln!("skipping: GNU tar --sparse unavailable ({other:?})");
            return;
        }
    }
    let archive = std::fs::read(&out).expect("read");
    assert!(
        archive.len() < 1 << 20,
        "a sparse archive is small: {}",
        archive.len()
    );
    let text = refused(
        "sparse.tar",
        &archive,
        "expands to more than the limit of 4GiB",
    )
    .await;
    assert!(text.contains("10000000000 bytes"), "{text}");
}

#[tokio::test]
async fn a_million_entries_are_refused_by_the_entry_limit() {
    // 1 000 000 empty files in 1000 directories, zstd-compressed as it is written.
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("zstd");
    {
        let mut b = tar::Builder::new(&mut encoder);
        for d in 0..1000 {
            for f in 0..1000 {
                let mut h = tar::Header::new_gnu();
                h.set_size(0);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(&mut h, format!("d{d}/f{f}"), &[][..])
                    .expect("append");
            }
        }
        b.finish().expect("tar");
    }
    let archive = encoder.finish().expect("zstd");
    let text = refused("million.tar.zst", &archive, "more than 500000 entries").await;
    assert!(text.contains("entry \"d500/f0\""), "{text}");
}

#[tokio::test]
async fn a_dropped_fetch_leaves_nothing_visible_and_the_next_one_resumes() {
    let (server, body, sha) = slow_server(11).await;
    let state = tempfile::tempdir().expect("tempdir");
    let spec = artifact(&server.url("/slow.tar"), Some(&sha));
    // Dropped once more than 1 MiB arrived.
    drop_fetch_when(&open(state.path()), &spec, |p| p.done > 1 << 20).await;
    assert_eq!(
        names(&state.path().join("artifacts/trees")),
        Vec::<String>::new()
    );
    assert_eq!(
        names(&state.path().join("artifacts/sha256")),
        Vec::<String>::new()
    );
    let part = state.path().join(format!("artifacts/tmp/{sha}.part"));
    let kept = std::fs::metadata(&part)
        .expect("partial download kept")
        .len();
    assert!(kept >= 1 << 20, "{kept}");
    server.route("/slow.tar", Route::Bytes(body.clone()));
    let store = open(state.path());
    let tree = store
        .ensure_artifact(&spec, Ownership::Root, None)
        .await
        .expect("completed");
    let last = server.seen().last().cloned().expect("request");
    let from = range_start(&last).expect("resumed with Range");
    assert!(from >= 1 << 20, "{from}");
    assert_eq!(
        std::fs::metadata(tree.path.join("big"))
            .expect("stat")
            .len(),
        4 << 20
    );
    assert!(!part.exists());
}

#[tokio::test]
async fn a_dropped_unpack_stops_and_leaves_nothing_half_visible() {
    let state = tempfile::tempdir().expect("tempdir");
    // Many files, so the unpack takes a while and reports progress.
    let file = state.path().join("many.tar");
    std::fs::write(&file, many_files(3000, 1, 16 << 10)).expect("write");
    let spec = artifact(file.to_str().expect("utf8"), None);
    drop_fetch_when(&open(state.path()), &spec, |p| p.phase == Phase::Unpacking).await;
    let tmp = state.path().join("artifacts/tmp");
    // The blocking unpack notices the cancel within one file and removes its directory.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !names(&tmp).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        names(&tmp),
        Vec::<String>::new(),
        "unpack directory removed"
    );
    assert_eq!(
        names(&state.path().join("artifacts/trees")),
        Vec::<String>::new()
    );
    let store = open(state.path());
    let tree = store
        .ensure_artifact(&spec, Ownership::Root, None)
        .await
        .expect("completed");
    assert_eq!(names(&tree.path.join("d0")).len(), 3000);
}

/// The child half of the kill -9 tests: runs a fetch the parent kills.
#[test]
#[ignore = "run by the kill -9 tests as a child process"]
fn crash_child() {
    let Ok(args) = std::env::var("CORRAL_ARTIFACT_CRASH_CHILD") else {
        return;
    };
    let mut parts = args.splitn(3, '|');
    let (dir, url, sha) = (
        parts.next().expect("dir"),
        parts.next().expect("url"),
        parts.next().expect("sha"),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = ArtifactStore::open(config(Path::new(dir))).expect("open");
        let _ = fetch(&store, url, Some(sha)).await;
        // Parent kills us before this; if not, wait for it.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
}

fn spawn_crash_child(state: &Path, url: &str, sha: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "CORRAL_ARTIFACT_CRASH_CHILD",
            format!("{}|{url}|{sha}", state.display()),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn child")
}

/// Polls `cond` for up to 60 s.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn kill_9_mid_download_then_the_next_store_resumes() {
    let (server, body, sha) = slow_server(13).await;
    let state = tempfile::tempdir().expect("tempdir");
    let mut child = spawn_crash_child(state.path(), &server.url("/slow.tar"), &sha);
    let part = state.path().join(format!("artifacts/tmp/{sha}.part"));
    wait_for("the child's partial download", || {
        std::fs::metadata(&part).is_ok_and(|m| m.len() >= 1 << 20)
    })
    .await;
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    server.route("/slow.tar", Route::Bytes(body.clone()));
    let store = open(state.path());
    let tree = fetch(&store, &server.url("/slow.tar"), Some(&sha))
        .await
        .expect("completed");
    let last = server.seen().last().cloned().expect("request");
    assert!(
        range_start(&last).is_some_and(|n| n > 0),
        "resumed: {last:?}"
    );
    assert_eq!(
        std::fs::read(tree.path.join("big")).expect("read").len(),
        4 << 20
    );
}

#[tokio::test]
async fn kill_9_mid_unpack_then_the_next_store_cleans_and_completes() {
    let server = Server::start().await;
    let body = Arc::new(many_files(20000, 10, 512));
    let sha = sha256(&body);
    server.route("/many.tar", Route::Bytes(body.clone()));
    let state = tempfile::tempdir().expect("tempdir");
    let mut child = spawn_crash_child(state.path(), &server.url("/many.tar"), &sha);
    let tmp = state.path().join("artifacts/tmp");
    wait_for("the child's unpack", || {
        names(&tmp)
            .iter()
            .any(|n| n.starts_with("unpack-") && names(&tmp.join(n).join("d0")).len() > 100)
    })
    .await;
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    assert!(
        names(&tmp).iter().any(|n| n.starts_with("unpack-")),
        "a leftover to clean"
    );
    assert_eq!(
        names(&state.path().join("artifacts/trees")),
        Vec::<String>::new()
    );
    let store = open(state.path());
    assert_eq!(names(&tmp), Vec::<String>::new(), "cleaned at open");
    let tree = fetch(&store, &server.url("/many.tar"), Some(&sha))
        .await
        .expect("completed");
    assert_eq!(
        server.requests("/many.tar"),
        1,
        "the blob was complete: not fetched again"
    );
    let count: usize = (0..10)
        .map(|d| names(&tree.path.join(format!("d{d}"))).len())
        .sum();
    assert_eq!(count, 20000);
}

#[tokio::test]
async fn gc_keeps_pinned_and_leased_and_collects_the_rest() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let mut trees = Vec::new();
    for i in 0..3u64 {
        let file = state.path().join(format!("a{i}.tar"));
        std::fs::write(&file, tar(&[E::File(b"f", &noise(1000, i + 1), 0o644)])).expect("write");
        trees.push(
            fetch(&store, file.to_str().expect("utf8"), None)
                .await
                .expect("unpacked"),
        );
    }
    let digests: Vec<Digest> = trees.iter().map(|t| t.digest).collect();
    let paths: Vec<PathBuf> = trees.iter().map(|t| t.path.clone()).collect();
    store.pin(&digests[0], "web@r1").expect("pin");
    let held = trees.remove(1);
    drop(trees);
    let report = store.gc().await.expect("gc");
    assert_eq!(report.unreferenced, vec![(EntryKind::Artifact, digests[2])]);
    assert!(paths[0].is_dir() && paths[1].is_dir() && !paths[2].exists());
    assert!(
        !state
            .path()
            .join("artifacts/sha256")
            .join(digests[2].hex())
            .exists()
    );
    // Ten revisions kept: pinning r2..r11 and dropping r1's pin frees what only r1 used.
    for r in 2..=11 {
        store.pin(&digests[1], &format!("web@r{r}")).expect("pin");
    }
    store.unpin_owner("web@r1").expect("unpin");
    drop(held);
    let report = store.gc().await.expect("gc");
    assert_eq!(report.unreferenced, vec![(EntryKind::Artifact, digests[0])]);
    assert!(!paths[0].exists() && paths[1].is_dir());
    let list = store.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].owners.len(), 10);
    assert!(list[0].last_used > 0);
    // Survives a restart: pins are persisted.
    drop(store);
    let store = open(state.path());
    assert_eq!(store.list()[0].owners.len(), 10);
    assert!(store.gc().await.expect("gc").unreferenced.is_empty());
}

#[tokio::test]
async fn max_cache_evicts_the_least_recently_used_never_one_in_use() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut c = config(state.path());
    // Each entry: a ~200 KB blob and its ~200 KB tree; room for two.
    c.max_cache = Some(900 << 10);
    let store = ArtifactStore::open(c).expect("open");
    let mut specs = Vec::new();
    for i in 0..3u64 {
        let file = state.path().join(format!("a{i}.tar"));
        std::fs::write(
            &file,
            tar(&[E::File(b"f", &noise(200 << 10, i + 1), 0o644)]),
        )
        .expect("write");
        specs.push(artifact(file.to_str().expect("utf8"), None));
    }
    let held = store
        .ensure_artifact(&specs[0], Ownership::Root, None)
        .await
        .expect("a0");
    for r in 0..3 {
        store.pin(&held.digest, &format!("r{r}")).expect("pin");
    }
    let a1 = store
        .ensure_artifact(&specs[1], Ownership::Root, None)
        .await
        .expect("a1");
    let a1_path = a1.path.clone();
    drop(a1);
    // a2 pushes the store over the bound: a1 (not in use) goes, a0 (in use, and oldest) stays.
    let a2 = store
        .ensure_artifact(&specs[2], Ownership::Root, None)
        .await
        .expect("a2");
    assert!(held.path.is_dir(), "in use: never evicted");
    assert!(a2.path.is_dir());
    assert!(!a1_path.exists(), "least recently used and unused: evicted");
    let total: u64 = store.list().iter().map(|e| e.size).sum();
    assert!(total <= 900 << 10, "{total}");
}

#[tokio::test]
async fn one_store_per_directory_and_records_rebuilt_from_disk() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let err = ArtifactStore::open(config(state.path())).expect_err("locked");
    assert!(matches!(err, ArtifactError::Locked { .. }), "{err}");
    let file = state.path().join("a.tar");
    std::fs::write(&file, web_tar()).expect("write");
    let tree = fetch(&store, file.to_str().expect("utf8"), None)
        .await
        .expect("unpacked");
    let (digest, path) = (tree.digest, tree.path.clone());
    drop(tree);
    drop(store);
    // A crash between the rename and the record: the records are lost or damaged.
    std::fs::write(state.path().join("artifacts/refs.json"), b"{garbage").expect("write");
    let store = open(state.path());
    let list = store.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].digest, digest);
    assert!(list[0].size > 0);
    let again = fetch(&store, file.to_str().expect("utf8"), None)
        .await
        .expect("cached");
    assert_eq!(again.path, path);
}

// ------------------------------------------------------------------------------------------
// OCI images.

fn rootfs_checks(rootfs: &Path) {
    assert!(rootfs.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_link(rootfs.join("bin/sh")).expect("link"),
        Path::new("busybox")
    );
    assert!(!rootfs.join("gone.txt").exists(), "whiteout of layer 2");
    assert!(
        !rootfs.join("data/old.txt").exists(),
        "whiteout in a directory"
    );
    assert_eq!(
        std::fs::read(rootfs.join("data/keep.txt")).expect("read"),
        b"keep\n"
    );
    assert_eq!(
        std::fs::read(rootfs.join("data/new.txt")).expect("read"),
        b"new\n"
    );
    assert_eq!(
        names(&rootfs.join("opq")),
        vec!["upper.txt".to_string()],
        "opaque dir"
    );
    assert!(!rootfs.join(".wh.gone.txt").exists() && !rootfs.join("opq/.wh..wh..opq").exists());
    assert_eq!(
        std::fs::metadata(rootfs.join("tmp")).expect("stat").mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        std::fs::metadata(rootfs.join("bin/suid"))
            .expect("stat")
            .mode()
            & 0o7777,
        0o755,
        "setuid dropped"
    );
    assert_eq!(
        std::fs::metadata(rootfs.join("data/keep.txt"))
            .expect("stat")
            .uid(),
        1000
    );
}

/// Runs a command inside the rootfs with chroot: the image works as a root filesystem.
fn run_in(rootfs: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("chroot")
        .arg(rootfs)
        .args(args)
        .output()
        .expect("chroot");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn an_oci_layout_dir_and_tar_become_a_working_rootfs() {
    if !is_root() {
        eprintln!("skipping: images keep their files' owners, which needs root");
        return;
    }
    let Some(busybox) = image::busybox() else {
        return;
    };
    let img = image::busybox_image(&busybox, "app");
    let work = tempfile::tempdir().expect("tempdir");
    let layout = work.path().join("layout");
    img.write_dir(&layout);
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let rootfs = store
        .ensure_image(
            &image_spec(layout.to_str().expect("utf8"), &img.manifest),
            None,
        )
        .await
        .expect("image");
    rootfs_checks(&rootfs.rootfs);
    assert_eq!(
        run_in(&rootfs.rootfs, &["/bin/hello"]),
        "hello from the image\n"
    );
    let c = &rootfs.config;
    assert_eq!(c.entrypoint, ["/bin/sh", "-c"]);
    assert_eq!(c.cmd, ["echo hi"]);
    assert_eq!(c.env, ["PATH=/bin", "GREETING=hi"]);
    assert_eq!(c.working_dir.as_deref(), Some("/data"));
    let user = c.user.as_ref().expect("user");
    assert_eq!(
        (user.spec.as_str(), user.uid, user.gid),
        ("app", 1000, 1000)
    );
    assert_eq!(
        rootfs.rootfs,
        state
            .path()
            .join("artifacts/images")
            .join(rootfs.digest.hex())
            .join("rootfs")
    );
    drop(rootfs);

    // The same image as a tar, served over HTTP, into another store.
    let server = Server::start().await;
    server.route("/web.oci.tar", Route::Bytes(Arc::new(img.tar())));
    let state2 = tempfile::tempdir().expect("tempdir");
    let store2 = open(state2.path());
    let remote = store2
        .ensure_image(
            &image_spec(&server.url("/web.oci.tar"), &img.manifest),
            None,
        )
        .await
        .expect("image over http");
    rootfs_checks(&remote.rootfs);
    assert_eq!(
        names(&state2.path().join("artifacts/tmp")),
        Vec::<String>::new(),
        "the downloaded image tar is not kept"
    );
    // Cached: with the server gone, the image is still there (offline rollback).
    drop(server);
    drop(remote);
    let cached = store2
        .ensure_image(
            &image_spec("http://127.0.0.1:9/web.oci.tar", &img.manifest),
            None,
        )
        .await
        .expect("cached image");
    assert_eq!(cached.config.user.as_ref().map(|u| u.uid), Some(1000));
    let listed = store2.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].kind, EntryKind::Image);
}

/// Refused with `needle`, nothing in images/ and no leftovers.
async fn image_refused(layout: &Path, digest: &str, needle: &str) {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let err = store
        .ensure_image(&image_spec(layout.to_str().expect("utf8"), digest), None)
        .await
        .expect_err("must be refused");
    assert!(err.to_string().contains(needle), "{needle}: {err}");
    assert_nothing_visible(state.path());
}

#[tokio::test]
async fn bad_images_are_refused_by_name_and_leave_nothing() {
    if !is_root() {
        eprintln!("skipping: images keep their files' owners, which needs root");
        return;
    }
    let Some(busybox) = image::busybox() else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let (one, two) = image::busybox_layers(&busybox);

    // A manifest naming a layer blob that is not there.
    let img = image::busybox_image(&busybox, "app");
    let dir = work.path().join("missing");
    img.write_dir(&dir);
    std::fs::remove_file(dir.join("blobs/sha256").join(img.blobs[1].hex())).expect("rm");
    image_refused(&dir, &img.manifest, "is missing from the layout").await;

    // A layer blob whose content does not match its digest.
    let dir = work.path().join("corrupt");
    img.write_dir(&dir);
    let layer = dir.join("blobs/sha256").join(img.blobs[2].hex());
    let mut bytes = std::fs::read(&layer).expect("read");
    let last = bytes.len() - 1;
    bytes[last - 2000] ^= 0xff;
    std::fs::write(&layer, bytes).expect("write");
    image_refused(&dir, &img.manifest, "does not match its digest").await;

    // The manifest itself tampered with (its digest no longer matches).
    let dir = work.path().join("tampered");
    img.write_dir(&dir);
    let m = dir.join("blobs/sha256").join(img.blobs[3].hex());
    let mut text = std::fs::read(&m).expect("read");
    text.push(b' ');
    std::fs::write(&m, text).expect("write");
    image_refused(&dir, &img.manifest, "does not match its digest").await;

    // An unsupported layer media type.
    let config = image::config("app", &[&one, &two]);
    let l1 = image::Blob::new(image::LAYER_GZ, gzip(&one));
    let l2 = image::Blob::new(
        "application/vnd.oci.image.layer.v1.tar+encrypted",
        two.clone(),
    );
    let manifest = image::manifest(&config, &[&l1, &l2]);
    let digest = format!("sha256:{}", manifest.hex());
    let bad = image::Image {
        blobs: vec![config, l1, l2, manifest],
        manifest: digest,
    };
    let dir = work.path().join("mediatype");
    bad.write_dir(&dir);
    image_refused(
        &dir,
        &bad.manifest,
        "media type \"application/vnd.oci.image.layer.v1.tar+encrypted\", unsupported",
    )
    .await;

    // A config user the image does not have.
    let ghost = image::busybox_image(&busybox, "ghost");
    let dir = work.path().join("ghost");
    ghost.write_dir(&dir);
    image_refused(&dir, &ghost.manifest, "has no user \"ghost\"").await;

    // A digest the layout does not have at all.
    let dir = work.path().join("other");
    img.write_dir(&dir);
    image_refused(
        &dir,
        &format!("sha256:{}", sha256(b"nope")),
        "is missing from the layout",
    )
    .await;

    // A gzip-compressed layout tar.
    let gz = work.path().join("image.tar.gz");
    std::fs::write(&gz, gzip(&img.tar())).expect("write");
    image_refused(&gz, &img.manifest, "a compressed file").await;
}

#[tokio::test]
async fn an_index_selects_the_manifest_for_this_host() {
    if !is_root() {
        eprintln!("skipping: images keep their files' owners, which needs root");
        return;
    }
    let Some(busybox) = image::busybox() else {
        return;
    };
    let (one, two) = image::busybox_layers(&busybox);
    let l1 = image::Blob::new(image::LAYER_GZ, gzip(&one));
    let l2 = image::Blob::new(image::LAYER_TAR, two.clone());
    let here = image::config("app", &[&one, &two]);
    let there = image::config_for("s390x", "app", &[&one, &two]);
    let m_here = image::manifest(&here, &[&l1, &l2]);
    let m_there = image::manifest(&there, &[&l1, &l2]);
    let both = image::index(&[(&m_there, "s390x"), (&m_here, image::host_arch())]);
    let only_there = image::index(&[(&m_there, "s390x")]);
    let (both_digest, there_digest, here_digest) = (
        format!("sha256:{}", both.hex()),
        format!("sha256:{}", only_there.hex()),
        format!("sha256:{}", m_here.hex()),
    );
    let img = image::Image {
        blobs: vec![here, there, l1, l2, m_there, m_here, only_there, both],
        manifest: both_digest.clone(),
    };
    let work = tempfile::tempdir().expect("tempdir");
    img.write_dir(work.path());
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let picked = store
        .ensure_image(
            &image_spec(work.path().to_str().expect("utf8"), &both_digest),
            None,
        )
        .await
        .expect("the host's manifest");
    rootfs_checks(&picked.rootfs);
    assert_eq!(picked.config.manifest, here_digest);
    drop(picked);
    drop(store);
    image_refused(
        work.path(),
        &there_digest,
        &format!("has no manifest for linux/{}: it lists", image::host_arch()),
    )
    .await;
    // The s390x manifest named directly: its config says so.
    image_refused(
        work.path(),
        &format!("sha256:{}", img.blobs[4].hex()),
        "the image is for s390x",
    )
    .await;
}

fn have(tool: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipping: {tool} not installed (apt-get install {tool}; .ci/run installs it)");
    }
    found
}

fn sh(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn images_made_by_umoci_and_skopeo_unpack_the_same() {
    if !is_root() || !have("umoci") || !have("skopeo") {
        if !is_root() {
            eprintln!("skipping: needs root");
        }
        return;
    }
    let Some(busybox) = image::busybox() else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    // Files for two layers: the second removes gone.txt with a whiteout.
    let base = w.join("base");
    std::fs::create_dir_all(base.join("bin")).expect("mkdir");
    std::fs::create_dir_all(base.join("etc")).expect("mkdir");
    std::fs::write(base.join("bin/busybox"), &busybox).expect("write");
    std::fs::set_permissions(
        base.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    std::os::unix::fs::symlink("busybox", base.join("bin/sh")).expect("symlink");
    std::fs::write(
        base.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nweb:x:2000:2000::/:/bin/sh\n",
    )
    .expect("write");
    std::fs::write(base.join("gone.txt"), "gone\n").expect("write");
    let layout = w.join("layout");
    let image = format!("{}:v1", layout.display());
    sh(std::process::Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    sh(std::process::Command::new("umoci").args(["new", "--image", &image]));
    sh(std::process::Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(&base)
        .arg("/"));
    sh(std::process::Command::new("umoci").args([
        "insert",
        "--image",
        &image,
        "--whiteout",
        "/gone.txt",
    ]));
    sh(std::process::Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.user=web",
        "--config.entrypoint=/bin/sh",
        "--config.workingdir=/",
    ]));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("json");
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();

    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let from_umoci = store
        .ensure_image(&image_spec(layout.to_str().expect("utf8"), &digest), None)
        .await
        .expect("umoci layout");
    let r = &from_umoci.rootfs;
    assert!(!r.join("gone.txt").exists(), "umoci's whiteout applied");
    assert_eq!(
        run_in(r, &["/bin/busybox", "echo", "from umoci"]),
        "from umoci\n"
    );
    assert_eq!(
        from_umoci.config.user.as_ref().map(|u| (u.uid, u.gid)),
        Some((2000, 2000))
    );
    assert_eq!(from_umoci.config.entrypoint, ["/bin/sh"]);

    // skopeo: the same image as an OCI archive tar and as a `docker save` tar.
    let oci_tar = w.join("web.oci.tar");
    sh(std::process::Command::new("skopeo").args([
        "copy",
        &format!("oci:{image}"),
        &format!("oci-archive:{}", oci_tar.display()),
    ]));
    let state2 = tempfile::tempdir().expect("tempdir");
    let store2 = open(state2.path());
    let from_archive = store2
        .ensure_image(&image_spec(oci_tar.to_str().expect("utf8"), &digest), None)
        .await
        .expect("skopeo oci-archive");
    assert!(from_archive.rootfs.join("bin/busybox").is_file());
    assert!(!from_archive.rootfs.join("gone.txt").exists());

    let docker_tar = w.join("web.docker.tar");
    sh(std::process::Command::new("skopeo").args([
        "copy",
        &format!("oci:{image}"),
        &format!("docker-archive:{}:web:v1", docker_tar.display()),
    ]));
    // An old-style docker save tar has no manifest: it is named by its image id, the config
    // digest.
    let inspect = sh(std::process::Command::new("skopeo").args([
        "inspect",
        "--config",
        "--raw",
        &format!("docker-archive:{}", docker_tar.display()),
    ]));
    let image_id = format!("sha256:{}", sha256(inspect.as_bytes()));
    let from_docker = store2
        .ensure_image(
            &image_spec(docker_tar.to_str().expect("utf8"), &image_id),
            None,
        )
        .await
        .expect("docker save tar");
    assert!(!from_docker.rootfs.join("gone.txt").exists());
    assert_eq!(
        run_in(&from_docker.rootfs, &["/bin/sh", "-c", "echo docker"]),
        "docker\n"
    );
    assert_eq!(from_docker.config.user.as_ref().map(|u| u.uid), Some(2000));
}
