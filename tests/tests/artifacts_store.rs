//! The artifact store through the agent, on the real kernel: kept revisions hold their
//! packages and the one that falls out of the 10 kept is collected; every bad input of the
//! issue's table is refused at apply or in its rollout with the reason, and nothing of the
//! running revision is touched; an agent killed (-9) in the middle of a download, or of an
//! unpack, leaves a store the next agent completes the rollout from, with nothing left in its
//! temp directory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use corral_e2e::oci::build::{E, gzip, sha256, tar};
use corral_e2e::oci::image::{self, Blob};
use corral_e2e::{Agent, eventually, kill9, pb, skip_unless_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A service that runs `/bin/sleep` from the host with its files at /app.
fn spec(name: &str, url: &str, sha256: &str) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"/bin/sleep\", \"1000\"]\n[artifact]\nurl = \"{url}\"\nsha256 = \"{sha256}\"\nformat = \"tar\"\nmount = \"/app\"\n[rollout]\nmin_healthy = \"100ms\"\n"
    )
}

fn store_digests(state: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state.join("artifacts/sha256"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn rollout_done(agent: &Agent, name: &str, revision: u64) -> pb::RolloutStatus {
    eventually(
        &format!("{name}'s rollout to revision {revision} ended"),
        Duration::from_secs(90),
        || async {
            let s = agent.get(name).await.ok()?;
            let r = s.rollout?;
            (r.to_revision == revision && r.state != pb::RolloutState::Running as i32).then_some(r)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_of_eleven_revisions_is_collected_and_the_ten_kept_stay() {
    if skip_unless_root("the_first_of_eleven_revisions_is_collected_and_the_ten_kept_stay") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start().await;
    let mut digests = Vec::new();
    for rev in 1..=11u64 {
        let body = tar(&[E::File(b"version", format!("{rev}\n").as_bytes(), 0o644)]);
        let file = dir.path().join(format!("gc-{rev}.tar"));
        std::fs::write(&file, &body).expect("write");
        let sum = sha256(&body);
        agent
            .apply(&spec("gc", &file.display().to_string(), &sum))
            .await
            .expect("apply");
        if rev > 1 {
            let r = rollout_done(&agent, "gc", rev).await;
            assert_eq!(r.state, pb::RolloutState::Succeeded as i32, "{r:?}");
        } else {
            agent.wait_running("gc", 1).await;
        }
        digests.push(sum);
    }
    let s = agent.get("gc").await.expect("status");
    assert_eq!(s.revisions, (2..=11).collect::<Vec<u64>>());
    let mut kept = digests[1..].to_vec();
    kept.sort();
    eventually(
        "revision 1's archive collected",
        Duration::from_secs(30),
        || async { (store_digests(&agent.state_dir) == kept).then_some(()) },
    )
    .await;
    assert!(!store_digests(&agent.state_dir).contains(&digests[0]));
    // Each kept revision still finds its package offline: roll back to the oldest kept.
    for f in std::fs::read_dir(dir.path()).expect("dir").flatten() {
        std::fs::remove_file(f.path()).expect("remove the sources");
    }
    let mut client = agent.client().await;
    client
        .rollback(pb::RollbackRequest {
            name: "gc".into(),
            revision: Some(2),
            force: false,
            expected_revision: None,
        })
        .await
        .expect("rollback to revision 2");
    let r = eventually("the rollback ended", Duration::from_secs(60), || async {
        let r = agent.get("gc").await.ok()?.rollout?;
        (r.kind == pb::RolloutKind::Rollback as i32 && r.state != pb::RolloutState::Running as i32)
            .then_some(r)
    })
    .await;
    assert_eq!(r.state, pb::RolloutState::Succeeded as i32, "{r:?}");
    let i = agent.wait_running("gc", 1).await.remove(0);
    let version = std::fs::read_to_string(format!("/proc/{}/root/app/version", i.pid))
        .expect("the version file");
    assert_eq!(version, "2\n");
}

/// Serves `routes` (path -> body) on 127.0.0.1; a path absent answers 404, `/slow...` sends
/// 64 KiB every 50 ms. Plain HTTP/1.1, one request
/// per connection, ranges ignored.
async fn serve(routes: Arc<Vec<(String, Vec<u8>)>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let routes = routes.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let Some((_, body)) = routes.iter().find(|(p, _)| *p == path) else {
                    let _ = stream
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if stream.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                if path.starts_with("/slow") {
                    for chunk in body.chunks(64 << 10) {
                        if stream.write_all(chunk).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                } else {
                    let _ = stream.write_all(body).await;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    port
}

/// The busybox image as a layout directory under `dir`, broken as `how` says: `missing` (the
/// manifest names a layer blob the layout lacks), `digest` (a layer blob whose bytes are not
/// its digest's), `media` (a layer of a media type no runtime knows). Returns its path and
/// manifest digest.
fn broken_image(dir: &Path, busybox: &[u8], how: &str) -> (String, String) {
    let (one, two) = image::busybox_layers(busybox);
    let config = image::config("app", &[&one, &two]);
    let l1 = Blob::new(image::LAYER_GZ, gzip(&one));
    let media = if how == "media" {
        "application/vnd.example.unknown-layer"
    } else {
        image::LAYER_TAR
    };
    let l2 = Blob::new(media, two);
    let l2_hex = l2.hex();
    let manifest = image::manifest(&config, &[&l1, &l2]);
    let digest = format!("sha256:{}", manifest.hex());
    let img = image::Image {
        blobs: vec![config, l1, l2, manifest],
        manifest: digest.clone(),
    };
    let layout = dir.join(format!("broken-{how}.oci"));
    img.write_dir(&layout);
    let blob = layout.join("blobs/sha256").join(&l2_hex);
    match how {
        "missing" => std::fs::remove_file(&blob).expect("remove the blob"),
        "digest" => {
            let mut b = std::fs::read(&blob).expect("blob");
            b.extend_from_slice(b"tampered");
            std::fs::write(&blob, b).expect("tamper");
        }
        _ => {}
    }
    (layout.display().to_string(), digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_fail_their_rollout_with_the_reason_and_touch_nothing() {
    if skip_unless_root("bad_inputs_fail_their_rollout_with_the_reason_and_touch_nothing") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let good = tar(&[E::File(b"version", b"good\n", 0o644)]);
    let other = tar(&[E::File(b"version", b"other\n", 0o644)]);
    let archive = |name: &str, body: Vec<u8>| (name.to_owned(), body);
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let out_bytes = outside.to_string_lossy().into_owned().into_bytes();
    let routes = vec![
        archive("/good.tar", good.clone()),
        archive(
            "/dotdot.tar",
            tar(&[
                E::File(b"ok", b"x", 0o644),
                E::File(b"../evil", b"x", 0o644),
            ]),
        ),
        archive(
            "/absolute.tar",
            tar(&[E::File(b"/tmp/corral-e2e-abs-evil", b"x", 0o644)]),
        ),
        archive(
            "/symlink.tar",
            tar(&[
                E::Symlink(b"x", &out_bytes),
                E::File(b"x/evil", b"pwned", 0o644),
            ]),
        ),
        archive(
            "/hardlink.tar",
            tar(&[E::HardLink(b"passwd", b"../../../../etc/passwd")]),
        ),
        // Half of an archive the store has never seen.
        archive("/truncated.tar", other[..other.len() / 2].to_vec()),
    ];
    let port = serve(Arc::new(routes.clone())).await;
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let sum = |p: &str| {
        routes
            .iter()
            .find(|(r, _)| r == p)
            .map(|(_, b)| sha256(b))
            .expect("route")
    };
    let agent = Agent::start().await;
    agent
        .apply(&spec("bad", &url("/good.tar"), &sha256(&good)))
        .await
        .expect("apply");
    let before = agent.wait_running("bad", 1).await;

    // (path or URL, sha256, what the reason must say)
    // (A stalled server is refused after 3 idle timeouts of 30 s: the store's own tests
    // cover it with short ones.)
    let rows: Vec<(String, String, String)> = vec![
        (url("/good.tar"), "ab".repeat(32), "sha256 mismatch".into()),
        (url("/missing.tar"), "ab".repeat(32), "404".into()),
        (url("/dotdot.tar"), sum("/dotdot.tar"), "..".into()),
        (
            url("/absolute.tar"),
            sum("/absolute.tar"),
            "absolute".into(),
        ),
        (url("/symlink.tar"), sum("/symlink.tar"), "symlink".into()),
        (url("/hardlink.tar"), sum("/hardlink.tar"), "link".into()),
        (
            url("/truncated.tar"),
            sha256(&other),
            "sha256 mismatch".into(),
        ),
    ];
    for (source, sha, why) in &rows {
        let applied = agent
            .apply(&spec("bad", source, sha))
            .await
            .unwrap_or_else(|e| panic!("apply {source}: {e}"));
        let id = applied.rollout_id.clone();
        let r = eventually(
            &format!("rollout {id} ended"),
            Duration::from_secs(90),
            || async {
                let mut client = agent.client().await;
                let r = client
                    .get_rollout(pb::GetRolloutRequest { id: id.clone() })
                    .await
                    .ok()?
                    .into_inner();
                (r.state != pb::RolloutState::Running as i32).then_some(r)
            },
        )
        .await;
        assert_eq!(r.state, pb::RolloutState::Failed as i32, "{source}: {r:?}");
        assert!(r.reason.contains(why.as_str()), "{source}: {}", r.reason);
        // The automatic rollback returns to what runs, replacing nothing.
        let now = agent.wait_running("bad", 1).await;
        assert_eq!(
            now[0].pid, before[0].pid,
            "{source}: the running instance was replaced"
        );
        // The rollback settles before the next row.
        eventually("no rollout running", Duration::from_secs(60), || async {
            let s = agent.get("bad").await.ok()?;
            s.rollout
                .is_none_or(|r| r.state != pb::RolloutState::Running as i32)
                .then_some(())
        })
        .await;
    }
    assert!(!Path::new("/tmp/corral-e2e-abs-evil").exists());
    assert!(!outside.join("evil").exists());
    assert!(store_tmp_is_empty(&agent.state_dir), "temp leftovers");

    // Images: refused when fetched, nothing runs.
    let Some(busybox) = image::busybox() else {
        return;
    };
    for (how, why) in [
        ("missing", "blob"),
        ("digest", "digest"),
        ("media", "media type"),
    ] {
        let (layout, digest) = broken_image(dir.path(), &busybox, how);
        let name = format!("img-{how}");
        let text =
            format!("name = \"{name}\"\n[image]\nurl = \"{layout}\"\ndigest = \"{digest}\"\n");
        agent.apply(&text).await.expect("apply");
        let error = eventually(
            &format!("{name} refused"),
            Duration::from_secs(60),
            || async {
                let p = agent.get(&name).await.ok()?.package?;
                (p.phase == "failed").then_some(p.error?)
            },
        )
        .await;
        assert!(error.contains(why), "{how}: {error}");
        let s = agent.get(&name).await.expect("status");
        assert!(s.instances.iter().all(|i| i.pid == 0), "{how}: {s:?}");
    }
}

fn store_tmp_is_empty(state: &Path) -> bool {
    std::fs::read_dir(state.join("artifacts/tmp"))
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().ends_with(".part"))
                .count()
                == 0
        })
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_download_is_followed_by_one_that_completes_the_rollout() {
    if skip_unless_root(
        "an_agent_killed_mid_download_is_followed_by_one_that_completes_the_rollout",
    ) {
        return;
    }
    let v1 = tar(&[E::File(b"version", b"1\n", 0o644)]);
    // ~8 MB of noise: about 6 s at 64 KiB every 50 ms.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let noise: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    let v2 = tar(&[
        E::File(b"version", b"2\n", 0o644),
        E::File(b"blob", &noise, 0o644),
    ]);
    let routes = vec![
        ("/v1.tar".to_owned(), v1.clone()),
        ("/slow-v2.tar".to_owned(), v2.clone()),
    ];
    let port = serve(Arc::new(routes)).await;
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let mut agent = Agent::start().await;
    agent
        .apply(&spec("crash", &url("/v1.tar"), &sha256(&v1)))
        .await
        .expect("apply");
    let before = agent.wait_running("crash", 1).await;
    agent
        .apply(&spec("crash", &url("/slow-v2.tar"), &sha256(&v2)))
        .await
        .expect("update");
    eventually(
        "the download under way",
        Duration::from_secs(30),
        || async {
            let p = agent.get("crash").await.ok()?.package?;
            (p.phase == "fetching" && p.done > 0).then_some(())
        },
    )
    .await;
    let pid = agent.pid().expect("agent pid");
    kill9(pid);
    let _ = agent.stop_with(0);
    // Its instance of revision 1 runs on without an agent.
    assert!(corral_e2e::alive(before[0].pid));

    agent.launch().await;
    let r = rollout_done(&agent, "crash", 2).await;
    assert_eq!(r.state, pb::RolloutState::Succeeded as i32, "{r:?}");
    let i = agent.wait_running("crash", 1).await.remove(0);
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{}/root/app/version", i.pid)).expect("version"),
        "2\n"
    );
    let tmp = agent.state_dir.join("artifacts/tmp");
    let left: Vec<String> = std::fs::read_dir(&tmp)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "temp leftovers: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_unpack_is_followed_by_one_that_completes_the_rollout() {
    if skip_unless_root("an_agent_killed_mid_unpack_is_followed_by_one_that_completes_the_rollout")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = tar(&[E::File(b"version", b"1\n", 0o644)]);
    // 30 000 small files in 30 directories: the download of a local file is over at once,
    // the unpack (each file written, the tree synced) takes a while.
    let names: Vec<(Vec<u8>, Vec<u8>)> = (0..30)
        .flat_map(|d| {
            (0..1000).map(move |f| {
                (
                    format!("d{d}/f{f}").into_bytes(),
                    format!("{d}.{f}\n").into_bytes(),
                )
            })
        })
        .collect();
    let dirs: Vec<Vec<u8>> = (0..30).map(|d| format!("d{d}/").into_bytes()).collect();
    let mut entries: Vec<E<'_>> = vec![E::File(b"version", b"2\n", 0o644)];
    entries.extend(dirs.iter().map(|d| E::Dir(d, 0o755)));
    entries.extend(names.iter().map(|(n, data)| E::File(n, data, 0o644)));
    let v2 = tar(&entries);
    let (p1, p2) = (dir.path().join("v1.tar"), dir.path().join("v2.tar"));
    std::fs::write(&p1, &v1).expect("write v1");
    std::fs::write(&p2, &v2).expect("write v2");
    let path = |p: &Path| p.display().to_string();
    let mut agent = Agent::start().await;
    agent
        .apply(&spec("unpack", &path(&p1), &sha256(&v1)))
        .await
        .expect("apply");
    let before = agent.wait_running("unpack", 1).await;
    agent
        .apply(&spec("unpack", &path(&p2), &sha256(&v2)))
        .await
        .expect("update");
    let tmp = agent.state_dir.join("artifacts/tmp");
    let unpacking = || {
        std::fs::read_dir(&tmp)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("unpack-"))
            })
            .unwrap_or(false)
    };
    eventually("the unpack under way", Duration::from_secs(60), || async {
        unpacking().then_some(())
    })
    .await;
    let pid = agent.pid().expect("agent pid");
    kill9(pid);
    let _ = agent.stop_with(0);
    assert!(
        unpacking(),
        "the agent was killed after the unpack ended: nothing was tested"
    );
    assert!(corral_e2e::alive(before[0].pid));

    agent.launch().await;
    // The next agent cleans the half-unpacked tree away before anything else.
    let r = rollout_done(&agent, "unpack", 2).await;
    assert_eq!(r.state, pb::RolloutState::Succeeded as i32, "{r:?}");
    let i = agent.wait_running("unpack", 1).await.remove(0);
    let root = format!("/proc/{}/root/app", i.pid);
    assert_eq!(
        std::fs::read_to_string(format!("{root}/version")).expect("version"),
        "2\n"
    );
    assert_eq!(
        std::fs::read_to_string(format!("{root}/d29/f999")).expect("the last file"),
        "29.999\n",
        "the tree is whole"
    );
    let left: Vec<String> = std::fs::read_dir(&tmp)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "temp leftovers: {left:?}");
    // Two trees, both whole: revision 1's and revision 2's.
    let trees: Vec<String> = std::fs::read_dir(agent.state_dir.join("artifacts/trees"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(trees.len(), 2, "{trees:?}");
}
