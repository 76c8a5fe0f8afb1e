//! The `artifact` benchmark section: a cold fetch + verify + unpack of a 50 MB `.tar.gz` from
//! a loopback HTTP server into a fresh artifact store, against the floor measured in the same
//! run on the same file: `curl | sha256sum` then `tar xzf` (and `tar xzf` + `sync -f`, since
//! the store makes a tree durable before it becomes visible).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_agent::artifact::{ArtifactStore, Ownership, StoreConfig};
use corral_agent::spec::artifact::{FetchPolicy, RawArtifact};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `body` for any path on 127.0.0.1 (HTTP/1.1, one request per connection).
async fn serve(body: Arc<Vec<u8>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A tree of about 50 MB once compressed: 160 files of 320 KiB of noise (incompressible)
/// and 4000 small text files, as a real application's mix of binaries and sources.
fn make_tree(dir: &Path) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    };
    for d in 0..16 {
        let sub = dir.join(format!("lib{d}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..10 {
            std::fs::write(sub.join(format!("blob{f}.so")), noise(320 << 10)).expect("write");
        }
        for f in 0..250 {
            let text = format!("// source file {d}/{f}\n").repeat(40);
            std::fs::write(sub.join(format!("src{f}.txt")), text).expect("write");
        }
    }
}

fn run(cmd: &mut Command) -> Duration {
    let start = Instant::now();
    let status = cmd.status().expect("run");
    assert!(status.success(), "{cmd:?}");
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// Runs the section `rounds` times (cold each time) and prints medians.
pub async fn bench(rounds: usize) {
    let work = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let src = work.path().join("src");
    make_tree(&src);
    let archive = work.path().join("app.tar.gz");
    run(Command::new("tar")
        .arg("czf")
        .arg(&archive)
        .arg("-C")
        .arg(&src)
        .arg("."));
    let bytes = Arc::new(std::fs::read(&archive).expect("read"));
    let sha = String::from_utf8(
        Command::new("sha256sum")
            .arg(&archive)
            .output()
            .expect("sha256sum")
            .stdout,
    )
    .expect("utf8")
    .split_whitespace()
    .next()
    .expect("digest")
    .to_string();
    let addr = serve(bytes.clone()).await;
    let url = format!("http://{addr}/app.tar.gz");
    println!(
        "artifact: {:.1} MB tar.gz ({} files) from {url}; the machine may be shared: compare \
         figures within one run",
        bytes.len() as f64 / 1e6,
        16 * 260
    );
    let (mut ours, mut curl, mut untar, mut untar_sync) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        // Floor: download and hash, then unpack the same file.
        curl.push(run(Command::new("sh")
            .arg("-c")
            .arg(format!("curl -sf {url} | sha256sum > /dev/null"))));
        let out = work.path().join(format!("tar-{round}"));
        std::fs::create_dir(&out).expect("mkdir");
        untar.push(run(Command::new("tar")
            .arg("xzf")
            .arg(&archive)
            .arg("-C")
            .arg(&out)));
        let out2 = work.path().join(format!("tar-sync-{round}"));
        std::fs::create_dir(&out2).expect("mkdir");
        untar_sync.push(run(Command::new("sh").arg("-c").arg(format!(
            "tar xzf {} -C {} && sync -f {}",
            archive.display(),
            out2.display(),
            out2.display()
        ))));
        // Ours: a fresh store each round.
        let state = work.path().join(format!("store-{round}"));
        let store = ArtifactStore::open(StoreConfig::new(&state)).expect("open store");
        let spec = RawArtifact {
            url: Some(url.clone()),
            sha256: Some(sha.clone()),
            format: None,
            mount: Some("/app".into()),
        }
        .validate(FetchPolicy::default())
        .expect("spec");
        let start = Instant::now();
        let tree = store
            .ensure_artifact(&spec, Ownership::Root, None)
            .await
            .expect("artifact");
        ours.push(start.elapsed());
        drop(tree);
        drop(store);
        for dir in [&out, &out2, &state] {
            let _ = Command::new("rm")
                .arg("-rf")
                .arg(dir)
                .stdout(Stdio::null())
                .status();
        }
    }
    let (ours, curl, untar, untar_sync) = (
        median(ours),
        median(curl),
        median(untar),
        median(untar_sync),
    );
    let floor = curl + untar;
    let floor_sync = curl + untar_sync;
    println!(
        "{:<48} median {:>8}  (n={rounds})",
        "artifact cold fetch+verify+unpack (store)",
        ms(ours)
    );
    println!(
        "{:<48} median {:>8}  = curl|sha256sum {} + tar xzf {}",
        "artifact floor",
        ms(floor),
        ms(curl),
        ms(untar)
    );
    println!(
        "{:<48} median {:>8}  = curl|sha256sum {} + tar xzf && sync -f {}",
        "artifact floor, durable",
        ms(floor_sync),
        ms(curl),
        ms(untar_sync)
    );
    println!(
        "{:<48} {:.2}x the floor, {:.2}x the durable floor",
        "artifact ratio",
        ours.as_secs_f64() / floor.as_secs_f64(),
        ours.as_secs_f64() / floor_sync.as_secs_f64()
    );
}
