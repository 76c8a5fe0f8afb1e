//! OCI images the tests build themselves: a busybox rootfs in two layers, the second with a
//! whiteout and an opaque directory, written as an OCI layout directory or tar.

use std::path::Path;

use serde_json::json;

use super::build::{E, gzip, sha256, tar};

/// Where Debian's busybox-static puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The static busybox, or `None` (with the reason printed) when it is not installed.
pub fn busybox() -> Option<Vec<u8>> {
    match std::fs::read(BUSYBOX) {
        Ok(b) if is_static_elf64(&b) => Some(b),
        _ => {
            eprintln!(
                "skipping: no static {BUSYBOX} (apt-get install busybox-static; .ci/run installs it)"
            );
            None
        }
    }
}

/// A 64-bit little-endian ELF without a program interpreter (`PT_INTERP`).
fn is_static_elf64(b: &[u8]) -> bool {
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8).map(|s| {
            usize::try_from(u64::from_le_bytes(s.try_into().expect("8 bytes"))).expect("a size")
        })
    };
    if b.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        b.get(at..at + 4) != Some(&3u32.to_le_bytes()[..])
    })
}

/// A blob: media type, bytes.
pub struct Blob {
    pub media: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(media: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            media: media.to_string(),
            bytes,
        }
    }

    pub fn hex(&self) -> String {
        sha256(&self.bytes)
    }

    pub fn descriptor(&self) -> serde_json::Value {
        json!({
            "mediaType": self.media,
            "digest": format!("sha256:{}", self.hex()),
            "size": self.bytes.len(),
        })
    }
}

/// An image: its blobs (manifest last) and the manifest's digest.
pub struct Image {
    pub blobs: Vec<Blob>,
    pub manifest: String,
}

pub const LAYER_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The two layers: (uncompressed tar of layer 1, of layer 2).
pub fn busybox_layers(busybox: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let passwd = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/data:/bin/sh\n";
    let group = b"root:x:0:\napp:x:1000:\n";
    let one = tar(&[
        E::Dir(b"bin/", 0o755),
        E::File(b"bin/busybox", busybox, 0o755),
        E::Symlink(b"bin/sh", b"busybox"),
        E::Dir(b"etc/", 0o755),
        E::File(b"etc/passwd", passwd, 0o644),
        E::File(b"etc/group", group, 0o644),
        E::Dir(b"tmp/", 0o1777),
        E::Dir(b"data/", 0o755),
        E::File(b"data/old.txt", b"old\n", 0o644),
        E::File(b"data/keep.txt", b"keep\n", 0o644),
        E::Dir(b"opq/", 0o755),
        E::File(b"opq/lower.txt", b"lower\n", 0o644),
        E::File(b"gone.txt", b"gone\n", 0o644),
        E::File(b"bin/suid", b"#!/bin/sh\n", 0o4755),
    ]);
    let two = tar(&[
        E::File(b".wh.gone.txt", b"", 0o644),
        E::File(b"data/.wh.old.txt", b"", 0o644),
        E::File(b"data/new.txt", b"new\n", 0o644),
        E::Dir(b"opq/", 0o755),
        E::File(b"opq/.wh..wh..opq", b"", 0o644),
        E::File(b"opq/upper.txt", b"upper\n", 0o644),
        E::File(
            b"bin/hello",
            b"#!/bin/sh\necho hello from the image\n",
            0o755,
        ),
    ]);
    (one, two)
}

/// The config for layers with these uncompressed tars.
pub fn config(user: &str, layers: &[&[u8]]) -> Blob {
    config_for(host_arch(), user, layers)
}

/// An index over manifests, each with its platform's architecture.
pub fn index(manifests: &[(&Blob, &str)]) -> Blob {
    let list: Vec<serde_json::Value> = manifests
        .iter()
        .map(|(m, arch)| {
            let mut d = m.descriptor();
            d["platform"] = json!({"os": "linux", "architecture": arch});
            d
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": list});
    Blob::new(INDEX, serde_json::to_vec(&index).expect("json"))
}

/// The config of an image for `arch`.
pub fn config_for(arch: &str, user: &str, layers: &[&[u8]]) -> Blob {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256(l)))
        .collect();
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "User": user,
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hi"],
            "Env": ["PATH=/bin", "GREETING=hi"],
            "WorkingDir": "/data"
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    });
    Blob::new(CONFIG, serde_json::to_vec(&config).expect("json"))
}

/// A manifest over a config and layer blobs.
pub fn manifest(config: &Blob, layers: &[&Blob]) -> Blob {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(|l| l.descriptor()).collect::<Vec<_>>(),
    });
    Blob::new(MANIFEST, serde_json::to_vec(&manifest).expect("json"))
}

/// The busybox image: layer 1 gzip, layer 2 plain tar, config user `user`.
pub fn busybox_image(busybox: &[u8], user: &str) -> Image {
    let (one, two) = busybox_layers(busybox);
    let config = config(user, &[&one, &two]);
    let l1 = Blob::new(LAYER_GZ, gzip(&one));
    let l2 = Blob::new(LAYER_TAR, two);
    let manifest = manifest(&config, &[&l1, &l2]);
    let digest = format!("sha256:{}", manifest.hex());
    Image {
        blobs: vec![config, l1, l2, manifest],
        manifest: digest,
    }
}

impl Image {
    fn index(&self) -> Vec<u8> {
        let manifest = self.blobs.last().expect("manifest");
        let mut d = manifest.descriptor();
        d["annotations"] = json!({"org.opencontainers.image.ref.name": "latest"});
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [d]})).expect("json")
    }

    /// Writes an OCI layout directory.
    pub fn write_dir(&self, dir: &Path) {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("mkdir");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("write");
        std::fs::write(dir.join("index.json"), self.index()).expect("write");
        for blob in &self.blobs {
            std::fs::write(dir.join("blobs/sha256").join(blob.hex()), &blob.bytes).expect("write");
        }
    }

    /// The layout as an (uncompressed) tar.
    pub fn tar(&self) -> Vec<u8> {
        let index = self.index();
        let mut names: Vec<(String, &[u8])> = vec![
            ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
            ("index.json".into(), &index),
        ];
        let hexes: Vec<String> = self.blobs.iter().map(Blob::hex).collect();
        for (blob, hex) in self.blobs.iter().zip(&hexes) {
            names.push((format!("blobs/sha256/{hex}"), &blob.bytes));
        }
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in names {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, data).expect("append");
        }
        b.into_inner().expect("tar")
    }
}
